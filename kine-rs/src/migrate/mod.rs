//! Live migration of a tenant from one datastore to another, keeping its revisions.
//!
//! The engine needs only what every database-backed datastore offers through
//! [`Backend`]/[`WriteTxn`]: a read at a revision (a page of a snapshot), the events after a
//! revision, and writes that take their revisions, create revisions and versions from the
//! caller. So any backend migrates to any other.
//!
//! # Steps
//! 1. **Pin** the source at its compaction revision `S` (compaction may not pass it while the
//!    copy runs) and mark the target keyspace *importing* (never served in that state).
//! 2. **Snapshot**: copy the keys live at `S`, a page at a time, in key order.
//! 3. **Tail**: copy the events after `S` in revision windows while the source keeps taking
//!    writes, until the copy is close behind.
//! 4. **Verify**, while the source still takes writes: a digest of every key, value,
//!    create/mod revision, version and lease at the revision `H` the copy has reached, read
//!    on both sides at `H`; then tail again.
//! 5. **Freeze** the source (the datastore's own freeze: no process lands a write after it
//!    returns), copy the last events up to the final revision `F`, and compare the events of
//!    `(H, F]` on both sides: equal at `H` and the same events since, equal at `F`. So the
//!    freeze lasts a few windows of events, whatever the size of the tenant.
//! 6. **Switch**: the target gets the leases with their remaining TTLs and starts serving;
//!    the source is marked *moved* and stays frozen, its data kept until the tenant is deleted.
//!
//! Starting from the compaction revision rather than the current one copies the history a
//! client may still read or watch from, so the target answers reads and watches at every
//! revision the source did, and its compaction revision is the source's. (Delete events at
//! exactly the compaction revision are not copied: the snapshot holds only live keys.)
//!
//! Every page and window is committed on the target together with the import's checkpoint,
//! so a killed migration resumes where it stopped. A rerun first unfreezes a source that an
//! interrupted run froze, so an interrupted migration never keeps a tenant frozen for longer
//! than it takes to start it again (or to `--abort` it).
//!
//! Memory is bounded by one page of keys or one window of events, whatever the tenant's size.

pub mod command;
mod digest;
mod etcd_keys;
pub mod etcd_prefix;
pub mod etcd_tenant;
pub mod kine_schema;
mod record;
pub mod source;

use std::time::{Duration, Instant};

use bytes::Bytes;
use thiserror::Error;

use crate::error::KineError;
use crate::model::{Event, EventType, KeyValue, LeaseRecord, Revision, now_ms};
use crate::storage::{Backend, KeyspaceId, MigrationRole};

pub use digest::Digest;
pub use record::{SourceRecord, TargetCheckpoint, TargetPhase};
pub use source::{BackendSource, Source, SourceState};

/// Why a migration stopped.
#[derive(Debug, Error)]
pub enum MigrateError {
    #[error("the source datastore: {0}")]
    Source(KineError),
    #[error("the target datastore: {0}")]
    Target(KineError),
    #[error("tenant {0:?} does not exist in the source datastore")]
    UnknownTenant(String),
    #[error(
        "tenant {0:?} already holds data in the target datastore and is not an unfinished \
         import of this migration; delete it there first (kine-rs tenant delete)"
    )]
    TargetNotEmpty(String),
    #[error("tenant {0:?} was already moved away from the source datastore")]
    AlreadyMoved(String),
    #[error(
        "the copy differs from the source at revision {revision}: source {source_digest}, \
         target {target_digest}; the source keeps serving and the import was removed"
    )]
    VerifyFailed {
        revision: Revision,
        source_digest: Digest,
        target_digest: Digest,
    },
    #[error(
        "the events copied in revisions ({after}, {up_to}] differ from the source's; the \
         source was unfrozen and the import removed"
    )]
    EventsDiffer { after: Revision, up_to: Revision },
    #[error(
        "the source was written after the freeze point (revision {final_revision}): {what}; \
         its writers are not stopped. Nothing was switched: the source keeps serving and the \
         import was removed"
    )]
    SourceWritten {
        final_revision: Revision,
        what: String,
    },
    #[error(
        "{0} stays writable during the copy (kine-rs cannot freeze it): stop its writers \
         (e.g. scale the kube-apiserver to zero) and pass --source-writers-stopped to cut over; \
         any write after the freeze point is still detected and aborts the switch"
    )]
    WritersNotStopped(String),
    #[error("a migration record of tenant {tenant:?} cannot be read: {reason}")]
    BadRecord { tenant: String, reason: String },
    #[error(
        "the migration of tenant {0:?} has finished (the target serves it); there is nothing \
         to abort"
    )]
    Finished(String),
}

/// Results of the engine.
pub type Result<T, E = MigrateError> = std::result::Result<T, E>;

trait Side<T> {
    fn source(self) -> Result<T>;
    fn target(self) -> Result<T>;
}

impl<T> Side<T> for std::result::Result<T, KineError> {
    fn source(self) -> Result<T> {
        self.map_err(MigrateError::Source)
    }
    fn target(self) -> Result<T> {
        self.map_err(MigrateError::Target)
    }
}

/// How a migration runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// The tenant (keyspace) to move.
    pub tenant: String,
    /// The target datastore, without credentials: recorded on the source once it has moved.
    pub target_name: String,
    /// The source datastore, without credentials: recorded on the target while importing.
    pub source_name: String,
    /// Keys per snapshot page.
    pub page_keys: i64,
    /// Revisions per window of events.
    pub window_revisions: i64,
    /// Bytes of keys and values a page of the snapshot, a window of events or a page of a
    /// digest holds at most (one key or revision always, whatever its size): with the key
    /// and revision counts above, what bounds the memory of a migration.
    pub page_bytes: usize,
    /// The tail freezes the source once a pass ends at most this many revisions behind.
    pub freeze_lag: i64,
    /// ... or once this many passes have run, whatever the lag (a source written faster than
    /// it can be copied still moves, with a longer freeze).
    pub max_tail_passes: u32,
    /// The caller says the source's writers are stopped: needed to cut over from a source
    /// kine-rs cannot freeze (a plain etcd).
    pub writers_stopped: bool,
}

impl Options {
    /// Defaults for `tenant`.
    pub fn new(tenant: &str) -> Self {
        Options {
            tenant: tenant.to_string(),
            target_name: String::new(),
            source_name: String::new(),
            page_keys: 1000,
            window_revisions: 1000,
            page_bytes: PAGE_BYTES,
            freeze_lag: 100,
            max_tail_passes: 50,
            writers_stopped: false,
        }
    }
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Snapshot,
    Tail,
    Freeze,
    Verify,
    Switch,
    Done,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Snapshot => "snapshot",
            Phase::Tail => "tail",
            Phase::Freeze => "freeze",
            Phase::Verify => "verify",
            Phase::Switch => "switch",
            Phase::Done => "done",
        }
    }
}

/// A report of progress, sent after every page and window.
#[derive(Debug, Clone)]
pub struct Progress {
    pub tenant: String,
    pub phase: Phase,
    /// Keys copied by the snapshot.
    pub keys: u64,
    /// Keys the source holds (the snapshot's goal).
    pub keys_total: u64,
    /// Bytes of keys and values copied (snapshot and events).
    pub bytes: u64,
    /// Events copied by the tail.
    pub events: u64,
    /// The most bytes of keys and values one page of the snapshot or one window of events
    /// held (what `--page-bytes` bounds).
    pub largest_page_bytes: u64,
    /// The last revision copied, and the source's revision when last read.
    pub applied_revision: Revision,
    pub source_revision: Revision,
    pub elapsed: Duration,
}

impl Progress {
    /// Revisions the copy is behind the source.
    pub fn lag(&self) -> i64 {
        (self.source_revision - self.applied_revision).max(0)
    }
}

/// What a finished migration did.
#[derive(Debug, Clone)]
pub struct Summary {
    pub tenant: String,
    pub duration: Duration,
    pub keys: u64,
    pub bytes: u64,
    pub events: u64,
    pub leases: u64,
    /// How long writes were refused: from the source's freeze until the target served.
    pub freeze_window: Duration,
    /// The revision at which the target took over (equal on both sides).
    pub revision: Revision,
    pub compact_revision: Revision,
    pub digest: Digest,
    /// Whether an interrupted run was resumed.
    pub resumed: bool,
    /// The most bytes of keys and values one page of the snapshot or one window of events
    /// held.
    pub largest_page_bytes: u64,
}

/// What `--dry-run` prints: the size of the move.
#[derive(Debug, Clone)]
pub struct Plan {
    pub tenant: String,
    pub keys: i64,
    pub bytes: i64,
    pub revision: Revision,
    pub compact_revision: Revision,
    /// Revisions of history the copy replays after the snapshot.
    pub history_revisions: i64,
    pub leases: usize,
    pub frozen: bool,
    /// A rough estimate from the sizes (tens of thousands of keys or events a second).
    pub estimated: Duration,
}

/// The size of moving `tenant` of a datastore kine-rs owns; changes nothing.
pub async fn plan(source: &dyn Backend, tenant: &str) -> Result<Plan> {
    let source = open_backend_source(source, tenant).await?;
    plan_from(&source, tenant).await
}

/// The size of moving the tenant `source` holds; changes nothing.
pub async fn plan_from(source: &dyn Source, tenant: &str) -> Result<Plan> {
    let state = source.state().await.source()?;
    let leases = source.leases().await.source()?.len();
    let start = state.compact_revision.max(1);
    let history = (state.revision - start).max(0);
    // Measured on this project's two-core machines: tens of thousands of rows a second;
    // an estimate, printed as such.
    let work = state.keys.max(0) as f64 + history as f64;
    Ok(Plan {
        tenant: tenant.to_string(),
        keys: state.keys,
        bytes: state.bytes,
        revision: state.revision,
        compact_revision: state.compact_revision,
        history_revisions: history,
        leases,
        frozen: state.frozen,
        estimated: Duration::from_secs_f64(1.0 + work / 20_000.0),
    })
}

async fn open_backend_source<'a>(
    source: &'a dyn Backend,
    tenant: &str,
) -> Result<BackendSource<'a>> {
    BackendSource::open(source, tenant)
        .await
        .source()?
        .ok_or_else(|| MigrateError::UnknownTenant(tenant.to_string()))
}

/// Moves `options.tenant` from `source` to `target` (both datastores kine-rs owns),
/// resuming an interrupted run.
pub async fn run(
    source: &dyn Backend,
    target: &dyn Backend,
    options: &Options,
    report: &mut (dyn FnMut(&Progress) + Send),
) -> Result<Summary> {
    let source = open_backend_source(source, &options.tenant).await?;
    run_from(&source, target, options, report).await
}

/// Moves the tenant `source` holds into the keyspace `options.tenant` of `target`,
/// resuming an interrupted run.
pub async fn run_from(
    source: &dyn Source,
    target: &dyn Backend,
    options: &Options,
    report: &mut (dyn FnMut(&Progress) + Send),
) -> Result<Summary> {
    let started = Instant::now();
    let tenant = options.tenant.as_str();
    if source.state().await.source()?.moved {
        return Err(MigrateError::AlreadyMoved(tenant.to_string()));
    }
    // An interrupted run may have left the source frozen: writes come back first.
    source.recover().await.source()?;
    let source_state = source.state().await.source()?;

    let target_id = target
        .keyspace(tenant, true)
        .await
        .target()?
        .ok_or_else(|| MigrateError::Target(KineError::UnknownTenant(tenant.to_string())))?;
    let target_state = target.state(target_id).await.target()?;
    let (mut checkpoint, resumed) = match target_state.migration {
        MigrationRole::Importing => {
            let text = target.migration_record(target_id).await.target()?;
            let checkpoint = text
                .as_deref()
                .map(TargetCheckpoint::decode)
                .transpose()
                .map_err(|reason| MigrateError::BadRecord {
                    tenant: tenant.to_string(),
                    reason,
                })?;
            // The source must still hold (and pin) the history after the snapshot's
            // revision, or what the copy needs may be gone: start over.
            let resumable = match &checkpoint {
                Some(checkpoint) => source
                    .can_resume(checkpoint.snapshot_revision)
                    .await
                    .source()?,
                None => false,
            };
            match checkpoint {
                Some(checkpoint) if resumable => (checkpoint, true),
                _ => {
                    target.delete_keyspace(target_id).await.target()?;
                    return Box::pin(run_from(source, target, options, report)).await;
                }
            }
        }
        MigrationRole::None
            if target_state.revision <= 1
                && target_state.keys == 0
                && target.leases(target_id).await.target()?.is_empty() =>
        {
            (start(source, target, target_id, options).await?, false)
        }
        _ => return Err(MigrateError::TargetNotEmpty(tenant.to_string())),
    };

    let mut progress = Progress {
        tenant: tenant.to_string(),
        phase: Phase::Snapshot,
        keys: checkpoint.keys,
        keys_total: source_state.keys.max(0) as u64,
        bytes: checkpoint.bytes,
        events: checkpoint.events,
        largest_page_bytes: 0,
        applied_revision: checkpoint.applied,
        source_revision: source_state.revision,
        elapsed: started.elapsed(),
    };

    // Snapshot: the next page is read while the current one is written.
    if checkpoint.phase == TargetPhase::Snapshot {
        let mut page_keys = options.page_keys.max(1);
        let mut rows = read_page(source, &checkpoint, page_keys, options.page_bytes).await?;
        loop {
            page_keys = next_page_keys(&rows, options.page_keys, options.page_bytes);
            progress.largest_page_bytes = progress.largest_page_bytes.max(held_bytes(rows.iter()));
            let after = rows.last().map(|kv| kv.key.clone());
            let last_page = rows.is_empty();
            let at = TargetCheckpoint {
                after_key: after,
                ..checkpoint.clone()
            };
            let reading = async {
                if last_page {
                    Ok(Vec::new())
                } else {
                    read_page(source, &at, page_keys, options.page_bytes).await
                }
            };
            let (written, read) = tokio::join!(
                write_page(target, target_id, &mut checkpoint, &rows),
                reading
            );
            written?;
            progress.keys = checkpoint.keys;
            progress.bytes = checkpoint.bytes;
            progress.elapsed = started.elapsed();
            report(&progress);
            if last_page {
                break;
            }
            rows = read?;
        }
    }

    // Tail until close behind; verify the copy at that revision while the source still
    // takes writes; tail again to catch up with the writes made meanwhile.
    progress.phase = Phase::Tail;
    tail(
        source,
        target,
        target_id,
        options,
        &mut checkpoint,
        &mut progress,
        started,
        report,
    )
    .await?;
    progress.phase = Phase::Verify;
    report(&progress);
    // The digest reads every key of the target: on a PostgreSQL database whose tables were
    // nearly empty when autovacuum last looked, its pages took 137 ms each at 300,000 keys
    // instead of 5 ms.
    target.refresh_statistics().await.target()?;
    let verified_at = checkpoint.applied;
    let (source_digest, target_digest) = tokio::join!(
        // Two pages at a time, one of each side: half the budget each.
        Digest::of_source(source, verified_at, options.page_bytes / 2),
        Digest::of(target, target_id, verified_at, options.page_bytes / 2)
    );
    let (source_digest, target_digest) = (source_digest.source()?, target_digest.target()?);
    if source_digest != target_digest {
        let _ = source.release(false).await;
        let _ = target.delete_keyspace(target_id).await;
        return Err(MigrateError::VerifyFailed {
            revision: verified_at,
            source_digest,
            target_digest,
        });
    }
    progress.phase = Phase::Tail;
    tail(
        source,
        target,
        target_id,
        options,
        &mut checkpoint,
        &mut progress,
        started,
        report,
    )
    .await?;
    // The events copied since the digest are compared now, while the source still takes
    // writes: they are history, which no later write changes (where the source says so), so
    // the freeze compares only the few events it copies itself.
    let mut verified_at = verified_at;
    if source.history_is_final() {
        if let Err(error) = compare_events(
            source,
            target,
            target_id,
            options,
            verified_at,
            checkpoint.applied,
        )
        .await
        {
            if matches!(error, MigrateError::EventsDiffer { .. }) {
                let _ = source.release(false).await;
                let _ = target.delete_keyspace(target_id).await;
            }
            return Err(error);
        }
        verified_at = checkpoint.applied;
    }

    // Freeze, and the last events.
    if source.needs_stopped_writers() && !options.writers_stopped {
        // Copied so far and kept (a rerun with the flag resumes): only the switch waits.
        return Err(MigrateError::WritersNotStopped(source.describe()));
    }
    progress.phase = Phase::Freeze;
    let frozen_at = Instant::now();
    let final_state = source.freeze(&options.target_name).await.source()?;
    let finish = async {
        while checkpoint.applied < final_state.revision {
            copy_window(
                source,
                target,
                target_id,
                options,
                &mut checkpoint,
                final_state.revision,
            )
            .await?;
        }
        progress.applied_revision = checkpoint.applied;
        progress.source_revision = final_state.revision;
        progress.events = checkpoint.events;
        progress.bytes = checkpoint.bytes;
        progress.elapsed = started.elapsed();
        report(&progress);

        // Equal at the verified revision, and the same events since: equal at the final one.
        progress.phase = Phase::Verify;
        report(&progress);
        compare_events(
            source,
            target,
            target_id,
            options,
            verified_at,
            final_state.revision,
        )
        .await?;
        // Nothing landed on the source after the final revision (where the datastore does
        // not enforce the freeze itself, this is where a stray write is caught).
        let switch_at = source
            .switch_revision(final_state.revision)
            .await
            .source()?;
        source.check_frozen(final_state.revision).await?;
        progress.phase = Phase::Switch;
        report(&progress);
        let leases = switch_target(source, &final_state, switch_at, target, target_id).await?;
        Ok((leases, switch_at))
    }
    .await;
    let digest = source_digest;
    let (leases, switch_at) = match finish {
        Ok(done) => done,
        Err(error) => {
            // Before the target serves, the source is the tenant's home: writable again. A
            // copy that differs is removed; any other failure keeps its checkpoint (and the
            // source's pin) for a rerun to resume.
            let differs = matches!(
                error,
                MigrateError::EventsDiffer { .. } | MigrateError::SourceWritten { .. }
            );
            let _ = source.release(!differs).await;
            if differs {
                let _ = target.delete_keyspace(target_id).await;
            }
            return Err(error);
        }
    };
    let freeze_window = frozen_at.elapsed();
    source.mark_moved(&options.target_name).await.source()?;
    progress.phase = Phase::Done;
    progress.elapsed = started.elapsed();
    report(&progress);
    let target_state = target.state(target_id).await.target()?;
    Ok(Summary {
        tenant: tenant.to_string(),
        duration: started.elapsed(),
        keys: checkpoint.keys,
        bytes: checkpoint.bytes,
        events: checkpoint.events,
        leases,
        freeze_window,
        revision: switch_at,
        compact_revision: target_state.compact_revision,
        digest,
        resumed,
        largest_page_bytes: progress.largest_page_bytes,
    })
}

/// Compares the events of `(from, to]` on both sides, a window at a time.
async fn compare_events(
    source: &dyn Source,
    target: &dyn Backend,
    target_id: KeyspaceId,
    options: &Options,
    mut from: Revision,
    to: Revision,
) -> Result<()> {
    while from < to {
        let up_to = to.min(from + options.window_revisions.max(1));
        // The source's window is cut to the byte budget first; the target's, read to the
        // same revision, holds the same events.
        let (source_events, reached) = source
            .events_within(from, up_to, options.page_bytes)
            .await
            .source()?;
        let target_events = target.history(target_id, from, reached).await.target()?;
        if without_prev(source_events) != without_prev(target_events) {
            return Err(MigrateError::EventsDiffer {
                after: from,
                up_to: reached,
            });
        }
        from = reached;
    }
    Ok(())
}

/// Events without their `prev_kv` (which the target builds from its own history).
fn without_prev(mut events: Vec<Event>) -> Vec<Event> {
    for event in &mut events {
        event.prev_kv = None;
    }
    events
}

/// Pins the source at its snapshot revision and marks the target importing.
async fn start(
    source: &dyn Source,
    target: &dyn Backend,
    target_id: KeyspaceId,
    options: &Options,
) -> Result<TargetCheckpoint> {
    let snapshot = source.pin(&options.target_name).await.source()?;
    let state = source.state().await.source()?;
    let checkpoint = TargetCheckpoint {
        source: options.source_name.clone(),
        phase: TargetPhase::Snapshot,
        snapshot_revision: snapshot,
        after_key: None,
        next_sub: 0,
        applied: snapshot,
        keys: 0,
        bytes: 0,
        events: 0,
    };
    let mut txn = target.begin_write(target_id).await.target()?;
    let target_state = txn.state();
    // Reads below the snapshot are not copied: on the target they are compacted. (Equal to
    // the source's compaction revision where the source pins its history from there.)
    let compact = state.compact_revision.max(snapshot.min(state.revision));
    if compact > 1 || state.compact_revision > 0 {
        txn.set_compact_revision(compact).await.target()?;
    }
    txn.set_migration(MigrationRole::Importing, 0, Some(&checkpoint.encode()))
        .await
        .target()?;
    txn.commit(target_state.revision).await.target()?;
    Ok(checkpoint)
}

/// Copies windows of events until a pass ends at most `--freeze-lag` revisions behind the
/// source (or after `max_tail_passes` passes). Each next window is read while the current
/// one is written.
#[allow(clippy::too_many_arguments)]
async fn tail(
    source: &dyn Source,
    target: &dyn Backend,
    target_id: KeyspaceId,
    options: &Options,
    checkpoint: &mut TargetCheckpoint,
    progress: &mut Progress,
    started: Instant,
    report: &mut (dyn FnMut(&Progress) + Send),
) -> Result<()> {
    let mut passes = 0;
    loop {
        let head = source.state().await.source()?.revision;
        progress.source_revision = head;
        let behind = head - checkpoint.applied;
        if behind <= options.freeze_lag || passes >= options.max_tail_passes {
            return Ok(());
        }
        passes += 1;
        let mut window = options.window_revisions.max(1);
        let mut from = checkpoint.applied;
        let asked = head.min(from + window);
        let (mut events, mut up_to) = source
            .events_within(from, asked, options.page_bytes)
            .await
            .source()?;
        window = next_window(window, up_to - from, up_to < asked, options);
        loop {
            let asked = head.min(up_to + window);
            let reading = async {
                if up_to < head {
                    (source.events_within(up_to, asked, options.page_bytes).await).source()
                } else {
                    Ok((Vec::new(), up_to))
                }
            };
            progress.largest_page_bytes = (progress.largest_page_bytes).max(held_bytes(
                events.iter().filter_map(|event| event.kv.as_ref()),
            ));
            let (written, read) = tokio::join!(
                write_window(target, target_id, checkpoint, &events, up_to),
                reading
            );
            written?;
            progress.applied_revision = checkpoint.applied;
            progress.events = checkpoint.events;
            progress.bytes = checkpoint.bytes;
            progress.elapsed = started.elapsed();
            report(progress);
            if up_to >= head {
                break;
            }
            from = up_to;
            (events, up_to) = read?;
            // A window cut by bytes: the next one asks for as many revisions as fitted.
            window = next_window(window, up_to - from, up_to < asked, options);
        }
    }
}

/// Bytes of keys and values a snapshot page, a window of events or a digest's page holds
/// at most, by default (`--page-bytes`). A tenant of 1 MiB values moved PostgreSQL →
/// MariaDB with a peak RSS of 53 MiB at 4 MiB, 72 MiB at 8 MiB (two pages in flight, each
/// also encoded for the driver).
pub const PAGE_BYTES: usize = 4 << 20;

/// The number of keys of the next page: `--page-keys`, fewer when values are large, so the
/// source is not asked for many more rows than the byte budget lets through (it cuts the
/// page to the budget itself).
fn next_page_keys(rows: &[KeyValue], page_keys: i64, page_bytes: usize) -> i64 {
    let bytes: usize = rows.iter().map(|kv| kv.key.len() + kv.value.len()).sum();
    if rows.is_empty() || bytes == 0 {
        return page_keys.max(1);
    }
    let per_key = bytes / rows.len();
    // One more than fitted, so a page that filled its budget shows it did.
    ((page_bytes / per_key.max(1)) as i64 + 1).clamp(1, page_keys.max(1))
}

/// The bytes of keys and values of `kvs`.
fn held_bytes<'a>(kvs: impl Iterator<Item = &'a KeyValue>) -> u64 {
    kvs.map(|kv| (kv.key.len() + kv.value.len()) as u64).sum()
}

/// The revisions the next window of events asks for: as many as the last one got when the
/// byte budget cut it (the source reads every row of the revisions it is asked for), else
/// twice as many, up to `--window-revisions`.
fn next_window(window: i64, got: i64, cut: bool, options: &Options) -> i64 {
    let most = options.window_revisions.max(1);
    if cut {
        got.clamp(1, most)
    } else {
        window.saturating_mul(2).clamp(1, most)
    }
}

/// The keys of the snapshot after the checkpoint's last key, at most `page_keys`.
async fn read_page(
    source: &dyn Source,
    checkpoint: &TargetCheckpoint,
    page_keys: i64,
    page_bytes: usize,
) -> Result<Vec<KeyValue>> {
    source
        .page_within(
            checkpoint.snapshot_revision,
            checkpoint.after_key.as_deref(),
            page_keys.max(1),
            page_bytes,
        )
        .await
        .source()
}

/// Writes a page of the snapshot with the checkpoint after it; an empty page ends the
/// snapshot phase.
async fn write_page(
    target: &dyn Backend,
    target_id: KeyspaceId,
    checkpoint: &mut TargetCheckpoint,
    rows: &[KeyValue],
) -> Result<()> {
    let mut next = checkpoint.clone();
    if rows.is_empty() {
        next.phase = TargetPhase::Tail;
        next.after_key = None;
    }
    let mut txn = target.begin_write(target_id).await.target()?;
    let keys: Vec<Bytes> = rows.iter().map(|kv| kv.key.clone()).collect();
    // Pages hold distinct keys after the last one committed, and no event is copied before
    // the snapshot ends: none of them is in the import yet, so nothing need be looked up.
    txn.prefetch_absent(&keys).await.target()?;
    for kv in rows {
        // Rows are identified by (revision, sub): keys written by one transaction need
        // distinct subs, and the snapshot's revisions never meet the tail's.
        txn.put(kv, next.next_sub).await.target()?;
        next.next_sub += 1;
        next.keys += 1;
        next.bytes += (kv.key.len() + kv.value.len()) as u64;
    }
    if let Some(last) = rows.last() {
        next.after_key = Some(last.key.clone());
    }
    txn.set_migration(MigrationRole::Importing, 0, Some(&next.encode()))
        .await
        .target()?;
    let revision = txn.state().revision.max(checkpoint.snapshot_revision);
    txn.commit(revision).await.target()?;
    *checkpoint = next;
    Ok(())
}

/// Copies the next page of the snapshot, or ends the snapshot phase.
#[cfg(test)]
async fn copy_page(
    source: &dyn Source,
    target: &dyn Backend,
    target_id: KeyspaceId,
    options: &Options,
    checkpoint: &mut TargetCheckpoint,
) -> Result<()> {
    let rows = read_page(source, checkpoint, options.page_keys, options.page_bytes).await?;
    write_page(target, target_id, checkpoint, &rows).await
}

/// Copies the events of the next window of revisions, up to `head` at most.
async fn copy_window(
    source: &dyn Source,
    target: &dyn Backend,
    target_id: KeyspaceId,
    options: &Options,
    checkpoint: &mut TargetCheckpoint,
    head: Revision,
) -> Result<()> {
    let up_to = head.min(checkpoint.applied + options.window_revisions.max(1));
    let (events, up_to) = source
        .events_within(checkpoint.applied, up_to, options.page_bytes)
        .await
        .source()?;
    write_window(target, target_id, checkpoint, &events, up_to).await
}

/// Writes the events of a window, with the checkpoint after it (`up_to`).
async fn write_window(
    target: &dyn Backend,
    target_id: KeyspaceId,
    checkpoint: &mut TargetCheckpoint,
    events: &[Event],
    up_to: Revision,
) -> Result<()> {
    let mut next = checkpoint.clone();
    let mut txn = target.begin_write(target_id).await.target()?;
    let keys: Vec<Bytes> = events
        .iter()
        .filter_map(|event| event.kv.as_ref().map(|kv| kv.key.clone()))
        .collect();
    txn.prefetch(&keys).await.target()?;
    let mut revision = 0;
    let mut sub = 0;
    for event in events {
        let Some(kv) = &event.kv else { continue };
        if kv.mod_revision != revision {
            revision = kv.mod_revision;
            sub = 0;
        }
        if event.r#type == EventType::Delete as i32 {
            txn.delete(&kv.key, kv.mod_revision, sub).await.target()?;
        } else {
            txn.put(kv, sub).await.target()?;
            next.bytes += (kv.key.len() + kv.value.len()) as u64;
        }
        sub += 1;
        next.events += 1;
    }
    next.applied = up_to;
    txn.set_migration(MigrationRole::Importing, 0, Some(&next.encode()))
        .await
        .target()?;
    txn.commit(up_to.max(txn_revision_floor(checkpoint)))
        .await
        .target()?;
    *checkpoint = next;
    Ok(())
}

/// The target's counter never goes below the snapshot's revision.
fn txn_revision_floor(checkpoint: &TargetCheckpoint) -> Revision {
    checkpoint.snapshot_revision
}

/// Gives the target the source's leases with their remaining TTLs, and makes it serve.
async fn switch_target(
    source: &dyn Source,
    frozen: &SourceState,
    revision: Revision,
    target: &dyn Backend,
    target_id: KeyspaceId,
) -> Result<u64> {
    let leases = source.leases().await.source()?;
    let mut txn = target.begin_write(target_id).await.target()?;
    for existing in target.leases(target_id).await.target()? {
        txn.delete_lease(existing.id).await.target()?;
    }
    // Expiry paused at the source's freeze: each lease keeps the time it had left then.
    let paused = if frozen.frozen_at_ms > 0 {
        (now_ms() - frozen.frozen_at_ms).max(0)
    } else {
        0
    };
    for lease in &leases {
        txn.insert_lease(LeaseRecord {
            expires_at_ms: lease.expires_at_ms.saturating_add(paused),
            ..*lease
        })
        .await
        .target()?;
    }
    if frozen.quota != txn.state().quota {
        txn.set_quota(frozen.quota).await.target()?;
    }
    txn.set_migration(MigrationRole::None, 0, None)
        .await
        .target()?;
    txn.commit(revision.max(frozen.revision)).await.target()?;
    Ok(leases.len() as u64)
}

/// What `--abort` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Aborted {
    /// The source was pinned or frozen by the migration, and is released.
    pub source_released: bool,
    /// An unfinished import was removed from the target.
    pub import_removed: bool,
}

/// Rolls an unfinished migration back: the source is writable and unpinned, the target's
/// unfinished import is deleted. A finished migration is not undone.
pub async fn abort(source: &dyn Backend, target: &dyn Backend, tenant: &str) -> Result<Aborted> {
    let source = open_backend_source(source, tenant).await?;
    abort_from(&source, target, tenant).await
}

/// [`abort`] for any [`Source`].
pub async fn abort_from(
    source: &dyn Source,
    target: &dyn Backend,
    tenant: &str,
) -> Result<Aborted> {
    let state = source.state().await.source()?;
    if state.moved {
        return Err(MigrateError::Finished(tenant.to_string()));
    }
    let source_released = state.pinned;
    if source_released {
        source.release(false).await.source()?;
    }
    let mut import_removed = false;
    if let Some(target_id) = target.keyspace(tenant, false).await.target()?
        && target.state(target_id).await.target()?.migration == MigrationRole::Importing
    {
        import_removed = target.delete_keyspace(target_id).await.target()?;
    }
    Ok(Aborted {
        source_released,
        import_removed,
    })
}

#[cfg(test)]
mod tests;
