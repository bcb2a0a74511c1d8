//! The data model shared by every backend: key ranges, key-values, events and leases.
//!
//! A key-value and an event are etcd's own wire messages (`mvccpb`), so what a backend reads is
//! what a client receives, without a copy in between.

use bytes::Bytes;
pub use kine_proto::mvccpb::{Event, KeyValue, event::EventType};

/// A revision of a keyspace: one per write transaction, gapless, starting at 1.
pub type Revision = i64;

/// Which keys a request covers, decoded once from etcd's `key`/`range_end` convention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRange {
    pub start: Bytes,
    pub end: RangeEnd,
}

/// The upper end of a [`KeyRange`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeEnd {
    /// Only `start` itself (an empty `range_end`).
    Single,
    /// Every key `>= start` (a `range_end` of `"\0"`).
    Unbounded,
    /// Keys in `[start, end)`; empty when `end <= start`.
    Before(Bytes),
}

impl KeyRange {
    /// Decodes etcd's `key`/`range_end` pair.
    pub fn new(key: Bytes, range_end: Bytes) -> Self {
        let end = if range_end.is_empty() {
            RangeEnd::Single
        } else if range_end.as_ref() == [0] {
            RangeEnd::Unbounded
        } else {
            RangeEnd::Before(range_end)
        };
        KeyRange { start: key, end }
    }

    /// A range of one key.
    pub fn single(key: Bytes) -> Self {
        KeyRange {
            start: key,
            end: RangeEnd::Single,
        }
    }

    /// Whether `key` lies in the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        match &self.end {
            RangeEnd::Single => key == self.start.as_ref(),
            RangeEnd::Unbounded => key >= self.start.as_ref(),
            RangeEnd::Before(end) => key >= self.start.as_ref() && key < end.as_ref(),
        }
    }

    /// The exclusive upper bound, or `None` when unbounded. A single key `k` is `[k, k\0)`.
    pub fn exclusive_end(&self) -> Option<Bytes> {
        match &self.end {
            RangeEnd::Single => {
                let mut end = Vec::with_capacity(self.start.len() + 1);
                end.extend_from_slice(&self.start);
                end.push(0);
                Some(Bytes::from(end))
            }
            RangeEnd::Unbounded => None,
            RangeEnd::Before(end) => Some(end.clone()),
        }
    }
}

/// A lease as stored: its granted TTL and the wall-clock deadline it expires at, so a restart
/// keeps the remaining time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseRecord {
    pub id: i64,
    /// Granted TTL in seconds.
    pub ttl: i64,
    /// Unix time in milliseconds at which the lease expires.
    pub expires_at_ms: i64,
}

impl LeaseRecord {
    /// Whole seconds left before expiry at `now_ms` (never negative).
    pub fn remaining_seconds(&self, now_ms: i64) -> i64 {
        ((self.expires_at_ms - now_ms).max(0)) / 1000
    }
}

/// The current wall-clock time in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A delete event's key-value: only the key and the deletion's revision, as etcd sends it.
pub fn tombstone(key: Bytes, revision: Revision) -> KeyValue {
    KeyValue {
        key,
        mod_revision: revision,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_etcds_range_conventions() {
        let r = KeyRange::new(Bytes::from_static(b"a"), Bytes::new());
        assert!(r.contains(b"a") && !r.contains(b"a\0") && !r.contains(b"b"));
        let r = KeyRange::new(Bytes::from_static(b"a"), Bytes::from_static(b"\0"));
        assert!(r.contains(b"a") && r.contains(b"\xff\xff") && !r.contains(b"\0"));
        let r = KeyRange::new(Bytes::from_static(b"a/"), Bytes::from_static(b"a0"));
        assert!(r.contains(b"a/x") && !r.contains(b"a0") && !r.contains(b"a"));
        let r = KeyRange::new(Bytes::from_static(b"b"), Bytes::from_static(b"a"));
        assert!(!r.contains(b"a") && !r.contains(b"b"));
        assert_eq!(
            KeyRange::single(Bytes::from_static(b"k")).exclusive_end(),
            Some(Bytes::from_static(b"k\0"))
        );
    }
}
