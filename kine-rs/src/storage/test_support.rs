//! What storage tests of several backends share: writing keys in one batch, reading one.

use bytes::Bytes;
use futures::future::join_all;

use super::{Backend, BatchKeys, KeyspaceId, RangeQuery, RangeRows, Revision, WriteTxn};
use crate::model::{KeyRange, KeyValue};

/// Creates `keys` in one write batch of `keyspace`, the key at `index` with
/// `value(index)`; returns the batch's revision.
pub(crate) async fn put_keys(
    backend: &dyn Backend,
    keyspace: KeyspaceId,
    keys: &[Bytes],
    value: impl Fn(usize) -> Bytes,
) -> Revision {
    let (mut txn, revision) = begin_batch(backend, keyspace, keys).await;
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

/// Deletes `key` in a write batch of its own; returns the batch's revision.
pub(crate) async fn delete_key(
    backend: &dyn Backend,
    keyspace: KeyspaceId,
    key: &Bytes,
) -> Revision {
    let (mut txn, revision) = begin_batch(backend, keyspace, std::slice::from_ref(key)).await;
    txn.delete(key, revision, 0).await.expect("delete");
    txn.commit(revision).await.expect("commit");
    revision
}

/// A write batch of `keyspace` naming `keys`, and its revision.
async fn begin_batch(
    backend: &dyn Backend,
    keyspace: KeyspaceId,
    keys: &[Bytes],
) -> (Box<dyn WriteTxn>, Revision) {
    let batch = BatchKeys {
        all: keys.to_vec(),
        created: Vec::new(),
    };
    let txn = backend
        .begin_group_write(keyspace, &batch, false)
        .await
        .expect("begin");
    let revision = txn.state().revision + 1;
    (txn, revision)
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

/// Keyspace `t` of a MySQL backend on database `name` of the test server
/// (`$KINE_TEST_MYSQL_URL`, which the test command starts; a missing server fails the test),
/// which is dropped first if a run left it.
pub(crate) struct MysqlTestDatabase {
    pub backend: super::mysql::MysqlBackend,
    pub keyspace: KeyspaceId,
    server: sqlx::MySqlPool,
    name: &'static str,
}

impl MysqlTestDatabase {
    pub async fn new(name: &'static str) -> Self {
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
        let backend =
            super::mysql::open(&format!("{base}/{name}"), &super::BackendOptions::default())
                .await
                .expect("open");
        let keyspace = backend
            .keyspace("t", true)
            .await
            .expect("keyspace")
            .expect("created");
        MysqlTestDatabase {
            backend,
            keyspace,
            server,
            name,
        }
    }

    /// Closes the backend and drops the database.
    pub async fn drop_database(self) {
        drop(self.backend);
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {}", self.name)))
            .execute(&self.server)
            .await
            .expect("drop the test database");
    }
}
