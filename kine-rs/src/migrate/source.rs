//! What the migration engine needs from the datastore a tenant moves *from*: the seam that
//! lets any datastore be a source.
//!
//! The engine reads a snapshot at a revision in pages, then the events after it in windows,
//! then the leases; it pins the history it still needs, freezes the source for the final
//! catch-up, and marks it moved. A [`Source`] is all of that for one tenant of one
//! datastore:
//!
//! * [`BackendSource`]: a keyspace of a datastore kine-rs owns (any [`Backend`]): the pin,
//!   the freeze and the "moved" mark are the keyspace's own records;
//! * [`super::kine_schema::KineSource`]: the `kine` table that k3s-io/kine writes, read only;
//!   the pin and the freeze are triggers on that table;
//! * [`super::etcd_prefix::EtcdPrefixSource`]: the keys under a prefix of a plain etcd (what a
//!   kube-apiserver with `--etcd-prefix` writes, e.g. Kamaji's layout), read only; etcd
//!   cannot be frozen by a client, so the writers must be stopped and the freeze is checked.
//!
//! * [`super::etcd_tenant::EtcdTenantSource`]: a tenant of kine-rs's etcd proxy
//!   (`crate::etcd_proxy`), read like an etcd prefix (the reading both share is
//!   [`super::etcd_keys::EtcdKeys`]); the pin, the freeze and the "moved" mark are the proxy's
//!   own records in etcd (every proxy's write transactions compare on the freeze record, so
//!   the freeze is a fact in etcd and `needs_stopped_writers` is false).

use async_trait::async_trait;

use crate::error::{KineError, Result};
use crate::model::{Event, KeyValue, LeaseRecord, Revision};
use crate::storage::row_digest::RowDigest;
use crate::storage::{Backend, KeyspaceId, KeyspaceState, MigrationRole, Quota, RangeQuery};

use super::record::SourceRecord;

/// A source's counters, read together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceState {
    /// The source's current revision.
    pub revision: Revision,
    /// Reads below this revision fail; 0 or -1 when never compacted.
    pub compact_revision: Revision,
    /// Live keys and their bytes (estimates are fine: they only feed the plan and progress).
    pub keys: i64,
    pub bytes: i64,
    /// Writes are refused.
    pub frozen: bool,
    /// When the freeze began (milliseconds since the epoch), 0 when not frozen: lease expiry
    /// is paused from then on.
    pub frozen_at_ms: i64,
    /// The tenant was moved away already.
    pub moved: bool,
    /// A migration holds the source's history (pinned), maybe frozen.
    pub pinned: bool,
    /// The quota the target takes over.
    pub quota: Quota,
}

/// The datastore a tenant moves from.
#[async_trait]
pub trait Source: Send + Sync {
    /// A short description for messages ("keyspace \"t\" of postgres", "kine table ...").
    fn describe(&self) -> String;

    /// Whether the source stays writable without the migration's freeze (a plain etcd):
    /// then the engine refuses to cut over unless the caller says the writers are stopped.
    fn needs_stopped_writers(&self) -> bool {
        false
    }

    /// Whether the events up to the source's revision, once read, never change: then the
    /// engine compares the events copied after its digest before the freeze, and the freeze
    /// only its own. Not so for kine's table, where a lower id may commit after a higher one
    /// was read (only the freeze waits for every insert in progress).
    fn history_is_final(&self) -> bool {
        true
    }

    /// The counters.
    async fn state(&self) -> Result<SourceState>;

    /// Undoes what an interrupted run left that would block the tenant's writers (a freeze
    /// the migration made); keeps the pin, so the import can resume.
    async fn recover(&self) -> Result<()>;

    /// Pins the history from the snapshot revision on (compaction may not pass it) and
    /// returns that revision, at which the snapshot is read.
    async fn pin(&self, target: &str) -> Result<Revision>;

    /// Whether a copy whose snapshot was read at `snapshot` can go on: the history after it
    /// is still there and pinned.
    async fn can_resume(&self, snapshot: Revision) -> Result<bool>;

    /// Up to `limit` keys live at `revision`, in key order, after `after` (all from the start
    /// when `None`).
    async fn page(
        &self,
        revision: Revision,
        after: Option<&[u8]>,
        limit: i64,
    ) -> Result<Vec<KeyValue>>;

    /// The events with revisions in `(after, up_to]`, in revision order (without `prev_kv`:
    /// the target builds its own from its history).
    async fn events(&self, after: Revision, up_to: Revision) -> Result<Vec<Event>>;

    /// [`Source::page`] in bounded memory: no more keys than add up to `max_bytes` of keys
    /// and values (one key always). By default, a page of `limit` keys: sources whose reads
    /// cannot be bounded by bytes (etcd) rely on the engine sizing `limit` from the sizes it
    /// saw.
    async fn page_within(
        &self,
        revision: Revision,
        after: Option<&[u8]>,
        limit: i64,
        max_bytes: usize,
    ) -> Result<Vec<KeyValue>> {
        let _ = max_bytes;
        self.page(revision, after, limit).await
    }

    /// The [`RowDigest`] of the keys live at `revision`, where the source's datastore
    /// computes it without sending the rows; by default `None` (the digest reads pages).
    async fn row_digest(&self, revision: Revision) -> Result<Option<RowDigest>> {
        let _ = revision;
        Ok(None)
    }

    /// [`Source::events`] in bounded memory: the events of whole revisions as long as they
    /// add up to at most `max_bytes` of keys and values (the first revision always), and the
    /// revision up to which they are complete. By default, the whole window.
    async fn events_within(
        &self,
        after: Revision,
        up_to: Revision,
        max_bytes: usize,
    ) -> Result<(Vec<Event>, Revision)> {
        let _ = max_bytes;
        Ok((self.events(after, up_to).await?, up_to))
    }

    /// The leases of the tenant's keys, with their TTLs and deadlines.
    async fn leases(&self) -> Result<Vec<LeaseRecord>>;

    /// Freezes the source: once this returns no write lands on it. Returns the state then;
    /// its revision is the final revision the copy must reach.
    async fn freeze(&self, target: &str) -> Result<SourceState>;

    /// Checks, before the switch, that nothing was written after the final revision
    /// (sources whose freeze is not enforced by the datastore look at their changes).
    async fn check_frozen(
        &self,
        final_revision: Revision,
    ) -> std::result::Result<(), super::MigrateError> {
        let _ = final_revision;
        Ok(())
    }

    /// The revision the target takes over at, once the source is frozen at
    /// `final_revision` and nothing was written since: that revision, unless the source
    /// answered clients with header revisions beyond its own writes (a tenant of the etcd
    /// proxy, whose headers are the shared etcd's), which the target must not hand out again.
    async fn switch_revision(&self, final_revision: Revision) -> Result<Revision> {
        Ok(final_revision)
    }

    /// Unfreezes the source if the migration froze it; drops the pin unless `keep_pin`
    /// (a rerun then resumes the import). A moved source is left alone.
    async fn release(&self, keep_pin: bool) -> Result<()>;

    /// Marks the source moved to `target`: it stays frozen for good, naming the target.
    async fn mark_moved(&self, target: &str) -> Result<()>;
}

pub use crate::storage::page_range;

/// A keyspace of a datastore kine-rs owns.
pub struct BackendSource<'a> {
    backend: &'a dyn Backend,
    id: KeyspaceId,
    tenant: String,
}

impl<'a> BackendSource<'a> {
    /// The keyspace `tenant` of `backend`; `None` when it does not exist.
    pub async fn open(backend: &'a dyn Backend, tenant: &str) -> Result<Option<Self>> {
        Ok(backend
            .keyspace(tenant, false)
            .await?
            .map(|id| BackendSource {
                backend,
                id,
                tenant: tenant.to_string(),
            }))
    }

    async fn record(&self) -> Result<Option<SourceRecord>> {
        let text = self.backend.migration_record(self.id).await?;
        text.as_deref()
            .map(SourceRecord::decode)
            .transpose()
            .map_err(|reason| {
                KineError::Storage(format!(
                    "the migration record of tenant {:?} cannot be read: {reason}",
                    self.tenant
                ))
            })
    }
}

fn state_of(state: &KeyspaceState) -> SourceState {
    SourceState {
        revision: state.revision,
        compact_revision: state.compact_revision,
        keys: state.keys,
        bytes: state.bytes,
        frozen: state.frozen,
        frozen_at_ms: state.frozen_at_ms,
        moved: state.migration == MigrationRole::Moved,
        pinned: state.migration == MigrationRole::Source,
        quota: state.quota,
    }
}

#[async_trait]
impl Source for BackendSource<'_> {
    fn describe(&self) -> String {
        format!("tenant {:?} of {}", self.tenant, self.backend.driver())
    }

    async fn state(&self) -> Result<SourceState> {
        Ok(state_of(&self.backend.state(self.id).await?))
    }

    async fn recover(&self) -> Result<()> {
        let state = self.backend.state(self.id).await?;
        let record = self.record().await?;
        if state.migration == MigrationRole::Source && record.as_ref().is_some_and(|r| r.froze) {
            let mut txn = self.backend.begin_write(self.id).await?;
            let state = txn.state();
            txn.set_frozen(false).await?;
            let record = SourceRecord {
                froze: false,
                ..record.unwrap_or_default()
            };
            txn.set_migration(
                MigrationRole::Source,
                state.pinned_revision,
                Some(&record.encode()),
            )
            .await?;
            txn.commit(state.revision).await?;
        }
        Ok(())
    }

    async fn pin(&self, target: &str) -> Result<Revision> {
        let mut txn = self.backend.begin_write(self.id).await?;
        let state = txn.state();
        // Read under the lock: no compaction can pass the pin once this commits.
        let snapshot = state.compact_revision.max(1);
        let record = SourceRecord {
            target: target.to_string(),
            froze: false,
        };
        txn.set_migration(MigrationRole::Source, snapshot, Some(&record.encode()))
            .await?;
        txn.commit(state.revision).await?;
        Ok(snapshot)
    }

    async fn can_resume(&self, snapshot: Revision) -> Result<bool> {
        let state = self.backend.state(self.id).await?;
        Ok(state.migration == MigrationRole::Source && state.pinned_revision == snapshot)
    }

    async fn page(
        &self,
        revision: Revision,
        after: Option<&[u8]>,
        limit: i64,
    ) -> Result<Vec<KeyValue>> {
        let range = page_range(after);
        // One more than the page, as a paginating client asks: the datastore then knows the
        // next page's count from this one's instead of counting the rest of the range again.
        let mut rows = self
            .backend
            .range(
                self.id,
                RangeQuery {
                    range: &range,
                    revision,
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

    async fn events(&self, after: Revision, up_to: Revision) -> Result<Vec<Event>> {
        self.backend.history(self.id, after, up_to).await
    }

    async fn page_within(
        &self,
        revision: Revision,
        after: Option<&[u8]>,
        limit: i64,
        max_bytes: usize,
    ) -> Result<Vec<KeyValue>> {
        (self.backend)
            .page_within(self.id, revision, after, limit, max_bytes)
            .await
    }

    async fn row_digest(&self, revision: Revision) -> Result<Option<RowDigest>> {
        self.backend.row_digest(self.id, revision).await
    }

    async fn events_within(
        &self,
        after: Revision,
        up_to: Revision,
        max_bytes: usize,
    ) -> Result<(Vec<Event>, Revision)> {
        (self.backend)
            .history_within(self.id, after, up_to, max_bytes)
            .await
    }

    async fn leases(&self) -> Result<Vec<LeaseRecord>> {
        self.backend.leases(self.id).await
    }

    async fn freeze(&self, target: &str) -> Result<SourceState> {
        let mut txn = self.backend.begin_write(self.id).await?;
        let state = txn.state();
        let record = SourceRecord {
            target: target.to_string(),
            // A source frozen by hand before the migration stays frozen if it fails.
            froze: !state.frozen,
        };
        txn.set_frozen(true).await?;
        txn.set_migration(
            MigrationRole::Source,
            state.pinned_revision,
            Some(&record.encode()),
        )
        .await?;
        let frozen = txn.state();
        txn.commit(state.revision).await?;
        Ok(state_of(&frozen))
    }

    async fn release(&self, keep_pin: bool) -> Result<()> {
        let record = self.record().await.ok().flatten();
        let mut txn = self.backend.begin_write(self.id).await?;
        let state = txn.state();
        if state.migration == MigrationRole::Moved {
            return Ok(());
        }
        if record.as_ref().is_some_and(|r| r.froze) {
            txn.set_frozen(false).await?;
        }
        if keep_pin && state.migration == MigrationRole::Source {
            let record = SourceRecord {
                froze: false,
                ..record.unwrap_or_default()
            };
            txn.set_migration(
                MigrationRole::Source,
                state.pinned_revision,
                Some(&record.encode()),
            )
            .await?;
        } else {
            txn.set_migration(MigrationRole::None, 0, None).await?;
        }
        txn.commit(state.revision).await?;
        Ok(())
    }

    async fn mark_moved(&self, target: &str) -> Result<()> {
        let mut txn = self.backend.begin_write(self.id).await?;
        let state = txn.state();
        let record = SourceRecord {
            target: target.to_string(),
            froze: false,
        };
        txn.set_migration(MigrationRole::Moved, 0, Some(&record.encode()))
            .await?;
        txn.commit(state.revision).await?;
        Ok(())
    }
}
