//! A migration source that reads **k3s-io/kine's own schema**: the `kine` table kine writes
//! in PostgreSQL, MySQL/MariaDB and SQLite (`--from kine+postgres://…`, `kine+mysql://…`,
//! `kine+sqlite://PATH`).
//!
//! What kine's table holds (kine v0.17, `pkg/drivers/generic`, `pkg/logstructured/sqllog`):
//! one row per write, `id` its revision (auto-increment; a revision whose insert rolled back is
//! filled by kine with a row named `gap-<id>`, which is not an event); `name` the key,
//! `created` = 1 for a key's first row, `deleted` = 1 for a tombstone, `create_revision` the
//! key's create revision (0/NULL on a created row, whose create revision is its own id),
//! `prev_revision` the row it superseded, `lease` the lease's TTL in seconds (kine's lease id
//! *is* its TTL), `value`, `old_value`. The current revision is `MAX(id)`; the row named
//! `compact_rev_key` is kine's own record of its compaction revision (in `prev_revision`,
//! updated in place), and `compact_rev_key_apiserver` stores what kube-apiserver sees as
//! `compact_rev_key`, its version encoded in the value as `VERSION|VALUE`. kine keeps no key
//! versions (it answers 0); this source gives each key the number of its rows kine still
//! holds since its creation (etcd's version where kine has not compacted that key's history,
//! less where it has), the same number on every read, so the copy verifies.
//!
//! Pin and freeze are triggers on the table, i.e. facts in the datastore that every kine
//! process sharing it obeys: the **pin** refuses the `UPDATE` of `compact_rev_key` with which
//! kine's compaction begins (so its compaction transaction fails and is retried later); the
//! **freeze** refuses every `INSERT` (kine writes only by inserting: puts, deletes, lease
//! expiry, gap fills), and after the switch it is replaced by one whose message names the
//! target ("moved to …"). Trigger and table names are validated and quoted; the message is
//! reduced to a safe alphabet before it is put in SQL.

use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::mysql::{MySqlPool, MySqlPoolOptions};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use thiserror::Error;

use crate::error::{KineError, Result};
use crate::model::{Event, EventType, KeyValue, LeaseRecord, Revision, now_ms};
use crate::storage::Quota;

use super::MigrateError;
use super::source::{Source, SourceState};

/// kine's compaction record.
const COMPACT_KEY: &str = "compact_rev_key";
/// Where kine keeps kube-apiserver's `compact_rev_key`.
const COMPACT_API_KEY: &str = "compact_rev_key_apiserver";

/// Why a kine table cannot be read.
#[derive(Debug, Error)]
pub enum KineSourceError {
    #[error(
        "{0:?} is not a table name kine-rs accepts (letters, digits and _, at most 40, not \
         starting with a digit)"
    )]
    BadTable(String),
    #[error(
        "a kine endpoint is kine+postgres://..., kine+mysql://... or kine+sqlite://PATH, not {0:?}"
    )]
    BadEndpoint(String),
    #[error("cannot connect to the kine database: {0}")]
    Connect(String),
    #[error(
        "table {table:?} is not kine's table (columns id, name, created, deleted, \
         create_revision, prev_revision, lease, value, old_value): {reason}"
    )]
    NotKine { table: String, reason: String },
}

/// The database kine uses.
#[derive(Clone)]
enum Db {
    Postgres(PgPool),
    Mysql(MySqlPool),
    Sqlite(SqlitePool),
}

/// One row of kine's table, as this source reads it.
type Row = (i64, String, i64, i64, i64, i64, Option<Vec<u8>>, i64);

/// kine's table, read as a migration source.
pub struct KineSource {
    db: Db,
    table: String,
    /// Live keys and their bytes, counted once (they only feed the plan and the progress).
    usage: Mutex<Option<(i64, i64)>>,
}

/// Whether `endpoint` names kine's schema.
pub fn is_kine_endpoint(endpoint: &str) -> bool {
    endpoint.starts_with("kine+")
}

/// Checks a table name: it is pasted into SQL (quoted), so only a safe alphabet passes.
pub fn validate_table(table: &str) -> Result<(), KineSourceError> {
    let mut chars = table.chars();
    let ok = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && table.len() <= 40;
    if ok {
        Ok(())
    } else {
        Err(KineSourceError::BadTable(table.to_string()))
    }
}

/// A message safe to put between single quotes in SQL (and in PL/pgSQL's `RAISE`, where `%`
/// is special): anything outside a small alphabet becomes `_`; at most 128 characters
/// (MySQL's limit for `MESSAGE_TEXT`).
fn safe_message(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || " :/@.,=&*()+-_[]".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(128)
        .collect()
}

impl KineSource {
    /// Opens kine's `table` at `endpoint` (`kine+postgres://…`, `kine+mysql://…`,
    /// `kine+sqlite://PATH`) and checks that the table has kine's columns.
    pub async fn open(endpoint: &str, table: &str) -> Result<Self, KineSourceError> {
        validate_table(table)?;
        let rest = endpoint
            .strip_prefix("kine+")
            .ok_or_else(|| KineSourceError::BadEndpoint(endpoint.to_string()))?;
        let connect = |e: sqlx::Error| KineSourceError::Connect(e.to_string());
        let db = if rest.starts_with("postgres://") || rest.starts_with("postgresql://") {
            Db::Postgres(
                PgPoolOptions::new()
                    .max_connections(4)
                    .acquire_timeout(std::time::Duration::from_secs(10))
                    .connect(rest)
                    .await
                    .map_err(connect)?,
            )
        } else if rest.starts_with("mysql://") {
            Db::Mysql(
                MySqlPoolOptions::new()
                    .max_connections(4)
                    .acquire_timeout(std::time::Duration::from_secs(10))
                    .connect(rest)
                    .await
                    .map_err(connect)?,
            )
        } else if let Some(path) = rest.strip_prefix("sqlite://") {
            if !std::path::Path::new(path).exists() {
                return Err(KineSourceError::Connect(format!("{path}: no such file")));
            }
            let options = SqliteConnectOptions::new()
                .filename(path)
                .create_if_missing(false)
                .busy_timeout(std::time::Duration::from_secs(10));
            Db::Sqlite(
                SqlitePoolOptions::new()
                    .max_connections(2)
                    .connect_with(options)
                    .await
                    .map_err(connect)?,
            )
        } else {
            return Err(KineSourceError::BadEndpoint(endpoint.to_string()));
        };
        let source = KineSource {
            db,
            table: table.to_string(),
            usage: Mutex::new(None),
        };
        let probe = format!(
            "SELECT id, name, created, deleted, create_revision, prev_revision, lease, value, \
             old_value FROM {} WHERE 1 = 0",
            source.quoted()
        );
        source
            .exec(&probe)
            .await
            .map_err(|e| KineSourceError::NotKine {
                table: table.to_string(),
                reason: e.to_string(),
            })?;
        Ok(source)
    }

    fn quoted(&self) -> String {
        match self.db {
            Db::Mysql(_) => format!("`{}`", self.table),
            _ => format!("\"{}\"", self.table),
        }
    }

    fn trigger(&self, what: &str) -> String {
        format!("{}_kine_rs_{what}", self.table)
    }

    fn quoted_trigger(&self, what: &str) -> String {
        match self.db {
            Db::Mysql(_) => format!("`{}`", self.trigger(what)),
            _ => format!("\"{}\"", self.trigger(what)),
        }
    }

    /// An integer expression of the database's 64-bit signed type.
    fn int(&self, expr: &str) -> String {
        match self.db {
            Db::Postgres(_) => format!("CAST({expr} AS BIGINT)"),
            Db::Mysql(_) => format!("CAST({expr} AS SIGNED)"),
            Db::Sqlite(_) => format!("CAST({expr} AS INTEGER)"),
        }
    }

    /// A name compared and ordered byte-wise (kine's MySQL column is case-insensitive).
    fn bytewise(&self, column: &str) -> String {
        match self.db {
            Db::Mysql(_) => format!("BINARY {column}"),
            _ => column.to_string(),
        }
    }

    /// `a.name = b.name`, exactly.
    fn same_name(&self, a: &str, b: &str) -> String {
        match self.db {
            Db::Mysql(_) => format!("{a}.name = {b}.name AND BINARY {a}.name = BINARY {b}.name"),
            _ => format!("{a}.name = {b}.name"),
        }
    }

    /// `?` placeholders in PostgreSQL's `$n` form.
    fn placeholders(&self, sql: &str) -> String {
        if !matches!(self.db, Db::Postgres(_)) {
            return sql.to_string();
        }
        let mut out = String::with_capacity(sql.len() + 8);
        let mut n = 0;
        for c in sql.chars() {
            if c == '?' {
                n += 1;
                out.push_str(&format!("${n}"));
            } else {
                out.push(c);
            }
        }
        out
    }

    /// The columns of a [`Row`], from table alias `k`.
    fn columns(&self) -> String {
        let t = self.quoted();
        let create = "CASE WHEN COALESCE(k.created, 0) <> 0 OR COALESCE(k.create_revision, 0) = 0 \
                      THEN k.id ELSE k.create_revision END";
        format!(
            "{}, k.name, {}, {}, {}, {}, k.value, {}",
            self.int("k.id"),
            self.int("COALESCE(k.created, 0)"),
            self.int("COALESCE(k.deleted, 0)"),
            self.int(create),
            self.int("COALESCE(k.lease, 0)"),
            self.int(&format!(
                "(SELECT COUNT(*) FROM {t} v WHERE {} AND v.id >= ({create}) AND v.id <= k.id)",
                self.same_name("v", "k")
            )),
        )
    }

    /// Runs a statement without results.
    async fn exec(&self, sql: &str) -> Result<()> {
        match &self.db {
            Db::Postgres(pool) => sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(pool)
                .await
                .map(|_| ()),
            Db::Mysql(pool) => sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(pool)
                .await
                .map(|_| ()),
            Db::Sqlite(pool) => sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(pool)
                .await
                .map(|_| ()),
        }
        .map_err(KineError::from)
    }

    /// Rows of a query with integer and text binds.
    async fn rows(&self, sql: &str, binds: &[Bind<'_>]) -> Result<Vec<Row>> {
        let sql = self.placeholders(sql);
        macro_rules! run {
            ($pool:expr) => {{
                let mut query = sqlx::query_as::<_, Row>(sqlx::AssertSqlSafe(sql.as_str()));
                for bind in binds {
                    query = match bind {
                        Bind::Int(n) => query.bind(*n),
                        Bind::Text(s) => query.bind(*s),
                    };
                }
                query.fetch_all($pool).await
            }};
        }
        match &self.db {
            Db::Postgres(pool) => run!(pool),
            Db::Mysql(pool) => run!(pool),
            Db::Sqlite(pool) => run!(pool),
        }
        .map_err(KineError::from)
    }

    /// Two integers of a one-row query.
    async fn pair(&self, sql: &str) -> Result<(i64, i64)> {
        match &self.db {
            Db::Postgres(pool) => {
                sqlx::query_as::<_, (i64, i64)>(sqlx::AssertSqlSafe(sql))
                    .fetch_one(pool)
                    .await
            }
            Db::Mysql(pool) => {
                sqlx::query_as::<_, (i64, i64)>(sqlx::AssertSqlSafe(sql))
                    .fetch_one(pool)
                    .await
            }
            Db::Sqlite(pool) => {
                sqlx::query_as::<_, (i64, i64)>(sqlx::AssertSqlSafe(sql))
                    .fetch_one(pool)
                    .await
            }
        }
        .map_err(KineError::from)
    }

    /// The current and the compaction revision.
    async fn revisions(&self) -> Result<(Revision, Revision)> {
        let t = self.quoted();
        self.pair(&format!(
            "SELECT {}, {} FROM (SELECT 1 AS one) AS x",
            self.int(&format!("COALESCE((SELECT MAX(id) FROM {t}), 0)")),
            self.int(&format!(
                "COALESCE((SELECT MAX(prev_revision) FROM {t} WHERE name = '{COMPACT_KEY}'), 0)"
            )),
        ))
        .await
    }

    /// The names of this table's triggers made by kine-rs.
    async fn triggers(&self) -> Result<Vec<String>> {
        let names: std::result::Result<Vec<(String,)>, sqlx::Error> = match &self.db {
            Db::Postgres(pool) => {
                sqlx::query_as(
                    "SELECT CAST(tgname AS TEXT) FROM pg_trigger \
                     WHERE tgrelid = to_regclass($1) AND NOT tgisinternal",
                )
                .bind(self.quoted())
                .fetch_all(pool)
                .await
            }
            Db::Mysql(pool) => {
                sqlx::query_as(
                    "SELECT CAST(TRIGGER_NAME AS CHAR) FROM information_schema.TRIGGERS \
                     WHERE EVENT_OBJECT_SCHEMA = DATABASE() AND EVENT_OBJECT_TABLE = ?",
                )
                .bind(&self.table)
                .fetch_all(pool)
                .await
            }
            Db::Sqlite(pool) => {
                sqlx::query_as(
                    "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ?",
                )
                .bind(&self.table)
                .fetch_all(pool)
                .await
            }
        };
        Ok(names
            .map_err(KineError::from)?
            .into_iter()
            .map(|(name,)| name)
            .collect())
    }

    async fn has_trigger(&self, what: &str) -> Result<bool> {
        let name = self.trigger(what);
        Ok(self.triggers().await?.contains(&name))
    }

    async fn drop_trigger(&self, what: &str) -> Result<()> {
        let trigger = self.quoted_trigger(what);
        match self.db {
            Db::Postgres(_) => {
                // (Without the notices PostgreSQL sends for what does not exist.)
                self.exec(&format!(
                    "SET client_min_messages = warning; \
                     DROP TRIGGER IF EXISTS {trigger} ON {}; DROP FUNCTION IF EXISTS {trigger}()",
                    self.quoted()
                ))
                .await
            }
            _ => {
                self.exec(&format!("DROP TRIGGER IF EXISTS {trigger}"))
                    .await
            }
        }
    }

    /// Creates trigger `what`, refusing `event` ("INSERT" or "UPDATE") with `message`, only
    /// for rows matching `when` (a condition on `OLD`/`NEW`) if given.
    async fn create_trigger(
        &self,
        what: &str,
        event: &str,
        when: Option<&str>,
        message: &str,
    ) -> Result<()> {
        self.drop_trigger(what).await?;
        let (trigger, table) = (self.quoted_trigger(what), self.quoted());
        let message = safe_message(message);
        let sql = match self.db {
            Db::Postgres(_) => format!(
                "CREATE FUNCTION {trigger}() RETURNS trigger LANGUAGE plpgsql AS \
                 $kine_rs$ BEGIN RAISE EXCEPTION '{message}'; END $kine_rs$; \
                 CREATE TRIGGER {trigger} BEFORE {event} ON {table} FOR EACH ROW {} \
                 EXECUTE FUNCTION {trigger}()",
                when.map(|w| format!("WHEN ({w})")).unwrap_or_default()
            ),
            Db::Mysql(_) => {
                let signal = format!("SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = '{message}'");
                let body = match when {
                    Some(w) => format!("BEGIN IF {w} THEN {signal}; END IF; END"),
                    None => signal,
                };
                format!("CREATE TRIGGER {trigger} BEFORE {event} ON {table} FOR EACH ROW {body}")
            }
            Db::Sqlite(_) => format!(
                "CREATE TRIGGER {trigger} BEFORE {event} ON {table} {} \
                 BEGIN SELECT RAISE(ABORT, '{message}'); END",
                when.map(|w| format!("WHEN {w}")).unwrap_or_default()
            ),
        };
        self.exec(&sql).await
    }

    /// A row as a key-value (kine's apiserver compaction record under the name clients see).
    fn key_value(row: &Row) -> Option<KeyValue> {
        let (id, name, _created, _deleted, create_revision, lease, value, count) = row;
        if name == COMPACT_KEY || name.starts_with("gap-") {
            return None;
        }
        let value = value.clone().unwrap_or_default();
        let (key, version, value) = if name == COMPACT_API_KEY {
            let (version, value) = decode_version(&value);
            (COMPACT_KEY.to_string(), version, value)
        } else {
            (name.clone(), *count, value)
        };
        Some(KeyValue {
            key: Bytes::from(key.into_bytes()),
            create_revision: *create_revision,
            mod_revision: *id,
            version,
            value: Bytes::from(value),
            lease: *lease,
        })
    }
}

/// A bind parameter.
enum Bind<'a> {
    Int(i64),
    Text(&'a str),
}

/// kine's `DecodeVersion`: `VERSION|VALUE`, or an old-style bare version with value "0".
fn decode_version(value: &[u8]) -> (i64, Vec<u8>) {
    let parse = |digits: &[u8]| {
        std::str::from_utf8(digits)
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
            .unwrap_or(0)
    };
    match value.iter().position(|b| *b == b'|') {
        Some(at) => (parse(&value[..at]), value[at + 1..].to_vec()),
        None => (parse(value), b"0".to_vec()),
    }
}

#[async_trait]
impl Source for KineSource {
    fn history_is_final(&self) -> bool {
        // kine's ids are auto-increment: one may commit after a higher one was read.
        false
    }

    fn describe(&self) -> String {
        let driver = match self.db {
            Db::Postgres(_) => "PostgreSQL",
            Db::Mysql(_) => "MySQL",
            Db::Sqlite(_) => "SQLite",
        };
        format!("kine's table {:?} in {driver}", self.table)
    }

    async fn state(&self) -> Result<SourceState> {
        let (revision, compact) = self.revisions().await?;
        let triggers = self.triggers().await?;
        let has = |what: &str| triggers.contains(&self.trigger(what));
        let usage = *self.usage.lock().unwrap_or_else(|e| e.into_inner());
        let (keys, bytes) = match usage {
            Some(usage) => usage,
            None => {
                let t = self.quoted();
                let usage = self
                    .pair(&format!(
                        "SELECT {}, {} FROM {t} k WHERE COALESCE(k.deleted, 0) = 0 \
                         AND k.name <> '{COMPACT_KEY}' AND k.name NOT LIKE 'gap-%' \
                         AND k.id = (SELECT MAX(m.id) FROM {t} m WHERE {})",
                        self.int("COUNT(*)"),
                        self.int("COALESCE(SUM(LENGTH(k.name) + COALESCE(LENGTH(k.value), 0)), 0)"),
                        self.same_name("m", "k"),
                    ))
                    .await?;
                *self.usage.lock().unwrap_or_else(|e| e.into_inner()) = Some(usage);
                usage
            }
        };
        Ok(SourceState {
            revision: revision.max(1),
            // kine starts its record at 0: never compacted.
            compact_revision: if compact > 0 { compact } else { -1 },
            keys,
            bytes,
            frozen: has("freeze") || has("moved"),
            // kine's lease expiry is per key and in memory; the copy's leases start at the
            // switch (see `leases`), so there is no pause to make up for.
            frozen_at_ms: 0,
            moved: has("moved"),
            pinned: has("pin"),
            quota: Quota::default(),
        })
    }

    async fn recover(&self) -> Result<()> {
        if self.has_trigger("freeze").await? && !self.has_trigger("moved").await? {
            self.drop_trigger("freeze").await?;
        }
        Ok(())
    }

    async fn pin(&self, target: &str) -> Result<Revision> {
        // Taking the trigger waits for a compaction in progress; once it exists, kine's
        // compaction fails at its first statement.
        self.create_trigger(
            "pin",
            "UPDATE",
            Some(&format!("OLD.name = '{COMPACT_KEY}'")),
            &format!("kine-rs: compaction is held while this datastore is copied to {target}"),
        )
        .await?;
        let (_, compact) = self.revisions().await?;
        Ok(compact.max(1))
    }

    async fn can_resume(&self, snapshot: Revision) -> Result<bool> {
        let (_, compact) = self.revisions().await?;
        Ok(self.has_trigger("pin").await? && compact.max(1) == snapshot)
    }

    async fn page(
        &self,
        revision: Revision,
        after: Option<&[u8]>,
        limit: i64,
    ) -> Result<Vec<KeyValue>> {
        // The apiserver's record is stored as `compact_rev_key_apiserver` and shown as
        // `compact_rev_key`: a page after it goes on after its stored name.
        let after = match after {
            Some(key) if key == COMPACT_KEY.as_bytes() => COMPACT_API_KEY.to_string(),
            Some(key) => String::from_utf8(key.to_vec())
                .map_err(|_| KineError::Storage("a kine key that is not UTF-8".into()))?,
            None => String::new(),
        };
        let t = self.quoted();
        let sql = format!(
            "SELECT {} FROM {t} k WHERE {} > ? AND k.id <= ? AND COALESCE(k.deleted, 0) = 0 \
             AND k.name <> '{COMPACT_KEY}' AND k.name NOT LIKE 'gap-%' \
             AND k.id = (SELECT MAX(m.id) FROM {t} m WHERE {} AND m.id <= ?) \
             ORDER BY {} LIMIT ?",
            self.columns(),
            self.bytewise("k.name"),
            self.same_name("m", "k"),
            self.bytewise("k.name"),
        );
        let rows = self
            .rows(
                &sql,
                &[
                    Bind::Text(&after),
                    Bind::Int(revision),
                    Bind::Int(revision),
                    Bind::Int(limit.max(1)),
                ],
            )
            .await?;
        let mut page = Vec::with_capacity(rows.len());
        for row in &rows {
            // Keys between the two names of the record would be out of order once it is
            // renamed; kube-apiserver writes none, and they are refused rather than misplaced.
            if row.1.as_str() > COMPACT_KEY && row.1.as_str() < COMPACT_API_KEY {
                return Err(KineError::Unsupported(
                    "keys sorting between compact_rev_key and compact_rev_key_apiserver in a \
                     kine table",
                ));
            }
            if let Some(kv) = Self::key_value(row) {
                page.push(kv);
            }
        }
        Ok(page)
    }

    async fn events(&self, after: Revision, up_to: Revision) -> Result<Vec<Event>> {
        let t = self.quoted();
        let sql = format!(
            "SELECT {} FROM {t} k WHERE k.id > ? AND k.id <= ? ORDER BY k.id",
            self.columns()
        );
        let rows = self
            .rows(&sql, &[Bind::Int(after), Bind::Int(up_to)])
            .await?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                let kv = Self::key_value(row)?;
                Some(if row.3 != 0 {
                    Event {
                        r#type: EventType::Delete as i32,
                        kv: Some(KeyValue {
                            key: kv.key,
                            mod_revision: kv.mod_revision,
                            ..Default::default()
                        }),
                        prev_kv: None,
                    }
                } else {
                    Event {
                        r#type: EventType::Put as i32,
                        kv: Some(kv),
                        prev_kv: None,
                    }
                })
            })
            .collect())
    }

    async fn leases(&self) -> Result<Vec<LeaseRecord>> {
        // kine's lease id is its TTL, and each key expires that long after kine (re)learns of
        // it; the copy gets one lease per TTL, starting afresh at the switch, as after a
        // restart of kine.
        let t = self.quoted();
        let sql = format!(
            "SELECT DISTINCT {} , {} FROM {t} k WHERE COALESCE(k.lease, 0) > 0 \
             AND COALESCE(k.deleted, 0) = 0 AND k.name NOT LIKE 'gap-%' \
             AND k.id = (SELECT MAX(m.id) FROM {t} m WHERE {})",
            self.int("k.lease"),
            self.int("0"),
            self.same_name("m", "k"),
        );
        let ttls: Vec<(i64, i64)> = match &self.db {
            Db::Postgres(pool) => {
                sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str()))
                    .fetch_all(pool)
                    .await
            }
            Db::Mysql(pool) => {
                sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str()))
                    .fetch_all(pool)
                    .await
            }
            Db::Sqlite(pool) => {
                sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str()))
                    .fetch_all(pool)
                    .await
            }
        }
        .map_err(KineError::from)?;
        let now = now_ms();
        let mut leases: Vec<LeaseRecord> = ttls
            .into_iter()
            .map(|(ttl, _)| LeaseRecord {
                id: ttl,
                ttl,
                expires_at_ms: now + ttl * 1000,
            })
            .collect();
        leases.sort_by_key(|lease| lease.id);
        Ok(leases)
    }

    async fn freeze(&self, target: &str) -> Result<SourceState> {
        // Creating the trigger waits for the inserts in progress (they hold the table); every
        // later insert is refused, so MAX(id) read after it is final.
        self.create_trigger(
            "freeze",
            "INSERT",
            None,
            &format!("kine-rs: this datastore is frozen while it moves to {target}"),
        )
        .await?;
        self.state().await
    }

    async fn check_frozen(
        &self,
        final_revision: Revision,
    ) -> std::result::Result<(), MigrateError> {
        let (revision, _) = self.revisions().await.map_err(MigrateError::Source)?;
        if revision > final_revision {
            return Err(MigrateError::SourceWritten {
                final_revision,
                what: format!("kine's table reached revision {revision}"),
            });
        }
        Ok(())
    }

    async fn release(&self, keep_pin: bool) -> Result<()> {
        if self.has_trigger("moved").await? {
            return Ok(());
        }
        self.drop_trigger("freeze").await?;
        if !keep_pin {
            self.drop_trigger("pin").await?;
        }
        Ok(())
    }

    async fn mark_moved(&self, target: &str) -> Result<()> {
        // The moved trigger first, then the freeze goes: inserts are refused throughout.
        self.create_trigger(
            "moved",
            "INSERT",
            None,
            &format!("kine-rs: this datastore was moved to {target} (kept read-only)"),
        )
        .await?;
        self.drop_trigger("freeze").await?;
        self.drop_trigger("pin").await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_and_messages_are_safe() {
        assert!(validate_table("kine").is_ok());
        assert!(validate_table("kine_2").is_ok());
        for bad in ["", "1kine", "kine;drop", "ki\"ne", "k`", &"k".repeat(41)] {
            assert!(validate_table(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            safe_message("to postgres://***@db:5432/x?sslmode=y'; --%"),
            "to postgres://***@db:5432/x_sslmode=y__ --_"
        );
    }

    #[test]
    fn kines_version_encoding() {
        assert_eq!(decode_version(b"3|12345"), (3, b"12345".to_vec()));
        assert_eq!(decode_version(b"7"), (7, b"0".to_vec()));
        assert_eq!(decode_version(b""), (0, b"0".to_vec()));
    }
}
