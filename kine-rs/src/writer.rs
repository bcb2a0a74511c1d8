//! The write path of one keyspace: a task that takes write requests from a queue and applies
//! as many as are waiting in one database transaction (group commit).
//!
//! Each etcd transaction keeps its own revision; all of them become durable together, and
//! none is acknowledged before the database commit returns. One bad request only fails
//! itself: requests are fully checked before they write, so the rest of the batch commits.
//!
//! Where the datastore allows it (NATS, [`WriteTxn::commit_pipelined`]), the next batch is
//! evaluated and sent while the previous one's commit is still on its way; answers and
//! watchers still follow commits in revision order, and a batch whose commit lost a race is
//! evaluated again on its own after the batches before it have settled.

use std::sync::Arc;

use bytes::Bytes;
use kine_proto::etcdserverpb::{TxnRequest, TxnResponse};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::error::{KineError, Result};
use crate::model::{LeaseRecord, Revision, now_ms};
use crate::storage::{
    Backend, BatchKeys, KeyspaceId, KeyspaceState, MigrationRole, PendingCommit, Quota, WriteTxn,
};
use crate::txn::{Applier, PreReads, created_keys, has_writes, point_keys, put_costs};
use crate::watch::hub::{EventLog, WatchHub};

/// Most requests that share one database transaction.
const MAX_BATCH: usize = 256;
/// How often a batch that lost a commit race to another process is evaluated again. Each
/// retry first waits a random pause below a bound that doubles up to 32 ms, so two processes
/// that keep colliding fall out of step.
const MAX_CONFLICT_RETRIES: u32 = 64;
/// Rows one purge step removes after a compaction, so writers never wait long.
const PURGE_BATCH: i64 = 500;
/// How long the purge leaves the keyspace's lock to its writers after each step, as a
/// multiple of the step's own time: a purge holds the lock at most a quarter of the time.
/// Steps back to back (only a yield between them) made every write batch queue behind one:
/// puts at 128 clients on PostgreSQL fell from 11,400/s to 2,500/s (p99 45 → 106 ms) while a
/// million superseded rows were purged. etcd paces its compaction too (batches of 1,000 keys,
/// 10 ms apart).
const PURGE_IDLE_FACTOR: u32 = 3;

/// A write request.
#[derive(Debug)]
pub enum WriteOp {
    /// A transaction; plain Put and DeleteRange come as one-operation transactions, with
    /// `plain_put` set for a Put so errors come in etcd's order for it.
    Txn {
        request: TxnRequest,
        plain_put: bool,
        /// Its wide reads, made before it reached the writer ([`crate::txn::pre_read`]).
        pre_reads: Option<PreReads>,
    },
    /// Compacts at `revision`. Without `physical`, the writer purges the compacted rows in
    /// the background; with it, the caller purges them before it answers.
    Compact {
        revision: Revision,
        physical: bool,
    },
    /// Grants lease `id`, or a new id ([`new_lease_id`]) when `id` is 0.
    LeaseGrant {
        id: i64,
        ttl: i64,
        /// Most leases the keyspace may hold (`--max-leases-per-tenant`).
        max_leases: i64,
    },
    LeaseRevoke {
        id: i64,
    },
    /// Revokes the lease if it is still expired when the write lock is held (exactly once,
    /// whichever process gets there first). Skipped while frozen: expiry pauses.
    LeaseExpire {
        id: i64,
    },
    /// Freezes or unfreezes the keyspace (idempotent). Taking the keyspace lock orders it
    /// with every write of every process: none lands after a freeze has committed.
    SetFrozen {
        frozen: bool,
    },
    /// Sets the keyspace's quota.
    SetQuota {
        quota: Quota,
    },
}

/// What a write request produced.
#[derive(Debug)]
pub enum WriteOutcome {
    Txn(TxnResponse),
    /// Any other request: the keyspace revision after it.
    Done(Revision),
    LeaseGranted(LeaseRecord),
}

/// A request on its way to the writer task, with where to send its outcome.
pub struct WriteCommand {
    pub op: WriteOp,
    pub reply: oneshot::Sender<Result<WriteOutcome>>,
}

/// A short, spread pause before retrying a batch that lost a commit race: up to
/// `2^min(n, 5)` ms after the `n`th conflict, so racing processes do not retry in lockstep.
fn conflict_pause(conflicts: u32) -> std::time::Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::from(d.subsec_nanos()))
        .unwrap_or(0);
    let bound = 1u64 << conflicts.min(5);
    std::time::Duration::from_millis((nanos ^ u64::from(std::process::id())) % (bound + 1))
}

/// A batch whose commit is on its way.
struct Flying {
    commands: Vec<WriteCommand>,
    applied: Applied,
    purge_at: Option<Revision>,
    ack: PendingCommit,
}

/// What evaluating a batch produced.
struct Applied {
    outcomes: Vec<Result<WriteOutcome>>,
    /// The keyspace's revision before the batch, and after it.
    after: Revision,
    revision: Revision,
    /// The events of its writes, for the watch hub ([`EventLog`]).
    events: Option<Vec<crate::model::Event>>,
}

/// What the writer waits for next.
enum Next {
    Command(Option<WriteCommand>),
    Acked(Result<()>),
}

/// The writer of one keyspace, and what it keeps between batches.
struct Writer {
    backend: Arc<dyn Backend>,
    keyspace: KeyspaceId,
    tenant: String,
    hub: Arc<WatchHub>,
    /// The last lease id this writer chose (see [`new_lease_id`]).
    last_lease_id: i64,
}

impl Drop for Writer {
    /// A writer that stops leaves no commit for the hub to wait for.
    fn drop(&mut self) {
        self.hub.settled(None);
    }
}

/// Runs the writer of `keyspace` until every sender is gone.
pub async fn run(
    backend: Arc<dyn Backend>,
    keyspace: KeyspaceId,
    tenant: String,
    hub: Arc<WatchHub>,
    mut queue: mpsc::Receiver<WriteCommand>,
) {
    let mut writer = Writer {
        backend,
        keyspace,
        tenant,
        hub,
        last_lease_id: 0,
    };
    let mut flying: Option<Flying> = None;
    // Requests that came while a batch was in flight: they go together once it settles (one
    // message, one sync), or on top of it when they fill a batch.
    let mut waiting: Vec<WriteCommand> = Vec::with_capacity(MAX_BATCH);
    let mut closed = false;
    loop {
        if flying.is_none() && waiting.is_empty() {
            match queue.recv().await {
                Some(command) => waiting.push(command),
                None => break,
            }
        }
        while waiting.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(command) => waiting.push(command),
                Err(_) => break,
            }
        }
        if let Some(batch) = flying.as_mut()
            && waiting.len() < MAX_BATCH
        {
            let next = if closed {
                Next::Acked((&mut batch.ack).await)
            } else {
                tokio::select! {
                    biased;
                    acked = &mut batch.ack => Next::Acked(acked),
                    command = queue.recv() => Next::Command(command),
                }
            };
            match next {
                Next::Acked(acked) => {
                    if let Some(batch) = flying.take() {
                        writer.settle(batch, acked).await;
                    }
                }
                Next::Command(Some(command)) => {
                    waiting.push(command);
                    continue;
                }
                Next::Command(None) => {
                    closed = true;
                    continue;
                }
            }
        }
        if waiting.is_empty() {
            if closed {
                break;
            }
            continue;
        }
        let commands = std::mem::replace(&mut waiting, Vec::with_capacity(MAX_BATCH));
        crate::metrics::write_batch(commands.len());
        let mut purge_at = None;
        let attempt = writer.send(&commands, &mut purge_at).await;
        // The batch below settles first: answers and watchers go in revision order.
        if let Some(batch) = flying.take() {
            let acked = batch.ack.await;
            let batch = Flying {
                ack: Box::pin(std::future::ready(Ok(()))),
                ..batch
            };
            writer.settle(batch, acked).await;
        }
        match attempt {
            Ok((applied, ack)) => {
                flying = Some(Flying {
                    commands,
                    applied,
                    purge_at,
                    ack,
                });
            }
            Err(error) => {
                let result = match error {
                    KineError::Conflict(_) => writer.commit_alone(&commands, &mut purge_at).await,
                    error => Err(error),
                };
                writer.deliver(commands, result, purge_at);
            }
        }
    }
    if let Some(batch) = flying.take() {
        let acked = batch.ack.await;
        let batch = Flying {
            ack: Box::pin(std::future::ready(Ok(()))),
            ..batch
        };
        writer.settle(batch, acked).await;
    }
}

impl Writer {
    /// Evaluates a batch on a group transaction and starts its commit.
    async fn send(
        &mut self,
        commands: &[WriteCommand],
        purge_at: &mut Option<Revision>,
    ) -> Result<(Applied, PendingCommit)> {
        // Batches of transactions only may be read without the keyspace lock held across
        // their round trips (PostgreSQL: one read, one commit call); a conflict runs the batch
        // again under it (`commit_alone`).
        let optimistic = commands
            .iter()
            .all(|command| matches!(command.op, WriteOp::Txn { .. }));
        let txn = self
            .backend
            .begin_group_write(self.keyspace, &batch_keys(commands), optimistic)
            .await?;
        let (txn, applied) = self.evaluate(txn, commands, purge_at).await?;
        self.hub.writing(applied.revision);
        let ack = txn.commit_pipelined(applied.revision).await?;
        Ok((applied, ack))
    }

    /// Finishes a batch whose commit has come back: answers it, or evaluates it again on its
    /// own when the commit lost a race.
    async fn settle(&mut self, batch: Flying, acked: Result<()>) {
        let Flying {
            commands,
            applied,
            mut purge_at,
            ..
        } = batch;
        let result = match acked {
            Ok(()) => Ok(applied),
            Err(KineError::Conflict(_)) => self.commit_alone(&commands, &mut purge_at).await,
            Err(error) => Err(error),
        };
        self.deliver(commands, result, purge_at);
    }

    /// Evaluates and commits a batch on a transaction of its own, again after each lost
    /// commit race (another process committed first: nothing was written, and the batch is
    /// evaluated again on the new state, like a client's own retry would be).
    async fn commit_alone(
        &mut self,
        commands: &[WriteCommand],
        purge_at: &mut Option<Revision>,
    ) -> BatchResult {
        let mut conflicts = 0;
        loop {
            *purge_at = None;
            let attempt = async {
                let mut txn = self.backend.begin_write(self.keyspace).await?;
                txn.prefetch(&batch_keys(commands).all).await?;
                let (txn, applied) = self.evaluate(txn, commands, purge_at).await?;
                self.hub.writing(applied.revision);
                txn.commit(applied.revision).await?;
                Ok(applied)
            }
            .await;
            match attempt {
                Err(KineError::Conflict(_)) if conflicts < MAX_CONFLICT_RETRIES => {
                    conflicts += 1;
                    tokio::time::sleep(conflict_pause(conflicts)).await;
                }
                outcome => return outcome,
            }
        }
    }

    /// Answers every request of a batch and tells the watchers; schedules the purge after a
    /// compaction.
    fn deliver(
        &self,
        commands: Vec<WriteCommand>,
        result: BatchResult,
        mut purge_at: Option<Revision>,
    ) {
        match result {
            Ok(applied) => {
                let revision = applied.revision;
                self.hub
                    .committed_events(applied.after, revision, applied.events);
                self.hub.settled(Some(revision));
                for (command, outcome) in commands.into_iter().zip(applied.outcomes) {
                    let _ = command.reply.send(outcome);
                }
            }
            Err(error) => {
                self.hub.settled(None);
                warn!(%error, "write transaction failed");
                for command in commands {
                    let _ = command.reply.send(Err(error.clone()));
                }
                purge_at = None;
            }
        }
        if let Some(revision) = purge_at {
            let backend = self.backend.clone();
            let keyspace = self.keyspace;
            tokio::spawn(async move {
                if let Err(error) = purge(&*backend, keyspace, revision).await {
                    warn!(%error, revision, "purging compacted history failed; the next compaction retries");
                }
            });
        }
    }

    /// Applies every request of a batch to `txn` (its keys prefetched, [`batch_keys`]), each
    /// with its own revision.
    async fn evaluate(
        &mut self,
        mut txn: Box<dyn WriteTxn>,
        commands: &[WriteCommand],
        purge_at: &mut Option<Revision>,
    ) -> Result<(Box<dyn WriteTxn>, Applied)> {
        let after = txn.state().revision;
        let mut revision = after;
        let mut sub = 0i64;
        let mut outcomes = Vec::with_capacity(commands.len());
        // Recorded only while someone watches the keyspace.
        let mut events = EventLog::new(self.hub.running());
        for command in commands {
            let outcome = apply_one(
                &mut *txn,
                &self.tenant,
                &command.op,
                Cursor {
                    revision: &mut revision,
                    sub: &mut sub,
                    events: &mut events,
                },
                purge_at,
                &mut self.last_lease_id,
            )
            .await;
            match outcome {
                Err(error) if error.is_datastore_failure() => return Err(error),
                outcome => outcomes.push(outcome),
            }
        }
        Ok((
            txn,
            Applied {
                outcomes,
                after,
                revision,
                events: events.into_events(),
            },
        ))
    }
}

/// Removes the rows a compaction made unreachable, one bounded batch at a time, until none
/// is left; stops at the first failure.
pub async fn purge(backend: &dyn Backend, keyspace: KeyspaceId, revision: Revision) -> Result<()> {
    loop {
        let started = std::time::Instant::now();
        if backend
            .purge_compacted(keyspace, revision, PURGE_BATCH)
            .await?
            == 0
        {
            return Ok(());
        }
        tokio::time::sleep(started.elapsed() * PURGE_IDLE_FACTOR).await;
    }
}

type BatchResult = Result<Applied>;

/// Where a batch stands while its requests are applied one by one: the revision so far, the
/// next row's position in it, and the events written.
struct Cursor<'a> {
    revision: &'a mut Revision,
    sub: &'a mut i64,
    events: &'a mut EventLog,
}

/// The keys a batch's transactions name, to look up in one go before it is applied.
fn batch_keys(commands: &[WriteCommand]) -> BatchKeys {
    let mut keys = BatchKeys::default();
    // Keys some request names without creating them: not taken for absent.
    let mut others: Vec<Bytes> = Vec::new();
    for command in commands {
        if let WriteOp::Txn {
            request, plain_put, ..
        } = &command.op
        {
            let first = keys.all.len();
            point_keys(request, &mut keys.all);
            let mut created = Vec::new();
            created_keys(request, *plain_put, &mut created);
            others.extend(
                keys.all[first..]
                    .iter()
                    .filter(|key| !created.contains(key))
                    .cloned(),
            );
            keys.created.extend(created);
        }
    }
    if !others.is_empty() {
        keys.created.retain(|key| !others.contains(key));
    }
    keys
}

async fn apply_one(
    txn: &mut dyn WriteTxn,
    tenant: &str,
    op: &WriteOp,
    cursor: Cursor<'_>,
    purge_at: &mut Option<Revision>,
    last_lease_id: &mut i64,
) -> Result<WriteOutcome> {
    let Cursor {
        revision,
        sub,
        events,
    } = cursor;
    let frozen = || KineError::Frozen {
        tenant: tenant.to_string(),
    };
    let state = txn.state();
    if state.migration == MigrationRole::Moved {
        // Writes were frozen before the move; say where the tenant went instead.
        return Err(KineError::TenantMoved {
            tenant: tenant.to_string(),
        });
    }
    match op {
        WriteOp::Txn {
            request,
            plain_put,
            pre_reads,
        } => {
            if state.frozen && has_writes(request) {
                return Err(frozen());
            }
            check_quota(txn, &state, request).await?;
            let mut applier = Applier::new(txn, *revision, sub)
                .with_pre_reads(pre_reads.as_ref())
                .with_events(events);
            let response = applier.txn(request, *plain_put).await?;
            *revision = applier.revision();
            Ok(WriteOutcome::Txn(response))
        }
        WriteOp::Compact {
            revision: at,
            physical,
        } => {
            if state.frozen {
                return Err(frozen());
            }
            if *at <= state.compact_revision {
                return Err(KineError::Compacted);
            }
            if *at > *revision {
                return Err(KineError::FutureRevision);
            }
            if state.pinned_revision > 0 && *at > state.pinned_revision {
                return Err(KineError::CompactionPinned {
                    pinned: state.pinned_revision,
                });
            }
            txn.set_compact_revision(*at).await?;
            if !physical {
                *purge_at = Some(*at);
            }
            Ok(WriteOutcome::Done(*revision))
        }
        WriteOp::LeaseGrant {
            id,
            ttl,
            max_leases,
        } => {
            if state.frozen {
                return Err(frozen());
            }
            // Counted under the keyspace lock, so processes sharing the datastore cannot
            // together pass the limit.
            if txn.lease_count().await? >= *max_leases {
                return Err(KineError::TooManyLeases { max: *max_leases });
            }
            let id = if *id == 0 {
                let id = new_lease_id(txn, *last_lease_id).await?;
                *last_lease_id = id;
                id
            } else {
                *id
            };
            if txn.lease(id).await?.is_some() {
                return Err(KineError::LeaseExists);
            }
            let lease = LeaseRecord {
                id,
                ttl: *ttl,
                expires_at_ms: now_ms().saturating_add(ttl.saturating_mul(1000)),
            };
            txn.insert_lease(lease).await?;
            Ok(WriteOutcome::LeaseGranted(lease))
        }
        WriteOp::LeaseRevoke { id } => {
            if state.frozen {
                return Err(frozen());
            }
            if txn.lease(*id).await?.is_none() {
                return Err(KineError::LeaseNotFound);
            }
            let mut applier = Applier::new(txn, *revision, sub).with_events(events);
            applier.revoke(*id).await?;
            *revision = applier.revision();
            Ok(WriteOutcome::Done(*revision))
        }
        WriteOp::LeaseExpire { id } => {
            let now = now_ms();
            let expired = txn
                .lease(*id)
                .await?
                .is_some_and(|lease| lease.expires_at_ms <= now);
            if !state.frozen && expired && txn.claim_expiry(*id, now).await? {
                let mut applier = Applier::new(txn, *revision, sub).with_events(events);
                applier.revoke(*id).await?;
                *revision = applier.revision();
            }
            Ok(WriteOutcome::Done(*revision))
        }
        WriteOp::SetFrozen { frozen } => {
            txn.set_frozen(*frozen).await?;
            Ok(WriteOutcome::Done(*revision))
        }
        WriteOp::SetQuota { quota } => {
            txn.set_quota(*quota).await?;
            Ok(WriteOutcome::Done(*revision))
        }
    }
}

/// A new lease id for the keyspace, chosen under its write lock: positive, and larger than
/// every id the keyspace has had, as etcd's ids increase, so clients may order leases by id
/// (Txn compares of `lease` with `<` and `>`).
///
/// Leases are deleted when revoked or expired, so the largest existing id alone could hand a
/// revoked id out again; the id is therefore at least the wall clock in microseconds, which
/// has passed every id given out earlier, and above this writer's previous id (several grants
/// in one group commit, a clock that steps back). Across processes on one database, the
/// existing ids order every grant after the live leases; ordering after revoked ones relies
/// on the processes' clocks agreeing within the time between the revoke and the next grant.
async fn new_lease_id(txn: &mut dyn WriteTxn, last: i64) -> Result<i64> {
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |since| {
            i64::try_from(since.as_micros()).unwrap_or(i64::MAX)
        });
    let max = txn.max_lease_id().await?;
    let mut id = clock
        .max(last.saturating_add(1))
        .max(max.saturating_add(1))
        .max(1);
    // Only when a client chose the largest id: no id is above it, so take a free one.
    while max == i64::MAX && txn.lease(id).await?.is_some() {
        id = if id == i64::MAX { 1 } else { id + 1 };
    }
    Ok(id)
}

/// Refuses a transaction that could take the keyspace over its quota, before it writes, as
/// etcd refuses a request that could exceed `--quota-backend-bytes`: the bytes of every put
/// (of both branches) are counted as added, and every put of a key that is not live as a new
/// key. Deletes and transactions without puts always pass, so a tenant over its quota can
/// free space.
async fn check_quota(
    txn: &mut dyn WriteTxn,
    state: &KeyspaceState,
    request: &TxnRequest,
) -> Result<()> {
    let quota = state.quota;
    if quota.keys <= 0 && quota.bytes <= 0 {
        return Ok(());
    }
    let puts = put_costs(request);
    if puts.is_empty() {
        return Ok(());
    }
    if quota.bytes > 0 {
        let added: i64 = puts.iter().map(|(_, bytes)| *bytes).sum();
        if state.bytes.saturating_add(added) > quota.bytes {
            return Err(KineError::NoSpace);
        }
    }
    if quota.keys > 0 {
        let mut new_keys = 0i64;
        let mut seen = std::collections::HashSet::new();
        for (key, _) in &puts {
            if seen.insert(key.clone()) && txn.get(key).await?.is_none() {
                new_keys += 1;
            }
        }
        if state.keys.saturating_add(new_keys) > quota.keys {
            return Err(KineError::NoSpace);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use kine_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
    use kine_proto::etcdserverpb::request_op::Request;
    use kine_proto::etcdserverpb::{Compare, PutRequest, RequestOp};

    use super::*;

    fn command(request: TxnRequest, plain_put: bool) -> WriteCommand {
        WriteCommand {
            op: WriteOp::Txn {
                request,
                plain_put,
                pre_reads: None,
            },
            reply: oneshot::channel().0,
        }
    }

    fn put(key: &'static str) -> TxnRequest {
        TxnRequest {
            success: vec![RequestOp {
                request: Some(Request::RequestPut(PutRequest {
                    key: Bytes::from_static(key.as_bytes()),
                    ..Default::default()
                })),
            }],
            ..Default::default()
        }
    }

    fn compare_mod(key: &'static str, revision: i64) -> TxnRequest {
        TxnRequest {
            compare: vec![Compare {
                key: Bytes::from_static(key.as_bytes()),
                target: CompareTarget::Mod as i32,
                result: CompareResult::Equal as i32,
                target_union: Some(TargetUnion::ModRevision(revision)),
                ..Default::default()
            }],
            ..put(key)
        }
    }

    /// A key one request of the batch would create but another names otherwise (an update
    /// comparing its mod revision) is not one the batch may take for absent.
    #[test]
    fn a_key_is_created_only_if_every_request_naming_it_creates_it() {
        let commands = [
            command(put("a"), true),
            command(compare_mod("b", 0), false),
            command(compare_mod("c", 0), false),
            command(compare_mod("c", 9), false),
            command(put("d"), false),
        ];
        let keys = batch_keys(&commands);
        assert_eq!(keys.all, ["a", "b", "b", "c", "c", "c", "c", "d"]);
        assert_eq!(keys.created, ["a", "b"]);
    }
}
