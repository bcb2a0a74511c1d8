//! `kine-load noisy-neighbour`: how much a hostile tenant costs another one.
//!
//! Tenant B runs kube-apiserver's creates at `--clients` clients, first alone, then while
//! tenant A runs the worst load the API allows at once: a lease keep-alive flood, transactions
//! comparing and reading a huge range, thousands of watches fed by a writer, and watchers that
//! never read while A writes 1 MiB values under them. B's throughput and latency in both
//! phases and the server's memory (`--server-pid`) before, during and after A are reported.
//!
//! In a kine-rs gateway A and B are tenants (client certificates `tenant-0000` and
//! `tenant-0001` from `--pki-dir`); on a target without tenants (etcd, `--no-tenants`) they
//! are two prefixes of one keyspace, the nearest equivalent. A's answers are checked too, but
//! A's refusals (limits reached) are A's business: they are counted, not B's errors.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Args;
use futures::StreamExt;
use kine_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use kine_proto::etcdserverpb::lease_client::LeaseClient;
use kine_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use kine_proto::etcdserverpb::request_op::Request;
use kine_proto::etcdserverpb::response_op::Response;
use kine_proto::etcdserverpb::watch_client::WatchClient;
use kine_proto::etcdserverpb::watch_request::RequestUnion;
use kine_proto::etcdserverpb::{
    Compare, LeaseGrantRequest, LeaseKeepAliveRequest, PutRequest, RangeRequest, RequestOp,
    TxnRequest, WatchCreateRequest, WatchRequest, WatchResponse,
};
use serde_json::json;
use tokio::task::JoinHandle;
use tonic::Streaming;
use tonic::transport::Channel;

use crate::Opts;
use crate::gateway::Access;
use crate::report::{Report, Stats};
use crate::workloads::{MAX_MESSAGE, checked_creates, kv_client, prefix_end};

/// Watches per Watch stream of A's watch load (etcd has no limit; kine-rs allows 10,000).
const WATCHES_PER_STREAM: usize = 1000;
/// Keep-alive streams of A's flood.
const KEEPALIVE_STREAMS: usize = 4;
/// How long A's load runs before B's second phase starts (watches open, floods going).
const RAMP_UP: Duration = Duration::from_secs(2);
/// How long B's second phase may wait past [`RAMP_UP`] for A's first huge transaction to be
/// answered (each reads every key A loaded, and waits on A's read budget).
const HUGE_TXN_RAMP_UP: Duration = Duration::from_secs(60);
/// How long after A stops the server's memory is sampled again.
const SETTLE: Duration = Duration::from_secs(3);
/// Longest wait for one of A's set-up steps (a connection, a watch created, a grant).
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Options of `kine-load noisy-neighbour`.
#[derive(Args, Debug, Clone)]
pub struct NoisyOpts {
    /// B's creates: `--clients`, `--conns`, `--val-size`; `--duration` is each phase's length.
    #[command(flatten)]
    pub opts: Opts,
    /// Directory written by `kine-load pki --clients 2`: A connects as `tenant-0000`, B as
    /// `tenant-0001` (an https:// endpoint, a kine-rs gateway).
    #[arg(long)]
    pub pki_dir: Option<PathBuf>,
    /// Server name to verify the server certificate against (default: the endpoint's host).
    #[arg(long)]
    pub tls_domain: Option<String>,
    /// The target has no tenants (etcd): A and B are two prefixes.
    #[arg(long)]
    pub no_tenants: bool,
    /// The server's process id, to sample its resident memory.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Keys A loads first; each of A's huge transactions compares and reads all of them.
    #[arg(long, default_value_t = 100_000)]
    pub a_keys: usize,
    /// Clients running A's huge transactions.
    #[arg(long, default_value_t = 2)]
    pub a_huge_txn_clients: usize,
    /// Watches A opens over the keys its small writer puts (0: neither watches nor writer).
    #[arg(long, default_value_t = 2000)]
    pub a_watches: usize,
    /// Leases A grants and keeps alive as fast as the server answers.
    #[arg(long, default_value_t = 1000)]
    pub a_leases: usize,
    /// A's watchers that never read, each on a connection of its own, under the values of
    /// A's big writer (0: neither these watchers nor the big writer).
    #[arg(long, default_value_t = 4)]
    pub a_slow_watchers: usize,
    /// Size of the values A's big writer puts under its slow watchers.
    #[arg(long, default_value_t = 1024 * 1024)]
    pub a_value_size: usize,
}

/// What A managed to do, counted by its tasks.
#[derive(Default)]
struct Noise {
    keepalives: AtomicU64,
    huge_txns: AtomicU64,
    big_puts: AtomicU64,
    small_puts: AtomicU64,
    watch_events: AtomicU64,
    watches_open: AtomicU64,
    slow_watchers_open: AtomicU64,
    leases_granted: AtomicU64,
    refused: AtomicU64,
    first_refusal: Mutex<Option<String>>,
    /// Answers that were wrong (not refusals): errors of the run.
    wrong: Mutex<Stats>,
    stop: AtomicBool,
}

impl Noise {
    fn refused(&self, what: &str, message: impl std::fmt::Display) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_refusal.lock().unwrap_or_else(|e| e.into_inner());
        if first.is_none() {
            *first = Some(format!("{what}: {message}"));
        }
    }

    fn wrong(&self, what: &str, message: impl std::fmt::Display) {
        self.wrong
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .error(format!("A's {what}: {message}"));
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// VmRSS of `pid` in MiB.
fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// `kine-load noisy-neighbour`.
pub async fn noisy_neighbour(n: &NoisyOpts) -> Result<Report> {
    let opts = &n.opts;
    let base = opts.prefix("noisy-neighbour");
    let (a_prefix, b_prefix) = (format!("{base}a/"), format!("{base}b/"));
    let access = match &n.pki_dir {
        Some(dir) => Access::tls(&opts.endpoints, dir, n.tls_domain.clone())?,
        None if n.no_tenants => Access::Fresh(opts.endpoints.clone()),
        None => {
            bail!("give --pki-dir (a kine-rs gateway) or --no-tenants (a target without tenants)")
        }
    };
    let mut b_channels = Vec::new();
    for _ in 0..opts.conns.max(1) {
        b_channels.push(access.channel(1).await?);
    }
    let a = access.channel(0).await?;
    let loaded = load(&a, &a_prefix, n.a_keys).await?;
    let rss = || n.server_pid.and_then(rss_mib);
    let rss_before = rss();

    let (alone, alone_elapsed) = checked_creates(
        opts,
        &b_channels,
        &format!("{b_prefix}alone/"),
        opts.duration(),
    )
    .await?;
    let alone = alone.into_report(alone_elapsed);

    let noise = Arc::new(Noise::default());
    let tasks = start_noise(n, &access, &a, &a_prefix, &noise).await?;
    tokio::time::sleep(RAMP_UP).await;
    // B is measured beside the whole of A: a huge transaction can take longer than the ramp-up
    // (a debug build under the rest of A's load took over 3 s), and one still in flight when
    // A stops was never counted, as if that part of A had not run.
    let waiting_since = std::time::Instant::now();
    while n.a_huge_txn_clients > 0
        && noise.huge_txns.load(Ordering::Relaxed) == 0
        && waiting_since.elapsed() < HUGE_TXN_RAMP_UP
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (sampling, pid) = (sampling.clone(), n.server_pid);
        tokio::spawn(async move {
            let mut peak: Option<f64> = None;
            while sampling.load(Ordering::Relaxed) {
                if let Some(mib) = pid.and_then(rss_mib) {
                    peak = Some(peak.map_or(mib, |p: f64| p.max(mib)));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            peak
        })
    };
    let (mut with_a, with_a_elapsed) = checked_creates(
        opts,
        &b_channels,
        &format!("{b_prefix}with-a/"),
        opts.duration(),
    )
    .await?;
    // B's leases are B's: whatever A holds, B still gets one.
    if let Err(e) = lease_and_put(&b_channels[0], &format!("{b_prefix}leased")).await {
        with_a.error(format!("B's lease while A floods: {e:#}"));
    }
    sampling.store(false, Ordering::Relaxed);
    let rss_peak = sampler.await.context("memory sampler")?;

    noise.stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.abort();
        let _ = task.await;
    }
    drop(a);
    tokio::time::sleep(SETTLE).await;
    let rss_after = rss();

    let count = |c: &AtomicU64| c.load(Ordering::Relaxed);
    with_a.set("alone_ops_per_sec", json!(round1(alone.ops_per_sec)));
    with_a.set("alone_p50_ms", json!(alone.p50_ms));
    with_a.set("alone_p99_ms", json!(alone.p99_ms));
    with_a.set("alone_errors", json!(alone.errors));
    if let Some(e) = alone.first_error.as_ref() {
        with_a.set("alone_first_error", json!(e));
    }
    with_a.set("a_keys", json!(loaded));
    with_a.set("a_keepalives", json!(count(&noise.keepalives)));
    with_a.set("a_leases_granted", json!(count(&noise.leases_granted)));
    with_a.set("a_huge_txns", json!(count(&noise.huge_txns)));
    with_a.set("a_big_puts", json!(count(&noise.big_puts)));
    with_a.set("a_small_puts", json!(count(&noise.small_puts)));
    with_a.set("a_watches_open", json!(count(&noise.watches_open)));
    with_a.set("a_watch_events", json!(count(&noise.watch_events)));
    with_a.set(
        "a_slow_watchers_open",
        json!(count(&noise.slow_watchers_open)),
    );
    with_a.set("a_refused", json!(count(&noise.refused)));
    if let Some(first) = noise
        .first_refusal
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
    {
        with_a.set("a_first_refusal", json!(first));
    }
    for (name, value) in [
        ("rss_before_mib", rss_before),
        ("rss_peak_mib", rss_peak),
        ("rss_after_mib", rss_after),
    ] {
        if let Some(mib) = value {
            with_a.set(name, json!(round1(mib)));
        }
    }
    let mut report = with_a.into_report(with_a_elapsed);
    if alone.ops_per_sec > 0.0 {
        report.extra.insert(
            "kept".to_string(),
            json!(round3(report.ops_per_sec / alone.ops_per_sec)),
        );
    }
    if alone.p99_ms > 0.0 {
        report.extra.insert(
            "p99_vs_alone".to_string(),
            json!(round3(report.p99_ms / alone.p99_ms)),
        );
    }
    // B's errors in either phase and A's wrong answers are errors of the run.
    let wrong = std::mem::take(&mut *noise.wrong.lock().unwrap_or_else(|e| e.into_inner()));
    for (errors, first) in [
        (alone.errors, alone.first_error),
        (wrong.errors, wrong.first_error),
    ] {
        report.errors += errors;
        if report.first_error.is_none() {
            report.first_error = first;
        }
    }
    Ok(report)
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Loads `keys` keys of 100 bytes under `prefix`k/ with four clients, 128 keys per
/// transaction; returns how many it wrote.
async fn load(a: &Channel, prefix: &str, keys: usize) -> Result<usize> {
    let mut loaders = Vec::new();
    for loader in 0..4usize {
        let mut kv = kv_client(a);
        let prefix = format!("{prefix}k/");
        loaders.push(tokio::spawn(async move {
            let mut next = loader * 128;
            while next < keys {
                let success = (next..(next + 128).min(keys))
                    .map(|i| RequestOp {
                        request: Some(Request::RequestPut(PutRequest {
                            key: Bytes::from(format!("{prefix}{i:07}")),
                            value: Bytes::from(vec![b'a'; 100]),
                            ..Default::default()
                        })),
                    })
                    .collect();
                kv.txn(TxnRequest {
                    success,
                    ..Default::default()
                })
                .await
                .map_err(|e| anyhow::anyhow!("loading A's keys: {}", e.message()))?;
                next += 4 * 128;
            }
            anyhow::Ok(())
        }));
    }
    for loader in loaders {
        loader.await.context("loader")??;
    }
    Ok(keys)
}

/// Starts every part of A's load; returns their tasks once the watches are open.
async fn start_noise(
    n: &NoisyOpts,
    access: &Access,
    a: &Channel,
    prefix: &str,
    noise: &Arc<Noise>,
) -> Result<Vec<JoinHandle<()>>> {
    let mut tasks = Vec::new();
    // Thousands of watches over the keys of a small writer, read as they come.
    let watched = format!("{prefix}w/");
    let mut remaining = n.a_watches;
    while remaining > 0 {
        let batch = remaining.min(WATCHES_PER_STREAM);
        remaining -= batch;
        let stream = open_watches(a, &watched, batch).await?;
        let created = stream.created;
        noise
            .watches_open
            .fetch_add(created as u64, Ordering::Relaxed);
        if created < batch {
            noise.refused(
                "watch",
                format!("{} of {batch} watches of a stream refused", batch - created),
            );
        }
        tasks.push(tokio::spawn(drain_watches(stream.events, noise.clone())));
    }
    if n.a_watches > 0 {
        tasks.push(tokio::spawn(writer(
            kv_client(a),
            watched,
            64,
            noise.clone(),
            Counter::SmallPuts,
        )));
    }
    // Watchers that never read, each on its own connection, under 1 MiB values.
    let big = format!("{prefix}big/");
    for _ in 0..n.a_slow_watchers {
        let channel = access.channel(0).await?;
        let stream = open_watches(&channel, &big, 1).await?;
        if stream.created == 1 {
            noise.slow_watchers_open.fetch_add(1, Ordering::Relaxed);
        }
        // Holds the stream (and its connection) without reading until stopped.
        let noise = noise.clone();
        tasks.push(tokio::spawn(async move {
            let _held = (stream.events, channel);
            while !noise.stopped() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    if n.a_slow_watchers > 0 {
        tasks.push(tokio::spawn(writer(
            kv_client(a),
            big,
            n.a_value_size,
            noise.clone(),
            Counter::BigPuts,
        )));
    }
    // A keep-alive flood over every lease A may hold.
    let leases = grant_leases(a, n.a_leases, noise).await;
    if !leases.is_empty() {
        let per_stream = leases.len().div_ceil(KEEPALIVE_STREAMS);
        for share in leases.chunks(per_stream) {
            tasks.push(tokio::spawn(keepalive_flood(
                a.clone(),
                share.to_vec(),
                noise.clone(),
            )));
        }
    }
    // Transactions comparing and reading every key A loaded.
    for client in 0..n.a_huge_txn_clients {
        tasks.push(tokio::spawn(huge_txns(
            kv_client(a),
            prefix.to_string(),
            client,
            n.a_keys,
            noise.clone(),
        )));
    }
    Ok(tasks)
}

/// A Watch stream and how many of its watches were created.
struct OpenWatches {
    events: Streaming<WatchResponse>,
    created: usize,
}

/// Opens `count` watches over the keys under `prefix` on one new Watch stream.
async fn open_watches(channel: &Channel, prefix: &str, count: usize) -> Result<OpenWatches> {
    let creates: Vec<WatchRequest> = (0..count)
        .map(|_| WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: Bytes::copy_from_slice(prefix.as_bytes()),
                range_end: prefix_end(prefix.as_bytes()),
                ..Default::default()
            })),
        })
        .collect();
    let requests = futures::stream::iter(creates).chain(futures::stream::pending());
    let mut client = WatchClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE);
    let mut events = tokio::time::timeout(SETUP_TIMEOUT, client.watch(requests))
        .await
        .context("no answer to A's watch stream")?
        .map_err(|e| anyhow::anyhow!("A's watch stream: {}", e.message()))?
        .into_inner();
    let (mut created, mut answered) = (0, 0);
    while answered < count {
        let response = tokio::time::timeout(SETUP_TIMEOUT, events.message())
            .await
            .context("A's watches not created in time")?
            .map_err(|e| anyhow::anyhow!("A's watch stream: {}", e.message()))?
            .context("A's watch stream ended")?;
        if response.created {
            answered += 1;
            if !response.canceled {
                created += 1;
            }
        }
    }
    Ok(OpenWatches { events, created })
}

/// Reads A's watch stream, counting events, until it ends or A stops.
async fn drain_watches(mut events: Streaming<WatchResponse>, noise: Arc<Noise>) {
    while !noise.stopped() {
        match events.message().await {
            Ok(Some(response)) => {
                noise
                    .watch_events
                    .fetch_add(response.events.len() as u64, Ordering::Relaxed);
            }
            Ok(None) => return,
            Err(e) => {
                noise.refused("watch stream", e.message());
                return;
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Counter {
    SmallPuts,
    BigPuts,
}

/// Puts values of `size` bytes to 16 keys under `prefix` in a loop.
async fn writer(
    mut kv: kine_proto::etcdserverpb::kv_client::KvClient<Channel>,
    prefix: String,
    size: usize,
    noise: Arc<Noise>,
    counter: Counter,
) {
    let value = Bytes::from(vec![b'n'; size]);
    let mut i = 0u64;
    while !noise.stopped() {
        let put = PutRequest {
            key: Bytes::from(format!("{prefix}{:02}", i % 16)),
            value: value.clone(),
            ..Default::default()
        };
        i += 1;
        match kv.put(put).await {
            Ok(_) => {
                let c = match counter {
                    Counter::SmallPuts => &noise.small_puts,
                    Counter::BigPuts => &noise.big_puts,
                };
                c.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                noise.refused("put", e.message());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Grants a lease, puts `key` attached to it and revokes it (B's share of the lease API).
async fn lease_and_put(channel: &Channel, key: &str) -> Result<()> {
    let mut lease = LeaseClient::new(channel.clone());
    let id = lease
        .lease_grant(LeaseGrantRequest { ttl: 60, id: 0 })
        .await
        .map_err(|e| anyhow::anyhow!("grant: {}", e.message()))?
        .into_inner()
        .id;
    kv_client(channel)
        .put(PutRequest {
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Bytes::from_static(b"b"),
            lease: id,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("put with the lease: {}", e.message()))?;
    lease
        .lease_revoke(kine_proto::etcdserverpb::LeaseRevokeRequest { id })
        .await
        .map_err(|e| anyhow::anyhow!("revoke: {}", e.message()))?;
    Ok(())
}

/// Grants `count` leases of an hour, 16 at a time (refusals, A's lease limit, are counted).
/// The TTL outlasts any run, so a lease A holds is never legitimately gone.
async fn grant_leases(a: &Channel, count: usize, noise: &Noise) -> Vec<i64> {
    let grants = futures::stream::iter(0..count)
        .map(|_| {
            let mut lease = LeaseClient::new(a.clone());
            async move {
                tokio::time::timeout(
                    SETUP_TIMEOUT,
                    lease.lease_grant(LeaseGrantRequest { ttl: 3600, id: 0 }),
                )
                .await
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let mut ids = Vec::with_capacity(count);
    for grant in grants {
        match grant {
            Ok(Ok(granted)) => ids.push(granted.into_inner().id),
            Ok(Err(e)) => noise.refused("lease grant", e.message()),
            Err(_) => noise.refused("lease grant", "no answer"),
        }
    }
    noise
        .leases_granted
        .fetch_add(ids.len() as u64, Ordering::Relaxed);
    ids
}

/// Sends keep-alives of `leases` round and round on one stream as fast as the server takes
/// them, counting the answers.
async fn keepalive_flood(a: Channel, leases: Vec<i64>, noise: Arc<Noise>) {
    let requests = {
        let noise = noise.clone();
        futures::stream::iter(leases.into_iter().cycle())
            .take_while(move |_| std::future::ready(!noise.stopped()))
            .map(|id| LeaseKeepAliveRequest { id })
    };
    let mut client = LeaseClient::new(a);
    let mut answers = match client.lease_keep_alive(requests).await {
        Ok(answers) => answers.into_inner(),
        Err(e) => {
            noise.refused("keep-alive", e.message());
            return;
        }
    };
    while !noise.stopped() {
        match answers.message().await {
            Ok(Some(answer)) if answer.ttl > 0 => {
                noise.keepalives.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Some(answer)) => {
                noise.wrong(
                    "keep-alive",
                    format!("lease {:x} it holds not found", answer.id),
                );
            }
            Ok(None) => return,
            Err(e) => {
                noise.refused("keep-alive", e.message());
                return;
            }
        }
    }
}

/// Transactions that compare the version of every key under `prefix`k/, read all of them
/// (sorted by modification, ten returned) and write one key; the count must be `keys`.
async fn huge_txns(
    mut kv: kine_proto::etcdserverpb::kv_client::KvClient<Channel>,
    prefix: String,
    client: usize,
    keys: usize,
    noise: Arc<Noise>,
) {
    let range = Bytes::from(format!("{prefix}k/"));
    let range_end = prefix_end(&range);
    while !noise.stopped() {
        let txn = TxnRequest {
            compare: vec![Compare {
                result: CompareResult::Greater as i32,
                target: CompareTarget::Version as i32,
                key: range.clone(),
                range_end: range_end.clone(),
                target_union: Some(TargetUnion::Version(0)),
            }],
            success: vec![
                RequestOp {
                    request: Some(Request::RequestRange(RangeRequest {
                        key: range.clone(),
                        range_end: range_end.clone(),
                        limit: 10,
                        sort_order: SortOrder::Descend as i32,
                        sort_target: SortTarget::Mod as i32,
                        ..Default::default()
                    })),
                },
                RequestOp {
                    request: Some(Request::RequestPut(PutRequest {
                        key: Bytes::from(format!("{prefix}t/{client}")),
                        value: Bytes::from_static(b"t"),
                        ..Default::default()
                    })),
                },
            ],
            failure: vec![],
        };
        match kv.txn(txn).await {
            Ok(answer) => {
                let answer = answer.into_inner();
                let count = match answer.responses.first().and_then(|r| r.response.as_ref()) {
                    Some(Response::ResponseRange(range)) => range.count,
                    _ => -1,
                };
                if answer.succeeded && count == keys as i64 {
                    noise.huge_txns.fetch_add(1, Ordering::Relaxed);
                } else {
                    noise.wrong(
                        "huge txn",
                        format!(
                            "wrong answer: succeeded {}, count {count} of {keys}",
                            answer.succeeded
                        ),
                    );
                }
            }
            Err(e) => {
                noise.refused("huge txn", e.message());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}
