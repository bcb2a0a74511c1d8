//! The storage model: one trait that every backend implements.
//!
//! # Model
//!
//! A datastore holds **keyspaces** (tenants). Each keyspace has its own revision counter,
//! compaction revision and freeze flag, and a log of **rows**: every write of a key at a
//! revision is a row `(key, mod_revision, sub, create_revision, version, lease, value,
//! deleted)`, where `sub` orders the writes inside one revision and `deleted` marks a tombstone.
//! Each row also records the revision that **superseded** it (`i64::MAX` while it is current),
//! so that:
//!
//! * a read at the current revision touches only current rows (an index of current rows by
//!   key), never history;
//! * a read at an older revision `R` takes rows with `mod_revision <= R < superseded`: current
//!   rows written by `R`, and superseded rows by key (an index of those), in two branches;
//! * an event's `prev_kv` is the row of the same key superseded at the event's revision;
//! * compaction at `C` removes rows superseded at or before `C` and tombstones older than `C`,
//!   in bounded batches.
//!
//! On PostgreSQL the same facts are kept another way (migration 0008), because there an
//! update writes a whole new copy of the row with new index entries: marking the superseded
//! row made an overwrite cost about two and a half creates. There `kv` only gets rows
//! appended, and a narrow table `kv_head` names each key's current row, moved in place on
//! every write of the key (no index names what changes, so PostgreSQL rewrites it on its page
//! without index entries). A read at an older revision takes each key's newest row at or
//! before it, `prev_kv` is the key's newest row before the event, and compaction walks the
//! rows written since its last pass and removes the rows each of them superseded.
//!
//! On SQLite (migration 0007) `kv` only gets rows appended too, and the superseded revision
//! is kept beside it: `kv_head` names each key's current row (narrow, ordered by key) and
//! `kv_past` each superseded row with the revision that superseded it (narrow, ordered by
//! that revision since migration 0008, so an overwrite appends to it too; a trigger moves a
//! head there when the head's upsert replaces it). Marking the
//! superseded row in `kv` rewrote its page of `kv`, a page far from the appended rows, and
//! moved its entries between three indexes. The reads keep the shapes above, over the views
//! `kv_current` and `kv_superseded`; a read at an older revision finds its superseded rows
//! among those superseded since that revision.
//!
//! Rows are identified by `(keyspace, mod_revision, sub)`, so new rows append to the table's
//! key and to the watch log; the only index ordered by key that a new key touches is the one
//! of current rows. (A batch of writes to scattered keys dirties one page per key in every
//! index ordered by key; that, not the statements, bounds the write rate.)
//!
//! Revisions never come from auto-increment ids: a writer takes the keyspace's row lock
//! ([`Backend::begin_write`]), reads the counter, writes rows at counter + 1, + 2, … (one per
//! etcd transaction; several etcd transactions may share one database transaction — group
//! commit) and stores the new counter in the same database transaction. The next writer waits
//! for the lock, so revisions are gapless and become visible in order, also across processes.
//!
//! The freeze flag lives in the same keyspace row, so a write checks it atomically under the
//! same lock; freezing takes that lock too, so no write can land after a freeze returns.
//! The row also holds the keyspace's usage (live keys and their bytes), kept up to date by
//! every write in the same transaction (no scans to answer a status or check a quota), and
//! its quota.
//!
//! Tenants are structurally isolated: every statement filters by the keyspace id, which the
//! server resolves from the tenant's name once (names are bound parameters, never SQL text).
//!
//! The migration engine needs exactly three things, all expressed here: a consistent snapshot
//! at a revision ([`Backend::range`] at `R`, plus [`Backend::leases`]), the changes after `R`
//! ([`Backend::events`]), and an import that keeps revisions ([`WriteTxn::put`] and
//! [`WriteTxn::delete`] take the revision, create revision and version from the caller).
//!
//! # Backends
//!
//! SQLite ([`sqlite`]), PostgreSQL ([`postgres`]) and MySQL/MariaDB ([`mysql`]) share one
//! implementation of both traits, [`sql::SqlBackend`], generic over a [`sql::Dialect`] that
//! supplies what differs (placeholders, how transactions begin, the row lock, a few
//! statements, commit announcements). Each has its own schema, created and upgraded by
//! versioned migrations embedded in the binary (`migrations/<driver>/`). Several processes
//! may share a PostgreSQL or MySQL database: the keyspace row lock orders their writes, and
//! watch hubs learn of each other's commits from one change feed per process ([`feed`]):
//! PostgreSQL's LISTEN/NOTIFY, or one poll of every watched keyspace's revision (MySQL).
//!
//! NATS JetStream ([`nats`]) implements both traits differently: a stream per keyspace with
//! one message per committed write transaction, and an in-memory image per process.

pub mod feed;
pub mod mysql;
pub mod nats;
mod nodelay;
pub mod page_counts;
pub mod postgres;
pub mod row_digest;
pub mod sql;
pub mod sqlite;
#[cfg(test)]
pub(crate) mod test_support;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{KineError, Result};
use crate::model::{Event, KeyRange, KeyValue, LeaseRecord, RangeEnd, Revision};

/// A keyspace's identity inside one datastore.
pub type KeyspaceId = i64;

/// The counters of a keyspace, read together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyspaceState {
    pub id: KeyspaceId,
    /// The revision of the last committed write transaction (1 in an empty keyspace).
    pub revision: Revision,
    /// Reads below this revision fail with `Compacted`; -1 when never compacted (as in etcd,
    /// so that compacting at revision 0 once succeeds).
    pub compact_revision: Revision,
    /// Whether writes are refused.
    pub frozen: bool,
    /// When the current freeze began (milliseconds since the epoch); 0 when not frozen.
    pub frozen_at_ms: i64,
    /// Live keys, maintained by every write under the keyspace lock.
    pub keys: i64,
    /// Bytes of the live keys and their values, maintained likewise.
    pub bytes: i64,
    /// The quota: most live keys and bytes; 0 means no limit.
    pub quota: Quota,
    /// The keyspace's part in a live migration between datastores.
    pub migration: MigrationRole,
    /// While the keyspace is a migration's source: the oldest revision the copy still reads,
    /// which compaction may not pass; 0 otherwise.
    pub pinned_revision: Revision,
}

/// A keyspace's part in a live migration (see [`crate::migrate`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MigrationRole {
    /// Not migrating: served as usual.
    #[default]
    None,
    /// The source of a running migration: served, compaction held at the pinned revision.
    Source,
    /// The target of an unfinished import: not served until the migration switches to it.
    Importing,
    /// Moved to another datastore: frozen, and not served (its data stays until deleted).
    Moved,
}

impl MigrationRole {
    /// The code stored in `keyspaces.migration_role`.
    pub fn code(self) -> i64 {
        match self {
            MigrationRole::None => 0,
            MigrationRole::Source => 1,
            MigrationRole::Importing => 2,
            MigrationRole::Moved => 3,
        }
    }

    /// The role a stored code names; an unknown code (a newer kine-rs) counts as importing,
    /// which is never served.
    pub fn from_code(code: i64) -> Self {
        match code {
            0 => MigrationRole::None,
            1 => MigrationRole::Source,
            3 => MigrationRole::Moved,
            _ => MigrationRole::Importing,
        }
    }
}

/// A keyspace's quota; 0 means no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quota {
    pub keys: i64,
    pub bytes: i64,
}

/// What a read asks of a backend; sorting and filtering happen above the backend.
#[derive(Debug, Clone)]
pub struct RangeQuery<'a> {
    pub range: &'a KeyRange,
    /// The revision to read at; `0` (or less) means the current revision.
    pub revision: Revision,
    /// Maximum number of key-values to return; `None` for all.
    pub limit: Option<i64>,
    /// Return key-values without their values.
    pub keys_only: bool,
    /// Return no key-values at all, only the count.
    pub count_only: bool,
}

/// The answer to a [`RangeQuery`].
#[derive(Debug, Clone, Default)]
pub struct RangeRows {
    /// The keyspace's current revision when the read was served (etcd's header revision,
    /// also for reads of older revisions).
    pub revision: Revision,
    /// Key-values in ascending key order, at most `limit`.
    pub kvs: Vec<KeyValue>,
    /// The number of keys in the range, regardless of `limit`.
    pub count: i64,
}

/// A key written after some revision (see [`WriteTxn::written_since`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub key: Bytes,
    /// Whether the key was live at that revision.
    pub live_before: bool,
}

/// The keys of a snapshot page after `after`: the smallest key greater than it is itself +
/// `"\0"`.
pub fn page_range(after: Option<&[u8]>) -> KeyRange {
    let start = match after {
        Some(key) => {
            let mut next = key.to_vec();
            next.push(0);
            Bytes::from(next)
        }
        None => Bytes::new(),
    };
    KeyRange {
        start,
        end: RangeEnd::Unbounded,
    }
}

/// A datastore that holds keyspaces.
/// The keys a write batch names ([`Backend::begin_group_write`]).
#[derive(Debug, Default, Clone)]
pub struct BatchKeys {
    /// Every single key its requests name.
    pub all: Vec<Bytes>,
    /// Those of `all` that every request naming them would create ([`crate::txn::created_keys`]):
    /// a datastore whose commit checks it may take the ones it has not seen for absent
    /// instead of reading them.
    pub created: Vec<Bytes>,
}

#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// A short name of the driver, for logs and metrics.
    fn driver(&self) -> &'static str;

    /// Finds the keyspace named `name`, creating it when `create` is set.
    async fn keyspace(&self, name: &str, create: bool) -> Result<Option<KeyspaceId>>;

    /// Creates the keyspace named `name` unless it exists, for a caller that has just looked
    /// for it ([`Backend::keyspace`] without `create`) and not found it: its id.
    async fn create_keyspace(&self, name: &str) -> Result<KeyspaceId> {
        self.keyspace(name, true)
            .await?
            .ok_or_else(|| KineError::Storage(format!("keyspace {name:?} was not created")))
    }

    /// Reads the keyspace's counters.
    async fn state(&self, keyspace: KeyspaceId) -> Result<KeyspaceState>;

    /// Every keyspace, by name, with its counters.
    async fn keyspaces(&self) -> Result<Vec<(String, KeyspaceState)>>;

    /// The record a live migration keeps on the keyspace (its checkpoint, its peer), if any.
    async fn migration_record(&self, keyspace: KeyspaceId) -> Result<Option<String>>;

    /// Deletes a keyspace with all its keys, history and leases, under its write lock;
    /// `false` when it did not exist.
    async fn delete_keyspace(&self, keyspace: KeyspaceId) -> Result<bool>;

    /// Leases of every keyspace that is not frozen whose deadline is at or before `now_ms`
    /// (at most `limit`), as (keyspace name, keyspace, lease id).
    async fn expired_leases_all(
        &self,
        now_ms: i64,
        limit: i64,
    ) -> Result<Vec<(String, KeyspaceId, i64)>>;

    /// Reads keys at a revision, consistently: the revision checks (compacted, future) and the
    /// rows come from one snapshot.
    async fn range(&self, keyspace: KeyspaceId, query: RangeQuery<'_>) -> Result<RangeRows>;

    /// The events with revisions in `(after, up_to]`, in revision order, each with its
    /// `prev_kv` when that is still in history: never for an event at or below the compaction
    /// revision (etcd reads it at the revision before the event), whether or not its row was
    /// purged yet. With `range`, only events of keys in it.
    /// Fails with `Compacted` when `after + 1` is below the compaction revision.
    async fn events(
        &self,
        keyspace: KeyspaceId,
        after: Revision,
        up_to: Revision,
        range: Option<&KeyRange>,
    ) -> Result<Vec<Event>>;

    /// The events with revisions in `(after, up_to]`, in revision order, without `prev_kv`:
    /// what a migration copies (the target builds its own from its history), so a datastore
    /// may skip the lookup of previous values. By default, [`Backend::events`] without them.
    async fn history(
        &self,
        keyspace: KeyspaceId,
        after: Revision,
        up_to: Revision,
    ) -> Result<Vec<Event>> {
        let mut events = self.events(keyspace, after, up_to, None).await?;
        for event in &mut events {
            event.prev_kv = None;
        }
        Ok(events)
    }

    /// [`Backend::history`] in bounded memory, for a migration: the events of whole
    /// revisions of `(after, up_to]`, in order, as long as their keys and values add up to at
    /// most `max_bytes` (the first revision always, whatever its size); with the revision up
    /// to which they are complete (`up_to` when nothing was left out). By default, the whole
    /// window.
    async fn history_within(
        &self,
        keyspace: KeyspaceId,
        after: Revision,
        up_to: Revision,
        max_bytes: usize,
    ) -> Result<(Vec<Event>, Revision)> {
        let _ = max_bytes;
        Ok((self.history(keyspace, after, up_to).await?, up_to))
    }

    /// A page of a snapshot in bounded memory, for a migration: the keys live at `revision`
    /// after `after` (from the start when `None`), in key order, at most `limit` of them and
    /// no more than add up to `max_bytes` of keys and values (one key always, whatever its
    /// size). Fails as [`Backend::range`] does for a compacted or future revision. By
    /// default, a range of `limit` keys.
    async fn page_within(
        &self,
        keyspace: KeyspaceId,
        revision: Revision,
        after: Option<&[u8]>,
        limit: i64,
        max_bytes: usize,
    ) -> Result<Vec<KeyValue>> {
        let _ = max_bytes;
        let range = page_range(after);
        let mut rows = self
            .range(
                keyspace,
                RangeQuery {
                    range: &range,
                    revision,
                    // One more than the page, as a paginating client asks: the datastore
                    // then knows the next page's count from this one's.
                    limit: Some(limit.max(1) + 1),
                    keys_only: false,
                    count_only: false,
                },
            )
            .await?
            .kvs;
        rows.truncate(limit.max(1) as usize);
        Ok(rows)
    }

    /// The [`RowDigest`](row_digest::RowDigest) of the keys live at `revision`, computed by
    /// the datastore itself, without sending the rows; `None` where it cannot (the caller
    /// reads the rows in pages and digests them). Fails as [`Backend::range`] does for a
    /// compacted or future revision.
    async fn row_digest(
        &self,
        keyspace: KeyspaceId,
        revision: Revision,
    ) -> Result<Option<row_digest::RowDigest>> {
        let _ = (keyspace, revision);
        Ok(None)
    }

    /// Starts a write transaction holding the keyspace's write lock.
    async fn begin_write(&self, keyspace: KeyspaceId) -> Result<Box<dyn WriteTxn>>;

    /// Starts the write transaction of a group-commit batch naming `keys.all`, with their
    /// current rows looked up ([`WriteTxn::prefetch`]). The writer commits it with
    /// [`WriteTxn::commit_pipelined`] and, on [`KineError::Conflict`](crate::error::KineError::Conflict)
    /// (nothing written), runs the batch again on [`Backend::begin_write`]. So a datastore
    /// may start it without the write lock, taking the lock only to commit and refusing a
    /// keyspace changed since it read (PostgreSQL, when `optimistic`: the batch holds only
    /// transactions), or on top of this process's commit still awaiting its acknowledgement,
    /// from state that may lag other processes (NATS). By default, `begin_write` and
    /// `prefetch`.
    async fn begin_group_write(
        &self,
        keyspace: KeyspaceId,
        keys: &BatchKeys,
        optimistic: bool,
    ) -> Result<Box<dyn WriteTxn>> {
        let _ = optimistic;
        let mut txn = self.begin_write(keyspace).await?;
        txn.prefetch(&keys.all).await?;
        Ok(txn)
    }

    /// One lease, if it exists.
    async fn lease(&self, keyspace: KeyspaceId, id: i64) -> Result<Option<LeaseRecord>>;

    /// Every lease of the keyspace.
    async fn leases(&self, keyspace: KeyspaceId) -> Result<Vec<LeaseRecord>>;

    /// The current keys attached to a lease, in key order.
    async fn lease_keys(&self, keyspace: KeyspaceId, id: i64) -> Result<Vec<Bytes>>;

    /// Leases whose deadline is at or before `now_ms`.
    async fn expired_leases(&self, keyspace: KeyspaceId, now_ms: i64) -> Result<Vec<i64>>;

    /// Pushes a lease's deadline to `now_ms + ttl`; `None` when it does not exist (or has
    /// expired: while the keyspace is frozen, expiry is paused, so a lease whose deadline was
    /// still ahead when the freeze began is renewed). Renewal is not a write of the keyspace:
    /// it takes no revision and is allowed when frozen.
    async fn renew_lease(
        &self,
        keyspace: KeyspaceId,
        id: i64,
        now_ms: i64,
    ) -> Result<Option<LeaseRecord>>;

    /// [`Backend::renew_lease`] for several leases at once (a keep-alive flood's batch); the
    /// answers in the order of `ids`. Datastores that can store them together override it.
    async fn renew_leases(
        &self,
        keyspace: KeyspaceId,
        ids: &[i64],
        now_ms: i64,
    ) -> Result<Vec<Option<LeaseRecord>>> {
        let mut renewed = Vec::with_capacity(ids.len());
        for id in ids {
            renewed.push(self.renew_lease(keyspace, *id, now_ms).await?);
        }
        Ok(renewed)
    }

    /// Physically removes up to `batch` rows that compaction at `revision` made unreachable;
    /// returns how many it removed (0 when done).
    async fn purge_compacted(
        &self,
        keyspace: KeyspaceId,
        revision: Revision,
        batch: i64,
    ) -> Result<u64>;

    /// Allocated and in-use sizes of the datastore, in bytes.
    async fn size(&self) -> Result<(i64, i64)>;

    /// Gives free space back (etcd's Defragment).
    async fn defragment(&self) -> Result<()>;

    /// Brings the datastore's planner statistics up to date after a bulk import (a
    /// migration's copy), so that the reads that follow are planned for the rows now there.
    async fn refresh_statistics(&self) -> Result<()> {
        Ok(())
    }

    /// Whether the keyspaces' writers run on the write threads ([`crate::write_thread`]),
    /// where this backend drives its connections too (the SQL backends). Not NATS: its
    /// client's connection runs on the service's runtime, and a writer on the write threads
    /// crossed between threads four times a batch (one client's put p50 0.33 → 0.40–0.45 ms).
    fn writes_on_write_thread(&self) -> bool {
        false
    }

    /// How often this process's change feed looks for commits made by other processes
    /// ([`feed`]); `None` when the datastore announces every commit (or this process is its
    /// only writer), so the feed polls only as a safety net ([`feed::SAFETY_POLL`]).
    fn poll_cadence(&self) -> Option<feed::PollCadence>;

    /// This process's change feed of the datastore: what wakes watch hubs for commits made
    /// by other processes (see [`feed`]).
    fn feed(&self) -> &Arc<feed::CommitFeed>;

    /// The current revisions of `keyspaces` (deleted ones are left out): the feed's poll, for
    /// all watched keyspaces at once. Datastores that can read them in one statement override
    /// it.
    async fn revisions(&self, keyspaces: &[KeyspaceId]) -> Result<Vec<(KeyspaceId, Revision)>> {
        let mut revisions = Vec::with_capacity(keyspaces.len());
        for &id in keyspaces {
            match self.state(id).await {
                Ok(state) => revisions.push((id, state.revision)),
                Err(KineError::KeyspaceDeleted) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(revisions)
    }
}

/// A write transaction on one keyspace, holding its write lock until commit or drop.
///
/// Reads see the transaction's own earlier writes. Dropping it without
/// [`commit`](WriteTxn::commit) rolls everything back.
#[async_trait]
pub trait WriteTxn: Send {
    /// The keyspace's counters as of the start of the transaction.
    fn state(&self) -> KeyspaceState;

    /// The longest key the datastore can store, and its driver's name; `None` when unlimited.
    fn key_limit(&self) -> Option<(usize, &'static str)> {
        None
    }

    /// Looks up the current rows of `keys` in one go, so later [`get`](WriteTxn::get)s of
    /// them need no round trip (a group-commit batch calls it with every key it names).
    async fn prefetch(&mut self, keys: &[Bytes]) -> Result<()> {
        let _ = keys;
        Ok(())
    }

    /// Like [`prefetch`](WriteTxn::prefetch) for keys the caller knows have no row in the
    /// keyspace at all (a migration's snapshot page into its own import, whose pages never
    /// overlap): a datastore may record them as absent without reading. By default, a
    /// prefetch.
    async fn prefetch_absent(&mut self, keys: &[Bytes]) -> Result<()> {
        self.prefetch(keys).await
    }

    /// The current, live key-value of `key`.
    async fn get(&mut self, key: &[u8]) -> Result<Option<KeyValue>>;

    /// Reads inside the transaction: at the current state (`revision <= 0`, including this
    /// transaction's writes) or at an older revision the caller has already checked. The
    /// returned `revision` is the transaction's starting revision; callers set their own.
    async fn range(&mut self, query: RangeQuery<'_>) -> Result<RangeRows>;

    /// The keys in `range` written after revision `after` (this transaction's own writes
    /// included), each once, with whether it was live at `after`: what turns a read made at
    /// `after` outside the lock into a read of the current state (see [`crate::txn`]).
    ///
    /// Looks at no more than `limit` writes; `None` when there were more, when compaction may
    /// have removed some of them (the compaction revision is above `after`), or when the
    /// backend cannot tell. The caller then reads the range itself.
    async fn written_since(
        &mut self,
        range: &KeyRange,
        after: Revision,
        limit: i64,
    ) -> Result<Option<Vec<Written>>> {
        let _ = (range, after, limit);
        Ok(None)
    }

    /// Writes `kv` as the key's new current row (its revisions and version as given) at
    /// position `sub` in its revision, superseding the key's previous row.
    async fn put(&mut self, kv: &KeyValue, sub: i64) -> Result<()>;

    /// Writes a tombstone for `key` at `revision`, superseding its current row.
    async fn delete(&mut self, key: &[u8], revision: Revision, sub: i64) -> Result<()>;

    /// One lease, if it exists.
    async fn lease(&mut self, id: i64) -> Result<Option<LeaseRecord>>;

    /// Called under the write lock before an expired lease is revoked: makes sure no
    /// keep-alive can renew it any more, and says `false` when one renewed it meanwhile
    /// (then it is not revoked). Datastores whose keep-alives take the same write lock
    /// need nothing here.
    async fn claim_expiry(&mut self, id: i64, now_ms: i64) -> Result<bool> {
        let _ = (id, now_ms);
        Ok(true)
    }

    /// The largest id of the keyspace's leases; 0 without leases.
    async fn max_lease_id(&mut self) -> Result<i64>;

    /// How many leases the keyspace holds (including this transaction's changes).
    async fn lease_count(&mut self) -> Result<i64>;

    /// Stores a new lease.
    async fn insert_lease(&mut self, lease: LeaseRecord) -> Result<()>;

    /// Removes a lease (its keys are deleted by the caller).
    async fn delete_lease(&mut self, id: i64) -> Result<()>;

    /// The current keys attached to a lease, in key order.
    async fn lease_keys(&mut self, id: i64) -> Result<Vec<Bytes>>;

    /// Records a new compaction revision (history is purged later, in batches).
    async fn set_compact_revision(&mut self, revision: Revision) -> Result<()>;

    /// Sets or clears the keyspace's freeze flag; idempotent. Freezing records when the
    /// freeze began; unfreezing pushes every lease's deadline by the time spent frozen (never
    /// beyond its TTL from now), so expiry resumes with the remaining TTLs.
    async fn set_frozen(&mut self, frozen: bool) -> Result<()>;

    /// Sets the keyspace's quota.
    async fn set_quota(&mut self, quota: Quota) -> Result<()>;

    /// Sets the keyspace's part in a migration, the revision compaction may not pass (0:
    /// none) and the migration's record.
    async fn set_migration(
        &mut self,
        role: MigrationRole,
        pinned_revision: Revision,
        record: Option<&str>,
    ) -> Result<()>;

    /// Stores `revision` as the keyspace's counter and commits.
    async fn commit(self: Box<Self>, revision: Revision) -> Result<()>;

    /// Starts the commit and returns once the next write transaction may begin; the
    /// returned [`PendingCommit`] resolves when the commit is durable (or has failed), and
    /// nothing of it may be acknowledged before. By default, commits before returning.
    async fn commit_pipelined(self: Box<Self>, revision: Revision) -> Result<PendingCommit> {
        self.commit(revision).await?;
        Ok(Box::pin(std::future::ready(Ok(()))))
    }
}

/// A commit on its way: resolves once it is durable, or failed (see
/// [`WriteTxn::commit_pipelined`]).
pub type PendingCommit = std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>;

/// Opens the backend an `--endpoint` names.
pub async fn open(endpoint: &str, options: &BackendOptions) -> Result<Arc<dyn Backend>> {
    if endpoint == "memory://" || endpoint.starts_with("memory:") {
        return Ok(Arc::new(sqlite::open_memory().await?));
    }
    if let Some(path) = endpoint.strip_prefix("sqlite://") {
        return Ok(Arc::new(sqlite::open(path, options).await?));
    }
    if endpoint.starts_with("postgres://") || endpoint.starts_with("postgresql://") {
        return Ok(Arc::new(postgres::open(endpoint, options).await?));
    }
    if endpoint.starts_with("mysql://") {
        return Ok(Arc::new(mysql::open(endpoint, options).await?));
    }
    if endpoint.starts_with("nats://") {
        return Ok(Arc::new(nats::open(endpoint, options).await?));
    }
    if crate::etcd_proxy::is_etcd_endpoint(endpoint) {
        // The etcd proxy serves tenants through its own seam (`crate::etcd_proxy`); it is not
        // a storage backend, so it cannot be opened here (e.g. by `kine-rs migrate`).
        return Err(KineError::Unsupported(
            "an etcd endpoint here (etcd is served by the etcd proxy; `kine-rs migrate` reads \
             and writes sqlite://, memory://, postgres://, mysql:// and nats:// only)",
        ));
    }
    Err(KineError::Unsupported(
        "this --endpoint scheme (expected sqlite://PATH, memory://, postgres://..., mysql://... \
         or nats://...)",
    ))
}

/// Settings that apply to every backend.
#[derive(Debug, Clone, Default)]
pub struct BackendOptions {
    /// Trade durability for speed: acknowledged writes may be lost on power failure (never on
    /// a crash of kine-rs itself).
    pub relaxed_durability: bool,
    /// SQLite: the write-ahead log's size past which it is restarted (`--sqlite-wal-limit-bytes`);
    /// 0 for the default.
    pub sqlite_wal_limit_bytes: u64,
    /// The connection pool of a database server (PostgreSQL, MySQL).
    pub pool: PoolOptions,
    /// TLS to a database server.
    pub tls: TlsFiles,
}

/// kine's `--datastore-*` pool flags.
#[derive(Debug, Clone, Default)]
pub struct PoolOptions {
    /// Most connections open at once; 0 for the default.
    pub max_open: u32,
    /// Connections kept open while idle.
    pub max_idle: u32,
    /// Connections are closed after this long; `None` to keep them.
    pub max_lifetime: Option<Duration>,
    /// Idle connections (beyond `max_idle`) are closed after this long; `None` to keep them.
    pub max_idle_time: Option<Duration>,
}

/// Connections most a server pool opens when `--datastore-max-open-connections` is 0.
pub const DEFAULT_MAX_OPEN: u32 = 16;
/// How long a request waits for a database connection. While the database is down this is
/// how long a request takes to fail with `Unavailable` (sqlx keeps retrying a refused
/// connection until then), so it is short; a healthy pool hands out connections in
/// microseconds.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections a running process keeps busy besides the idle ones kine's flag counts: a
/// writer, the LISTEN connection, a watch hub reading new events, the lease-expiry loop. They
/// are opened up front: opening one on demand (TLS, authentication) stalled a watch's
/// events for 20–90 ms behind it.
pub const BUSY_CONNECTIONS: u32 = 4;
/// Connections of a server pool kept for watch hubs' reads of new events and the change
/// feed's poll, besides the pool of `--datastore-max-open-connections`. All of them are
/// opened up front, like the [`BUSY_CONNECTIONS`]: with one opened at start, the first hub
/// read that met the feed's poll (or another hub's read) waited ~100 ms for a new
/// connection's TLS and authentication while the events piled up, and a watch across two
/// processes at 1,000 writes/s had a p99 of 50–90 ms instead of a few.
pub const WATCH_CONNECTIONS: u32 = 4;

impl PoolOptions {
    /// sqlx pool options for these settings, for a server listening on `port` (every new
    /// connection gets `TCP_NODELAY`, see `nodelay.rs`).
    pub fn sqlx<DB: sqlx::Database>(&self, port: u16) -> sqlx::pool::PoolOptions<DB> {
        let max = if self.max_open == 0 {
            DEFAULT_MAX_OPEN
        } else {
            self.max_open
        };
        sqlx::pool::PoolOptions::new()
            .max_connections(max)
            .min_connections(self.max_idle.saturating_add(BUSY_CONNECTIONS).min(max))
            .max_lifetime(self.max_lifetime)
            .idle_timeout(self.max_idle_time)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            // No ping before each use: it cost every write batch and read a round trip
            // (~1.4 ms of a 7.6 ms PostgreSQL batch at 128 clients). A connection the server
            // dropped fails its statement instead, with `Unavailable`, and is discarded.
            .test_before_acquire(false)
            .after_connect(move |_, _| {
                Box::pin(async move {
                    nodelay::set_on_connections_to(port);
                    Ok(())
                })
            })
    }
}

/// Opens a server pool on the write threads, whose writers use it most: a connection's socket
/// is driven by the runtime that opened it (see [`crate::write_thread`]).
pub(crate) async fn pool_on_write_threads<DB: sqlx::Database>(
    options: sqlx::pool::PoolOptions<DB>,
    connect: <DB::Connection as sqlx::Connection>::Options,
) -> Result<sqlx::Pool<DB>> {
    Ok(crate::write_thread::run(async move { options.connect_with(connect).await }).await?)
}

/// `--ca-file`, `--cert-file` and `--key-file`: TLS to the database server.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    pub ca_file: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
}

impl TlsFiles {
    /// Whether any file is given.
    pub fn any(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }
}

/// Turns a failed schema migration into a clear error; a database migrated by a newer
/// kine-rs is named as such.
pub fn migration_error(
    error: sqlx::migrate::MigrateError,
    migrator: &sqlx::migrate::Migrator,
) -> KineError {
    let latest = migrator.iter().map(|m| m.version).max().unwrap_or(0);
    match error {
        sqlx::migrate::MigrateError::VersionMissing(version) => KineError::Storage(format!(
            "incompatible schema: the datastore has schema version {version}, newer than the \
             newest this kine-rs knows ({latest}); upgrade kine-rs"
        )),
        sqlx::migrate::MigrateError::Execute(error) => KineError::from(error),
        error => KineError::Storage(format!("schema migration failed: {error}")),
    }
}
