//! Pages of a snapshot at an older revision where superseded rows are ordered by the revision
//! that superseded them ([`Dialect::PAST_TABLE`]: SQLite, MySQL): a tenant migration's copy.
//!
//! A read at an older revision R finds the rows that were live at R and superseded since
//! among every row superseded since R. A snapshot read in a thousand pages would walk them a
//! thousand times (a migration from SQLite: +27 ms a page at 100,000 overwrites since R). One
//! connection keeps them instead, in a temporary table ordered by key, adding at each page
//! only the rows superseded since the page before; each page reads the current rows and that
//! table by key. The table lives on disk (SQLite's temporary database file, InnoDB's
//! temporary tablespace), so memory stays bounded whatever the number of keys.

use super::{
    Arg, Conn, Dialect, KV_COLUMNS, KeyspaceId, RangeBranch, Result, Revision, execute, fetch_all,
    kv_from_row, older_revision, range_filters, range_rows_sql, read_state, timed,
    within_budget_sql,
};
use crate::model::{KeyRange, KeyValue};

/// A database's statements for [`SnapshotPages`] ([`Dialect::SNAPSHOT_TABLE`]).
#[derive(Clone, Copy)]
pub struct SnapshotTable {
    /// Creates the connection's temporary table `kine_rs_snapshot_past` (keyspace, `key`,
    /// mod_revision, sub; by keyspace and key), once per connection.
    pub setup: &'static str,
    /// Empties it.
    pub reset: &'static str,
    /// Adds the rows of `kv_past` of a keyspace (first parameter) superseded after the second
    /// parameter and up to the third, live at the fourth; a key already there stays.
    pub refresh: &'static str,
    /// The table's rows with kv's columns, as a table or view name, or a derived table.
    pub rows: &'static str,
}

/// SQLite's: the table and a view of its rows. In a file: SQLite as built here keeps
/// temporary tables in memory unless told otherwise.
pub const SQLITE: SnapshotTable = SnapshotTable {
    setup: "PRAGMA temp_store = FILE; \
         CREATE TEMP TABLE IF NOT EXISTS kine_rs_snapshot_past (\
         keyspace INTEGER NOT NULL, `key` BLOB NOT NULL, mod_revision INTEGER NOT NULL, \
         sub INTEGER NOT NULL, PRIMARY KEY (keyspace, `key`)) WITHOUT ROWID; \
         CREATE TEMP VIEW IF NOT EXISTS kine_rs_snapshot_rows AS SELECT t.keyspace AS keyspace, \
         t.`key` AS `key`, kv.mod_revision AS mod_revision, kv.sub AS sub, \
         kv.create_revision AS create_revision, kv.version AS version, kv.lease AS lease, \
         kv.value AS value, kv.deleted AS deleted FROM temp.kine_rs_snapshot_past t \
         JOIN main.kv ON kv.keyspace = t.keyspace AND kv.mod_revision = t.mod_revision \
         AND kv.sub = t.sub",
    reset: "DELETE FROM temp.kine_rs_snapshot_past",
    refresh: "INSERT OR IGNORE INTO temp.kine_rs_snapshot_past \
         (keyspace, `key`, mod_revision, sub) \
         SELECT keyspace, `key`, mod_revision, sub FROM main.kv_past \
         WHERE keyspace = ? AND superseded > ? AND superseded <= ? \
         AND mod_revision <= ? AND deleted = 0",
    rows: "kine_rs_snapshot_rows",
};

/// MySQL's: a temporary table (which a READ ONLY transaction may change), its rows as a
/// derived table (a view cannot name a temporary table).
pub const MYSQL: SnapshotTable = SnapshotTable {
    setup: "CREATE TEMPORARY TABLE IF NOT EXISTS kine_rs_snapshot_past (\
         keyspace BIGINT NOT NULL, `key` VARBINARY(3000) NOT NULL, mod_revision BIGINT NOT NULL, \
         sub BIGINT NOT NULL, PRIMARY KEY (keyspace, `key`)) ENGINE = InnoDB",
    reset: "DELETE FROM kine_rs_snapshot_past",
    refresh: "INSERT INTO kine_rs_snapshot_past (keyspace, `key`, mod_revision, sub) \
         SELECT p.keyspace, p.`key`, p.mod_revision, p.sub FROM kv_past p \
         WHERE p.keyspace = ? AND p.superseded > ? AND p.superseded <= ? \
         AND p.mod_revision <= ? AND p.deleted = 0 \
         ON DUPLICATE KEY UPDATE kine_rs_snapshot_past.sub = kine_rs_snapshot_past.sub",
    rows: "(SELECT t.keyspace AS keyspace, t.`key` AS `key`, kv.mod_revision AS mod_revision, \
         kv.sub AS sub, kv.create_revision AS create_revision, kv.version AS version, \
         kv.lease AS lease, kv.value AS value, kv.deleted AS deleted \
         FROM kine_rs_snapshot_past t JOIN kv ON kv.keyspace = t.keyspace \
         AND kv.mod_revision = t.mod_revision AND kv.sub = t.sub) AS snapshot_rows",
};

/// The rows live at `revision` of `keyspace` superseded since, up to `refreshed`.
pub(super) struct SnapshotPages<D: Dialect> {
    conn: Conn<D>,
    table: SnapshotTable,
    keyspace: KeyspaceId,
    revision: Revision,
    /// The keyspace's revision up to which the table holds the rows superseded since
    /// `revision`.
    refreshed: Revision,
    /// When a page was last read ([`Self::last_page`]).
    last_page: std::time::Instant,
}

impl<D: Dialect> SnapshotPages<D> {
    /// Takes `conn` (a connection of its own, read-only on the database) to keep `table`.
    pub(super) async fn new(mut conn: Conn<D>, table: SnapshotTable) -> Result<Self> {
        execute::<D>(&mut conn, "snapshot_setup", table.setup, &[]).await?;
        Ok(SnapshotPages {
            conn,
            table,
            keyspace: 0,
            revision: 0,
            refreshed: 0,
            last_page: std::time::Instant::now(),
        })
    }

    /// Whether its table holds the rows of `keyspace`'s snapshot at `revision` (a read at
    /// the current revision needs no table: any will do).
    pub(super) fn serves(&self, keyspace: KeyspaceId, revision: Revision) -> bool {
        (self.keyspace, self.revision) == (keyspace, revision)
    }

    /// Whether no snapshot at an older revision was read through it yet (keyspace ids start
    /// at 1).
    pub(super) fn unused(&self) -> bool {
        self.keyspace == 0
    }

    /// When a page was last read through it.
    pub(super) fn last_page(&self) -> std::time::Instant {
        self.last_page
    }

    /// Up to `limit` keys of `range` live at `revision` in key order, the first always and
    /// then as many as fit `max_bytes` of keys and values; at the current revision, the
    /// current rows as any read takes them.
    pub(super) async fn page(
        &mut self,
        keyspace: KeyspaceId,
        revision: Revision,
        range: &KeyRange,
        limit: i64,
        max_bytes: usize,
    ) -> Result<Vec<KeyValue>> {
        self.last_page = std::time::Instant::now();
        // Begun as text: MySQL's begin is two statements, which it does not prepare.
        let begin =
            sqlx::Connection::begin_with(&mut self.conn, sqlx::AssertSqlSafe(D::BEGIN_READ));
        let mut tx = timed::<D, _>("begin_read", async { Ok(begin.await?) }).await?;
        let mut at = (self.keyspace, self.revision, self.refreshed);
        let page = page_in_transaction::<D>(
            &mut tx, self.table, &mut at, keyspace, revision, range, limit, max_bytes,
        )
        .await;
        match page {
            Ok((kvs, refreshed)) => {
                // Keeps the rows the table gained (the database's own were only read).
                timed::<D, _>("commit", async { Ok(tx.commit().await?) }).await?;
                (self.keyspace, self.revision, self.refreshed) = at;
                if let Some(refreshed) = refreshed {
                    self.refreshed = refreshed;
                }
                Ok(kvs)
            }
            Err(error) => {
                // Whatever the table gained goes with the transaction; what it holds stays
                // as it was.
                let _ = tx.rollback().await;
                Err(error)
            }
        }
    }
}

/// [`SnapshotPages::page`] inside its read transaction on `conn`, with `at` the snapshot
/// the table holds (keyspace, revision, and the keyspace's revision it was brought up to),
/// changed when the table starts over; also returns the revision the table was brought up
/// to, if it was.
#[allow(clippy::too_many_arguments)]
async fn page_in_transaction<D: Dialect>(
    conn: &mut Conn<D>,
    table: SnapshotTable,
    at_table: &mut (KeyspaceId, Revision, Revision),
    keyspace: KeyspaceId,
    revision: Revision,
    range: &KeyRange,
    limit: i64,
    max_bytes: usize,
) -> Result<(Vec<KeyValue>, Option<Revision>)> {
    let state = read_state::<D>(conn, keyspace, false).await?;
    let at = older_revision(&state, revision)?;
    let mut branches = range_filters::<D>(keyspace, range, None, at);
    let mut refreshed = None;
    if let Some(at) = at {
        // Another snapshot, or a keyspace whose revision went back (deleted and created
        // again): start the table over.
        if (at_table.0, at_table.1) != (keyspace, at) || state.revision < at_table.2 {
            execute::<D>(conn, "snapshot_reset", table.reset, &[]).await?;
            *at_table = (keyspace, at, at);
        }
        if state.revision > at_table.2 {
            // Each row live at `at` is superseded once: by the key's first write since.
            execute::<D>(
                conn,
                "snapshot_refresh",
                table.refresh,
                &[
                    Arg::Int(keyspace),
                    Arg::Int(at_table.2),
                    Arg::Int(state.revision),
                    Arg::Int(at),
                ],
            )
            .await?;
            refreshed = Some(state.revision);
        }
        // The current rows still live from `at` on, and the table's rows in place of
        // `kv_past`'s walk.
        branches.truncate(1);
        let superseded = snapshot_branch(table, keyspace, range, None);
        branches.push(superseded);
    }
    let (rows, mut args) = range_rows_sql(KV_COLUMNS, &branches, Some(limit.max(1)));
    let sql = within_budget_sql::<D>(&rows);
    args.push(Arg::Int(i64::try_from(max_bytes).unwrap_or(i64::MAX)));
    let rows = fetch_all::<D>(conn, "page", &sql, &args).await?;
    let kvs = rows
        .iter()
        .map(|row| kv_from_row::<D>(row, 0))
        .collect::<Result<Vec<_>>>()?;
    Ok((kvs, refreshed))
}

/// The temporary table's rows from `range`'s start, up to `end` (exclusive) if given.
fn snapshot_branch<'a>(
    table: SnapshotTable,
    keyspace: KeyspaceId,
    range: &'a KeyRange,
    end: Option<&'a [u8]>,
) -> RangeBranch<'a> {
    let mut filter = String::from("keyspace = ? AND `key` >= ?");
    let mut args = vec![Arg::Int(keyspace), Arg::Bytes(&range.start)];
    if let Some(end) = end {
        filter.push_str(" AND `key` < ?");
        args.push(Arg::Bytes(end));
    }
    RangeBranch {
        rows: table.rows,
        keys: "kine_rs_snapshot_past",
        filter,
        args,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use bytes::Bytes;

    use crate::model::KeyValue;
    use crate::storage::test_support::MysqlTestDatabase;
    use crate::storage::{Backend, KeyspaceId, Revision, sqlite};

    /// Writes `value` to `key` (`None`: deletes it) in a revision of its own; returns it.
    async fn write(
        backend: &dyn Backend,
        keyspace: KeyspaceId,
        live: &mut BTreeMap<Bytes, KeyValue>,
        key: &str,
        value: Option<&str>,
    ) -> Revision {
        let mut txn = backend.begin_write(keyspace).await.expect("begin");
        let revision = txn.state().revision + 1;
        let key = Bytes::copy_from_slice(key.as_bytes());
        match value {
            Some(value) => {
                let previous = live.get(&key);
                let kv = KeyValue {
                    key: key.clone(),
                    create_revision: previous.map_or(revision, |kv| kv.create_revision),
                    mod_revision: revision,
                    version: previous.map_or(1, |kv| kv.version + 1),
                    value: Bytes::copy_from_slice(value.as_bytes()),
                    lease: 0,
                };
                txn.put(&kv, 0).await.expect("put");
                live.insert(key, kv);
            }
            None => {
                txn.delete(&key, revision, 0).await.expect("delete");
                live.remove(&key);
            }
        }
        txn.commit(revision).await.expect("commit");
        revision
    }

    /// The table lives in a temporary file: SQLite as built here would keep it in memory,
    /// and a snapshot of a million changed keys would hold them all there.
    #[tokio::test]
    async fn the_table_is_kept_in_a_file() {
        let backend = sqlite::open_memory().await.expect("open");
        let conn = sqlx::ConnectOptions::connect(&*backend.readers.connect_options())
            .await
            .expect("connect");
        let mut pages = super::SnapshotPages::<sqlite::Sqlite>::new(conn, super::SQLITE)
            .await
            .expect("setup");
        let temp_store: i64 = sqlx::query_scalar("PRAGMA temp_store")
            .fetch_one(&mut pages.conn)
            .await
            .expect("pragma");
        assert_eq!(temp_store, 1, "temp_store is not FILE");
    }

    /// A snapshot read in pages at an older revision while keys behind and ahead of the
    /// pages are overwritten, deleted and created between them returns exactly the keys live
    /// at that revision, with their rows as they were; and a second snapshot (another
    /// revision) on the same backend starts its own.
    #[tokio::test]
    async fn pages_at_an_older_revision_see_that_revision_while_keys_change() {
        let (backend, keyspace) = sqlite::open_memory_keyspace("t").await;
        pages_see_their_revision(&backend, keyspace).await;
        assert!(backend.snapshot_pages.lock().await.len() > 1);
    }

    /// The same on MySQL (`$KINE_TEST_MYSQL_URL`, which the test command starts; a missing
    /// server fails the test), through its temporary tables.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mysql_pages_at_an_older_revision_see_that_revision_while_keys_change() {
        let db = MysqlTestDatabase::new("kine_unit_snapshot_pages").await;
        pages_see_their_revision(&db.backend, db.keyspace).await;
        assert!(db.backend.snapshot_pages.lock().await.len() > 1);
        db.drop_database().await;
    }

    /// Checks [`pages_at_an_older_revision_see_that_revision_while_keys_change`] on `backend`.
    async fn pages_see_their_revision(backend: &dyn Backend, keyspace: KeyspaceId) {
        let mut live = BTreeMap::new();
        for i in 0..40 {
            write(backend, keyspace, &mut live, &format!("k{i:02}"), Some("a")).await;
        }
        write(backend, keyspace, &mut live, "k05", Some("b")).await;
        write(backend, keyspace, &mut live, "k07", None).await;
        let snapshot = write(backend, keyspace, &mut live, "k09", Some("b")).await;
        let expected: Vec<KeyValue> = live.values().cloned().collect();

        let mut seen: Vec<KeyValue> = Vec::new();
        let mut round = 0;
        loop {
            let after = seen.last().map(|kv| kv.key.to_vec());
            let page = backend
                .page_within(keyspace, snapshot, after.as_deref(), 6, usize::MAX)
                .await
                .expect("page");
            if page.is_empty() {
                break;
            }
            seen.extend(page);
            // Between pages: keys behind and ahead of the cursor change, twice for some.
            round += 1;
            for i in [round, 39 - round, (round * 7) % 40] {
                let key = format!("k{i:02}");
                let value = format!("r{round}");
                write(backend, keyspace, &mut live, &key, Some(&value)).await;
            }
            write(
                backend,
                keyspace,
                &mut live,
                &format!("k{:02}", 20 + round),
                None,
            )
            .await;
            write(
                backend,
                keyspace,
                &mut live,
                &format!("n{round:02}"),
                Some("new"),
            )
            .await;
        }
        assert_eq!(seen, expected);

        // Another snapshot: the revision of the last write before the pages began again.
        let now = backend.state(keyspace).await.expect("state").revision;
        let whole = backend
            .page_within(keyspace, now - 1, None, 1_000, usize::MAX)
            .await
            .expect("page");
        let read = backend
            .range(
                keyspace,
                crate::storage::RangeQuery {
                    range: &crate::storage::page_range(None),
                    revision: now - 1,
                    limit: None,
                    keys_only: false,
                    count_only: false,
                },
            )
            .await
            .expect("range");
        assert_eq!(whole, read.kvs);
        assert!(whole.len() > 30, "{}", whole.len());

        // Six snapshots read side by side, a page of each in turn (more than are kept: some
        // start over), while keys keep changing: each sees its own revision.
        let revisions: Vec<Revision> = (0..6).map(|back| now - 3 * back).collect();
        let mut cursors: Vec<Vec<KeyValue>> = vec![Vec::new(); revisions.len()];
        let mut done = vec![false; revisions.len()];
        let mut turn = 0;
        while done.iter().any(|done| !done) {
            for (i, &revision) in revisions.iter().enumerate() {
                if done[i] {
                    continue;
                }
                let after = cursors[i].last().map(|kv| kv.key.to_vec());
                let page = backend
                    .page_within(keyspace, revision, after.as_deref(), 5, usize::MAX)
                    .await
                    .expect("page");
                done[i] = page.is_empty();
                cursors[i].extend(page);
            }
            turn += 1;
            let key = format!("k{:02}", (turn * 11) % 40);
            write(backend, keyspace, &mut live, &key, Some("later")).await;
        }
        for (revision, seen) in revisions.iter().zip(&cursors) {
            let read = backend
                .range(
                    keyspace,
                    crate::storage::RangeQuery {
                        range: &crate::storage::page_range(None),
                        revision: *revision,
                        limit: None,
                        keys_only: false,
                        count_only: false,
                    },
                )
                .await
                .expect("range");
            assert_eq!(seen, &read.kvs, "snapshot at {revision}");
        }
    }
}
