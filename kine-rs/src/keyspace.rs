//! A keyspace (tenant) being served: its writer task and watch hub, and the etcd operations on
//! it. The gRPC services are thin wrappers around this type.
//!
//! An open keyspace is cheap: one idle writer task; its watch hub runs only while someone
//! watches, and lease expiry is one loop per process over every keyspace
//! ([`crate::tenants::expire_leases`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use kine_proto::etcdserverpb::request_op::Request;
use kine_proto::etcdserverpb::response_op::Response;
use kine_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse,
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveResponse, LeaseLeasesResponse,
    LeaseRevokeResponse, LeaseStatus, LeaseTimeToLiveRequest, LeaseTimeToLiveResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, RequestOp, ResponseHeader, TxnRequest, TxnResponse,
};
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::error::{KineError, Result};
use crate::model::{KeyRange, LeaseRecord, Revision, now_ms};
use crate::range;
use crate::rate::{RateLimit, WorkBudget};
use crate::renewals::Renewer;
use crate::served::{ServedTenant, StatusFacts, WatchRequests, WatchResponses};
use crate::storage::{Backend, KeyspaceId, KeyspaceState, MigrationRole, Quota, RangeRows};
use crate::txn::{self, RequestLimits};
use crate::watch::hub::WatchHub;
use crate::watch::stream::WatchStream;
use crate::writer::{self, WriteCommand, WriteOp, WriteOutcome};

/// etcd's largest lease TTL, in seconds.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;
/// etcd's smallest lease TTL with its default election timeout, in seconds.
pub const MIN_LEASE_TTL: i64 = 2;

/// Most leases whose last keep-alive a keyspace remembers (for coalescing).
const MAX_REMEMBERED_RENEWALS: usize = 100_000;

/// The longest a keep-alive is answered from memory after the one this process stored.
const MAX_COALESCING_MS: i64 = 5_000;

/// How long after a stored keep-alive further ones are answered without a write: a tenth of
/// the TTL, at most [`MAX_COALESCING_MS`]. The stored deadline then stays at least nine
/// tenths of the TTL ahead while keep-alives come; a client keeping alive at etcd's cadence
/// (a third of the TTL) is stored every time, and only floods are answered from memory. Half
/// a second at most before: a tenant's flood over 1,000 leases of an hour was 2,000 renewals
/// a second, half a core of PostgreSQL (README, "A noisy neighbour").
fn coalescing_window(ttl_seconds: i64) -> i64 {
    (ttl_seconds.saturating_mul(100)).clamp(0, MAX_COALESCING_MS)
}

/// A keep-alive this process stored lately, and the last one it answered from memory since.
#[derive(Debug, Clone, Copy)]
struct RememberedRenewal {
    /// When it was stored (Unix milliseconds).
    stored_at: i64,
    /// When this process last told a client the lease has its full TTL again.
    answered_at: i64,
    /// The lease as stored.
    lease: LeaseRecord,
}

impl RememberedRenewal {
    fn within_window(&self, now: i64) -> bool {
        now - self.stored_at < coalescing_window(self.lease.ttl)
    }

    /// The deadline the last answer promised, past the stored one by less than the window.
    fn promised_deadline(&self) -> i64 {
        self.answered_at
            .saturating_add(self.lease.ttl.saturating_mul(1000))
            .max(self.lease.expires_at_ms)
    }
}

/// The fixed parts of every response header.
#[derive(Debug, Clone, Copy, Default)]
pub struct HeaderIdentity {
    pub cluster_id: u64,
    pub member_id: u64,
    pub raft_term: u64,
}

/// A keyspace being served.
pub struct Keyspace {
    name: String,
    id: KeyspaceId,
    backend: Arc<dyn Backend>,
    writer: mpsc::Sender<WriteCommand>,
    hub: Arc<WatchHub>,
    limits: RequestLimits,
    identity: HeaderIdentity,
    tasks: Vec<JoinHandle<()>>,
    /// Watchers open on this keyspace in this process.
    watches: AtomicI64,
    /// Keep-alives this process stored lately, by lease.
    renewals: std::sync::Mutex<HashMap<i64, RememberedRenewal>>,
    /// Stores the renewals the coalescing window does not answer, in batches.
    renewer: Renewer,
    /// The tenant's keep-alive rate in this process.
    keep_alive_rate: Option<RateLimit>,
    /// Admits keep-alives repeating a lease within its coalescing window (a flood's).
    repeated_keep_alive_rate: Option<RateLimit>,
    /// The tenant's budgets of datastore work in this process: rows its reads read, bytes
    /// its writes write.
    read_budget: Option<WorkBudget>,
    write_budget: Option<WorkBudget>,
    /// Where the tenant moved inside this process: its hub is closed then (as when the
    /// keyspace is deleted, [`WatchHub::close`]), and the streams carry on here.
    successor: std::sync::Mutex<Option<Arc<Keyspace>>>,
    /// When the tenant cache last handed it out.
    last_use: crate::tenants::LastUse,
    /// The next pages of paginated lists, read while their clients handle the pages before.
    read_ahead: crate::read_ahead::ReadAhead,
}

impl crate::tenants::Cached for Keyspace {
    fn last_use(&self) -> &crate::tenants::LastUse {
        &self.last_use
    }
}

impl Drop for Keyspace {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Keyspace {
    /// Opens keyspace `name` (creating it if `create`), and starts its tasks.
    pub async fn open(
        backend: Arc<dyn Backend>,
        name: &str,
        create: bool,
        limits: RequestLimits,
        identity: HeaderIdentity,
    ) -> Result<Option<Arc<Keyspace>>> {
        let Some(id) = backend.keyspace(name, create).await? else {
            return Ok(None);
        };
        Self::start(backend, name, id, limits, identity)
            .await
            .map(Some)
    }

    /// Starts serving keyspace `id` (named `name`), which exists: refused while it is being
    /// imported or after it moved.
    pub async fn start(
        backend: Arc<dyn Backend>,
        name: &str,
        id: KeyspaceId,
        limits: RequestLimits,
        identity: HeaderIdentity,
    ) -> Result<Arc<Keyspace>> {
        let state = backend.state(id).await?;
        match state.migration {
            MigrationRole::Importing => {
                return Err(KineError::TenantImporting {
                    tenant: name.to_string(),
                });
            }
            MigrationRole::Moved => {
                return Err(KineError::TenantMoved {
                    tenant: name.to_string(),
                });
            }
            MigrationRole::None | MigrationRole::Source => {}
        }
        let hub = Arc::new(WatchHub::new(
            backend.clone(),
            id,
            state.revision,
            limits.watch_hub_buffer_bytes,
        ));
        let (sender, queue) = mpsc::channel(4096);
        let (renewer, renewals) = Renewer::start(backend.clone(), id);
        let tasks = vec![
            crate::write_thread::spawn_on(
                backend.writes_on_write_thread(),
                writer::run(backend.clone(), id, name.to_string(), hub.clone(), queue),
            ),
            renewals,
        ];
        Ok(Arc::new(Keyspace {
            name: name.to_string(),
            id,
            backend,
            writer: sender,
            hub,
            limits,
            identity,
            tasks,
            watches: AtomicI64::new(0),
            renewals: std::sync::Mutex::new(HashMap::new()),
            renewer,
            keep_alive_rate: RateLimit::new(limits.keepalives_per_second),
            repeated_keep_alive_rate: RateLimit::new(limits.repeated_keepalives_per_second),
            read_budget: WorkBudget::new(limits.read_rows_per_second),
            write_budget: WorkBudget::new(limits.write_bytes_per_second),
            last_use: Default::default(),
            read_ahead: Default::default(),
            successor: std::sync::Mutex::new(None),
        }))
    }

    /// Adds `delta` to the count of open watchers.
    pub fn watch_count(&self, delta: i64) {
        self.watches.fetch_add(delta, Ordering::AcqRel);
    }

    /// Watchers open on this keyspace in this process.
    pub fn watches(&self) -> i64 {
        self.watches.load(Ordering::Acquire)
    }

    /// Becomes `true` when the keyspace is deleted.
    pub fn closed(&self) -> tokio::sync::watch::Receiver<bool> {
        self.hub.closed()
    }

    /// Ends every watch and keep-alive stream of this keyspace (it was deleted).
    pub fn close(&self) {
        self.hub.close();
    }

    /// The tenant moved to `next` (another datastore, served by this process): streams of
    /// this keyspace carry on there.
    pub fn move_to(&self, next: Arc<Keyspace>) {
        *self.successor.lock().unwrap_or_else(|e| e.into_inner()) = Some(next);
        self.close();
    }

    /// Where the tenant moved inside this process, if it did.
    pub fn successor(&self) -> Option<Arc<Keyspace>> {
        self.successor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether the keyspace was deleted (here or, as its requests found out, elsewhere).
    pub fn is_closed(&self) -> bool {
        self.hub.is_closed()
    }

    /// Closes the keyspace when `result` shows another process deleted it, so the tenant
    /// registry resolves the tenant afresh on its next request.
    fn noticed<T>(&self, result: Result<T>) -> Result<T> {
        if matches!(result, Err(KineError::KeyspaceDeleted)) {
            self.close();
        }
        result
    }

    /// Freezes (or unfreezes) the keyspace through its writer: once this returns, no write of
    /// any process sharing the datastore lands until it is unfrozen. Idempotent.
    pub async fn set_frozen(&self, frozen: bool) -> Result<()> {
        self.write(WriteOp::SetFrozen { frozen }).await.map(|_| ())
    }

    /// Sets the keyspace's quota.
    pub async fn set_quota(&self, quota: Quota) -> Result<()> {
        self.write(WriteOp::SetQuota { quota }).await.map(|_| ())
    }

    /// Revokes lease `id` if it is still expired under the keyspace lock (and the keyspace is
    /// not frozen): several processes may race, and each lease expires once.
    /// A lease whose stored deadline passed while this process had answered a keep-alive
    /// from memory promising longer is renewed instead (as etcd, which extends leases rather
    /// than expire one early).
    pub async fn expire_lease(&self, id: i64) -> Result<()> {
        if let Some(remembered) = self
            .remembered_renewal(id)
            .filter(|r| r.promised_deadline() > now_ms())
        {
            // Stored as renewed when the last answer was given: exactly the promised deadline
            // (the stored one is later than that moment, so the renewal applies).
            let renewed = self
                .backend
                .renew_leases(self.id, &[id], remembered.answered_at)
                .await?;
            // Remembered as stored at that moment, so the promise is now the stored deadline
            // and the lease expires once it passes.
            let renewed = renewed.into_iter().flatten().next();
            self.remember_renewal(id, remembered.answered_at, renewed);
            return Ok(());
        }
        self.forget_renewal(id);
        self.write(WriteOp::LeaseExpire { id }).await.map(|_| ())
    }

    /// The keyspace's name (the tenant).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The keyspace's id in its datastore.
    pub fn id(&self) -> KeyspaceId {
        self.id
    }

    /// The datastore.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The watch hub.
    pub fn hub(&self) -> &Arc<WatchHub> {
        &self.hub
    }

    /// The request limits.
    pub fn limits(&self) -> &RequestLimits {
        &self.limits
    }

    /// A complete response header at `revision`.
    pub fn header(&self, revision: Revision) -> ResponseHeader {
        ResponseHeader {
            cluster_id: self.identity.cluster_id,
            member_id: self.identity.member_id,
            revision,
            raft_term: self.identity.raft_term,
        }
    }

    fn fill(&self, header: &mut Option<ResponseHeader>, revision: Revision) {
        let revision = header.as_ref().map_or(revision, |h| h.revision);
        *header = Some(self.header(revision));
    }

    /// The keyspace's counters.
    pub async fn state(&self) -> Result<KeyspaceState> {
        self.noticed(self.backend.state(self.id).await)
    }

    async fn write(&self, op: WriteOp) -> Result<WriteOutcome> {
        let (reply, outcome) = oneshot::channel();
        self.writer
            .send(WriteCommand { op, reply })
            .await
            .map_err(|_| KineError::Stopped)?;
        self.noticed(outcome.await.map_err(|_| KineError::Stopped)?)
    }

    fn check_size(&self, request: &impl Message) -> Result<()> {
        if request.encoded_len() > self.limits.max_request_bytes {
            return Err(KineError::RequestTooLarge);
        }
        Ok(())
    }

    /// Waits while the tenant owes work on either budget (`--max-read-rows-per-second`,
    /// `--max-write-bytes-per-second`): a tenant in debt is slowed in whatever it asks next.
    async fn wait_for_budgets(&self) {
        if let Some(budget) = &self.read_budget {
            budget.wait().await;
        }
        if let Some(budget) = &self.write_budget {
            budget.wait().await;
        }
    }

    /// Charges rows read: by a request, or events sent to the tenant's watchers (each a row
    /// encoded and sent, so a writer fanned out to thousands of watchers pays for them).
    pub fn charge_rows_read(&self, rows: u64) {
        if let Some(budget) = &self.read_budget {
            budget.charge(rows.max(1));
        }
    }

    /// Waits while the tenant is in debt, then charges this write's bytes.
    async fn spend_write_budget(&self, request: &impl Message) {
        self.wait_for_budgets().await;
        if let Some(budget) = &self.write_budget {
            budget.charge(request.encoded_len() as u64);
        }
    }

    /// etcd's Range.
    pub async fn range(&self, request: RangeRequest) -> Result<RangeResponse> {
        range::check(&request)?;
        self.wait_for_budgets().await;
        let rows = match self.read_ahead.take(&request).await {
            Some(rows) => self.read_ahead_now(rows, request.revision).await?,
            None => {
                let key_range = KeyRange::new(request.key.clone(), request.range_end.clone());
                self.noticed(
                    self.backend
                        .range(self.id, range::query(&request, &key_range))
                        .await,
                )?
            }
        };
        self.charge_rows_read(rows_read(rows.kvs.len(), rows.count));
        // The revision the page was read at: the one asked for, or the current one.
        let read_at = if request.revision > 0 {
            request.revision
        } else {
            rows.revision
        };
        let mut response = range::finish(&request, rows);
        self.read_ahead
            .start(&self.backend, self.id, &request, &response, read_at);
        self.fill(&mut response.header, 0);
        Ok(response)
    }

    /// A page read ahead at `revision`, answered as a read now would be: the keyspace's
    /// current revision in its header, and `Compacted` if a compaction passed `revision`
    /// since it was read.
    async fn read_ahead_now(&self, mut rows: RangeRows, revision: i64) -> Result<RangeRows> {
        let state = self.noticed(self.backend.state(self.id).await)?;
        if revision < state.compact_revision {
            return Err(KineError::Compacted);
        }
        rows.revision = state.revision;
        Ok(rows)
    }

    /// etcd's Put.
    pub async fn put(&self, request: PutRequest) -> Result<PutResponse> {
        txn::check_put(&request)?;
        self.check_size(&request)?;
        self.spend_write_budget(&request).await;
        let response = self.single(Request::RequestPut(request), true).await?;
        match response {
            Response::ResponsePut(mut put) => {
                self.fill(&mut put.header, 0);
                Ok(put)
            }
            _ => Err(KineError::Storage("unexpected put response".into())),
        }
    }

    /// etcd's DeleteRange.
    pub async fn delete_range(&self, request: DeleteRangeRequest) -> Result<DeleteRangeResponse> {
        txn::check_delete(&request)?;
        self.check_size(&request)?;
        self.spend_write_budget(&request).await;
        match self
            .single(Request::RequestDeleteRange(request), false)
            .await?
        {
            Response::ResponseDeleteRange(mut delete) => {
                self.charge_rows_read(u64::try_from(delete.deleted).unwrap_or(0));
                self.fill(&mut delete.header, 0);
                Ok(delete)
            }
            _ => Err(KineError::Storage("unexpected delete response".into())),
        }
    }

    async fn single(&self, request: Request, plain_put: bool) -> Result<Response> {
        let txn = TxnRequest {
            compare: Vec::new(),
            success: vec![RequestOp {
                request: Some(request),
            }],
            failure: Vec::new(),
        };
        match self
            .write(WriteOp::Txn {
                request: txn,
                plain_put,
                pre_reads: None,
            })
            .await?
        {
            WriteOutcome::Txn(mut response) => response
                .responses
                .pop()
                .and_then(|op| op.response)
                .ok_or_else(|| KineError::Storage("empty transaction response".into())),
            _ => Err(KineError::Storage("unexpected write outcome".into())),
        }
    }

    /// etcd's Txn.
    pub async fn txn(&self, request: TxnRequest) -> Result<TxnResponse> {
        txn::check_txn(&request, &self.limits)?;
        self.check_size(&request)?;
        self.spend_write_budget(&request).await;
        // Wide reads happen here, outside the keyspace's write lock; the writer only catches
        // them up (see `crate::txn`).
        let pre_reads = txn::pre_read(&*self.backend, self.id, &request).await;
        let pre_read_rows = pre_reads.as_ref().map_or(0, txn::PreReads::rows_read);
        let outcome = self
            .write(WriteOp::Txn {
                request,
                plain_put: false,
                pre_reads,
            })
            .await;
        let response = match outcome {
            Ok(WriteOutcome::Txn(response)) => Ok(response),
            Ok(_) => Err(KineError::Storage("unexpected write outcome".into())),
            Err(error) => Err(error),
        };
        // What the writer read itself (narrow reads, or a wide one it had to redo) shows in
        // the answer's ranges; the wide reads made before it, in the pre-reads.
        if self.read_budget.is_some() {
            let answered_rows = response.as_ref().map_or(0, txn_rows_read);
            self.charge_rows_read(pre_read_rows.max(answered_rows));
        }
        let mut response = response?;
        self.fill(&mut response.header, 0);
        Ok(response)
    }

    /// etcd's Compact; with `physical`, answers once the compacted rows are purged, and
    /// fails when purging them failed (the compaction itself stands; the next one purges).
    pub async fn compact(&self, request: CompactionRequest) -> Result<ResponseHeader> {
        let revision = match self
            .write(WriteOp::Compact {
                revision: request.revision,
                physical: request.physical,
            })
            .await?
        {
            WriteOutcome::Done(revision) => revision,
            _ => return Err(KineError::Storage("unexpected write outcome".into())),
        };
        if request.physical {
            self.noticed(writer::purge(&*self.backend, self.id, request.revision).await)?;
        }
        Ok(self.header(revision))
    }

    /// etcd's LeaseGrant: TTLs below etcd's minimum are raised to it.
    pub async fn lease_grant(&self, request: LeaseGrantRequest) -> Result<LeaseRecord> {
        if request.ttl > MAX_LEASE_TTL {
            return Err(KineError::LeaseTtlTooLarge);
        }
        let ttl = request.ttl.max(MIN_LEASE_TTL);
        // Id 0 asks the writer for a new id (under the keyspace lock); any other is the
        // client's choice.
        match self
            .write(WriteOp::LeaseGrant {
                id: request.id,
                ttl,
                max_leases: self.limits.max_leases_per_tenant,
            })
            .await?
        {
            WriteOutcome::LeaseGranted(lease) => Ok(lease),
            _ => Err(KineError::Storage("unexpected write outcome".into())),
        }
    }

    /// etcd's LeaseRevoke: deletes the attached keys in one revision.
    pub async fn lease_revoke(&self, id: i64) -> Result<ResponseHeader> {
        self.forget_renewal(id);
        match self.write(WriteOp::LeaseRevoke { id }).await? {
            WriteOutcome::Done(revision) => Ok(self.header(revision)),
            _ => Err(KineError::Storage("unexpected write outcome".into())),
        }
    }

    /// Renews a lease; `None` when it does not exist (or has expired).
    ///
    /// A keep-alive within a tenth of the TTL (at most 5 s) of the last one this process
    /// stored is answered without a write, as etcd renews in memory: a client flooding
    /// keep-alives costs the datastore at most one write per window per lease, not one per
    /// message. The stored deadline is then less than that window short of what the client
    /// was told: this process's LeaseTimeToLive answers the promised deadline, and its expiry
    /// renews a lease it promised longer; a revoke through another process shows here within
    /// the window.
    pub async fn lease_keep_alive(&self, id: i64) -> Result<Option<LeaseRecord>> {
        let now = now_ms();
        if let Some(lease) = self.answer_from_memory(id, now) {
            return Ok(Some(lease));
        }
        let renewed = self.renewer.renew(id).await?;
        self.remember_renewal(id, now, renewed);
        Ok(renewed)
    }

    /// The lease as this process stored it, if that was within the coalescing window; the
    /// answer is recorded as a promise.
    fn answer_from_memory(&self, id: i64, now: i64) -> Option<LeaseRecord> {
        let mut renewals = self.renewals.lock().unwrap_or_else(|e| e.into_inner());
        let remembered = renewals.get_mut(&id).filter(|r| r.within_window(now))?;
        remembered.answered_at = now;
        Some(remembered.lease)
    }

    /// Whether a keep-alive of `id` at `now` falls within the coalescing window of its last
    /// renewal here: a repeat no client keeping its lease alive sends.
    fn repeats_renewal(&self, id: i64, now: i64) -> bool {
        let renewals = self.renewals.lock().unwrap_or_else(|e| e.into_inner());
        renewals.get(&id).is_some_and(|r| r.within_window(now))
    }

    /// Records a renewal stored at `now` (`None`: the lease is gone).
    fn remember_renewal(&self, id: i64, now: i64, renewed: Option<LeaseRecord>) {
        let mut renewals = self.renewals.lock().unwrap_or_else(|e| e.into_inner());
        let Some(lease) = renewed else {
            renewals.remove(&id);
            return;
        };
        if renewals.len() >= MAX_REMEMBERED_RENEWALS {
            // Only a flood over 100,000 leases gets here; the promises dropped are those of
            // renewals stored longer ago than their window.
            renewals.retain(|_, r| r.within_window(now));
        }
        if renewals.len() < MAX_REMEMBERED_RENEWALS {
            renewals.insert(
                id,
                RememberedRenewal {
                    stored_at: now,
                    answered_at: now,
                    lease,
                },
            );
        }
    }

    fn remembered_renewal(&self, id: i64) -> Option<RememberedRenewal> {
        let renewals = self.renewals.lock().unwrap_or_else(|e| e.into_inner());
        renewals.get(&id).copied()
    }

    /// Forgets a lease's last renewal (it was revoked or expired here).
    fn forget_renewal(&self, id: i64) {
        let mut renewals = self.renewals.lock().unwrap_or_else(|e| e.into_inner());
        renewals.remove(&id);
    }

    /// A lease and, when asked, its keys.
    pub async fn lease_time_to_live(
        &self,
        id: i64,
        keys: bool,
    ) -> Result<Option<(LeaseRecord, Vec<Bytes>)>> {
        let Some(mut lease) = self.backend.lease(self.id, id).await? else {
            return Ok(None);
        };
        // A keep-alive this process answered from memory promised more than is stored.
        if let Some(remembered) = self.remembered_renewal(id) {
            lease.expires_at_ms = lease.expires_at_ms.max(remembered.promised_deadline());
        }
        let keys = if keys {
            self.backend.lease_keys(self.id, id).await?
        } else {
            Vec::new()
        };
        Ok(Some((lease, keys)))
    }

    /// Every lease.
    pub async fn leases(&self) -> Result<Vec<LeaseRecord>> {
        self.backend.leases(self.id).await
    }
}

/// Rows a range read made the datastore read: its count when it returned fewer (a limit, or
/// count only), since the count was read too.
fn rows_read(returned: usize, count: i64) -> u64 {
    (returned as u64).max(u64::try_from(count).unwrap_or(0))
}

/// Rows the range operations of a transaction's answer read, nested ones included.
fn txn_rows_read(response: &TxnResponse) -> u64 {
    response
        .responses
        .iter()
        .map(|op| match &op.response {
            Some(Response::ResponseRange(range)) => rows_read(range.kvs.len(), range.count),
            Some(Response::ResponseTxn(nested)) => txn_rows_read(nested),
            Some(Response::ResponseDeleteRange(delete)) => {
                u64::try_from(delete.deleted).unwrap_or(0)
            }
            _ => 0,
        })
        .sum()
}

/// The database-backed served tenant. Inherent methods of the same name do the work; these
/// shape etcd's responses around them.
#[async_trait::async_trait]
impl ServedTenant for Keyspace {
    fn name(&self) -> &str {
        &self.name
    }

    async fn range(&self, request: RangeRequest) -> Result<RangeResponse> {
        Keyspace::range(self, request).await
    }

    async fn put(&self, request: PutRequest) -> Result<PutResponse> {
        Keyspace::put(self, request).await
    }

    async fn delete_range(&self, request: DeleteRangeRequest) -> Result<DeleteRangeResponse> {
        Keyspace::delete_range(self, request).await
    }

    async fn txn(&self, request: TxnRequest) -> Result<TxnResponse> {
        Keyspace::txn(self, request).await
    }

    async fn compact(&self, request: CompactionRequest) -> Result<CompactionResponse> {
        let header = Keyspace::compact(self, request).await?;
        Ok(CompactionResponse {
            header: Some(header),
        })
    }

    async fn lease_grant(&self, request: LeaseGrantRequest) -> Result<LeaseGrantResponse> {
        let lease = Keyspace::lease_grant(self, request).await?;
        let revision = self.state().await?.revision;
        Ok(LeaseGrantResponse {
            header: Some(self.header(revision)),
            id: lease.id,
            ttl: lease.ttl,
            error: String::new(),
        })
    }

    async fn lease_revoke(&self, id: i64) -> Result<LeaseRevokeResponse> {
        let header = Keyspace::lease_revoke(self, id).await?;
        Ok(LeaseRevokeResponse {
            header: Some(header),
        })
    }

    async fn admit_keep_alive(&self, id: i64) {
        if let Some(rate) = &self.repeated_keep_alive_rate
            && self.repeats_renewal(id, now_ms())
        {
            rate.admit().await;
        }

        if let Some(rate) = &self.keep_alive_rate {
            rate.admit().await;
        }
    }

    async fn lease_keep_alive(&self, id: i64) -> Result<LeaseKeepAliveResponse> {
        let lease = Keyspace::lease_keep_alive(self, id).await?;
        Ok(LeaseKeepAliveResponse {
            header: Some(self.header(self.hub.known_revision())),
            id,
            ttl: lease.map_or(0, |lease| lease.ttl),
        })
    }

    async fn lease_time_to_live(
        &self,
        request: LeaseTimeToLiveRequest,
    ) -> Result<LeaseTimeToLiveResponse> {
        let found = Keyspace::lease_time_to_live(self, request.id, request.keys).await?;
        let header = Some(self.header(self.hub.known_revision()));
        Ok(match found {
            Some((lease, keys)) => LeaseTimeToLiveResponse {
                header,
                id: lease.id,
                ttl: lease.remaining_seconds(now_ms()),
                granted_ttl: lease.ttl,
                keys,
            },
            // etcd answers an unknown lease with TTL -1 rather than an error.
            None => LeaseTimeToLiveResponse {
                header,
                id: request.id,
                ttl: -1,
                granted_ttl: 0,
                keys: Vec::new(),
            },
        })
    }

    async fn lease_leases(&self) -> Result<LeaseLeasesResponse> {
        let leases = Keyspace::leases(self).await?;
        Ok(LeaseLeasesResponse {
            header: Some(self.header(self.hub.known_revision())),
            leases: leases
                .into_iter()
                .map(|lease| LeaseStatus { id: lease.id })
                .collect(),
        })
    }

    async fn watch(
        self: Arc<Self>,
        requests: WatchRequests,
        responses: WatchResponses,
        progress_interval: Duration,
    ) {
        WatchStream::new(self, responses, progress_interval)
            .run(requests)
            .await;
    }

    async fn header(&self) -> Result<ResponseHeader> {
        Ok(self.header(self.hub.known_revision()))
    }

    async fn status(&self, whole_datastore: bool) -> Result<StatusFacts> {
        let state = self.state().await?;
        let (db_size, db_size_in_use) = if whole_datastore {
            self.backend.size().await?
        } else {
            (state.bytes, state.bytes)
        };
        Ok(StatusFacts {
            header: self.header(state.revision),
            db_size,
            db_size_in_use,
        })
    }

    async fn defragment(&self, whole_datastore: bool) -> Result<()> {
        // A tenant of a shared datastore does not get to rewrite everyone's tables.
        if whole_datastore {
            self.backend.defragment().await?;
        }
        Ok(())
    }

    async fn set_frozen(&self, frozen: bool) -> Result<()> {
        Keyspace::set_frozen(self, frozen).await
    }

    async fn set_quota(&self, quota: Quota) -> Result<()> {
        Keyspace::set_quota(self, quota).await
    }

    async fn moved(&self) -> Result<bool> {
        Ok(self.state().await?.migration == MigrationRole::Moved)
    }

    fn successor(&self) -> Option<Arc<dyn ServedTenant>> {
        Keyspace::successor(self).map(|next| next as Arc<dyn ServedTenant>)
    }
}
