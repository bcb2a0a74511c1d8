//! What this process knows of the keyspaces it committed to last (PostgreSQL, SQLite): the
//! keyspace's version (PostgreSQL: the keyspace row's `xmin`; SQLite: the batch connection's
//! `data_version`, `super::UnreadBatch`) and counters after its own commit, and the rows of
//! the keys that commit read or wrote. A write batch whose keys are all known here skips its read and goes
//! straight to the commit call, whose version check refuses it if anything changed the
//! keyspace since (another process's commit, a compaction, a freeze): the writer then runs
//! the batch again under the lock, as after any conflict. The check is what keeps this
//! correct; the cache only decides how often a batch costs one round trip instead of two.
//!
//! A keyspace another process writes to would make every cached batch fail once: after a
//! conflict the keyspace is left out for a while.
//!
//! Keys the batch's requests would create (a plain put's, a compare with revision 0) that the
//! cache does not know are taken for absent, and the commit call refuses the batch if one has a
//! live row: creates of new keys cost one round trip too. A workload of overwrites of keys this
//! process has not seen (after a restart, past the byte budget) would be refused batch after
//! batch, so after such a refusal the keyspace's batches read unknown keys again for a while.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::model::KeyValue;
use crate::storage::{KeyspaceId, KeyspaceState};

/// Keys and values kept per keyspace; past it the keyspace's keys are dropped and refilled.
const MAX_BYTES_PER_KEYSPACE: usize = 8 << 20;
/// Keyspaces kept; past it all are dropped (a gateway's busiest tenants refill it).
const MAX_KEYSPACES: usize = 256;
/// How long a keyspace whose cached batch was refused is left out.
const CONTENDED_FOR: Duration = Duration::from_secs(5);
/// How long a keyspace whose batch took a live key for absent reads unknown keys instead.
const REFUSED_FOR: Duration = Duration::from_secs(1);
/// What a key costs besides its key and value (the map's entry, the `KeyValue`).
const KEY_OVERHEAD: usize = 96;

/// One key as a write transaction knows it.
#[derive(Clone)]
pub(super) struct CachedKey {
    /// Its live key-value, `None` when it has none (never written, or deleted).
    pub live: Option<KeyValue>,
    /// The database holds a current row (head) of it, live or a tombstone.
    pub stored_current: bool,
}

/// What a write batch starts from when all its keys are known.
pub(super) struct Hit {
    pub version: String,
    pub state: KeyspaceState,
    pub keys: Vec<(Bytes, CachedKey)>,
}

struct Entry {
    version: String,
    state: KeyspaceState,
    keys: HashMap<Bytes, CachedKey>,
    bytes: usize,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<KeyspaceId, Entry>,
    contended: HashMap<KeyspaceId, Instant>,
    /// Keyspaces whose batches may not take unknown keys for absent, until when.
    refused: HashMap<KeyspaceId, Instant>,
}

/// See the module documentation.
#[derive(Default)]
pub(super) struct CommitCache {
    inner: Mutex<Inner>,
}

fn cost(key: &Bytes, cached: &CachedKey) -> usize {
    key.len() + cached.live.as_ref().map_or(0, |kv| kv.value.len()) + KEY_OVERHEAD
}

impl CommitCache {
    /// The keyspace as of this process's last commit to it, with those of `keys` it knows,
    /// in their order (all of them: the batch needs no read; some: they are good if the
    /// batch's read finds the keyspace still at this version).
    pub fn lookup(&self, keyspace: KeyspaceId, keys: &[&[u8]]) -> Option<Hit> {
        let inner = self.inner.lock().ok()?;
        let entry = inner.entries.get(&keyspace)?;
        let known: Vec<_> = keys
            .iter()
            .filter_map(|key| entry.keys.get_key_value(*key))
            .map(|(key, cached)| (key.clone(), cached.clone()))
            .collect();
        Some(Hit {
            version: entry.version.clone(),
            state: entry.state,
            keys: known,
        })
    }

    /// Records a commit of this process: the keyspace is now at `version` with `state`, and
    /// `keys` are as given. Keys known from before stay when the commit started from the
    /// version they were known at (nothing else changed the keyspace in between).
    pub fn store(
        &self,
        keyspace: KeyspaceId,
        read_version: &str,
        version: String,
        state: KeyspaceState,
        keys: impl IntoIterator<Item = (Bytes, CachedKey)>,
    ) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let now = Instant::now();
        inner.contended.retain(|_, until| *until > now);
        if inner.contended.contains_key(&keyspace) {
            return;
        }
        if !inner.entries.contains_key(&keyspace) && inner.entries.len() >= MAX_KEYSPACES {
            inner.entries.clear();
        }
        let entry = inner.entries.entry(keyspace).or_insert_with(|| Entry {
            version: String::new(),
            state,
            keys: HashMap::new(),
            bytes: 0,
        });
        if entry.version != read_version {
            entry.keys.clear();
            entry.bytes = 0;
        }
        entry.version = version;
        entry.state = state;
        for (key, mut cached) in keys {
            // Own copies: a key or value may be a slice of a whole request's or row set's
            // buffer, which keeping it would keep too.
            let key = Bytes::copy_from_slice(&key);
            if let Some(kv) = cached.live.as_mut() {
                kv.key = key.clone();
                kv.value = Bytes::copy_from_slice(&kv.value);
            }
            let added = cost(&key, &cached);
            if let Some(old) = entry.keys.insert(key.clone(), cached) {
                entry.bytes -= cost(&key, &old);
            }
            entry.bytes += added;
        }
        if entry.bytes > MAX_BYTES_PER_KEYSPACE {
            entry.keys.clear();
            entry.bytes = 0;
        }
    }

    /// Whether a batch of the keyspace may take keys the cache does not know for absent
    /// (not for [`REFUSED_FOR`] after a batch that did was refused).
    pub fn may_take_absent(&self, keyspace: KeyspaceId) -> bool {
        let Ok(mut inner) = self.inner.lock() else {
            return false;
        };
        match inner.refused.get(&keyspace) {
            Some(until) if *until > Instant::now() => false,
            Some(_) => {
                inner.refused.remove(&keyspace);
                true
            }
            None => true,
        }
    }

    /// A batch that took keys for absent was refused (one of them was live, or the keyspace
    /// changed): the keyspace's next batches read their unknown keys for a while.
    pub fn refused_absent(&self, keyspace: KeyspaceId) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.entries.remove(&keyspace);
            if inner.refused.len() >= MAX_KEYSPACES {
                let now = Instant::now();
                inner.refused.retain(|_, until| *until > now);
            }
            inner.refused.insert(keyspace, Instant::now() + REFUSED_FOR);
        }
    }

    /// Something other than a cached batch changed the keyspace, or may have.
    pub fn forget(&self, keyspace: KeyspaceId) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.entries.remove(&keyspace);
        }
    }

    /// A batch that started from the cache was refused: another process writes here too.
    pub fn contended(&self, keyspace: KeyspaceId) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.entries.remove(&keyspace);
            inner
                .contended
                .insert(keyspace, Instant::now() + CONTENDED_FOR);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{MigrationRole, Quota};

    fn state(revision: i64) -> KeyspaceState {
        KeyspaceState {
            id: 1,
            revision,
            compact_revision: -1,
            frozen: false,
            frozen_at_ms: 0,
            keys: 0,
            bytes: 0,
            quota: Quota::default(),
            migration: MigrationRole::default(),
            pinned_revision: 0,
        }
    }

    fn live(key: &'static [u8], value: &'static [u8]) -> (Bytes, CachedKey) {
        let key = Bytes::from_static(key);
        let kv = KeyValue {
            key: key.clone(),
            value: Bytes::from_static(value),
            ..KeyValue::default()
        };
        (
            key,
            CachedKey {
                live: Some(kv),
                stored_current: true,
            },
        )
    }

    /// How many of `keys` the cache knows (`None`: nothing of the keyspace).
    fn known(cache: &CommitCache, keyspace: KeyspaceId, keys: &[&[u8]]) -> Option<usize> {
        cache.lookup(keyspace, keys).map(|hit| hit.keys.len())
    }

    #[test]
    fn a_lookup_answers_the_known_keys() {
        let cache = CommitCache::default();
        cache.store(1, "", "10".into(), state(2), [live(b"a", b"1")]);
        assert_eq!(known(&cache, 1, &[b"a"]), Some(1));
        assert_eq!(
            known(&cache, 1, &[b"a", b"b"]),
            Some(1),
            "only `a` is known"
        );
        assert_eq!(known(&cache, 2, &[b"a"]), None);
    }

    #[test]
    fn keys_known_at_another_version_are_dropped() {
        let cache = CommitCache::default();
        cache.store(1, "", "10".into(), state(2), [live(b"a", b"1")]);
        // Continues from version 10: `a` stays.
        cache.store(1, "10", "11".into(), state(3), [live(b"b", b"2")]);
        let hit = cache.lookup(1, &[b"a", b"b"]).expect("known");
        assert_eq!(hit.keys.len(), 2);
        assert_eq!(hit.version, "11");
        assert_eq!(hit.state.revision, 3);
        // Read at version 20 (someone else committed): only what that commit knew stays.
        cache.store(1, "20", "21".into(), state(9), [live(b"c", b"3")]);
        assert_eq!(known(&cache, 1, &[b"a"]), Some(0));
        assert_eq!(known(&cache, 1, &[b"c"]), Some(1));
    }

    #[test]
    fn a_contended_keyspace_is_left_out_and_forgetting_drops_it() {
        let cache = CommitCache::default();
        cache.store(1, "", "10".into(), state(2), [live(b"a", b"1")]);
        cache.contended(1);
        assert_eq!(known(&cache, 1, &[b"a"]), None);
        cache.store(1, "", "12".into(), state(4), [live(b"a", b"1")]);
        assert_eq!(known(&cache, 1, &[b"a"]), None, "stored while contended");
        cache.store(2, "", "10".into(), state(2), [live(b"a", b"1")]);
        cache.forget(2);
        assert_eq!(known(&cache, 2, &[b"a"]), None);
    }

    #[test]
    fn a_refused_absent_key_pauses_taking_keys_for_absent() {
        let cache = CommitCache::default();
        cache.store(1, "", "10".into(), state(2), [live(b"a", b"1")]);
        assert!(cache.may_take_absent(1));
        cache.refused_absent(1);
        assert!(!cache.may_take_absent(1));
        assert_eq!(known(&cache, 1, &[b"a"]), None, "the entry is dropped");
        assert!(cache.may_take_absent(2), "other keyspaces go on");
        // Stored again (the batch's read), known again; taking for absent waits its pause.
        cache.store(1, "", "12".into(), state(4), [live(b"a", b"1")]);
        assert_eq!(known(&cache, 1, &[b"a"]), Some(1));
        assert!(!cache.may_take_absent(1));
        cache
            .inner
            .lock()
            .expect("lock")
            .refused
            .insert(1, Instant::now());
        assert!(cache.may_take_absent(1), "after the pause");
    }

    #[test]
    fn a_keyspace_past_its_byte_budget_starts_over() {
        let cache = CommitCache::default();
        let big: &'static [u8] = Box::leak(vec![0u8; MAX_BYTES_PER_KEYSPACE].into_boxed_slice());
        cache.store(1, "", "10".into(), state(2), [live(b"a", big)]);
        assert_eq!(known(&cache, 1, &[b"a"]), Some(0));
        // The version is still known: the next commit's keys are kept.
        cache.store(1, "10", "11".into(), state(3), [live(b"b", b"1")]);
        assert_eq!(known(&cache, 1, &[b"b"]), Some(1));
    }
}
