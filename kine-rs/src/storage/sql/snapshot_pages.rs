//! Pages of a snapshot at an older revision where superseded rows are ordered by the revision
//! that superseded them ([`Dialect::PAST_TABLE`], SQLite): a tenant migration's copy.
//!
//! A read at an older revision R finds the rows that were live at R and superseded since
//! among every row superseded since R. A snapshot read in a thousand pages would walk them a
//! thousand times (a migration from SQLite: +27 ms a page at 100,000 overwrites since R). One
//! connection keeps them instead, in a temporary table ordered by key, adding at each page
//! only the rows superseded since the page before; each page reads the current rows and that
//! table by key. The table lives in the connection's temporary database (a file), so memory
//! stays bounded whatever the number of keys.

use super::{
    Arg, Conn, Dialect, KV_COLUMNS, KeyspaceId, RangeBranch, Result, Revision, execute, fetch_all,
    kv_from_row, older_revision, range_filters, range_rows_sql, read_state, within_budget_sql,
};
use crate::model::{KeyRange, KeyValue};

/// The temporary table and the view of its rows, created once per connection. In a file:
/// SQLite as built here keeps temporary tables in memory unless told otherwise.
const SETUP: &str = "PRAGMA temp_store = FILE; \
     CREATE TEMP TABLE IF NOT EXISTS kine_rs_snapshot_past (\
     keyspace INTEGER NOT NULL, `key` BLOB NOT NULL, mod_revision INTEGER NOT NULL, \
     sub INTEGER NOT NULL, PRIMARY KEY (keyspace, `key`)) WITHOUT ROWID; \
     CREATE TEMP VIEW IF NOT EXISTS kine_rs_snapshot_rows AS SELECT t.keyspace AS keyspace, \
     t.`key` AS `key`, kv.mod_revision AS mod_revision, kv.sub AS sub, \
     kv.create_revision AS create_revision, kv.version AS version, kv.lease AS lease, \
     kv.value AS value, kv.deleted AS deleted FROM temp.kine_rs_snapshot_past t \
     JOIN main.kv ON kv.keyspace = t.keyspace AND kv.mod_revision = t.mod_revision \
     AND kv.sub = t.sub";

/// The rows live at `revision` of `keyspace` superseded since, up to `refreshed`.
pub(super) struct SnapshotPages<D: Dialect> {
    conn: Conn<D>,
    keyspace: KeyspaceId,
    revision: Revision,
    /// The keyspace's revision up to which the table holds the rows superseded since
    /// `revision`.
    refreshed: Revision,
    /// When a page was last read ([`Self::last_page`]).
    last_page: std::time::Instant,
}

impl<D: Dialect> SnapshotPages<D> {
    /// Takes `conn` (a connection of its own, read-only on the database).
    pub(super) async fn new(mut conn: Conn<D>) -> Result<Self> {
        execute::<D>(&mut conn, "snapshot_setup", SETUP, &[]).await?;
        Ok(SnapshotPages {
            conn,
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
        execute::<D>(&mut self.conn, "begin_read", D::BEGIN_READ, &[]).await?;
        match self
            .page_in_transaction(keyspace, revision, range, limit, max_bytes)
            .await
        {
            Ok((kvs, refreshed)) => {
                // Keeps the rows the table gained (the database's own were only read).
                execute::<D>(&mut self.conn, "commit", "COMMIT", &[]).await?;
                if let Some(refreshed) = refreshed {
                    self.refreshed = refreshed;
                }
                Ok(kvs)
            }
            Err(error) => {
                // Whatever the table gained goes with the transaction; `refreshed` stays.
                let _ = execute::<D>(&mut self.conn, "rollback", "ROLLBACK", &[]).await;
                Err(error)
            }
        }
    }

    /// [`Self::page`] inside its read transaction; also returns the revision the table
    /// was brought up to, if it was.
    async fn page_in_transaction(
        &mut self,
        keyspace: KeyspaceId,
        revision: Revision,
        range: &KeyRange,
        limit: i64,
        max_bytes: usize,
    ) -> Result<(Vec<KeyValue>, Option<Revision>)> {
        let state = read_state::<D>(&mut self.conn, keyspace, false).await?;
        let at = older_revision(&state, revision)?;
        let mut branches = range_filters::<D>(keyspace, range, None, at);
        let mut refreshed = None;
        if let Some(at) = at {
            // Another snapshot, or a keyspace whose revision went back (deleted and created
            // again): start the table over.
            if (self.keyspace, self.revision) != (keyspace, at) || state.revision < self.refreshed {
                execute::<D>(
                    &mut self.conn,
                    "snapshot_reset",
                    "DELETE FROM temp.kine_rs_snapshot_past",
                    &[],
                )
                .await?;
                (self.keyspace, self.revision, self.refreshed) = (keyspace, at, at);
            }
            if state.revision > self.refreshed {
                // Each row live at `at` is superseded once: by the key's first write since.
                execute::<D>(
                    &mut self.conn,
                    "snapshot_refresh",
                    "INSERT OR IGNORE INTO temp.kine_rs_snapshot_past \
                     (keyspace, `key`, mod_revision, sub) \
                     SELECT keyspace, `key`, mod_revision, sub FROM main.kv_past \
                     WHERE keyspace = ? AND superseded > ? AND superseded <= ? \
                     AND mod_revision <= ? AND deleted = 0",
                    &[
                        Arg::Int(keyspace),
                        Arg::Int(self.refreshed),
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
            let superseded = snapshot_branch(keyspace, range, None);
            branches.push(superseded);
        }
        let (rows, mut args) = range_rows_sql(KV_COLUMNS, &branches, Some(limit.max(1)));
        let sql = within_budget_sql::<D>(&rows);
        args.push(Arg::Int(i64::try_from(max_bytes).unwrap_or(i64::MAX)));
        let rows = fetch_all::<D>(&mut self.conn, "page", &sql, &args).await?;
        let kvs = rows
            .iter()
            .map(|row| kv_from_row::<D>(row, 0))
            .collect::<Result<Vec<_>>>()?;
        Ok((kvs, refreshed))
    }
}

/// The temporary table's rows from `range`'s start, up to `end` (exclusive) if given.
fn snapshot_branch<'a>(
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
        rows: "kine_rs_snapshot_rows",
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
        let mut pages = super::SnapshotPages::<sqlite::Sqlite>::new(conn)
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
        let mut live = BTreeMap::new();
        for i in 0..40 {
            write(
                &backend,
                keyspace,
                &mut live,
                &format!("k{i:02}"),
                Some("a"),
            )
            .await;
        }
        write(&backend, keyspace, &mut live, "k05", Some("b")).await;
        write(&backend, keyspace, &mut live, "k07", None).await;
        let snapshot = write(&backend, keyspace, &mut live, "k09", Some("b")).await;
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
                write(&backend, keyspace, &mut live, &key, Some(&value)).await;
            }
            write(
                &backend,
                keyspace,
                &mut live,
                &format!("k{:02}", 20 + round),
                None,
            )
            .await;
            write(
                &backend,
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
            write(&backend, keyspace, &mut live, &key, Some("later")).await;
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
