//! Against the PostgreSQL server at `$KINE_TEST_POSTGRES_URL` (the test command starts one at
//! `postgres://postgres@127.0.0.1:5432/postgres`); a missing server fails the test.

use bytes::Bytes;
use sqlx::Connection;

use super::*;
use crate::error::KineError;
use crate::model::KeyValue;
use crate::storage::{Backend, BatchKeys, KeyspaceId};

fn server_url() -> String {
    std::env::var("KINE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A fresh database's URL on the test server (created by the backend that opens it).
fn fresh_database_url(tag: &str) -> (String, String) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let name = format!("kine_unit_{tag}_{}_{nanos}", std::process::id());
    let server = server_url();
    let base = server
        .rsplit_once('/')
        .map_or(server.as_str(), |(base, _)| base);
    (format!("{base}/{name}"), name)
}

async fn drop_database(name: &str) {
    if let Ok(mut conn) = sqlx::PgConnection::connect(&server_url()).await {
        let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
        let _ = sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut conn)
            .await;
    }
}

async fn put_and_commit(backend: &PostgresBackend, keyspace: KeyspaceId, key: &Bytes, value: u64) {
    let mut txn = backend.begin_write(keyspace).await.expect("begin_write");
    let revision = txn.state().revision + 1;
    let kv = KeyValue {
        key: key.clone(),
        value: Bytes::from(value.to_string()),
        create_revision: 2,
        mod_revision: revision,
        version: 1,
        lease: 0,
    };
    txn.put(&kv, 0).await.expect("put");
    txn.commit(revision).await.expect("commit");
}

async fn keyspace_row_place(conn: &mut sqlx::PgConnection, keyspace: KeyspaceId) -> String {
    sqlx::query_scalar("SELECT CAST(ctid AS TEXT) FROM keyspaces WHERE id = $1")
        .bind(keyspace)
        .fetch_one(conn)
        .await
        .expect("the keyspace row's ctid")
}

/// A write batch that read without the lock is refused when another process committed in
/// between, even once the keyspace row is back at the place on its page where the batch read
/// it: PostgreSQL reuses a page's line pointers, so the row's `ctid` recurs after a few
/// updates. With the `ctid` as the version the stale batch passed the check and failed on a
/// duplicate revision, instead of a conflict the writer runs again under the lock.
#[tokio::test]
async fn a_write_batch_read_before_other_commits_is_refused_when_the_row_is_back_in_place() {
    let (url, name) = fresh_database_url("version");
    let options = BackendOptions::default();
    let first = open(&url, &options).await.expect("open the first backend");
    let second = open(&url, &options).await.expect("open the second backend");
    let keyspace = first
        .keyspace("tenant", true)
        .await
        .expect("keyspace")
        .expect("created");
    let key = Bytes::from_static(b"/registry/counter");
    put_and_commit(&second, keyspace, &key, 0).await;

    let mut inspect = sqlx::PgConnection::connect(&url).await.expect("connect");
    let mut stale = first
        .begin_group_write(
            keyspace,
            &BatchKeys {
                all: vec![key.clone()],
                created: Vec::new(),
            },
            true,
        )
        .await
        .expect("a batch read without the lock");
    let read_at = keyspace_row_place(&mut inspect, keyspace).await;
    let read_revision = stale.state().revision;

    // The other process commits until the row is back where the batch read it.
    let mut commits = 0;
    loop {
        commits += 1;
        put_and_commit(&second, keyspace, &key, commits).await;
        if keyspace_row_place(&mut inspect, keyspace).await == read_at {
            break;
        }
        assert!(
            commits < 1_000,
            "the keyspace row never came back to {read_at}: the premise of this test is gone"
        );
    }

    let kv = KeyValue {
        key: key.clone(),
        value: Bytes::from_static(b"stale"),
        create_revision: 2,
        mod_revision: read_revision + 1,
        version: 2,
        lease: 0,
    };
    stale.put(&kv, 0).await.expect("put");
    match stale.commit(read_revision + 1).await {
        Err(KineError::Conflict(_)) => {}
        other => panic!(
            "a batch read before {commits} other commits must be refused as a conflict, got {other:?}"
        ),
    }
    let state = second.state(keyspace).await.expect("state");
    assert_eq!(state.revision, read_revision + commits as i64);
    drop(inspect);
    drop(first);
    drop(second);
    drop_database(&name).await;
}

/// Every connection of kine-rs's pools plans without Memoize (see `pool_options`): the
/// lookups through `kv_head` never repeat a key, and the node only copied each row.
/// The watch hubs' connections plan every statement for its parameters: a generic plan of
/// the event read made while `kv` was new read the whole history for each event.
#[tokio::test]
async fn watch_reader_connections_plan_for_their_parameters() {
    let options = BackendOptions::default();
    let connect = connect_options(&server_url(), &options).expect("connect options");
    let watch = watch_readers(&options, connect.clone())
        .await
        .expect("the watch readers' pool");
    let other = pool_options(&options, connect.get_port(), false)
        .max_connections(1)
        .min_connections(0)
        .connect_with(connect)
        .await
        .expect("a pool on the test server");
    let mode = async |pool: &PgPool| -> String {
        sqlx::query_scalar("SHOW plan_cache_mode")
            .fetch_one(pool)
            .await
            .expect("plan_cache_mode")
    };
    for _ in 0..crate::storage::WATCH_CONNECTIONS {
        assert_eq!(mode(&watch).await, "force_custom_plan");
    }
    assert_eq!(
        mode(&other).await,
        "auto",
        "other connections keep generic plans"
    );
}

#[tokio::test]
async fn pool_connections_plan_without_memoize() {
    let options = BackendOptions::default();
    let connect = connect_options(&server_url(), &options).expect("connect options");
    let pool = pool_options(&options, connect.get_port(), false)
        .max_connections(2)
        .min_connections(0)
        .connect_with(connect)
        .await
        .expect("a pool on the test server");
    let version: i32 = sqlx::query_scalar("SELECT current_setting('server_version_num')::int")
        .fetch_one(&pool)
        .await
        .expect("server version");
    assert!(
        version >= 140000,
        "the test server has Memoize (PostgreSQL 14+)"
    );
    for _ in 0..2 {
        let mut connection = pool.acquire().await.expect("a connection");
        let memoize: String = sqlx::query_scalar("SHOW enable_memoize")
            .fetch_one(&mut *connection)
            .await
            .expect("enable_memoize");
        assert_eq!(memoize, "off");
    }
}

/// A fresh database (its URL and name) whose keyspace `tenant` holds `/b/00000` … as one
/// revision, `keys` of them.
async fn keys_under_b(tag: &str, keys: usize) -> (String, String, PostgresBackend, KeyspaceId) {
    let (url, name) = fresh_database_url(tag);
    let backend = open(&url, &BackendOptions::default()).await.expect("open");
    let keyspace = backend
        .keyspace("tenant", true)
        .await
        .expect("keyspace")
        .expect("created");
    let mut txn = backend.begin_write(keyspace).await.expect("begin_write");
    let revision = txn.state().revision + 1;
    for i in 0..keys {
        let kv = KeyValue {
            key: Bytes::from(format!("/b/{i:05}")),
            value: Bytes::from_static(b"v"),
            create_revision: revision,
            mod_revision: revision,
            version: 1,
            lease: 0,
        };
        txn.put(&kv, i as i64).await.expect("put");
    }
    txn.commit(revision).await.expect("commit");
    (url, name, backend, keyspace)
}

/// A connection to `url` whose planner may not use index scans: a range's rows can then
/// only be read by bitmap or sequential scan and sorted.
async fn connection_without_index_scans(url: &str) -> sqlx::PgConnection {
    let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
    sqlx::query("SET enable_indexscan = off")
        .execute(&mut conn)
        .await
        .expect("no index scans");
    conn
}

/// A list's page reads the heads of its own keys only, in key order, whatever plan
/// PostgreSQL would make for the range: with statistics older than the range (a prefix
/// written since the last ANALYZE, estimated at a few rows), it read every head left in the
/// range by bitmap and sorted them, for every page (a list of 10,000 fresh keys 5.7 ms a page
/// instead of 2.5). The test makes index scans unavailable to the session, which leaves a
/// plain statement only such plans, and counts the heads the page's transaction read.
#[tokio::test]
async fn a_list_page_reads_only_its_own_heads_whatever_the_plan() {
    const KEYS: usize = 300;
    const PAGE: i64 = 50;
    let (url, name, backend, keyspace) = keys_under_b("heads", KEYS).await;
    let mut conn = connection_without_index_scans(&url).await;
    let mut tx = conn.begin().await.expect("begin");
    // From the middle of the range: the rest of it is 200 keys.
    let range =
        crate::model::KeyRange::new(Bytes::from_static(b"/b/00100"), Bytes::from_static(b"/c"));
    let page = crate::storage::sql::read_current_page::<Postgres>(&mut tx, keyspace, &range, PAGE)
        .await
        .expect("a page");
    let (fetched, scanned): (i64, i64) = sqlx::query_as(
        "SELECT idx_tup_fetch, seq_tup_read FROM pg_stat_xact_user_tables \
         WHERE relname = 'kv_head'",
    )
    .fetch_one(&mut *tx)
    .await
    .expect("the transaction's table statistics");
    drop(tx);
    drop(conn);
    drop(backend);
    drop_database(&name).await;
    let keys: Vec<String> = page
        .iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .collect();
    let expected: Vec<String> = (100..100 + PAGE).map(|i| format!("/b/{i:05}")).collect();
    assert_eq!(keys, expected, "the page's keys, in order");
    assert!(
        fetched + scanned <= PAGE + 1,
        "the page of {PAGE} read {fetched} heads by index and {scanned} by scan"
    );
}

/// A list's page looks up the rows of its own heads only, whatever plan PostgreSQL makes for
/// the range of heads. With statistics older than the range (a prefix written since the last
/// ANALYZE), PostgreSQL read the range's heads by bitmap and sorted them; with the page's
/// LIMIT outside the lookup, it looked up the row of every head left in the range for every
/// page (a list of 10,000 keys: 40-50 ms a page). The test makes index scans unavailable,
/// so the heads can only be read that way, and counts the lookups of `kv` in the plan.
#[tokio::test]
async fn a_list_page_looks_up_its_own_rows_whatever_the_plan() {
    const KEYS: usize = 300;
    const PAGE: i64 = 50;
    let (url, name, backend, keyspace) = keys_under_b("page", KEYS).await;
    let mut conn = connection_without_index_scans(&url).await;
    let range = crate::model::KeyRange::new(Bytes::from_static(b"/b/"), Bytes::from_static(b"/c"));
    let plan =
        crate::storage::sql::explain_current_page::<Postgres>(&mut conn, keyspace, &range, PAGE)
            .await
            .expect("explain");
    drop(conn);
    drop(backend);
    drop_database(&name).await;
    // The scan of `kv` under the lookup: its `loops` is how many rows were looked up.
    let lookups: Vec<u64> = plan
        .iter()
        .filter(|line| line.contains(" on kv o"))
        .filter_map(|line| {
            let loops = line.rsplit_once("loops=")?.1;
            loops.trim_end_matches(')').parse().ok()
        })
        .collect();
    assert!(
        !lookups.is_empty(),
        "no lookup of kv in the plan:\n{}",
        plan.join("\n")
    );
    assert!(
        lookups.iter().all(|&loops| loops <= PAGE as u64),
        "rows looked up beyond the page of {PAGE}:\n{}",
        plan.join("\n")
    );
}

/// Keys are looked up (a write batch's read, a get) with a statement PostgreSQL plans once
/// per connection and shape: with the keys in an array parameter, a generic plan estimated
/// ten keys and a custom one the array's length, so a lookup of fewer keys was planned anew
/// at every call (~0.4 ms of planning for a 0.1 ms read of four keys). Twenty lookups of
/// two keys on one connection: PostgreSQL's plan cache makes five custom plans before it
/// compares, and then must keep the generic one.
#[tokio::test]
async fn key_lookups_are_planned_once_per_connection() {
    let (url, name, backend, keyspace) = keys_under_b("lookup", 20).await;
    let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
    let keys: [&[u8]; 2] = [b"/b/00003", b"/b/00011"];
    for _ in 0..20 {
        let found = crate::storage::sql::read_current_rows::<Postgres>(&mut conn, keyspace, &keys)
            .await
            .expect("lookup");
        let mut found: Vec<&[u8]> = found.iter().map(|kv| kv.key.as_ref()).collect();
        found.sort_unstable();
        assert_eq!(found, keys);
    }
    let plans: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT generic_plans, custom_plans FROM pg_prepared_statements \
         WHERE statement LIKE '%JOIN LATERAL (SELECT keyspace, mod_revision, sub, deleted%' \
         AND statement NOT LIKE '%pg_prepared_statements%'",
    )
    .fetch_all(&mut conn)
    .await
    .expect("the connection's prepared statements");
    drop(conn);
    drop(backend);
    drop_database(&name).await;
    assert_eq!(plans.len(), 1, "one prepared lookup: {plans:?}");
    let (generic, custom) = plans[0];
    assert!(
        custom <= 5 && generic >= 15,
        "20 lookups made {custom} custom plans and used the generic one {generic} times"
    );
}
