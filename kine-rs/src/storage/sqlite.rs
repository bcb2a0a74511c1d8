//! SQLite, the embedded default backend (and `memory://`, an SQLite file in a throwaway
//! directory).
//!
//! One dedicated connection writes (SQLite has one writer anyway, and keeping it private lets
//! a write transaction span several etcd transactions: group commit); `BEGIN IMMEDIATE` takes
//! the database's write lock, so no `FOR UPDATE` is needed. A pool of read-only connections
//! reads from WAL snapshots concurrently with it.
//!
//! The writer never checkpoints: a checkpoint copies the WAL into the database file and syncs
//! it, and done inside a commit it stalls every write queued behind it. A connection of its
//! own runs passive checkpoints (which never block the writer) in the background instead.
//! The writer keeps a large page cache, so the index pages a batch of scattered keys touches
//! stay in memory (the cache only grows as it is used; an idle process stays small).

use std::borrow::Cow;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use super::sql::{Dialect, SqlBackend};
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
        "INSERT INTO keyspaces (name) VALUES (?) ON CONFLICT (name) DO NOTHING";
    const EMPTY_BYTES: &'static str = "X''";
    const SIZE: &'static str = "SELECT p.page_count * s.page_size, \
         (p.page_count - f.freelist_count) * s.page_size \
         FROM pragma_page_count() p, pragma_freelist_count() f, pragma_page_size() s";
    const DEFRAGMENT: &'static str = "VACUUM";

    fn delete_limited(filter: &str) -> String {
        format!("DELETE FROM kv WHERE rowid IN (SELECT rowid FROM kv WHERE {filter} LIMIT ?)")
    }

    fn sql(text: &str) -> Cow<'_, str> {
        Cow::Borrowed(text)
    }
}

/// The SQLite backend.
pub type SqliteBackend = SqlBackend<Sqlite>;

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
    connect(path, synchronous, None).await
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
    connect(&path, SqliteSynchronous::Off, Some(dir)).await
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
                .pragma("cache_size", WRITER_CACHE_KIB),
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
    let checkpoints = tokio::spawn(checkpoint_in_background(checkpointer));
    Ok(SqlBackend::new(
        readers,
        writers,
        None,
        None,
        Box::new(Resources {
            _scratch: scratch,
            checkpoints,
        }),
    ))
}

/// Rows a query may run ahead of the code reading them.
const ROW_BUFFER: usize = 1024;
/// The writer's page cache, in KiB (SQLite's negative `cache_size`).
const WRITER_CACHE_KIB: &str = "-65536";
/// How often the background checkpoint runs.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// Copies committed WAL frames into the database file, off the write path. Passive: it never
/// waits for (or blocks) the writer or readers, and copies what it can; SQLite restarts the WAL
/// from its beginning once everything in it is copied and no reader needs it.
async fn checkpoint_in_background(pool: sqlx::SqlitePool) {
    let mut every = tokio::time::interval(CHECKPOINT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if let Err(error) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&pool)
            .await
        {
            tracing::warn!(%error, "SQLite checkpoint failed; retrying");
        }
    }
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
