//! etcd 3.7's `KV.RangeStream`: a range answered in chunks instead of one message, which
//! kube-apiserver 1.37 uses for its lists when the server has it (it falls back to pages of
//! `Range` on `Unimplemented`).
//!
//! As etcd 3.7 answers it: every chunk is a `RangeResponse` whose `kvs` follow the previous
//! chunk's, all read at the revision of the first (the current one unless the request names
//! one); only the last chunk carries the header, `more` and `count`, so that merging the chunks
//! gives what `Range` would have answered. The first chunk holds 10 keys; each next one doubles
//! while a chunk stays under half of `--max-request-bytes`, and halves past twice it. A
//! `count_only` request is one chunk. An order other than by key, and revision filters, are
//! refused with etcd's `Unimplemented`.

use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use kine_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use kine_proto::etcdserverpb::{RangeRequest, RangeResponse, RangeStreamResponse};
use prost::Message;
use tokio::sync::mpsc;
use tonic::Status;

use crate::error::{KineError, Result};
use crate::served::ServedTenant;

/// Keys in the first chunk (etcd's).
const FIRST_CHUNK_KEYS: i64 = 10;

/// Where the chunks go.
pub type Chunks = mpsc::Sender<std::result::Result<RangeStreamResponse, Status>>;

/// Refuses what RangeStream does not serve, in etcd's order: no key, then an order other than
/// the keys' ascending one, then revision filters.
pub fn check(request: &RangeRequest) -> Result<()> {
    if request.key.is_empty() {
        return Err(KineError::EmptyKey);
    }
    let by_key = request.sort_order == SortOrder::None as i32
        || (request.sort_target == SortTarget::Key as i32
            && request.sort_order == SortOrder::Ascend as i32);
    if !by_key {
        return Err(KineError::RangeStreamUnsupported("custom sort orders"));
    }
    if request.min_mod_revision != 0
        || request.max_mod_revision != 0
        || request.min_create_revision != 0
        || request.max_create_revision != 0
    {
        return Err(KineError::RangeStreamUnsupported("revision filters"));
    }
    Ok(())
}

/// Sends the chunks of `request` (already [`check`]ed) to `chunks`, or the error that ended
/// them; stops early when the client went away.
pub async fn serve(
    tenant: Arc<dyn ServedTenant>,
    request: RangeRequest,
    target_bytes: usize,
    chunks: Chunks,
) {
    if let Err(error) = send_chunks(&*tenant, request, target_bytes, &chunks).await {
        let _ = chunks.send(Err(error.into())).await;
    }
}

/// Sends one chunk; `false` when the client stopped reading (nothing more to send then).
async fn send(chunks: &Chunks, range_response: RangeResponse) -> bool {
    chunks
        .send(Ok(RangeStreamResponse {
            range_response: Some(range_response),
        }))
        .await
        .is_ok()
}

async fn send_chunks(
    tenant: &dyn ServedTenant,
    mut request: RangeRequest,
    target_bytes: usize,
    chunks: &Chunks,
) -> Result<()> {
    if request.count_only {
        let response = tenant.range(request).await?;
        let chunk = RangeResponse {
            header: response.header,
            count: response.count,
            ..Default::default()
        };
        send(chunks, chunk).await;
        return Ok(());
    }
    let total = if request.limit > 0 {
        request.limit
    } else {
        i64::MAX
    };
    let mut limit = FIRST_CHUNK_KEYS.min(total);
    let mut sent: i64 = 0;
    let mut header = None;
    loop {
        let chunk = tenant
            .range(RangeRequest {
                limit,
                ..request.clone()
            })
            .await?;
        if header.is_none() {
            let first = chunk.header.unwrap_or_default();
            // Every later chunk reads at the first one's revision.
            if request.revision <= 0 {
                request.revision = first.revision;
            }
            header = Some(first);
        }
        let size = chunk.encoded_len();
        sent += chunk.kvs.len() as i64;
        let next_key = match chunk.kvs.last() {
            Some(last) if chunk.more => {
                let mut next = BytesMut::with_capacity(last.key.len() + 1);
                next.put_slice(&last.key);
                next.put_u8(0);
                Some(next.freeze())
            }
            _ => None,
        };
        let done = next_key.is_none() || sent >= total;
        let mut out = RangeResponse {
            kvs: chunk.kvs,
            ..Default::default()
        };
        if done {
            out.header = header.take();
            out.more = chunk.more;
            out.count = sent;
            if let Some(next_key) = &next_key {
                // The keys past the limit count too, as in Range's `count`.
                let rest = tenant
                    .range(RangeRequest {
                        key: next_key.clone(),
                        limit: 0,
                        count_only: true,
                        ..request.clone()
                    })
                    .await?;
                out.count += rest.count;
            }
        }
        if !send(chunks, out).await || done {
            return Ok(());
        }
        if let Some(next_key) = next_key {
            request.key = next_key;
        }
        limit = next_limit(limit, size, target_bytes).min(total - sent);
    }
}

/// The next chunk's number of keys: twice the last while its chunk stayed under half the
/// target size, half of it past twice the target, never below one.
fn next_limit(last: i64, last_bytes: usize, target_bytes: usize) -> i64 {
    let next = if last_bytes < target_bytes / 2 {
        last.saturating_mul(2)
    } else if last_bytes > target_bytes.saturating_mul(2) {
        last / 2
    } else {
        last
    };
    next.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_grow_under_half_the_target_and_shrink_past_twice_it() {
        assert_eq!(next_limit(10, 100, 1000), 20);
        assert_eq!(next_limit(10, 600, 1000), 10);
        assert_eq!(next_limit(10, 2001, 1000), 5);
        assert_eq!(next_limit(1, 5000, 1000), 1);
        assert_eq!(next_limit(i64::MAX, 0, 1000), i64::MAX);
    }

    #[test]
    fn refuses_orders_and_filters_as_etcd() {
        let key = |r: RangeRequest| RangeRequest {
            key: bytes::Bytes::from_static(b"a"),
            ..r
        };
        assert!(check(&key(RangeRequest::default())).is_ok());
        assert!(
            check(&key(RangeRequest {
                sort_target: SortTarget::Key as i32,
                sort_order: SortOrder::Ascend as i32,
                ..Default::default()
            }))
            .is_ok()
        );
        assert!(matches!(
            check(&RangeRequest::default()),
            Err(KineError::EmptyKey)
        ));
        assert!(matches!(
            check(&key(RangeRequest {
                sort_order: SortOrder::Descend as i32,
                ..Default::default()
            })),
            Err(KineError::RangeStreamUnsupported("custom sort orders"))
        ));
        assert!(matches!(
            check(&key(RangeRequest {
                min_mod_revision: 3,
                ..Default::default()
            })),
            Err(KineError::RangeStreamUnsupported("revision filters"))
        ));
    }
}
