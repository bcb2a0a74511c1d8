//! PostgreSQL, shared by any number of kine-rs processes.
//!
//! A write takes the keyspace row's lock (`SELECT … FOR UPDATE`) in a READ COMMITTED
//! transaction, so revisions are assigned and committed in order across processes; reads run
//! in REPEATABLE READ so the revision checks and the rows come from one snapshot. Every write
//! transaction announces itself with `pg_notify` (delivered only if it commits), and one
//! LISTEN connection per process feeds the watch hubs.
//!
//! A key's current row is the one its row in `kv_head` names (migration 0008): `kv` only gets
//! rows appended, and an overwrite moves the head in place, which PostgreSQL does without a
//! new index entry, instead of writing a new version of the superseded row.
//!
//! A batch of transactions first costs two round trips: one statement reads the keyspace row
//! (its counters and its version, the `xmin` of its row) with the batch's keys' current rows,
//! without a lock; then one call of `kine_rs_commit` (migrations 0008 to 0010), in its own implicit
//! transaction, takes the lock, checks the row is still that version, appends the rows, moves
//! the heads, stores the counters, notifies and commits. A keyspace changed in between (another
//! process's commit, a freeze, a purge) makes the call refuse and write nothing; the writer
//! runs the batch again under the lock. A batch that needs more than point reads and writes
//! (a range read, a lease, a compaction, a freeze) takes the lock as soon as it does.
//! A batch whose keys this process committed last skips the read: the function answers the
//! row's new version, and the next batch starts from what this process remembers of it
//! (`sql/commit_cache.rs`); the version check refuses it if anything changed since. Such a
//! batch also takes the keys this process has not seen but its requests would create (a plain
//! put's, a compare with revision 0) for absent, and the call refuses it if one is live
//! (migration 0010): a put or create of a new key is one round trip.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgSslMode};
use sqlx::{ConnectOptions, Connection};
use tracing::{info, warn};

use super::feed::CommitFeed;
use super::sql::{Dialect, SqlBackend, numbered_placeholders};
use super::{BackendOptions, migration_error};
use crate::error::{KineError, Result};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The notification channel commits are announced on; the payload is the keyspace id and,
/// from migration 0008 on, `:` and the committed revision.
const CHANNEL: &str = "kine_rs_commits";
/// The database kine uses when the endpoint names none.
pub const DEFAULT_DATABASE: &str = "kubernetes";

/// PostgreSQL's dialect.
pub struct Postgres;

impl Dialect for Postgres {
    type DB = sqlx::Postgres;
    const DRIVER: &'static str = "postgres";
    // A B-tree entry may take about a third of a page (2704 bytes); the kv indexes hold the
    // key beside up to three integers.
    const MAX_KEY_BYTES: Option<usize> = Some(2600);
    const VALUE_BYTES: &'static str = "CAST(octet_length(value) AS BIGINT)";
    const ROW_BYTES: &'static str = "CAST(octet_length(`key`) + octet_length(value) AS BIGINT)";
    const BEGIN_WRITE: &'static str = "BEGIN ISOLATION LEVEL READ COMMITTED";
    const BEGIN_READ: &'static str = "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY";
    const LOCK: &'static str = " FOR UPDATE";
    const INSERT_KEYSPACE: &'static str =
        "INSERT INTO keyspaces (name) VALUES (?) ON CONFLICT (name) DO NOTHING RETURNING id";
    const INSERT_KEYSPACE_RETURNS_ID: bool = true;
    const EMPTY_BYTES: &'static str = "''::bytea";
    const SIZE: &'static str = "SELECT pg_database_size(current_database())::bigint, \
         (COALESCE(pg_total_relation_size('kv'), 0) + COALESCE(pg_total_relation_size('kv_head'), 0) \
         + COALESCE(pg_total_relation_size('leases'), 0) \
         + COALESCE(pg_total_relation_size('keyspaces'), 0))::bigint";
    const DEFRAGMENT: &'static str = "VACUUM kv, kv_head, leases, keyspaces";
    const ANALYZE: Option<&'static str> = Some("ANALYZE kv, kv_head, leases, keyspaces");
    const ROW_MD5: Option<&'static str> = Some(
        "md5(int8send(CAST(octet_length(`key`) AS BIGINT)) || `key` \
         || int8send(CAST(octet_length(value) AS BIGINT)) || value || int8send(create_revision) \
         || int8send(mod_revision) || int8send(version) || int8send(lease))",
    );
    const MD5_WORD: &'static str = "CAST(CAST('x' || substr({h}, 1, 16) AS BIT(64)) AS BIGINT)";
    const SUM_AS_INT: &'static str = "CAST({sum} AS BIGINT)";
    const NOTIFY: Option<&'static str> =
        Some("SELECT pg_notify('kine_rs_commits', CAST(? AS TEXT))");
    const LAZY_COMMIT: Option<&'static str> = Some("SET LOCAL synchronous_commit = off");
    const ANNOUNCE_UPDATE: Option<&'static str> = Some(
        " RETURNING pg_notify('kine_rs_commits', CAST(id AS TEXT) || ':' || CAST(revision AS TEXT))",
    );
    const KEY_LISTS: bool = false;
    const ROW_ID: Option<(&'static str, &'static str)> = Some(("ctid", "tid"));
    const ROW_VERSION: Option<&'static str> = Some("xmin");
    const ARRAYS: bool = true;
    const ONE_STATEMENT_READS: bool = true;
    const ONE_STATEMENT_PAGES: bool = true;
    const ONE_STATEMENT_EVENTS: bool = true;
    const COMMIT_BATCH: Option<&'static str> = Some(
        "SELECT CAST(kine_rs_commit(?, CAST(? AS XID), ?, ?, ?, CAST(? AS BYTEA[]), \
         CAST(? AS BIGINT[]), CAST(? AS BIGINT[]), CAST(? AS BIGINT[]), CAST(? AS BIGINT[]), \
         CAST(? AS BIGINT[]), CAST(? AS BYTEA[]), CAST(? AS SMALLINT[]), \
         CAST(? AS BYTEA[])) AS TEXT)",
    );
    const HEAD_TABLE: bool = true;

    fn sql(text: &str) -> std::borrow::Cow<'_, str> {
        numbered_placeholders(text)
    }
}

/// The PostgreSQL backend.
pub type PostgresBackend = SqlBackend<Postgres>;

/// Connection options for `endpoint` with the TLS files of `options`.
pub fn connect_options(endpoint: &str, options: &BackendOptions) -> Result<PgConnectOptions> {
    // sqlx does not know libpq's `sslpassword` (the passphrase of an encrypted client key)
    // and would log the parameter with its value as unrecognized: take it out first.
    let (endpoint, had_sslpassword) = without_query_parameter(endpoint, "sslpassword");
    if had_sslpassword {
        warn!("the endpoint's sslpassword is ignored: encrypted client keys are not supported");
    }
    let endpoint = endpoint.as_str();
    let mut connect = PgConnectOptions::from_str(endpoint)?;
    if connect.get_database().is_none_or(str::is_empty) {
        connect = connect.database(DEFAULT_DATABASE);
    }
    let tls = &options.tls;
    if let Some(ca) = &tls.ca_file {
        connect = connect.ssl_root_cert(ca);
    }
    if let Some(cert) = &tls.cert_file {
        connect = connect.ssl_client_cert(cert);
    }
    if let Some(key) = &tls.key_file {
        connect = connect.ssl_client_key(key);
    }
    if tls.any() && !endpoint.contains("sslmode=") {
        // Certificates were given: verify the server, unless the URL says otherwise.
        connect = connect.ssl_mode(PgSslMode::VerifyFull);
    }
    Ok(connect)
}

/// `url` without its query parameter `name` (any case), and whether it had it.
fn without_query_parameter(url: &str, name: &str) -> (String, bool) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_string(), false);
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let key = pair.split('=').next().unwrap_or(pair);
            !key.eq_ignore_ascii_case(name)
        })
        .collect();
    let had = kept.len() != query.split('&').count();
    if kept.is_empty() {
        (base.to_string(), had)
    } else {
        (format!("{base}?{}", kept.join("&")), had)
    }
}

/// Opens the database `endpoint` names, creating it and its schema if missing.
pub async fn open(endpoint: &str, options: &BackendOptions) -> Result<PostgresBackend> {
    let connect = connect_options(endpoint, options)?;
    create_database(&connect).await?;
    let pool: PgPool = super::pool_on_write_threads(
        pool_options(options, connect.get_port(), false),
        connect.clone(),
    )
    .await?;
    MIGRATOR
        .run(&pool)
        .await
        .map_err(|e| migration_error(e, &MIGRATOR))?;
    let watch_readers = watch_readers(options, connect).await?;
    let feed = CommitFeed::new();
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.listen(CHANNEL).await?;
    let task = tokio::spawn(listen(pool.clone(), listener, feed.clone()));
    // Notifications announce every commit: the feed polls only as a safety net.
    Ok(
        SqlBackend::new(pool.clone(), pool, None, feed, Box::new(AbortOnDrop(task)))
            .with_watch_readers(watch_readers),
    )
}

/// Pool options for the server at `port`: every connection also turns PostgreSQL's Memoize
/// off (14 and later; nothing to do before). kine-rs's lookups through `kv_head` probe
/// `kv` by a primary key that no two heads share, so a Memoize node only copies each
/// row into a cache it never hits: `EXPLAIN ANALYZE` of a list page of 500 × 1 KiB, 3.0–3.4 ms
/// with it, 1.8–2.1 ms without (501 misses, no hit, 597 kB cached).
///
/// With `custom_plans` (the watch hubs' connections), statements are planned for their
/// parameters at every execution instead of once: the event read's lookup of each event's
/// previous row, planned generically while `kv` was new and unanalyzed, found `kv_key` and
/// the primary key equally cheap and kept the primary key, reading the keyspace's whole
/// history backwards for every event of a new key (35 ms a read, watchers seconds behind)
/// until autovacuum's first ANALYZE, a minute later.
fn pool_options(
    options: &BackendOptions,
    port: u16,
    custom_plans: bool,
) -> sqlx::postgres::PgPoolOptions {
    options.pool.sqlx(port).after_connect(move |connection, _| {
        Box::pin(async move {
            super::nodelay::set_on_connections_to(port);
            sqlx::query(
                "SELECT set_config('enable_memoize', 'off', false) \
                     WHERE current_setting('server_version_num')::int >= 140000",
            )
            .execute(&mut *connection)
            .await?;
            if custom_plans {
                sqlx::query("SELECT set_config('plan_cache_mode', 'force_custom_plan', false)")
                    .execute(&mut *connection)
                    .await?;
            }
            Ok(())
        })
    })
}

/// The watch hubs' own few connections ([`SqlBackend::with_watch_readers`]).
async fn watch_readers(options: &BackendOptions, connect: PgConnectOptions) -> Result<PgPool> {
    Ok(pool_options(options, connect.get_port(), true)
        .max_connections(super::WATCH_CONNECTIONS)
        .min_connections(super::WATCH_CONNECTIONS)
        .connect_with(connect)
        .await?)
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Forwards commit notifications to the feed, which wakes only the hubs of the keyspace named.
/// Notifications sent while the LISTEN connection is down are lost, so once it listens again
/// every hub is told to look.
async fn listen(pool: PgPool, mut listener: PgListener, feed: std::sync::Arc<CommitFeed>) {
    loop {
        match listener.try_recv().await {
            Ok(Some(notification)) => {
                if let Some((id, revision)) = parse_payload(notification.payload()) {
                    feed.announce(id, revision);
                }
            }
            // sqlx reconnected (eagerly) and listens again.
            Ok(None) => {
                info!("the PostgreSQL notification connection was lost and is back");
                feed.announce_all();
            }
            // The connection failed, or reconnecting did: start over on a new one.
            Err(error) => {
                warn!(%error, "the PostgreSQL notification connection failed; reconnecting");
                feed.announce_all();
                drop(listener);
                listener = relisten(&pool).await;
                info!("listening for PostgreSQL notifications again");
                feed.announce_all();
            }
        }
    }
}

/// A notification's keyspace id and, when it names one, revision: `ID` (commit function of
/// migration 0007) or `ID:REVISION`.
fn parse_payload(payload: &str) -> Option<(i64, Option<i64>)> {
    match payload.split_once(':') {
        Some((id, revision)) => Some((id.parse().ok()?, Some(revision.parse().ok()?))),
        None => Some((payload.parse().ok()?, None)),
    }
}

/// A new LISTEN connection, retried until the database answers.
async fn relisten(pool: &PgPool) -> PgListener {
    loop {
        let attempt = async {
            let mut listener = PgListener::connect_with(pool).await?;
            listener.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        match attempt.await {
            Ok(listener) => return listener,
            Err(error) => {
                warn!(%error, "cannot listen for PostgreSQL notifications; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Creates the database `connect` names when it does not exist, like kine, connecting to the
/// server's `postgres` database to do so.
async fn create_database(connect: &PgConnectOptions) -> Result<()> {
    let name = connect
        .get_database()
        .unwrap_or(DEFAULT_DATABASE)
        .to_string();
    match connect.connect().await {
        Ok(conn) => {
            let _ = conn.close().await;
            return Ok(());
        }
        // 3D000: invalid_catalog_name, the database does not exist.
        Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("3D000") => {}
        Err(error) => return Err(error.into()),
    }
    info!(database = %name, "creating the database");
    let mut conn = connect.clone().database("postgres").connect().await?;
    let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
    match sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(&mut conn)
        .await
    {
        Ok(_) => {}
        // 42P04 duplicate_database or 23505 unique_violation: another process created it.
        Err(sqlx::Error::Database(error))
            if matches!(error.code().as_deref(), Some("42P04" | "23505")) => {}
        Err(error) => {
            return Err(KineError::Storage(format!(
                "cannot create the database {name:?}: {error}"
            )));
        }
    }
    let _ = conn.close().await;
    Ok(())
}

#[cfg(test)]
mod tests;
