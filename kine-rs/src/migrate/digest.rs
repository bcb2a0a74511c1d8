//! A digest of a keyspace at a revision: every key, value, create and mod revision, version
//! and lease ([`RowDigest`]), computed by the datastore or read a page at a time (memory stays
//! bounded), with the count and the compaction revision.

use std::fmt;

use bytes::Bytes;

use crate::error::Result;
use crate::model::{KeyValue, Revision};
use crate::storage::row_digest::RowDigest;
use crate::storage::{Backend, KeyspaceId};

use super::source::Source;

/// Keys read in the first page.
const PAGE: i64 = 1000;
/// Most keys read per page, whatever their size.
const PAGE_KEYS_MAX: i64 = 10_000;

/// The [`RowDigest`] of the keys live at a revision, with the compaction revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digest {
    pub compact_revision: Revision,
    rows: RowDigest,
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} keys, compacted at {}, {:016x}",
            self.rows.rows, self.compact_revision, self.rows.sum
        )
    }
}

impl Digest {
    fn new(compact_revision: Revision) -> Self {
        Digest {
            compact_revision,
            rows: RowDigest::default(),
        }
    }

    /// The number of keys digested.
    pub fn keys(&self) -> u64 {
        self.rows.rows
    }

    fn add_kv(&mut self, kv: &KeyValue) {
        self.rows.add(kv);
    }

    /// The digest of what `source` holds at `revision` (with the compaction revision the
    /// target was given: the source's, or the snapshot's where history before it is not
    /// copied), read in pages of at most `page_bytes` of keys and values.
    pub async fn of_source(
        source: &dyn Source,
        revision: Revision,
        page_bytes: usize,
    ) -> Result<Self> {
        let state = source.state().await?;
        let mut digest = Digest::new(state.compact_revision);
        if let Some(rows) = source.row_digest(revision).await? {
            digest.rows = rows;
            return Ok(digest);
        }
        let mut after: Option<Bytes> = None;
        let mut keys = PAGE;
        loop {
            let page = source
                .page_within(revision, after.as_deref(), keys, page_bytes)
                .await?;
            for kv in &page {
                digest.add_kv(kv);
            }
            keys = next_keys(&page, page_bytes);
            // Until an empty page: a source may return short pages before its end.
            match page.last() {
                Some(last) => after = Some(last.key.clone()),
                None => return Ok(digest),
            }
        }
    }

    /// The digest of `keyspace` at `revision`: computed by the datastore where it can
    /// ([`Backend::row_digest`]), else read in pages of at most `page_bytes`.
    pub async fn of(
        backend: &dyn Backend,
        keyspace: KeyspaceId,
        revision: Revision,
        page_bytes: usize,
    ) -> Result<Self> {
        let state = backend.state(keyspace).await?;
        let mut digest = Digest::new(state.compact_revision);
        if let Some(rows) = backend.row_digest(keyspace, revision).await? {
            digest.rows = rows;
            return Ok(digest);
        }
        let mut after: Option<Bytes> = None;
        let mut keys = PAGE;
        loop {
            let page = backend
                .page_within(keyspace, revision, after.as_deref(), keys, page_bytes)
                .await?;
            for kv in &page {
                digest.add_kv(kv);
            }
            keys = next_keys(&page, page_bytes);
            match page.last() {
                Some(last) => after = Some(last.key.clone()),
                None => return Ok(digest),
            }
        }
    }
}

/// The keys to ask for next: as many as fit in `page_bytes` at the last page's size per key
/// (and one more, so a full page shows it), at most [`PAGE_KEYS_MAX`]: fewer, larger pages
/// than a fixed count take fewer round trips for small values.
fn next_keys(page: &[KeyValue], page_bytes: usize) -> i64 {
    let bytes: usize = page.iter().map(|kv| kv.key.len() + kv.value.len()).sum();
    if page.is_empty() || bytes == 0 {
        return PAGE;
    }
    let per_key = (bytes / page.len()).max(1);
    ((page_bytes / per_key) as i64 + 1).clamp(1, PAGE_KEYS_MAX)
}
