//! The two servers of a differential run: a real etcd (the oracle) and the target (kine-rs, or
//! a second etcd when validating the harness), each with the raw generated gRPC clients.

use std::future::Future;
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

/// How long one request may take before the harness calls it a failure.
pub(crate) const RPC_TIMEOUT: Duration = Duration::from_secs(15);

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
    fn open(mut client: WatchClient<Channel>) -> Self {
        let (tx, requests) = mpsc::unbounded_channel::<WatchRequest>();
        let rx = forward_stream(
            async move { client.watch(UnboundedReceiverStream::new(requests)).await },
            "watch",
        );
        RawWatchStream { tx, rx }
    }
}

/// Runs a streaming call in its own task and forwards every response, then the stream's end
/// or error, to the returned receiver. (A gRPC server may hold the response headers back until
/// it has something to send, so awaiting the call inline could deadlock.)
fn forward_stream<T: Send + 'static>(
    call: impl Future<Output = Result<tonic::Response<tonic::Streaming<T>>, Status>> + Send + 'static,
    what: &'static str,
) -> mpsc::UnboundedReceiver<Result<T, Status>> {
    let (sender, receiver) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = match call.await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                let _ = sender.send(Err(status));
                return;
            }
        };
        loop {
            let item = match stream.message().await {
                Ok(Some(message)) => Ok(message),
                Ok(None) => Err(Status::aborted(format!(
                    "differential harness: {what} stream closed by the server"
                ))),
                Err(status) => Err(status),
            };
            let last = item.is_err();
            if sender.send(item).is_err() || last {
                return;
            }
        }
    });
    receiver
}

/// The lease keep-alive stream of one server.
pub(crate) struct KeepAliveStream {
    pub tx: mpsc::UnboundedSender<LeaseKeepAliveRequest>,
    pub rx: mpsc::UnboundedReceiver<Result<LeaseKeepAliveResponse, Status>>,
}

impl KeepAliveStream {
    fn open(mut client: LeaseClient<Channel>) -> Self {
        let (tx, requests) = mpsc::unbounded_channel::<LeaseKeepAliveRequest>();
        let rx = forward_stream(
            async move {
                client
                    .lease_keep_alive(UnboundedReceiverStream::new(requests))
                    .await
            },
            "keep-alive",
        );
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
