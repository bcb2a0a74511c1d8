//! Transactions with etcd's exact semantics, applied inside a backend [`WriteTxn`].
//!
//! Like etcd, a transaction runs in two phases. First every compare on the chosen path (nested
//! transactions included) is evaluated against the state *before* the transaction, and the
//! chosen puts and ranges are checked (lease exists, `ignore_*` keys exist, revisions in
//! range). Only then are the operations applied in order; from there on nothing but a
//! datastore failure can fail, so a rejected request never leaves half its writes behind.
//! Plain Put and DeleteRange run as one-operation transactions.
//!
//! # Wide reads are made before the write lock
//!
//! Everything above runs in the keyspace's writer, holding its write lock (on PostgreSQL and
//! MySQL the keyspace row lock every writer of the tenant waits for; on SQLite the database's
//! single write lock, which every writer of every tenant waits for). A compare or range op
//! over a huge range read there would stall them all for as long as the read takes. So a
//! transaction's *wide* reads (compares and range ops with a `range_end`, in both branches and
//! nested transactions) are made first, by the request's own task, from the datastore's read
//! path: each in one consistent snapshot at some revision `R0` ([`pre_read`]). Under the lock,
//! [`Applier`] then turns each into the exact read it would have made there
//! (`Applier::catch_up`): it asks for the keys written after `R0`
//! ([`WriteTxn::written_since`](crate::storage::WriteTxn::written_since), a scan of the
//! keyspace's rows by revision, not of the range; writes of earlier transactions of the same
//! group commit and of this transaction's own earlier ops included), looks each up as it is
//! now, and patches the read: values replaced, deleted keys dropped, new keys added, the count
//! adjusted by what each key was at `R0` (its first write after `R0` says: a tombstone or a
//! put keeping an older create revision means it was live). A read cut by a limit is exact up
//! to its last key; when deletes shrank it below the limit, the keys past it are read under
//! the lock, at most as many as were deleted. A read of an older revision needs nothing: that
//! history does not change.
//!
//! The semantics are etcd's exactly, because the result *is* the state under the lock: a range
//! op still sees the writes of the ops before it, compares are still atomic with the writes,
//! and the response's revision is the one the writer assigns. What the writer does for a wide
//! read is bounded by the writes made meanwhile, not by the size of the range. It reads the
//! range itself, as before, when that cannot be told: more writes since `R0` than the range
//! holds (then reading the range is no more work), a compaction above `R0` in between (its
//! purge may have removed the writes to look at), a read that failed before the lock, or a
//! backend without the scan (NATS, whose reads under the lock are of its in-memory image).
//! Point reads (one key) stay under the lock: they are one lookup, batched for the whole group
//! commit.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use kine_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use kine_proto::etcdserverpb::request_op::Request;
use kine_proto::etcdserverpb::response_op::Response;
use kine_proto::etcdserverpb::{
    Compare, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, RangeRequest,
    RangeResponse, RequestOp, ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};

use crate::error::{KineError, Result};
use crate::model::{KeyRange, KeyValue, RangeEnd, Revision};
use crate::range;
use crate::storage::{Backend, KeyspaceId, RangeQuery, RangeRows, WriteTxn};
use crate::watch::hub::EventLog;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Limits requests and clients are held to.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Largest accepted write request, encoded (etcd's `--max-request-bytes`).
    pub max_request_bytes: usize,
    /// Most operations in one transaction level (etcd's `--max-txn-ops`).
    pub max_txn_ops: usize,
    /// Most watchers on one Watch stream (`--max-watches-per-stream`).
    pub max_watches_per_stream: usize,
    /// Most leases of one tenant (`--max-leases-per-tenant`).
    pub max_leases_per_tenant: i64,
    /// Keep-alives of one tenant answered per second, 0 for no limit
    /// (`--max-keepalives-per-second`).
    pub keepalives_per_second: u32,
    /// Keep-alives of one tenant answered per second that repeat a lease's keep-alive within
    /// its coalescing window, 0 for no limit (`--max-repeated-keepalives-per-second`).
    pub repeated_keepalives_per_second: u32,
    /// Rows one tenant's reads may make the datastore read per second, 0 for no limit
    /// (`--max-read-rows-per-second`).
    pub read_rows_per_second: u64,
    /// Bytes of write requests of one tenant per second, 0 for no limit
    /// (`--max-write-bytes-per-second`).
    pub write_bytes_per_second: u64,
    /// Bytes of responses one Watch stream buffers for its client
    /// (`--watch-stream-buffer-bytes`).
    pub watch_stream_buffer_bytes: usize,
    /// Bytes of events a tenant's watch hub holds for streams that have not read them
    /// (`--watch-hub-buffer-bytes`).
    pub watch_hub_buffer_bytes: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            max_request_bytes: 1536 * 1024,
            max_txn_ops: 128,
            max_watches_per_stream: 10_000,
            max_leases_per_tenant: 100_000,
            keepalives_per_second: 10_000,
            repeated_keepalives_per_second: 100,
            read_rows_per_second: 0,
            write_bytes_per_second: 0,
            watch_stream_buffer_bytes: 4 << 20,
            watch_hub_buffer_bytes: 16 << 20,
        }
    }
}

/// The checks etcd's API layer makes on a put before it reaches the store.
pub fn check_put(request: &PutRequest) -> Result<()> {
    if request.key.is_empty() {
        return Err(KineError::EmptyKey);
    }
    if request.ignore_value && !request.value.is_empty() {
        return Err(KineError::ValueProvided);
    }
    if request.ignore_lease && request.lease != 0 {
        return Err(KineError::LeaseProvided);
    }
    Ok(())
}

/// The checks etcd's API layer makes on a delete.
pub fn check_delete(request: &DeleteRangeRequest) -> Result<()> {
    if request.key.is_empty() {
        return Err(KineError::EmptyKey);
    }
    Ok(())
}

/// The checks etcd's API layer makes on a transaction: operation counts, empty keys, and
/// keys written twice.
pub fn check_txn(request: &TxnRequest, limits: &RequestLimits) -> Result<()> {
    check_txn_ops(request, limits.max_txn_ops as i64)?;
    check_intervals(&request.success)?;
    check_intervals(&request.failure)?;
    Ok(())
}

fn check_txn_ops(request: &TxnRequest, max_ops: i64) -> Result<()> {
    let ops = request
        .compare
        .len()
        .max(request.success.len())
        .max(request.failure.len()) as i64;
    if ops > max_ops {
        return Err(KineError::TooManyOps);
    }
    if request.compare.iter().any(|c| c.key.is_empty()) {
        return Err(KineError::EmptyKey);
    }
    // Nested levels share the budget that this level leaves, as in etcd.
    for op in request.success.iter().chain(&request.failure) {
        match &op.request {
            Some(Request::RequestRange(r)) => range::check(r)?,
            Some(Request::RequestPut(r)) => check_put(r)?,
            Some(Request::RequestDeleteRange(r)) => check_delete(r)?,
            Some(Request::RequestTxn(r)) => check_txn_ops(r, max_ops - ops)?,
            None => return Err(KineError::KeyNotFound),
        }
    }
    Ok(())
}

/// A bound of a key interval where the empty key means "after every key", as in etcd's
/// interval checks.
#[derive(Clone, PartialEq, Eq)]
struct Bound(Bytes);

impl PartialOrd for Bound {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Bound {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        use std::cmp::Ordering;
        match (self.0.is_empty(), other.0.is_empty()) {
            (true, true) => Ordering::Equal,
            (true, false) => Ordering::Greater,
            (false, true) => Ordering::Less,
            (false, false) => self.0.cmp(&other.0),
        }
    }
}

#[derive(Clone)]
struct Interval {
    begin: Bound,
    end: Bound,
}

impl Interval {
    fn point(key: &Bytes) -> Self {
        let mut end = key.to_vec();
        end.push(0);
        Interval {
            begin: Bound(key.clone()),
            end: Bound(Bytes::from(end)),
        }
    }

    fn intersects(&self, other: &Interval) -> bool {
        self.begin < other.end && other.begin < self.end
    }
}

/// etcd's duplicate-key rule: within one branch, no key is put twice and no put falls inside
/// a deleted range; the success and failure branches of a nested transaction may put the
/// same key because only one of them runs. Returns the branch's puts and deleted intervals.
fn check_intervals(ops: &[RequestOp]) -> Result<(Vec<Bytes>, Vec<Interval>)> {
    let mut deletes: Vec<Interval> = Vec::new();
    for op in ops {
        if let Some(Request::RequestDeleteRange(d)) = &op.request {
            let interval = if d.range_end.is_empty() {
                Interval::point(&d.key)
            } else {
                Interval {
                    begin: Bound(d.key.clone()),
                    end: Bound(d.range_end.clone()),
                }
            };
            deletes.push(interval);
        }
    }
    let deleted = |deletes: &[Interval], key: &Bytes| {
        let point = Interval::point(key);
        deletes.iter().any(|d| d.intersects(&point))
    };
    let mut puts: Vec<Bytes> = Vec::new();
    for op in ops {
        if let Some(Request::RequestTxn(t)) = &op.request {
            let (puts_then, deletes_then) = check_intervals(&t.success)?;
            let (puts_else, deletes_else) = check_intervals(&t.failure)?;
            for key in &puts_then {
                if puts.contains(key) || deleted(&deletes, key) {
                    return Err(KineError::DuplicateKey);
                }
                puts.push(key.clone());
            }
            for key in &puts_else {
                if (puts.contains(key) && !puts_then.contains(key)) || deleted(&deletes, key) {
                    return Err(KineError::DuplicateKey);
                }
                if !puts.contains(key) {
                    puts.push(key.clone());
                }
            }
            deletes.extend(deletes_then);
            deletes.extend(deletes_else);
        }
    }
    for op in ops {
        if let Some(Request::RequestPut(p)) = &op.request {
            if puts.contains(&p.key) || deleted(&deletes, &p.key) {
                return Err(KineError::DuplicateKey);
            }
            puts.push(p.key.clone());
        }
    }
    Ok((puts, deletes))
}

/// Whether any branch at any depth writes.
pub fn has_writes(request: &TxnRequest) -> bool {
    request
        .success
        .iter()
        .chain(&request.failure)
        .any(|op| match &op.request {
            Some(Request::RequestPut(_)) | Some(Request::RequestDeleteRange(_)) => true,
            Some(Request::RequestTxn(t)) => has_writes(t),
            _ => false,
        })
}

/// Every single key a transaction names (compares, puts, deletes and reads of one key, in
/// both branches and nested transactions): what a write batch looks up in one go.
pub fn point_keys(request: &TxnRequest, out: &mut Vec<Bytes>) {
    for compare in &request.compare {
        if compare.range_end.is_empty() {
            out.push(compare.key.clone());
        }
    }
    for op in request.success.iter().chain(&request.failure) {
        match &op.request {
            Some(Request::RequestPut(put)) => out.push(put.key.clone()),
            Some(Request::RequestDeleteRange(delete)) if delete.range_end.is_empty() => {
                out.push(delete.key.clone());
            }
            Some(Request::RequestRange(range))
                if range.range_end.is_empty() && range.revision == 0 =>
            {
                out.push(range.key.clone());
            }
            Some(Request::RequestTxn(t)) => point_keys(t, out),
            _ => {}
        }
    }
}

/// The keys a transaction would create, so that a write batch may take them for absent without
/// reading them when its commit checks that (PostgreSQL, SQLite): a plain put's key (a put of a key its
/// process has not seen is most often a new key), and each single key the transaction compares
/// with create revision, mod revision or version equal to 0 (kube-apiserver's create).
pub fn created_keys(request: &TxnRequest, plain_put: bool, out: &mut Vec<Bytes>) {
    if plain_put {
        if let Some(Request::RequestPut(put)) =
            request.success.first().and_then(|op| op.request.as_ref())
        {
            out.push(put.key.clone());
        }
        return;
    }
    for compare in &request.compare {
        let absent_expected = match CompareTarget::try_from(compare.target) {
            Ok(target @ (CompareTarget::Create | CompareTarget::Mod | CompareTarget::Version)) => {
                int_target(compare, target) == 0
            }
            _ => false,
        };
        if absent_expected
            && compare.range_end.is_empty()
            && compare.result == CompareResult::Equal as i32
        {
            out.push(compare.key.clone());
        }
    }
}

/// The key and size (key + value bytes) of every put in a transaction, in both branches and
/// nested transactions: what a quota check counts.
pub fn put_costs(request: &TxnRequest) -> Vec<(Bytes, i64)> {
    let mut out = Vec::new();
    for op in request.success.iter().chain(&request.failure) {
        match &op.request {
            Some(Request::RequestPut(put)) => {
                out.push((put.key.clone(), (put.key.len() + put.value.len()) as i64));
            }
            Some(Request::RequestTxn(t)) => out.extend(put_costs(t)),
            _ => {}
        }
    }
    out
}

/// Writes since a read outside the lock below which catching it up is always tried, however
/// small the range (see [`Applier::catch_up`]).
const MIN_CATCH_UP_WRITES: i64 = 1024;

/// What a read asks, as the key of a read made before the lock.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Shape {
    start: Bytes,
    end: Option<Bytes>,
    unbounded: bool,
    revision: Revision,
    limit: Option<i64>,
    keys_only: bool,
    count_only: bool,
}

impl Shape {
    fn of(query: &RangeQuery<'_>) -> Self {
        let (end, unbounded) = match &query.range.end {
            RangeEnd::Single => (None, false),
            RangeEnd::Unbounded => (None, true),
            RangeEnd::Before(end) => (Some(end.clone()), false),
        };
        Shape {
            start: query.range.start.clone(),
            end,
            unbounded,
            revision: query.revision.max(0),
            limit: query.limit,
            keys_only: query.keys_only,
            count_only: query.count_only,
        }
    }
}

/// A wide read of a transaction, made before its write lock was taken.
#[derive(Debug)]
struct PreRead {
    /// The revision whose state it holds.
    at: Revision,
    kvs: Vec<KeyValue>,
    /// Keys in the range at `at`.
    count: i64,
    /// Whether `kvs` holds every key of the range (no limit cut it, not count-only).
    complete: bool,
}

/// The wide reads of a transaction (compares and range ops over more than one key), made
/// before its write lock is taken; see [`pre_read`].
#[derive(Debug, Default)]
pub struct PreReads {
    reads: std::collections::HashMap<Shape, PreRead>,
}

impl PreReads {
    /// Rows these reads made the datastore read (a range's count when it returned fewer).
    pub fn rows_read(&self) -> u64 {
        self.reads
            .values()
            .map(|read| (read.kvs.len() as u64).max(u64::try_from(read.count).unwrap_or(0)))
            .sum()
    }
}

/// The query a compare reads: every key of its range, with values only when it compares
/// them.
fn compare_query<'a>(range: &'a KeyRange, target: CompareTarget) -> RangeQuery<'a> {
    RangeQuery {
        range,
        revision: 0,
        limit: None,
        keys_only: target != CompareTarget::Value,
        count_only: false,
    }
}

/// Collects the ranges of `request` wider than one key (compares and range ops, both branches,
/// nested transactions), one of each.
fn wide_ranges(
    request: &TxnRequest,
    out: &mut Vec<(KeyRange, Option<RangeRequest>, CompareTarget)>,
) {
    for compare in &request.compare {
        if !compare.range_end.is_empty() {
            let target = CompareTarget::try_from(compare.target).unwrap_or(CompareTarget::Version);
            let range = KeyRange::new(compare.key.clone(), compare.range_end.clone());
            out.push((range, None, target));
        }
    }
    for op in request.success.iter().chain(&request.failure) {
        match &op.request {
            Some(Request::RequestRange(r)) if !r.range_end.is_empty() => {
                let range = KeyRange::new(r.key.clone(), r.range_end.clone());
                out.push((range, Some(r.clone()), CompareTarget::Version));
            }
            Some(Request::RequestTxn(t)) => wide_ranges(t, out),
            _ => {}
        }
    }
}

/// Reads the wide ranges of `request` (compares and range ops over more than one key) from
/// the datastore's read path, before the transaction takes the keyspace's write lock; the
/// writer then only catches each read up with the keys written since
/// ([`Applier::catch_up`]), so a transaction over a huge range costs the writer the writes
/// made meanwhile, not the range. `None` when there is nothing wide to read.
///
/// Every read is its own consistent snapshot at some revision, which it records; a read
/// that fails (compacted, future revision, an unavailable datastore) is left out, and the
/// writer reads that range itself, answering exactly as before.
pub async fn pre_read(
    backend: &dyn Backend,
    keyspace: KeyspaceId,
    request: &TxnRequest,
) -> Option<PreReads> {
    let mut ranges = Vec::new();
    wide_ranges(request, &mut ranges);
    if ranges.is_empty() {
        return None;
    }
    let mut reads = std::collections::HashMap::new();
    for (range, op, target) in &ranges {
        let query = match op {
            Some(r) => range::query(r, range),
            None => compare_query(range, *target),
        };
        let shape = Shape::of(&query);
        if reads.contains_key(&shape) {
            continue;
        }
        let Ok(rows) = backend.range(keyspace, query.clone()).await else {
            continue;
        };
        let at = if query.revision > 0 {
            query.revision.min(rows.revision)
        } else {
            rows.revision
        };
        let complete = !query.count_only
            && query
                .limit
                .is_none_or(|limit| (rows.kvs.len() as i64) < limit);
        reads.insert(
            shape,
            PreRead {
                at,
                kvs: rows.kvs,
                count: rows.count,
                complete,
            },
        );
    }
    Some(PreReads { reads })
}

/// Which branch each transaction on the chosen path takes: the outer one, then its nested
/// transactions in order.
struct Path {
    succeeded: bool,
    nested: Vec<Path>,
}

impl Path {
    fn ops<'r>(&self, request: &'r TxnRequest) -> &'r [RequestOp] {
        if self.succeeded {
            &request.success
        } else {
            &request.failure
        }
    }
}

/// Applies transactions inside one backend write transaction, tracking the revision.
pub struct Applier<'t> {
    txn: &'t mut dyn WriteTxn,
    /// The revision before this etcd transaction.
    base: Revision,
    /// Rows written so far by this etcd transaction; each gets the next `sub`.
    writes: i64,
    /// Sub-revision counter shared across the database transaction.
    sub: &'t mut i64,
    /// Wide reads made before the lock was taken, caught up here.
    pre_reads: Option<&'t PreReads>,
    /// Where the events of the writes go, for the keyspace's watch hub.
    events: Option<&'t mut EventLog>,
}

impl<'t> Applier<'t> {
    /// An applier for one etcd transaction on top of `base`.
    pub fn new(txn: &'t mut dyn WriteTxn, base: Revision, sub: &'t mut i64) -> Self {
        Applier {
            txn,
            base,
            writes: 0,
            sub,
            pre_reads: None,
            events: None,
        }
    }

    /// Records the events of its writes in `events`.
    pub fn with_events(mut self, events: &'t mut EventLog) -> Self {
        self.events = Some(events);
        self
    }

    /// Serves the transaction's wide reads from `pre_reads` where it can.
    pub fn with_pre_reads(mut self, pre_reads: Option<&'t PreReads>) -> Self {
        self.pre_reads = pre_reads;
        self
    }

    /// The revision after the transaction: `base + 1` if it wrote anything.
    pub fn revision(&self) -> Revision {
        if self.writes > 0 {
            self.base + 1
        } else {
            self.base
        }
    }

    /// Runs a transaction. `put_lease_first` reproduces etcd's check order for a plain Put
    /// (lease before `ignore_*` keys).
    pub async fn txn(
        &mut self,
        request: &TxnRequest,
        put_lease_first: bool,
    ) -> Result<TxnResponse> {
        let path = self.compare_path(request).await?;
        if has_writes(request) {
            self.check_puts(request, &path, put_lease_first).await?;
        }
        self.check_ranges(request, &path)?;
        let mut response = self.apply(request, &path).await?;
        response.header = Some(header(self.revision()));
        Ok(response)
    }

    fn compare_path<'a>(&'a mut self, request: &'a TxnRequest) -> BoxFuture<'a, Result<Path>> {
        Box::pin(async move {
            let mut succeeded = true;
            for compare in &request.compare {
                if !self.compare(compare).await? {
                    succeeded = false;
                    break;
                }
            }
            let ops = if succeeded {
                &request.success
            } else {
                &request.failure
            };
            let mut nested = Vec::new();
            for op in ops {
                if let Some(Request::RequestTxn(t)) = &op.request {
                    nested.push(self.compare_path(t).await?);
                }
            }
            Ok(Path { succeeded, nested })
        })
    }

    async fn compare(&mut self, compare: &Compare) -> Result<bool> {
        let range = KeyRange::new(compare.key.clone(), compare.range_end.clone());
        let target = CompareTarget::try_from(compare.target).unwrap_or(CompareTarget::Version);
        // Under the write lock: read values only when the compare needs them (a compare of
        // versions over a wide range would otherwise load every value of it), and a range
        // read before the lock only where it changed since.
        let query = compare_query(&range, target);
        let caught_up = match self.pre_read(&query) {
            Some(pre) => self.catch_up(pre, &query).await?,
            None => None,
        };
        let kvs = match caught_up {
            Some(rows) => rows.kvs,
            None => self.current(&range, query.keys_only).await?,
        };
        if kvs.is_empty() {
            // A missing key has no value to compare: etcd fails every value compare on it.
            if target == CompareTarget::Value {
                return Ok(false);
            }
            return Ok(compare_kv(compare, target, &KeyValue::default()));
        }
        Ok(kvs.iter().all(|kv| compare_kv(compare, target, kv)))
    }

    async fn current(&mut self, range: &KeyRange, keys_only: bool) -> Result<Vec<KeyValue>> {
        let rows = self
            .txn
            .range(RangeQuery {
                range,
                revision: 0,
                limit: None,
                keys_only,
                count_only: false,
            })
            .await?;
        Ok(rows.kvs)
    }

    fn check_puts<'a>(
        &'a mut self,
        request: &'a TxnRequest,
        path: &'a Path,
        lease_first: bool,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let mut nested = path.nested.iter();
            for op in path.ops(request) {
                match &op.request {
                    Some(Request::RequestTxn(t)) => {
                        if let Some(p) = nested.next() {
                            self.check_puts(t, p, lease_first).await?;
                        }
                    }
                    Some(Request::RequestPut(put)) => {
                        // Checked here, not when writing: a datastore error while writing
                        // would fail every request sharing the database transaction.
                        if let Some((max, driver)) = self.txn.key_limit()
                            && put.key.len() > max
                        {
                            return Err(KineError::KeyTooLong {
                                len: put.key.len(),
                                max,
                                driver,
                            });
                        }
                        if lease_first {
                            self.check_lease(put.lease).await?;
                        }
                        if (put.ignore_value || put.ignore_lease)
                            && self.txn.get(&put.key).await?.is_none()
                        {
                            return Err(KineError::KeyNotFound);
                        }
                        if !lease_first {
                            self.check_lease(put.lease).await?;
                        }
                    }
                    _ => {}
                }
            }
            Ok(())
        })
    }

    async fn check_lease(&mut self, lease: i64) -> Result<()> {
        if lease != 0 && self.txn.lease(lease).await?.is_none() {
            return Err(KineError::LeaseNotFound);
        }
        Ok(())
    }

    fn check_ranges(&self, request: &TxnRequest, path: &Path) -> Result<()> {
        // Like etcd's, the compaction revision is -1 before any compaction.
        let first = self.txn.state().compact_revision;
        let mut nested = path.nested.iter();
        for op in path.ops(request) {
            match &op.request {
                Some(Request::RequestTxn(t)) => {
                    if let Some(p) = nested.next() {
                        self.check_ranges(t, p)?;
                    }
                }
                Some(Request::RequestRange(r)) if r.revision != 0 => {
                    if r.revision > self.base {
                        return Err(KineError::FutureRevision);
                    }
                    if r.revision < first {
                        return Err(KineError::Compacted);
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn apply<'a>(
        &'a mut self,
        request: &'a TxnRequest,
        path: &'a Path,
    ) -> BoxFuture<'a, Result<TxnResponse>> {
        Box::pin(async move {
            let mut responses = Vec::new();
            let mut nested = path.nested.iter();
            for op in path.ops(request) {
                let response = match &op.request {
                    Some(Request::RequestRange(r)) => Response::ResponseRange(self.range(r).await?),
                    Some(Request::RequestPut(p)) => Response::ResponsePut(self.put(p).await?),
                    Some(Request::RequestDeleteRange(d)) => {
                        Response::ResponseDeleteRange(self.delete(d).await?)
                    }
                    Some(Request::RequestTxn(t)) => match nested.next() {
                        Some(p) => {
                            let mut inner = self.apply(t, p).await?;
                            // etcd leaves nested headers empty.
                            inner.header = Some(ResponseHeader::default());
                            Response::ResponseTxn(inner)
                        }
                        None => return Err(KineError::Storage("transaction path".into())),
                    },
                    None => return Err(KineError::KeyNotFound),
                };
                responses.push(ResponseOp {
                    response: Some(response),
                });
            }
            Ok(TxnResponse {
                header: None,
                succeeded: path.succeeded,
                responses,
            })
        })
    }

    async fn range(&mut self, request: &RangeRequest) -> Result<RangeResponse> {
        let key_range = KeyRange::new(request.key.clone(), request.range_end.clone());
        let mut query = range::query(request, &key_range);
        let pre = self.pre_read(&query);
        let revision = self.revision();
        // Reading at the revision being written is reading the current state.
        if query.revision >= revision {
            query.revision = 0;
        }
        let served = match pre {
            Some(pre) if query.revision <= 0 => self.catch_up(pre, &query).await?,
            // History does not change: a read of it before the lock is the answer.
            Some(pre) if pre.at == query.revision => Some(RangeRows {
                revision,
                kvs: pre.kvs.clone(),
                count: pre.count,
            }),
            _ => None,
        };
        let mut rows = match served {
            Some(rows) => rows,
            None => self.txn.range(query).await?,
        };
        rows.revision = revision;
        Ok(range::finish(request, rows))
    }

    /// The read of `query` made before the lock, if there is one.
    fn pre_read(&self, query: &RangeQuery<'_>) -> Option<&'t PreRead> {
        self.pre_reads?.reads.get(&Shape::of(query))
    }

    /// The current state (this transaction's writes included) of what `query` reads, from a
    /// read of it at `pre.at` and the keys written since; `None` when that cannot be told
    /// (then the caller reads the range itself). The work is bounded by the writes since
    /// `pre.at` (and the request's limit when keys past a deleted one are needed), not by
    /// the size of the range.
    async fn catch_up(
        &mut self,
        pre: &PreRead,
        query: &RangeQuery<'_>,
    ) -> Result<Option<RangeRows>> {
        // Past this many writes, reading the range itself is no more work.
        let limit = pre.count.max(MIN_CATCH_UP_WRITES);
        let Some(written) = self.txn.written_since(query.range, pre.at, limit).await? else {
            return Ok(None);
        };
        let keys: Vec<Bytes> = written.iter().map(|w| w.key.clone()).collect();
        self.txn.prefetch(&keys).await?;
        // Without every key of the range, `pre.kvs` is exact up to its last key only.
        let window_end = (!pre.complete).then(|| pre.kvs.last().map(|kv| kv.key.clone()));
        let in_window = |key: &Bytes| match &window_end {
            None => true,
            Some(None) => false,
            Some(Some(last)) => key <= last,
        };
        let mut kvs: std::collections::BTreeMap<Bytes, KeyValue> = pre
            .kvs
            .iter()
            .map(|kv| (kv.key.clone(), kv.clone()))
            .collect();
        let mut count = pre.count;
        for w in &written {
            let now = self.txn.get(&w.key).await?;
            count += i64::from(now.is_some()) - i64::from(w.live_before);
            if !in_window(&w.key) {
                continue;
            }
            match now {
                Some(mut kv) => {
                    if query.keys_only {
                        kv.value = Bytes::new();
                    }
                    kvs.insert(w.key.clone(), kv);
                }
                None => {
                    kvs.remove(&w.key);
                }
            }
        }
        let mut kvs: Vec<KeyValue> = kvs.into_values().collect();
        if query.count_only {
            kvs.clear();
        } else if let (Some(Some(last)), Some(limit)) = (&window_end, query.limit)
            && (kvs.len() as i64) < limit
            && count > kvs.len() as i64
        {
            // Keys of the window were deleted: the next ones come from past its end, at
            // most as many as were deleted.
            let mut start = last.to_vec();
            start.push(0);
            let rest = KeyRange {
                start: Bytes::from(start),
                end: query.range.end.clone(),
            };
            let more = self
                .txn
                .range(RangeQuery {
                    range: &rest,
                    revision: 0,
                    limit: Some(limit - kvs.len() as i64),
                    keys_only: query.keys_only,
                    count_only: false,
                })
                .await?;
            kvs.extend(more.kvs);
        }
        Ok(Some(RangeRows {
            revision: self.revision(),
            kvs,
            count,
        }))
    }

    async fn put(&mut self, request: &PutRequest) -> Result<PutResponse> {
        let previous = self.txn.get(&request.key).await?;
        let revision = self.base + 1;
        let (value, lease) = match &previous {
            Some(prev) => (
                if request.ignore_value {
                    prev.value.clone()
                } else {
                    request.value.clone()
                },
                if request.ignore_lease {
                    prev.lease
                } else {
                    request.lease
                },
            ),
            None => (request.value.clone(), request.lease),
        };
        let kv = KeyValue {
            key: request.key.clone(),
            create_revision: previous
                .as_ref()
                .map_or(revision, |prev| prev.create_revision),
            mod_revision: revision,
            version: previous.as_ref().map_or(1, |prev| prev.version + 1),
            value,
            lease,
        };
        self.txn.put(&kv, *self.sub).await?;
        *self.sub += 1;
        self.writes += 1;
        if let Some(events) = self.events.as_deref_mut() {
            events.put(&kv, previous.as_ref());
        }
        Ok(PutResponse {
            header: Some(header(revision)),
            prev_kv: if request.prev_kv { previous } else { None },
        })
    }

    async fn delete(&mut self, request: &DeleteRangeRequest) -> Result<DeleteRangeResponse> {
        let range = KeyRange::new(request.key.clone(), request.range_end.clone());
        let kvs = self.current(&range, false).await?;
        let revision = self.base + 1;
        for kv in &kvs {
            self.txn.delete(&kv.key, revision, *self.sub).await?;
            *self.sub += 1;
            self.writes += 1;
            if let Some(events) = self.events.as_deref_mut() {
                events.delete(kv, revision);
            }
        }
        Ok(DeleteRangeResponse {
            header: Some(header(self.revision())),
            deleted: kvs.len() as i64,
            prev_kvs: if request.prev_kv { kvs } else { Vec::new() },
        })
    }

    /// Deletes every key attached to a lease, in key order, then the lease itself.
    pub async fn revoke(&mut self, id: i64) -> Result<()> {
        let keys = self.txn.lease_keys(id).await?;
        let revision = self.base + 1;
        if !keys.is_empty()
            && let Some(events) = self.events.as_deref_mut()
        {
            // The keys' values are not read here: the hub reads these events back.
            events.give_up();
        }
        for key in keys {
            self.txn.delete(&key, revision, *self.sub).await?;
            *self.sub += 1;
            self.writes += 1;
        }
        self.txn.delete_lease(id).await
    }
}

pub(crate) fn compare_kv(compare: &Compare, target: CompareTarget, kv: &KeyValue) -> bool {
    use std::cmp::Ordering;
    let ordering = match target {
        CompareTarget::Value => {
            let wanted: &[u8] = match &compare.target_union {
                Some(TargetUnion::Value(v)) => v,
                _ => &[],
            };
            kv.value.as_ref().cmp(wanted)
        }
        CompareTarget::Create => kv.create_revision.cmp(&int_target(compare, target)),
        CompareTarget::Mod => kv.mod_revision.cmp(&int_target(compare, target)),
        CompareTarget::Version => kv.version.cmp(&int_target(compare, target)),
        CompareTarget::Lease => kv.lease.cmp(&int_target(compare, target)),
    };
    match CompareResult::try_from(compare.result) {
        Ok(CompareResult::Equal) => ordering == Ordering::Equal,
        Ok(CompareResult::NotEqual) => ordering != Ordering::Equal,
        Ok(CompareResult::Greater) => ordering == Ordering::Greater,
        Ok(CompareResult::Less) => ordering == Ordering::Less,
        // etcd treats an unknown result as true.
        Err(_) => true,
    }
}

/// The integer a compare holds for `target`; 0 when the union holds another field.
fn int_target(compare: &Compare, target: CompareTarget) -> i64 {
    match (&compare.target_union, target) {
        (Some(TargetUnion::Version(v)), CompareTarget::Version)
        | (Some(TargetUnion::CreateRevision(v)), CompareTarget::Create)
        | (Some(TargetUnion::ModRevision(v)), CompareTarget::Mod)
        | (Some(TargetUnion::Lease(v)), CompareTarget::Lease) => *v,
        _ => 0,
    }
}

/// A header that carries only a revision; the server fills in the rest.
pub fn header(revision: Revision) -> ResponseHeader {
    ResponseHeader {
        revision,
        ..Default::default()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A panic is how a test reports.
mod tests {
    use super::*;

    /// Keys a transaction would create: a plain put's, and each single key compared equal to
    /// revision or version 0; not a key compared with anything else, nor a range.
    #[test]
    fn created_keys_are_plain_puts_and_compares_with_zero() {
        let compare =
            |key: &'static str, target: CompareTarget, union, result: CompareResult| Compare {
                key: Bytes::from_static(key.as_bytes()),
                target: target as i32,
                result: result as i32,
                target_union: Some(union),
                ..Default::default()
            };
        let created = |request: &TxnRequest, plain_put: bool| {
            let mut out = Vec::new();
            created_keys(request, plain_put, &mut out);
            out
        };
        let plain = TxnRequest {
            success: vec![put("p")],
            ..Default::default()
        };
        assert_eq!(created(&plain, true), [Bytes::from_static(b"p")]);
        assert!(created(&plain, false).is_empty(), "a put in a txn alone");
        let mut ranged = compare(
            "r",
            CompareTarget::Mod,
            TargetUnion::ModRevision(0),
            CompareResult::Equal,
        );
        ranged.range_end = Bytes::from_static(b"s");
        let request = TxnRequest {
            compare: vec![
                compare(
                    "m",
                    CompareTarget::Mod,
                    TargetUnion::ModRevision(0),
                    CompareResult::Equal,
                ),
                compare(
                    "c",
                    CompareTarget::Create,
                    TargetUnion::CreateRevision(0),
                    CompareResult::Equal,
                ),
                compare(
                    "v",
                    CompareTarget::Version,
                    TargetUnion::Version(0),
                    CompareResult::Equal,
                ),
                compare(
                    "u",
                    CompareTarget::Mod,
                    TargetUnion::ModRevision(7),
                    CompareResult::Equal,
                ),
                compare(
                    "n",
                    CompareTarget::Mod,
                    TargetUnion::ModRevision(0),
                    CompareResult::NotEqual,
                ),
                compare(
                    "g",
                    CompareTarget::Version,
                    TargetUnion::Version(0),
                    CompareResult::Greater,
                ),
                compare(
                    "l",
                    CompareTarget::Lease,
                    TargetUnion::Lease(0),
                    CompareResult::Equal,
                ),
                ranged,
            ],
            success: vec![put("m"), put("x")],
            failure: vec![],
        };
        let keys: Vec<Bytes> = ["m", "c", "v"]
            .into_iter()
            .map(|key| Bytes::from_static(key.as_bytes()))
            .collect();
        assert_eq!(created(&request, false), keys);
    }

    fn put(key: &'static str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: Bytes::from_static(key.as_bytes()),
                ..Default::default()
            })),
        }
    }

    fn delete(key: &'static str, end: &'static str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                key: Bytes::from_static(key.as_bytes()),
                range_end: Bytes::from_static(end.as_bytes()),
                ..Default::default()
            })),
        }
    }

    fn nested(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestTxn(TxnRequest {
                compare: vec![],
                success,
                failure,
            })),
        }
    }

    #[test]
    fn duplicate_keys_follow_etcds_rules() {
        assert!(check_intervals(&[put("a"), put("a")]).is_err());
        assert!(check_intervals(&[put("b"), delete("a", "c")]).is_err());
        assert!(check_intervals(&[put("c"), delete("a", "c")]).is_ok());
        assert!(check_intervals(&[delete("a", "c"), delete("b", "d")]).is_ok());
        // Both branches of a nested txn may put the same key: only one runs.
        assert!(check_intervals(&[nested(vec![put("a")], vec![put("a")])]).is_ok());
        assert!(check_intervals(&[put("a"), nested(vec![put("a")], vec![])]).is_err());
        assert!(check_intervals(&[delete("a", ""), nested(vec![], vec![put("a")])]).is_err());
        // "\0" is not special here: as in etcd, [b, "\0") is an empty interval.
        assert!(check_intervals(&[put("c"), delete("b", "\0")]).is_ok());
    }

    #[test]
    fn too_many_ops_counts_each_level() {
        let limits = RequestLimits {
            max_txn_ops: 2,
            ..Default::default()
        };
        let ok = TxnRequest {
            compare: vec![],
            success: vec![put("a"), put("b")],
            failure: vec![],
        };
        assert!(check_txn(&ok, &limits).is_ok());
        let too_many = TxnRequest {
            compare: vec![],
            success: vec![put("a"), put("b"), put("c")],
            failure: vec![],
        };
        assert!(matches!(
            check_txn(&too_many, &limits),
            Err(KineError::TooManyOps)
        ));
    }

    fn range_op(key: &str, end: &str, limit: i64, keys_only: bool, count_only: bool) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestRange(RangeRequest {
                key: Bytes::copy_from_slice(key.as_bytes()),
                range_end: Bytes::copy_from_slice(end.as_bytes()),
                limit,
                keys_only,
                count_only,
                ..Default::default()
            })),
        }
    }

    fn put_value(key: String, value: String) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: Bytes::from(key),
                value: Bytes::from(value),
                ..Default::default()
            })),
        }
    }

    fn delete_range(key: String, end: String) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                key: Bytes::from(key),
                range_end: Bytes::from(end),
                prev_kv: true,
            })),
        }
    }

    /// Runs `request` in a write transaction of its own; commits it when `commit`, else
    /// rolls it back.
    async fn run(
        backend: &dyn Backend,
        keyspace: KeyspaceId,
        request: &TxnRequest,
        pre_reads: Option<&PreReads>,
        commit: bool,
    ) -> Result<TxnResponse> {
        let mut txn = backend.begin_write(keyspace).await.unwrap();
        let base = txn.state().revision;
        let mut sub = 0;
        let (response, revision) = {
            let mut applier = Applier::new(&mut *txn, base, &mut sub).with_pre_reads(pre_reads);
            let response = applier.txn(request, false).await;
            (response, applier.revision())
        };
        if commit {
            txn.commit(revision).await.unwrap();
        }
        response
    }

    /// Transactions whose wide reads were made several writes (and sometimes a compaction)
    /// earlier answer exactly as when every read is made under the lock: compares, ranges
    /// with limits, counts, keys only, from-key, sorted, historic, and reads of the
    /// transaction's own writes.
    #[tokio::test]
    async fn caught_up_reads_answer_as_reads_under_the_lock() {
        use crate::storage::sqlite;
        let backend = sqlite::open_memory().await.unwrap();
        let keyspace = backend.keyspace("t", true).await.unwrap().unwrap();
        let key = |i: u64| format!("k{:02}", i % 40);
        let load = TxnRequest {
            compare: vec![],
            success: (0..40)
                .map(|i| put_value(key(i), format!("v{i}")))
                .collect(),
            failure: vec![],
        };
        run(&backend, keyspace, &load, None, true).await.unwrap();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut random = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut answered = 0;
        for round in 0..40u64 {
            let revision = backend.state(keyspace).await.unwrap().revision;
            let compare = Compare {
                key: Bytes::from_static(b"k10"),
                range_end: Bytes::from_static(b"k30"),
                target: CompareTarget::Version as i32,
                result: CompareResult::Greater as i32,
                target_union: Some(TargetUnion::Version(0)),
            };
            let value_compare = Compare {
                key: Bytes::from_static(b"k00"),
                range_end: Bytes::from_static(b"k05"),
                target: CompareTarget::Value as i32,
                result: CompareResult::Greater as i32,
                target_union: Some(TargetUnion::Value(Bytes::from_static(b"v"))),
            };
            let mut sorted = RangeRequest {
                key: Bytes::from_static(b"k"),
                range_end: Bytes::from_static(b"l"),
                limit: 3,
                sort_order: 2,
                sort_target: 2,
                ..Default::default()
            };
            let historic = RangeRequest {
                key: Bytes::from_static(b"k"),
                range_end: Bytes::from_static(b"l"),
                revision: revision - (random() % 3) as i64,
                limit: (random() % 4) as i64,
                ..Default::default()
            };
            sorted.limit = 1 + (random() % 3) as i64;
            let reads = vec![
                range_op("k05", "k35", 1 + (random() % 6) as i64, false, false),
                range_op("k", "l", 0, false, true),
                range_op("k00", "k20", 3, true, false),
                range_op("k25", "\0", 4, false, false),
                range_op("k", "l", 0, true, false),
                RequestOp {
                    request: Some(Request::RequestRange(sorted)),
                },
                RequestOp {
                    request: Some(Request::RequestRange(historic)),
                },
            ];
            let a = format!("k{:02}", random() % 40);
            let b = format!("k{:02}", random() % 40);
            let (low, high) = if a < b { (a, b) } else { (b, a) };
            let probes = vec![
                TxnRequest {
                    compare: vec![compare.clone(), value_compare.clone()],
                    success: reads.clone(),
                    failure: reads[..3].to_vec(),
                },
                TxnRequest {
                    compare: vec![compare],
                    success: [
                        vec![
                            put_value(key(random()), "mine".into()),
                            delete_range(low.clone(), high.clone()),
                        ],
                        reads.clone(),
                    ]
                    .concat(),
                    failure: vec![],
                },
            ];
            let mut pre_reads = Vec::new();
            for probe in &probes {
                pre_reads.push(pre_read(&backend, keyspace, probe).await.unwrap());
            }
            // Writes between the reads and the lock: puts (new keys and overwrites) and
            // deletes of ranges; sometimes a compaction past the reads.
            for _ in 0..random() % 6 {
                let i = random();
                let op = if i % 3 == 0 {
                    delete_range(key(i), key(i + 1 + random() % 4))
                } else {
                    put_value(key(i), format!("w{round}-{i}"))
                };
                let request = TxnRequest {
                    compare: vec![],
                    success: vec![op],
                    failure: vec![],
                };
                run(&backend, keyspace, &request, None, true).await.unwrap();
            }
            if round % 7 == 6 {
                let mut txn = backend.begin_write(keyspace).await.unwrap();
                let at = txn.state().revision;
                txn.set_compact_revision(at).await.unwrap();
                txn.commit(at).await.unwrap();
                crate::writer::purge(&backend, keyspace, at).await.unwrap();
            }
            for (probe, pre) in probes.iter().zip(&pre_reads) {
                let expected = run(&backend, keyspace, probe, None, false).await;
                let caught_up = run(&backend, keyspace, probe, Some(pre), false).await;
                // Errors (a historic read of a compacted revision) must match too.
                assert_eq!(
                    format!("{caught_up:?}"),
                    format!("{expected:?}"),
                    "round {round}: {probe:?}"
                );
                if expected.is_ok() {
                    answered += 1;
                }
            }
        }
        assert!(answered > 40, "only {answered} probes were answered");
    }
}
