//! The in-memory MVCC image of one keyspace: what applying its stream's batches in order
//! produces. Every process that serves the keyspace holds one and keeps it current.
//!
//! * `rows`: per key, its rows (puts and tombstones) in revision order; the last is current.
//!   A read at revision `R` takes the key's last row with `mod_revision <= R`.
//! * `log`: `(revision, sub) -> key`, the order of events, for watches.
//! * `leases` and `lease_keys` (an index of current keys per lease).
//! * the counters of [`KeyspaceState`], usage included.
//!
//! A new compaction revision `C` prunes, in every process, rows superseded at or before `C`,
//! tombstones older than `C` and log entries before `C` (the same rows SQL's purge removes).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;

use bytes::Bytes;

use super::codec::{Batch, Freeze, LeaseOp, Migration, QuotaSetting, Row as WireRow};
use crate::model::{
    Event, EventType, KeyRange, KeyValue, LeaseRecord, RangeEnd, Revision, tombstone,
};
use crate::storage::{KeyspaceId, KeyspaceState, MigrationRole, Quota};

/// One row of a key's history.
#[derive(Debug, Clone)]
pub struct Row {
    pub kv: KeyValue,
    pub sub: i64,
    pub deleted: bool,
}

/// A batch being reassembled from chunks.
#[derive(Debug, Default)]
pub struct Partial {
    pub next: u32,
    pub count: u32,
    pub data: Vec<u8>,
    /// The sequence of the first chunk.
    pub first_seq: u64,
    /// Whether the first chunk followed the image's sequence without a gap.
    pub contiguous: bool,
}

#[derive(Debug)]
pub struct Image {
    /// The last stream sequence consumed (chunks included).
    pub seq: u64,
    pub partial: Option<Partial>,
    pub revision: Revision,
    pub compact_revision: Revision,
    pub frozen: bool,
    pub frozen_at_ms: i64,
    pub keys: i64,
    pub bytes: i64,
    pub quota: Quota,
    pub migration: MigrationRole,
    pub pinned_revision: Revision,
    pub record: Option<String>,
    /// The compaction revision of the last snapshot in the stream.
    pub snapshot_compact: Revision,
    pub rows: BTreeMap<Bytes, Vec<Row>>,
    pub log: BTreeMap<(Revision, i64), Bytes>,
    pub leases: HashMap<i64, LeaseRecord>,
    pub lease_keys: HashMap<i64, BTreeSet<Bytes>>,
}

impl Default for Image {
    fn default() -> Self {
        Image {
            seq: 0,
            partial: None,
            revision: 1,
            compact_revision: -1,
            frozen: false,
            frozen_at_ms: 0,
            keys: 0,
            bytes: 0,
            quota: Quota::default(),
            migration: MigrationRole::None,
            pinned_revision: 0,
            record: None,
            snapshot_compact: -1,
            rows: BTreeMap::new(),
            log: BTreeMap::new(),
            leases: HashMap::new(),
            lease_keys: HashMap::new(),
        }
    }
}

/// The bytes a live key-value counts for in the usage counters.
pub fn live_size(kv: &KeyValue) -> i64 {
    (kv.key.len() + kv.value.len()) as i64
}

/// The key bounds of a range; `None` when it is empty.
pub fn bounds(range: &KeyRange) -> Option<(Bound<Bytes>, Bound<Bytes>)> {
    let start = Bound::Included(range.start.clone());
    match &range.end {
        RangeEnd::Single => Some((start, Bound::Included(range.start.clone()))),
        RangeEnd::Unbounded => Some((start, Bound::Unbounded)),
        RangeEnd::Before(end) if end > &range.start => Some((start, Bound::Excluded(end.clone()))),
        RangeEnd::Before(_) => None,
    }
}

/// The row of `chain` visible at `at` (the current one for `None`), when it is live.
pub fn visible(chain: &[Row], at: Option<Revision>) -> Option<&KeyValue> {
    let row = match at {
        None => chain.last()?,
        Some(at) => {
            let index = chain.partition_point(|row| row.kv.mod_revision <= at);
            chain.get(index.checked_sub(1)?)?
        }
    };
    (!row.deleted).then_some(&row.kv)
}

impl Image {
    pub fn state(&self, id: KeyspaceId) -> KeyspaceState {
        KeyspaceState {
            id,
            revision: self.revision,
            compact_revision: self.compact_revision,
            frozen: self.frozen,
            frozen_at_ms: self.frozen_at_ms,
            keys: self.keys,
            bytes: self.bytes,
            quota: self.quota,
            migration: self.migration,
            pinned_revision: self.pinned_revision,
        }
    }

    /// The current, live key-value of `key`.
    pub fn current(&self, key: &[u8]) -> Option<&KeyValue> {
        visible(self.rows.get(key)?, None)
    }

    /// The live key-values of `range` at `at` (current for `None`), in key order.
    pub fn visible_in<'a>(
        &'a self,
        range: &KeyRange,
        at: Option<Revision>,
    ) -> Box<dyn Iterator<Item = &'a KeyValue> + 'a> {
        match bounds(range) {
            None => Box::new(std::iter::empty()),
            Some(bounds) => Box::new(
                self.rows
                    .range::<Bytes, _>(bounds)
                    .filter_map(move |(_, chain)| visible(chain, at)),
            ),
        }
    }

    /// Key-values of `range` at `at` (at most `limit`, without values when `keys_only`, none
    /// when `count_only`) and how many there are.
    pub fn range(
        &self,
        range: &KeyRange,
        at: Option<Revision>,
        limit: Option<i64>,
        keys_only: bool,
        count_only: bool,
    ) -> (Vec<KeyValue>, i64) {
        collect(
            self.visible_in(range, at).cloned(),
            limit,
            keys_only,
            count_only,
        )
    }

    /// The events with revisions in `(after, up_to]`, of keys in `range` when given.
    pub fn events(&self, after: Revision, up_to: Revision, range: Option<&KeyRange>) -> Vec<Event> {
        let mut events = Vec::new();
        if up_to <= after {
            return events;
        }
        let from = Bound::Excluded((after, i64::MAX));
        let to = Bound::Included((up_to, i64::MAX));
        for (&(revision, sub), key) in self.log.range((from, to)) {
            if range.is_some_and(|range| !range.contains(key)) {
                continue;
            }
            let Some(chain) = self.rows.get(key) else {
                continue;
            };
            let Some(index) = chain
                .iter()
                .rposition(|row| row.kv.mod_revision == revision && row.sub == sub)
            else {
                continue;
            };
            let row = &chain[index];
            // The key's row before this revision (a transaction may write a key more than
            // once, e.g. a put and then a delete of a range holding it: both events have
            // the row of the previous revision as their prev_kv, as in etcd).
            let prev_kv = chain[..index]
                .iter()
                .rev()
                .find(|prev| prev.kv.mod_revision < revision)
                .filter(|prev| !prev.deleted)
                .map(|prev| prev.kv.clone());
            let (kind, kv) = if row.deleted {
                (EventType::Delete, tombstone(row.kv.key.clone(), revision))
            } else {
                (EventType::Put, row.kv.clone())
            };
            events.push(Event {
                r#type: kind as i32,
                kv: Some(kv),
                prev_kv,
            });
        }
        events
    }

    /// Applies one committed batch.
    pub fn apply(&mut self, batch: Batch) {
        for row in batch.rows {
            self.apply_row(row);
        }
        for op in &batch.leases {
            self.apply_lease(op);
        }
        if let Some(freeze) = batch.freeze {
            self.frozen = freeze.frozen;
            self.frozen_at_ms = freeze.frozen_at_ms;
        }
        if let Some(quota) = batch.quota {
            self.quota = Quota {
                keys: quota.keys,
                bytes: quota.bytes,
            };
        }
        if let Some(migration) = batch.migration {
            self.migration = MigrationRole::from_code(migration.role);
            self.pinned_revision = migration.pinned_revision;
            self.record = migration.record;
        }
        self.revision = self.revision.max(batch.revision);
        if let Some(compact) = batch.compact_revision
            && compact > self.compact_revision
        {
            self.compact_revision = compact;
            self.prune(compact);
        }
    }

    fn apply_row(&mut self, row: WireRow) {
        let kv = KeyValue {
            key: row.key.clone(),
            create_revision: row.create_revision,
            mod_revision: row.mod_revision,
            version: row.version,
            lease: row.lease,
            value: row.value,
        };
        let chain = self.rows.entry(row.key.clone()).or_default();
        if let Some(previous) = chain.last()
            && !previous.deleted
        {
            self.keys -= 1;
            self.bytes -= live_size(&previous.kv);
            if previous.kv.lease != 0
                && let Some(keys) = self.lease_keys.get_mut(&previous.kv.lease)
            {
                keys.remove(&row.key);
                if keys.is_empty() {
                    self.lease_keys.remove(&previous.kv.lease);
                }
            }
        }
        if !row.deleted {
            self.keys += 1;
            self.bytes += live_size(&kv);
            if kv.lease != 0 {
                self.lease_keys
                    .entry(kv.lease)
                    .or_default()
                    .insert(row.key.clone());
            }
        }
        self.log.insert((row.mod_revision, row.sub), row.key);
        chain.push(Row {
            kv,
            sub: row.sub,
            deleted: row.deleted,
        });
    }

    fn apply_lease(&mut self, op: &LeaseOp) {
        if op.delete {
            self.leases.remove(&op.id);
        } else {
            self.leases.insert(
                op.id,
                LeaseRecord {
                    id: op.id,
                    ttl: op.ttl,
                    expires_at_ms: op.expires_at_ms,
                },
            );
        }
    }

    /// The whole retained keyspace as one batch, as of stream sequence `self.seq`.
    pub fn snapshot(&self) -> Batch {
        let rows = self
            .rows
            .values()
            .flatten()
            .map(|row| WireRow {
                key: row.kv.key.clone(),
                mod_revision: row.kv.mod_revision,
                sub: row.sub,
                create_revision: row.kv.create_revision,
                version: row.kv.version,
                lease: row.kv.lease,
                value: row.kv.value.clone(),
                deleted: row.deleted,
            })
            .collect();
        let mut leases: Vec<LeaseOp> = self
            .leases
            .values()
            .map(|lease| LeaseOp {
                id: lease.id,
                ttl: lease.ttl,
                expires_at_ms: lease.expires_at_ms,
                delete: false,
            })
            .collect();
        leases.sort_by_key(|lease| lease.id);
        Batch {
            revision: self.revision,
            rows,
            leases,
            compact_revision: Some(self.compact_revision),
            freeze: Some(Freeze {
                frozen: self.frozen,
                frozen_at_ms: self.frozen_at_ms,
            }),
            quota: Some(QuotaSetting {
                keys: self.quota.keys,
                bytes: self.quota.bytes,
            }),
            migration: Some(Migration {
                role: self.migration.code(),
                pinned_revision: self.pinned_revision,
                record: self.record.clone(),
            }),
            snapshot_of: self.seq.max(1),
        }
    }

    /// The image a snapshot describes, at stream sequence `seq`.
    pub fn restore(snapshot: Batch, seq: u64) -> Image {
        let compact = snapshot.compact_revision.unwrap_or(-1);
        let mut image = Image::default();
        image.apply(Batch {
            compact_revision: None,
            ..snapshot
        });
        image.compact_revision = compact;
        image.log = image.log.split_off(&(compact, i64::MIN));
        image.snapshot_compact = compact;
        image.seq = seq;
        image
    }

    /// Drops what compaction at `compact` made unreachable.
    fn prune(&mut self, compact: Revision) {
        self.rows.retain(|_, chain| {
            // Rows superseded at or before the compaction revision.
            let keep_from = chain
                .windows(2)
                .take_while(|pair| pair[1].kv.mod_revision <= compact)
                .count();
            chain.drain(..keep_from);
            if chain
                .last()
                .is_some_and(|row| row.deleted && row.kv.mod_revision < compact)
            {
                chain.clear();
            }
            !chain.is_empty()
        });
        self.log = self.log.split_off(&(compact, i64::MIN));
    }
}

/// Applies limit, keys-only and count-only to key-values in key order.
pub fn collect(
    kvs: impl Iterator<Item = KeyValue>,
    limit: Option<i64>,
    keys_only: bool,
    count_only: bool,
) -> (Vec<KeyValue>, i64) {
    let limit = limit.and_then(|l| usize::try_from(l).ok());
    let mut out = Vec::new();
    let mut count = 0i64;
    for mut kv in kvs {
        count += 1;
        if !count_only && limit.is_none_or(|limit| out.len() < limit) {
            if keys_only {
                kv.value = Bytes::new();
            }
            out.push(kv);
        }
    }
    (out, count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, revision: i64, value: &str) -> WireRow {
        WireRow {
            key: Bytes::copy_from_slice(key.as_bytes()),
            mod_revision: revision,
            create_revision: revision,
            version: 1,
            value: Bytes::copy_from_slice(value.as_bytes()),
            ..WireRow::default()
        }
    }

    #[test]
    fn reads_history_and_compacts() {
        let mut image = Image::default();
        for (revision, row) in [
            (2, put("a", 2, "1")),
            (3, put("a", 3, "2")),
            (4, put("b", 4, "x")),
        ] {
            image.apply(Batch {
                revision,
                rows: vec![row],
                ..Batch::default()
            });
        }
        let all = KeyRange::new(Bytes::from_static(b"a"), Bytes::from_static(b"\0"));
        let (kvs, count) = image.range(&all, Some(2), None, false, false);
        assert_eq!((kvs.len(), count), (1, 1));
        assert_eq!(kvs[0].value.as_ref(), b"1");
        let events = image.events(2, 4, None);
        assert_eq!(events.len(), 2);
        assert!(events[0].prev_kv.is_some());
        assert_eq!((image.keys, image.revision), (2, 4));
        image.apply(Batch {
            revision: 4,
            compact_revision: Some(3),
            ..Batch::default()
        });
        assert_eq!(image.rows.get(b"a".as_slice()).map(Vec::len), Some(1));
        // A snapshot restores the same reads, history and events.
        image.seq = 9;
        let restored = Image::restore(image.snapshot(), 10);
        assert_eq!(restored.state(1), image.state(1));
        assert_eq!(
            restored.range(&all, Some(3), None, false, false),
            image.range(&all, Some(3), None, false, false)
        );
        assert_eq!(restored.events(2, 4, None), image.events(2, 4, None));
        assert_eq!((restored.seq, restored.snapshot_compact), (10, 3));
        // A put and a delete of one key in one revision: both events' prev_kv is the row
        // of the revision before.
        let mut tombstone = put("b", 5, "");
        tombstone.sub = 1;
        tombstone.deleted = true;
        image.apply(Batch {
            revision: 5,
            rows: vec![put("b", 5, "y"), tombstone],
            ..Batch::default()
        });
        let events = image.events(4, 5, None);
        assert_eq!(events.len(), 2);
        for event in &events {
            assert_eq!(event.prev_kv.as_ref().map(|kv| kv.mod_revision), Some(4));
        }
        // An empty range never panics.
        let backwards = KeyRange::new(Bytes::from_static(b"b"), Bytes::from_static(b"a"));
        assert_eq!(image.range(&backwards, None, None, false, false).1, 0);
    }
}
