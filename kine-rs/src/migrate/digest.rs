//! A digest of a keyspace at a revision: every key, value, create and mod revision, version
//! and lease, read a page at a time (memory stays bounded), plus the count and the revisions.

use std::fmt;

use bytes::Bytes;

use crate::error::Result;
use crate::model::{KeyValue, Revision};
use crate::storage::{Backend, KeyspaceId};

use super::source::Source;

/// Keys read in the first page.
const PAGE: i64 = 1000;
/// Most keys read per page, whatever their size.
const PAGE_KEYS_MAX: i64 = 10_000;

/// Two 64-bit sums over the same bytes (FNV-1a, and a multiply-add with another constant),
/// with the number of keys and the compaction revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digest {
    pub keys: u64,
    pub compact_revision: Revision,
    sum: [u64; 2],
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} keys, compacted at {}, {:016x}{:016x}",
            self.keys, self.compact_revision, self.sum[0], self.sum[1]
        )
    }
}

impl Digest {
    fn new(compact_revision: Revision) -> Self {
        Digest {
            keys: 0,
            compact_revision,
            sum: [0xcbf2_9ce4_8422_2325, 0x8422_2325_cbf2_9ce4],
        }
    }

    fn add(&mut self, bytes: &[u8]) {
        // Length first, so that field boundaries count.
        for byte in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            self.sum[0] = (self.sum[0] ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
            self.sum[1] = self.sum[1]
                .wrapping_add(u64::from(*byte) + 1)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn add_kv(&mut self, kv: &KeyValue) {
        self.keys += 1;
        self.add(&kv.key);
        self.add(&kv.value);
        for n in [kv.create_revision, kv.mod_revision, kv.version, kv.lease] {
            self.add(&n.to_le_bytes());
        }
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

    /// The digest of `keyspace` at `revision`, read in pages of at most `page_bytes`.
    pub async fn of(
        backend: &dyn Backend,
        keyspace: KeyspaceId,
        revision: Revision,
        page_bytes: usize,
    ) -> Result<Self> {
        let state = backend.state(keyspace).await?;
        let mut digest = Digest::new(state.compact_revision);
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
