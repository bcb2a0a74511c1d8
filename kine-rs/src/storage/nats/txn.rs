//! A write transaction on a NATS keyspace: reads see the image plus the transaction's own
//! writes; commit publishes the whole write set as one batch with
//! `Nats-Expected-Last-Sequence` set to the sequence the transaction started from, so two
//! processes can never both commit on the same state. The loser's commit fails with
//! [`KineError::Conflict`], which the writer retries on a fresh transaction.
//!
//! The writer's transactions ([`crate::storage::Backend::begin_group_write`]) start without
//! asking the server where the stream ends, from the image or on top of this process's batch
//! still in flight (see [`super::inflight`]); the expected sequence makes their commit fail
//! when the image was behind, and a transaction that publishes nothing confirms that the
//! stream still ends where its reads started.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::OwnedMutexGuard;

use super::codec::{self, Batch, Freeze, LeaseOp, Migration, QuotaSetting};
use super::directory::Directory;
use super::image::{collect, live_size};
use super::inflight::{self, InFlight};
use super::keyspace::Keyspace;
use crate::error::{KineError, Result};
use crate::model::{KeyValue, LeaseRecord, Revision, now_ms};
use crate::storage::{
    KeyspaceState, MigrationRole, PendingCommit, Quota, RangeQuery, RangeRows, WriteTxn,
};

pub struct NatsWriteTxn {
    pub keyspace: Arc<Keyspace>,
    pub directory: Arc<Directory>,
    pub _guard: OwnedMutexGuard<()>,
    /// The stream sequence the transaction's reads started from.
    pub start_seq: u64,
    pub start: KeyspaceState,
    pub state: KeyspaceState,
    /// Keys this transaction wrote: their live key-value now (`None`: deleted).
    pub written: HashMap<Bytes, Option<KeyValue>>,
    /// Leases this transaction stored (`Some`) or removed (`None`).
    pub leases: HashMap<i64, Option<LeaseRecord>>,
    pub batch: Batch,
    /// Largest payload of one message.
    pub max_chunk: usize,
    /// Whether `start_seq` was the stream's last sequence when the transaction began.
    pub synced: bool,
    /// This process's batch in flight the transaction started on (its writes are in
    /// `written` and `leases`, and `start_seq` is where it lands).
    pub parent: Option<Arc<InFlight>>,
    /// Keys and leases this transaction wrote itself (not inherited from `parent`).
    pub own_keys: HashSet<Bytes>,
    pub own_leases: HashSet<i64>,
}

fn conflict() -> KineError {
    KineError::Conflict("the keyspace changed while the transaction was evaluated".into())
}

/// A fresh, unique `Nats-Msg-Id` for a batch.
fn message_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "kine-{:x}-{:x}-{nanos:x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A lease's effective deadline: the later of its stored one and its last keep-alive's.
pub async fn effective(
    directory: &Directory,
    keyspace: i64,
    lease: LeaseRecord,
    now: i64,
) -> Result<LeaseRecord> {
    if lease.expires_at_ms > now {
        return Ok(lease);
    }
    let renewed = directory.lease_deadline(keyspace, lease.id).await?;
    Ok(LeaseRecord {
        expires_at_ms: lease.expires_at_ms.max(renewed.unwrap_or(i64::MIN)),
        ..lease
    })
}

impl NatsWriteTxn {
    fn current(&self, key: &[u8]) -> Option<KeyValue> {
        match self.written.get(key) {
            Some(kv) => kv.clone(),
            None => self.keyspace.read().current(key).cloned(),
        }
    }

    fn write(&mut self, kv: KeyValue, sub: i64, deleted: bool) {
        if let Some(previous) = self.current(&kv.key) {
            self.state.keys -= 1;
            self.state.bytes -= live_size(&previous);
        }
        if !deleted {
            self.state.keys += 1;
            self.state.bytes += live_size(&kv);
        }
        self.batch.rows.push(codec::Row {
            key: kv.key.clone(),
            mod_revision: kv.mod_revision,
            sub,
            create_revision: kv.create_revision,
            version: kv.version,
            lease: kv.lease,
            value: kv.value.clone(),
            deleted,
        });
        self.own_keys.insert(kv.key.clone());
        self.written
            .insert(kv.key.clone(), (!deleted).then_some(kv));
    }

    fn store_lease(&mut self, lease: LeaseRecord) {
        self.batch.leases.push(LeaseOp {
            id: lease.id,
            ttl: lease.ttl,
            expires_at_ms: lease.expires_at_ms,
            delete: false,
        });
        self.own_leases.insert(lease.id);
        self.leases.insert(lease.id, Some(lease));
    }

    fn is_empty(&self, revision: Revision) -> bool {
        let b = &self.batch;
        revision == self.start.revision
            && b.rows.is_empty()
            && b.leases.is_empty()
            && b.compact_revision.is_none()
            && b.freeze.is_none()
            && b.quota.is_none()
            && b.migration.is_none()
    }

    /// Every lease as this transaction sees it.
    fn all_leases(&self) -> Vec<LeaseRecord> {
        let mut all: BTreeMap<i64, LeaseRecord> = self
            .keyspace
            .read()
            .leases
            .iter()
            .map(|(id, lease)| (*id, *lease))
            .collect();
        for (id, lease) in &self.leases {
            match lease {
                Some(lease) => all.insert(*id, *lease),
                None => all.remove(id),
            };
        }
        all.into_values().collect()
    }
}

#[async_trait]
impl WriteTxn for NatsWriteTxn {
    fn state(&self) -> KeyspaceState {
        self.state
    }

    async fn get(&mut self, key: &[u8]) -> Result<Option<KeyValue>> {
        Ok(self.current(key))
    }

    async fn range(&mut self, query: RangeQuery<'_>) -> Result<RangeRows> {
        let (kvs, count) = if query.revision > 0 {
            if self.parent.is_some() && query.revision > self.keyspace.read().revision {
                // A revision of the batch in flight, which the image does not hold yet:
                // evaluated again once it has settled.
                return Err(conflict());
            }
            // Older revisions: this transaction's writes are all newer.
            self.keyspace.read().range(
                query.range,
                Some(query.revision),
                query.limit,
                query.keys_only,
                query.count_only,
            )
        } else {
            let mut merged: BTreeMap<Bytes, KeyValue> = self
                .keyspace
                .read()
                .visible_in(query.range, None)
                .map(|kv| (kv.key.clone(), kv.clone()))
                .collect();
            for (key, kv) in &self.written {
                if query.range.contains(key) {
                    match kv {
                        Some(kv) => merged.insert(key.clone(), kv.clone()),
                        None => merged.remove(key),
                    };
                }
            }
            collect(
                merged.into_values(),
                query.limit,
                query.keys_only,
                query.count_only,
            )
        };
        Ok(RangeRows {
            revision: self.state.revision,
            kvs,
            count,
        })
    }

    async fn put(&mut self, kv: &KeyValue, sub: i64) -> Result<()> {
        self.write(kv.clone(), sub, false);
        Ok(())
    }

    async fn delete(&mut self, key: &[u8], revision: Revision, sub: i64) -> Result<()> {
        let kv = KeyValue {
            key: Bytes::copy_from_slice(key),
            mod_revision: revision,
            ..KeyValue::default()
        };
        self.write(kv, sub, true);
        Ok(())
    }

    async fn lease(&mut self, id: i64) -> Result<Option<LeaseRecord>> {
        let lease = match self.leases.get(&id) {
            Some(lease) => *lease,
            None => self.keyspace.read().leases.get(&id).copied(),
        };
        match lease {
            Some(lease) => Ok(Some(
                effective(&self.directory, self.keyspace.id, lease, now_ms()).await?,
            )),
            None => Ok(None),
        }
    }

    async fn claim_expiry(&mut self, id: i64, now_ms: i64) -> Result<bool> {
        self.directory
            .claim_expiry(self.keyspace.id, id, now_ms)
            .await
    }

    async fn max_lease_id(&mut self) -> Result<i64> {
        Ok(self
            .all_leases()
            .iter()
            .map(|lease| lease.id)
            .max()
            .unwrap_or(0))
    }

    async fn lease_count(&mut self) -> Result<i64> {
        // The stored leases adjusted by this transaction's own, without copying them all.
        let keyspace = self.keyspace.read();
        let mut count = keyspace.leases.len() as i64;
        for (id, lease) in &self.leases {
            match (lease.is_some(), keyspace.leases.contains_key(id)) {
                (true, false) => count += 1,
                (false, true) => count -= 1,
                _ => {}
            }
        }
        Ok(count)
    }

    async fn insert_lease(&mut self, lease: LeaseRecord) -> Result<()> {
        self.store_lease(lease);
        Ok(())
    }

    async fn delete_lease(&mut self, id: i64) -> Result<()> {
        self.batch.leases.push(LeaseOp {
            id,
            delete: true,
            ..LeaseOp::default()
        });
        self.own_leases.insert(id);
        self.leases.insert(id, None);
        Ok(())
    }

    async fn lease_keys(&mut self, id: i64) -> Result<Vec<Bytes>> {
        let mut keys: BTreeSet<Bytes> = self
            .keyspace
            .read()
            .lease_keys
            .get(&id)
            .cloned()
            .unwrap_or_default();
        for (key, kv) in &self.written {
            match kv {
                Some(kv) if kv.lease == id => keys.insert(key.clone()),
                _ => keys.remove(key),
            };
        }
        Ok(keys.into_iter().collect())
    }

    async fn set_compact_revision(&mut self, revision: Revision) -> Result<()> {
        self.batch.compact_revision = Some(revision);
        self.state.compact_revision = revision;
        Ok(())
    }

    async fn set_frozen(&mut self, frozen: bool) -> Result<()> {
        if frozen == self.state.frozen {
            return Ok(());
        }
        let now = now_ms();
        if !frozen && self.state.frozen_at_ms > 0 {
            // Expiry was paused: every deadline moves by the time spent frozen, but no lease
            // gets more than its TTL from now (one renewed while frozen already has it).
            let paused = (now - self.state.frozen_at_ms).max(0);
            for lease in self.all_leases() {
                let lease = effective(&self.directory, self.keyspace.id, lease, i64::MAX).await?;
                let expires_at_ms = lease
                    .expires_at_ms
                    .saturating_add(paused)
                    .min(now.saturating_add(lease.ttl.saturating_mul(1000)));
                self.store_lease(LeaseRecord {
                    expires_at_ms,
                    ..lease
                });
            }
        }
        let frozen_at_ms = if frozen { now } else { 0 };
        self.batch.freeze = Some(Freeze {
            frozen,
            frozen_at_ms,
        });
        self.state.frozen = frozen;
        self.state.frozen_at_ms = frozen_at_ms;
        Ok(())
    }

    async fn set_quota(&mut self, quota: Quota) -> Result<()> {
        self.batch.quota = Some(QuotaSetting {
            keys: quota.keys,
            bytes: quota.bytes,
        });
        self.state.quota = quota;
        Ok(())
    }

    async fn set_migration(
        &mut self,
        role: MigrationRole,
        pinned_revision: Revision,
        record: Option<&str>,
    ) -> Result<()> {
        self.batch.migration = Some(Migration {
            role: role.code(),
            pinned_revision,
            record: record.map(str::to_string),
        });
        self.state.migration = role;
        self.state.pinned_revision = pinned_revision;
        Ok(())
    }

    async fn commit(mut self: Box<Self>, revision: Revision) -> Result<()> {
        if let Some(parent) = self.parent.take() {
            // Chunks (and transactions that publish nothing) go after the batch in flight.
            if !parent.settled().await {
                return Err(conflict());
            }
            self.synced = false;
        }
        if self.is_empty(revision) {
            // Its reads were of the stream up to `start_seq`: still the latest?
            if !self.synced && self.keyspace.last_sequence().await? != self.start_seq {
                return Err(conflict());
            }
            return Ok(());
        }
        self.batch.revision = revision;
        let last = self
            .keyspace
            .publish(&self.batch, self.start_seq, self.max_chunk)
            .await?;
        let granted_or_revoked: Vec<i64> = self
            .batch
            .leases
            .iter()
            .filter(|op| op.delete || !self.keyspace.read().leases.contains_key(&op.id))
            .map(|op| op.id)
            .collect();
        let batch = std::mem::take(&mut self.batch);
        self.keyspace.apply_own(last, batch);
        // Keep-alive deadlines of revoked leases (and of re-used ids) are stale now.
        for id in granted_or_revoked {
            self.directory.forget(self.keyspace.id, id).await;
        }
        Ok(())
    }

    async fn commit_pipelined(mut self: Box<Self>, revision: Revision) -> Result<PendingCommit> {
        self.batch.revision = revision;
        let data = self.batch.encode_bytes();
        if self.is_empty(revision) || data.len() > self.max_chunk {
            self.commit(revision).await?;
            return Ok(Box::pin(std::future::ready(Ok(()))));
        }
        let msg_id = message_id();
        let started = std::time::Instant::now();
        let ack = self
            .keyspace
            .send_batch(
                data,
                self.start_seq,
                &msg_id,
                self.parent.as_ref().map(|parent| parent.msg_id.as_str()),
            )
            .await?;
        let last = self.start_seq + 1;
        let granted_or_revoked: Vec<i64> = {
            let image = self.keyspace.read();
            self.batch
                .leases
                .iter()
                .filter(|op| op.delete || !image.leases.contains_key(&op.id))
                .map(|op| op.id)
                .collect()
        };
        let (mut written, mut leases) = (
            std::mem::take(&mut self.written),
            std::mem::take(&mut self.leases),
        );
        inflight::own(&mut written, &self.own_keys);
        inflight::own(&mut leases, &self.own_leases);
        // The next batch's revisions follow this one's.
        self.state.revision = revision;
        let in_flight = Arc::new(InFlight::new(
            last,
            msg_id,
            self.state,
            written,
            leases,
            self.parent.take(),
        ));
        self.keyspace.set_in_flight(in_flight.clone());
        let batch = std::mem::take(&mut self.batch);
        let (keyspace, directory) = (self.keyspace.clone(), self.directory.clone());
        // Releases the write lock: the next transaction may start on top of this batch.
        drop(self);
        let settle = tokio::spawn(async move {
            let acked = ack.await.map_err(|error| keyspace.publish_error(error));
            crate::metrics::sql_query("nats", "publish", started.elapsed(), acked.as_ref().err());
            // Applied in stream order: after the batch below it.
            let parent_stored = in_flight.parent_settled().await;
            let result = match acked {
                Ok(ack) if parent_stored && keyspace.apply_after(ack.sequence, batch) => Ok(()),
                // Stored after a batch whose acknowledgement was lost: the follower applies
                // both, in order.
                Ok(ack) => keyspace.wait_applied(ack.sequence).await,
                Err(error) => Err(error),
            };
            in_flight.settle(result.is_ok());
            keyspace.clear_in_flight(&in_flight);
            if result.is_ok() {
                for id in granted_or_revoked {
                    directory.forget(keyspace.id, id).await;
                }
            }
            result
        });
        Ok(Box::pin(async move {
            settle.await.map_err(|error| {
                KineError::Storage(format!("NATS: a commit task failed: {error}"))
            })?
        }))
    }
}
