//! The workloads. Each one checks the answers it gets, and counts a wrong one as an error.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures::StreamExt;
use kine_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use kine_proto::etcdserverpb::kv_client::KvClient;
use kine_proto::etcdserverpb::request_op::Request;
use kine_proto::etcdserverpb::response_op::Response;
use kine_proto::etcdserverpb::watch_client::WatchClient;
use kine_proto::etcdserverpb::watch_request::RequestUnion;
use kine_proto::etcdserverpb::{
    Compare, PutRequest, RangeRequest, RangeResponse, RequestOp, TxnRequest, TxnResponse,
    WatchCreateRequest, WatchRequest,
};
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::sync::Mutex;
use tonic::transport::Channel;

use crate::report::{Report, Stats};
use crate::{Opts, connect};

/// Largest response a client accepts (lists of 500 keys of 1 KiB are ~0.5 MiB).
pub(crate) const MAX_MESSAGE: usize = 64 * 1024 * 1024;

pub(crate) fn kv_client(channel: &Channel) -> KvClient<Channel> {
    KvClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE)
}

/// When a run stops: at a deadline, or after a number of operations.
struct Budget {
    deadline: Instant,
    remaining: Option<AtomicU64>,
}

impl Budget {
    fn new(opts: &Opts) -> Arc<Budget> {
        Arc::new(Budget {
            deadline: Instant::now() + opts.duration(),
            remaining: opts.total.map(AtomicU64::new),
        })
    }

    fn for_duration(duration: Duration) -> Arc<Budget> {
        Arc::new(Budget {
            deadline: Instant::now() + duration,
            remaining: None,
        })
    }

    /// Whether one more operation may start.
    fn take(&self) -> bool {
        if Instant::now() >= self.deadline {
            return false;
        }
        match &self.remaining {
            None => true,
            Some(r) => r
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok(),
        }
    }
}

/// `prefix` + client + sequence number, padded with `k` to `size` bytes.
fn make_key(prefix: &str, client: usize, seq: u64, size: usize) -> Bytes {
    let mut key = format!("{prefix}{client:04}/{seq:010}").into_bytes();
    while key.len() < size {
        key.push(b'k');
    }
    Bytes::from(key)
}

/// The end of the range of keys starting with `prefix`.
pub(crate) fn prefix_end(prefix: &[u8]) -> Bytes {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Bytes::from(end);
        }
    }
    Bytes::from_static(b"\0")
}

fn value(size: usize) -> Bytes {
    Bytes::from(vec![b'v'; size])
}

/// Number of keys under `prefix` now (a count-only range).
pub(crate) async fn count_prefix(channel: &Channel, prefix: &str) -> Result<i64> {
    let response = kv_client(channel)
        .range(RangeRequest {
            key: Bytes::copy_from_slice(prefix.as_bytes()),
            range_end: prefix_end(prefix.as_bytes()),
            count_only: true,
            ..Default::default()
        })
        .await
        .context("count of the prefix")?;
    Ok(response.into_inner().count)
}

/// Runs `clients` copies of `client` (given its index and connection) and merges their stats.
async fn run_clients<F, Fut>(opts: &Opts, channels: &[Channel], client: F) -> Result<Stats>
where
    F: Fn(usize, Channel) -> Fut,
    Fut: Future<Output = Stats> + Send + 'static,
{
    let mut tasks = Vec::with_capacity(opts.clients);
    for c in 0..opts.clients.max(1) {
        tasks.push(tokio::spawn(client(
            c,
            channels[c % channels.len()].clone(),
        )));
    }
    let mut stats = Stats::default();
    for task in tasks {
        stats.merge(task.await.context("client task")?);
    }
    Ok(stats)
}

/// Checks that `count` keys exist after `stats.ops` acknowledged creations (and `errors`
/// failed ones, which may or may not have landed).
fn check_count(stats: &mut Stats, count: i64) {
    let count = u64::try_from(count).unwrap_or(0);
    stats.set("keys_counted", json!(count));
    if count < stats.ops {
        stats.error(format!(
            "only {count} keys after {} acknowledged creations",
            stats.ops
        ));
    } else if count > stats.ops + stats.errors {
        stats.error(format!(
            "{count} keys after {} creations ({} failed)",
            stats.ops, stats.errors
        ));
    }
}

/// Puts of unique keys, or with `--key-space N` of keys drawn at random from N (overwrites).
pub async fn put(opts: &Opts) -> Result<Report> {
    let prefix = opts.prefix("put");
    let key_space = opts.key_space.filter(|n| *n > 0);
    let channels = connect(&opts.endpoints, opts.conns).await?;
    let budget = Budget::new(opts);
    let value = value(opts.val_size);
    let start = Instant::now();
    let mut stats = run_clients(opts, &channels, |c, channel| {
        let (budget, value, prefix, key_size) =
            (budget.clone(), value.clone(), prefix.clone(), opts.key_size);
        async move {
            let mut kv = kv_client(&channel);
            let mut stats = Stats::default();
            let mut last = 0;
            let mut seq = 0;
            let mut random = rand::rngs::StdRng::from_rng(&mut rand::rng());
            while budget.take() {
                let key = match key_space {
                    Some(n) => make_key(&prefix, 0, random.random_range(0..n), key_size),
                    None => make_key(&prefix, c, seq, key_size),
                };
                seq += 1;
                let t = Instant::now();
                let request = PutRequest {
                    key,
                    value: value.clone(),
                    ..Default::default()
                };
                match kv.put(request).await {
                    Ok(r) => {
                        let revision = r.into_inner().header.map_or(0, |h| h.revision);
                        if revision <= last {
                            stats.error(format!("put revision {revision} after {last}"));
                        } else {
                            last = revision;
                            stats.record(t.elapsed());
                        }
                    }
                    Err(e) => stats.error(e.message()),
                }
            }
            stats
        }
    })
    .await?;
    let elapsed = start.elapsed();
    let count = count_prefix(&channels[0], &prefix).await?;
    match key_space {
        // Overwrites: every key written exists, and no key outside the space.
        Some(n) => {
            stats.set("keys_counted", json!(count));
            if count <= 0 || count as u64 > n {
                stats.error(format!("{count} keys in a key space of {n}"));
            }
        }
        None => check_count(&mut stats, count),
    }
    Ok(stats.into_report(elapsed))
}

/// kube-apiserver's create of `key`.
fn create_txn(key: Bytes, value: Bytes) -> TxnRequest {
    TxnRequest {
        compare: vec![Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Mod as i32,
            key: key.clone(),
            range_end: Bytes::new(),
            target_union: Some(TargetUnion::ModRevision(0)),
        }],
        success: vec![RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: key.clone(),
                value,
                ..Default::default()
            })),
        }],
        failure: vec![RequestOp {
            request: Some(Request::RequestRange(RangeRequest {
                key,
                ..Default::default()
            })),
        }],
    }
}

/// kube-apiserver's create: Txn(mod_revision(key) = 0, put, else get) on fresh keys.
pub async fn txn_create(opts: &Opts) -> Result<Report> {
    let prefix = opts.prefix("txn-create");
    let channels = connect(&opts.endpoints, opts.conns).await?;
    let start = Instant::now();
    let mut stats = creates(opts, &channels, &prefix, Budget::new(opts)).await?;
    let elapsed = start.elapsed();
    let count = count_prefix(&channels[0], &prefix).await?;
    check_count(&mut stats, count);
    Ok(stats.into_report(elapsed))
}

/// `opts.clients` clients creating fresh keys under `prefix` until `budget` runs out, each
/// answer checked; then the count of the prefix checked against the acknowledged creates.
pub(crate) async fn checked_creates(
    opts: &Opts,
    channels: &[Channel],
    prefix: &str,
    duration: Duration,
) -> Result<(Stats, Duration)> {
    let start = Instant::now();
    let mut stats = creates(opts, channels, prefix, Budget::for_duration(duration)).await?;
    let elapsed = start.elapsed();
    let count = count_prefix(&channels[0], prefix).await?;
    check_count(&mut stats, count);
    Ok((stats, elapsed))
}

/// The clients of the create workload.
async fn creates(
    opts: &Opts,
    channels: &[Channel],
    prefix: &str,
    budget: Arc<Budget>,
) -> Result<Stats> {
    let value = value(opts.val_size);
    run_clients(opts, channels, |c, channel| {
        let (budget, value, prefix, key_size) = (
            budget.clone(),
            value.clone(),
            prefix.to_string(),
            opts.key_size,
        );
        async move {
            let mut kv = kv_client(&channel);
            let mut stats = Stats::default();
            let mut seq = 0;
            while budget.take() {
                let key = make_key(&prefix, c, seq, key_size);
                seq += 1;
                let t = Instant::now();
                match kv.txn(create_txn(key, value.clone())).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        let put = matches!(
                            r.responses.first().and_then(|op| op.response.as_ref()),
                            Some(Response::ResponsePut(_))
                        );
                        if r.succeeded && put && r.header.is_some_and(|h| h.revision > 0) {
                            stats.record(t.elapsed());
                        } else {
                            stats.error("create of a fresh key did not succeed");
                        }
                    }
                    Err(e) => stats.error(e.message()),
                }
            }
            stats
        }
    })
    .await
}

/// The one key of a single-key range response, with its mod revision.
fn single_mod_revision(kvs: &[kine_proto::mvccpb::KeyValue]) -> Option<i64> {
    match kvs {
        [kv] => Some(kv.mod_revision),
        _ => None,
    }
}

/// One update of `key` as kube-apiserver does it (get, then compare-and-swap, retried with the
/// fresh revision on conflict). Returns the number of conflicts it met.
async fn update_once(kv: &mut KvClient<Channel>, key: &Bytes, value: &Bytes) -> Result<u64> {
    let got = kv
        .range(RangeRequest {
            key: key.clone(),
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("get: {}", e.message()))?
        .into_inner();
    let mut seen = single_mod_revision(&got.kvs).context("key to update is missing")?;
    // Bounded: a client that loses this often is reported, not retried for ever.
    for conflicts in 0..1000u64 {
        let request = TxnRequest {
            compare: vec![Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Mod as i32,
                key: key.clone(),
                range_end: Bytes::new(),
                target_union: Some(TargetUnion::ModRevision(seen)),
            }],
            success: vec![RequestOp {
                request: Some(Request::RequestPut(PutRequest {
                    key: key.clone(),
                    value: value.clone(),
                    ..Default::default()
                })),
            }],
            failure: vec![RequestOp {
                request: Some(Request::RequestRange(RangeRequest {
                    key: key.clone(),
                    ..Default::default()
                })),
            }],
        };
        let r: TxnResponse = kv
            .txn(request)
            .await
            .map_err(|e| anyhow::anyhow!("txn: {}", e.message()))?
            .into_inner();
        if r.succeeded {
            return Ok(conflicts);
        }
        let Some(Response::ResponseRange(range)) =
            r.responses.first().and_then(|op| op.response.clone())
        else {
            bail!("failed update without its get");
        };
        let fresh = single_mod_revision(&range.kvs).context("key vanished")?;
        if fresh <= seen {
            bail!("conflict, yet the key's mod revision {fresh} is not past {seen}");
        }
        seen = fresh;
    }
    bail!("1000 conflicts in a row")
}

/// Gets every key under `prefix` with its version (for small key sets).
async fn versions(channel: &Channel, prefix: &str) -> Result<Vec<i64>> {
    let response = kv_client(channel)
        .range(RangeRequest {
            key: Bytes::copy_from_slice(prefix.as_bytes()),
            range_end: prefix_end(prefix.as_bytes()),
            keys_only: true,
            ..Default::default()
        })
        .await
        .context("range of the prefix")?;
    Ok(response
        .into_inner()
        .kvs
        .iter()
        .map(|kv| kv.version)
        .collect())
}

/// kube-apiserver's update over `--keys` keys.
pub async fn txn_update(opts: &Opts) -> Result<Report> {
    let prefix = opts.prefix("txn-update");
    let channels = connect(&opts.endpoints, opts.conns).await?;
    let value = value(opts.val_size);
    let keys: Arc<Vec<Bytes>> = Arc::new(
        (0..opts.keys.max(1))
            .map(|i| make_key(&prefix, 0, i as u64, opts.key_size))
            .collect(),
    );
    let mut kv = kv_client(&channels[0]);
    for key in keys.iter() {
        kv.put(PutRequest {
            key: key.clone(),
            value: value.clone(),
            ..Default::default()
        })
        .await
        .context("creating the keys to update")?;
    }
    let budget = Budget::new(opts);
    let start = Instant::now();
    let mut stats = run_clients(opts, &channels, |c, channel| {
        let (budget, value, keys) = (budget.clone(), value.clone(), keys.clone());
        async move {
            let mut kv = kv_client(&channel);
            let mut stats = Stats::default();
            // xorshift, seeded per client: which key each update picks.
            let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ ((c as u64 + 1) << 17);
            while budget.take() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let key = &keys[(state % keys.len() as u64) as usize];
                let t = Instant::now();
                match update_once(&mut kv, key, &value).await {
                    Ok(conflicts) => {
                        stats.record(t.elapsed());
                        stats.count("conflicts", conflicts);
                    }
                    Err(e) => stats.error(e),
                }
            }
            stats
        }
    })
    .await?;
    let elapsed = start.elapsed();
    // Every successful update added one version to its key.
    let versions = versions(&channels[0], &prefix).await?;
    let updates: i64 = versions.iter().map(|v| v - 1).sum();
    let updates = u64::try_from(updates).unwrap_or(0);
    stats.set("updates_counted", json!(updates));
    if versions.len() != keys.len() {
        stats.error(format!("{} of {} keys left", versions.len(), keys.len()));
    } else if updates < stats.ops || updates > stats.ops + stats.errors {
        stats.error(format!(
            "key versions add up to {updates} updates, {} acknowledged ({} failed)",
            stats.ops, stats.errors
        ));
    }
    Ok(stats.into_report(elapsed))
}

/// Loads `--keys` keys of `--val-size` bytes, then lists them paginated `--iterations` times.
pub async fn list(opts: &Opts) -> Result<Report> {
    let prefix = opts.prefix("list");
    let channels = connect(&opts.endpoints, opts.conns.max(1)).await?;
    let value = value(opts.val_size);
    let n = opts.keys.max(1);
    // Load with 8 loaders, 100 puts per transaction (etcd allows 128).
    let load_start = Instant::now();
    let load_deadline = load_start + Duration::from_secs_f64(opts.load_timeout.max(0.0));
    let next = Arc::new(AtomicU64::new(0));
    let loaded = Arc::new(AtomicU64::new(0));
    let mut loaders = Vec::new();
    for l in 0..8 {
        let (next, loaded, value, prefix) =
            (next.clone(), loaded.clone(), value.clone(), prefix.clone());
        let mut kv = kv_client(&channels[l % channels.len()]);
        let key_size = opts.key_size;
        loaders.push(tokio::spawn(async move {
            loop {
                if Instant::now() >= load_deadline {
                    return Ok::<(), anyhow::Error>(());
                }
                let first = next.fetch_add(100, Ordering::AcqRel);
                if first >= n as u64 {
                    return Ok(());
                }
                let last = (first + 100).min(n as u64);
                let success = (first..last)
                    .map(|i| RequestOp {
                        request: Some(Request::RequestPut(PutRequest {
                            key: make_key(&prefix, 0, i, key_size),
                            value: value.clone(),
                            ..Default::default()
                        })),
                    })
                    .collect();
                kv.txn(TxnRequest {
                    compare: Vec::new(),
                    success,
                    failure: Vec::new(),
                })
                .await
                .map_err(|e| anyhow::anyhow!("loading keys: {}", e.message()))?;
                loaded.fetch_add(last - first, Ordering::AcqRel);
            }
        }));
    }
    for loader in loaders {
        loader.await.context("loader task")??;
    }
    let load = load_start.elapsed();
    let loaded = loaded.load(Ordering::Acquire);

    let mut stats = Stats::default();
    stats.set("loaded", json!(loaded));
    if loaded < n as u64 {
        stats.error(format!(
            "loaded only {loaded} of {n} keys in {:.0} s (--load-timeout)",
            load.as_secs_f64()
        ));
        stats.set("load_s", json!(load.as_secs_f64().round()));
        return Ok(stats.into_report(load));
    }
    stats.set("keys", json!(n));
    stats.set("page", json!(opts.page));
    stats.set("stream", json!(opts.stream));
    stats.set(
        "load_s",
        json!((load.as_secs_f64() * 1000.0).round() / 1000.0),
    );
    let mut kv = kv_client(&channels[0]);
    let end = prefix_end(prefix.as_bytes());
    let start = Instant::now();
    let deadline = start + opts.duration();
    for i in 0..opts.iterations.max(1) {
        if i > 0 && Instant::now() >= deadline {
            break;
        }
        let t = Instant::now();
        match list_once(&mut kv, &prefix, &end, opts.page, opts.stream).await {
            Ok(count) if count == n as u64 => stats.record(t.elapsed()),
            Ok(count) => stats.error(format!("listed {count} keys of {n}")),
            Err(e) => stats.error(e),
        }
    }
    Ok(stats.into_report(start.elapsed()))
}

/// One paginated list at a fixed revision, as kube-apiserver's reflector does it (each page
/// with RangeStream when `stream`, as kube-apiserver 1.37 does). Returns the number of keys,
/// after checking they come in order, each once.
async fn list_once(
    kv: &mut KvClient<Channel>,
    prefix: &str,
    end: &Bytes,
    page: i64,
    stream: bool,
) -> Result<u64> {
    let mut key = Bytes::copy_from_slice(prefix.as_bytes());
    let mut revision = 0;
    let mut count = 0u64;
    let mut last: Option<Bytes> = None;
    let mut expected = None;
    // Bounded by the number of keys the first page announces.
    loop {
        let request = RangeRequest {
            key: key.clone(),
            range_end: end.clone(),
            limit: page,
            revision,
            ..Default::default()
        };
        let r = if stream {
            range_streamed(kv, request).await?
        } else {
            kv.range(request)
                .await
                .map_err(|e| anyhow::anyhow!("list: {}", e.message()))?
                .into_inner()
        };
        if revision == 0 {
            revision = r.header.map_or(0, |h| h.revision);
            expected = Some(u64::try_from(r.count).unwrap_or(0));
        }
        for kv in &r.kvs {
            if last.as_ref().is_some_and(|l| kv.key <= *l) {
                bail!("keys out of order or repeated");
            }
            last = Some(kv.key.clone());
            count += 1;
        }
        if !r.more || r.kvs.is_empty() {
            break;
        }
        if count > expected.unwrap_or(0) {
            bail!("more keys than the first page's count");
        }
        let mut next = last.clone().unwrap_or_default().to_vec();
        next.push(0);
        key = Bytes::from(next);
    }
    if Some(count) != expected {
        bail!("listed {count} keys, the count said {expected:?}");
    }
    Ok(count)
}

/// A RangeStream's chunks merged into the RangeResponse they stand for.
async fn range_streamed(
    kv: &mut KvClient<Channel>,
    request: RangeRequest,
) -> Result<RangeResponse> {
    let mut chunks = kv
        .range_stream(request)
        .await
        .map_err(|e| anyhow::anyhow!("list: {}", e.message()))?
        .into_inner();
    let mut merged = RangeResponse::default();
    while let Some(chunk) = chunks
        .message()
        .await
        .map_err(|e| anyhow::anyhow!("list: {}", e.message()))?
    {
        let chunk = chunk.range_response.unwrap_or_default();
        merged.kvs.extend(chunk.kvs);
        if chunk.header.is_some() {
            merged.header = chunk.header;
            merged.more = chunk.more;
            merged.count = chunk.count;
        }
    }
    if merged.header.is_none() {
        bail!("RangeStream ended without its last chunk");
    }
    Ok(merged)
}

/// Puts through the endpoints at `--rate`, watches through `--watch-endpoint`.
pub async fn watch_latency(opts: &Opts) -> Result<Report> {
    let prefix = opts.prefix("watch");
    let channels = connect(&opts.endpoints, opts.conns).await?;
    let watch_endpoint = opts
        .watch_endpoint
        .clone()
        .unwrap_or_else(|| opts.endpoints[0].clone());
    let watch_channel = connect(std::slice::from_ref(&watch_endpoint), 1).await?;
    let mut watch =
        WatchClient::new(watch_channel[0].clone()).max_decoding_message_size(MAX_MESSAGE);
    let create = WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: Bytes::copy_from_slice(prefix.as_bytes()),
            range_end: prefix_end(prefix.as_bytes()),
            ..Default::default()
        })),
    };
    let requests = futures::stream::iter([create]).chain(futures::stream::pending());
    let mut events = watch.watch(requests).await.context("watch")?.into_inner();
    let created = tokio::time::timeout(Duration::from_secs(10), events.message())
        .await
        .context("no answer to the watch")??
        .context("watch stream ended")?;
    if !created.created {
        bail!("watch not created");
    }

    // The watcher: arrival time of each revision, and how many came twice or out of order.
    let seen: Arc<Mutex<HashMap<i64, Instant>>> = Arc::default();
    let max_seen = Arc::new(AtomicI64::new(0));
    let duplicates = Arc::new(AtomicU64::new(0));
    let out_of_order = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (seen, max_seen, duplicates, out_of_order) = (
            seen.clone(),
            max_seen.clone(),
            duplicates.clone(),
            out_of_order.clone(),
        );
        tokio::spawn(async move {
            while let Ok(Some(response)) = events.message().await {
                let now = Instant::now();
                let mut seen = seen.lock().await;
                for event in &response.events {
                    let revision = event.kv.as_ref().map_or(0, |kv| kv.mod_revision);
                    if seen.insert(revision, now).is_some() {
                        duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                    if revision < max_seen.load(Ordering::Acquire) {
                        out_of_order.fetch_add(1, Ordering::Relaxed);
                    }
                    max_seen.fetch_max(revision, Ordering::AcqRel);
                }
            }
        })
    };

    // The writers: write n of the run is due at start + n / rate, spread over the clients.
    let budget = Budget::new(opts);
    let rate = opts.rate.max(1) as f64;
    let clients = opts.clients.max(1);
    let value = value(opts.val_size);
    let start = Instant::now();
    let mut writers = Vec::new();
    for c in 0..clients {
        let (budget, value, prefix) = (budget.clone(), value.clone(), prefix.clone());
        let mut kv = kv_client(&channels[c % channels.len()]);
        let key_size = opts.key_size;
        writers.push(tokio::spawn(async move {
            let mut acks: Vec<(i64, Instant)> = Vec::new();
            let mut errors = Stats::default();
            let mut seq = 0u64;
            while budget.take() {
                let due = start
                    + Duration::from_secs_f64((seq * clients as u64 + c as u64) as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
                let key = make_key(&prefix, c, seq, key_size);
                seq += 1;
                match kv
                    .put(PutRequest {
                        key,
                        value: value.clone(),
                        ..Default::default()
                    })
                    .await
                {
                    Ok(r) => {
                        let revision = r.into_inner().header.map_or(0, |h| h.revision);
                        acks.push((revision, Instant::now()));
                    }
                    Err(e) => errors.error(e.message()),
                }
            }
            (acks, errors)
        }));
    }
    let mut acks = Vec::new();
    let mut stats = Stats::default();
    for writer in writers {
        let (a, e) = writer.await.context("writer task")?;
        acks.extend(a);
        stats.merge(e);
    }
    let write_elapsed = start.elapsed();
    // Give the watch up to 5 s to deliver the last writes.
    let last = acks.iter().map(|(r, _)| *r).max().unwrap_or(0);
    let grace = Instant::now() + Duration::from_secs(5);
    while max_seen.load(Ordering::Acquire) < last && Instant::now() < grace {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    watcher.abort();
    let seen = seen.lock().await;
    let mut missing = 0u64;
    for (revision, acked) in &acks {
        match seen.get(revision) {
            Some(at) => stats.record(at.saturating_duration_since(*acked)),
            None => missing += 1,
        }
    }
    let unexpected = seen.len().saturating_sub(acks.len() - missing as usize);
    let duplicates = duplicates.load(Ordering::Relaxed);
    let out_of_order = out_of_order.load(Ordering::Relaxed);
    stats.set("writes", json!(acks.len()));
    stats.set(
        "write_rate",
        json!((acks.len() as f64 / write_elapsed.as_secs_f64()).round()),
    );
    stats.set("missing", json!(missing));
    stats.set("duplicates", json!(duplicates));
    stats.set("out_of_order", json!(out_of_order));
    stats.set("unexpected", json!(unexpected));
    for (what, n) in [
        ("missing", missing),
        ("duplicate", duplicates),
        ("out-of-order", out_of_order),
        ("unexpected", unexpected as u64),
    ] {
        if n > 0 {
            stats.error(format!("{n} {what} watch events"));
        }
    }
    Ok(stats.into_report(write_elapsed))
}
