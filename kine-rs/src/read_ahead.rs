//! The next page of a paginated list, read while the client handles the page before.
//!
//! A paginated list (kube-apiserver's, by 500) asks for each page once the previous one has
//! arrived: page after page, the datastore's read, the response's transfer and the client's
//! handling of it follow each other. What the next page will be is known as soon as a page
//! reports `more` — the same request from the last key + `"\0"`, at the revision the page was
//! read at — and history at a revision never changes, so it is read right away; when the
//! client asks for exactly that page, it gets those rows. Only the keyspace's counters are
//! read then (one short statement), so the answer is what a read at that moment gives: the
//! current revision in its header, and `Compacted` when a compaction passed the revision in
//! between.
//!
//! Bounded: a few lists at once per keyspace (a kube-apiserver starting relists several
//! resources side by side), pages of a few MiB, [`MAX_HELD_BYTES`] in the whole process (a
//! gateway serves many tenants); a page that is never asked for is dropped when newer ones
//! push it out or after [`MAX_AGE`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kine_proto::etcdserverpb::{RangeRequest, RangeResponse};
use tokio::task::JoinHandle;

use crate::error::Result;
use crate::model::KeyRange;
use crate::range;
use crate::storage::{Backend, KeyspaceId, RangeRows};

/// Pages read ahead at once per keyspace.
const CAPACITY: usize = 8;
/// A list whose pages hold more than this many bytes of keys and values is not read ahead
/// (memory: each page read ahead is held until it is asked for).
const MAX_PAGE_BYTES: usize = 4 << 20;
/// Bytes of keys and values all pages read ahead in this process may hold (counted at the
/// size of the page before each: pages of one list are alike).
const MAX_HELD_BYTES: usize = 64 << 20;
/// A page not asked for this long after it was read ahead is dropped.
const MAX_AGE: Duration = Duration::from_secs(10);

/// The bytes held by pages read ahead in this process.
static HELD_BYTES: AtomicUsize = AtomicUsize::new(0);

/// The pages read ahead for one keyspace.
#[derive(Default)]
pub struct ReadAhead {
    pages: Mutex<VecDeque<Page>>,
}

/// A page being read, or read, for the request it answers. A page pushed out finishes its
/// read and is dropped (a read cancelled half-way could cost the pool its connection).
struct Page {
    request: RangeRequest,
    rows: JoinHandle<Result<RangeRows>>,
    started: Instant,
    /// What it counts against [`MAX_HELD_BYTES`] until it is dropped.
    reserved: usize,
}

impl Drop for Page {
    fn drop(&mut self) {
        HELD_BYTES.fetch_sub(self.reserved, Ordering::AcqRel);
    }
}

impl ReadAhead {
    /// The rows read ahead for `request`, if it is a page read ahead (`None` too when that
    /// read failed: the caller reads it itself, and gets the error a read gives now).
    pub async fn take(&self, request: &RangeRequest) -> Option<RangeRows> {
        // Pages are read ahead at a revision: a read at the current one (every get of
        // kube-apiserver) never takes the lock.
        if request.revision <= 0 || request.limit <= 0 {
            return None;
        }
        let mut page = {
            let mut pages = self.lock();
            pages.retain(|page| page.started.elapsed() < MAX_AGE);
            let at = pages.iter().position(|page| &page.request == request)?;
            pages.remove(at)?
        };
        match (&mut page.rows).await {
            Ok(Ok(rows)) => Some(rows),
            _ => None,
        }
    }

    /// Starts reading the page after `response` (the answer to `request`, read at
    /// `revision`) when there is one and it is worth holding.
    pub fn start(
        &self,
        backend: &Arc<dyn Backend>,
        keyspace: KeyspaceId,
        request: &RangeRequest,
        response: &RangeResponse,
        revision: i64,
    ) {
        let Some(next) = next_request(request, response, revision) else {
            return;
        };
        let reserved = page_bytes(response);
        if HELD_BYTES.fetch_add(reserved, Ordering::AcqRel) + reserved > MAX_HELD_BYTES {
            HELD_BYTES.fetch_sub(reserved, Ordering::AcqRel);
            return;
        }
        let backend = backend.clone();
        let read = next.clone();
        let rows = tokio::spawn(async move {
            let key_range = KeyRange::new(read.key.clone(), read.range_end.clone());
            backend
                .range(keyspace, range::query(&read, &key_range))
                .await
        });
        let page = Page {
            request: next,
            rows,
            started: Instant::now(),
            reserved,
        };
        let mut pages = self.lock();
        pages.retain(|page| page.started.elapsed() < MAX_AGE);
        if pages.len() == CAPACITY {
            pages.pop_front();
        }
        pages.push_back(page);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Page>> {
        self.pages.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The request of the page after `response`, as a paginating client asks for it: from the
/// last key + `"\0"` to the same end, at the revision the page was read at (`revision`), the
/// rest unchanged. `None` when there is no next page, or when the request is not a plain
/// page (sorted or filtered responses, counts only, a single key) or its page is large.
pub fn next_request(
    request: &RangeRequest,
    response: &RangeResponse,
    revision: i64,
) -> Option<RangeRequest> {
    let plain = request.limit > 0
        && !request.count_only
        && !request.range_end.is_empty()
        && request.sort_order == 0
        && request.sort_target == 0
        && request.min_mod_revision == 0
        && request.max_mod_revision == 0
        && request.min_create_revision == 0
        && request.max_create_revision == 0;
    if !plain || !response.more || revision <= 0 {
        return None;
    }
    let last = response.kvs.last()?;
    if page_bytes(response) > MAX_PAGE_BYTES {
        return None;
    }
    let mut key = Vec::with_capacity(last.key.len() + 1);
    key.extend_from_slice(&last.key);
    key.push(0);
    Some(RangeRequest {
        key: key.into(),
        revision,
        ..request.clone()
    })
}

/// The bytes of keys and values of a page.
fn page_bytes(response: &RangeResponse) -> usize {
    response
        .kvs
        .iter()
        .map(|kv| kv.key.len() + kv.value.len())
        .sum()
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use kine_proto::mvccpb::KeyValue;

    use super::*;

    fn page(keys: &[&str], more: bool) -> RangeResponse {
        RangeResponse {
            kvs: keys
                .iter()
                .map(|key| KeyValue {
                    key: Bytes::copy_from_slice(key.as_bytes()),
                    value: Bytes::from_static(b"v"),
                    ..Default::default()
                })
                .collect(),
            more,
            count: 10,
            ..Default::default()
        }
    }

    fn list(limit: i64) -> RangeRequest {
        RangeRequest {
            key: Bytes::from_static(b"/a/"),
            range_end: Bytes::from_static(b"/a0"),
            limit,
            ..Default::default()
        }
    }

    #[test]
    fn the_next_page_starts_after_the_last_key_at_the_read_revision() {
        let next = next_request(&list(2), &page(&["/a/1", "/a/2"], true), 7).expect("next");
        assert_eq!(next.key.as_ref(), b"/a/2\0");
        assert_eq!(next.range_end.as_ref(), b"/a0");
        assert_eq!((next.revision, next.limit), (7, 2));
    }

    #[test]
    fn no_next_page_when_there_is_none_or_the_request_is_not_a_plain_page() {
        assert!(next_request(&list(2), &page(&["/a/1", "/a/2"], false), 7).is_none());
        assert!(next_request(&list(0), &page(&["/a/1", "/a/2"], true), 7).is_none());
        let sorted = RangeRequest {
            sort_order: 2,
            ..list(2)
        };
        assert!(next_request(&sorted, &page(&["/a/2", "/a/1"], true), 7).is_none());
        let counted = RangeRequest {
            count_only: true,
            ..list(2)
        };
        assert!(next_request(&counted, &page(&[], true), 7).is_none());
        let single = RangeRequest {
            range_end: Bytes::new(),
            ..list(2)
        };
        assert!(next_request(&single, &page(&["/a/"], true), 7).is_none());
        let mut large = page(&["/a/1"], true);
        large.kvs[0].value = Bytes::from(vec![0; MAX_PAGE_BYTES + 1]);
        assert!(next_request(&list(1), &large, 7).is_none());
    }
}
