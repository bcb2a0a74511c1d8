//! A digest of a keyspace at a revision: every key, value, create and mod revision, version
//! and lease, read a page at a time (memory stays bounded), plus the count and the revisions.

use std::fmt;

use bytes::Bytes;

use crate::error::Result;
use crate::model::{KeyRange, KeyValue, RangeEnd, Revision};
use crate::storage::{Backend, KeyspaceId, RangeQuery};

use super::source::Source;

/// Keys read per page.
const PAGE: i64 = 1000;

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
    /// copied).
    pub async fn of_source(source: &dyn Source, revision: Revision) -> Result<Self> {
        let state = source.state().await?;
        let mut digest = Digest::new(state.compact_revision);
        let mut after: Option<Bytes> = None;
        loop {
            let page = source.page(revision, after.as_deref(), PAGE).await?;
            for kv in &page {
                digest.add_kv(kv);
            }
            // Until an empty page: a source may return short pages before its end.
            match page.last() {
                Some(last) => after = Some(last.key.clone()),
                None => return Ok(digest),
            }
        }
    }

    /// The digest of `keyspace` at `revision`.
    pub async fn of(
        backend: &dyn Backend,
        keyspace: KeyspaceId,
        revision: Revision,
    ) -> Result<Self> {
        let state = backend.state(keyspace).await?;
        let mut digest = Digest::new(state.compact_revision);
        let mut start = Bytes::new();
        loop {
            let range = KeyRange {
                start: start.clone(),
                end: RangeEnd::Unbounded,
            };
            let rows = backend
                .range(
                    keyspace,
                    RangeQuery {
                        range: &range,
                        revision,
                        // One more than the page, as a paginating client asks (see
                        // `read_page`): the rest of the range is not counted again.
                        limit: Some(PAGE + 1),
                        keys_only: false,
                        count_only: false,
                    },
                )
                .await?;
            let more = rows.kvs.len() as i64 > PAGE;
            let page = &rows.kvs[..rows.kvs.len().min(PAGE as usize)];
            for kv in page {
                digest.add_kv(kv);
            }
            match page.last() {
                Some(last) if more => {
                    let mut next = last.key.to_vec();
                    next.push(0);
                    start = Bytes::from(next);
                }
                _ => return Ok(digest),
            }
        }
    }
}
