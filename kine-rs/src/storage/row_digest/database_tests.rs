//! The digest PostgreSQL and MySQL compute themselves equals the one kine-rs computes from the
//! rows they return, at the current revision and at older ones (the servers at
//! `$KINE_TEST_POSTGRES_URL` and `$KINE_TEST_MYSQL_URL`, which the test command starts; a
//! missing server fails the test).

use std::sync::Arc;

use bytes::Bytes;

use super::RowDigest;
use crate::error::KineError;
use crate::model::{KeyValue, Revision};
use crate::storage::{Backend, BackendOptions, KeyspaceId, open};

fn server(variable: &str, default: &str) -> String {
    let url = std::env::var(variable).unwrap_or_else(|_| default.to_string());
    // A database of these tests' own on the same server.
    let base = url.rsplit_once('/').map_or(url.as_str(), |(base, _)| base);
    format!("{base}/kine_unit_row_digest")
}

async fn write(backend: &dyn Backend, keyspace: KeyspaceId, kvs: &[KeyValue], deletes: &[&[u8]]) {
    let mut txn = backend.begin_write(keyspace).await.expect("begin_write");
    let revision = txn.state().revision + 1;
    let mut sub = 0;
    for kv in kvs {
        let kv = KeyValue {
            mod_revision: revision,
            ..kv.clone()
        };
        txn.put(&kv, sub).await.expect("put");
        sub += 1;
    }
    for key in deletes {
        txn.delete(key, revision, sub).await.expect("delete");
        sub += 1;
    }
    txn.commit(revision).await.expect("commit");
}

fn kv(key: &[u8], value: Vec<u8>, create_revision: Revision, version: i64, lease: i64) -> KeyValue {
    KeyValue {
        key: Bytes::copy_from_slice(key),
        value: Bytes::from(value),
        create_revision,
        mod_revision: 0,
        version,
        lease,
    }
}

/// The digest of the rows the datastore returns for `revision`.
async fn digest_of_rows(
    backend: &dyn Backend,
    keyspace: KeyspaceId,
    revision: Revision,
) -> RowDigest {
    let rows = backend
        .page_within(keyspace, revision, None, 1_000, usize::MAX)
        .await
        .expect("page");
    let mut digest = RowDigest::default();
    rows.iter().for_each(|row| digest.add(row));
    digest
}

async fn computed_by_the_database_equals_computed_from_its_rows(endpoint: String) {
    let backend: Arc<dyn Backend> = open(&endpoint, &BackendOptions::default())
        .await
        .expect("open the datastore");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let name = format!("digest-{}-{nanos}", std::process::id());
    let keyspace = backend
        .keyspace(&name, true)
        .await
        .expect("keyspace")
        .expect("created");
    // Every byte value, an empty value, a value past 64 KiB, keys that are prefixes of each
    // other, a large lease id, overwrites and a delete.
    let all_bytes: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    write(
        &*backend,
        keyspace,
        &[
            kv(b"a", Vec::new(), 2, 1, 0),
            kv(b"\x00\xff", all_bytes.clone(), 2, 1, i64::MAX / 3),
        ],
        &[],
    )
    .await;
    write(
        &*backend,
        keyspace,
        &[
            kv(b"a", vec![0], 2, 2, 0),
            kv(b"ab", b"x".to_vec(), 3, 1, 7),
        ],
        &[],
    )
    .await;
    write(&*backend, keyspace, &[], &[b"\x00\xff"]).await;
    write(&*backend, keyspace, &[kv(b"ab", all_bytes, 3, 2, 0)], &[]).await;
    // Deleted at 4 and created again: at 4 and 5 its newest row is the tombstone.
    write(
        &*backend,
        keyspace,
        &[kv(b"\x00\xff", b"again".to_vec(), 6, 1, 0)],
        &[],
    )
    .await;
    // Enough rows that the sum passes 2^64 (and, in PostgreSQL's signed words, below zero).
    let many: Vec<KeyValue> = (0..40)
        .map(|i| kv(format!("k{i:02}").as_bytes(), vec![i; 3], 7, 1, 0))
        .collect();
    write(&*backend, keyspace, &many, &[]).await;
    let current = backend.state(keyspace).await.expect("state").revision;
    let mut seen = Vec::new();
    for revision in 2..=current {
        let by_database = backend
            .row_digest(keyspace, revision)
            .await
            .expect("row digest")
            .expect("computed by the database");
        assert_eq!(
            by_database,
            digest_of_rows(&*backend, keyspace, revision).await,
            "at revision {revision} of {current}"
        );
        seen.push(by_database);
    }
    assert_eq!(
        seen.iter().map(|digest| digest.rows).collect::<Vec<_>>(),
        [2, 3, 2, 2, 3, 43],
        "keys live at revisions 2 to 7"
    );
    // Revisions 4 and 5 hold the same two keys, one of them with another value.
    assert_ne!(seen[2], seen[3]);
    assert!(matches!(
        backend.row_digest(keyspace, current + 1).await,
        Err(KineError::FutureRevision)
    ));
    let empty = backend
        .keyspace(&format!("{name}-empty"), true)
        .await
        .expect("keyspace")
        .expect("created");
    assert_eq!(
        backend.row_digest(empty, 0).await.expect("row digest"),
        Some(RowDigest::default())
    );
    backend.delete_keyspace(keyspace).await.expect("delete");
    backend.delete_keyspace(empty).await.expect("delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_computes_the_digest_of_its_rows() {
    computed_by_the_database_equals_computed_from_its_rows(server(
        "KINE_TEST_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/postgres",
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_computes_the_digest_of_its_rows() {
    computed_by_the_database_equals_computed_from_its_rows(server(
        "KINE_TEST_MYSQL_URL",
        "mysql://root@127.0.0.1:3306/mysql",
    ))
    .await;
}
