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

/// A MySQL backend on database `name` of the test server (`$KINE_TEST_MYSQL_URL`, which the
/// test command starts; a missing server fails the test), dropped first if a run left it;
/// and a pool on the server, for [`drop_mysql_database`].
pub(crate) async fn fresh_mysql_database(
    name: &str,
) -> (super::mysql::MysqlBackend, sqlx::MySqlPool) {
    let url = std::env::var("KINE_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/mysql".to_string());
    let base = url.rsplit_once('/').map_or(url.as_str(), |(base, _)| base);
    let server = sqlx::MySqlPool::connect(&format!("{base}/mysql"))
        .await
        .expect("connect to the test server");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name}"
    )))
    .execute(&server)
    .await
    .expect("drop a leftover database");
    let backend = super::mysql::open(&format!("{base}/{name}"), &super::BackendOptions::default())
        .await
        .expect("open");
    (backend, server)
}

/// Drops the test database `name` ([`fresh_mysql_database`]).
pub(crate) async fn drop_mysql_database(server: &sqlx::MySqlPool, name: &str) {
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {name}")))
        .execute(server)
        .await
        .expect("drop the test database");
}
