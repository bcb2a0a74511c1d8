//! SQLite, the embedded default backend (and `memory://`, an SQLite file in a throwaway
//! directory).
//!
//! One dedicated connection writes (SQLite has one writer anyway, and keeping it private lets
//! a write transaction span several etcd transactions: group commit); a pool of connections
//! reads from WAL snapshots concurrently with it.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Connection, Row};
use tokio::sync::{Mutex, OwnedMutexGuard};

use super::{Backend, BackendOptions, KeyspaceId, KeyspaceState, RangeQuery, RangeRows, WriteTxn};
use crate::error::{KineError, Result};
use crate::model::{Event, EventType, KeyRange, KeyValue, LeaseRecord, Revision, tombstone};

/// Marks a current row in `kv.superseded`.
const CURRENT: i64 = i64::MAX;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// The writer connection and whether a transaction is open on it (one left open by a
/// dropped [`SqliteWriteTxn`] is rolled back by the next writer).
struct Writer {
    conn: SqliteConnection,
    in_transaction: bool,
}

/// An SQLite database file holding keyspaces.
pub struct SqliteBackend {
    readers: SqlitePool,
    writer: Arc<Mutex<Writer>>,
    /// Keeps a `memory://` database's directory alive as long as the backend.
    _scratch: Option<tempfile::TempDir>,
}

impl SqliteBackend {
    /// Opens (creating if missing) the database at `path`.
    pub async fn open(path: &str, options: &BackendOptions) -> Result<Self> {
        // kine accepts DSN parameters after `?`; the path is what comes before.
        let path = path.split('?').next().unwrap_or(path);
        if let Some(parent) = Path::new(path).parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(|e| {
                KineError::Unavailable(format!("cannot create {}: {e}", parent.display()))
            })?;
        }
        let synchronous = if options.relaxed_durability {
            SqliteSynchronous::Normal
        } else {
            SqliteSynchronous::Full
        };
        Self::connect(path, synchronous, None).await
    }

    /// Opens a fresh database in a temporary directory (on tmpfs where the machine has one),
    /// removed when the backend is dropped.
    pub async fn open_memory() -> Result<Self> {
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::Builder::new().prefix("kine-rs-").tempdir_in(shm)
        } else {
            tempfile::Builder::new().prefix("kine-rs-").tempdir()
        }
        .map_err(|e| KineError::Unavailable(format!("cannot create a scratch directory: {e}")))?;
        let path = dir.path().join("state.db");
        let path = path.to_string_lossy().into_owned();
        Self::connect(&path, SqliteSynchronous::Off, Some(dir)).await
    }

    async fn connect(
        path: &str,
        synchronous: SqliteSynchronous,
        scratch: Option<tempfile::TempDir>,
    ) -> Result<Self> {
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(synchronous)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(false);
        let mut conn = SqliteConnection::connect_with(&options).await?;
        MIGRATOR
            .run(&mut conn)
            .await
            .map_err(|e| KineError::Storage(format!("schema migration failed: {e}")))?;
        let readers = SqlitePoolOptions::new()
            .max_connections(8)
            .min_connections(1)
            .connect_with(options.read_only(true))
            .await?;
        Ok(SqliteBackend {
            readers,
            writer: Arc::new(Mutex::new(Writer {
                conn,
                in_transaction: false,
            })),
            _scratch: scratch,
        })
    }

    /// Locks the writer connection, rolling back what a dropped transaction left open.
    async fn lock_writer(&self) -> Result<OwnedMutexGuard<Writer>> {
        let mut writer = self.writer.clone().lock_owned().await;
        if writer.in_transaction {
            sqlx::query("ROLLBACK").execute(&mut writer.conn).await?;
            writer.in_transaction = false;
        }
        Ok(writer)
    }
}

async fn read_state(conn: &mut SqliteConnection, keyspace: KeyspaceId) -> Result<KeyspaceState> {
    let row = sqlx::query("SELECT revision, compact_revision, frozen FROM keyspaces WHERE id = ?")
        .bind(keyspace)
        .fetch_optional(conn)
        .await?
        .ok_or_else(|| KineError::Storage(format!("keyspace {keyspace} does not exist")))?;
    Ok(KeyspaceState {
        id: keyspace,
        revision: row.try_get(0)?,
        compact_revision: row.try_get(1)?,
        frozen: row.try_get::<i64, _>(2)? != 0,
    })
}

/// Column list of a key-value row, in the order [`kv_from_row`] decodes.
const KV_COLUMNS: &str = "key, create_revision, mod_revision, version, lease, value";
const KV_COLUMNS_NO_VALUE: &str = "key, create_revision, mod_revision, version, lease, X''";

fn kv_from_row(row: &SqliteRow, offset: usize) -> Result<KeyValue> {
    Ok(KeyValue {
        key: Bytes::from(row.try_get::<Vec<u8>, _>(offset)?),
        create_revision: row.try_get(offset + 1)?,
        mod_revision: row.try_get(offset + 2)?,
        version: row.try_get(offset + 3)?,
        lease: row.try_get(offset + 4)?,
        value: Bytes::from(row.try_get::<Vec<u8>, _>(offset + 5)?),
    })
}

/// SQL that selects rows of `range` live at the current revision (`at` = None) or at `at`.
fn range_sql(select: &str, range: &KeyRange, at: Option<Revision>, limit: bool) -> String {
    let mut sql = format!("SELECT {select} FROM kv WHERE keyspace = ? AND key >= ?");
    if range.exclusive_end().is_some() {
        sql.push_str(" AND key < ?");
    }
    match at {
        None => sql.push_str(" AND superseded = 9223372036854775807 AND deleted = 0"),
        Some(_) => sql.push_str(" AND mod_revision <= ? AND superseded > ? AND deleted = 0"),
    }
    if !select.starts_with("COUNT") {
        sql.push_str(" ORDER BY key");
    }
    if limit {
        sql.push_str(" LIMIT ?");
    }
    sql
}

/// Runs the range query on `conn`: rows (unless `count_only`) and the total count.
async fn range_on(
    conn: &mut SqliteConnection,
    keyspace: KeyspaceId,
    range: &KeyRange,
    at: Option<Revision>,
    limit: Option<i64>,
    keys_only: bool,
    count_only: bool,
) -> Result<(Vec<KeyValue>, i64)> {
    let end = range.exclusive_end();
    // The SQL text is assembled from the constant fragments in `range_sql` only; every value
    // is a bound parameter.
    let bind_all = |sql: String| {
        let mut q = sqlx::query(AssertSqlSafe(sql))
            .bind(keyspace)
            .bind(range.start.to_vec());
        if let Some(end) = &end {
            q = q.bind(end.to_vec());
        }
        if let Some(at) = at {
            q = q.bind(at).bind(at);
        }
        q
    };
    let mut kvs = Vec::new();
    if !count_only {
        let columns = if keys_only {
            KV_COLUMNS_NO_VALUE
        } else {
            KV_COLUMNS
        };
        let sql = range_sql(columns, range, at, limit.is_some());
        let mut q = bind_all(sql);
        if let Some(limit) = limit {
            q = q.bind(limit);
        }
        for row in q.fetch_all(&mut *conn).await? {
            kvs.push(kv_from_row(&row, 0)?);
        }
        // Everything was fetched: the count is known without a second query.
        if limit.is_none_or(|limit| (kvs.len() as i64) < limit) {
            let count = kvs.len() as i64;
            return Ok((kvs, count));
        }
    }
    let sql = range_sql("COUNT(*)", range, at, false);
    let count: i64 = bind_all(sql).fetch_one(&mut *conn).await?.try_get(0)?;
    Ok((kvs, count))
}

#[async_trait]
impl Backend for SqliteBackend {
    fn driver(&self) -> &'static str {
        "sqlite"
    }

    async fn keyspace(&self, name: &str, create: bool) -> Result<Option<KeyspaceId>> {
        let find = || sqlx::query("SELECT id FROM keyspaces WHERE name = ?").bind(name);
        if let Some(row) = find().fetch_optional(&self.readers).await? {
            return Ok(Some(row.try_get(0)?));
        }
        if !create {
            return Ok(None);
        }
        let mut writer = self.lock_writer().await?;
        sqlx::query("INSERT INTO keyspaces (name) VALUES (?) ON CONFLICT (name) DO NOTHING")
            .bind(name)
            .execute(&mut writer.conn)
            .await?;
        let row = find().fetch_one(&mut writer.conn).await?;
        Ok(Some(row.try_get(0)?))
    }

    async fn state(&self, keyspace: KeyspaceId) -> Result<KeyspaceState> {
        let mut conn = self.readers.acquire().await?;
        read_state(&mut conn, keyspace).await
    }

    async fn range(&self, keyspace: KeyspaceId, query: RangeQuery<'_>) -> Result<RangeRows> {
        let mut tx = self.readers.begin().await?;
        let state = read_state(&mut tx, keyspace).await?;
        let at = if query.revision <= 0 || query.revision == state.revision {
            None
        } else if query.revision > state.revision {
            return Err(KineError::FutureRevision);
        } else if query.revision < state.compact_revision {
            return Err(KineError::Compacted);
        } else {
            Some(query.revision)
        };
        let (kvs, count) = range_on(
            &mut tx,
            keyspace,
            query.range,
            at,
            query.limit,
            query.keys_only,
            query.count_only,
        )
        .await?;
        tx.commit().await?;
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
        let mut tx = self.readers.begin().await?;
        let state = read_state(&mut tx, keyspace).await?;
        if after + 1 < state.compact_revision {
            return Err(KineError::Compacted);
        }
        let mut sql = String::from(
            "SELECT e.key, e.create_revision, e.mod_revision, e.version, e.lease, e.value, \
             e.deleted, p.key, p.create_revision, p.mod_revision, p.version, p.lease, p.value \
             FROM kv e LEFT JOIN kv p ON p.keyspace = e.keyspace AND p.key = e.key \
             AND p.superseded = e.mod_revision AND p.deleted = 0 \
             WHERE e.keyspace = ? AND e.mod_revision > ? AND e.mod_revision <= ?",
        );
        let end = range.and_then(KeyRange::exclusive_end);
        if range.is_some() {
            sql.push_str(" AND e.key >= ?");
        }
        if end.is_some() {
            sql.push_str(" AND e.key < ?");
        }
        sql.push_str(" ORDER BY e.mod_revision, e.sub");
        // Assembled from constant fragments only; values are bound.
        let mut q = sqlx::query(AssertSqlSafe(sql))
            .bind(keyspace)
            .bind(after)
            .bind(up_to);
        if let Some(range) = range {
            q = q.bind(range.start.to_vec());
        }
        if let Some(end) = &end {
            q = q.bind(end.to_vec());
        }
        let rows = q.fetch_all(&mut *tx).await?;
        tx.commit().await?;
        let mut events = Vec::with_capacity(rows.len());
        for row in rows {
            let kv = kv_from_row(&row, 0)?;
            let deleted = row.try_get::<i64, _>(6)? != 0;
            let prev_kv = match row.try_get::<Option<Vec<u8>>, _>(7)? {
                Some(_) => Some(kv_from_row(&row, 7)?),
                None => None,
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

    async fn begin_write(&self, keyspace: KeyspaceId) -> Result<Box<dyn WriteTxn>> {
        let mut writer = self.lock_writer().await?;
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut writer.conn)
            .await?;
        writer.in_transaction = true;
        let state = read_state(&mut writer.conn, keyspace).await?;
        Ok(Box::new(SqliteWriteTxn {
            writer,
            keyspace,
            state,
        }))
    }

    async fn lease(&self, keyspace: KeyspaceId, id: i64) -> Result<Option<LeaseRecord>> {
        let mut conn = self.readers.acquire().await?;
        lease_on(&mut conn, keyspace, id).await
    }

    async fn leases(&self, keyspace: KeyspaceId) -> Result<Vec<LeaseRecord>> {
        let rows = sqlx::query(
            "SELECT id, ttl, expires_at_ms FROM leases WHERE keyspace = ? ORDER BY expires_at_ms, id",
        )
        .bind(keyspace)
        .fetch_all(&self.readers)
        .await?;
        rows.iter().map(lease_from_row).collect()
    }

    async fn lease_keys(&self, keyspace: KeyspaceId, id: i64) -> Result<Vec<Bytes>> {
        let mut conn = self.readers.acquire().await?;
        lease_keys_on(&mut conn, keyspace, id).await
    }

    async fn expired_leases(&self, keyspace: KeyspaceId, now_ms: i64) -> Result<Vec<i64>> {
        let rows = sqlx::query(
            "SELECT id FROM leases WHERE keyspace = ? AND expires_at_ms <= ? ORDER BY expires_at_ms LIMIT 1000",
        )
        .bind(keyspace)
        .bind(now_ms)
        .fetch_all(&self.readers)
        .await?;
        rows.iter()
            .map(|row| row.try_get(0).map_err(KineError::from))
            .collect()
    }

    async fn renew_lease(
        &self,
        keyspace: KeyspaceId,
        id: i64,
        now_ms: i64,
    ) -> Result<Option<LeaseRecord>> {
        let mut writer = self.lock_writer().await?;
        let row = sqlx::query(
            "UPDATE leases SET expires_at_ms = ? + ttl * 1000 \
             WHERE keyspace = ? AND id = ? AND expires_at_ms > ? \
             RETURNING id, ttl, expires_at_ms",
        )
        .bind(now_ms)
        .bind(keyspace)
        .bind(id)
        .bind(now_ms)
        .fetch_optional(&mut writer.conn)
        .await?;
        row.as_ref().map(lease_from_row).transpose()
    }

    async fn purge_compacted(
        &self,
        keyspace: KeyspaceId,
        revision: Revision,
        batch: i64,
    ) -> Result<u64> {
        let mut writer = self.lock_writer().await?;
        let superseded = sqlx::query(
            "DELETE FROM kv WHERE rowid IN (SELECT rowid FROM kv WHERE keyspace = ? \
             AND superseded <= ? LIMIT ?)",
        )
        .bind(keyspace)
        .bind(revision)
        .bind(batch)
        .execute(&mut writer.conn)
        .await?
        .rows_affected();
        let tombstones = sqlx::query(
            "DELETE FROM kv WHERE rowid IN (SELECT rowid FROM kv WHERE keyspace = ? \
             AND mod_revision < ? AND deleted = 1 LIMIT ?)",
        )
        .bind(keyspace)
        .bind(revision)
        .bind(batch)
        .execute(&mut writer.conn)
        .await?
        .rows_affected();
        Ok(superseded + tombstones)
    }

    async fn size(&self) -> Result<(i64, i64)> {
        let mut conn = self.readers.acquire().await?;
        let pages: i64 = sqlx::query("PRAGMA page_count")
            .fetch_one(&mut *conn)
            .await?
            .try_get(0)?;
        let free: i64 = sqlx::query("PRAGMA freelist_count")
            .fetch_one(&mut *conn)
            .await?
            .try_get(0)?;
        let page_size: i64 = sqlx::query("PRAGMA page_size")
            .fetch_one(&mut *conn)
            .await?
            .try_get(0)?;
        Ok((pages * page_size, (pages - free) * page_size))
    }

    async fn defragment(&self) -> Result<()> {
        let mut writer = self.lock_writer().await?;
        sqlx::query("VACUUM").execute(&mut writer.conn).await?;
        Ok(())
    }

    fn poll_interval(&self) -> Option<Duration> {
        None
    }
}

fn lease_from_row(row: &SqliteRow) -> Result<LeaseRecord> {
    Ok(LeaseRecord {
        id: row.try_get(0)?,
        ttl: row.try_get(1)?,
        expires_at_ms: row.try_get(2)?,
    })
}

async fn lease_on(
    conn: &mut SqliteConnection,
    keyspace: KeyspaceId,
    id: i64,
) -> Result<Option<LeaseRecord>> {
    let row =
        sqlx::query("SELECT id, ttl, expires_at_ms FROM leases WHERE keyspace = ? AND id = ?")
            .bind(keyspace)
            .bind(id)
            .fetch_optional(conn)
            .await?;
    row.as_ref().map(lease_from_row).transpose()
}

async fn lease_keys_on(
    conn: &mut SqliteConnection,
    keyspace: KeyspaceId,
    id: i64,
) -> Result<Vec<Bytes>> {
    let rows = sqlx::query(
        "SELECT key FROM kv WHERE keyspace = ? AND lease = ? AND lease <> 0 \
         AND superseded = 9223372036854775807 AND deleted = 0 ORDER BY key",
    )
    .bind(keyspace)
    .bind(id)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|row| Ok(Bytes::from(row.try_get::<Vec<u8>, _>(0)?)))
        .collect()
}

/// A write transaction on the writer connection.
struct SqliteWriteTxn {
    writer: OwnedMutexGuard<Writer>,
    keyspace: KeyspaceId,
    state: KeyspaceState,
}

impl SqliteWriteTxn {
    async fn supersede(&mut self, key: &[u8], revision: Revision) -> Result<()> {
        sqlx::query(
            "UPDATE kv SET superseded = ? WHERE keyspace = ? AND key = ? \
             AND superseded = 9223372036854775807",
        )
        .bind(revision)
        .bind(self.keyspace)
        .bind(key)
        .execute(&mut self.writer.conn)
        .await?;
        Ok(())
    }
}

#[async_trait]
impl WriteTxn for SqliteWriteTxn {
    fn state(&self) -> KeyspaceState {
        self.state
    }

    async fn get(&mut self, key: &[u8]) -> Result<Option<KeyValue>> {
        let sql = format!(
            "SELECT {KV_COLUMNS} FROM kv WHERE keyspace = ? AND key = ? \
             AND superseded = 9223372036854775807 AND deleted = 0"
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(self.keyspace)
            .bind(key)
            .fetch_optional(&mut self.writer.conn)
            .await?;
        row.as_ref().map(|row| kv_from_row(row, 0)).transpose()
    }

    async fn range(&mut self, query: RangeQuery<'_>) -> Result<RangeRows> {
        let at = (query.revision > 0).then_some(query.revision);
        let (kvs, count) = range_on(
            &mut self.writer.conn,
            self.keyspace,
            query.range,
            at,
            query.limit,
            query.keys_only,
            query.count_only,
        )
        .await?;
        Ok(RangeRows {
            revision: self.state.revision,
            kvs,
            count,
        })
    }

    async fn put(&mut self, kv: &KeyValue, sub: i64) -> Result<()> {
        self.supersede(&kv.key, kv.mod_revision).await?;
        sqlx::query(
            "INSERT INTO kv (keyspace, key, mod_revision, sub, create_revision, version, lease, \
             value, deleted, superseded) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?)",
        )
        .bind(self.keyspace)
        .bind(kv.key.as_ref())
        .bind(kv.mod_revision)
        .bind(sub)
        .bind(kv.create_revision)
        .bind(kv.version)
        .bind(kv.lease)
        .bind(kv.value.as_ref())
        .bind(CURRENT)
        .execute(&mut self.writer.conn)
        .await?;
        Ok(())
    }

    async fn delete(&mut self, key: &[u8], revision: Revision, sub: i64) -> Result<()> {
        self.supersede(key, revision).await?;
        sqlx::query(
            "INSERT INTO kv (keyspace, key, mod_revision, sub, create_revision, version, lease, \
             value, deleted, superseded) VALUES (?, ?, ?, ?, 0, 0, 0, X'', 1, ?)",
        )
        .bind(self.keyspace)
        .bind(key)
        .bind(revision)
        .bind(sub)
        .bind(CURRENT)
        .execute(&mut self.writer.conn)
        .await?;
        Ok(())
    }

    async fn lease(&mut self, id: i64) -> Result<Option<LeaseRecord>> {
        lease_on(&mut self.writer.conn, self.keyspace, id).await
    }

    async fn insert_lease(&mut self, lease: LeaseRecord) -> Result<()> {
        sqlx::query("INSERT INTO leases (keyspace, id, ttl, expires_at_ms) VALUES (?, ?, ?, ?)")
            .bind(self.keyspace)
            .bind(lease.id)
            .bind(lease.ttl)
            .bind(lease.expires_at_ms)
            .execute(&mut self.writer.conn)
            .await?;
        Ok(())
    }

    async fn delete_lease(&mut self, id: i64) -> Result<()> {
        sqlx::query("DELETE FROM leases WHERE keyspace = ? AND id = ?")
            .bind(self.keyspace)
            .bind(id)
            .execute(&mut self.writer.conn)
            .await?;
        Ok(())
    }

    async fn lease_keys(&mut self, id: i64) -> Result<Vec<Bytes>> {
        lease_keys_on(&mut self.writer.conn, self.keyspace, id).await
    }

    async fn set_compact_revision(&mut self, revision: Revision) -> Result<()> {
        sqlx::query("UPDATE keyspaces SET compact_revision = ? WHERE id = ?")
            .bind(revision)
            .bind(self.keyspace)
            .execute(&mut self.writer.conn)
            .await?;
        self.state.compact_revision = revision;
        Ok(())
    }

    async fn set_frozen(&mut self, frozen: bool) -> Result<()> {
        sqlx::query("UPDATE keyspaces SET frozen = ? WHERE id = ?")
            .bind(frozen as i64)
            .bind(self.keyspace)
            .execute(&mut self.writer.conn)
            .await?;
        self.state.frozen = frozen;
        Ok(())
    }

    async fn commit(mut self: Box<Self>, revision: Revision) -> Result<()> {
        if revision != self.state.revision {
            sqlx::query("UPDATE keyspaces SET revision = ? WHERE id = ?")
                .bind(revision)
                .bind(self.keyspace)
                .execute(&mut self.writer.conn)
                .await?;
        }
        sqlx::query("COMMIT").execute(&mut self.writer.conn).await?;
        self.writer.in_transaction = false;
        Ok(())
    }
}
