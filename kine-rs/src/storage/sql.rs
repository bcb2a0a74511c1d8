//! The one SQL implementation of [`Backend`] and [`WriteTxn`], shared by SQLite, PostgreSQL
//! and MySQL/MariaDB.
//!
//! It is generic over a [`Dialect`], which names the sqlx database and supplies the few things
//! the three differ in: how transactions begin, how the keyspace row is locked (`FOR UPDATE`;
//! SQLite takes its single write lock with `BEGIN IMMEDIATE` instead), a few literals and
//! statements, and how a commit is announced to other processes. Every statement is written
//! once, with `?` placeholders and the `key` column quoted with backticks; [`Dialect::sql`]
//! rewrites that for PostgreSQL (`$1`, `"key"`).
//!
//! Database access goes through [`Driver`], implemented once (by a macro) for each sqlx
//! database, so the generic code needs no sqlx trait bounds of its own.

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::pool::PoolConnection;
use sqlx::{Database, Pool, Transaction};

use super::feed::{CommitFeed, POLL_CHUNK, PollCadence};
use super::page_counts::PageCounts;
use super::{
    Backend, BatchKeys, KeyspaceId, KeyspaceState, MigrationRole, Quota, RangeQuery, RangeRows,
    WriteTxn, Written, page_range, row_digest::RowDigest,
};
use crate::error::{KineError, Result};
use crate::metrics;
use crate::model::{
    Event, EventType, KeyRange, KeyValue, LeaseRecord, RangeEnd, Revision, now_ms, tombstone,
};

mod commit_cache;
mod insert_chunks;
mod past_purge;
mod point_reads;
pub(crate) mod snapshot_pages;
mod tenants;
mod write_tx;

use commit_cache::{CachedKey, CommitCache};
use insert_chunks::{MAX_INSERT_ROWS, insert_runs, padded_or_split};
use point_reads::PointReads;
use snapshot_pages::SnapshotPages;
pub use snapshot_pages::SnapshotTable;
use write_tx::{BatchConnection, WriteTx};

/// Marks a current row in `kv.superseded`.
pub const CURRENT: i64 = i64::MAX;

/// A bound statement parameter.
#[derive(Debug, Clone)]
pub enum Arg<'a> {
    Int(i64),
    Bytes(&'a [u8]),
    Text(&'a str),
    /// Array parameters, in statements of dialects with [`Dialect::ARRAYS`] only.
    Ints(Vec<i64>),
    ByteStrings(Vec<&'a [u8]>),
    Texts(Vec<&'a str>),
    /// Text built for the statement (a [`keys_json`] document).
    OwnedText(String),
}

/// The rows a statement returned.
pub type Row<D> = <<D as Dialect>::DB as Database>::Row;
/// A connection of a dialect's database.
pub type Conn<D> = <<D as Dialect>::DB as Database>::Connection;

/// Runs statements on one sqlx database and decodes their columns.
pub trait Driver: Database {
    /// Runs a statement; returns the number of rows it changed.
    fn execute<'a>(
        conn: &'a mut Self::Connection,
        sql: String,
        args: &'a [Arg<'a>],
    ) -> impl Future<Output = Result<u64>> + Send + 'a;

    /// Runs a query; returns every row.
    fn fetch_all<'a>(
        conn: &'a mut Self::Connection,
        sql: String,
        args: &'a [Arg<'a>],
    ) -> impl Future<Output = Result<Vec<Self::Row>>> + Send + 'a;

    /// How many columns a row has.
    fn columns(row: &Self::Row) -> usize;
    /// An integer column.
    fn int(row: &Self::Row, index: usize) -> Result<i64>;
    /// A byte-string column.
    fn bytes(row: &Self::Row, index: usize) -> Result<Vec<u8>>;
    /// A nullable byte-string column.
    fn opt_bytes(row: &Self::Row, index: usize) -> Result<Option<Vec<u8>>>;
    /// An integer column that may be NULL.
    fn opt_int(row: &Self::Row, index: usize) -> Result<Option<i64>>;
    /// A flag column (`deleted`, `frozen`), stored as a small integer.
    fn flag(row: &Self::Row, index: usize) -> Result<bool>;
    /// A text column.
    fn text(row: &Self::Row, index: usize) -> Result<String>;
    /// A nullable text column.
    fn opt_text(row: &Self::Row, index: usize) -> Result<Option<String>>;
}

/// Binds array parameters, where the database has them.
pub trait BindArrays: Database {
    fn bind_array<'q>(
        query: sqlx::query::Query<'q, Self, Self::Arguments>,
        arg: &Arg<'q>,
    ) -> sqlx::query::Query<'q, Self, Self::Arguments>;
}

impl BindArrays for sqlx::Postgres {
    fn bind_array<'q>(
        query: sqlx::query::Query<'q, Self, Self::Arguments>,
        arg: &Arg<'q>,
    ) -> sqlx::query::Query<'q, Self, Self::Arguments> {
        match arg {
            Arg::Ints(v) => query.bind(v.clone()),
            Arg::ByteStrings(v) => query.bind(v.clone()),
            Arg::Texts(v) => query.bind(v.clone()),
            Arg::Int(v) => query.bind(*v),
            Arg::Bytes(v) => query.bind(*v),
            Arg::Text(v) => query.bind(*v),
            Arg::OwnedText(v) => query.bind(v.clone()),
        }
    }
}

/// SQLite and MySQL have no array parameters; their dialects never build statements with
/// them ([`Dialect::ARRAYS`] is off), so an array here binds SQL NULL, which no statement of
/// theirs accepts as a value.
macro_rules! no_arrays {
    ($db:ty) => {
        impl BindArrays for $db {
            fn bind_array<'q>(
                query: sqlx::query::Query<'q, Self, Self::Arguments>,
                _arg: &Arg<'q>,
            ) -> sqlx::query::Query<'q, Self, Self::Arguments> {
                query.bind(None::<i64>)
            }
        }
    };
}
no_arrays!(sqlx::Sqlite);
no_arrays!(sqlx::MySql);

/// A statement with its parameters bound.
fn bound<'q, DB>(sql: String, args: &[Arg<'q>]) -> sqlx::query::Query<'q, DB, DB::Arguments>
where
    DB: Database + BindArrays,
    i64: for<'e> sqlx::Encode<'e, DB> + sqlx::Type<DB>,
    Option<i64>: for<'e> sqlx::Encode<'e, DB> + sqlx::Type<DB>,
    for<'b> &'b [u8]: sqlx::Encode<'b, DB> + sqlx::Type<DB>,
    for<'b> &'b str: sqlx::Encode<'b, DB> + sqlx::Type<DB>,
    String: for<'e> sqlx::Encode<'e, DB> + sqlx::Type<DB>,
{
    // Statements are assembled from constant fragments only; every value is a bound
    // parameter.
    let mut query = sqlx::query::<DB>(sqlx::AssertSqlSafe(sql));
    for arg in args {
        query = match arg {
            Arg::Int(v) => query.bind(*v),
            Arg::Bytes(v) => query.bind(*v),
            Arg::Text(v) => query.bind(*v),
            Arg::OwnedText(v) => query.bind(v.clone()),
            Arg::Ints(_) | Arg::ByteStrings(_) | Arg::Texts(_) => DB::bind_array(query, arg),
        };
    }
    query
}

/// Implements [`Driver`] for an sqlx database whose flag columns decode as `$flag`.
macro_rules! driver {
    ($db:ty, $flag:ty) => {
        impl Driver for $db {
            fn execute<'a>(
                conn: &'a mut Self::Connection,
                sql: String,
                args: &'a [Arg<'a>],
            ) -> impl Future<Output = Result<u64>> + Send + 'a {
                async move {
                    Ok(bound::<$db>(sql, args)
                        .execute(&mut *conn)
                        .await?
                        .rows_affected())
                }
            }

            fn fetch_all<'a>(
                conn: &'a mut Self::Connection,
                sql: String,
                args: &'a [Arg<'a>],
            ) -> impl Future<Output = Result<Vec<Self::Row>>> + Send + 'a {
                async move { Ok(bound::<$db>(sql, args).fetch_all(&mut *conn).await?) }
            }

            fn columns(row: &Self::Row) -> usize {
                sqlx::Row::len(row)
            }

            fn int(row: &Self::Row, index: usize) -> Result<i64> {
                Ok(sqlx::Row::try_get::<i64, _>(row, index)?)
            }

            fn bytes(row: &Self::Row, index: usize) -> Result<Vec<u8>> {
                Ok(sqlx::Row::try_get::<Vec<u8>, _>(row, index)?)
            }

            fn opt_bytes(row: &Self::Row, index: usize) -> Result<Option<Vec<u8>>> {
                Ok(sqlx::Row::try_get::<Option<Vec<u8>>, _>(row, index)?)
            }

            fn opt_int(row: &Self::Row, index: usize) -> Result<Option<i64>> {
                Ok(sqlx::Row::try_get::<Option<i64>, _>(row, index)?)
            }

            fn flag(row: &Self::Row, index: usize) -> Result<bool> {
                Ok(sqlx::Row::try_get::<$flag, _>(row, index)? != 0)
            }

            fn text(row: &Self::Row, index: usize) -> Result<String> {
                Ok(sqlx::Row::try_get::<String, _>(row, index)?)
            }

            fn opt_text(row: &Self::Row, index: usize) -> Result<Option<String>> {
                Ok(sqlx::Row::try_get::<Option<String>, _>(row, index)?)
            }
        }
    };
}

driver!(sqlx::Sqlite, i64);
driver!(sqlx::Postgres, i16);
driver!(sqlx::MySql, i64);

/// What differs between the SQL databases.
pub trait Dialect: Send + Sync + 'static {
    type DB: Driver;

    /// The driver's name, for logs and metrics.
    const DRIVER: &'static str;
    /// Starts a write transaction.
    const BEGIN_WRITE: &'static str;
    /// Starts a read transaction that sees one snapshot across its statements.
    const BEGIN_READ: &'static str;
    /// Appended to the read of the keyspace row that starts every write: its row lock.
    const LOCK: &'static str;
    /// Creates a keyspace named `?` unless it exists.
    const INSERT_KEYSPACE: &'static str;
    /// Whether [`Dialect::INSERT_KEYSPACE`] answers the new keyspace's id (`RETURNING`; no
    /// row when it existed), saving a lookup after it.
    const INSERT_KEYSPACE_RETURNS_ID: bool;
    /// An empty byte string, as a literal.
    const EMPTY_BYTES: &'static str;
    /// Allocated and in-use bytes of the datastore, as two integer columns.
    const SIZE: &'static str;
    /// Gives free space back.
    const DEFRAGMENT: &'static str;
    /// Refreshes the planner's statistics of the tables a migration's import fills
    /// (`None`: the database keeps them current itself).
    const ANALYZE: Option<&'static str> = None;
    /// Announces, inside the write transaction, that keyspace `?` changed.
    const NOTIFY: Option<&'static str> = None;
    /// Makes the commit of the transaction it runs in return without waiting for the
    /// datastore's log flush (`None`: the dialect has no such setting for one transaction).
    /// Only lease renewals use it: etcd keeps renewals in memory and loses them in a crash,
    /// and a renewal lost here leaves the lease's previous deadline, stored durably earlier.
    const LAZY_COMMIT: Option<&'static str> = None;
    /// Appended to the update of a keyspace row that stores a new revision: announces it in
    /// the same statement (one round trip less per write).
    const ANNOUNCE_UPDATE: Option<&'static str> = None;
    /// The longest key the schema can store, where it is limited.
    const MAX_KEY_BYTES: Option<usize> = None;
    /// The size of a row's value, as a 64-bit integer.
    const VALUE_BYTES: &'static str = "LENGTH(value)";
    /// The size of a row's key and value together (what a migration's byte budgets count).
    const ROW_BYTES: &'static str = "LENGTH(`key`) + LENGTH(value)";
    /// Whether a statement may look keys up with an `IN` list. PostgreSQL's planner, without
    /// fresh statistics (a new table), filters such a list over every current row of the
    /// keyspace instead of probing the index per key; there keys are looked up one per
    /// `UNION ALL` branch and found again by [`ROW_ID`](Dialect::ROW_ID).
    const KEY_LISTS: bool = true;
    /// Whether a statement naming several keys joins them as one JSON parameter
    /// ([`KEYS_JSON_TABLE`], [`keys_json`]) instead of an `IN` list (MySQL, MariaDB). MariaDB
    /// optimizes a prepared statement again at every execution, and the range analysis of an
    /// `IN` list of 64 keys took 0.6–1.0 ms against 0.06–0.1 ms for the lookups themselves
    /// (`ANALYZE FORMAT=JSON`); a join on the key is planned as one lookup by the primary
    /// key's prefix whatever the number of keys: the whole statement 0.29–0.33 ms against
    /// 0.67–0.98 (`SHOW PROFILES`, 64 keys, prepared).
    const KEYS_JOINED: bool = false;
    /// A hidden column naming a row's place in its table, and its type, where the database
    /// has one that stays put while the keyspace lock is held (PostgreSQL's `ctid`): rows read
    /// under the lock are superseded through it, whatever the planner's statistics.
    const ROW_ID: Option<(&'static str, &'static str)> = None;
    /// A hidden column of the keyspace row that changes with every committed update of it and
    /// never takes a value it had before (PostgreSQL's `xmin`, the writing transaction's id):
    /// the version a write batch read without the lock, checked when it commits. Not the
    /// [`ROW_ID`](Dialect::ROW_ID): PostgreSQL reuses a page's line pointers, so a row's
    /// `ctid` comes back to an earlier value after a few updates.
    const ROW_VERSION: Option<&'static str> = None;
    /// Array parameters: a batch's rows superseded and inserted with one statement each,
    /// whatever its size (PostgreSQL), instead of multi-row statements in power-of-two shapes.
    const ARRAYS: bool = false;

    /// A call committing a whole write batch that was read without the keyspace lock, where
    /// the database has one (PostgreSQL's `kine_rs_commit`, migration 0010). Its parameters:
    /// keyspace, the [`ROW_VERSION`](Dialect::ROW_VERSION) of the keyspace row as read, revision, live
    /// keys, bytes, the new rows as arrays of their columns, then the keys the batch took for
    /// absent without reading them. It fails with [`crate::error::KEYSPACE_CHANGED`] when the
    /// keyspace row changed since the read, and with [`crate::error::ABSENT_KEY_EXISTS`] when
    /// one of those keys has a live row. Needs [`ROW_VERSION`](Dialect::ROW_VERSION) and
    /// [`ARRAYS`](Dialect::ARRAYS).
    const COMMIT_BATCH: Option<&'static str> = None;
    /// Whether a read at the current revision that needs no separate count may be one
    /// statement outside a transaction (the keyspace row joined with the range's rows, one
    /// snapshot): one round trip instead of begin, keyspace row, rows and commit
    /// (PostgreSQL, where each of those is a round trip to the server).
    const ONE_STATEMENT_READS: bool = false;
    /// Whether a read of one key at the current revision is read that way (implied by
    /// [`ONE_STATEMENT_READS`](Dialect::ONE_STATEMENT_READS)). SQLite: each call is a hand-off
    /// to the connection's worker thread and back, and a single key has no page for SQLite to
    /// materialize before the join (which made its lists slower read this way).
    const ONE_STATEMENT_GETS: bool = false;
    /// Whether a later page of a list read at the current revision is read that way too
    /// while no write came since (PostgreSQL). Not on MySQL: MariaDB materializes the page's
    /// rows before the join, and lists of 20,000 × 1 KiB by 500 took 17% longer than with
    /// the read transaction.
    const ONE_STATEMENT_PAGES: bool = false;
    /// Whether one call may carry several statements (`;`-separated, the parameters of each
    /// in turn): SQLite, where every call is a hand-off to the connection's worker thread and
    /// back, while the keyspace's next write batch waits for the lock.
    const MULTI_STATEMENT: bool = false;
    /// Where a write call checks, statement by statement, the rows each changed, so that
    /// the call may end with the batch's COMMIT (SQLite, [`ChangedRowsCheck`]).
    const CHANGED_ROWS_CHECK: Option<ChangedRowsCheck> = None;
    /// Where a write batch on the [`BatchConnection`] may start from the [`CommitCache`]
    /// without reading (SQLite, [`UnreadBatch`]).
    const UNREAD_BATCH: Option<UnreadBatch> = None;
    /// Whether a key's current row is named by a row of `kv_head` (PostgreSQL, migration
    /// 0008) instead of marked in `kv.superseded`: `kv` only gets rows appended, and an
    /// overwrite changes a narrow head row in place instead of rewriting the row it
    /// supersedes. Statements that read current rows, older revisions or previous values, and
    /// compaction, take the head table's shape; the write statements are the
    /// [`ARRAYS`](Dialect::ARRAYS) ones.
    const HEAD_TABLE: bool = false;
    /// Whether a key's current row is named by a row of `kv_head` and each superseded row by
    /// a row of `kv_past` with the revision that superseded it (SQLite, migration 0007),
    /// instead of `kv.superseded`: an overwrite appends its row, moves the narrow head in
    /// place and adds a narrow row to `kv_past`, instead of rewriting the row it supersedes.
    /// Reads take the shapes of the `superseded` model, from `kv_current` and `kv_superseded`
    /// (kv's columns with `superseded`: [`CURRENT_VIEW`](Dialect::CURRENT_VIEW),
    /// [`SUPERSEDED_VIEW`](Dialect::SUPERSEDED_VIEW)), and counts from `kv_head` and
    /// `kv_past` alone.
    const PAST_TABLE: bool = false;
    /// With [`PAST_TABLE`](Dialect::PAST_TABLE): whether a write batch adds the rows of
    /// `kv_past` itself, from the heads its lookups read (`sub` too) and its own rows, and
    /// moves each written key's head once, to its newest row (MySQL: creating a trigger needs
    /// the SUPER privilege, or `log_bin_trust_function_creators`, wherever binary logging is
    /// on), instead of a trigger on `kv_head` adding them as the heads move (SQLite).
    const WRITES_PAST_ROWS: bool = false;
    /// With [`PAST_TABLE`](Dialect::PAST_TABLE): the current rows with kv's columns and
    /// `superseded` (the largest integer), named `kv_current`: a view (SQLite's migration
    /// 0007), or the same as a derived table where a view would need a right kine-rs's user
    /// may not have (MySQL's `CREATE VIEW`, which a tenant provisioned before would lack while
    /// its migration ran: a failed migration leaves a MySQL database marked dirty).
    const CURRENT_VIEW: &'static str = "kv_current";
    /// The superseded rows likewise, with the revision that superseded each, named
    /// `kv_superseded`.
    const SUPERSEDED_VIEW: &'static str = "kv_superseded";
    /// What makes an `INSERT` into `kv_head` move an existing head instead
    /// ([`PAST_TABLE`](Dialect::PAST_TABLE)).
    const UPSERT_HEAD: &'static str = " ON CONFLICT (keyspace, `key`) DO UPDATE SET \
         mod_revision = excluded.mod_revision, sub = excluded.sub, deleted = excluded.deleted";
    /// Where a snapshot at an older revision read in pages keeps the rows superseded since in
    /// a temporary table of its own connection ([`SnapshotPages`]; with
    /// [`PAST_TABLE`](Dialect::PAST_TABLE)), the statements that keep it; without, each page
    /// finds them among every row superseded since.
    const SNAPSHOT_TABLE: Option<SnapshotTable> = None;
    /// A clause that makes a multi-row `INSERT` into `kv_past` leave a row that repeats one
    /// before it alone (MySQL's `ON DUPLICATE KEY UPDATE` of a column to itself), so the
    /// statement may be padded to a power of two with its last row, as the heads' upsert is:
    /// one statement per batch where power-of-two pieces were three or four round trips under
    /// the keyspace's lock ([`Dialect::WRITES_PAST_ROWS`]). A row of `kv_past` is a fact
    /// about one row of `kv` (its primary key names all but `deleted`, which that row fixes),
    /// so a repeat changes nothing. Not for `kv` itself: there a repeated key would hide a
    /// revision written twice, which its primary key refuses.
    const PADDED_INSERT: Option<&'static str> = None;
    /// Whether a watch's events may be read in one statement outside a transaction (the
    /// keyspace row's compaction revision joined with the events: one snapshot).
    const ONE_STATEMENT_EVENTS: bool = false;
    /// The predicate selecting current rows by `superseded` (databases without
    /// [`HEAD_TABLE`](Dialect::HEAD_TABLE)).
    const CURRENT_ROWS: &'static str = "superseded = 9223372036854775807";
    /// Whether a limited read at an older revision runs its two branches one after the
    /// other, the superseded rows' branch bounded by the last key of the current rows' page
    /// ([`rows_at_revision_in_two_steps`]). MariaDB 10.11 plans the superseded branch of the
    /// `UNION ALL` as a walk of the primary key from the page's first key to the end of the
    /// range, to spare a sort under the LIMIT: a page of 1,000 keys of a 300,000-key
    /// keyspace took 750 ms that way and 23 ms bounded, and a migration's snapshot out of
    /// MariaDB grew quadratic in the keyspace's size. (A window function over that union,
    /// for a migration page's byte budget, was worse still: 5 s a page at a million keys.)
    const READS_AT_REVISION_IN_TWO_STEPS: bool = false;

    /// The MD5 of a row's encoding ([`RowDigest`](super::row_digest::RowDigest)) as 32 hex
    /// digits, over the columns of [`KV_COLUMNS`], where the database has MD5 (`None`: a
    /// migration's digest reads the rows instead).
    const ROW_MD5: Option<&'static str> = None;
    /// The first 16 hex digits of `{h}` as an integer (signed or not: the sum is taken
    /// modulo 2^64).
    const MD5_WORD: &'static str = "";
    /// `{sum}` (an exact number within the 64-bit range) as a 64-bit integer.
    const SUM_AS_INT: &'static str = "";

    /// Rewrites a statement written with `?` placeholders and a backtick-quoted `key`.
    fn sql(text: &str) -> Cow<'_, str> {
        Cow::Borrowed(text)
    }
}

/// Rewrites `?` into `$1`, `$2`, … and backticks into double quotes (PostgreSQL).
pub fn numbered_placeholders(text: &str) -> Cow<'_, str> {
    let mut out = String::with_capacity(text.len() + 16);
    let mut n = 0;
    for c in text.chars() {
        match c {
            '?' => {
                n += 1;
                out.push('$');
                out.push_str(&n.to_string());
            }
            '`' => out.push('"'),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Runs one step of database work, recording its duration and outcome as a `query` of the
/// dialect's driver (see [`metrics::sql_query`]: a fixed name, never the statement's values).
async fn timed<D: Dialect, T>(
    query: &'static str,
    step: impl Future<Output = Result<T>>,
) -> Result<T> {
    let started = Instant::now();
    let result = step.await;
    metrics::sql_query(D::DRIVER, query, started.elapsed(), result.as_ref().err());
    result
}

/// A connection from `pool`; the wait is recorded as query `acquire`.
async fn acquire<D: Dialect>(pool: &Pool<D::DB>) -> Result<PoolConnection<D::DB>> {
    timed::<D, _>("acquire", async { Ok(pool.acquire().await?) }).await
}

/// A transaction on a connection from `pool`, begun with `begin`, recorded as `query`.
async fn begin<D: Dialect>(
    pool: &Pool<D::DB>,
    query: &'static str,
    begin: &'static str,
) -> Result<Transaction<'static, D::DB>> {
    timed::<D, _>(query, async {
        Ok(pool.begin_with(sqlx::AssertSqlSafe(begin)).await?)
    })
    .await
}

/// Commits `tx`, recorded as query `commit`.
async fn commit<D: Dialect>(tx: Transaction<'static, D::DB>) -> Result<()> {
    timed::<D, _>("commit", async { Ok(tx.commit().await?) }).await
}

async fn execute<D: Dialect>(
    conn: &mut Conn<D>,
    query: &'static str,
    sql: &str,
    args: &[Arg<'_>],
) -> Result<u64> {
    let sql = D::sql(sql).into_owned();
    timed::<D, _>(query, D::DB::execute(conn, sql, args)).await
}

async fn fetch_all<D: Dialect>(
    conn: &mut Conn<D>,
    query: &'static str,
    sql: &str,
    args: &[Arg<'_>],
) -> Result<Vec<Row<D>>> {
    let sql = D::sql(sql).into_owned();
    timed::<D, _>(query, D::DB::fetch_all(conn, sql, args)).await
}

async fn fetch_optional<D: Dialect>(
    conn: &mut Conn<D>,
    query: &'static str,
    sql: &str,
    args: &[Arg<'_>],
) -> Result<Option<Row<D>>> {
    Ok(fetch_all::<D>(conn, query, sql, args)
        .await?
        .into_iter()
        .next())
}

/// Column list of a key-value row, in the order [`kv_from_row`] decodes.
const KV_COLUMNS: &str = "`key`, create_revision, mod_revision, version, lease, value";

fn kv_from_row<D: Dialect>(row: &Row<D>, offset: usize) -> Result<KeyValue> {
    Ok(KeyValue {
        key: Bytes::from(D::DB::bytes(row, offset)?),
        create_revision: D::DB::int(row, offset + 1)?,
        mod_revision: D::DB::int(row, offset + 2)?,
        version: D::DB::int(row, offset + 3)?,
        lease: D::DB::int(row, offset + 4)?,
        value: Bytes::from(D::DB::bytes(row, offset + 5)?),
    })
}

fn lease_from_row<D: Dialect>(row: &Row<D>) -> Result<LeaseRecord> {
    Ok(LeaseRecord {
        id: D::DB::int(row, 0)?,
        ttl: D::DB::int(row, 1)?,
        expires_at_ms: D::DB::int(row, 2)?,
    })
}

/// Reads the keyspace's counters; with `lock`, under its row lock.
async fn read_state<D: Dialect>(
    conn: &mut Conn<D>,
    keyspace: KeyspaceId,
    lock: bool,
) -> Result<KeyspaceState> {
    Ok(read_state_row::<D>(conn, keyspace, lock, false).await?.0)
}

/// Events without previous values from rows of `kv` (columns [`KV_COLUMNS`], then `deleted`),
/// in the order read: a history for a migration.
fn history_events<D: Dialect>(rows: &[Row<D>]) -> Result<Vec<Event>> {
    rows.iter()
        .map(|row| {
            let kv = kv_from_row::<D>(row, 0)?;
            let (kind, kv) = if D::DB::flag(row, 6)? {
                (EventType::Delete, tombstone(kv.key, kv.mod_revision))
            } else {
                (EventType::Put, kv)
            };
            Ok(Event {
                r#type: kind as i32,
                kv: Some(kv),
                prev_kv: None,
            })
        })
        .collect()
}

/// Renews the leases `ids` of `keyspace` that have not expired, on `conn`; answers those it
/// renewed. One statement renews a chunk (the list padded to a power of two, so the statements
/// stay few and prepared), one reads back those it renewed: after it a renewed lease's
/// deadline is ahead of `now_ms`, and one it did not renew has passed.
async fn renew_lease_rows<D: Dialect>(
    conn: &mut Conn<D>,
    keyspace: KeyspaceId,
    ids: &[i64],
    now_ms: i64,
) -> Result<HashMap<i64, LeaseRecord>> {
    let mut renewed = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(crate::renewals::MAX_BATCH) {
        let size = chunk.len().next_power_of_two();
        let last = chunk[chunk.len() - 1];
        let listed = chunk
            .iter()
            .copied()
            .chain(std::iter::repeat_n(last, size - chunk.len()));
        let list = placeholders(size);
        let mut args = vec![Arg::Int(now_ms), Arg::Int(keyspace)];
        args.extend(listed.clone().map(Arg::Int));
        args.extend([Arg::Int(now_ms), Arg::Int(keyspace)]);
        execute::<D>(
            conn,
            "lease_renew",
            &format!(
                "UPDATE leases SET expires_at_ms = ? + ttl * 1000 \
                 WHERE keyspace = ? AND id IN ({list}) AND (expires_at_ms > ? OR \
                 expires_at_ms > (SELECT frozen_at_ms FROM keyspaces WHERE id = ? AND frozen = 1))"
            ),
            &args,
        )
        .await?;
        let mut args = vec![Arg::Int(keyspace)];
        args.extend(listed.map(Arg::Int));
        args.push(Arg::Int(now_ms));
        let rows = fetch_all::<D>(
            conn,
            "lease_renewed",
            &format!(
                "SELECT id, ttl, expires_at_ms FROM leases \
                 WHERE keyspace = ? AND id IN ({list}) AND expires_at_ms > ?"
            ),
            &args,
        )
        .await?;
        for row in &rows {
            let lease = lease_from_row::<D>(row)?;
            renewed.insert(lease.id, lease);
        }
    }
    Ok(renewed)
}

/// Reads the keyspace's counters and the version of its row ([`Dialect::ROW_VERSION`]; `None`
/// without one); with `lock`, under its row lock.
async fn read_state_version<D: Dialect>(
    conn: &mut Conn<D>,
    keyspace: KeyspaceId,
    lock: bool,
) -> Result<(KeyspaceState, Option<String>)> {
    read_state_row::<D>(conn, keyspace, lock, true).await
}

async fn read_state_row<D: Dialect>(
    conn: &mut Conn<D>,
    keyspace: KeyspaceId,
    lock: bool,
    with_version: bool,
) -> Result<(KeyspaceState, Option<String>)> {
    let version = D::ROW_VERSION
        .filter(|_| with_version)
        .map(|column| format!(", CAST({column} AS TEXT)"));
    let sql = format!(
        "SELECT {STATE_COLUMNS}{} FROM keyspaces WHERE id = ?{}",
        version.as_deref().unwrap_or(""),
        if lock { D::LOCK } else { "" }
    );
    let row = fetch_optional::<D>(
        conn,
        if lock { "state_lock" } else { "state" },
        &sql,
        &[Arg::Int(keyspace)],
    )
    .await?
    .ok_or(KineError::KeyspaceDeleted)?;
    let state = state_from_row::<D>(&row, keyspace)?;
    match version {
        Some(_) => Ok((state, Some(D::DB::text(&row, 10)?))),
        None => Ok((state, None)),
    }
}

/// Columns of a keyspace row, in the order [`state_from_row`] decodes.
pub(crate) const STATE_COLUMNS: &str = "revision, compact_revision, frozen, frozen_at_ms, \
     keys_count, bytes_used, quota_keys, quota_bytes, migration_role, pinned_revision";
/// How many columns [`STATE_COLUMNS`] names: the columns joined after them start there.
const STATE_COLUMN_COUNT: usize = 10;

pub(crate) fn state_from_row<D: Dialect>(row: &Row<D>, id: KeyspaceId) -> Result<KeyspaceState> {
    Ok(KeyspaceState {
        id,
        revision: D::DB::int(row, 0)?,
        compact_revision: D::DB::int(row, 1)?,
        frozen: D::DB::flag(row, 2)?,
        frozen_at_ms: D::DB::int(row, 3)?,
        keys: D::DB::int(row, 4)?,
        bytes: D::DB::int(row, 5)?,
        quota: Quota {
            keys: D::DB::int(row, 6)?,
            bytes: D::DB::int(row, 7)?,
        },
        migration: MigrationRole::from_code(D::DB::int(row, 8)?),
        pinned_revision: D::DB::int(row, 9)?,
    })
}

/// One branch of the rows a range selects: a filter with its parameters, and where it reads
/// from.
struct RangeBranch<'a> {
    /// The table or view holding the branch's rows with kv's columns.
    rows: &'static str,
    /// The table holding the columns the filter names: enough to count the branch's rows.
    keys: &'static str,
    filter: String,
    args: Vec<Arg<'a>>,
}

/// The rows of `range` live at the current revision (`at` = None) or at `at`, as branches.
/// At an older revision a live row is either still current, or was superseded after `at`:
/// two branches, each served by its own index (current rows by key, superseded rows by key),
/// so no read walks the history of keys it does not return.
fn range_filters<'a, D: Dialect>(
    keyspace: KeyspaceId,
    range: &'a KeyRange,
    end: Option<&'a [u8]>,
    at: Option<Revision>,
) -> Vec<RangeBranch<'a>> {
    let mut base = String::from("keyspace = ? AND `key` >= ?");
    let mut args = vec![Arg::Int(keyspace), Arg::Bytes(&range.start)];
    if let Some(end) = end {
        base.push_str(" AND `key` < ?");
        args.push(Arg::Bytes(end));
    }
    // Current rows: those of `kv_head` ([`Dialect::PAST_TABLE`]), else marked in `kv`.
    let current = |rest: &str, args: Vec<Arg<'a>>| {
        if D::PAST_TABLE {
            RangeBranch {
                rows: D::CURRENT_VIEW,
                keys: "kv_head",
                filter: format!("{base}{rest}"),
                args,
            }
        } else {
            RangeBranch {
                rows: "kv",
                keys: "kv",
                filter: format!("{base} AND {}{rest}", D::CURRENT_ROWS),
                args,
            }
        }
    };
    match at {
        None => vec![current(" AND deleted = 0", args)],
        Some(at) => {
            let mut current_args = args.clone();
            current_args.push(Arg::Int(at));
            let mut superseded = args;
            superseded.extend([Arg::Int(at), Arg::Int(at)]);
            let superseded = if D::PAST_TABLE {
                // `kv_past` is ordered by superseding revision: the rows superseded since
                // `at`, each kept when it is in the range and was written by then.
                RangeBranch {
                    rows: D::SUPERSEDED_VIEW,
                    keys: "kv_past",
                    filter: format!(
                        "{base} AND superseded > ? AND mod_revision <= ? AND deleted = 0"
                    ),
                    args: superseded,
                }
            } else {
                RangeBranch {
                    rows: "kv",
                    keys: "kv",
                    filter: format!(
                        "{base} AND superseded <> 9223372036854775807 AND superseded > ? \
                         AND mod_revision <= ? AND deleted = 0"
                    ),
                    args: superseded,
                }
            };
            vec![
                current(" AND mod_revision <= ? AND deleted = 0", current_args),
                superseded,
            ]
        }
    }
}

/// The statement reading `columns` of the rows `branches` select, in key order, at most
/// `limit` of them.
fn range_rows_sql<'a>(
    columns: &str,
    branches: &[RangeBranch<'a>],
    limit: Option<i64>,
) -> (String, Vec<Arg<'a>>) {
    let mut args = Vec::new();
    let mut selects = Vec::new();
    for branch in branches {
        let mut sql = format!(
            "SELECT {columns} FROM {} WHERE {} ORDER BY `key`",
            branch.rows, branch.filter
        );
        args.extend(branch.args.iter().cloned());
        if let Some(limit) = limit {
            sql.push_str(" LIMIT ?");
            args.push(Arg::Int(limit));
        }
        selects.push(sql);
    }
    if selects.len() == 1 {
        return (selects.remove(0), args);
    }
    let mut sql = selects
        .iter()
        .enumerate()
        .map(|(i, select)| format!("SELECT * FROM ({select}) AS branch{i}"))
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    sql.push_str(" ORDER BY `key`");
    if let Some(limit) = limit {
        sql.push_str(" LIMIT ?");
        args.push(Arg::Int(limit));
    }
    (sql, args)
}

/// The statement counting the rows `branches` select.
fn range_count_sql<'a>(branches: &[RangeBranch<'a>]) -> (String, Vec<Arg<'a>>) {
    let counts: Vec<String> = branches
        .iter()
        .map(|branch| {
            format!(
                "(SELECT COUNT(*) FROM {} WHERE {})",
                branch.keys, branch.filter
            )
        })
        .collect();
    let args = branches
        .iter()
        .flat_map(|branch| branch.args.iter().cloned())
        .collect();
    (format!("SELECT {}", counts.join(" + ")), args)
}

/// The rows of `range` (up to `end`) live at the current revision or at `at`, in key order,
/// at most `limit` of them; with `keys_only`, empty values. One statement, or two where
/// [`Dialect::READS_AT_REVISION_IN_TWO_STEPS`] says so.
#[allow(clippy::too_many_arguments)]
async fn fetch_range_rows<D: Dialect>(
    conn: &mut Conn<D>,
    query: &'static str,
    keyspace: KeyspaceId,
    range: &KeyRange,
    end: Option<&[u8]>,
    at: Option<Revision>,
    keys_only: bool,
    limit: Option<i64>,
) -> Result<Vec<KeyValue>> {
    if let (true, false, Some(at), Some(limit)) =
        (D::READS_AT_REVISION_IN_TWO_STEPS, D::HEAD_TABLE, at, limit)
    {
        return rows_at_revision_in_two_steps::<D>(
            conn, query, keyspace, range, end, at, keys_only, limit, None,
        )
        .await;
    }
    let (sql, args) = range_rows_statement::<D>(keyspace, range, end, at, keys_only, limit);
    let rows = fetch_all::<D>(conn, query, &sql, &args).await?;
    rows.iter().map(|row| kv_from_row::<D>(row, 0)).collect()
}

/// [`fetch_range_rows`] at an older revision in two statements: first the page of rows still
/// current, then the rows superseded after `at`, up to that page's last key when it was cut
/// (no row past it can be among the page), so neither statement reads past the keys the
/// answer can hold. With `max_bytes`, each statement also keeps only the prefix of its rows
/// that fits the budget (one row always), cut on the server, and so does the answer.
#[allow(clippy::too_many_arguments)]
async fn rows_at_revision_in_two_steps<D: Dialect>(
    conn: &mut Conn<D>,
    query: &'static str,
    keyspace: KeyspaceId,
    range: &KeyRange,
    end: Option<&[u8]>,
    at: Revision,
    keys_only: bool,
    limit: i64,
    max_bytes: Option<usize>,
) -> Result<Vec<KeyValue>> {
    let limit = limit.max(1);
    let mut filters = range_filters::<D>(keyspace, range, end, Some(at)).into_iter();
    let (Some(current), Some(superseded)) = (filters.next(), filters.next()) else {
        return Err(KineError::Storage(
            "a read at a revision without its two branches".into(),
        ));
    };
    let (mut kvs, current_cut) =
        branch_at_revision::<D>(conn, query, current, None, keys_only, limit, max_bytes).await?;
    let bound = current_cut
        .then(|| kvs.last().map(|kv| kv.key.clone()))
        .flatten();
    let (superseded_kvs, superseded_cut) = branch_at_revision::<D>(
        conn,
        query,
        superseded,
        bound.as_deref(),
        keys_only,
        limit,
        max_bytes,
    )
    .await?;
    // Complete up to the lower of the two cuts: past it, a row of the other branch may be
    // missing.
    let superseded_last = superseded_cut
        .then(|| superseded_kvs.last().map(|kv| kv.key.clone()))
        .flatten();
    let complete_to = match (bound, superseded_last) {
        (Some(current), Some(superseded)) => Some(current.min(superseded)),
        (current, superseded) => current.or(superseded),
    };
    kvs.extend(superseded_kvs);
    // A key has one row live at `at`: in one branch or the other, never both.
    kvs.sort_unstable_by(|a, b| a.key.cmp(&b.key));
    if let Some(complete_to) = complete_to {
        kvs.retain(|kv| kv.key <= complete_to);
    }
    kvs.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    if let Some(max_bytes) = max_bytes {
        let mut bytes = 0;
        let fits = kvs
            .iter()
            .take_while(|kv| {
                bytes += kv.key.len() + kv.value.len();
                bytes <= max_bytes
            })
            .count();
        kvs.truncate(fits.max(1));
    }
    Ok(kvs)
}

/// The rows of `rows` (columns [`KV_COLUMNS`], in key order) whose running size in key order
/// fits a budget given as the last parameter (`?`), one row always: cut on the server, so
/// large values past the budget never reach this process. A last column, `found`, counts the
/// rows before the cut.
fn within_budget_sql<D: Dialect>(rows: &str) -> String {
    format!(
        "SELECT {KV_COLUMNS}, found FROM (SELECT p.*, SUM({bytes}) OVER (ORDER BY `key` ROWS \
         UNBOUNDED PRECEDING) AS upto, ROW_NUMBER() OVER (ORDER BY `key`) AS n, COUNT(*) \
         OVER () AS found FROM ({rows}) AS p) AS s WHERE upto <= ? OR n = 1 ORDER BY `key`",
        bytes = D::ROW_BYTES
    )
}

/// The revision a read of `revision` reads at, given the keyspace's `state`: `None` for the
/// current one (0 or the current revision), else the older revision; refused past the current
/// revision or below the compaction, as etcd refuses them.
fn older_revision(state: &KeyspaceState, revision: Revision) -> Result<Option<Revision>> {
    if revision <= 0 || revision == state.revision {
        Ok(None)
    } else if revision > state.revision {
        Err(KineError::FutureRevision)
    } else if revision < state.compact_revision {
        Err(KineError::Compacted)
    } else {
        Ok(Some(revision))
    }
}

/// The statement computing the [`RowDigest`] of the keys of `keyspace` live at the current
/// revision or at `at`: one row per branch of [`digest_rows`], each the count of its rows and
/// the sum of their words as a signed 64-bit integer (which the caller adds up).
fn row_digest_statement<'a, D: Dialect>(
    row_md5: &str,
    keyspace: KeyspaceId,
    range: &'a KeyRange,
    at: Option<Revision>,
) -> (String, Vec<Arg<'a>>) {
    // The sum is exact in the database's decimals, then taken modulo 2^64 (PostgreSQL's
    // words are signed, so the remainder may be negative) and written as a signed integer.
    const TWO_TO_64: &str = "18446744073709551616";
    let word = D::MD5_WORD.replace("{h}", row_md5);
    let signed = D::SUM_AS_INT.replace(
        "{sum}",
        "CASE WHEN m >= 9223372036854775808 THEN m - 18446744073709551616 ELSE m END",
    );
    let mut all_args = Vec::new();
    let branches: Vec<String> = digest_rows::<D>(keyspace, range, at)
        .into_iter()
        .map(|(rows, args)| {
            all_args.extend(args);
            format!(
                "SELECT n, {signed} FROM (SELECT n, MOD(MOD(s, {TWO_TO_64}) + {TWO_TO_64}, \
                 {TWO_TO_64}) AS m FROM (SELECT COUNT(*) AS n, COALESCE(SUM({word}), 0) AS s \
                 FROM ({rows}) AS r) AS a) AS b"
            )
        })
        .collect();
    (branches.join(" UNION ALL "), all_args)
}

/// Statements selecting the keys live at the current revision or at `at` (columns
/// [`KV_COLUMNS`]), together all of them once, in no order: for a digest of the whole
/// keyspace, which the database may read by scanning and hashing instead of by key (the
/// ordered read of a million current rows through their heads took 18 s on PostgreSQL, a
/// hash join 2.5 s; MariaDB wrote an ordered derived table to disk before hashing it).
fn digest_rows<D: Dialect>(
    keyspace: KeyspaceId,
    range: &KeyRange,
    at: Option<Revision>,
) -> Vec<(String, Vec<Arg<'_>>)> {
    if !D::HEAD_TABLE {
        return range_filters::<D>(keyspace, range, None, at)
            .into_iter()
            .map(|branch| {
                let rows = format!(
                    "SELECT {KV_COLUMNS} FROM {} WHERE {}",
                    branch.rows, branch.filter
                );
                (rows, branch.args)
            })
            .collect();
    }
    let columns = "kv.`key`, kv.create_revision, kv.mod_revision, kv.version, kv.lease, kv.value";
    let heads = format!(
        "SELECT {columns} FROM kv_head h JOIN kv ON kv.keyspace = h.keyspace \
         AND kv.mod_revision = h.mod_revision AND kv.sub = h.sub \
         WHERE h.keyspace = ? AND h.deleted = 0"
    );
    let Some(at) = at else {
        return vec![(heads, vec![Arg::Int(keyspace)])];
    };
    // At an older revision: the keys whose head is at or before it, as they are now; and
    // for the keys written since, each one's newest row at or before it, unless a tombstone.
    vec![
        (
            format!("{heads} AND h.mod_revision <= ?"),
            vec![Arg::Int(keyspace), Arg::Int(at)],
        ),
        (
            format!(
                "SELECT `key`, create_revision, mod_revision, version, lease, value FROM \
                 (SELECT DISTINCT ON (kv.`key`) {columns}, kv.deleted FROM kv_head h \
                 JOIN kv ON kv.keyspace = h.keyspace AND kv.`key` = h.`key` \
                 WHERE h.keyspace = ? AND h.mod_revision > ? AND kv.mod_revision <= ? \
                 ORDER BY kv.`key`, kv.mod_revision DESC, kv.sub DESC) AS n WHERE deleted = 0"
            ),
            vec![Arg::Int(keyspace), Arg::Int(at), Arg::Int(at)],
        ),
    ]
}

/// One branch of [`rows_at_revision_in_two_steps`]: the rows `filter` selects, up to `bound`,
/// in key order, at most `limit` and (with `max_bytes`) the prefix that fits; and whether
/// rows were left out.
async fn branch_at_revision<D: Dialect>(
    conn: &mut Conn<D>,
    query: &'static str,
    branch: RangeBranch<'_>,
    bound: Option<&[u8]>,
    keys_only: bool,
    limit: i64,
    max_bytes: Option<usize>,
) -> Result<(Vec<KeyValue>, bool)> {
    let mut args = branch.args;
    let mut sql = format!(
        "SELECT {} FROM {} WHERE {}",
        range_columns::<D>(keys_only),
        branch.rows,
        branch.filter
    );
    if let Some(bound) = bound {
        sql.push_str(" AND `key` <= ?");
        args.push(Arg::Bytes(bound));
    }
    sql.push_str(" ORDER BY `key` LIMIT ?");
    args.push(Arg::Int(limit));
    let Some(max_bytes) = max_bytes else {
        let rows = fetch_all::<D>(conn, query, &sql, &args).await?;
        let kvs = rows
            .iter()
            .map(|row| kv_from_row::<D>(row, 0))
            .collect::<Result<Vec<_>>>()?;
        let cut = kvs.len() as i64 == limit;
        return Ok((kvs, cut));
    };
    let sql = within_budget_sql::<D>(&sql);
    args.push(Arg::Int(i64::try_from(max_bytes).unwrap_or(i64::MAX)));
    let rows = fetch_all::<D>(conn, query, &sql, &args).await?;
    let found = match rows.first() {
        Some(row) => D::DB::int(row, 6)?,
        None => 0,
    };
    let kvs = rows
        .iter()
        .map(|row| kv_from_row::<D>(row, 0))
        .collect::<Result<Vec<_>>>()?;
    let cut = kvs.len() as i64 == limit || (kvs.len() as i64) < found;
    Ok((kvs, cut))
}

/// The plan PostgreSQL ran (`EXPLAIN ANALYZE`, one line a row) for a page of at most `limit`
/// current rows of `range` on `conn`, as a list's page reads it (tests).
#[cfg(test)]
pub(crate) async fn explain_current_page<D: Dialect>(
    conn: &mut Conn<D>,
    keyspace: KeyspaceId,
    range: &KeyRange,
    limit: i64,
) -> Result<Vec<String>> {
    let rows = current_page_rows::<D>(conn, keyspace, range, limit, true).await?;
    rows.iter().map(|row| D::DB::text(row, 0)).collect()
}

/// A page of at most `limit` current rows of `range` on `conn`, read as a list's page reads
/// it (tests).
#[cfg(test)]
pub(crate) async fn read_current_page<D: Dialect>(
    conn: &mut Conn<D>,
    keyspace: KeyspaceId,
    range: &KeyRange,
    limit: i64,
) -> Result<Vec<KeyValue>> {
    let rows = current_page_rows::<D>(conn, keyspace, range, limit, false).await?;
    rows.iter().map(|row| kv_from_row::<D>(row, 0)).collect()
}

/// The live current key-values of `keys` on `conn`, read with the statement write batches
/// and gets look keys up with (tests).
#[cfg(test)]
pub(crate) async fn read_current_rows<D: Dialect>(
    conn: &mut Conn<D>,
    keyspace: KeyspaceId,
    keys: &[&[u8]],
) -> Result<Vec<KeyValue>> {
    let (sql, args) = current_rows_sql::<D>(keyspace, keys, true, true);
    let rows = fetch_all::<D>(conn, "get", &sql, &args).await?;
    let mut live = Vec::new();
    for row in &rows {
        if !D::DB::flag(row, 6)? {
            live.push(kv_from_row::<D>(row, 0)?);
        }
    }
    Ok(live)
}

/// The rows of a list's page statement on `conn`, or, with `explain`, of its plan (tests).
#[cfg(test)]
async fn current_page_rows<D: Dialect>(
    conn: &mut Conn<D>,
    keyspace: KeyspaceId,
    range: &KeyRange,
    limit: i64,
    explain: bool,
) -> Result<Vec<Row<D>>> {
    let end = range.exclusive_end();
    let (mut sql, args) =
        range_rows_statement::<D>(keyspace, range, end.as_deref(), None, false, Some(limit));
    if explain {
        sql = format!("EXPLAIN (ANALYZE, TIMING OFF) {sql}");
    }
    fetch_all::<D>(conn, "range", &sql, &args).await
}

/// The statement reading the rows of `range` (up to `end`) live at the current revision
/// (`at` = None) or at `at`, in key order, at most `limit` of them; with `keys_only`, empty
/// values. Columns as [`kv_from_row`] decodes them.
fn range_rows_statement<'a, D: Dialect>(
    keyspace: KeyspaceId,
    range: &'a KeyRange,
    end: Option<&'a [u8]>,
    at: Option<Revision>,
    keys_only: bool,
    limit: Option<i64>,
) -> (String, Vec<Arg<'a>>) {
    if !D::HEAD_TABLE {
        let filters = range_filters::<D>(keyspace, range, end, at);
        return range_rows_sql(&range_columns::<D>(keys_only), &filters, limit);
    }
    let value = if keys_only { D::EMPTY_BYTES } else { "value" };
    let (mut sql, mut args) = match at {
        // Each current row, through its head: one lookup by primary key per head, in key
        // order. (As a plain join, a list of half a keyspace was planned as a hash join over
        // the keyspace's whole history, five times slower; the LIMIT keeps the lookup a
        // lookup.) The page's heads are chosen first, LIMIT inside: with statistics older
        // than the range (a prefix written since the last ANALYZE, estimated at a few rows),
        // PostgreSQL read the range's heads by bitmap and sorted them, and with the LIMIT
        // outside the join it looked up the row of every head of the rest of the range for
        // each page (40-50 ms a page of 500 in a list of 10,000, 481 ms against etcd's
        // 101 ms in a bench run). And a page's heads come from `kine_rs_current_heads`
        // (migration 0011), which reads them in key order whatever the statistics: planned
        // in this statement, that bitmap scan and sort still read every head left in the
        // range for every page (5.7 ms a page instead of 2.5).
        None => {
            let (heads, args) = match limit {
                Some(limit) => {
                    let mut args = vec![Arg::Int(keyspace), Arg::Bytes(&range.start)];
                    args.extend(end.map(Arg::Bytes));
                    args.push(Arg::Int(limit));
                    // Sorted again (narrow rows, in order already), so that the page's
                    // rows need no sort after the lookups.
                    let heads = format!(
                        "SELECT * FROM kine_rs_current_heads({}) AS h ORDER BY h.`key`",
                        placeholders(args.len())
                    );
                    (heads, args)
                }
                None => head_range_sql(
                    "SELECT h.keyspace, h.`key`, h.mod_revision, h.sub FROM kv_head h WHERE",
                    true,
                    keyspace,
                    range,
                    end,
                ),
            };
            let sql = format!(
                "SELECT kv.`key`, kv.create_revision, kv.mod_revision, kv.version, kv.lease, \
                 kv.value FROM ({heads}) AS h CROSS JOIN LATERAL (SELECT `key`, \
                 create_revision, mod_revision, version, lease, {value} AS value FROM kv o \
                 WHERE o.keyspace = h.keyspace AND o.mod_revision = h.mod_revision \
                 AND o.sub = h.sub LIMIT 1) AS kv ORDER BY h.`key`"
            );
            return (sql, args);
        }
        // Each key's newest row at or before `at`, unless it is a tombstone.
        Some(at) => {
            let (inner, args) = newest_rows_sql(
                &format!(
                    "`key`, create_revision, mod_revision, version, lease, {value} AS value, \
                     deleted"
                ),
                keyspace,
                range,
                end,
                at,
            );
            (
                format!(
                    "SELECT `key`, create_revision, mod_revision, version, lease, value \
                     FROM ({inner}) AS kv WHERE deleted = 0 ORDER BY `key`"
                ),
                args,
            )
        }
    };
    if let Some(limit) = limit {
        sql.push_str(" LIMIT ?");
        args.push(Arg::Int(limit));
    }
    (sql, args)
}

/// The statement counting the rows of `range` live at the current revision or at `at`.
fn range_count_statement<'a, D: Dialect>(
    keyspace: KeyspaceId,
    range: &'a KeyRange,
    end: Option<&'a [u8]>,
    at: Option<Revision>,
) -> (String, Vec<Arg<'a>>) {
    if !D::HEAD_TABLE {
        return range_count_sql(&range_filters::<D>(keyspace, range, end, at));
    }
    match at {
        None => head_range_sql(
            "SELECT COUNT(*) FROM kv_head h WHERE",
            false,
            keyspace,
            range,
            end,
        ),
        Some(at) => {
            let (inner, args) = newest_rows_sql("deleted", keyspace, range, end, at);
            (
                format!("SELECT COUNT(*) FROM ({inner}) AS kv WHERE deleted = 0"),
                args,
            )
        }
    }
}

/// `select` (ending in `WHERE`) over the heads of the live keys of `range`; with `ordered`,
/// in key order ([`Dialect::HEAD_TABLE`]).
fn head_range_sql<'a>(
    select: &str,
    ordered: bool,
    keyspace: KeyspaceId,
    range: &'a KeyRange,
    end: Option<&'a [u8]>,
) -> (String, Vec<Arg<'a>>) {
    let mut sql = format!("{select} h.keyspace = ? AND h.`key` >= ?");
    let mut args = vec![Arg::Int(keyspace), Arg::Bytes(&range.start)];
    if let Some(end) = end {
        sql.push_str(" AND h.`key` < ?");
        args.push(Arg::Bytes(end));
    }
    sql.push_str(" AND h.deleted = 0");
    if ordered {
        sql.push_str(" ORDER BY h.`key`");
    }
    (sql, args)
}

/// The statement selecting `columns` of each key's newest row at or before `at` in `range`,
/// tombstones included, in key order ([`Dialect::HEAD_TABLE`]: one walk of `kv_key`).
fn newest_rows_sql<'a>(
    columns: &str,
    keyspace: KeyspaceId,
    range: &'a KeyRange,
    end: Option<&'a [u8]>,
    at: Revision,
) -> (String, Vec<Arg<'a>>) {
    let mut sql =
        format!("SELECT DISTINCT ON (`key`) {columns} FROM kv WHERE keyspace = ? AND `key` >= ?");
    let mut args = vec![Arg::Int(keyspace), Arg::Bytes(&range.start)];
    if let Some(end) = end {
        sql.push_str(" AND `key` < ?");
        args.push(Arg::Bytes(end));
    }
    sql.push_str(" AND mod_revision <= ? ORDER BY `key`, mod_revision DESC, sub DESC");
    args.push(Arg::Int(at));
    (sql, args)
}

/// The columns a range returns, as [`kv_from_row`] decodes them; with `keys_only`, empty
/// values.
fn range_columns<D: Dialect>(keys_only: bool) -> Cow<'static, str> {
    if keys_only {
        Cow::Owned(format!(
            "`key`, create_revision, mod_revision, version, lease, {} AS value",
            D::EMPTY_BYTES
        ))
    } else {
        Cow::Borrowed(KV_COLUMNS)
    }
}

/// Runs the range query on `conn`: rows (unless `count_only`) and the total count, which is
/// not counted again when `known_count` has it.
async fn range_on<D: Dialect>(
    conn: &mut Conn<D>,
    keyspace: KeyspaceId,
    query: &RangeQuery<'_>,
    at: Option<Revision>,
    known_count: Option<i64>,
) -> Result<(Vec<KeyValue>, i64)> {
    let range = query.range;
    let end = range.exclusive_end();
    let mut kvs = Vec::new();
    if !query.count_only {
        kvs = fetch_range_rows::<D>(
            conn,
            "range",
            keyspace,
            range,
            end.as_deref(),
            at,
            query.keys_only,
            query.limit,
        )
        .await?;
        // Everything was fetched: the count is known without a second query.
        if query.limit.is_none_or(|limit| (kvs.len() as i64) < limit) {
            let count = kvs.len() as i64;
            return Ok((kvs, count));
        }
    }
    if let Some(count) = known_count {
        return Ok((kvs, count));
    }
    let (sql, args) = range_count_statement::<D>(keyspace, range, end.as_deref(), at);
    let row = fetch_optional::<D>(conn, "range_count", &sql, &args)
        .await?
        .ok_or_else(|| KineError::Storage("COUNT returned no row".into()))?;
    Ok((kvs, D::DB::int(&row, 0)?))
}

async fn lease_on<D: Dialect>(
    conn: &mut Conn<D>,
    keyspace: KeyspaceId,
    id: i64,
    lock: bool,
) -> Result<Option<LeaseRecord>> {
    let sql = format!(
        "SELECT id, ttl, expires_at_ms FROM leases WHERE keyspace = ? AND id = ?{}",
        if lock { D::LOCK } else { "" }
    );
    let row = fetch_optional::<D>(
        conn,
        if lock { "lease_lock" } else { "lease" },
        &sql,
        &[Arg::Int(keyspace), Arg::Int(id)],
    )
    .await?;
    row.as_ref().map(lease_from_row::<D>).transpose()
}

async fn lease_keys_on<D: Dialect>(
    conn: &mut Conn<D>,
    keyspace: KeyspaceId,
    id: i64,
) -> Result<Vec<Bytes>> {
    let sql = if D::PAST_TABLE {
        // As below, driven by the lease's rows (`CROSS JOIN` fixes SQLite's join order:
        // without statistics it walked every head of the keyspace instead).
        "SELECT h.`key` FROM kv CROSS JOIN kv_head h ON h.keyspace = kv.keyspace \
         AND h.`key` = kv.`key` AND h.mod_revision = kv.mod_revision AND h.sub = kv.sub \
         WHERE kv.keyspace = ? AND kv.lease = ? AND kv.lease <> 0 AND h.deleted = 0 \
         ORDER BY h.`key`"
    } else if D::HEAD_TABLE {
        // Every row that named the lease, kept where it is its key's current row.
        "SELECT h.`key` FROM kv JOIN kv_head h ON h.keyspace = kv.keyspace \
         AND h.`key` = kv.`key` AND h.mod_revision = kv.mod_revision AND h.sub = kv.sub \
         WHERE kv.keyspace = ? AND kv.lease = ? AND kv.lease <> 0 AND h.deleted = 0 \
         ORDER BY h.`key`"
    } else {
        "SELECT `key` FROM kv WHERE keyspace = ? AND lease = ? AND lease <> 0 \
         AND superseded = 9223372036854775807 AND deleted = 0 ORDER BY `key`"
    };
    let rows = fetch_all::<D>(conn, "lease_keys", sql, &[Arg::Int(keyspace), Arg::Int(id)]).await?;
    rows.iter()
        .map(|row| Ok(Bytes::from(D::DB::bytes(row, 0)?)))
        .collect()
}

/// Snapshots at older revisions whose pages are read side by side, each with its table
/// ([`SnapshotPages`]); past it the one read longest ago starts over.
const MAX_SNAPSHOTS: usize = 4;

/// A datastore reached through sqlx: SQLite, PostgreSQL or MySQL.
pub struct SqlBackend<D: Dialect> {
    /// Reads (on SQLite: read-only connections to WAL snapshots).
    readers: Pool<D::DB>,
    /// Writes (on SQLite: one connection, the database's single writer; elsewhere the same
    /// pool as `readers`).
    writers: Pool<D::DB>,
    /// SQLite: the connection write batches run on, out of `writers` ([`BatchConnection`]).
    batch_connection: Option<BatchConnection<D>>,
    /// How often to look for other processes' commits; `None`: only the feed's safety net.
    poll: Option<PollCadence>,
    /// This process's change feed of the database.
    feed: Arc<CommitFeed>,
    /// A few connections of their own for the watch hubs' reads of new events and the feed's
    /// poll, where the database is a server: on the shared pool they waited ~10 ms on average
    /// for a connection behind writers waiting for their commits to be flushed.
    watch_readers: Option<Pool<D::DB>>,
    /// Tasks (a notification listener) and resources (a scratch directory) that live as long
    /// as the backend.
    _guard: Box<dyn Send + Sync>,
    /// Counts of paginated lists' next pages (see [`PageCounts`]).
    page_counts: PageCounts,
    /// What this process knows of the keyspaces it committed to last, where a write batch
    /// may commit without reading first (see [`CommitCache`]).
    commit_cache: Option<Arc<CommitCache>>,
    /// Gets at the current revision, several in one statement ([`PointReads`]).
    point_reads: Arc<PointReads<D>>,
    /// Pages of snapshots at older revisions, with [`Dialect::SNAPSHOT_TABLE`]
    /// ([`SnapshotPages`]): one per snapshot read, up to [`MAX_SNAPSHOTS`].
    snapshot_pages: tokio::sync::Mutex<Vec<SnapshotPages<D>>>,
    /// Where this process's compaction walked each keyspace's `kv` for current tombstones
    /// ([`Dialect::PAST_TABLE`], [`purge_past`]): the last (revision, sub) it passed.
    tombstone_walks: std::sync::Mutex<HashMap<KeyspaceId, (Revision, i64)>>,
    _dialect: PhantomData<D>,
}

impl<D: Dialect> SqlBackend<D> {
    /// The pool writes go through (tests of its connections' settings).
    #[cfg(test)]
    pub(crate) fn writer_pool(&self) -> &Pool<D::DB> {
        &self.writers
    }

    /// A backend over pools whose schema is already migrated.
    pub fn new(
        readers: Pool<D::DB>,
        writers: Pool<D::DB>,
        poll: Option<PollCadence>,
        feed: Arc<CommitFeed>,
        guard: Box<dyn Send + Sync>,
    ) -> Self {
        SqlBackend {
            point_reads: PointReads::new(readers.clone()),
            readers,
            writers,
            batch_connection: None,
            poll,
            feed,
            watch_readers: None,
            _guard: guard,
            page_counts: PageCounts::default(),
            commit_cache: (D::HEAD_TABLE && D::COMMIT_BATCH.is_some() && D::ROW_VERSION.is_some())
                .then(|| Arc::new(CommitCache::default())),
            snapshot_pages: tokio::sync::Mutex::new(Vec::new()),
            tombstone_walks: std::sync::Mutex::new(HashMap::new()),
            _dialect: PhantomData,
        }
    }

    /// Runs write batches on a connection of the write pool's kept out of it
    /// ([`BatchConnection`]; SQLite, where each batch begins in the call of its first read,
    /// [`Dialect::MULTI_STATEMENT`]).
    pub(crate) async fn with_batch_connection(mut self) -> Result<Self> {
        self.batch_connection = Some(BatchConnection::take_from(&self.writers).await?);
        if D::UNREAD_BATCH.is_some() && self.commit_cache.is_none() {
            self.commit_cache = Some(Arc::new(CommitCache::default()));
        }
        Ok(self)
    }

    /// Whether a batch of `sorted` keys, of which the cache knows `hit`'s, may take the others
    /// for absent: each is one the batch would create (`created`), and no batch of the
    /// keyspace that did so was refused a moment ago.
    fn may_take_absent(
        &self,
        keyspace: KeyspaceId,
        sorted: &[&[u8]],
        hit: &commit_cache::Hit,
        created: &[Bytes],
    ) -> bool {
        let known = |key: &[u8]| {
            hit.keys
                .binary_search_by(|(known, _)| known.as_ref().cmp(key))
                .is_ok()
        };
        sorted
            .iter()
            .all(|key| known(key) || created.iter().any(|created| created.as_ref() == *key))
            && self
                .commit_cache
                .as_ref()
                .is_some_and(|cache| cache.may_take_absent(keyspace))
    }

    /// Serves watch hubs' event reads and the feed's poll from `pool`.
    pub fn with_watch_readers(mut self, pool: Pool<D::DB>) -> Self {
        self.watch_readers = Some(pool);
        self
    }

    /// The pool of watch reads.
    fn watch_pool(&self) -> &Pool<D::DB> {
        self.watch_readers.as_ref().unwrap_or(&self.readers)
    }

    /// A range at the current revision whose count is the number of its rows, read with
    /// the keyspace row in one statement outside a transaction: a single statement sees one
    /// snapshot, so the revision and the rows agree as they do in a read transaction, for
    /// one round trip instead of four ([`Dialect::ONE_STATEMENT_READS`]).
    async fn range_current(
        &self,
        keyspace: KeyspaceId,
        query: &RangeQuery<'_>,
    ) -> Result<RangeRows> {
        let end = query.range.exclusive_end();
        let (rows, mut args) = range_rows_statement::<D>(
            keyspace,
            query.range,
            end.as_deref(),
            None,
            query.keys_only,
            query.limit,
        );
        let sql = format!(
            "SELECT {STATE_COLUMNS}, r.* FROM keyspaces s LEFT JOIN ({rows}) r ON TRUE \
             WHERE s.id = ?"
        );
        args.push(Arg::Int(keyspace));
        let mut conn = acquire::<D>(&self.readers).await?;
        let rows = fetch_all::<D>(&mut conn, "range", &sql, &args).await?;
        let state = state_from_row::<D>(rows.first().ok_or(KineError::KeyspaceDeleted)?, keyspace)?;
        let mut kvs = Vec::with_capacity(rows.len());
        for row in &rows {
            // The keyspace row alone (NULL columns of the join): no key in the range.
            if D::DB::opt_bytes(row, STATE_COLUMN_COUNT)?.is_some() {
                kvs.push(kv_from_row::<D>(row, STATE_COLUMN_COUNT)?);
            }
        }
        // The join keeps the rows the subquery chose, not necessarily its order.
        kvs.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        let count = kvs.len() as i64;
        Ok(RangeRows {
            revision: state.revision,
            kvs,
            count,
        })
    }

    /// Remembers, when a page read at `read_at` holds more keys than it returns, the next
    /// page's count: the rest of this one's ([`PageCounts`]).
    fn page_returned(
        &self,
        keyspace: KeyspaceId,
        read_at: Revision,
        query: &RangeQuery<'_>,
        kvs: &[KeyValue],
        count: i64,
        current: bool,
    ) {
        if let Some(limit) = query.limit
            && limit >= 2
            && kvs.len() as i64 == limit
        {
            let last = &kvs[kvs.len() - 2].key;
            let returned = limit - 1;
            let range = query.range;
            (self.page_counts).page_read(keyspace, read_at, range, last, returned, count, current);
        }
    }

    async fn begin_read(&self) -> Result<Transaction<'static, D::DB>> {
        begin::<D>(&self.readers, "begin_read", D::BEGIN_READ).await
    }

    /// A write batch in `tx`, which holds the keyspace's lock and read its counters `state`.
    fn locked_txn(
        &self,
        keyspace: KeyspaceId,
        tx: WriteTx<D>,
        state: KeyspaceState,
    ) -> SqlWriteTxn<D> {
        SqlWriteTxn::<D> {
            cache: self.commit_cache.clone(),
            from_cache: false,
            taken_absent: Vec::new(),
            tx: Some(tx),
            conn: None,
            unbegun: None,
            read_version: None,
            writers: self.writers.clone(),
            keyspace,
            start: state,
            state,
            known: HashMap::new(),
            supersede: Vec::new(),
            pending: Vec::new(),
        }
    }

    /// A write transaction holding the keyspace's lock, begun on the batch connection in the
    /// call that reads its counters and the current rows of `keys`
    /// ([`Dialect::MULTI_STATEMENT`]).
    async fn begin_write_reading(
        &self,
        batches: &BatchConnection<D>,
        keyspace: KeyspaceId,
        keys: &[Bytes],
    ) -> Result<Box<dyn WriteTxn>> {
        let own = batches.begin().await?;
        let generation = own.generation();
        let mut tx = WriteTx::Own(own);
        let mut sorted: Vec<&[u8]> = keys.iter().map(|key| key.as_ref()).collect();
        sorted.sort_unstable();
        sorted.dedup();
        // With the data version the keyspace is read at, this batch's commit is remembered
        // for the next one to start from ([`UnreadBatch`]).
        let data_version = D::UNREAD_BATCH
            .filter(|_| self.commit_cache.is_some())
            .map(|unread| unread.version);
        let mut sql = format!(
            "{}; SELECT {STATE_COLUMNS}{} FROM keyspaces WHERE id = ?",
            D::BEGIN_WRITE,
            data_version
                .map(|version| format!(", ({version})"))
                .unwrap_or_default()
        );
        let mut args = vec![Arg::Int(keyspace)];
        for (_, lookup, lookup_args) in lookup_statements::<D>(keyspace, &sorted) {
            sql.push_str("; ");
            sql.push_str(&lookup);
            args.extend(lookup_args);
        }
        let rows = fetch_all::<D>(tx.conn()?, "batch_read", &sql, &args).await?;
        // The keyspace row comes first, unless the keyspace is gone; the current rows follow.
        let (first, current) = rows.split_first().ok_or(KineError::KeyspaceDeleted)?;
        if D::DB::columns(first) != STATE_COLUMN_COUNT + usize::from(data_version.is_some()) {
            return Err(KineError::KeyspaceDeleted);
        }
        let state = state_from_row::<D>(first, keyspace)?;
        let mut txn = self.locked_txn(keyspace, tx, state);
        if data_version.is_some() {
            let version = D::DB::int(first, STATE_COLUMN_COUNT)?;
            txn.read_version = Some(unread_version(generation, version));
        }
        txn.remember(&sorted, current, 0)?;
        Ok(Box::new(txn))
    }

    /// A write batch on the batch connection that starts from what this process committed
    /// last, without reading ([`UnreadBatch`]), if the cache knows enough: every key, or
    /// every one it does not know is one the batch would create. Its transaction begins with
    /// its first call, which checks that the cache still holds.
    fn begin_unread(
        &self,
        batches: &BatchConnection<D>,
        keyspace: KeyspaceId,
        keys: &BatchKeys,
    ) -> Option<SqlWriteTxn<D>> {
        D::UNREAD_BATCH?;
        let cache = self.commit_cache.as_ref()?;
        let mut sorted: Vec<&[u8]> = keys.all.iter().map(|key| key.as_ref()).collect();
        sorted.sort_unstable();
        sorted.dedup();
        let hit = cache.lookup(keyspace, &sorted)?;
        // Known on a connection that is gone: its data version says nothing now.
        if parse_unread_version(&hit.version)?.0 != batches.generation() {
            return None;
        }
        if hit.keys.len() != sorted.len()
            && !self.may_take_absent(keyspace, &sorted, &hit, &keys.created)
        {
            return None;
        }
        Some(self.cached_txn(keyspace, hit, &sorted, None, Some(batches.clone())))
    }

    /// A write batch of the keys `sorted` that starts from the cache's `hit` instead of a
    /// read: the keys the cache does not know are taken for absent (its commit checks them).
    /// It reads on `conn` without the lock (PostgreSQL) or begins on `unbegun` (SQLite).
    fn cached_txn(
        &self,
        keyspace: KeyspaceId,
        hit: commit_cache::Hit,
        sorted: &[&[u8]],
        conn: Option<PoolConnection<D::DB>>,
        unbegun: Option<BatchConnection<D>>,
    ) -> SqlWriteTxn<D> {
        let mut known: HashMap<Bytes, KnownKey> = hit
            .keys
            .into_iter()
            .map(|(key, cached)| (key, KnownKey::from(cached)))
            .collect();
        let mut taken_absent = Vec::new();
        for key in sorted {
            if !known.contains_key(*key) {
                let key = Bytes::copy_from_slice(key);
                known.insert(key.clone(), KnownKey::absent());
                taken_absent.push(key);
            }
        }
        SqlWriteTxn::<D> {
            taken_absent,
            cache: self.commit_cache.clone(),
            from_cache: true,
            tx: None,
            conn,
            unbegun,
            read_version: Some(hit.version),
            writers: self.writers.clone(),
            keyspace,
            start: hit.state,
            state: hit.state,
            known,
            supersede: Vec::new(),
            pending: Vec::new(),
        }
    }

    /// A write transaction holding the keyspace's row lock, and the counters it read.
    async fn begin_locked(
        &self,
        keyspace: KeyspaceId,
    ) -> Result<(Transaction<'static, D::DB>, KeyspaceState)> {
        let mut tx = begin::<D>(&self.writers, "begin_write", D::BEGIN_WRITE).await?;
        let state = read_state::<D>(&mut tx, keyspace, true).await?;
        Ok((tx, state))
    }
}

/// A keyspace's id by its name.
const FIND_KEYSPACE: &str = "SELECT id FROM keyspaces WHERE name = ?";

#[async_trait]
impl<D: Dialect> Backend for SqlBackend<D> {
    fn driver(&self) -> &'static str {
        D::DRIVER
    }

    async fn keyspace(&self, name: &str, create: bool) -> Result<Option<KeyspaceId>> {
        {
            let mut conn = acquire::<D>(&self.readers).await?;
            if let Some(row) = fetch_optional::<D>(
                &mut conn,
                "keyspace_find",
                FIND_KEYSPACE,
                &[Arg::Text(name)],
            )
            .await?
            {
                return Ok(Some(D::DB::int(&row, 0)?));
            }
        }
        if !create {
            return Ok(None);
        }
        self.create_keyspace(name).await.map(Some)
    }

    async fn create_keyspace(&self, name: &str) -> Result<KeyspaceId> {
        let mut conn = acquire::<D>(&self.writers).await?;
        let args = [Arg::Text(name)];
        if D::INSERT_KEYSPACE_RETURNS_ID {
            if let Some(row) =
                fetch_optional::<D>(&mut conn, "keyspace_create", D::INSERT_KEYSPACE, &args).await?
            {
                return D::DB::int(&row, 0);
            }
            // Created by another process meanwhile: found below.
        } else {
            execute::<D>(&mut conn, "keyspace_create", D::INSERT_KEYSPACE, &args).await?;
        }
        let row = fetch_optional::<D>(&mut conn, "keyspace_find", FIND_KEYSPACE, &args)
            .await?
            .ok_or_else(|| KineError::Storage(format!("keyspace {name:?} was not created")))?;
        D::DB::int(&row, 0)
    }

    async fn state(&self, keyspace: KeyspaceId) -> Result<KeyspaceState> {
        let mut conn = acquire::<D>(&self.readers).await?;
        read_state::<D>(&mut conn, keyspace, false).await
    }

    async fn keyspaces(&self) -> Result<Vec<(String, KeyspaceState)>> {
        tenants::keyspaces(self).await
    }

    async fn migration_record(&self, keyspace: KeyspaceId) -> Result<Option<String>> {
        let mut conn = acquire::<D>(&self.readers).await?;
        let row = fetch_optional::<D>(
            &mut conn,
            "migration_record",
            "SELECT migration FROM keyspaces WHERE id = ?",
            &[Arg::Int(keyspace)],
        )
        .await?
        .ok_or(KineError::KeyspaceDeleted)?;
        D::DB::opt_text(&row, 0)
    }

    async fn delete_keyspace(&self, keyspace: KeyspaceId) -> Result<bool> {
        let deleted = tenants::delete_keyspace(self, keyspace).await?;
        // What this process kept of the keyspace goes with it (ids are never given out
        // again: SQLite's migration 0009).
        self.page_counts.forget(keyspace);
        if let Ok(mut walks) = self.tombstone_walks.lock() {
            walks.remove(&keyspace);
        }
        Ok(deleted)
    }

    async fn expired_leases_all(
        &self,
        now_ms: i64,
        limit: i64,
    ) -> Result<Vec<(String, KeyspaceId, i64)>> {
        tenants::expired_leases_all(self, now_ms, limit).await
    }

    async fn range(&self, keyspace: KeyspaceId, query: RangeQuery<'_>) -> Result<RangeRows> {
        // At the current revision, with a count that follows from the rows (no limit, or one
        // key): one statement.
        let single = query.range.end == RangeEnd::Single;
        if query.revision <= 0
            && !query.count_only
            && (D::ONE_STATEMENT_READS || D::ONE_STATEMENT_GETS)
            && single
            && query.limit.is_none_or(|limit| limit >= 1)
        {
            let key = query.range.start.clone();
            return self.point_reads.get(keyspace, key, query.keys_only).await;
        }
        if query.revision <= 0
            && !query.count_only
            && D::ONE_STATEMENT_READS
            && query.limit.is_none()
        {
            return self.range_current(keyspace, &query).await;
        }
        // A later page of a list whose earlier page was read at the current revision, its
        // count known from that page: one statement too while no write came since (the
        // statement's own revision says so); otherwise the transaction below reads it at its
        // revision, and the pages after it do not try again.
        if D::ONE_STATEMENT_PAGES
            && query.revision > 0
            && !query.count_only
            && let Some(continuation) =
                (self.page_counts).continuation(keyspace, query.revision, query.range)
            && continuation.was_current
        {
            let rows = self.range_current(keyspace, &query).await?;
            if rows.revision == query.revision {
                self.page_returned(
                    keyspace,
                    query.revision,
                    &query,
                    &rows.kvs,
                    continuation.count,
                    true,
                );
                return Ok(RangeRows {
                    count: continuation.count,
                    ..rows
                });
            }
        }
        let mut tx = self.begin_read().await?;
        let state = read_state::<D>(&mut tx, keyspace, false).await?;
        let at = older_revision(&state, query.revision)?;
        let read_at = at.unwrap_or(state.revision);
        let known_count = self.page_counts.get(keyspace, read_at, query.range);
        let (kvs, count) = range_on::<D>(&mut tx, keyspace, &query, at, known_count).await?;
        commit::<D>(tx).await?;
        self.page_returned(keyspace, read_at, &query, &kvs, count, at.is_none());
        // Like etcd, the header reports the store's current revision, whatever was read.
        Ok(RangeRows {
            revision: state.revision,
            kvs,
            count,
        })
    }

    async fn events(
        &self,
        keyspace: KeyspaceId,
        after: Revision,
        up_to: Revision,
        range: Option<&KeyRange>,
    ) -> Result<Vec<Event>> {
        // `e.sub` last: the one-statement form orders by it.
        const COLUMNS: &str = "SELECT e.`key`, e.create_revision, e.mod_revision, e.version, \
             e.lease, e.value, e.deleted, p.`key` AS p_key, \
             p.create_revision AS p_create_revision, p.mod_revision AS p_mod_revision, \
             p.version AS p_version, p.lease AS p_lease, p.value AS p_value, e.sub";
        let mut sql = if D::HEAD_TABLE {
            // The previous value is the key's newest row before the event, unless a tombstone.
            format!(
                "{COLUMNS} FROM kv e LEFT JOIN LATERAL (SELECT * FROM (SELECT o.`key`, \
                 o.create_revision, o.mod_revision, o.version, o.lease, o.value, o.deleted \
                 FROM kv o WHERE o.keyspace = e.keyspace AND o.`key` = e.`key` \
                 AND o.mod_revision < e.mod_revision \
                 ORDER BY o.mod_revision DESC, o.sub DESC LIMIT 1) AS q WHERE q.deleted = 0) \
                 AS p ON TRUE \
                 WHERE e.keyspace = ? AND e.mod_revision > ? AND e.mod_revision <= ?"
            )
        } else if D::PAST_TABLE {
            // The previous value is the row its key's `kv_past` row says the event superseded.
            format!(
                "{COLUMNS} FROM kv e LEFT JOIN kv_past q ON q.keyspace = e.keyspace \
                 AND q.superseded = e.mod_revision AND q.`key` = e.`key` \
                 AND q.mod_revision < e.mod_revision AND q.deleted = 0 \
                 LEFT JOIN kv p ON p.keyspace = q.keyspace AND p.mod_revision = q.mod_revision \
                 AND p.sub = q.sub \
                 WHERE e.keyspace = ? AND e.mod_revision > ? AND e.mod_revision <= ?"
            )
        } else {
            format!(
                "{COLUMNS} FROM kv e LEFT JOIN kv p ON p.keyspace = e.keyspace \
                 AND p.`key` = e.`key` AND p.superseded = e.mod_revision \
                 AND p.mod_revision < e.mod_revision AND p.deleted = 0 \
                 AND p.superseded <> 9223372036854775807 \
                 WHERE e.keyspace = ? AND e.mod_revision > ? AND e.mod_revision <= ?"
            )
        };
        let end = range.and_then(KeyRange::exclusive_end);
        let mut args = vec![Arg::Int(keyspace), Arg::Int(after), Arg::Int(up_to)];
        if let Some(range) = range {
            sql.push_str(" AND e.`key` >= ?");
            args.push(Arg::Bytes(&range.start));
        }
        if let Some(end) = &end {
            sql.push_str(" AND e.`key` < ?");
            args.push(Arg::Bytes(end));
        }
        let (rows, offset, compact_revision) = if D::ONE_STATEMENT_EVENTS {
            // One statement, one snapshot: the compaction revision and the events agree as
            // in a read transaction, for one round trip instead of four (begin, keyspace row,
            // events, commit): what a watch hub pays for each commit it learns of.
            let sql = format!(
                "SELECT s.compact_revision, r.* FROM keyspaces s LEFT JOIN ({sql}) r ON TRUE \
                 WHERE s.id = ?"
            );
            args.push(Arg::Int(keyspace));
            let mut conn = acquire::<D>(self.watch_pool()).await?;
            let mut rows = fetch_all::<D>(&mut conn, "events", &sql, &args).await?;
            let compact_revision = D::DB::int(rows.first().ok_or(KineError::KeyspaceDeleted)?, 0)?;
            if after + 1 < compact_revision {
                return Err(KineError::Compacted);
            }
            // The keyspace row alone (NULL columns of the join): no events.
            if D::DB::opt_bytes(&rows[0], 1)?.is_none() {
                rows.clear();
            }
            // The join keeps the rows the subquery chose, not necessarily in its order.
            let mut keyed = Vec::with_capacity(rows.len());
            for row in rows {
                keyed.push(((D::DB::int(&row, 3)?, D::DB::int(&row, 14)?), row));
            }
            keyed.sort_unstable_by_key(|(order, _)| *order);
            (
                keyed.into_iter().map(|(_, row)| row).collect(),
                1,
                compact_revision,
            )
        } else {
            let mut tx = self.begin_read().await?;
            let state = read_state::<D>(&mut tx, keyspace, false).await?;
            if after + 1 < state.compact_revision {
                return Err(KineError::Compacted);
            }
            sql.push_str(" ORDER BY e.mod_revision, e.sub");
            let rows = fetch_all::<D>(&mut tx, "events", &sql, &args).await?;
            commit::<D>(tx).await?;
            (rows, 0, state.compact_revision)
        };
        let mut events = Vec::with_capacity(rows.len());
        for row in rows {
            let kv = kv_from_row::<D>(&row, offset)?;
            let deleted = D::DB::flag(&row, offset + 6)?;
            // etcd reads an event's previous value at the revision before it: compacted, and
            // so absent, for an event at or below the compaction revision, whether or not the
            // purge has removed the row yet.
            let prev_kv = match D::DB::opt_bytes(&row, offset + 7)? {
                Some(_) if kv.mod_revision > compact_revision => {
                    Some(kv_from_row::<D>(&row, offset + 7)?)
                }
                _ => None,
            };
            let (kind, kv) = if deleted {
                (EventType::Delete, tombstone(kv.key, kv.mod_revision))
            } else {
                (EventType::Put, kv)
            };
            events.push(Event {
                r#type: kind as i32,
                kv: Some(kv),
                prev_kv,
            });
        }
        Ok(events)
    }

    async fn history(
        &self,
        keyspace: KeyspaceId,
        after: Revision,
        up_to: Revision,
    ) -> Result<Vec<Event>> {
        // `events` without its self-join for `prev_kv`: one walk of the primary key (keyspace,
        // mod_revision, sub), and no previous values on the wire.
        let mut tx = self.begin_read().await?;
        let state = read_state::<D>(&mut tx, keyspace, false).await?;
        if after + 1 < state.compact_revision {
            return Err(KineError::Compacted);
        }
        let rows = fetch_all::<D>(
            &mut tx,
            "history",
            "SELECT `key`, create_revision, mod_revision, version, lease, value, deleted \
             FROM kv WHERE keyspace = ? AND mod_revision > ? AND mod_revision <= ? \
             ORDER BY mod_revision, sub",
            &[Arg::Int(keyspace), Arg::Int(after), Arg::Int(up_to)],
        )
        .await?;
        commit::<D>(tx).await?;
        history_events::<D>(&rows)
    }

    async fn history_within(
        &self,
        keyspace: KeyspaceId,
        after: Revision,
        up_to: Revision,
        max_bytes: usize,
    ) -> Result<(Vec<Event>, Revision)> {
        let mut tx = self.begin_read().await?;
        let state = read_state::<D>(&mut tx, keyspace, false).await?;
        if after + 1 < state.compact_revision {
            return Err(KineError::Compacted);
        }
        // The running size of the window's rows in revision order picks the prefix that fits
        // (the first revision's rows always), and each row's successor's revision tells
        // whether the last revision sent is whole: the rows are cut on the server, so a
        // window of large values never reaches this process.
        let sql = format!(
            "SELECT `key`, create_revision, mod_revision, version, lease, value, deleted, \
             next_revision FROM (SELECT `key`, create_revision, mod_revision, version, lease, \
             value, deleted, sub, SUM({bytes}) OVER (ORDER BY mod_revision, sub ROWS \
             UNBOUNDED PRECEDING) AS upto, LEAD(mod_revision) OVER (ORDER BY mod_revision, \
             sub) AS next_revision FROM kv WHERE keyspace = ? AND mod_revision > ? \
             AND mod_revision <= ?) AS w WHERE upto <= ? OR mod_revision = (SELECT \
             MIN(mod_revision) FROM kv WHERE keyspace = ? AND mod_revision > ?) \
             ORDER BY mod_revision, sub",
            bytes = D::ROW_BYTES
        );
        let budget = i64::try_from(max_bytes).unwrap_or(i64::MAX);
        let args = [
            Arg::Int(keyspace),
            Arg::Int(after),
            Arg::Int(up_to),
            Arg::Int(budget),
            Arg::Int(keyspace),
            Arg::Int(after),
        ];
        let rows = fetch_all::<D>(&mut tx, "history", &sql, &args).await?;
        commit::<D>(tx).await?;
        let next = match rows.last() {
            Some(row) => D::DB::opt_int(row, 7)?,
            None => None,
        };
        let mut events = history_events::<D>(&rows)?;
        let last = events
            .last()
            .and_then(|event| event.kv.as_ref())
            .map(|kv| kv.mod_revision);
        let reached = match (last, next) {
            // Nothing left out.
            (_, None) => up_to,
            // The last revision sent is whole; none lies between it and the next one.
            (Some(last), Some(next)) if next != last => next - 1,
            // Cut inside the last revision sent (never the first): it goes with the next
            // window.
            (Some(last), Some(_)) => {
                events.retain(|event| event.kv.as_ref().is_some_and(|kv| kv.mod_revision < last));
                last - 1
            }
            (None, Some(_)) => {
                return Err(KineError::Storage(
                    "a window of history cut before its first revision".into(),
                ));
            }
        };
        Ok((events, reached))
    }

    async fn page_within(
        &self,
        keyspace: KeyspaceId,
        revision: Revision,
        after: Option<&[u8]>,
        limit: i64,
        max_bytes: usize,
    ) -> Result<Vec<KeyValue>> {
        let range = page_range(after);
        if let (Some(table), true) = (D::SNAPSHOT_TABLE, revision > 0) {
            // Snapshots read side by side (tenants migrating at once) each keep their own.
            let mut all = self.snapshot_pages.lock().await;
            let serving = (all.iter())
                .position(|pages| pages.serves(keyspace, revision))
                .or_else(|| all.iter().position(SnapshotPages::unused));
            let index = match serving {
                Some(index) => index,
                None if all.len() < MAX_SNAPSHOTS => {
                    let options = self.readers.connect_options();
                    let conn = sqlx::ConnectOptions::connect(&*options).await?;
                    all.push(SnapshotPages::new(conn, table).await?);
                    all.len() - 1
                }
                // The one read longest ago starts over.
                None => (0..all.len())
                    .min_by_key(|&index| all[index].last_page())
                    .unwrap_or(0),
            };
            let pages = &mut all[index];
            return pages
                .page(keyspace, revision, &range, limit, max_bytes)
                .await;
        }
        let mut tx = self.begin_read().await?;
        let state = read_state::<D>(&mut tx, keyspace, false).await?;
        let at = older_revision(&state, revision)?;
        // At an older revision, without a head table, the rows come from two branches.
        let union = at.is_some() && !D::HEAD_TABLE;
        if let (true, Some(at)) = (union && D::READS_AT_REVISION_IN_TWO_STEPS, at) {
            let page = limit.max(1);
            let budget = Some(max_bytes);
            let kvs = rows_at_revision_in_two_steps::<D>(
                &mut tx, "page", keyspace, &range, None, at, false, page, budget,
            )
            .await?;
            commit::<D>(tx).await?;
            return Ok(kvs);
        }
        let (rows, mut args) =
            range_rows_statement::<D>(keyspace, &range, None, at, false, Some(limit.max(1)));
        let sql = within_budget_sql::<D>(&rows);
        args.push(Arg::Int(i64::try_from(max_bytes).unwrap_or(i64::MAX)));
        let rows = fetch_all::<D>(&mut tx, "page", &sql, &args).await?;
        commit::<D>(tx).await?;
        rows.iter().map(|row| kv_from_row::<D>(row, 0)).collect()
    }

    async fn row_digest(
        &self,
        keyspace: KeyspaceId,
        revision: Revision,
    ) -> Result<Option<RowDigest>> {
        let Some(row_md5) = D::ROW_MD5 else {
            return Ok(None);
        };
        let range = page_range(None);
        let mut tx = self.begin_read().await?;
        let state = read_state::<D>(&mut tx, keyspace, false).await?;
        let at = older_revision(&state, revision)?;
        let (sql, args) = row_digest_statement::<D>(row_md5, keyspace, &range, at);
        let rows = fetch_all::<D>(&mut tx, "row_digest", &sql, &args).await?;
        commit::<D>(tx).await?;
        let mut digest = RowDigest::default();
        for row in &rows {
            digest.merge(RowDigest::from_sum(
                D::DB::int(row, 0)?,
                D::DB::int(row, 1)?,
            ));
        }
        Ok(Some(digest))
    }

    async fn begin_write(&self, keyspace: KeyspaceId) -> Result<Box<dyn WriteTxn>> {
        let (tx, state) = self.begin_locked(keyspace).await?;
        Ok(Box::new(self.locked_txn(
            keyspace,
            WriteTx::Tracked(tx),
            state,
        )))
    }

    async fn begin_group_write(
        &self,
        keyspace: KeyspaceId,
        keys: &BatchKeys,
        optimistic: bool,
    ) -> Result<Box<dyn WriteTxn>> {
        let Some(column) = D::ROW_VERSION.filter(|_| optimistic && D::COMMIT_BATCH.is_some())
        else {
            if let Some(batches) = &self.batch_connection {
                if optimistic && let Some(txn) = self.begin_unread(batches, keyspace, keys) {
                    return Ok(Box::new(txn));
                }
                return self.begin_write_reading(batches, keyspace, &keys.all).await;
            }
            let mut txn = self.begin_write(keyspace).await?;
            txn.prefetch(&keys.all).await?;
            return Ok(txn);
        };
        // One statement, one snapshot: the keyspace row (its counters and version) and the
        // current rows of the batch's first keys, read without a transaction or lock.
        let mut conn = acquire::<D>(&self.writers).await?;
        let mut sorted: Vec<&[u8]> = keys.all.iter().map(|key| key.as_ref()).collect();
        sorted.sort_unstable();
        sorted.dedup();
        // This process committed to the keyspace last and knows every key, or every key it
        // does not know is one the batch would create: no read; the commit call's checks
        // refuse the batch if the keyspace changed since, or one of those keys is live.
        let hit = self
            .commit_cache
            .as_ref()
            .and_then(|cache| cache.lookup(keyspace, &sorted));
        let partial = match hit {
            Some(hit)
                if hit.keys.len() == sorted.len()
                    || self.may_take_absent(keyspace, &sorted, &hit, &keys.created) =>
            {
                return Ok(Box::new(self.cached_txn(
                    keyspace,
                    hit,
                    &sorted,
                    Some(conn),
                    None,
                )));
            }
            Some(hit) if !hit.keys.is_empty() => Some(hit),
            _ => None,
        };
        // Keys known at the cached version are read only if the keyspace moved on since.
        if let Some(hit) = &partial {
            sorted.retain(|key| {
                hit.keys
                    .binary_search_by(|(known, _)| known.as_ref().cmp(*key))
                    .is_err()
            });
        }
        // Up to 128 keys in this one statement, padded to a power of two: a batch of 100
        // keys was a read of 64 and then lookups of 32 and 4, one after another, while the
        // keyspace's next batch waited.
        let (first, rest) = sorted.split_at(sorted.len().min(MAX_ROWS_PER_STATEMENT));
        let first_padded = padded(first);
        let mut sql = format!("SELECT {STATE_COLUMNS}, CAST(s.{column} AS TEXT)");
        let mut args = Vec::new();
        if !first.is_empty() {
            let (current, current_args) =
                current_rows_sql::<D>(keyspace, &first_padded, true, true);
            sql.push_str(&format!(
                ", r.* FROM keyspaces s LEFT JOIN ({current}) r ON TRUE"
            ));
            args = current_args;
        } else {
            sql.push_str(" FROM keyspaces s");
        }
        sql.push_str(" WHERE s.id = ?");
        args.push(Arg::Int(keyspace));
        let rows = fetch_all::<D>(&mut conn, "batch_read", &sql, &args).await?;
        let row = rows.first().ok_or(KineError::KeyspaceDeleted)?;
        let state = state_from_row::<D>(row, keyspace)?;
        let version = D::DB::text(row, 10)?;
        let mut txn = SqlWriteTxn::<D> {
            cache: self.commit_cache.clone(),
            from_cache: false,
            taken_absent: Vec::new(),
            tx: None,
            conn: Some(conn),
            unbegun: None,
            read_version: Some(version),
            writers: self.writers.clone(),
            keyspace,
            start: state,
            state,
            known: HashMap::new(),
            supersede: Vec::new(),
            pending: Vec::new(),
        };
        if !first.is_empty() {
            txn.remember(first, &rows, 11)?;
        }
        if let Some(hit) = partial {
            let current = txn.read_version.as_deref() == Some(hit.version.as_str());
            let mut stale = Vec::new();
            for (key, cached) in hit.keys {
                if current {
                    txn.known.insert(key, KnownKey::from(cached));
                } else {
                    stale.push(key);
                }
            }
            let stale: Vec<&[u8]> = stale.iter().map(|key| key.as_ref()).collect();
            txn.load(&stale).await?;
        }
        txn.load(rest).await?;
        Ok(Box::new(txn))
    }

    async fn lease(&self, keyspace: KeyspaceId, id: i64) -> Result<Option<LeaseRecord>> {
        let mut conn = acquire::<D>(&self.readers).await?;
        lease_on::<D>(&mut conn, keyspace, id, false).await
    }

    async fn leases(&self, keyspace: KeyspaceId) -> Result<Vec<LeaseRecord>> {
        let mut conn = acquire::<D>(&self.readers).await?;
        let rows = fetch_all::<D>(
            &mut conn,
            "leases",
            "SELECT id, ttl, expires_at_ms FROM leases WHERE keyspace = ? \
             ORDER BY expires_at_ms, id",
            &[Arg::Int(keyspace)],
        )
        .await?;
        rows.iter().map(lease_from_row::<D>).collect()
    }

    async fn lease_keys(&self, keyspace: KeyspaceId, id: i64) -> Result<Vec<Bytes>> {
        let mut conn = acquire::<D>(&self.readers).await?;
        lease_keys_on::<D>(&mut conn, keyspace, id).await
    }

    async fn expired_leases(&self, keyspace: KeyspaceId, now_ms: i64) -> Result<Vec<i64>> {
        let mut conn = acquire::<D>(&self.readers).await?;
        let rows = fetch_all::<D>(
            &mut conn,
            "expired_leases",
            "SELECT l.id FROM leases l JOIN keyspaces k ON k.id = l.keyspace \
             WHERE l.keyspace = ? AND k.frozen = 0 AND l.expires_at_ms <= ? \
             ORDER BY l.expires_at_ms LIMIT 1000",
            &[Arg::Int(keyspace), Arg::Int(now_ms)],
        )
        .await?;
        rows.iter().map(|row| D::DB::int(row, 0)).collect()
    }

    async fn renew_lease(
        &self,
        keyspace: KeyspaceId,
        id: i64,
        now_ms: i64,
    ) -> Result<Option<LeaseRecord>> {
        Ok(self
            .renew_leases(keyspace, &[id], now_ms)
            .await?
            .pop()
            .flatten())
    }

    /// Renews a batch of leases ([`renew_lease_rows`]) in one transaction; on PostgreSQL its
    /// commit does not wait for the log flush ([`Dialect::LAZY_COMMIT`]).
    async fn renew_leases(
        &self,
        keyspace: KeyspaceId,
        ids: &[i64],
        now_ms: i64,
    ) -> Result<Vec<Option<LeaseRecord>>> {
        let renewed = match D::LAZY_COMMIT {
            // A flood of keep-alives is then not a stream of log flushes that every writer of
            // every tenant queues behind.
            Some(lazy) => {
                let mut tx = begin::<D>(&self.writers, "begin_write", D::BEGIN_WRITE).await?;
                execute::<D>(&mut tx, "lazy_commit", lazy, &[]).await?;
                let renewed = renew_lease_rows::<D>(&mut tx, keyspace, ids, now_ms).await?;
                commit::<D>(tx).await?;
                renewed
            }
            None => {
                let mut conn = acquire::<D>(&self.writers).await?;
                renew_lease_rows::<D>(&mut conn, keyspace, ids, now_ms).await?
            }
        };
        Ok(ids.iter().map(|id| renewed.get(id).copied()).collect())
    }

    async fn purge_compacted(
        &self,
        keyspace: KeyspaceId,
        revision: Revision,
        batch: i64,
    ) -> Result<u64> {
        if D::PAST_TABLE {
            return self.purge_past(keyspace, revision, batch).await;
        }
        // Under the keyspace's row lock, so a purge never races (or deadlocks with) a writer
        // superseding the same rows; one bounded batch holds it only briefly.
        if let Some(cache) = &self.commit_cache {
            cache.forget(keyspace);
        }
        let (mut tx, _) = self.begin_locked(keyspace).await?;
        let purged = purge_after_head::<D>(&mut tx, keyspace, revision, batch).await?;
        commit::<D>(tx).await?;
        Ok(purged)
    }

    async fn size(&self) -> Result<(i64, i64)> {
        let mut conn = acquire::<D>(&self.readers).await?;
        let row = fetch_optional::<D>(&mut conn, "size", D::SIZE, &[])
            .await?
            .ok_or_else(|| KineError::Storage("the size query returned no row".into()))?;
        Ok((D::DB::int(&row, 0)?, D::DB::int(&row, 1)?))
    }

    async fn defragment(&self) -> Result<()> {
        let mut conn = acquire::<D>(&self.writers).await?;
        execute::<D>(&mut conn, "defragment", D::DEFRAGMENT, &[]).await?;
        Ok(())
    }

    async fn refresh_statistics(&self) -> Result<()> {
        if let Some(analyze) = D::ANALYZE {
            let mut conn = acquire::<D>(&self.writers).await?;
            execute::<D>(&mut conn, "analyze", analyze, &[]).await?;
        }
        Ok(())
    }

    fn writes_on_write_thread(&self) -> bool {
        true
    }

    fn poll_cadence(&self) -> Option<PollCadence> {
        self.poll
    }

    fn feed(&self) -> &Arc<CommitFeed> {
        &self.feed
    }

    async fn revisions(&self, keyspaces: &[KeyspaceId]) -> Result<Vec<(KeyspaceId, Revision)>> {
        let mut revisions = Vec::with_capacity(keyspaces.len());
        let mut conn = acquire::<D>(self.watch_pool()).await?;
        for chunk in keyspaces.chunks(POLL_CHUNK) {
            // Padded to a power of two with its last id, so the statement shapes stay few
            // (and prepared); a repeated id's row comes back once.
            let n = chunk.len().next_power_of_two();
            let mut args: Vec<Arg<'_>> = chunk.iter().map(|&id| Arg::Int(id)).collect();
            let last = chunk[chunk.len() - 1];
            args.resize(n, Arg::Int(last));
            let sql = format!(
                "SELECT id, revision FROM keyspaces WHERE id IN ({})",
                placeholders(n)
            );
            for row in fetch_all::<D>(&mut conn, "feed_poll", &sql, &args).await? {
                revisions.push((D::DB::int(&row, 0)?, D::DB::int(&row, 1)?));
            }
        }
        Ok(revisions)
    }
}

/// One bounded step of a compaction at `revision` where current rows are in `kv_head`
/// ([`Dialect::HEAD_TABLE`]), under the keyspace's lock: the rows written since the last step
/// (`keyspaces.purged_revision`), up to `batch` of them (whole revisions) and none after
/// `revision`, remove every older row of their keys (older by revision, then by place in
/// the revision: a transaction may put a key and delete it again); a tombstone among them
/// below `revision` goes too, with its head, and so does one at the revision the last step
/// ended at (a tombstone at a compaction revision outlives that compaction). Rows not
/// superseded at or before `revision` stay, as etcd keeps each key's newest revision.
/// Returns how many rows it removed, at least 1 while rows
/// remain to walk, 0 once the walk reached `revision`.
async fn purge_after_head<D: Dialect>(
    tx: &mut Conn<D>,
    keyspace: KeyspaceId,
    revision: Revision,
    batch: i64,
) -> Result<u64> {
    let id = Arg::Int(keyspace);
    let row = fetch_optional::<D>(
        tx,
        "purge",
        "SELECT purged_revision FROM keyspaces WHERE id = ?",
        std::slice::from_ref(&id),
    )
    .await?
    .ok_or(KineError::KeyspaceDeleted)?;
    let from = D::DB::int(&row, 0)?;
    if from >= revision {
        return Ok(0);
    }
    // The step ends at the revision of its `batch`-th row, or at `revision`.
    let upto = fetch_optional::<D>(
        tx,
        "purge",
        "SELECT mod_revision FROM kv WHERE keyspace = ? AND mod_revision > ? \
         AND mod_revision <= ? ORDER BY mod_revision, sub LIMIT 1 OFFSET ?",
        &[
            id.clone(),
            Arg::Int(from),
            Arg::Int(revision),
            Arg::Int(batch - 1),
        ],
    )
    .await?;
    let upto = match upto {
        Some(row) => D::DB::int(&row, 0)?,
        None => revision,
    };
    let superseded = execute::<D>(
        tx,
        "purge",
        // Each key's older rows looked up by key (`OFFSET 0` keeps the lookup a lookup: as a
        // join, a plan made while the table was small would scan it all), removed by row id.
        "DELETE FROM kv WHERE ctid = ANY(ARRAY(SELECT o.ctid FROM (SELECT DISTINCT ON (`key`) \
         `key`, mod_revision, sub FROM kv \
         WHERE keyspace = ? AND mod_revision > ? AND mod_revision <= ? \
         ORDER BY `key`, mod_revision DESC, sub DESC) AS n \
         CROSS JOIN LATERAL (SELECT ctid FROM kv o WHERE o.keyspace = ? AND o.`key` = n.`key` \
         AND (o.mod_revision, o.sub) < (n.mod_revision, n.sub) OFFSET 0) AS o))",
        &[id.clone(), Arg::Int(from), Arg::Int(upto), id.clone()],
    )
    .await?;
    let tombstones = execute::<D>(
        tx,
        "purge",
        "WITH gone AS (DELETE FROM kv WHERE keyspace = ? AND mod_revision >= ? \
         AND mod_revision <= ? AND mod_revision < ? AND deleted = 1 \
         RETURNING `key`, mod_revision, sub) \
         DELETE FROM kv_head WHERE ctid = ANY(ARRAY(SELECT h.ctid FROM gone CROSS JOIN \
         LATERAL (SELECT ctid FROM kv_head h WHERE h.keyspace = ? AND h.`key` = gone.`key` \
         AND h.mod_revision = gone.mod_revision AND h.sub = gone.sub OFFSET 0) AS h))",
        &[
            id.clone(),
            Arg::Int(from),
            Arg::Int(upto),
            Arg::Int(revision),
            id.clone(),
        ],
    )
    .await?;
    execute::<D>(
        tx,
        "purge",
        "UPDATE keyspaces SET purged_revision = ? WHERE id = ?",
        &[Arg::Int(upto), id],
    )
    .await?;
    Ok((superseded + tombstones).max(1))
}

/// A write transaction holding the keyspace's row lock, or, for a batch begun optimistically
/// on a database with [`Dialect::COMMIT_BATCH`], reading without it until it needs it.
///
/// Writes are buffered and reach the database in a few multi-row statements (at commit, or
/// before a read that needs them): one `UPDATE` superseding the keys' stored current rows,
/// then `INSERT`s of the new rows. What the transaction knows of each key (looked up once, in
/// one statement for a whole batch with [`WriteTxn::prefetch`]) answers point reads, so a
/// group-commit batch costs a handful of round trips whatever its size.
struct SqlWriteTxn<D: Dialect> {
    /// The transaction holding the keyspace's row lock; `None` while the batch reads without
    /// it ([`Dialect::COMMIT_BATCH`]).
    tx: Option<WriteTx<D>>,
    /// Without the lock: the connection the batch reads on, outside any transaction.
    conn: Option<PoolConnection<D::DB>>,
    /// A batch started from the cache on the batch connection ([`UnreadBatch`]): the
    /// connection its first call begins the transaction on, with the check.
    unbegun: Option<BatchConnection<D>>,
    /// Without the lock: the version ([`Dialect::ROW_VERSION`]) of the keyspace row the batch
    /// read; the lock, once taken, must find the same one. On the batch connection
    /// ([`UnreadBatch`]): its generation and data version when the batch read the keyspace, or
    /// those the cache started it from.
    read_version: Option<String>,
    /// Where this process's commits are remembered, if anywhere.
    cache: Option<Arc<CommitCache>>,
    /// Whether the batch started from [`CommitCache`] instead of a read.
    from_cache: bool,
    /// Keys the batch took for absent without reading them (it started from the cache); its
    /// commit checks that none is live.
    taken_absent: Vec<Bytes>,
    /// Where the lock's transaction comes from.
    writers: Pool<D::DB>,
    keyspace: KeyspaceId,
    /// The counters as read under the lock.
    start: KeyspaceState,
    /// The counters with this transaction's changes (usage, compaction, freeze, quota).
    state: KeyspaceState,
    /// Keys whose current state this transaction knows.
    known: HashMap<Bytes, KnownKey>,
    /// Stored current rows (live or tombstones) to mark superseded, by the revision given.
    supersede: Vec<StoredRow>,
    /// New rows not yet written, in order.
    pending: Vec<PendingRow>,
}

/// What a write transaction knows of one key.
struct KnownKey {
    /// The key's live key-value now, this transaction's writes included.
    live: Option<KeyValue>,
    /// The database holds a current row of the key (live or a tombstone) that the key's next
    /// write must supersede.
    stored_current: bool,
    /// That row's [`Dialect::ROW_ID`], when it was read with it.
    row_id: Option<String>,
    /// That row's place, where the batch writes `kv_past` itself
    /// ([`Dialect::WRITES_PAST_ROWS`]).
    stored_head: Option<Head>,
    /// Index in `pending` of the key's newest unwritten row.
    pending: Option<usize>,
}

/// Where a key's current row is, as its row of `kv_head` says.
#[derive(Clone, Copy)]
struct Head {
    mod_revision: Revision,
    sub: i64,
    deleted: bool,
}

impl KnownKey {
    /// A key without a current row.
    fn absent() -> Self {
        KnownKey {
            live: None,
            stored_current: false,
            row_id: None,
            stored_head: None,
            pending: None,
        }
    }
}

impl From<CachedKey> for KnownKey {
    /// A key as this process's last commit to the keyspace left it.
    fn from(cached: CachedKey) -> Self {
        KnownKey {
            live: cached.live,
            stored_current: cached.stored_current,
            row_id: None,
            stored_head: None,
            pending: None,
        }
    }
}

/// A stored current row to supersede.
struct StoredRow {
    key: Bytes,
    row_id: Option<String>,
    /// The revision superseding it.
    revision: Revision,
    /// Where it is ([`Dialect::WRITES_PAST_ROWS`]).
    head: Option<Head>,
}

/// A row waiting to be inserted.
struct PendingRow {
    kv: KeyValue,
    sub: i64,
    deleted: bool,
    superseded: Revision,
}

/// Splits `n` items into chunks of power-of-two sizes (at most `max`, a power of two), so
/// the multi-row statements come in few distinct shapes and stay in the prepared-statement
/// cache.
fn chunk_sizes(mut n: usize, max: usize) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if n == 0 {
            return None;
        }
        let size = if n >= max {
            max
        } else {
            1 << (usize::BITS - 1 - n.leading_zeros())
        };
        n -= size;
        Some(size)
    })
}

/// `keys`, its last key repeated up to the next power of two: statements naming that many
/// keys come in a few shapes (each prepared once per connection), and one of them reads a
/// whole chunk. A repeated key's row comes back again, the same.
fn padded<'a>(keys: &[&'a [u8]]) -> Vec<&'a [u8]> {
    let mut padded = keys.to_vec();
    if let Some(last) = keys.last() {
        padded.resize(keys.len().next_power_of_two(), *last);
    }
    padded
}

/// Most rows (or keys) one multi-row statement carries: 128 rows of 10 parameters stay well
/// under every database's parameter limit.
const MAX_ROWS_PER_STATEMENT: usize = 128;

/// `?, ?, …` with `n` placeholders.
fn placeholders(n: usize) -> String {
    let mut out = String::with_capacity(n * 3);
    for i in 0..n {
        if i > 0 {
            out.push_str(", ");
        }
        out.push('?');
    }
    out
}

/// The statement reading the current rows (live or tombstones) of `keys`, with its
/// parameters: columns [`KV_COLUMNS`], `deleted`, then, with `row_id` (a write batch's
/// lookup), the [`Dialect::ROW_ID`] if any and `sub` where [`Dialect::WRITES_PAST_ROWS`].
/// Without `values`, each value is read as empty.
fn current_rows_sql<'a, D: Dialect>(
    keyspace: KeyspaceId,
    keys: &[&'a [u8]],
    row_id: bool,
    values: bool,
) -> (String, Vec<Arg<'a>>) {
    // A write batch's lookups read where each row is ([`Dialect::WRITES_PAST_ROWS`]).
    let sub = if row_id && D::WRITES_PAST_ROWS {
        ", sub"
    } else {
        ""
    };
    let row_id = D::ROW_ID
        .filter(|_| row_id)
        .map(|(column, _)| format!(", CAST({column} AS TEXT) AS row_id"))
        .unwrap_or_default();
    let value = if values { "value" } else { D::EMPTY_BYTES };
    if D::HEAD_TABLE {
        // For each key its head, then the head's row, each a lookup by primary key
        // (`LATERAL … LIMIT 1`: as a plain join, the generic plan made while the table was new
        // scanned `kv` for every key, 39 ms per batch read; as a `UNION ALL` branch per key,
        // the statement took longer to plan than to run). The keys are a `VALUES` list, one
        // parameter each, not an array: PostgreSQL estimates an array parameter at ten
        // elements in a generic plan and at its length in a custom one, so a lookup of fewer
        // keys was planned anew at every call (~0.4 ms of planning for a 0.1 ms read of four
        // keys, `pgbench`); a list's length is the same in both plans, and each length (the
        // callers give powers of two) is planned once per connection.
        let row_id = if row_id.is_empty() {
            ""
        } else {
            ", CAST(h.ctid AS TEXT) AS row_id"
        };
        let mut list = String::with_capacity(keys.len() * 5 + 24);
        for index in 0..keys.len() {
            list.push_str(if index == 0 {
                "(CAST(? AS BYTEA))"
            } else {
                ", (?)"
            });
        }
        let sql = format!(
            "SELECT kv.`key`, kv.create_revision, kv.mod_revision, kv.version, kv.lease, \
             kv.value, h.deleted{row_id} FROM (VALUES {list}) AS k(`key`) \
             CROSS JOIN LATERAL (SELECT keyspace, mod_revision, sub, deleted, ctid \
             FROM kv_head WHERE keyspace = ? AND `key` = k.`key` LIMIT 1) AS h \
             CROSS JOIN LATERAL (SELECT `key`, create_revision, mod_revision, version, lease, \
             {value} AS value FROM kv o WHERE o.keyspace = h.keyspace \
             AND o.mod_revision = h.mod_revision AND o.sub = h.sub LIMIT 1) AS kv"
        );
        let mut args: Vec<Arg<'a>> = keys.iter().map(|key| Arg::Bytes(key)).collect();
        args.push(Arg::Int(keyspace));
        return (sql, args);
    }
    let current = if D::PAST_TABLE {
        format!("{} WHERE keyspace = ?", D::CURRENT_VIEW)
    } else {
        format!("kv WHERE keyspace = ? AND {}", D::CURRENT_ROWS)
    };
    let select = format!(
        "SELECT `key`, create_revision, mod_revision, version, lease, {value} AS value, \
         deleted{row_id}{sub} FROM {current} AND `key`"
    );
    if keys_joined::<D>(keys.len()) {
        // The keys first, each row then found by key (`STRAIGHT_JOIN`): while `kv_head` is
        // small, MariaDB read all of it and joined the keys to it instead.
        let (current, rows) = if D::PAST_TABLE {
            (
                format!(
                    "{} ON kv_current.keyspace = ? AND kv_current.`key` = UNHEX(n.k)",
                    D::CURRENT_VIEW
                ),
                "kv_current",
            )
        } else {
            (
                format!(
                    "kv ON kv.keyspace = ? AND kv.`key` = UNHEX(n.k) AND {}",
                    D::CURRENT_ROWS
                ),
                "kv",
            )
        };
        let sql = format!(
            "SELECT {rows}.`key`, create_revision, mod_revision, version, lease, \
             {value} AS value, deleted{row_id}{sub} FROM {KEYS_JSON_TABLE} AS n \
             STRAIGHT_JOIN {current}"
        );
        let json = keys_json::<D>(keys.iter().copied());
        return (sql, vec![Arg::OwnedText(json), Arg::Int(keyspace)]);
    }
    if D::KEY_LISTS {
        let sql = format!("{select} IN ({})", placeholders(keys.len()));
        let mut args = Vec::with_capacity(keys.len() + 1);
        args.push(Arg::Int(keyspace));
        args.extend(keys.iter().map(|key| Arg::Bytes(key)));
        (sql, args)
    } else {
        let sql = vec![format!("{select} = ?"); keys.len()].join(" UNION ALL ");
        let args = keys
            .iter()
            .flat_map(|key| [Arg::Int(keyspace), Arg::Bytes(key)])
            .collect();
        (sql, args)
    }
}

/// Most keys a statement lists in an `IN` list where [`Dialect::KEYS_JOINED`] joins more.
/// Few keys are what most gets and small batches name, and there the list was as fast
/// (`SHOW PROFILES`: 1–4 keys 0.18–0.29 ms either way) or faster in kine-rs: txn-update at
/// 16 clients on 100 keys, with the JSON table from 5 keys on, had its gets' statements at
/// 0.50–0.53 ms against 0.39–0.40 and 2,408–2,471 updates/s against 2,568–2,690; from 17
/// keys on, 0.37–0.38 ms and 2,753–2,875/s against 0.37–0.39 ms and 2,805–2,831/s.
const LISTED_KEYS: usize = 16;

/// Whether a statement naming `n` keys joins them as a JSON table ([`Dialect::KEYS_JOINED`]).
fn keys_joined<D: Dialect>(n: usize) -> bool {
    D::KEYS_JOINED && n > LISTED_KEYS
}

/// `keys` as a statement names them: an `IN` list padded to a power of two with its last
/// key, so that the few statement shapes stay prepared (a repeated key matches its row once,
/// or its row comes back again, the same); a JSON table as they are (one shape whatever its
/// length).
fn named_keys<'a, D: Dialect>(keys: &[&'a [u8]]) -> Vec<&'a [u8]> {
    if D::KEY_LISTS && !keys_joined::<D>(keys.len()) {
        padded(keys)
    } else {
        keys.to_vec()
    }
}

/// The keys of a [`keys_json`] document as a table, column `k` (each key in hex: a JSON
/// string holds text, a key any bytes). `JSON_TABLE` is spelled alike by MariaDB (10.6 and
/// later) and MySQL (8.0.4 and later), where their table value constructors differ.
const KEYS_JSON_TABLE: &str = "JSON_TABLE(?, '$[*]' COLUMNS (k VARCHAR(6000) PATH '$'))";

/// `keys` as the JSON document of [`KEYS_JSON_TABLE`] (`["6b31", …]`). A key longer than
/// the database stores has no row, and is left out: its hex would not fit the table's
/// column, which would cut it to another key.
fn keys_json<'k, D: Dialect>(keys: impl Iterator<Item = &'k [u8]>) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut json = String::from("[");
    for key in keys {
        if D::MAX_KEY_BYTES.is_some_and(|max| key.len() > max) {
            continue;
        }
        if json.len() > 1 {
            json.push(',');
        }
        json.push('"');
        for byte in key {
            json.push(char::from(HEX[usize::from(byte >> 4)]));
            json.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
        json.push('"');
    }
    json.push(']');
    json
}

/// The statement marking `rows` superseded, each by its revision: through their
/// [`Dialect::ROW_ID`] when they all have one, else by key.
///
/// By row id, the statement names nothing but the row ids in its `WHERE` clause, so the only
/// plan is a lookup of those rows (PostgreSQL's TID scan). With `keyspace = ?` and the current
/// marker there too, PostgreSQL's generic plan walked the keyspace's whole index of current
/// rows, filtering by row id: ~26 ms per batch at 20,000 keys, and overwrites collapsed from
/// 2,900 to 700 puts/s. Those conditions still guard the write, inside `SET`: a row id that
/// named any other row would set NULL, which the column refuses, failing the transaction.
fn supersede_sql<'a, D: Dialect>(
    keyspace: KeyspaceId,
    rows: &[&'a StoredRow],
) -> (String, Vec<Arg<'a>>) {
    let by_row_id = D::ROW_ID.filter(|_| rows.iter().all(|row| row.row_id.is_some()));
    let mut args = Vec::with_capacity(rows.len() * 3 + 1);
    if let Some((column, kind)) = by_row_id.filter(|_| D::ARRAYS) {
        let sql = format!(
            "UPDATE kv SET superseded = CASE WHEN keyspace = ? \
             AND superseded = 9223372036854775807 THEN (CAST(? AS BIGINT[]))\
             [array_position(CAST(? AS {kind}[]), {column})] END \
             WHERE {column} = ANY(CAST(? AS {kind}[]))"
        );
        let ids: Vec<&str> = rows
            .iter()
            .map(|row| row.row_id.as_deref().unwrap_or_default())
            .collect();
        args.push(Arg::Int(keyspace));
        args.push(Arg::Ints(rows.iter().map(|row| row.revision).collect()));
        args.push(Arg::Texts(ids.clone()));
        args.push(Arg::Texts(ids));
        return (sql, args);
    }
    if let Some((column, kind)) = by_row_id {
        let parameter = format!("CAST(? AS {kind})");
        let mut sql = String::from(
            "UPDATE kv SET superseded = CASE WHEN keyspace = ? \
             AND superseded = 9223372036854775807 THEN CASE ",
        );
        sql.push_str(column);
        for _ in rows {
            sql.push_str(&format!(" WHEN {parameter} THEN ?"));
        }
        sql.push_str(&format!(
            " END END WHERE {column} IN ({})",
            vec![parameter; rows.len()].join(", ")
        ));
        args.push(Arg::Int(keyspace));
        for row in rows {
            args.extend([
                Arg::Text(row.row_id.as_deref().unwrap_or_default()),
                Arg::Int(row.revision),
            ]);
        }
        args.extend(
            rows.iter()
                .map(|row| Arg::Text(row.row_id.as_deref().unwrap_or_default())),
        );
        return (sql, args);
    }
    let mut sql = String::from("UPDATE kv SET superseded = CASE `key`");
    for _ in rows {
        sql.push_str(" WHEN ? THEN ?");
    }
    sql.push_str(&format!(
        " END WHERE keyspace = ? AND {} AND `key` IN ({})",
        D::CURRENT_ROWS,
        placeholders(rows.len())
    ));
    for row in rows {
        args.extend([Arg::Bytes(&row.key), Arg::Int(row.revision)]);
    }
    args.push(Arg::Int(keyspace));
    args.extend(rows.iter().map(|row| Arg::Bytes(&row.key)));
    (sql, args)
}

/// The statements reading the current rows of `keys` (sorted, without repeats), each with
/// the keys it looks up.
#[allow(clippy::type_complexity)]
fn lookup_statements<'a, 'k, D: Dialect>(
    keyspace: KeyspaceId,
    keys: &'k [&'a [u8]],
) -> Vec<(&'k [&'a [u8]], String, Vec<Arg<'a>>)> {
    // Not one `key = ANY(array)` on PostgreSQL: its generic plan, made while the table is
    // small, scans the table, and keeps doing so as it grows (overwrites at 128 clients
    // fell from 1,700 to 1,150 puts/s over three rounds). One equality per key on the
    // unique index of current rows is probed per key whatever the statistics.
    // An `IN` list takes as many keys as an `INSERT` takes rows: a migration's window
    // of 1,000 events is looked up in two statements instead of eight.
    let per_statement = if D::KEY_LISTS {
        MAX_INSERT_ROWS
    } else {
        MAX_ROWS_PER_STATEMENT
    };
    // Key lists (`IN (…)`): one statement per chunk, padded to a power of two with its last
    // key (a repeated key matches its row once). Split into power-of-two chunks instead, a
    // batch of 61 keys was five statements under the keyspace's lock (MySQL overwrites at
    // 128 clients: ~3 lookups per batch of ~64 keys).
    let sizes: Vec<usize> = if D::KEY_LISTS {
        keys.chunks(per_statement).map(<[_]>::len).collect()
    } else {
        chunk_sizes(keys.len(), per_statement).collect()
    };
    let mut rest = keys;
    let mut statements = Vec::with_capacity(sizes.len());
    for size in sizes {
        let (chunk, tail) = rest.split_at(size);
        rest = tail;
        let named = named_keys::<D>(chunk);
        let (sql, args) = current_rows_sql::<D>(keyspace, &named, true, true);
        statements.push((chunk, sql, args));
    }
    statements
}

impl<D: Dialect> SqlWriteTxn<D> {
    /// Looks up the stored current rows of `keys` this transaction does not know yet.
    async fn load(&mut self, keys: &[&[u8]]) -> Result<()> {
        let mut unknown: Vec<&[u8]> = keys
            .iter()
            .copied()
            .filter(|key| !self.known.contains_key(*key))
            .collect();
        unknown.sort_unstable();
        unknown.dedup();
        for (chunk, sql, args) in lookup_statements::<D>(self.keyspace, &unknown) {
            // A batch started from the cache reads under its transaction, once begun.
            self.lock_if_unbegun().await?;
            let conn = reader::<D>(&mut self.tx, &mut self.conn)?;
            let rows = fetch_all::<D>(conn, "get", &sql, &args).await?;
            self.remember(chunk, &rows, 0)?;
        }
        Ok(())
    }

    /// Records the current rows of `keys` read in `rows` (columns from `offset` on, as
    /// [`current_rows_sql`] returns them, NULL where a joined row found none); the other keys
    /// of `keys` have no current row.
    fn remember(&mut self, keys: &[&[u8]], rows: &[Row<D>], offset: usize) -> Result<()> {
        for row in rows {
            if D::DB::opt_bytes(row, offset)?.is_none() {
                continue;
            }
            let kv = kv_from_row::<D>(row, offset)?;
            let deleted = D::DB::flag(row, offset + 6)?;
            let row_id = match D::ROW_ID {
                Some(_) => Some(D::DB::text(row, offset + 7)?),
                None => None,
            };
            let stored_head = if D::WRITES_PAST_ROWS {
                Some(Head {
                    mod_revision: kv.mod_revision,
                    sub: D::DB::int(row, offset + 7 + usize::from(D::ROW_ID.is_some()))?,
                    deleted,
                })
            } else {
                None
            };
            self.known.insert(
                kv.key.clone(),
                KnownKey {
                    live: (!deleted).then_some(kv),
                    stored_current: true,
                    row_id,
                    stored_head,
                    pending: None,
                },
            );
        }
        for key in keys {
            if !self.known.contains_key(*key) {
                self.known
                    .insert(Bytes::copy_from_slice(key), KnownKey::absent());
            }
        }
        Ok(())
    }

    /// Begins the transaction of a batch started from the cache ([`UnreadBatch`]), if not yet.
    async fn lock_if_unbegun(&mut self) -> Result<()> {
        if self.unbegun.is_some() {
            self.lock().await?;
        }
        Ok(())
    }

    /// Takes the keyspace's row lock, if the batch read without it: in a new transaction,
    /// checking that the keyspace row is still the version the batch read (else nothing it
    /// decided may stand: [`KineError::Conflict`]).
    async fn lock(&mut self) -> Result<()> {
        if self.tx.is_some() {
            return Ok(());
        }
        if self.unbegun.is_some() {
            // A batch started from the cache that needs its transaction before its last
            // call: begin it with the check, in a call of its own.
            let absent = self.taken_absent.clone();
            let (sql, args) = self.take_unbegun(&absent).await?;
            let conn = held::<D>(&mut self.tx)?;
            if let Err(error) = execute::<D>(conn, "begin_write", &sql, &args).await {
                self.refuse_unread(&error);
                return Err(error);
            }
            self.taken_absent.clear();
            return Ok(());
        }
        // Give the reading connection back first: a writer never holds two.
        self.conn = None;
        let mut tx = begin::<D>(&self.writers, "begin_write", D::BEGIN_WRITE).await?;
        let (_, version) = read_state_version::<D>(&mut tx, self.keyspace, true).await?;
        if self.read_version.is_none() || version != self.read_version {
            self.refuse_cached();
            return Err(KineError::Conflict(format!(
                "keyspace {} changed between a write batch's read and its lock",
                self.keyspace
            )));
        }
        if !self.taken_absent.is_empty() {
            // The commit call's check will not run: the batch commits in this transaction.
            let keys: Vec<&[u8]> = self.taken_absent.iter().map(|key| key.as_ref()).collect();
            let (sql, args) = current_rows_sql::<D>(self.keyspace, &padded(&keys), true, true);
            let rows = fetch_all::<D>(&mut *tx, "get", &sql, &args).await?;
            for row in &rows {
                if !D::DB::flag(row, 6)? {
                    self.refuse_cached();
                    return Err(KineError::Conflict(format!(
                        "a key of keyspace {} the write batch took for absent exists",
                        self.keyspace
                    )));
                }
            }
            self.taken_absent.clear();
        }
        self.tx = Some(WriteTx::Tracked(tx));
        Ok(())
    }

    /// Takes the batch connection of a batch started from the cache ([`UnreadBatch`]) and
    /// returns the statements its first call begins with: the transaction's BEGIN and the
    /// check that the cache still holds (`absent`: the keys the batch took for absent).
    async fn take_unbegun<'a>(&mut self, absent: &'a [Bytes]) -> Result<(String, Vec<Arg<'a>>)> {
        let (Some(batches), Some(unread)) = (self.unbegun.take(), D::UNREAD_BATCH) else {
            return Err(KineError::Storage(
                "a write batch began on a database without unread batches".into(),
            ));
        };
        let Some((generation, version)) =
            self.read_version.as_deref().and_then(parse_unread_version)
        else {
            return Err(KineError::Storage(
                "a write batch started from the cache without its version".into(),
            ));
        };
        let own = batches.begin().await?;
        if own.generation() != generation {
            own.release();
            self.refuse_cached();
            return Err(KineError::Conflict(format!(
                "the batch connection was replaced since this process last committed to keyspace {}",
                self.keyspace
            )));
        }
        self.tx = Some(WriteTx::Own(own));
        let keys: Vec<&[u8]> = absent.iter().map(|key| key.as_ref()).collect();
        let keys = padded(&keys);
        let list = if keys.is_empty() {
            "NULL".to_string()
        } else {
            placeholders(keys.len())
        };
        let mut args = vec![Arg::Int(version), Arg::Int(self.keyspace)];
        args.extend(keys.into_iter().map(Arg::Bytes));
        Ok((unread.begin_checked.replace("{keys}", &list), args))
    }

    /// Tells the cache how the first call of a batch it started failed: refused by its check,
    /// or otherwise (the cache may not hold either way).
    fn refuse_unread(&self, error: &KineError) {
        match (error, &self.cache) {
            (KineError::Conflict(_), _) => self.refuse_cached(),
            (_, Some(cache)) => cache.forget(self.keyspace),
            (_, None) => {}
        }
    }

    /// Tells the cache that a batch it started was refused: the keyspace changed, or a key
    /// taken for absent was live.
    fn refuse_cached(&self) {
        let Some(cache) = &self.cache else {
            return;
        };
        if !self.taken_absent.is_empty() {
            cache.refused_absent(self.keyspace);
        } else if self.from_cache {
            cache.contended(self.keyspace);
        } else {
            cache.forget(self.keyspace);
        }
    }

    /// Commits a batch that read without the lock, with one call of the database's
    /// [`Dialect::COMMIT_BATCH`]: lock, check, supersede, insert, counters, announcement, and
    /// the commit itself (the call is its own transaction; the database answers after its
    /// commit is durable).
    async fn commit_unlocked(mut self: Box<Self>, revision: Revision) -> Result<()> {
        // The commit call checks the keys taken for absent that it writes. One the batch does
        // not write (a compare that passed on it, reads only, a put that failed) is read and
        // the batch evaluated again.
        let unchecked = self.taken_absent.iter().any(|key| {
            self.known
                .get(key)
                .is_none_or(|known| known.pending.is_none())
        });
        if unchecked {
            self.refuse_cached();
            return Err(KineError::Conflict(format!(
                "a write batch of keyspace {} took a key for absent that it does not write",
                self.keyspace
            )));
        }
        let wrote = revision != self.start.revision
            || self.state.keys != self.start.keys
            || self.state.bytes != self.start.bytes
            || !self.pending.is_empty()
            || !self.supersede.is_empty();
        if !wrote {
            // Only reads, answered from one snapshot: nothing to commit. Unless answered from
            // what this process committed last: that stands only if it is still the keyspace's
            // current version (one short read instead of the batch's).
            if self.from_cache {
                let Some(conn) = self.conn.as_mut() else {
                    return Err(KineError::Storage(
                        "a write batch lost its connection".into(),
                    ));
                };
                let (_, version) = read_state_version::<D>(conn, self.keyspace, false).await?;
                if version != self.read_version {
                    self.refuse_cached();
                    return Err(KineError::Conflict(format!(
                        "keyspace {} changed since this process's last commit to it",
                        self.keyspace
                    )));
                }
            }
            return Ok(());
        }
        let (Some(sql), Some(version)) = (D::COMMIT_BATCH, self.read_version.clone()) else {
            return Err(KineError::Storage(
                "a write batch read without the lock on a database that cannot commit it".into(),
            ));
        };
        let version_read = version.clone();
        let mut args = vec![
            Arg::Int(self.keyspace),
            Arg::Text(&version),
            Arg::Int(revision),
            Arg::Int(self.state.keys),
            Arg::Int(self.state.bytes),
        ];
        args.extend(row_arrays(&self.pending));
        args.push(Arg::ByteStrings(
            self.taken_absent.iter().map(|key| key.as_ref()).collect(),
        ));
        let Some(conn) = self.conn.as_mut() else {
            return Err(KineError::Storage(
                "a write batch lost its connection".into(),
            ));
        };
        let written = match fetch_all::<D>(conn, "commit_batch", sql, &args).await {
            Ok(rows) => rows,
            Err(error) => {
                drop(args);
                match (&error, &self.cache) {
                    (KineError::Conflict(_), _) => self.refuse_cached(),
                    (_, Some(cache)) => cache.forget(self.keyspace),
                    (_, None) => {}
                }
                return Err(error);
            }
        };
        if let Some(cache) = &self.cache {
            // The function answers the keyspace row's new version; anything else is not
            // remembered.
            match written.first().map(|row| D::DB::text(row, 0)) {
                Some(Ok(version)) => {
                    let mut state = self.state;
                    state.revision = revision;
                    let keys = self.known.drain().map(|(key, known)| {
                        let stored_current = known.stored_current || known.pending.is_some();
                        let cached = CachedKey {
                            live: known.live,
                            stored_current,
                        };
                        (key, cached)
                    });
                    cache.store(self.keyspace, &version_read, version, state, keys);
                }
                _ => cache.forget(self.keyspace),
            }
        }
        Ok(())
    }

    /// What this transaction knows of `key`, looked up first if needed.
    async fn known(&mut self, key: &[u8]) -> Result<&mut KnownKey> {
        if !self.known.contains_key(key) {
            self.load(&[key]).await?;
        }
        self.known
            .get_mut(key)
            .ok_or_else(|| KineError::Storage("a looked-up key is missing".into()))
    }

    /// Makes `row` the key's new current row: accounts for usage, and supersedes the key's
    /// previous current row, stored or pending.
    async fn write(&mut self, row: PendingRow) -> Result<()> {
        let revision = row.kv.mod_revision;
        let index = self.pending.len();
        let known = self.known(&row.kv.key).await?;
        let previous = known.live.as_ref().map(live_size);
        let stored = std::mem::replace(&mut known.stored_current, false);
        let row_id = known.row_id.take();
        let head = known.stored_head.take();
        let superseded_pending = known.pending.replace(index);
        known.live = (!row.deleted).then(|| row.kv.clone());
        if let Some(previous) = previous {
            self.state.keys -= 1;
            self.state.bytes -= previous;
        }
        if !row.deleted {
            self.state.keys += 1;
            self.state.bytes += live_size(&row.kv);
        }
        if stored {
            if D::WRITES_PAST_ROWS && head.is_none() {
                return Err(KineError::Storage(
                    "a superseded row read without its place".into(),
                ));
            }
            self.supersede.push(StoredRow {
                key: row.kv.key.clone(),
                row_id,
                revision,
                head,
            });
        }
        if let Some(earlier) = superseded_pending {
            self.pending[earlier].superseded = revision;
        }
        self.pending.push(row);
        Ok(())
    }

    /// Writes the buffered rows, so statements that read the table see them.
    async fn flush(&mut self) -> Result<()> {
        self.flush_then(None, false).await.map(drop)
    }

    /// Writes the buffered rows, then runs `then` (a statement changing one row, named as
    /// its query), all in one call where the database takes several statements at once
    /// ([`Dialect::MULTI_STATEMENT`]). With `commit`, that call also commits where the
    /// database checks each statement's changed rows inside it ([`ChangedRowsCheck`], on
    /// the batch connection); returns whether it did.
    async fn flush_then(
        &mut self,
        then: Option<(&'static str, String, Vec<Arg<'_>>)>,
        commit: bool,
    ) -> Result<bool> {
        // A batch started from the cache that commits in this call begins in it too.
        let absent = self.taken_absent.clone();
        let prelude = if commit && D::MULTI_STATEMENT && self.unbegun.is_some() {
            Some(self.take_unbegun(&absent).await?)
        } else {
            self.lock().await?;
            None
        };
        let begins = prelude.is_some();
        let mut supersede = std::mem::take(&mut self.supersede);
        if D::HEAD_TABLE || (D::PAST_TABLE && !D::WRITES_PAST_ROWS) {
            // The insert below moves each key's head; nothing is rewritten (with `kv_past`,
            // a trigger of `kv_head` writes each moved head's row there).
            supersede.clear();
        }
        let pending = std::mem::take(&mut self.pending);
        let mut statements = write_statements::<D>(self.keyspace, &supersede, &pending);
        statements.extend(then.map(|(query, sql, args)| WriteStatement {
            query,
            sql: Cow::Owned(sql),
            args,
            // SQLite counts the rows an UPDATE matched; MySQL only those whose values it
            // changed.
            changes: D::MULTI_STATEMENT.then_some(1),
        }));
        // Checked inside the call only on the batch connection, which has the check's objects.
        let checks = D::CHANGED_ROWS_CHECK.filter(|_| matches!(self.tx, Some(WriteTx::Own(_))));
        let commit = commit && checks.is_some();
        let conn = held::<D>(&mut self.tx)?;
        if D::MULTI_STATEMENT && (statements.len() > 1 || commit) {
            // One call: each statement is a hand-off to SQLite's worker thread, and the
            // keyspace's next batch waits for this one.
            let (mut sql, mut args) = prelude.unwrap_or_default();
            let mut expected = Some(0);
            for statement in &statements {
                if !sql.is_empty() {
                    sql.push_str("; ");
                }
                sql.push_str(&statement.sql);
                args.extend(statement.args.iter().cloned());
                match (checks, statement.changes) {
                    (Some(check), Some(changes)) => {
                        sql.push_str("; ");
                        sql.push_str(check.check);
                        args.push(Arg::Int(i64::try_from(changes).unwrap_or(i64::MAX)));
                    }
                    (Some(_), None) => {}
                    (None, changes) => {
                        expected = expected.zip(changes).map(|(a, b)| a + b);
                    }
                }
            }
            if commit {
                // Reached only if every check passed: a refused statement ends the call.
                sql.push_str("; COMMIT");
            }
            let changed = execute::<D>(conn, "write", &sql, &args).await?;
            if begins {
                self.taken_absent.clear();
            }
            let expected = expected.filter(|_| checks.is_none());
            if let Some(expected) = expected.filter(|expected| changed != *expected) {
                return Err(KineError::Storage(format!(
                    "a write batch's statements changed {changed} rows, not {expected}"
                )));
            }
        } else {
            for statement in &statements {
                let changed =
                    execute::<D>(&mut *conn, statement.query, &statement.sql, &statement.args)
                        .await?;
                if let Some(expected) = statement.changes.filter(|expected| changed != *expected) {
                    return Err(KineError::Storage(format!(
                        "{} changed {changed} rows, not {expected}",
                        statement.query
                    )));
                }
            }
        }
        for known in self.known.values_mut() {
            if let Some(index) = known.pending.take() {
                known.stored_current = true;
                known.row_id = None;
                known.stored_head = pending
                    .get(index)
                    .filter(|_| D::WRITES_PAST_ROWS)
                    .map(|row| Head {
                        mod_revision: row.kv.mod_revision,
                        sub: row.sub,
                        deleted: row.deleted,
                    });
            }
        }
        Ok(commit)
    }
}

/// Statements refusing, inside a write call, a statement that changed other rows than the
/// batch expects, so the call can end with the batch's COMMIT (one hand-off to SQLite's
/// worker thread less per batch) and the commit still never follows an unexpected change.
#[derive(Clone, Copy)]
pub struct ChangedRowsCheck {
    /// Creates the objects `check` uses, once per connection.
    pub setup: &'static str,
    /// Follows a statement; fails (ending the call) unless that statement changed as many
    /// rows as its one parameter says.
    pub check: &'static str,
}

/// How a write batch on the [`BatchConnection`] starts from what this process committed last
/// ([`CommitCache`]) instead of reading: its first call begins the transaction and checks,
/// under the write lock, that no other connection committed since the batch connection last
/// read the keyspace (SQLite's `data_version`, which a connection's own commits leave
/// unchanged) and that no key it took for absent is live, then goes on with its writes and
/// COMMIT. One call per batch instead of a read call and a write call.
#[derive(Clone, Copy)]
pub struct UnreadBatch {
    /// Answers the batch connection's data version (one integer), inside its transaction.
    pub version: &'static str,
    /// Begins the transaction and fails with [`crate::error::UNREAD_BATCH_REFUSED`] unless
    /// the data version is still its first parameter and none of the keys named where it
    /// says `{keys}` (after the keyspace, its second parameter) has a live current row.
    pub begin_checked: &'static str,
}

/// A statement of a write batch, and how many rows it changes where that is known.
struct WriteStatement<'a> {
    query: &'static str,
    sql: Cow<'static, str>,
    args: Vec<Arg<'a>>,
    changes: Option<u64>,
}

/// The statements writing a batch: `supersede` marks the stored rows it replaced (or, with
/// `kv_past`, names them there: [`Dialect::WRITES_PAST_ROWS`]), then `pending` are inserted
/// and, with `kv_head`, become their keys' heads.
fn write_statements<'a, D: Dialect>(
    keyspace: KeyspaceId,
    supersede: &'a [StoredRow],
    pending: &'a [PendingRow],
) -> Vec<WriteStatement<'a>> {
    let mut statements = Vec::new();
    // Rows marked in `kv.superseded`; with `kv_past`, none.
    let marked = if D::PAST_TABLE { &[][..] } else { supersede };
    let (by_row_id, by_key): (Vec<&StoredRow>, Vec<&StoredRow>) = marked
        .iter()
        .partition(|row| row.row_id.is_some() && D::ROW_ID.is_some());
    let per_statement = if D::KEY_LISTS {
        MAX_ROWS_PER_STATEMENT
    } else {
        1
    };
    let per_row_id_statement = if D::ARRAYS {
        by_row_id.len().max(1)
    } else {
        MAX_ROWS_PER_STATEMENT
    };
    for (rows, per_statement, pad) in [
        (by_row_id, per_row_id_statement, false),
        (by_key, per_statement, D::KEY_LISTS),
    ] {
        let mut rest = rows.as_slice();
        // By key lists: one statement per chunk, padded like the lookups above (the
        // repeated last row names the same key and revision again).
        let sizes: Vec<usize> = if pad {
            rows.chunks(per_statement).map(<[_]>::len).collect()
        } else {
            chunk_sizes(rows.len(), per_statement).collect()
        };
        for size in sizes {
            let (chunk, tail) = rest.split_at(size);
            rest = tail;
            let mut named = chunk.to_vec();
            if pad && let Some(last) = chunk.last() {
                named.resize(size.next_power_of_two(), *last);
            }
            let (sql, args) = supersede_sql::<D>(keyspace, &named);
            statements.push(WriteStatement {
                query: "supersede",
                sql: Cow::Owned(sql),
                args,
                changes: Some(size as u64),
            });
        }
    }
    if D::ARRAYS {
        if !pending.is_empty() {
            let (sql, args) = insert_rows_unnest(keyspace, pending);
            statements.push(WriteStatement {
                query: "insert_kv",
                sql: Cow::Borrowed(sql),
                args,
                changes: None,
            });
        }
        return statements;
    }
    for run in insert_runs(pending) {
        for chunk in padded_or_split(run, false, |row| row.kv.key.len() + row.kv.value.len()) {
            let (sql, args) = insert_rows_values_sql::<D>(keyspace, &chunk.rows);
            statements.push(WriteStatement {
                query: "insert_kv",
                sql: Cow::Owned(sql),
                args,
                changes: Some(chunk.own as u64),
            });
        }
    }
    if D::PAST_TABLE && D::WRITES_PAST_ROWS {
        let pad = D::PADDED_INSERT.is_some();
        // The rows this batch supersedes, stored or its own, into `kv_past`; then each
        // written key's head moves once, to its newest row (the one nothing superseded).
        let mut past: Vec<PastRow<'_>> = supersede
            .iter()
            .filter_map(|row| {
                row.head.map(|head| PastRow {
                    key: &row.key,
                    head,
                    superseded: row.revision,
                })
            })
            .collect();
        past.extend(
            pending
                .iter()
                .filter(|row| row.superseded != CURRENT)
                .map(|row| PastRow {
                    key: &row.kv.key,
                    head: Head {
                        mod_revision: row.kv.mod_revision,
                        sub: row.sub,
                        deleted: row.deleted,
                    },
                    superseded: row.superseded,
                }),
        );
        for run in past.chunks(MAX_INSERT_ROWS) {
            for chunk in padded_or_split(run, pad, |row| row.key.len()) {
                let (sql, args) = insert_past_sql::<D>(keyspace, &chunk.rows);
                statements.push(WriteStatement {
                    query: "insert_past",
                    sql: Cow::Owned(sql),
                    args,
                    // A repeat counts as found (the connection's `CLIENT_FOUND_ROWS`).
                    changes: Some(chunk.rows.len() as u64),
                });
            }
        }
        let heads: Vec<&PendingRow> = pending
            .iter()
            .filter(|row| row.superseded == CURRENT)
            .collect();
        // A repeated head moves to where it already is: padding is harmless here.
        let chunks = heads
            .chunks(MAX_INSERT_ROWS)
            .flat_map(|run| padded_or_split(run, pad, |row| row.kv.key.len()));
        for chunk in chunks {
            let rows: Vec<&PendingRow> = chunk.rows.into_iter().copied().collect();
            let (sql, args) = place_heads_sql::<D>(keyspace, &rows);
            statements.push(WriteStatement {
                query: "place_heads",
                sql: Cow::Owned(sql),
                args,
                // MySQL counts a moved head twice, a new one once.
                changes: None,
            });
        }
    } else if D::PAST_TABLE {
        // Each new row becomes its key's head in turn, in the batch's order: the trigger on
        // `kv_head` moves the head each one replaces (stored, or the batch's own earlier row
        // of the key) to `kv_past`, superseded at the new row's revision.
        let rows: Vec<&PendingRow> = pending.iter().collect();
        let mut rest = rows.as_slice();
        for size in chunk_sizes(pending.len(), MAX_INSERT_ROWS) {
            let (chunk, tail) = rest.split_at(size);
            rest = tail;
            let (sql, args) = place_heads_sql::<D>(keyspace, chunk);
            statements.push(WriteStatement {
                query: "insert_kv",
                sql: Cow::Owned(sql),
                args,
                changes: Some(size as u64),
            });
        }
    }
    statements
}

/// One multi-row statement making each of `rows` (just inserted into `kv`) its key's head in
/// `kv_head`, one after another ([`Dialect::PAST_TABLE`]).
fn place_heads_sql<'a, D: Dialect>(
    keyspace: KeyspaceId,
    rows: &[&'a PendingRow],
) -> (String, Vec<Arg<'a>>) {
    let mut sql =
        String::from("INSERT INTO kv_head (keyspace, `key`, mod_revision, sub, deleted) VALUES ");
    sql.push_str(&vec!["(?, ?, ?, ?, ?)"; rows.len()].join(", "));
    sql.push_str(D::UPSERT_HEAD);
    let mut args = Vec::with_capacity(rows.len() * 5);
    for row in rows {
        args.extend([
            Arg::Int(keyspace),
            Arg::Bytes(&row.kv.key),
            Arg::Int(row.kv.mod_revision),
            Arg::Int(row.sub),
            Arg::Int(row.deleted as i64),
        ]);
    }
    (sql, args)
}

/// A row a write batch adds to `kv_past` ([`Dialect::WRITES_PAST_ROWS`]).
struct PastRow<'a> {
    key: &'a Bytes,
    head: Head,
    superseded: Revision,
}

/// One multi-row `INSERT` of `rows` into `kv_past`.
fn insert_past_sql<'a, D: Dialect>(
    keyspace: KeyspaceId,
    rows: &[&PastRow<'a>],
) -> (String, Vec<Arg<'a>>) {
    let mut sql = String::from(
        "INSERT INTO kv_past (keyspace, superseded, `key`, mod_revision, sub, deleted) VALUES ",
    );
    sql.push_str(&vec!["(?, ?, ?, ?, ?, ?)"; rows.len()].join(", "));
    sql.push_str(D::PADDED_INSERT.unwrap_or_default());
    let mut args = Vec::with_capacity(rows.len() * 6);
    for row in rows {
        args.extend([
            Arg::Int(keyspace),
            Arg::Int(row.superseded),
            Arg::Bytes(row.key),
            Arg::Int(row.head.mod_revision),
            Arg::Int(row.head.sub),
            Arg::Int(i64::from(row.head.deleted)),
        ]);
    }
    (sql, args)
}

/// One multi-row `INSERT` of `chunk` into `kv` (databases without array parameters; with
/// [`Dialect::PAST_TABLE`], without the `superseded` column).
fn insert_rows_values_sql<'a, D: Dialect>(
    keyspace: KeyspaceId,
    chunk: &[&'a PendingRow],
) -> (String, Vec<Arg<'a>>) {
    let (superseded, row) = if D::PAST_TABLE {
        ("", "(?, ?, ?, ?, ?, ?, ?, ?, ?)")
    } else {
        (", superseded", "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
    };
    let mut sql = format!(
        "INSERT INTO kv (keyspace, `key`, mod_revision, sub, create_revision, version, \
         lease, value, deleted{superseded}) VALUES "
    );
    for i in 0..chunk.len() {
        sql.push_str(if i == 0 { "" } else { ", " });
        sql.push_str(row);
    }
    let mut args = Vec::with_capacity(chunk.len() * 10);
    for row in chunk {
        args.extend([
            Arg::Int(keyspace),
            Arg::Bytes(&row.kv.key),
            Arg::Int(row.kv.mod_revision),
            Arg::Int(row.sub),
            Arg::Int(row.kv.create_revision),
            Arg::Int(row.kv.version),
            Arg::Int(row.kv.lease),
            Arg::Bytes(&row.kv.value),
            Arg::Int(row.deleted as i64),
        ]);
        if !D::PAST_TABLE {
            args.push(Arg::Int(row.superseded));
        }
    }
    (sql, args)
}

/// One statement appending every row of `rows`, as arrays of their columns, and pointing
/// each key's head at its newest one (PostgreSQL, [`Dialect::HEAD_TABLE`]).
fn insert_rows_unnest(keyspace: KeyspaceId, rows: &[PendingRow]) -> (&'static str, Vec<Arg<'_>>) {
    const SQL: &str = "WITH added AS (INSERT INTO kv (keyspace, `key`, mod_revision, sub, \
         create_revision, version, lease, value, deleted) SELECT ?, * FROM unnest(\
         CAST(? AS BYTEA[]), CAST(? AS BIGINT[]), CAST(? AS BIGINT[]), CAST(? AS BIGINT[]), \
         CAST(? AS BIGINT[]), CAST(? AS BIGINT[]), CAST(? AS BYTEA[]), CAST(? AS SMALLINT[])) \
         RETURNING keyspace, `key`, mod_revision, sub, deleted) \
         INSERT INTO kv_head AS h (keyspace, `key`, mod_revision, sub, deleted) \
         SELECT DISTINCT ON (`key`) * FROM added ORDER BY `key`, mod_revision DESC, sub DESC \
         ON CONFLICT (keyspace, `key`) DO UPDATE SET mod_revision = EXCLUDED.mod_revision, \
         sub = EXCLUDED.sub, deleted = EXCLUDED.deleted";
    let mut args = vec![Arg::Int(keyspace)];
    args.extend(row_arrays(rows));
    (SQL, args)
}

/// The columns of `rows` as arrays, in the order `kine_rs_commit` (migration 0008) and
/// [`insert_rows_unnest`] take them.
fn row_arrays(rows: &[PendingRow]) -> Vec<Arg<'_>> {
    let ints = |f: fn(&PendingRow) -> i64| Arg::Ints(rows.iter().map(f).collect());
    vec![
        Arg::ByteStrings(rows.iter().map(|row| row.kv.key.as_ref()).collect()),
        ints(|row| row.kv.mod_revision),
        ints(|row| row.sub),
        ints(|row| row.kv.create_revision),
        ints(|row| row.kv.version),
        ints(|row| row.kv.lease),
        Arg::ByteStrings(rows.iter().map(|row| row.kv.value.as_ref()).collect()),
        ints(|row| row.deleted as i64),
    ]
}

/// The bytes a live key-value counts for in the usage counters.
fn live_size(kv: &KeyValue) -> i64 {
    (kv.key.len() + kv.value.len()) as i64
}

#[async_trait]
impl<D: Dialect> WriteTxn for SqlWriteTxn<D> {
    fn state(&self) -> KeyspaceState {
        self.state
    }

    async fn prefetch(&mut self, keys: &[Bytes]) -> Result<()> {
        let keys: Vec<&[u8]> = keys.iter().map(|key| key.as_ref()).collect();
        self.load(&keys).await
    }

    async fn prefetch_absent(&mut self, keys: &[Bytes]) -> Result<()> {
        let keys: Vec<&[u8]> = keys.iter().map(|key| key.as_ref()).collect();
        // No rows: every key not known yet is recorded as having no current row.
        self.remember(&keys, &[], 0)
    }

    async fn get(&mut self, key: &[u8]) -> Result<Option<KeyValue>> {
        Ok(self.known(key).await?.live.clone())
    }

    async fn range(&mut self, query: RangeQuery<'_>) -> Result<RangeRows> {
        let at = (query.revision > 0).then_some(query.revision);
        if at.is_none() && query.range.end == RangeEnd::Single {
            let kv = self.get(&query.range.start).await?;
            let count = kv.is_some() as i64;
            let kvs = if query.count_only {
                Vec::new()
            } else {
                kv.into_iter().collect()
            };
            return Ok(RangeRows {
                revision: self.state.revision,
                kvs,
                count,
            });
        }
        self.flush().await?;
        let (kvs, count) =
            range_on::<D>(held::<D>(&mut self.tx)?, self.keyspace, &query, at, None).await?;
        // Not where the batch needs each row's place, which a range does not read.
        if at.is_none() && !query.keys_only && !query.count_only && !D::WRITES_PAST_ROWS {
            for kv in &kvs {
                self.known
                    .entry(kv.key.clone())
                    .or_insert_with(|| KnownKey {
                        live: Some(kv.clone()),
                        stored_current: true,
                        row_id: None,
                        stored_head: None,
                        pending: None,
                    });
            }
        }
        Ok(RangeRows {
            revision: self.state.revision,
            kvs,
            count,
        })
    }

    async fn written_since(
        &mut self,
        range: &KeyRange,
        after: Revision,
        limit: i64,
    ) -> Result<Option<Vec<Written>>> {
        // Compaction at C purges tombstones below C and rows superseded at or before C: a
        // write after `after` may be gone once C passes `after + 1`. (Purges take this lock,
        // so none runs while it is held.) A read from after this transaction's start cannot
        // be caught up either (a keyspace deleted and created again).
        if self.state.compact_revision > after || after > self.start.revision {
            return Ok(None);
        }
        self.flush().await?;
        // Every write of the keyspace after `after`, in order, by its primary key (keyspace,
        // mod_revision, sub); the range filters here, so no plan walks the range's keys.
        let rows = fetch_all::<D>(
            held::<D>(&mut self.tx)?,
            "written_since",
            "SELECT `key`, create_revision, mod_revision, deleted FROM kv \
             WHERE keyspace = ? AND mod_revision > ? ORDER BY mod_revision, sub LIMIT ?",
            &[
                Arg::Int(self.keyspace),
                Arg::Int(after),
                Arg::Int(limit.saturating_add(1)),
            ],
        )
        .await?;
        if rows.len() as i64 > limit {
            return Ok(None);
        }
        let mut seen = std::collections::HashSet::new();
        let mut written = Vec::new();
        for row in &rows {
            let key = Bytes::from(D::DB::bytes(row, 0)?);
            if !range.contains(&key) || !seen.insert(key.clone()) {
                continue;
            }
            // The key's first write after `after` tells what it was at `after`: a tombstone
            // is only written over a live key, and a put keeps the create revision of a live
            // key (a new key's create revision is the put's own).
            let live_before = D::DB::flag(row, 3)? || D::DB::int(row, 1)? < D::DB::int(row, 2)?;
            written.push(Written { key, live_before });
        }
        Ok(Some(written))
    }

    fn key_limit(&self) -> Option<(usize, &'static str)> {
        D::MAX_KEY_BYTES.map(|max| (max, D::DRIVER))
    }

    async fn put(&mut self, kv: &KeyValue, sub: i64) -> Result<()> {
        self.write(PendingRow {
            kv: kv.clone(),
            sub,
            deleted: false,
            superseded: CURRENT,
        })
        .await
    }

    async fn delete(&mut self, key: &[u8], revision: Revision, sub: i64) -> Result<()> {
        self.write(PendingRow {
            kv: KeyValue {
                key: Bytes::copy_from_slice(key),
                mod_revision: revision,
                ..KeyValue::default()
            },
            sub,
            deleted: true,
            superseded: CURRENT,
        })
        .await
    }

    async fn lease(&mut self, id: i64) -> Result<Option<LeaseRecord>> {
        self.lock().await?;
        // Locked, so a concurrent renewal cannot slip between an expiry's check and revoke.
        lease_on::<D>(held::<D>(&mut self.tx)?, self.keyspace, id, true).await
    }

    async fn max_lease_id(&mut self) -> Result<i64> {
        self.lock().await?;
        let row = fetch_optional::<D>(
            held::<D>(&mut self.tx)?,
            "lease_max",
            "SELECT COALESCE(MAX(id), 0) FROM leases WHERE keyspace = ?",
            &[Arg::Int(self.keyspace)],
        )
        .await?
        .ok_or_else(|| KineError::Storage("MAX returned no row".into()))?;
        D::DB::int(&row, 0)
    }

    async fn lease_count(&mut self) -> Result<i64> {
        self.lock().await?;
        let row = fetch_optional::<D>(
            held::<D>(&mut self.tx)?,
            "lease_count",
            "SELECT COUNT(*) FROM leases WHERE keyspace = ?",
            &[Arg::Int(self.keyspace)],
        )
        .await?
        .ok_or_else(|| KineError::Storage("COUNT returned no row".into()))?;
        D::DB::int(&row, 0)
    }

    async fn insert_lease(&mut self, lease: LeaseRecord) -> Result<()> {
        self.lock().await?;
        execute::<D>(
            held::<D>(&mut self.tx)?,
            "lease_insert",
            "INSERT INTO leases (keyspace, id, ttl, expires_at_ms) VALUES (?, ?, ?, ?)",
            &[
                Arg::Int(self.keyspace),
                Arg::Int(lease.id),
                Arg::Int(lease.ttl),
                Arg::Int(lease.expires_at_ms),
            ],
        )
        .await?;
        Ok(())
    }

    async fn delete_lease(&mut self, id: i64) -> Result<()> {
        self.lock().await?;
        execute::<D>(
            held::<D>(&mut self.tx)?,
            "lease_delete",
            "DELETE FROM leases WHERE keyspace = ? AND id = ?",
            &[Arg::Int(self.keyspace), Arg::Int(id)],
        )
        .await?;
        Ok(())
    }

    async fn lease_keys(&mut self, id: i64) -> Result<Vec<Bytes>> {
        self.flush().await?;
        lease_keys_on::<D>(held::<D>(&mut self.tx)?, self.keyspace, id).await
    }

    async fn set_compact_revision(&mut self, revision: Revision) -> Result<()> {
        self.lock().await?;
        execute::<D>(
            held::<D>(&mut self.tx)?,
            "compact",
            "UPDATE keyspaces SET compact_revision = ? WHERE id = ?",
            &[Arg::Int(revision), Arg::Int(self.keyspace)],
        )
        .await?;
        self.state.compact_revision = revision;
        Ok(())
    }

    async fn set_frozen(&mut self, frozen: bool) -> Result<()> {
        if frozen == self.state.frozen {
            return Ok(());
        }
        self.lock().await?;
        let now = now_ms();
        if !frozen && self.state.frozen_at_ms > 0 {
            // Expiry was paused: every deadline moves by the time spent frozen, but no lease
            // gets more than its TTL from now (one renewed while frozen already has it).
            let paused = (now - self.state.frozen_at_ms).max(0);
            execute::<D>(
                held::<D>(&mut self.tx)?,
                "unfreeze_leases",
                "UPDATE leases SET expires_at_ms = CASE \
                 WHEN expires_at_ms + ? < ? + ttl * 1000 THEN expires_at_ms + ? \
                 ELSE ? + ttl * 1000 END WHERE keyspace = ?",
                &[
                    Arg::Int(paused),
                    Arg::Int(now),
                    Arg::Int(paused),
                    Arg::Int(now),
                    Arg::Int(self.keyspace),
                ],
            )
            .await?;
        }
        let frozen_at = if frozen { now } else { 0 };
        execute::<D>(
            held::<D>(&mut self.tx)?,
            "freeze",
            "UPDATE keyspaces SET frozen = ?, frozen_at_ms = ? WHERE id = ?",
            &[
                Arg::Int(frozen as i64),
                Arg::Int(frozen_at),
                Arg::Int(self.keyspace),
            ],
        )
        .await?;
        self.state.frozen = frozen;
        self.state.frozen_at_ms = frozen_at;
        Ok(())
    }

    async fn set_migration(
        &mut self,
        role: MigrationRole,
        pinned_revision: Revision,
        record: Option<&str>,
    ) -> Result<()> {
        self.lock().await?;
        let args = [
            Arg::Int(role.code()),
            Arg::Int(pinned_revision),
            Arg::Int(self.keyspace),
        ];
        let sql = match record {
            Some(_) => {
                "UPDATE keyspaces SET migration_role = ?, pinned_revision = ?, migration = ? \
                 WHERE id = ?"
            }
            None => {
                "UPDATE keyspaces SET migration_role = ?, pinned_revision = ?, migration = NULL \
                 WHERE id = ?"
            }
        };
        let args: Vec<Arg<'_>> = match record {
            Some(record) => vec![
                args[0].clone(),
                args[1].clone(),
                Arg::Text(record),
                args[2].clone(),
            ],
            None => args.to_vec(),
        };
        execute::<D>(held::<D>(&mut self.tx)?, "migration", sql, &args).await?;
        self.state.migration = role;
        self.state.pinned_revision = pinned_revision;
        Ok(())
    }

    async fn set_quota(&mut self, quota: Quota) -> Result<()> {
        self.lock().await?;
        execute::<D>(
            held::<D>(&mut self.tx)?,
            "quota",
            "UPDATE keyspaces SET quota_keys = ?, quota_bytes = ? WHERE id = ?",
            &[
                Arg::Int(quota.keys),
                Arg::Int(quota.bytes),
                Arg::Int(self.keyspace),
            ],
        )
        .await?;
        self.state.quota = quota;
        Ok(())
    }

    async fn commit(mut self: Box<Self>, revision: Revision) -> Result<()> {
        // Without the lock, unless a superseded row is known only by key (read by a range)
        // and must be rewritten.
        if self.tx.is_none()
            && self.unbegun.is_none()
            && (D::HEAD_TABLE || self.supersede.iter().all(|row| row.row_id.is_some()))
        {
            return self.commit_unlocked(revision).await;
        }
        // On the batch connection, with the data version it read at (or started from), the
        // commit is remembered for the next batch to start from ([`UnreadBatch`]).
        let remember = self
            .read_version
            .clone()
            .filter(|_| self.unbegun.is_some() || matches!(self.tx, Some(WriteTx::Own(_))));
        if remember.is_none()
            && let Some(cache) = &self.cache
        {
            cache.forget(self.keyspace);
        }
        let counters = if revision != self.start.revision
            || self.state.keys != self.start.keys
            || self.state.bytes != self.start.bytes
        {
            // New revisions are announced by the same statement that stores them.
            let announce = D::ANNOUNCE_UPDATE.filter(|_| revision != self.start.revision);
            let sql = format!(
                "UPDATE keyspaces SET revision = ?, keys_count = ?, bytes_used = ? WHERE id = ?{}",
                announce.unwrap_or_default()
            );
            let args = vec![
                Arg::Int(revision),
                Arg::Int(self.state.keys),
                Arg::Int(self.state.bytes),
                Arg::Int(self.keyspace),
            ];
            Some(("revision", sql, args))
        } else {
            None
        };
        let committed = match self.flush_then(counters, true).await {
            Ok(committed) => committed,
            Err(error) => {
                if remember.is_some() {
                    self.refuse_unread(&error);
                }
                return Err(error);
            }
        };
        let tx = self
            .tx
            .take()
            .ok_or_else(|| KineError::Storage("a write transaction lost its lock".into()))?;
        if committed {
            tx.committed();
        } else if let Err(error) = tx.commit().await {
            if let Some(cache) = &self.cache {
                cache.forget(self.keyspace);
            }
            return Err(error);
        }
        if let (Some(version), Some(cache)) = (remember, &self.cache) {
            // The connection's own commit leaves its data version as it was.
            let mut state = self.state;
            state.revision = revision;
            let keys = self.known.drain().map(|(key, known)| {
                let cached = CachedKey {
                    live: known.live,
                    stored_current: known.stored_current || known.pending.is_some(),
                };
                (key, cached)
            });
            cache.store(self.keyspace, &version, version.clone(), state, keys);
        }
        Ok(())
    }
}

/// The version an [`UnreadBatch`] batch is cached at: the batch connection's generation and
/// its data version.
fn unread_version(generation: u64, data_version: i64) -> String {
    format!("{generation}:{data_version}")
}

/// The generation and data version of [`unread_version`]'s text.
fn parse_unread_version(version: &str) -> Option<(u64, i64)> {
    let (generation, data_version) = version.split_once(':')?;
    Some((generation.parse().ok()?, data_version.parse().ok()?))
}

/// The connection of a write transaction that holds the keyspace lock.
fn held<D: Dialect>(tx: &mut Option<WriteTx<D>>) -> Result<&mut Conn<D>> {
    match tx {
        Some(tx) => tx.conn(),
        None => Err(KineError::Storage(
            "a write statement ran without the keyspace lock".into(),
        )),
    }
}

/// The connection a write transaction reads on: its transaction's, or, before it took the
/// lock, the one it reads on outside a transaction.
fn reader<'a, D: Dialect>(
    tx: &'a mut Option<WriteTx<D>>,
    conn: &'a mut Option<PoolConnection<D::DB>>,
) -> Result<&'a mut Conn<D>> {
    match (tx, conn) {
        (Some(tx), _) => tx.conn(),
        (None, Some(conn)) => Ok(&mut **conn),
        (None, None) => Err(KineError::Storage(
            "a write transaction has no connection".into(),
        )),
    }
}
