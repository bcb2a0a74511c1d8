//! SQLite, the embedded default backend (and `memory://`, an SQLite file in a throwaway
//! directory).
//!
//! One dedicated connection writes (SQLite has one writer anyway, and keeping it private lets
//! a write transaction span several etcd transactions: group commit), kept out of the pool so
//! that batches follow each other without sqlx's release between them (`sql/write_tx.rs`);
//! the pool keeps one more for the rest (leases, compaction, tenants). `BEGIN IMMEDIATE`
//! takes the database's write lock, so no `FOR UPDATE` is needed. A pool of read-only connections
//! reads from WAL snapshots concurrently with it.
//!
//! The writer never checkpoints: a checkpoint copies the WAL into the database file and syncs
//! it, and done inside a commit it stalls every write queued behind it. A connection of its
//! own runs passive checkpoints (which never block the writer) in the background instead.
//!
//! Passive checkpoints alone cannot bound the WAL: SQLite starts it over from the beginning
//! only when a write begins while no reader uses it, and under a constant stream of
//! overlapping readers (lists, watches catching up) that never happens, so the file grows
//! with every write; and under a constant stream of writes the passive checkpoint never
//! catches up with the log's end, which SQLite needs too. Once the file passes
//! `--sqlite-wal-limit-bytes`, the background connection follows its passive checkpoint with a
//! `RESTART` one: it holds the write lock while it copies what the passive one left (the
//! frames written while it ran) and waits for the readers of older snapshots to finish
//! (readers that start meanwhile read the database file, not the WAL); the writer's next
//! commit then starts the log over and cuts the file back to the limit (`journal_size_limit`).
//! The file is reused, not emptied: emptied, every commit after it grew the file again, and
//! the checkpoint past the limit copied everything written since the last tick while the
//! writers waited (overwrites at 128 clients write tens of MB of log a second).
//! When nothing is written after a restart the file stays as it was, and the next tick
//! empties it (`TRUNCATE`). The wait for readers is bounded, so a writer is held off at most
//! that long; when readers outlast it the checkpoint gives up without harm and the next one
//! waits twice as long, up to [`MAX_TRUNCATE_WAIT`] (well below the writer's busy timeout),
//! so the log shrinks as soon as the longest running reads end.
//! The writer keeps a large page cache, so the index pages a batch of scattered keys touches
//! stay in memory (the cache only grows as it is used; an idle process stays small).

use std::borrow::Cow;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use super::sql::{
    ChangedRowsCheck, Dialect, SnapshotTable, SqlBackend, UnreadBatch, snapshot_pages,
};
use super::{BackendOptions, migration_error};
use crate::error::{KineError, Result};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// SQLite's dialect.
pub struct Sqlite;

impl Dialect for Sqlite {
    type DB = sqlx::Sqlite;
    const DRIVER: &'static str = "sqlite";
    const BEGIN_WRITE: &'static str = "BEGIN IMMEDIATE";
    const BEGIN_READ: &'static str = "BEGIN";
    const LOCK: &'static str = "";
    const INSERT_KEYSPACE: &'static str =
        "INSERT INTO keyspaces (name) VALUES (?) ON CONFLICT (name) DO NOTHING RETURNING id";
    const INSERT_KEYSPACE_RETURNS_ID: bool = true;
    const EMPTY_BYTES: &'static str = "X''";
    const SIZE: &'static str = "SELECT p.page_count * s.page_size, \
         (p.page_count - f.freelist_count) * s.page_size \
         FROM pragma_page_count() p, pragma_freelist_count() f, pragma_page_size() s";
    const DEFRAGMENT: &'static str = "VACUUM";
    const MULTI_STATEMENT: bool = true;
    // A view that takes no rows: inserting into it only runs its trigger, which ends the
    // call unless the statement before changed the rows expected (`changes()`, its count).
    const CHANGED_ROWS_CHECK: Option<ChangedRowsCheck> = Some(ChangedRowsCheck {
        setup: "CREATE TEMP VIEW IF NOT EXISTS kine_rs_changed (expected, changed) AS \
                SELECT 0, 0; \
            CREATE TEMP TRIGGER IF NOT EXISTS kine_rs_changed_check \
                INSTEAD OF INSERT ON kine_rs_changed \
                WHEN NEW.changed IS NOT NEW.expected \
                BEGIN SELECT RAISE(ABORT, 'a write batch statement changed other rows than expected'); END; \
            CREATE TEMP TABLE IF NOT EXISTS kine_rs_unchanged \
                (changes INTEGER PRIMARY KEY CHECK (changes = 0))",
        check: "INSERT INTO temp.kine_rs_changed (expected, changed) VALUES (?, changes())",
    });
    // `data_version` changes only with other connections' commits. The table keeps at most
    // one row (`OR REPLACE`); its CHECK fails the call with SQLITE_CONSTRAINT_CHECK, which
    // no table of the schema raises.
    const UNREAD_BATCH: Option<UnreadBatch> = Some(UnreadBatch {
        version: "SELECT data_version FROM pragma_data_version()",
        begin_checked: "BEGIN IMMEDIATE; \
            INSERT OR REPLACE INTO temp.kine_rs_unchanged (changes) \
            SELECT (data_version <> ?) + (SELECT COUNT(*) FROM kv_head \
                WHERE keyspace = ? AND `key` IN ({keys}) AND deleted = 0) \
            FROM pragma_data_version()",
    });
    const ONE_STATEMENT_GETS: bool = true;
    const PAST_TABLE: bool = true;
    const SNAPSHOT_TABLE: Option<SnapshotTable> = Some(snapshot_pages::SQLITE);

    fn sql(text: &str) -> Cow<'_, str> {
        Cow::Borrowed(text)
    }
}

/// The SQLite backend.
pub type SqliteBackend = SqlBackend<Sqlite>;

/// A fresh `memory://` backend and its keyspace `name`, created (tests of the storage layer).
#[cfg(test)]
pub(crate) async fn open_memory_keyspace(name: &str) -> (SqliteBackend, super::KeyspaceId) {
    use super::Backend;
    let backend = open_memory().await.expect("open");
    let keyspace = backend
        .keyspace(name, true)
        .await
        .expect("keyspace")
        .expect("created");
    (backend, keyspace)
}

/// Opens (creating if missing) the database at `path`.
pub async fn open(path: &str, options: &BackendOptions) -> Result<SqliteBackend> {
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
    let wal_limit = match options.sqlite_wal_limit_bytes {
        0 => DEFAULT_WAL_LIMIT_BYTES,
        limit => limit,
    };
    connect(path, synchronous, None, wal_limit).await
}

/// Opens a fresh database in a temporary directory (on tmpfs where the machine has one),
/// removed when the backend is dropped.
pub async fn open_memory() -> Result<SqliteBackend> {
    let shm = Path::new("/dev/shm");
    let parent = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    // A process killed with SIGKILL never drops its directory; on tmpfs that is RAM lost
    // until reboot. The directory names its process, so the next one removes the orphans.
    remove_orphaned_scratch(&parent);
    let dir = tempfile::Builder::new()
        .prefix(&format!("{SCRATCH_PREFIX}{}-", std::process::id()))
        .tempdir_in(&parent)
        .map_err(|e| KineError::Unavailable(format!("cannot create a scratch directory: {e}")))?;
    let path = dir.path().join("state.db");
    let path = path.to_string_lossy().into_owned();
    connect(
        &path,
        SqliteSynchronous::Off,
        Some(dir),
        DEFAULT_WAL_LIMIT_BYTES,
    )
    .await
}

/// `memory://` directories are named `kine-rs-mem-<pid>-<random>`.
const SCRATCH_PREFIX: &str = "kine-rs-mem-";

/// Removes the `memory://` directories in `parent` whose process is gone.
fn remove_orphaned_scratch(parent: &Path) {
    // Without /proc nothing says which processes are alive: leave everything.
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(SCRATCH_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

async fn connect(
    path: &str,
    synchronous: SqliteSynchronous,
    scratch: Option<tempfile::TempDir>,
    wal_limit: u64,
) -> Result<SqliteBackend> {
    let options = SqliteConnectOptions::from_str("sqlite://")?
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(synchronous)
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(false)
        // A page of a list (500 rows) streams from SQLite's thread without it waiting for
        // the reader row by row (sqlx's default buffer is 50 rows).
        .row_buffer_size(ROW_BUFFER);
    // The single writer: writes queue for it rather than time out.
    // A local file's connection cannot go stale: no ping before each use.
    let writers = SqlitePoolOptions::new()
        .test_before_acquire(false)
        .max_connections(1)
        .min_connections(1)
        .acquire_timeout(Duration::from_secs(3600))
        .idle_timeout(None)
        .max_lifetime(None)
        .connect_with(
            options
                .clone()
                .pragma("wal_autocheckpoint", "0")
                .pragma("cache_size", WRITER_CACHE_KIB)
                // Where a checkpoint restarted the log, the commit that starts it over cuts
                // the file back to the limit.
                .pragma("journal_size_limit", wal_limit.to_string())
                // A statement that may fail halfway (an UPDATE under a unique index) keeps a
                // journal of the pages it changed; past 64 KiB SQLite spilled it into a new
                // file in /var/tmp (opened, written and unlinked within the batch). The
                // writer's statements are bounded by a batch, so memory is the right place.
                .pragma("temp_store", "MEMORY"),
        )
        .await?;
    let checkpointer = SqlitePoolOptions::new()
        .max_connections(1)
        .min_connections(1)
        .idle_timeout(None)
        .max_lifetime(None)
        .connect_with(options.clone())
        .await?;
    MIGRATOR
        .run(&writers)
        .await
        .map_err(|e| migration_error(e, &MIGRATOR))?;
    let readers = SqlitePoolOptions::new()
        .test_before_acquire(false)
        .max_connections(8)
        .min_connections(1)
        .connect_with(options.read_only(true))
        .await?;
    let wal = std::path::PathBuf::from(format!("{path}-wal"));
    let checkpoints = tokio::spawn(checkpoint_in_background(checkpointer, wal, wal_limit));
    SqlBackend::new(
        readers,
        writers,
        None,
        super::feed::CommitFeed::new(),
        Box::new(Resources {
            _scratch: scratch,
            checkpoints,
        }),
    )
    .with_batch_connection()
    .await
}

/// Rows a query may run ahead of the code reading them.
const ROW_BUFFER: usize = 1024;
/// The writer's page cache, in KiB (SQLite's negative `cache_size`).
const WRITER_CACHE_KIB: &str = "-65536";
/// How often the background checkpoint runs.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// The WAL size past which it is restarted when `--sqlite-wal-limit-bytes` is not given.
pub const DEFAULT_WAL_LIMIT_BYTES: u64 = 64 << 20;
/// How long the first truncating checkpoint past the limit waits for readers.
const MIN_TRUNCATE_WAIT: Duration = Duration::from_millis(50);
/// The longest a truncating checkpoint waits for readers (and so holds writers off); well
/// below the writer's busy timeout (10 s), so no write fails for it.
pub const MAX_TRUNCATE_WAIT: Duration = Duration::from_secs(2);

/// Copies committed WAL frames into the database file, off the write path. Passive: it never
/// waits for (or blocks) the writer or readers, and copies what it can. Past `limit` bytes,
/// a restart follows it, or, when the log was already restarted and nothing wrote since,
/// a truncation (see the module docs).
async fn checkpoint_in_background(pool: sqlx::SqlitePool, wal: std::path::PathBuf, limit: u64) {
    let mut every = tokio::time::interval(CHECKPOINT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut wait = MIN_TRUNCATE_WAIT;
    // The log's length in frames when this task last restarted it: while it is still that,
    // nothing was written since, and no commit cut the file back.
    let mut restarted_at = None;
    loop {
        every.tick().await;
        let size = std::fs::metadata(&wal).map_or(0, |m| m.len());
        let passive = match checkpoint(&pool, Checkpoint::Passive, wait).await {
            Ok(passive) => passive,
            Err(error) => {
                tracing::warn!(%error, "SQLite checkpoint failed; retrying");
                continue;
            }
        };
        if size <= limit {
            wait = MIN_TRUNCATE_WAIT;
            restarted_at = None;
            continue;
        }
        let mode = if restarted_at == Some(passive.log_frames) {
            Checkpoint::Truncate
        } else {
            Checkpoint::Restart
        };
        match checkpoint(&pool, mode, wait).await {
            Ok(done) if done.complete => {
                wait = MIN_TRUNCATE_WAIT;
                restarted_at = (mode == Checkpoint::Restart).then_some(done.log_frames);
            }
            Ok(_) => {
                tracing::debug!(
                    size,
                    wait_ms = wait.as_millis() as u64,
                    "SQLite WAL past its limit: readers outlasted the checkpoint; the next one \
                     waits longer"
                );
                wait = (wait * 2).min(MAX_TRUNCATE_WAIT);
                restarted_at = None;
            }
            Err(error) => tracing::warn!(%error, "SQLite checkpoint failed; retrying"),
        }
    }
}

/// A checkpoint's mode.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Checkpoint {
    /// Copies what it can without waiting for (or blocking) anyone.
    Passive,
    /// Holds writers off while it copies the rest and waits for the readers of older
    /// snapshots, so that the next commit starts the log over.
    Restart,
    /// The same, and empties the file.
    Truncate,
}

/// What a checkpoint answered.
struct Checkpointed {
    /// Whether it did all its mode asks (a blocking one: readers did not outlast its wait).
    complete: bool,
    /// The log's length in frames.
    log_frames: i64,
}

/// Runs a checkpoint; a blocking one waits at most `wait` for readers. Recorded as query
/// `checkpoint_passive`, `checkpoint_restart` or `checkpoint_truncate` (for the blocking
/// ones, how long writers were held off).
async fn checkpoint(
    pool: &sqlx::SqlitePool,
    mode: Checkpoint,
    wait: Duration,
) -> Result<Checkpointed> {
    let (pragma, query) = match mode {
        Checkpoint::Passive => ("PRAGMA wal_checkpoint(PASSIVE)", "checkpoint_passive"),
        Checkpoint::Restart => ("PRAGMA wal_checkpoint(RESTART)", "checkpoint_restart"),
        Checkpoint::Truncate => ("PRAGMA wal_checkpoint(TRUNCATE)", "checkpoint_truncate"),
    };
    let started = std::time::Instant::now();
    let result = async {
        let mut conn = pool.acquire().await?;
        if mode != Checkpoint::Passive {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "PRAGMA busy_timeout = {}",
                wait.as_millis()
            )))
            .execute(&mut *conn)
            .await?;
        }
        // One row: (1 when it could not finish, frames in the log, frames copied).
        let (busy, log_frames, _): (i64, i64, i64) =
            sqlx::query_as(pragma).fetch_one(&mut *conn).await?;
        Ok(Checkpointed {
            complete: busy == 0,
            log_frames,
        })
    }
    .await;
    crate::metrics::sql_query(
        Sqlite::DRIVER,
        query,
        started.elapsed(),
        result.as_ref().err(),
    );
    result
}

/// What an SQLite backend owns besides its pools.
struct Resources {
    /// A `memory://` database's directory, removed with it.
    _scratch: Option<tempfile::TempDir>,
    checkpoints: tokio::task::JoinHandle<()>,
}

impl Drop for Resources {
    fn drop(&mut self) {
        self.checkpoints.abort();
    }
}

#[cfg(test)]
mod writer_tests {
    /// The writer keeps statement journals in memory: with them in files, a batch whose
    /// UPDATE changed more than 64 KiB of pages created, wrote and unlinked a file in
    /// /var/tmp (about 1.5% of the process's CPU under kube-apiserver-like updates).
    #[tokio::test]
    async fn the_writer_keeps_temporary_data_in_memory() {
        let backend = super::open_memory().await.expect("open");
        // 2 is MEMORY.
        let temp_store: i64 = sqlx::query_scalar("PRAGMA temp_store")
            .fetch_one(backend.writer_pool())
            .await
            .expect("pragma");
        assert_eq!(temp_store, 2);
    }

    use bytes::Bytes;

    use crate::model::{KeyRange, KeyValue};
    use crate::storage::{Backend, BatchKeys, KeyspaceId, RangeQuery};

    /// A fresh `memory://` backend with keyspace `t`, and the batch keys and range of its
    /// one key `k`.
    struct OneKey {
        backend: super::SqliteBackend,
        keyspace: KeyspaceId,
        keys: BatchKeys,
        range: KeyRange,
    }

    impl OneKey {
        async fn new() -> Self {
            let (backend, keyspace) = super::open_memory_keyspace("t").await;
            let key = Bytes::from_static(b"k");
            OneKey {
                backend,
                keyspace,
                keys: BatchKeys {
                    all: vec![key.clone()],
                    created: Vec::new(),
                },
                range: KeyRange::new(key, Bytes::new()),
            }
        }

        /// The key's current row.
        fn query(&self) -> RangeQuery<'_> {
            RangeQuery {
                range: &self.range,
                revision: 0,
                limit: None,
                keys_only: false,
                count_only: false,
            }
        }

        /// A row of the key.
        fn row(created: i64, revision: i64, version: i64, value: &'static [u8]) -> KeyValue {
            KeyValue {
                key: b"k".to_vec().into(),
                create_revision: created,
                mod_revision: revision,
                version,
                value: value.to_vec().into(),
                lease: 0,
            }
        }
    }

    /// A write batch dropped before its commit (a datastore failure halfway) is rolled back:
    /// the rows it wrote are gone and the single writer begins the next batch as usual.
    #[tokio::test]
    async fn a_batch_dropped_before_its_commit_is_rolled_back() {
        let fixture = OneKey::new().await;
        let (backend, keyspace, keys) = (&fixture.backend, fixture.keyspace, fixture.keys.clone());
        let query = || fixture.query();
        let put = |revision, value| OneKey::row(revision, revision, 1, value);

        let mut txn = backend
            .begin_group_write(keyspace, &keys, false)
            .await
            .expect("begin");
        let revision = txn.state().revision + 1;
        txn.put(&put(revision, b"dropped"), 0).await.expect("put");
        // The range writes the buffered row first, inside the transaction.
        let seen = txn.range(query()).await.expect("range in the batch");
        assert_eq!(seen.kvs.len(), 1, "the batch sees its own row");
        drop(txn);

        let mut txn = backend
            .begin_group_write(keyspace, &keys, false)
            .await
            .expect("the next batch begins");
        assert_eq!(
            txn.state().revision,
            revision - 1,
            "the revision was not kept"
        );
        assert!(
            txn.get(b"k").await.expect("get").is_none(),
            "the row was kept"
        );
        txn.put(&put(revision, b"kept"), 0).await.expect("put");
        txn.commit(revision).await.expect("commit");
        let read = backend.range(keyspace, query()).await.expect("range");
        assert_eq!(read.revision, revision);
        assert_eq!(read.kvs.len(), 1);
        assert_eq!(&read.kvs[0].value[..], b"kept");
    }

    /// A write batch's last call also commits it, but only after each of its statements
    /// changed the rows the batch expected: one that did not ends the call before its COMMIT,
    /// the batch fails with nothing kept, and the writer goes on. (Here a trigger drops the
    /// overwrite's new row of `kv`, so that statement changes none instead of one.)
    #[tokio::test]
    async fn a_write_call_whose_statement_changed_unexpected_rows_commits_nothing() {
        let fixture = OneKey::new().await;
        let (backend, keyspace, keys) = (&fixture.backend, fixture.keyspace, fixture.keys.clone());
        let query = || fixture.query();
        let put = OneKey::row;

        let mut txn = backend
            .begin_group_write(keyspace, &keys, false)
            .await
            .expect("begin");
        let first = txn.state().revision + 1;
        txn.put(&put(first, first, 1, b"first"), 0)
            .await
            .expect("put");
        txn.commit(first).await.expect("commit");

        sqlx::query("CREATE TRIGGER lose_row BEFORE INSERT ON kv BEGIN SELECT RAISE(IGNORE); END")
            .execute(backend.writer_pool())
            .await
            .expect("trigger");
        let second = first + 1;
        let mut txn = backend
            .begin_group_write(keyspace, &keys, false)
            .await
            .expect("begin");
        txn.put(&put(first, second, 2, b"lost"), 0)
            .await
            .expect("put");
        let error = txn
            .commit(second)
            .await
            .expect_err("a batch whose insert changed no row committed");
        assert!(
            error
                .to_string()
                .contains("changed other rows than expected"),
            "{error}"
        );
        sqlx::query("DROP TRIGGER lose_row")
            .execute(backend.writer_pool())
            .await
            .expect("drop trigger");
        let read = backend.range(keyspace, query()).await.expect("range");
        assert_eq!(read.revision, first, "the failed batch's revision was kept");
        assert_eq!(&read.kvs[0].value[..], b"first");

        let mut txn = backend
            .begin_group_write(keyspace, &keys, false)
            .await
            .expect("the next batch begins");
        assert_eq!(txn.state().revision, first);
        txn.put(&put(first, second, 2, b"second"), 0)
            .await
            .expect("put");
        txn.commit(second).await.expect("commit");
        let read = backend.range(keyspace, query()).await.expect("range");
        assert_eq!(read.revision, second);
        assert_eq!(&read.kvs[0].value[..], b"second");
        assert_eq!(read.kvs[0].version, 2);
    }
}

#[cfg(test)]
mod unread_batch_tests {
    //! Write batches that start from what this process committed last, without reading
    //! (`UnreadBatch`): the first call of such a batch refuses it when the cache no longer
    //! holds, and the writer runs it again after a read.

    use bytes::Bytes;

    use crate::error::KineError;
    use crate::model::KeyValue;
    use crate::storage::{Backend, BackendOptions, BatchKeys, KeyspaceId};

    /// Two backends on one SQLite file, as two processes would have them, and keyspace `t`.
    struct TwoProcesses {
        _dir: tempfile::TempDir,
        this: super::SqliteBackend,
        other: super::SqliteBackend,
        keyspace: KeyspaceId,
    }

    impl TwoProcesses {
        async fn new() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("state.db");
            let path = path.to_str().expect("utf-8 path");
            let options = BackendOptions::default();
            let other = super::open(path, &options).await.expect("open");
            let keyspace = other
                .keyspace("t", true)
                .await
                .expect("keyspace")
                .expect("created");
            let this = super::open(path, &options).await.expect("open again");
            TwoProcesses {
                _dir: dir,
                this,
                other,
                keyspace,
            }
        }
    }

    fn keys(all: &[&'static [u8]], created: &[&'static [u8]]) -> BatchKeys {
        BatchKeys {
            all: all.iter().map(|key| Bytes::from_static(key)).collect(),
            created: created.iter().map(|key| Bytes::from_static(key)).collect(),
        }
    }

    /// One batch of `backend` putting `key`: its next version, at the next revision.
    async fn put(
        backend: &super::SqliteBackend,
        keyspace: KeyspaceId,
        key: &'static [u8],
        value: &'static [u8],
        optimistic: bool,
    ) -> crate::error::Result<KeyValue> {
        let batch = keys(&[key], &[key]);
        let mut txn = backend
            .begin_group_write(keyspace, &batch, optimistic)
            .await?;
        let revision = txn.state().revision + 1;
        let previous = txn.get(key).await?;
        let kv = KeyValue {
            key: Bytes::from_static(key),
            create_revision: previous.as_ref().map_or(revision, |kv| kv.create_revision),
            mod_revision: revision,
            version: previous.as_ref().map_or(1, |kv| kv.version + 1),
            value: Bytes::from_static(value),
            lease: 0,
        };
        txn.put(&kv, 0).await?;
        txn.commit(revision).await?;
        Ok(kv)
    }

    async fn current(backend: &super::SqliteBackend, keyspace: KeyspaceId, key: &[u8]) -> KeyValue {
        let range = crate::model::KeyRange::new(Bytes::copy_from_slice(key), Bytes::new());
        let read = crate::storage::test_support::read(backend, keyspace, &range).await;
        read.kvs.into_iter().next().expect("the key is live")
    }

    /// Batches after this process's own commits start from the cache and stay right: each
    /// overwrite and create lands at the next revision with the next version.
    #[tokio::test]
    async fn batches_after_this_processs_commits_start_from_the_cache() {
        let both = TwoProcesses::new().await;
        let (this, keyspace) = (&both.this, both.keyspace);
        let mut last = None;
        for value in [&b"1"[..], b"2", b"3"] {
            last = Some(put(this, keyspace, b"k", value, true).await.expect("put"));
        }
        let fresh = put(this, keyspace, b"fresh", b"x", true)
            .await
            .expect("a create taking its key for absent");
        let last = last.expect("puts");
        assert_eq!(last.version, 3);
        assert_eq!(fresh.mod_revision, last.mod_revision + 1);
        let stored = current(this, keyspace, b"k").await;
        assert_eq!((stored.version, &stored.value[..]), (3, &b"3"[..]));
        assert_eq!(current(this, keyspace, b"fresh").await.version, 1);
    }

    /// Another process committed to the keyspace after this one's last commit: the batch that
    /// started from the cache is refused with nothing written, and the same batch after a read
    /// commits on the new state.
    #[tokio::test]
    async fn a_cached_batch_is_refused_after_another_process_committed() {
        let both = TwoProcesses::new().await;
        let keyspace = both.keyspace;
        put(&both.this, keyspace, b"k", b"mine", true)
            .await
            .expect("put");
        let theirs = put(&both.other, keyspace, b"k", b"theirs", false)
            .await
            .expect("the other process's put");
        let refused = put(&both.this, keyspace, b"k", b"stale", true).await;
        assert!(
            matches!(refused, Err(KineError::Conflict(_))),
            "a batch evaluated on what this process committed last was not refused: {refused:?}"
        );
        let stored = current(&both.this, keyspace, b"k").await;
        assert_eq!(
            stored.mod_revision, theirs.mod_revision,
            "the refused batch wrote"
        );
        let again = put(&both.this, keyspace, b"k", b"again", false)
            .await
            .expect("the batch after a read");
        assert_eq!(again.version, 3);
        assert_eq!(again.mod_revision, theirs.mod_revision + 1);
        // And the next one starts from the cache again, on the new state.
        let next = put(&both.this, keyspace, b"k", b"next", true)
            .await
            .expect("put");
        assert_eq!(
            (next.version, next.mod_revision),
            (4, again.mod_revision + 1)
        );
    }

    /// A key this process never saw exists (written before it started): a create that took it
    /// for absent is refused, and after a read the put overwrites it with its next version.
    #[tokio::test]
    async fn a_create_that_took_a_live_key_for_absent_is_refused() {
        let both = TwoProcesses::new().await;
        let keyspace = both.keyspace;
        // Before `this` commits anything, so its data version is read after this one.
        put(&both.other, keyspace, b"theirs", b"1", false)
            .await
            .expect("the other process's put");
        put(&both.this, keyspace, b"k", b"mine", true)
            .await
            .expect("put");
        let refused = put(&both.this, keyspace, b"theirs", b"2", true).await;
        assert!(
            matches!(refused, Err(KineError::Conflict(_))),
            "a create over a live key was not refused: {refused:?}"
        );
        let stored = current(&both.this, keyspace, b"theirs").await;
        assert_eq!((stored.version, &stored.value[..]), (1, &b"1"[..]));
        let again = put(&both.this, keyspace, b"theirs", b"2", false)
            .await
            .expect("the put after a read");
        assert_eq!(again.version, 2);
    }
}

#[cfg(test)]
mod keyspace_id_tests {
    use crate::storage::Backend;

    /// A deleted keyspace's id is not given to the next one: another process that still had
    /// the deleted tenant open would otherwise find its keyspace row again, another tenant's.
    #[tokio::test]
    async fn a_deleted_keyspaces_id_is_not_given_out_again() {
        let backend = super::open_memory().await.expect("open");
        let first = backend
            .keyspace("a", true)
            .await
            .expect("a")
            .expect("created");
        let highest = backend
            .keyspace("b", true)
            .await
            .expect("b")
            .expect("created");
        assert!(backend.delete_keyspace(highest).await.expect("delete"));
        let next = backend
            .keyspace("c", true)
            .await
            .expect("c")
            .expect("created");
        assert!(
            next > highest && next != first,
            "keyspace c got id {next}; the deleted b had {highest}"
        );
    }
}

#[cfg(test)]
mod scratch_tests {
    use super::*;

    #[test]
    fn orphaned_memory_directories_are_removed_and_live_ones_kept() {
        let parent = tempfile::tempdir().expect("tempdir");
        // Above Linux's largest pid_max (2^22): no such process.
        let orphan = parent.path().join(format!("{SCRATCH_PREFIX}4294967-abc"));
        let live = parent
            .path()
            .join(format!("{SCRATCH_PREFIX}{}-def", std::process::id()));
        let unrelated = parent.path().join("kine-rs-other");
        for dir in [&orphan, &live, &unrelated] {
            std::fs::create_dir(dir).expect("mkdir");
            std::fs::write(dir.join("state.db"), b"x").expect("write");
        }
        remove_orphaned_scratch(parent.path());
        assert!(!orphan.exists(), "the dead process's directory stays");
        assert!(live.exists(), "this process's directory was removed");
        assert!(
            unrelated.exists(),
            "a directory that is not ours was removed"
        );
    }
}
