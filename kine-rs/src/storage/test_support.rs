//! What storage tests of several backends share: writing keys in one batch, reading one.

use bytes::Bytes;
use futures::future::join_all;

use super::{Backend, BatchKeys, KeyspaceId, RangeQuery, RangeRows, Revision};
use crate::model::{KeyRange, KeyValue};

/// Creates `keys` in one write batch of `keyspace`, the key at `index` with
/// `value(index)`; returns the batch's revision.
pub(crate) async fn put_keys(
    backend: &dyn Backend,
    keyspace: KeyspaceId,
    keys: &[Bytes],
    value: impl Fn(usize) -> Bytes,
) -> Revision {
    let batch = BatchKeys {
        all: keys.to_vec(),
        created: Vec::new(),
    };
    let mut txn = backend
        .begin_group_write(keyspace, &batch, false)
        .await
        .expect("begin");
    let revision = txn.state().revision + 1;
    for (index, key) in keys.iter().enumerate() {
        let kv = KeyValue {
            key: key.clone(),
            create_revision: revision,
            mod_revision: revision,
            version: 1,
            value: value(index),
            lease: 0,
        };
        txn.put(&kv, index as i64).await.expect("put");
    }
    txn.commit(revision).await.expect("commit");
    revision
}

/// A range read of `range` at the current revision, values included.
pub(crate) async fn read(
    backend: &dyn Backend,
    keyspace: KeyspaceId,
    range: &KeyRange,
) -> RangeRows {
    read_together(backend, keyspace, &[(range.clone(), false)])
        .await
        .remove(0)
}

/// Range reads at the current revision, all asked at once (each with whether it asks for
/// keys only), answered in their order.
pub(crate) async fn read_together(
    backend: &dyn Backend,
    keyspace: KeyspaceId,
    reads: &[(KeyRange, bool)],
) -> Vec<RangeRows> {
    join_all(reads.iter().map(|(range, keys_only)| {
        backend.range(
            keyspace,
            RangeQuery {
                range,
                revision: 0,
                limit: None,
                keys_only: *keys_only,
                count_only: false,
            },
        )
    }))
    .await
    .into_iter()
    .map(|answer| answer.expect("range"))
    .collect()
}
