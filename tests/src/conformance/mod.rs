//! The conformance suite: one set of cases written with the `etcd-client` crate, run against
//! every kine-rs backend and against a real etcd (which checks that the suite's expectations
//! are etcd's own).
//!
//! Each case is an `async fn(Target) -> anyhow::Result<()>` that starts its own server
//! process, so cases are isolated and run in parallel. `tests/tests/conformance.rs` turns
//! every case into one `#[tokio::test]` per target.

use std::fmt::Debug;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use etcd_client::{
    Client, Event, EventType, GetOptions, KeyValue, WatchOptions, WatchResponse, WatchStream,
};

use crate::{Backend, ChildGuard, spawn_kine_with};

mod compact;
mod errors;
mod kube;
mod kv;
mod lease;
mod maintenance;
mod txn;
mod watch;

pub use compact::*;
pub use errors::*;
pub use kube::*;
pub use kv::*;
pub use lease::*;
pub use maintenance::*;
pub use txn::*;
pub use watch::*;

/// What a case runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// kine-rs on one of its backends.
    Kine(Backend),
    /// A real etcd, the oracle.
    Etcd,
    /// kine-rs's etcd proxy (one tenant) in front of a real etcd.
    EtcdProxy,
}

/// Extra server options a case needs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Send watch progress notifications every second
    /// (`--watch-progress-notify-interval 1s` on kine-rs,
    /// `--experimental-watch-progress-notify-interval 1s` on etcd).
    pub progress_notify_1s: bool,
}

enum Process {
    Harness(ChildGuard),
    Etcd(crate::ChildGuard),
    // Fields drop in order: the proxy stops before its etcd.
    Proxy {
        kine: Box<crate::ChildGuard>,
        _etcd: Box<crate::ChildGuard>,
    },
}

/// A running server of one target; the process is killed when dropped.
pub struct Server {
    _process: Process,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// What runs behind `endpoint`.
    pub target: Target,
}

impl Server {
    /// Starts a server for `target` with default flags and waits until it answers.
    pub async fn start(target: Target) -> Result<Server> {
        Self::start_with(target, Options::default()).await
    }

    /// Starts a server for `target` with `options` and waits until it answers.
    pub async fn start_with(target: Target, options: Options) -> Result<Server> {
        let server = tokio::task::spawn_blocking(move || {
            let process = match target {
                Target::Kine(backend) => {
                    let mut args: Vec<&str> = Vec::new();
                    if options.progress_notify_1s {
                        args.extend(["--watch-progress-notify-interval", "1s"]);
                    }
                    Process::Harness(spawn_kine_with(backend, &args))
                }
                Target::Etcd => {
                    let mut args: Vec<&str> = Vec::new();
                    if options.progress_notify_1s {
                        args.extend(["--experimental-watch-progress-notify-interval", "1s"]);
                    }
                    Process::Etcd(crate::spawn_etcd_with(&args))
                }
                Target::EtcdProxy => {
                    // The proxy sends a client's transaction nested in one that guards the
                    // tenant's freeze, and etcd counts the outer operations against the
                    // nested ones' budget: etcd needs room above kine-rs's 128 (README).
                    let mut args: Vec<&str> = vec!["--max-txn-ops", "256"];
                    if options.progress_notify_1s {
                        // The proxy forwards watches: etcd sends the notifications.
                        args.extend(["--experimental-watch-progress-notify-interval", "1s"]);
                    }
                    let etcd = crate::spawn_etcd_with(&args);
                    let kine = crate::spawn_kine_on(
                        &format!("etcd://{}", etcd.address),
                        tempfile::tempdir().expect("tempdir"),
                        &["--tenant", "conformance"],
                    );
                    Process::Proxy {
                        kine: Box::new(kine),
                        _etcd: Box::new(etcd),
                    }
                }
            };
            let endpoint = match &process {
                Process::Harness(guard) => guard.endpoint.clone(),
                Process::Etcd(etcd) => etcd.endpoint.clone(),
                Process::Proxy { kine, .. } => kine.endpoint.clone(),
            };
            Server {
                _process: process,
                endpoint,
                target,
            }
        })
        .await?;
        server.wait_ready().await?;
        Ok(server)
    }

    /// A new client connected to this server.
    pub async fn client(&self) -> Result<Client> {
        Ok(Client::connect([self.endpoint.as_str()], None).await?)
    }

    /// Whether this is a kine-rs target.
    pub fn is_kine(&self) -> bool {
        matches!(self.target, Target::Kine(_) | Target::EtcdProxy)
    }

    async fn wait_ready(&self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let attempt = async {
                let mut client = self.client().await?;
                client.get("ready-probe", None).await?;
                anyhow::Ok(())
            };
            match tokio::time::timeout(Duration::from_secs(5), attempt).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) if tokio::time::Instant::now() > deadline => {
                    bail!(
                        "{:?} at {} never answered: {e:#}",
                        self.target,
                        self.endpoint
                    )
                }
                _ if tokio::time::Instant::now() > deadline => {
                    bail!("{:?} at {} never answered", self.target, self.endpoint)
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

/// Asserts that `result` failed with gRPC `code` and exactly `message`.
pub fn expect_status<T: Debug>(
    result: std::result::Result<T, etcd_client::Error>,
    code: tonic::Code,
    message: &str,
) -> Result<()> {
    match result {
        Ok(value) => bail!("expected {code:?} {message:?}, got success: {value:?}"),
        Err(etcd_client::Error::GRpcStatus(status)) => {
            if status.code() != code || status.message() != message {
                bail!(
                    "expected {code:?} {message:?}, got {:?} {:?}",
                    status.code(),
                    status.message()
                );
            }
            Ok(())
        }
        Err(other) => bail!("expected {code:?} {message:?}, got a non-gRPC error: {other}"),
    }
}

/// Asserts that `result` failed with gRPC `code` (whatever the message).
pub fn expect_code<T: Debug>(
    result: std::result::Result<T, etcd_client::Error>,
    code: tonic::Code,
) -> Result<tonic::Status> {
    match result {
        Ok(value) => bail!("expected {code:?}, got success: {value:?}"),
        Err(etcd_client::Error::GRpcStatus(status)) => {
            if status.code() != code {
                bail!(
                    "expected {code:?}, got {:?} {:?}",
                    status.code(),
                    status.message()
                );
            }
            Ok(status)
        }
        Err(other) => bail!("expected {code:?}, got a non-gRPC error: {other}"),
    }
}

/// The current revision of the store (header of a one-key read).
pub async fn current_revision(client: &mut Client) -> Result<i64> {
    let resp = client
        .get("\0", Some(GetOptions::new().with_count_only()))
        .await?;
    header_revision(resp.header())
}

/// The revision of a response header, failing when the header is missing.
pub fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Result<i64> {
    Ok(header.context("response without header")?.revision())
}

/// Reads one key; `None` when absent.
pub async fn get_one(client: &mut Client, key: &str) -> Result<Option<KeyValue>> {
    let resp = client.get(key, None).await?;
    Ok(resp.kvs().first().cloned())
}

/// Keys of `kvs` as UTF-8 strings.
pub fn keys(kvs: &[KeyValue]) -> Vec<String> {
    kvs.iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect()
}

/// Values of `kvs` as UTF-8 strings.
pub fn values(kvs: &[KeyValue]) -> Vec<String> {
    kvs.iter()
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
        .collect()
}

/// How long a watch waits for a message that should come.
pub const WATCH_WAIT: Duration = Duration::from_secs(10);

/// The next watch response, failing after [`WATCH_WAIT`].
pub async fn next_response(stream: &mut WatchStream) -> Result<WatchResponse> {
    next_response_within(stream, WATCH_WAIT)
        .await?
        .ok_or_else(|| anyhow!("no watch response within {WATCH_WAIT:?}"))
}

/// The next watch response within `wait`, `None` when none came.
pub async fn next_response_within(
    stream: &mut WatchStream,
    wait: Duration,
) -> Result<Option<WatchResponse>> {
    match tokio::time::timeout(wait, stream.message()).await {
        Err(_) => Ok(None),
        Ok(Ok(Some(resp))) => Ok(Some(resp)),
        Ok(Ok(None)) => bail!("watch stream ended"),
        Ok(Err(e)) => bail!("watch stream failed: {e}"),
    }
}

/// Opens a watch stream with one watch and consumes its `created` response; returns the
/// stream and the watch id.
pub async fn watch(
    client: &mut Client,
    key: &str,
    options: Option<WatchOptions>,
) -> Result<(WatchStream, i64)> {
    let mut stream = client.watch(key, options).await?;
    let created = next_response(&mut stream).await?;
    if !created.created() {
        bail!("first watch response is not `created`: {created:?}");
    }
    Ok((stream, created.watch_id()))
}

/// Adds a watch to an existing stream and returns its id from the `created` response.
pub async fn add_watch(
    stream: &mut WatchStream,
    key: &str,
    options: Option<WatchOptions>,
) -> Result<i64> {
    stream.watch(key, options).await?;
    let created = next_response(stream).await?;
    if !created.created() {
        bail!("watch response is not `created`: {created:?}");
    }
    Ok(created.watch_id())
}

/// A watch event reduced to comparable fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// The watch the event was delivered to.
    pub watch_id: i64,
    /// PUT or DELETE.
    pub kind: EventType,
    /// The key.
    pub key: String,
    /// The value (empty for deletes).
    pub value: String,
    /// The event's revision (`kv.mod_revision`).
    pub revision: i64,
    /// `kv.create_revision`.
    pub create_revision: i64,
    /// `kv.version`.
    pub version: i64,
    /// The previous value, when `prev_kv` was asked for and there was one.
    pub prev_value: Option<String>,
}

impl Seen {
    fn from_event(watch_id: i64, event: &Event) -> Result<Seen> {
        let kv = event.kv().context("event without kv")?;
        Ok(Seen {
            watch_id,
            kind: event.event_type(),
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            value: String::from_utf8_lossy(kv.value()).into_owned(),
            revision: kv.mod_revision(),
            create_revision: kv.create_revision(),
            version: kv.version(),
            prev_value: event
                .prev_kv()
                .map(|p| String::from_utf8_lossy(p.value()).into_owned()),
        })
    }
}

/// Collects `count` events from `stream` (across responses), failing if they do not come
/// within [`WATCH_WAIT`]. Also checks that no revision is split across two responses of the
/// same watch and that revisions never go backwards per watch.
pub async fn collect_events(stream: &mut WatchStream, count: usize) -> Result<Vec<Seen>> {
    let mut seen: Vec<Seen> = Vec::new();
    let deadline = tokio::time::Instant::now() + WATCH_WAIT;
    let mut last_rev_of: std::collections::HashMap<i64, i64> = Default::default();
    while seen.len() < count {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(resp) = next_response_within(stream, left).await? else {
            bail!(
                "only {} of {count} events within {WATCH_WAIT:?}: {seen:#?}",
                seen.len()
            );
        };
        if resp.canceled() {
            bail!(
                "watch {} canceled while collecting: {resp:?}",
                resp.watch_id()
            );
        }
        for event in resp.events() {
            let s = Seen::from_event(resp.watch_id(), event)?;
            if let Some(&last) = last_rev_of.get(&s.watch_id)
                && s.revision < last
            {
                bail!(
                    "revision went backwards on watch {}: {last} then {s:?}",
                    s.watch_id
                );
            }
            seen.push(s);
        }
        // Every revision of this response must be above the previous response's revisions.
        if let Some(first) = resp.events().first().and_then(|e| e.kv())
            && let Some(&last) = last_rev_of.get(&resp.watch_id())
            && first.mod_revision() <= last
        {
            bail!(
                "revision {} split across responses (or repeated) on watch {}",
                first.mod_revision(),
                resp.watch_id()
            );
        }
        if let Some(last) = resp.events().last().and_then(|e| e.kv()) {
            last_rev_of.insert(resp.watch_id(), last.mod_revision());
        }
    }
    if seen.len() > count {
        bail!("expected {count} events, got more: {seen:#?}");
    }
    Ok(seen)
}

/// Fails if any event arrives on `stream` within `wait`.
pub async fn expect_quiet(stream: &mut WatchStream, wait: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        match next_response_within(stream, left).await? {
            None => return Ok(()),
            Some(resp) if resp.events().is_empty() => continue,
            Some(resp) => bail!("expected no events, got {resp:?}"),
        }
    }
}
