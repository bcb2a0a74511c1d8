//! One tenant served from the shared etcd: requests confined to its prefix, writes guarded by
//! its freeze record, leases checked against its ownership records.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kine_proto::etcdserverpb::request_op::Request;
use kine_proto::etcdserverpb::response_op::Response;
use kine_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, Compare, DeleteRangeRequest, DeleteRangeResponse,
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse, PutRequest, PutResponse, RangeRequest,
    RangeResponse, RequestOp, ResponseHeader, TxnRequest, TxnResponse,
};
use prost::Message;
use tokio::sync::mpsc;
use tonic::Streaming;

use super::prefix::KeyPrefix;
use super::{
    Control, NO_SUCH_LEASE, Upstream, absent, compact_shared, delete_op, get_op, lease_id_of,
    mod_revision_is, parse_number, present, put_op, quota, range_at, rewrite, upstream_error,
    usage,
};
use crate::error::{KineError, Result};
use crate::keyspace::MAX_LEASE_TTL;
use crate::model::now_ms;
use crate::range;
use crate::served::{ServedTenant, StatusFacts, WatchRequests, WatchResponses};
use crate::storage::Quota;
use crate::txn::{self, RequestLimits};

/// How long a write waits for the tenant's usage record to be free (counted, and not
/// changed by a concurrent write) before giving up with `Unavailable`.
const QUOTA_WAIT: Duration = Duration::from_secs(10);
/// A "counting" usage record older than this was left by a process that died counting.
const COUNTING_TAKEOVER_MS: i64 = 10_000;
/// A revoke deletes the lease's keys in one guarded transaction when it has fewer keys than
/// this (etcd's default `--max-txn-ops` is 128).
const REVOKE_IN_ONE_TXN: usize = 100;
/// The shortest time between two renewals of a frozen tenant's lease.
const MIN_FROZEN_RENEWAL: Duration = Duration::from_millis(500);

/// How one write attempt ended.
enum Attempt {
    Done(TxnResponse),
    /// The tenant has a quota: write with usage.
    QuotaSet,
    /// The tenant has no quota (any more): write plainly.
    NoQuota,
    /// The usage record changed or is being counted: try again.
    Again,
}

/// A transaction of one operation.
fn single(request: Request) -> TxnRequest {
    TxnRequest {
        compare: vec![],
        success: vec![RequestOp {
            request: Some(request),
        }],
        failure: vec![],
    }
}

/// One keep-alive stream to etcd, shared by the tenant's keep-alives (one at a time).
type KeepAliveStream = (
    mpsc::Sender<LeaseKeepAliveRequest>,
    Streaming<LeaseKeepAliveResponse>,
);

/// A tenant of the shared etcd.
pub struct ProxiedTenant {
    name: String,
    prefix: KeyPrefix,
    control: Control,
    upstream: Upstream,
    limits: RequestLimits,
    /// Leases this process saw the tenant own (a cache of the ownership records).
    owned: std::sync::Mutex<HashSet<i64>>,
    keep_alive: tokio::sync::Mutex<Option<KeepAliveStream>>,
    /// The tenant's keep-alive rate in this process.
    keep_alive_rate: Option<crate::rate::RateLimit>,
    /// While the tenant is frozen: its leases, and when each is to be renewed next.
    frozen_renewals: tokio::sync::Mutex<HashMap<i64, Instant>>,
    /// Whether the tenant was last seen with a quota (a hint: etcd's records decide).
    quota_mode: AtomicBool,
    /// Serializes this process's writes of the tenant while it has a quota.
    quota_turn: tokio::sync::Mutex<()>,
    watches: AtomicI64,
    closed: tokio::sync::watch::Sender<bool>,
    /// When the tenant cache last handed it out.
    last_use: crate::tenants::LastUse,
}

impl crate::tenants::Cached for ProxiedTenant {
    fn last_use(&self) -> &crate::tenants::LastUse {
        &self.last_use
    }
}

impl ProxiedTenant {
    pub fn new(
        name: String,
        prefix: KeyPrefix,
        control: Control,
        upstream: Upstream,
        limits: RequestLimits,
    ) -> Self {
        ProxiedTenant {
            name,
            prefix,
            control,
            upstream,
            limits,
            owned: std::sync::Mutex::new(HashSet::new()),
            keep_alive: tokio::sync::Mutex::new(None),
            keep_alive_rate: crate::rate::RateLimit::new(limits.keepalives_per_second),
            frozen_renewals: tokio::sync::Mutex::new(HashMap::new()),
            quota_mode: AtomicBool::new(false),
            quota_turn: tokio::sync::Mutex::new(()),
            watches: AtomicI64::new(0),
            closed: tokio::sync::watch::Sender::new(false),
            last_use: Default::default(),
        }
    }

    pub fn prefix(&self) -> &KeyPrefix {
        &self.prefix
    }

    pub fn limits(&self) -> &RequestLimits {
        &self.limits
    }

    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// What a watcher holding a canceled watch's id watches ([`Control::held_watch`]).
    pub fn held_watch_key(&self) -> Bytes {
        self.control.held_watch(&self.name)
    }

    /// Watchers open on this tenant in this process.
    pub fn watches(&self) -> i64 {
        self.watches.load(Ordering::Acquire)
    }

    pub fn watch_count(&self, delta: i64) {
        self.watches.fetch_add(delta, Ordering::AcqRel);
    }

    /// Ends the tenant's watch streams (it was deleted).
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    pub fn closed(&self) -> tokio::sync::watch::Receiver<bool> {
        self.closed.subscribe()
    }

    fn check_size(&self, request: &impl Message) -> Result<()> {
        if request.encoded_len() > self.limits.max_request_bytes {
            return Err(KineError::RequestTooLarge);
        }
        Ok(())
    }

    /// The tenant's compaction revision; -1 when it never compacted.
    pub async fn compact_revision(&self) -> Result<(i64, ResponseHeader)> {
        let response = self
            .upstream
            .kv
            .clone()
            .range(RangeRequest {
                key: self.control.compacted(&self.name),
                ..Default::default()
            })
            .await
            .map_err(upstream_error)?
            .into_inner();
        let revision = response
            .kvs
            .first()
            .map_or(-1, |kv| parse_number(&kv.value));
        Ok((revision, response.header.unwrap_or_default()))
    }

    /// The compares every write carries: the tenant is not frozen, and every lease in
    /// `leases` is the tenant's.
    fn guard(&self, leases: &[i64]) -> Vec<Compare> {
        let mut compare = vec![absent(self.control.frozen(&self.name))];
        compare.extend(self.owns_all(leases));
        compare
    }

    /// Compares that hold while the tenant owns every lease in `leases`.
    fn owns_all(&self, leases: &[i64]) -> Vec<Compare> {
        let mut seen = HashSet::new();
        leases
            .iter()
            .filter(|&&lease| seen.insert(lease))
            .map(|&lease| present(self.control.lease(&self.name, lease)))
            .collect()
    }

    /// [`Self::write`] of the client's one request `op`: its answer, the header of the
    /// guarding transaction (the revision the client sees), and whether `checked` was sent.
    async fn write_one(
        &self,
        leases: &[i64],
        own: &TxnRequest,
        op: Request,
        checked: Option<Request>,
    ) -> Result<(Option<Response>, Option<ResponseHeader>, bool)> {
        let checked = checked.map(|request| RequestOp {
            request: Some(request),
        });
        let (response, sent_checked) = self
            .write(leases, own, RequestOp { request: Some(op) }, checked)
            .await?;
        let answer = response
            .responses
            .into_iter()
            .next()
            .and_then(|op| op.response);
        Ok((answer, response.header, sent_checked))
    }

    /// Writes `op` (the tenant's request `own`, prefixed) in a transaction that etcd applies
    /// only while the tenant is not frozen and owns the leases `op` attaches keys to; while
    /// the tenant has a quota, also checks it and keeps its usage ([`super::quota`]). The
    /// answer's first response is `op`'s. Without a quota, `op` is guarded by the tenant's
    /// ownership of every lease in `leases`, or, when given, `checked` (a transaction that
    /// checks its leases itself, [`Self::check_put_leases`]) is sent instead (then the
    /// flag answered is true); with a quota, the leases of the path `own` takes on the
    /// snapshot read are guarded.
    async fn write(
        &self,
        leases: &[i64],
        own: &TxnRequest,
        op: RequestOp,
        checked: Option<RequestOp>,
    ) -> Result<(TxnResponse, bool)> {
        let deadline = Instant::now() + QUOTA_WAIT;
        loop {
            if !self.quota_mode.load(Ordering::Acquire) {
                let attempt = match &checked {
                    Some(checked) => self.write_plain(&[], checked.clone()).await?,
                    None => self.write_plain(leases, op.clone()).await?,
                };
                match attempt {
                    Attempt::Done(response) => return Ok((response, checked.is_some())),
                    Attempt::QuotaSet => self.quota_mode.store(true, Ordering::Release),
                    Attempt::NoQuota | Attempt::Again => {}
                }
                continue;
            }
            // One quota write of the tenant at a time in this process: they would only
            // invalidate each other's snapshots.
            let _turn = self.quota_turn.lock().await;
            match self.write_counted(own, op.clone()).await? {
                Attempt::Done(response) => return Ok((response, false)),
                Attempt::NoQuota => self.quota_mode.store(false, Ordering::Release),
                Attempt::QuotaSet | Attempt::Again => {
                    if Instant::now() > deadline {
                        return Err(KineError::Unavailable(
                            "the tenant's usage record stayed busy".into(),
                        ));
                    }
                }
            }
        }
    }

    /// A write of a tenant without a quota: guarded by the quota record's absence too.
    async fn write_plain(&self, leases: &[i64], op: RequestOp) -> Result<Attempt> {
        let mut compare = self.guard(leases);
        compare.push(absent(self.control.quota(&self.name)));
        let response = self
            .upstream
            .kv
            .clone()
            .txn(TxnRequest {
                compare,
                success: vec![op],
                failure: vec![
                    get_op(self.control.frozen(&self.name)),
                    get_op(self.control.quota(&self.name)),
                ],
            })
            .await
            .map_err(upstream_error)?
            .into_inner();
        if response.succeeded {
            return Ok(Attempt::Done(response));
        }
        let found = |i| range_at(&response.responses, i).is_some_and(|r| !r.kvs.is_empty());
        if found(0) {
            return Err(self.frozen_error());
        }
        if found(1) {
            return Ok(Attempt::QuotaSet);
        }
        Err(KineError::LeaseNotFound)
    }

    /// `reads`, then every key of the tenant's `ranges` (values too: compares may compare
    /// them), in one read-only transaction: one snapshot of etcd.
    async fn read_with_ranges(
        &self,
        mut reads: Vec<RequestOp>,
        ranges: &[(Bytes, Bytes)],
    ) -> Result<TxnResponse> {
        for (key, range_end) in ranges {
            let (key, range_end) = self.prefix.range(key, range_end);
            reads.push(RequestOp {
                request: Some(Request::RequestRange(RangeRequest {
                    key,
                    range_end,
                    ..Default::default()
                })),
            });
        }
        Ok(self
            .upstream
            .kv
            .clone()
            .txn(TxnRequest {
                compare: vec![],
                success: reads,
                failure: vec![],
            })
            .await
            .map_err(upstream_error)?
            .into_inner())
    }

    /// A write of a tenant with a quota: read what it touches and the usage, evaluate, check,
    /// and write with the new usage if the usage record did not change meanwhile.
    async fn write_counted(&self, own: &TxnRequest, op: RequestOp) -> Result<Attempt> {
        let mut ranges = Vec::new();
        quota::ranges_read(own, &mut ranges);
        let reads = vec![
            get_op(self.control.quota(&self.name)),
            get_op(self.control.usage(&self.name)),
        ];
        let read = self.read_with_ranges(reads, &ranges).await?;
        let Some(quota_kv) = range_at(&read.responses, 0).and_then(|r| r.kvs.first()) else {
            return Ok(Attempt::NoQuota);
        };
        let limits = quota::decode_quota(&quota_kv.value);
        let Some(usage_kv) = range_at(&read.responses, 1).and_then(|r| r.kvs.first()) else {
            // A quota without usage (never left so by kine-rs): count it.
            self.count_usage(0).await?;
            return Ok(Attempt::Again);
        };
        let seen = usage_kv.mod_revision;
        let usage = match quota::UsageRecord::decode(&usage_kv.value) {
            Some(quota::UsageRecord::Counted(usage)) => usage,
            Some(quota::UsageRecord::Counting { since_ms }) => {
                // Another process is counting; take over if it died doing so.
                if now_ms() - since_ms > COUNTING_TAKEOVER_MS {
                    self.count_usage(seen).await?;
                } else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                return Ok(Attempt::Again);
            }
            None => {
                self.count_usage(seen).await?;
                return Ok(Attempt::Again);
            }
        };
        let mut snapshot = quota::Snapshot::default();
        for index in 2..read.responses.len() {
            if let Some(range) = range_at(&read.responses, index) {
                for kv in &range.kvs {
                    let mut kv = kv.clone();
                    rewrite::strip_kv(&self.prefix, &mut kv);
                    snapshot.insert(kv);
                }
            }
        }
        snapshot.check(limits, usage, own)?;
        // etcd checks the leases of the path it takes only, and the snapshot is exact while
        // the usage record is unchanged: those are the leases to guard.
        let leases = snapshot.path_leases(own);
        let delta = snapshot.apply(own);
        let after = quota::UsageRecord::Counted(quota::Usage {
            keys: usage.keys + delta.keys,
            bytes: usage.bytes + delta.bytes,
        });
        let mut compare = self.guard(&leases);
        compare.push(mod_revision_is(self.control.usage(&self.name), seen));
        let alone = matches!(op.request, Some(Request::RequestPut(_)));
        let response = self
            .upstream
            .kv
            .clone()
            .txn(TxnRequest {
                compare,
                success: vec![
                    op,
                    put_op(self.control.usage(&self.name), after.encode(), 0),
                ],
                failure: vec![
                    get_op(self.control.frozen(&self.name)),
                    get_op(self.control.usage(&self.name)),
                ],
            })
            .await
            .map_err(upstream_error)?
            .into_inner();
        if response.succeeded {
            return Ok(Attempt::Done(response));
        }
        if range_at(&response.responses, 0).is_some_and(|r| !r.kvs.is_empty()) {
            return Err(self.frozen_error());
        }
        let now = range_at(&response.responses, 1).and_then(|r| r.kvs.first());
        if now.map(|kv| kv.mod_revision) != Some(seen) {
            return Ok(Attempt::Again);
        }
        if alone {
            // A put alone: etcd looks for its lease before its key.
            return Err(KineError::LeaseNotFound);
        }
        match self.refusal(own).await? {
            Some(error) => Err(error),
            None => Ok(Attempt::Again),
        }
    }

    /// Why etcd would refuse `own` (the tenant's transaction, without prefix) now for its
    /// puts, as etcd checks them before applying any: along the path the compares choose, in
    /// order, the first put with `ignore_value`/`ignore_lease` of a key that does not exist
    /// (`key not found`) or attaching a key to a lease the tenant does not own (`requested
    /// lease not found`). `None` when nothing is refused any more (the state changed since
    /// the refused write: it may be sent again). One read; only after a lease check failed.
    async fn refusal(&self, own: &TxnRequest) -> Result<Option<KineError>> {
        let mut ranges = Vec::new();
        quota::ranges_read(own, &mut ranges);
        let mut leases = Vec::new();
        rewrite::txn_leases(own, &mut leases);
        leases.sort_unstable();
        leases.dedup();
        let reads: Vec<RequestOp> = leases
            .iter()
            .map(|&lease| get_op(self.control.lease(&self.name, lease)))
            .collect();
        let read = self.read_with_ranges(reads, &ranges).await?;
        let owned: HashSet<i64> = leases
            .iter()
            .enumerate()
            .filter(|(index, _)| {
                range_at(&read.responses, *index).is_some_and(|r| !r.kvs.is_empty())
            })
            .map(|(_, &lease)| lease)
            .collect();
        let mut snapshot = quota::Snapshot::default();
        for index in leases.len()..read.responses.len() {
            if let Some(range) = range_at(&read.responses, index) {
                for kv in &range.kvs {
                    let mut kv = kv.clone();
                    rewrite::strip_kv(&self.prefix, &mut kv);
                    snapshot.insert(kv);
                }
            }
        }
        for op in snapshot.path_ops(own) {
            let Some(Request::RequestPut(put)) = &op.request else {
                continue;
            };
            if (put.ignore_value || put.ignore_lease) && !snapshot.contains(&put.key) {
                return Ok(Some(KineError::KeyNotFound));
            }
            if put.lease != 0 && !put.ignore_lease && !owned.contains(&put.lease) {
                return Ok(Some(KineError::LeaseNotFound));
            }
        }
        Ok(None)
    }

    /// `request` (a transaction of the tenant, prefixed) with each put attaching a key to a
    /// lease, at any depth, made a transaction of its own: the put while the tenant owns the
    /// lease, otherwise the same put naming [`NO_SUCH_LEASE`]. etcd evaluates the compares
    /// of every level before applying anything and then checks the puts of the path they
    /// chose, in order, refusing the whole transaction at the first that names a missing key
    /// with `ignore_value`/`ignore_lease` (`key not found`) or a lease that does not exist
    /// (`requested lease not found`); so a lease the tenant does not own refuses the
    /// transaction exactly when, and in the order, etcd would refuse a lease that does not
    /// exist, and one in a branch not taken, at any level, stops nothing. `None` when the
    /// added levels could pass `--max-txn-ops`, which etcd counts across levels: then every
    /// lease is guarded, as for a put.
    fn check_put_leases(&self, mut request: TxnRequest) -> Option<TxnRequest> {
        self.check_ops_leases(&mut request.success);
        self.check_ops_leases(&mut request.failure);
        fits_txn_ops(&request, self.limits.max_txn_ops).then_some(request)
    }

    fn check_ops_leases(&self, ops: &mut [RequestOp]) {
        for op in ops {
            match &mut op.request {
                Some(Request::RequestPut(put)) if put.lease != 0 && !put.ignore_lease => {
                    let refused = PutRequest {
                        lease: NO_SUCH_LEASE,
                        ..put.clone()
                    };
                    let put = put.clone();
                    op.request = Some(Request::RequestTxn(TxnRequest {
                        compare: self.owns_all(&[put.lease]),
                        success: vec![RequestOp {
                            request: Some(Request::RequestPut(put)),
                        }],
                        failure: vec![RequestOp {
                            request: Some(Request::RequestPut(refused)),
                        }],
                    }));
                }
                Some(Request::RequestTxn(txn)) => {
                    self.check_ops_leases(&mut txn.success);
                    self.check_ops_leases(&mut txn.failure);
                }
                _ => {}
            }
        }
    }

    /// Counts the tenant's usage and stores it, if the usage record is still the one at
    /// `seen` (0: absent). Writes wait while the record says "counting", so the count is of
    /// a tenant nobody writes to.
    async fn count_usage(&self, seen: i64) -> Result<()> {
        let (keys, bytes, _) = usage(&self.upstream, &self.prefix).await?;
        let record = quota::UsageRecord::Counted(quota::Usage { keys, bytes });
        self.upstream
            .kv
            .clone()
            .txn(TxnRequest {
                compare: vec![mod_revision_is(self.control.usage(&self.name), seen)],
                success: vec![put_op(self.control.usage(&self.name), record.encode(), 0)],
                failure: vec![],
            })
            .await
            .map_err(upstream_error)?;
        Ok(())
    }

    fn frozen_error(&self) -> KineError {
        KineError::Frozen {
            tenant: self.name.clone(),
        }
    }

    /// The tenant's quota and usage, when it has a quota.
    pub async fn quota_usage(&self) -> Result<Option<(Quota, Option<quota::Usage>)>> {
        let response = self
            .upstream
            .kv
            .clone()
            .txn(TxnRequest {
                compare: vec![],
                success: vec![
                    get_op(self.control.quota(&self.name)),
                    get_op(self.control.usage(&self.name)),
                ],
                failure: vec![],
            })
            .await
            .map_err(upstream_error)?
            .into_inner();
        let Some(quota_kv) = range_at(&response.responses, 0).and_then(|r| r.kvs.first()) else {
            return Ok(None);
        };
        let usage = range_at(&response.responses, 1)
            .and_then(|r| r.kvs.first())
            .and_then(|kv| match quota::UsageRecord::decode(&kv.value) {
                Some(quota::UsageRecord::Counted(usage)) => Some(usage),
                _ => None,
            });
        Ok(Some((quota::decode_quota(&quota_kv.value), usage)))
    }

    /// Whether the tenant owns lease `id`.
    async fn owns(&self, id: i64) -> Result<bool> {
        if self
            .owned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&id)
        {
            return Ok(true);
        }
        let response = self
            .upstream
            .kv
            .clone()
            .range(RangeRequest {
                key: self.control.lease(&self.name, id),
                count_only: true,
                ..Default::default()
            })
            .await
            .map_err(upstream_error)?
            .into_inner();
        let owned = response.count > 0;
        if owned {
            self.remember(id);
        }
        Ok(owned)
    }

    fn remember(&self, id: i64) {
        self.owned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id);
    }

    fn forget(&self, id: i64) {
        self.owned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    async fn is_frozen(&self) -> Result<bool> {
        self.record_exists(self.control.frozen(&self.name)).await
    }

    /// Whether one of kine-rs's records (`/_kine-rs/…`) exists in etcd now.
    async fn record_exists(&self, key: Bytes) -> Result<bool> {
        let response = self
            .upstream
            .kv
            .clone()
            .range(RangeRequest {
                key,
                count_only: true,
                ..Default::default()
            })
            .await
            .map_err(upstream_error)?
            .into_inner();
        Ok(response.count > 0)
    }

    /// A current header, read from etcd.
    async fn current_header(&self) -> Result<ResponseHeader> {
        Ok(self.compact_revision().await?.1)
    }

    /// Lease expiry is a write (it deletes the lease's keys), and a frozen tenant takes none:
    /// while it is frozen, each of its leases is renewed once a third of its TTL has passed
    /// since the last renewal, so none expires. (etcd cannot pause a lease: a renewal gives
    /// it its whole TTL again, so after the freeze a lease has at least the time it had left
    /// when the freeze began, and at most its TTL.) Called by the proxy's keeper while the
    /// freeze record exists, and at once by the freeze itself.
    pub async fn renew_frozen_leases(&self) -> Result<()> {
        let (held, _) = self
            .upstream
            .keys_under(&self.control.leases(&self.name))
            .await?;
        let held: HashSet<i64> = held.iter().filter_map(|hex| lease_id_of(hex)).collect();
        let mut due = self.frozen_renewals.lock().await;
        due.retain(|id, _| held.contains(id));
        for id in held {
            let now = Instant::now();
            if due.get(&id).is_some_and(|at| *at > now) {
                continue;
            }
            let renewed = self.keep_alive_once(id).await?;
            if renewed.ttl > 0 {
                let third = Duration::from_millis(renewed.ttl as u64 * 1000 / 3);
                due.insert(id, now + third.max(MIN_FROZEN_RENEWAL));
            } else {
                due.remove(&id);
            }
        }
        Ok(())
    }

    /// The tenant is not frozen (any more): its leases run on their own.
    pub async fn thawed(&self) {
        self.frozen_renewals.lock().await.clear();
    }

    async fn keep_alive_once(&self, id: i64) -> Result<LeaseKeepAliveResponse> {
        let mut stream = self.keep_alive.lock().await;
        let request = LeaseKeepAliveRequest { id };
        for _attempt in 0..2 {
            let sent = match stream.as_mut() {
                Some((sender, _)) => sender.send(request).await.is_ok(),
                None => {
                    // etcd answers a stream's headers only with its first message: open the
                    // stream with the request already in it.
                    let (sender, receiver) = mpsc::channel(4);
                    let _ = sender.try_send(request);
                    let responses = self
                        .upstream
                        .lease
                        .clone()
                        .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(receiver))
                        .await
                        .map_err(upstream_error)?
                        .into_inner();
                    *stream = Some((sender, responses));
                    true
                }
            };
            if sent
                && let Some((_, responses)) = stream.as_mut()
                && let Ok(Some(response)) = responses.message().await
            {
                return Ok(response);
            }
            // The stream broke (a member went away): open another once.
            *stream = None;
        }
        Err(KineError::Unavailable(
            "the keep-alive stream to etcd broke".into(),
        ))
    }
}

#[async_trait::async_trait]
impl ServedTenant for ProxiedTenant {
    fn name(&self) -> &str {
        &self.name
    }

    async fn range(&self, request: RangeRequest) -> Result<RangeResponse> {
        range::check(&request)?;
        let revision = request.revision;
        let request = rewrite::range_request(&self.prefix, request);
        let mut response = if revision > 0 {
            // Read the tenant's compaction revision in the same read, so the answer is
            // consistent with it.
            let read = TxnRequest {
                compare: vec![],
                success: vec![
                    get_op(self.control.compacted(&self.name)),
                    RequestOp {
                        request: Some(Request::RequestRange(request)),
                    },
                ],
                failure: vec![],
            };
            let response = retry_read(|| {
                let mut kv = self.upstream.kv.clone();
                let read = read.clone();
                async move { kv.txn(read).await }
            })
            .await
            .map_err(upstream_error)?
            .into_inner();
            let compacted = range_at(&response.responses, 0)
                .and_then(|r| r.kvs.first())
                .map_or(-1, |kv| parse_number(&kv.value));
            if revision < compacted {
                return Err(KineError::Compacted);
            }
            let mut range = range_at(&response.responses, 1)
                .cloned()
                .ok_or_else(|| KineError::Storage("etcd answered no range".into()))?;
            range.header = response.header;
            range
        } else {
            retry_read(|| {
                let mut kv = self.upstream.kv.clone();
                let request = request.clone();
                async move { kv.range(request).await }
            })
            .await
            .map_err(upstream_error)?
            .into_inner()
        };
        rewrite::range_response(&self.prefix, &mut response);
        Ok(response)
    }

    async fn put(&self, request: PutRequest) -> Result<PutResponse> {
        txn::check_put(&request)?;
        self.check_size(&request)?;
        let leases = if request.lease != 0 && !request.ignore_lease {
            vec![request.lease]
        } else {
            Vec::new()
        };
        let own = single(Request::RequestPut(request.clone()));
        let request = rewrite::put_request(&self.prefix, request);
        // A put alone: etcd looks for its lease before its key, so the guard's refusal
        // (`requested lease not found`) comes first, as etcd's would.
        match self
            .write_one(&leases, &own, Request::RequestPut(request), None)
            .await?
        {
            (Some(Response::ResponsePut(mut put)), header, _) => {
                put.header = header;
                rewrite::put_response(&self.prefix, &mut put);
                Ok(put)
            }
            _ => Err(KineError::Storage("etcd answered no put".into())),
        }
    }

    async fn delete_range(&self, request: DeleteRangeRequest) -> Result<DeleteRangeResponse> {
        txn::check_delete(&request)?;
        self.check_size(&request)?;
        let own = single(Request::RequestDeleteRange(request.clone()));
        let request = rewrite::delete_request(&self.prefix, request);
        match self
            .write_one(&[], &own, Request::RequestDeleteRange(request), None)
            .await?
        {
            (Some(Response::ResponseDeleteRange(mut delete)), header, _) => {
                delete.header = header;
                rewrite::delete_response(&self.prefix, &mut delete);
                Ok(delete)
            }
            _ => Err(KineError::Storage("etcd answered no delete".into())),
        }
    }

    async fn txn(&self, request: TxnRequest) -> Result<TxnResponse> {
        txn::check_txn(&request, &self.limits)?;
        self.check_size(&request)?;
        if !rewrite::txn_writes(&request) {
            // Reads only: a frozen tenant serves them, so no guard.
            let mut response = self
                .upstream
                .kv
                .clone()
                .txn(rewrite::txn_request(&self.prefix, request))
                .await
                .map_err(upstream_error)?
                .into_inner();
            rewrite::txn_response(&self.prefix, &mut response);
            return Ok(response);
        }
        let mut leases = Vec::new();
        rewrite::txn_leases(&request, &mut leases);
        let own = request.clone();
        let request = rewrite::txn_request(&self.prefix, request);
        // Without a quota, a transaction naming leases checks each where it is named, as
        // etcd checks only the path it takes.
        let checked = if leases.is_empty() {
            None
        } else {
            self.check_put_leases(request.clone())
                .map(Request::RequestTxn)
        };
        // The client's transaction, whole, as the one operation of the guarded one: etcd
        // evaluates the client's compares only when the guard holds.
        match self
            .write_one(&leases, &own, Request::RequestTxn(request.clone()), checked)
            .await?
        {
            (Some(Response::ResponseTxn(mut inner)), header, sent_checked) => {
                if sent_checked {
                    unwrap_put_checks(&request, &mut inner)?;
                }
                inner.header = header;
                rewrite::txn_response(&self.prefix, &mut inner);
                Ok(inner)
            }
            _ => Err(KineError::Storage("etcd answered no transaction".into())),
        }
    }

    async fn compact(&self, request: CompactionRequest) -> Result<CompactionResponse> {
        let key = self.control.compacted(&self.name);
        let current = self
            .upstream
            .kv
            .clone()
            .range(RangeRequest {
                key: key.clone(),
                ..Default::default()
            })
            .await
            .map_err(upstream_error)?
            .into_inner();
        let header = current.header.unwrap_or_default();
        if request.revision > header.revision {
            return Err(KineError::FutureRevision);
        }
        let (compacted, mod_revision) = current
            .kvs
            .first()
            .map_or((-1, 0), |kv| (parse_number(&kv.value), kv.mod_revision));
        if request.revision <= compacted {
            return Err(KineError::Compacted);
        }
        // Only if nobody compacted the tenant since it was read, and not while it is frozen.
        let response = self
            .upstream
            .kv
            .clone()
            .txn(TxnRequest {
                compare: vec![
                    absent(self.control.frozen(&self.name)),
                    Compare {
                        result: kine_proto::etcdserverpb::compare::CompareResult::Equal as i32,
                        target: kine_proto::etcdserverpb::compare::CompareTarget::Mod as i32,
                        key: key.clone(),
                        range_end: Bytes::new(),
                        target_union: Some(
                            kine_proto::etcdserverpb::compare::TargetUnion::ModRevision(
                                mod_revision,
                            ),
                        ),
                    },
                ],
                success: vec![put_op(key, request.revision.to_string(), 0)],
                failure: vec![get_op(self.control.frozen(&self.name))],
            })
            .await
            .map_err(upstream_error)?
            .into_inner();
        if !response.succeeded {
            let frozen = range_at(&response.responses, 0).is_some_and(|r| !r.kvs.is_empty());
            return Err(if frozen {
                KineError::Frozen {
                    tenant: self.name.clone(),
                }
            } else {
                // Another request compacted the tenant meanwhile, at least as far.
                KineError::Compacted
            });
        }
        // Then the shared etcd, as far as every tenant allows; the tenant's compaction stands
        // whether or not that happens now.
        if let Err(error) = compact_shared(&self.upstream, &self.control).await {
            tracing::warn!(%error, "compacting the shared etcd failed; the next compaction retries");
        }
        Ok(CompactionResponse {
            header: response.header,
        })
    }

    async fn lease_grant(&self, request: LeaseGrantRequest) -> Result<LeaseGrantResponse> {
        if request.ttl > MAX_LEASE_TTL {
            return Err(KineError::LeaseTtlTooLarge);
        }
        if request.id == NO_SUCH_LEASE {
            return Err(KineError::LeaseExists);
        }
        if self.is_frozen().await? {
            return Err(KineError::Frozen {
                tenant: self.name.clone(),
            });
        }
        // The tenant's leases are its ownership records: one count-only read. (Two grants
        // racing may both pass at the limit; etcd holds no lock to prevent it cheaply.)
        let max = self.limits.max_leases_per_tenant;
        let leases = self.control.leases(&self.name);
        let held = self
            .upstream
            .kv
            .clone()
            .range(RangeRequest {
                key: leases.prefix().clone(),
                range_end: leases.end().clone(),
                count_only: true,
                ..Default::default()
            })
            .await
            .map_err(upstream_error)?
            .into_inner()
            .count;
        if held >= max {
            return Err(KineError::TooManyLeases { max });
        }
        let granted = self
            .upstream
            .lease
            .clone()
            .lease_grant(request)
            .await
            .map_err(upstream_error)?
            .into_inner();
        if !granted.error.is_empty() {
            return Ok(granted);
        }
        // Record the tenant's ownership, attached to the lease itself, while not frozen.
        let recorded = self
            .upstream
            .kv
            .clone()
            .txn(TxnRequest {
                compare: vec![absent(self.control.frozen(&self.name))],
                success: vec![put_op(
                    self.control.lease(&self.name, granted.id),
                    Bytes::new(),
                    granted.id,
                )],
                failure: vec![],
            })
            .await;
        match recorded {
            Ok(response) if response.get_ref().succeeded => {
                self.remember(granted.id);
                Ok(granted)
            }
            other => {
                let _ = self
                    .upstream
                    .lease
                    .clone()
                    .lease_revoke(LeaseRevokeRequest { id: granted.id })
                    .await;
                match other {
                    Err(status) => Err(upstream_error(status)),
                    Ok(_) => Err(KineError::Frozen {
                        tenant: self.name.clone(),
                    }),
                }
            }
        }
    }

    async fn lease_revoke(&self, id: i64) -> Result<LeaseRevokeResponse> {
        // etcd's revoke cannot carry a compare. So the lease's keys (what a revoke changes)
        // are deleted by a transaction that etcd runs only while the tenant is not frozen
        // and owns the lease, in one revision as a revoke deletes them; the ownership record
        // goes with them, so no later put attaches a key; then etcd revokes the emptied
        // lease, which takes no revision. A key attached by a put racing this, between the
        // read of the keys and the transaction, goes with the revoke, unguarded.
        let attached = self
            .upstream
            .lease
            .clone()
            .lease_time_to_live(LeaseTimeToLiveRequest { id, keys: true })
            .await
            .map_err(upstream_error)?
            .into_inner()
            .keys;
        let mut keys: Vec<Bytes> = attached
            .into_iter()
            .filter(|key| self.prefix.strip(key).is_some())
            .collect();
        // In key order, as etcd's revoke deletes them: watchers see the events in that order.
        keys.sort();
        let record = self.control.lease(&self.name, id);
        if keys.len() < REVOKE_IN_ONE_TXN {
            let mut success: Vec<RequestOp> = keys
                .into_iter()
                .map(|key| delete_op(key, Bytes::new()))
                .collect();
            success.push(delete_op(record.clone(), Bytes::new()));
            let response = self
                .upstream
                .kv
                .clone()
                .txn(TxnRequest {
                    compare: vec![absent(self.control.frozen(&self.name)), present(record)],
                    success,
                    failure: vec![get_op(self.control.frozen(&self.name))],
                })
                .await
                .map_err(upstream_error)?
                .into_inner();
            if !response.succeeded {
                if range_at(&response.responses, 0).is_some_and(|r| !r.kvs.is_empty()) {
                    return Err(KineError::Frozen {
                        tenant: self.name.clone(),
                    });
                }
                self.forget(id);
                return Err(KineError::LeaseNotFound);
            }
        } else {
            // More keys than a transaction holds: checked first, so a freeze that lands
            // between the check and the revoke does not stop it.
            if !self.owns(id).await? {
                return Err(KineError::LeaseNotFound);
            }
            if self.is_frozen().await? {
                return Err(KineError::Frozen {
                    tenant: self.name.clone(),
                });
            }
        }
        self.forget(id);
        let response = self
            .upstream
            .lease
            .clone()
            .lease_revoke(LeaseRevokeRequest { id })
            .await
            .map_err(upstream_error)?
            .into_inner();
        Ok(response)
    }

    /// etcd renews every keep-alive in memory: only the tenant's overall rate applies.
    async fn admit_keep_alive(&self, _id: i64) {
        if let Some(rate) = &self.keep_alive_rate {
            rate.admit().await;
        }
    }

    async fn lease_keep_alive(&self, id: i64) -> Result<LeaseKeepAliveResponse> {
        if !self.owns(id).await? {
            return Ok(LeaseKeepAliveResponse {
                header: Some(self.current_header().await?),
                id,
                ttl: 0,
            });
        }
        let response = self.keep_alive_once(id).await?;
        if response.ttl <= 0 {
            self.forget(id);
        }
        Ok(response)
    }

    async fn lease_time_to_live(
        &self,
        request: LeaseTimeToLiveRequest,
    ) -> Result<LeaseTimeToLiveResponse> {
        if !self.owns(request.id).await? {
            return Ok(LeaseTimeToLiveResponse {
                header: Some(self.current_header().await?),
                id: request.id,
                ttl: -1,
                granted_ttl: 0,
                keys: Vec::new(),
            });
        }
        let mut response = self
            .upstream
            .lease
            .clone()
            .lease_time_to_live(request)
            .await
            .map_err(upstream_error)?
            .into_inner();
        if response.ttl < 0 {
            self.forget(response.id);
        }
        // The ownership record is attached to the lease too: only the tenant's keys show.
        response.keys = response
            .keys
            .iter()
            .filter_map(|key| self.prefix.strip(key))
            .collect();
        Ok(response)
    }

    async fn lease_leases(&self) -> Result<LeaseLeasesResponse> {
        let (ids, header) = self
            .upstream
            .keys_under(&self.control.leases(&self.name))
            .await?;
        Ok(LeaseLeasesResponse {
            leases: ids
                .iter()
                .filter_map(|hex| lease_id_of(hex))
                .map(|id| LeaseStatus { id })
                .collect(),
            header,
        })
    }

    async fn watch(
        self: Arc<Self>,
        requests: WatchRequests,
        responses: WatchResponses,
        _progress_interval: Duration,
    ) {
        super::watch::serve(self, requests, responses).await;
    }

    async fn header(&self) -> Result<ResponseHeader> {
        self.current_header().await
    }

    async fn status(&self, _whole_datastore: bool) -> Result<StatusFacts> {
        // The shared etcd's size would tell of other tenants: always the tenant's own, from
        // the usage record when the tenant has a quota, else counted.
        let mut header = self.current_header().await?;
        let bytes = match self.quota_usage().await? {
            Some((_, Some(usage))) => usage.bytes,
            _ => {
                let (_, bytes, revision) = usage(&self.upstream, &self.prefix).await?;
                header.revision = header.revision.max(revision);
                bytes
            }
        };
        Ok(StatusFacts {
            header,
            db_size: bytes,
            db_size_in_use: bytes,
        })
    }

    async fn moved(&self) -> Result<bool> {
        self.record_exists(self.control.moved(&self.name)).await
    }

    async fn defragment(&self, _whole_datastore: bool) -> Result<()> {
        // A tenant does not get to defragment the shared cluster.
        Ok(())
    }

    async fn set_frozen(&self, frozen: bool) -> Result<()> {
        let key = self.control.frozen(&self.name);
        let op = if frozen {
            put_op(key.clone(), now_ms().to_string(), 0)
        } else {
            delete_op(key.clone(), Bytes::new())
        };
        // Freezing keeps the time of the first freeze; etcd orders this write with every
        // guarded write, so once it returns none of them lands. A tenant a migration moved
        // away stays frozen.
        let compare = if frozen {
            vec![absent(key)]
        } else {
            vec![absent(self.control.moved(&self.name))]
        };
        let response = self
            .upstream
            .kv
            .clone()
            .txn(TxnRequest {
                compare,
                success: vec![op],
                failure: vec![],
            })
            .await
            .map_err(upstream_error)?
            .into_inner();
        if !frozen && !response.succeeded {
            return Err(KineError::TenantMoved {
                tenant: self.name.clone(),
            });
        }
        if frozen {
            // At once, not at the keeper's next tick: a lease about to expire must not.
            self.renew_frozen_leases().await?;
        } else {
            self.thawed().await;
        }
        Ok(())
    }

    async fn set_quota(&self, quota: Quota) -> Result<()> {
        let quota_key = self.control.quota(&self.name);
        let usage_key = self.control.usage(&self.name);
        if quota == Quota::default() {
            // No quota: writes stop keeping the usage.
            self.upstream
                .kv
                .clone()
                .txn(TxnRequest {
                    compare: vec![],
                    success: vec![
                        delete_op(quota_key, Bytes::new()),
                        delete_op(usage_key, Bytes::new()),
                    ],
                    failure: vec![],
                })
                .await
                .map_err(upstream_error)?;
            self.quota_mode.store(false, Ordering::Release);
            return Ok(());
        }
        // A first quota: store it with a "counting" usage (writes wait from then on), count
        // the tenant, store the usage. A quota already there: change its limits only.
        let counting = quota::UsageRecord::Counting { since_ms: now_ms() };
        let response = self
            .upstream
            .kv
            .clone()
            .txn(TxnRequest {
                compare: vec![absent(quota_key.clone())],
                success: vec![
                    put_op(quota_key.clone(), quota::encode_quota(quota), 0),
                    put_op(usage_key, counting.encode(), 0),
                ],
                failure: vec![put_op(quota_key, quota::encode_quota(quota), 0)],
            })
            .await
            .map_err(upstream_error)?
            .into_inner();
        self.quota_mode.store(true, Ordering::Release);
        if response.succeeded {
            let revision = response.header.map_or(0, |h| h.revision);
            self.count_usage(revision).await?;
        }
        Ok(())
    }
}

/// Whether a transaction passes `max_ops` as etcd counts it: each level's largest list
/// (compares, success, failure) against what the levels above leave.
fn fits_txn_ops(request: &TxnRequest, max_ops: usize) -> bool {
    let ops = request
        .compare
        .len()
        .max(request.success.len())
        .max(request.failure.len());
    ops <= max_ops
        && request
            .success
            .iter()
            .chain(&request.failure)
            .all(|op| match &op.request {
                Some(Request::RequestTxn(txn)) => fits_txn_ops(txn, max_ops - ops),
                _ => true,
            })
}

/// Gives the answer of a transaction sent as [`ProxiedTenant::check_put_leases`] made it
/// (`sent`, the tenant's transaction before that) the shape of the tenant's: each checked
/// put's answer in place of its check's. A check that took its failure branch (possible
/// only if a lease [`NO_SUCH_LEASE`] existed) wrote the put without its lease: an error.
fn unwrap_put_checks(sent: &TxnRequest, response: &mut TxnResponse) -> Result<()> {
    let ops = if response.succeeded {
        &sent.success
    } else {
        &sent.failure
    };
    for (op, answer) in ops.iter().zip(response.responses.iter_mut()) {
        match (&op.request, &mut answer.response) {
            (Some(Request::RequestPut(put)), answer) if put.lease != 0 && !put.ignore_lease => {
                let checked = match answer.take() {
                    Some(Response::ResponseTxn(mut check)) if check.succeeded => {
                        check.responses.pop().and_then(|op| op.response)
                    }
                    _ => None,
                };
                let Some(put_answer @ Response::ResponsePut(_)) = checked else {
                    return Err(KineError::Storage(format!(
                        "etcd did not run the lease check of a put as sent (does lease {NO_SUCH_LEASE} exist?)"
                    )));
                };
                *answer = Some(put_answer);
            }
            (Some(Request::RequestTxn(txn)), Some(Response::ResponseTxn(nested))) => {
                unwrap_put_checks(txn, nested)?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// Runs a read against etcd, again (up to 3 times, 50/100/150 ms apart) when the connection
/// it went out on failed: reads change nothing, so one caught on the connection to a member
/// that just went down is retried on the others, as etcd's own client does. Writes are never
/// retried here (one may have been applied).
async fn retry_read<T, F, Fut>(mut read: F) -> std::result::Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, tonic::Status>>,
{
    let mut attempt = 0u64;
    loop {
        match read().await {
            Err(status)
                if status.code() == tonic::Code::Unavailable
                    && !status.message().starts_with("etcdserver:")
                    && attempt < 3 =>
            {
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(50 * attempt)).await;
            }
            other => return other,
        }
    }
}
