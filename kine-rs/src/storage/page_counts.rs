//! Counts of the next page of a paginated list, known without counting again.
//!
//! etcd's `count` is the number of keys in the requested range at the read revision, so a
//! list paginated by `limit` would count the whole rest of the range on every page: a list of
//! 100,000 keys by 500 counts 10 million rows. But history at a revision never changes, so
//! when a page at revision R holds the first `n` keys of `[start, end)` and reports `more`,
//! the next page — `[last key + "\0", end)` at R, what kube-apiserver and etcd's clients ask
//! for — holds exactly `count - n` keys. This remembers that number for the next request.
//! Entries are per keyspace and revision; a compacted revision is refused before any lookup.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;

use super::KeyspaceId;
use crate::model::{KeyRange, Revision};

/// Continuations remembered at once (a few per concurrent paginated list).
const CAPACITY: usize = 256;

/// One continuation: the range of the next page at a revision, and its count.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Page {
    keyspace: KeyspaceId,
    revision: Revision,
    range: KeyRange,
}

/// What is known of a continuation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Continuation {
    /// The keys of its range at its revision.
    pub count: i64,
    /// The page before it was read at the keyspace's current revision: this one may be too
    /// (no write since), which a one-statement read of the current rows can find out.
    pub was_current: bool,
}

/// The counts of pages that continue earlier pages, most recent first.
#[derive(Debug, Default)]
pub struct PageCounts {
    entries: Mutex<VecDeque<(Page, Continuation)>>,
}

impl PageCounts {
    /// The count of `range` at `revision`, if a previous page established it.
    pub fn get(&self, keyspace: KeyspaceId, revision: Revision, range: &KeyRange) -> Option<i64> {
        self.continuation(keyspace, revision, range)
            .map(|continuation| continuation.count)
    }

    /// What a previous page established of `range` at `revision`.
    pub fn continuation(
        &self,
        keyspace: KeyspaceId,
        revision: Revision,
        range: &KeyRange,
    ) -> Option<Continuation> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .iter()
            .find(|(page, _)| {
                page.keyspace == keyspace && page.revision == revision && &page.range == range
            })
            .map(|(_, continuation)| *continuation)
    }

    /// Forgets every count of `keyspace` (it was deleted).
    pub fn forget(&self, keyspace: KeyspaceId) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|(page, _)| page.keyspace != keyspace);
    }

    /// Records what a page that read `rows` keys of `range` at `revision`, out of `count`,
    /// implies for the page after it: a page of `page_size` keys was returned with `more` set
    /// when `rows` exceeds `page_size` (ranges read `limit + 1` keys); `current`: `revision`
    /// was the keyspace's current one.
    #[allow(clippy::too_many_arguments)]
    pub fn page_read(
        &self,
        keyspace: KeyspaceId,
        revision: Revision,
        range: &KeyRange,
        last_returned: &[u8],
        returned: i64,
        count: i64,
        current: bool,
    ) {
        let mut start = Vec::with_capacity(last_returned.len() + 1);
        start.extend_from_slice(last_returned);
        start.push(0);
        let next = Page {
            keyspace,
            revision,
            range: KeyRange {
                start: Bytes::from(start),
                end: range.end.clone(),
            },
        };
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|(page, _)| page != &next);
        let continuation = Continuation {
            count: count - returned,
            was_current: current,
        };
        entries.push_front((next, continuation));
        entries.truncate(CAPACITY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RangeEnd;

    #[test]
    fn the_next_page_count_is_the_rest_and_nothing_else_matches() {
        let counts = PageCounts::default();
        let prefix = KeyRange {
            start: Bytes::from_static(b"/a/"),
            end: RangeEnd::Before(Bytes::from_static(b"/a0")),
        };
        counts.page_read(1, 10, &prefix, b"/a/k500", 500, 1200, true);
        let next = KeyRange {
            start: Bytes::from_static(b"/a/k500\0"),
            end: prefix.end.clone(),
        };
        assert_eq!(counts.get(1, 10, &next), Some(700));
        assert!(
            counts
                .continuation(1, 10, &next)
                .is_some_and(|c| c.was_current)
        );
        // Another revision, keyspace or end is another question.
        assert_eq!(counts.get(1, 11, &next), None);
        assert_eq!(counts.get(2, 10, &next), None);
        let unbounded = KeyRange {
            start: next.start.clone(),
            end: RangeEnd::Unbounded,
        };
        assert_eq!(counts.get(1, 10, &unbounded), None);
        assert_eq!(counts.get(1, 10, &prefix), None);
        // A deleted keyspace's counts are gone.
        counts.forget(1);
        assert_eq!(counts.get(1, 10, &next), None);
    }

    #[test]
    fn keeps_a_bounded_number_of_continuations() {
        let counts = PageCounts::default();
        let range = KeyRange::new(Bytes::from_static(b"a"), Bytes::from_static(b"\0"));
        for revision in 0..(CAPACITY as i64 + 10) {
            counts.page_read(1, revision, &range, b"k", 1, 5, false);
        }
        let next = KeyRange::new(Bytes::from_static(b"k\0"), Bytes::from_static(b"\0"));
        assert_eq!(counts.get(1, 0, &next), None);
        assert_eq!(counts.get(1, CAPACITY as i64 + 9, &next), Some(4));
    }
}
