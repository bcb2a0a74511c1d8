//! A migration source that reads the keys under a prefix of a **plain etcd** cluster: what a
//! kube-apiserver started with `--etcd-prefix=/<name>` writes (Kamaji's etcd layout,
//! `/<schema>/…`). `--from etcd://HOST:PORT[,HOST:PORT] --from-prefix /<name>`.
//!
//! * **Keys** land in the target tenant with the prefix stripped: `/<name>/pods/a` becomes
//!   `/pods/a` (the prefix is taken as a directory: `/<name>` reads the keys under
//!   `/<name>/`, never `/<name>2/…`). The tenant's kube-apiserver then runs on kine-rs with
//!   `--etcd-prefix=/`.
//! * **Revisions** are etcd's own, global to the cluster, kept as they are: within one prefix
//!   they are sparse, which etcd semantics allow (a revision is a point in the cluster's
//!   history, not a counter of this tenant's writes), so resourceVersions stay valid.
//! * **History**: etcd's compaction cannot be held by a client, so the copy starts at the
//!   current revision `R` when it begins (a Range at `R` in pages, then the events after `R`
//!   from Watch in windows: a watch of the whole keyspace, as every revision is some key's
//!   write, so reaching the window's last revision proves the window complete; the other
//!   tenants' events are dropped as they come) and the target's compaction revision is `R`: reads and watches
//!   from before `R` are answered "compacted" there (a client relists, as after any
//!   compaction). The snapshot must be read before etcd's own compaction passes `R`
//!   (kube-apiserver compacts every 5 minutes to the revision of the previous pass, so `R`
//!   stays readable for 5 to 10 minutes); if it is not, the copy stops with "compacted" and
//!   a rerun starts over.
//! * **Leases**: `LeaseLeases`, then `LeaseTimeToLive(keys)` of each: the leases attached to a
//!   key under the prefix, with their remaining TTLs, read at the switch.
//! * **Freeze**: a plain etcd cannot be frozen without its auth (not supported here): the
//!   cut-over needs `--source-writers-stopped` (the user stopped the tenant's apiserver);
//!   the freeze point is then etcd's revision at that moment, and before the switch every
//!   change of the prefix after it (a write, a lease expiring) is looked for: one aborts the
//!   switch, and the source keeps serving. Nothing is written to the source etcd: it is not
//!   marked moved (stop its writers for good).

use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;
use kine_proto::etcdserverpb::LeaseLeasesRequest;

use crate::error::Result;
use crate::etcd_proxy::upstream_error;
use crate::model::{Event, KeyValue, LeaseRecord, Revision};
use crate::storage::Quota;

use super::MigrateError;
use super::etcd_keys::EtcdKeys;
pub use super::etcd_keys::EtcdSourceError;
use super::source::{Source, SourceState};

/// The keys under one prefix of a plain etcd, read as a migration source.
pub struct EtcdPrefixSource {
    keys: EtcdKeys,
    /// What this process did: the snapshot revision it pinned, whether it froze.
    local: Mutex<Local>,
}

#[derive(Default, Clone, Copy)]
struct Local {
    pinned: Option<Revision>,
    frozen: bool,
    usage: Option<(i64, i64)>,
}

impl EtcdPrefixSource {
    /// Connects to the etcd at `endpoint` and checks that `prefix` holds keys.
    pub async fn open(endpoint: &str, prefix: &str) -> Result<Self, EtcdSourceError> {
        let trimmed = prefix.trim_end_matches('/');
        if !trimmed.starts_with('/') || trimmed.len() < 2 {
            return Err(EtcdSourceError::BadPrefix(prefix.to_string()));
        }
        let strip = Bytes::from(trimmed.as_bytes().to_vec());
        let start = Bytes::from(format!("{trimmed}/"));
        let source = EtcdPrefixSource {
            keys: EtcdKeys::new(endpoint, strip, start)?,
            local: Mutex::new(Local::default()),
        };
        if source.keys.reachable().await? == 0 {
            return Err(EtcdSourceError::EmptyPrefix(source.keys.shown()));
        }
        Ok(source)
    }

    fn local(&self) -> Local {
        *self.local.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_local(&self, change: impl FnOnce(&mut Local)) {
        change(&mut self.local.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

#[async_trait]
impl Source for EtcdPrefixSource {
    fn describe(&self) -> String {
        format!(
            "the prefix {} of etcd at {}",
            self.keys.shown(),
            self.keys.endpoint
        )
    }

    fn needs_stopped_writers(&self) -> bool {
        true
    }

    async fn state(&self) -> Result<SourceState> {
        let local = self.local();
        let (revision, keys) = self.keys.count(0).await?;
        // Once pinned, the copy's history begins at the snapshot: the target's compaction.
        let compact = match local.pinned {
            Some(pinned) => pinned,
            None => self.keys.compact_revision(revision).await?,
        };
        let bytes = match local.usage {
            Some((_, bytes)) => bytes,
            None => {
                // Summed once.
                let bytes = self.keys.bytes_at(revision).await?;
                self.set_local(|l| l.usage = Some((keys, bytes)));
                bytes
            }
        };
        Ok(SourceState {
            revision,
            compact_revision: compact,
            keys,
            bytes,
            frozen: local.frozen,
            // etcd's leases keep running while the writers are stopped: no pause to add.
            frozen_at_ms: 0,
            moved: false,
            pinned: local.pinned.is_some(),
            quota: Quota::default(),
        })
    }

    async fn recover(&self) -> Result<()> {
        Ok(())
    }

    async fn pin(&self, _target: &str) -> Result<Revision> {
        let (revision, _) = self.keys.count(0).await?;
        self.set_local(|l| l.pinned = Some(revision));
        Ok(revision)
    }

    async fn can_resume(&self, snapshot: Revision) -> Result<bool> {
        let readable = self.keys.readable_at(snapshot).await?;
        if readable {
            self.set_local(|l| l.pinned = Some(snapshot));
        }
        Ok(readable)
    }

    async fn page(
        &self,
        revision: Revision,
        after: Option<&[u8]>,
        limit: i64,
    ) -> Result<Vec<KeyValue>> {
        self.keys.page(revision, after, limit).await
    }

    async fn events(&self, after: Revision, up_to: Revision) -> Result<Vec<Event>> {
        self.keys.events(after, up_to).await
    }

    async fn leases(&self) -> Result<Vec<LeaseRecord>> {
        let ids = self
            .keys
            .upstream
            .lease
            .clone()
            .lease_leases(LeaseLeasesRequest {})
            .await
            .map_err(upstream_error)?
            .into_inner()
            .leases;
        let mut leases = Vec::new();
        for lease in ids {
            if let Some((record, keys)) = self.keys.lease(lease.id).await?
                && keys.iter().any(|key| self.keys.covers(key))
            {
                leases.push(record);
            }
        }
        leases.sort_by_key(|lease| lease.id);
        Ok(leases)
    }

    async fn freeze(&self, _target: &str) -> Result<SourceState> {
        // The writers are stopped (the caller said so): the freeze point is now.
        self.set_local(|l| l.frozen = true);
        self.state().await
    }

    async fn check_frozen(
        &self,
        final_revision: Revision,
    ) -> std::result::Result<(), MigrateError> {
        match self
            .keys
            .first_change_after(final_revision)
            .await
            .map_err(MigrateError::Source)?
        {
            Some(what) => Err(MigrateError::SourceWritten {
                final_revision,
                what,
            }),
            None => Ok(()),
        }
    }

    async fn release(&self, keep_pin: bool) -> Result<()> {
        self.set_local(|l| {
            l.frozen = false;
            if !keep_pin {
                l.pinned = None;
            }
        });
        Ok(())
    }

    async fn mark_moved(&self, _target: &str) -> Result<()> {
        // Nothing is written to an etcd kine-rs does not own (see the module's comment).
        Ok(())
    }
}
