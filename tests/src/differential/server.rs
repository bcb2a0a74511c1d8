//! The two servers of a differential run: a real etcd (the oracle) and the target (kine-rs, or
//! a second etcd when validating the harness), each with the raw generated gRPC clients.

use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kine_proto::etcdserverpb::kv_client::KvClient;
use kine_proto::etcdserverpb::lease_client::LeaseClient;
use kine_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use kine_proto::etcdserverpb::watch_client::WatchClient;
use kine_proto::etcdserverpb::{
    LeaseKeepAliveRequest, LeaseKeepAliveResponse, RangeRequest, WatchRequest, WatchResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Status;
use tonic::transport::Channel;

use crate::{etcd_binary, free_port, wait_for_port};

/// How long one request may take before the harness calls it a failure.
pub(crate) const RPC_TIMEOUT: Duration = Duration::from_secs(15);

/// A real etcd started by [`spawn_etcd_with`]; killed and reaped when dropped.
pub struct EtcdGuard {
    child: Child,
    _dir: tempfile::TempDir,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The data directory's parent.
    pub dir: PathBuf,
}

impl Drop for EtcdGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a single-member real etcd (`$ETCD_BIN`, else `etcd` on PATH) on free loopback ports,
/// like the harness's `spawn_etcd`, with extra command-line arguments (for example
/// `--unsafe-no-fsync` to make a long differential run fast).
pub fn spawn_etcd_with(extra_args: &[&str]) -> EtcdGuard {
    let dir = tempfile::tempdir().expect("tempdir for etcd");
    let client_port = free_port();
    let peer_port = free_port();
    let address = format!("127.0.0.1:{client_port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    let mut child = Command::new(etcd_binary())
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--name")
        .arg("oracle")
        .arg("--listen-client-urls")
        .arg(format!("http://{address}"))
        .arg("--advertise-client-urls")
        .arg(format!("http://{address}"))
        .arg("--listen-peer-urls")
        .arg(&peer)
        .arg("--initial-advertise-peer-urls")
        .arg(&peer)
        .arg("--initial-cluster")
        .arg(format!("oracle={peer}"))
        .arg("--log-level")
        .arg("error")
        .args(extra_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(if std::env::var_os("KINE_TEST_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
        .expect("start etcd (is it installed? the README's test command installs it)");
    wait_for_port(&address, &mut child, "etcd");
    EtcdGuard {
        child,
        endpoint: format!("http://{address}"),
        dir: dir.path().to_path_buf(),
        _dir: dir,
    }
}

/// Runs one RPC with the harness's timeout and unwraps the tonic response.
pub(crate) async fn call<T>(
    fut: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout(RPC_TIMEOUT, fut).await {
        Ok(result) => result.map(tonic::Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "differential harness: no answer within {RPC_TIMEOUT:?}"
        ))),
    }
}

/// One watch stream (one `Watch` RPC) of one server: requests go in through `tx`, every
/// response (or the stream's error) comes out of `rx` in arrival order.
pub(crate) struct RawWatchStream {
    pub tx: mpsc::UnboundedSender<WatchRequest>,
    pub rx: mpsc::UnboundedReceiver<Result<WatchResponse, Status>>,
}

impl RawWatchStream {
    fn open(client: WatchClient<Channel>) -> Self {
        let (tx, req_rx) = mpsc::unbounded_channel::<WatchRequest>();
        let (resp_tx, rx) = mpsc::unbounded_channel();
        let mut client = client;
        // The call runs in its own task: a gRPC server may hold the response headers back
        // until it has something to send, so awaiting the call inline could deadlock.
        tokio::spawn(async move {
            match client.watch(UnboundedReceiverStream::new(req_rx)).await {
                Ok(response) => {
                    let mut stream = response.into_inner();
                    loop {
                        match stream.message().await {
                            Ok(Some(msg)) => {
                                if resp_tx.send(Ok(msg)).is_err() {
                                    return;
                                }
                            }
                            Ok(None) => {
                                let _ = resp_tx.send(Err(Status::aborted(
                                    "differential harness: watch stream closed by the server",
                                )));
                                return;
                            }
                            Err(status) => {
                                let _ = resp_tx.send(Err(status));
                                return;
                            }
                        }
                    }
                }
                Err(status) => {
                    let _ = resp_tx.send(Err(status));
                }
            }
        });
        RawWatchStream { tx, rx }
    }
}

/// The lease keep-alive stream of one server.
pub(crate) struct KeepAliveStream {
    pub tx: mpsc::UnboundedSender<LeaseKeepAliveRequest>,
    pub rx: mpsc::UnboundedReceiver<Result<LeaseKeepAliveResponse, Status>>,
}

impl KeepAliveStream {
    fn open(client: LeaseClient<Channel>) -> Self {
        let (tx, req_rx) = mpsc::unbounded_channel::<LeaseKeepAliveRequest>();
        let (resp_tx, rx) = mpsc::unbounded_channel();
        let mut client = client;
        tokio::spawn(async move {
            match client
                .lease_keep_alive(UnboundedReceiverStream::new(req_rx))
                .await
            {
                Ok(response) => {
                    let mut stream = response.into_inner();
                    loop {
                        match stream.message().await {
                            Ok(Some(msg)) => {
                                if resp_tx.send(Ok(msg)).is_err() {
                                    return;
                                }
                            }
                            Ok(None) => {
                                let _ = resp_tx.send(Err(Status::aborted(
                                    "differential harness: keep-alive stream closed by the server",
                                )));
                                return;
                            }
                            Err(status) => {
                                let _ = resp_tx.send(Err(status));
                                return;
                            }
                        }
                    }
                }
                Err(status) => {
                    let _ = resp_tx.send(Err(status));
                }
            }
        });
        KeepAliveStream { tx, rx }
    }

    /// Sends one keep-alive and waits for its answer.
    pub async fn keep_alive(
        &mut self,
        req: LeaseKeepAliveRequest,
    ) -> Result<LeaseKeepAliveResponse, Status> {
        self.tx.send(req).map_err(|_| {
            Status::aborted("differential harness: keep-alive stream is gone (send failed)")
        })?;
        match tokio::time::timeout(RPC_TIMEOUT, self.rx.recv()).await {
            Ok(Some(result)) => result,
            Ok(None) => Err(Status::aborted(
                "differential harness: keep-alive stream is gone",
            )),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "differential harness: no keep-alive answer within {RPC_TIMEOUT:?}"
            ))),
        }
    }
}

/// The clients of one server.
pub(crate) struct Clients {
    pub kv: KvClient<Channel>,
    pub lease: LeaseClient<Channel>,
    pub maint: MaintenanceClient<Channel>,
    watch: WatchClient<Channel>,
    keep_alive: Option<KeepAliveStream>,
}

impl Clients {
    /// Connects to `endpoint` and waits until the server answers a Range (etcd needs a moment
    /// to elect itself leader after it starts listening).
    pub async fn connect(endpoint: &str, what: &str) -> anyhow::Result<Clients> {
        let channel = Channel::from_shared(endpoint.to_string())
            .with_context(|| format!("bad endpoint {endpoint}"))?
            .connect_timeout(Duration::from_secs(10))
            .connect()
            .await
            .with_context(|| format!("connect to {what} at {endpoint}"))?;
        let mut clients = Clients {
            kv: KvClient::new(channel.clone()),
            lease: LeaseClient::new(channel.clone()),
            maint: MaintenanceClient::new(channel.clone()),
            watch: WatchClient::new(channel),
            keep_alive: None,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let probe = RangeRequest {
                key: "differential-probe".into(),
                ..Default::default()
            };
            match call(clients.kv.range(probe)).await {
                Ok(_) => return Ok(clients),
                Err(status) if Instant::now() < deadline => {
                    let _ = status;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(status) => bail!("{what} at {endpoint} does not serve Range: {status}"),
            }
        }
    }

    pub fn open_watch_stream(&self) -> RawWatchStream {
        RawWatchStream::open(self.watch.clone())
    }

    pub fn keep_alive_stream(&mut self) -> &mut KeepAliveStream {
        let lease = self.lease.clone();
        self.keep_alive
            .get_or_insert_with(|| KeepAliveStream::open(lease))
    }
}
