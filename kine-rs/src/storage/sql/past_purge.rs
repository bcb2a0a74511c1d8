//! Compaction's purge where superseded rows are named by `kv_past` ([`Dialect::PAST_TABLE`]:
//! SQLite, MySQL), one bounded step at a time.
//!
//! Only the removal of current tombstones takes the keyspace's lock. A row superseded at or
//! before the compaction's revision is read by nothing at or after it, and writers only add
//! rows of `kv_past` superseded later, so removing it meets no writer; under the lock, each
//! step of 500 such rows made the keyspace's writers queue behind it (MariaDB, puts at 128
//! clients beside 2,000,000 revisions: p99 13.7 → 33 ms while the compaction ran). SQLite's
//! write transaction is its database's lock whichever way.

use super::{
    Arg, Dialect, Driver, MAX_ROWS_PER_STATEMENT, Row, SqlBackend, acquire, begin, commit, execute,
    fetch_all, placeholders,
};
use crate::error::Result;
use crate::storage::{KeyspaceId, Revision};

/// A row of `kv` a step removes, with what names it: its head (`superseded` none), or its row
/// of `kv_past`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct NamedRow {
    pub key: Vec<u8>,
    pub mod_revision: Revision,
    pub sub: i64,
    pub superseded: Option<Revision>,
}

impl NamedRow {
    /// A row of `kv_past` as `key`, `mod_revision`, `sub`, `superseded`; a current row as
    /// `key`, `mod_revision`, `sub`.
    fn read<D: Dialect>(row: &Row<D>, superseded: bool) -> Result<Self> {
        Ok(NamedRow {
            key: D::DB::bytes(row, 0)?,
            mod_revision: D::DB::int(row, 1)?,
            sub: D::DB::int(row, 2)?,
            superseded: if superseded {
                Some(D::DB::int(row, 3)?)
            } else {
                None
            },
        })
    }
}

impl<D: Dialect> SqlBackend<D> {
    /// One bounded step of a compaction at `revision`: at most `batch` rows superseded at or
    /// before `revision` (the first of `kv_past`, which is ordered by superseding revision);
    /// once those are gone, the next `batch` rows of `kv` below `revision` in revision order
    /// from where this process's walk of the keyspace stopped, of which the current
    /// tombstones go with their heads. A tombstone superseded after `revision` (its key
    /// written again since) stays until a compaction passes that revision: no read at or
    /// after `revision` sees it, and `kv_past` finds it only by that revision. Returns how
    /// many rows of `kv` it removed, at least 1 while rows remain.
    ///
    /// The walk goes on from step to step and from one compaction to the next: a row it
    /// passed was a current tombstone and went, or was not one, and rows written later have
    /// higher revisions. Searched from the start of `kv` at every step instead, the
    /// tombstones were a scan of the keyspace's whole history under its lock: with
    /// 10,000,000 rows on MariaDB, puts fell to 17/s (p99 22.7 s) while the compaction ran.
    pub(super) async fn purge_past(
        &self,
        keyspace: KeyspaceId,
        revision: Revision,
        batch: i64,
    ) -> Result<u64> {
        // Any commit but the batch connection's own changes SQLite's `data_version`: the next
        // batch reads first instead of having its cached start refused.
        if let Some(cache) = &self.commit_cache {
            cache.forget(keyspace);
        }
        let (listed, removed) = self.purge_superseded(keyspace, revision, batch).await?;
        if listed >= batch {
            return Ok(removed.max(1));
        }
        let from = self
            .tombstone_walks
            .lock()
            .ok()
            .and_then(|walks| walks.get(&keyspace).copied())
            .unwrap_or((0, -1));
        let (walked, tombstones, reached) = self
            .walk_for_tombstones(keyspace, revision, batch, from)
            .await?;
        let mut removed = removed;
        if !tombstones.is_empty() {
            let (mut tx, _) = self.begin_locked(keyspace).await?;
            removed += remove_current_tombstones::<D>(&mut tx, keyspace, &tombstones).await?;
            commit::<D>(tx).await?;
        }
        if let (Some(reached), Ok(mut walks)) = (reached, self.tombstone_walks.lock()) {
            walks.insert(keyspace, reached);
        }
        // Rows left to walk: one step more, even if this one removed nothing.
        Ok(if walked >= batch {
            removed.max(1)
        } else {
            removed
        })
    }

    /// Removes the first `batch` rows superseded at or before `revision`, without the
    /// keyspace's lock (the module's note says why); returns how many rows `kv_past` listed
    /// and how many rows of `kv` went.
    async fn purge_superseded(
        &self,
        keyspace: KeyspaceId,
        revision: Revision,
        batch: i64,
    ) -> Result<(i64, u64)> {
        let mut tx = begin::<D>(&self.writers, "begin_write", D::BEGIN_WRITE).await?;
        let rows = fetch_all::<D>(
            &mut tx,
            "purge",
            "SELECT `key`, mod_revision, sub, superseded FROM kv_past WHERE keyspace = ? \
             AND superseded <= ? ORDER BY superseded LIMIT ?",
            &[Arg::Int(keyspace), Arg::Int(revision), Arg::Int(batch)],
        )
        .await?;
        let named = rows
            .iter()
            .map(|row| NamedRow::read::<D>(row, true))
            .collect::<Result<Vec<_>>>()?;
        let removed = remove_rows::<D>(&mut tx, keyspace, &named, RowsNamedBy::Past).await?;
        commit::<D>(tx).await?;
        Ok((named.len() as i64, removed))
    }

    /// The next `batch` rows of `kv` below `revision` after `from` (revision, sub), read
    /// without the keyspace's lock: how many there were, those that were current tombstones
    /// (their heads name them), and the last one's place.
    async fn walk_for_tombstones(
        &self,
        keyspace: KeyspaceId,
        revision: Revision,
        batch: i64,
        from: (Revision, i64),
    ) -> Result<(i64, Vec<NamedRow>, Option<(Revision, i64)>)> {
        let mut conn = acquire::<D>(&self.readers).await?;
        let rows = fetch_all::<D>(
            &mut conn,
            "purge",
            "SELECT kv.`key`, kv.mod_revision, kv.sub, h.`key` FROM kv LEFT JOIN kv_head h \
             ON kv.deleted = 1 AND h.keyspace = kv.keyspace AND h.`key` = kv.`key` \
             AND h.mod_revision = kv.mod_revision AND h.sub = kv.sub \
             WHERE kv.keyspace = ? AND (kv.mod_revision > ? OR (kv.mod_revision = ? AND kv.sub > ?)) \
             AND kv.mod_revision < ? ORDER BY kv.mod_revision, kv.sub LIMIT ?",
            &[
                Arg::Int(keyspace),
                Arg::Int(from.0),
                Arg::Int(from.0),
                Arg::Int(from.1),
                Arg::Int(revision),
                Arg::Int(batch),
            ],
        )
        .await?;
        let mut tombstones = Vec::new();
        for row in &rows {
            if D::DB::opt_bytes(row, 3)?.is_some() {
                tombstones.push(NamedRow::read::<D>(row, false)?);
            }
        }
        let reached = match rows.last() {
            Some(last) => Some((D::DB::int(last, 1)?, D::DB::int(last, 2)?)),
            None => None,
        };
        Ok((rows.len() as i64, tombstones, reached))
    }
}

/// Under the keyspace's lock, removes those of `tombstones` (read without it) that are still
/// their keys' current rows, with their heads; returns how many rows of `kv` went. A key
/// written again since has a new head, and its tombstone a row of `kv_past`: the tombstone
/// stays for that row to name.
pub(super) async fn remove_current_tombstones<D: Dialect>(
    tx: &mut super::Conn<D>,
    keyspace: KeyspaceId,
    tombstones: &[NamedRow],
) -> Result<u64> {
    let mut current = Vec::with_capacity(tombstones.len());
    for chunk in tombstones.chunks(MAX_ROWS_PER_STATEMENT) {
        let mut args = Vec::with_capacity(chunk.len() * 4);
        for row in chunk {
            args.extend([
                Arg::Int(keyspace),
                Arg::Bytes(&row.key),
                Arg::Int(row.mod_revision),
                Arg::Int(row.sub),
            ]);
        }
        // Each head by its primary key: SQLite searches each term of an `OR` by index.
        let sql = format!(
            "SELECT `key`, mod_revision, sub FROM kv_head WHERE {}",
            vec![HEAD_BY_KEY; chunk.len()].join(" OR ")
        );
        for row in fetch_all::<D>(tx, "purge", &sql, &args).await? {
            current.push(NamedRow::read::<D>(&row, false)?);
        }
    }
    remove_rows::<D>(tx, keyspace, &current, RowsNamedBy::Head).await
}

/// A head naming one row of `kv`.
const HEAD_BY_KEY: &str = "(keyspace = ? AND `key` = ? AND mod_revision = ? AND sub = ?)";
/// A row of `kv_past` naming one row of `kv`.
const PAST_BY_KEY: &str =
    "(keyspace = ? AND superseded = ? AND `key` = ? AND mod_revision = ? AND sub = ?)";

/// The table naming the rows [`remove_rows`] removes.
#[derive(Clone, Copy)]
enum RowsNamedBy {
    /// `kv_head`: current rows.
    Head,
    /// `kv_past`: superseded rows, each with its `superseded`.
    Past,
}

/// Removes the rows of `kv` that `rows` name and the rows of the table naming them; returns
/// how many rows of `kv` went.
async fn remove_rows<D: Dialect>(
    tx: &mut super::Conn<D>,
    keyspace: KeyspaceId,
    rows: &[NamedRow],
    named_by: RowsNamedBy,
) -> Result<u64> {
    let (table, by_key) = match named_by {
        RowsNamedBy::Head => ("kv_head", HEAD_BY_KEY),
        RowsNamedBy::Past => ("kv_past", PAST_BY_KEY),
    };
    let mut removed = 0;
    if !D::MULTI_STATEMENT {
        // Two statements a chunk, each row by its primary key.
        for chunk in rows.chunks(MAX_ROWS_PER_STATEMENT) {
            let sql = format!(
                "DELETE FROM {table} WHERE {}",
                vec![by_key; chunk.len()].join(" OR ")
            );
            execute::<D>(tx, "purge", &sql, &naming_args(keyspace, chunk)).await?;
            let mut args = Vec::with_capacity(chunk.len() * 3);
            for row in chunk {
                args.extend([
                    Arg::Int(keyspace),
                    Arg::Int(row.mod_revision),
                    Arg::Int(row.sub),
                ]);
            }
            let sql = format!(
                "DELETE FROM kv WHERE {}",
                vec!["(keyspace = ? AND mod_revision = ? AND sub = ?)"; chunk.len()].join(" OR ")
            );
            removed += execute::<D>(tx, "purge", &sql, &args).await?;
        }
        return Ok(removed);
    }
    for chunk in rows.chunks(MAX_ROWS_PER_STATEMENT) {
        // Each row by its primary key: SQLite searches each term of an `OR` by index (a
        // list of row values it would not).
        let mut sql = format!(
            "DELETE FROM {table} WHERE {}; ",
            vec![by_key; chunk.len()].join(" OR ")
        );
        let mut args = naming_args(keyspace, chunk);
        // The revisions as a list first: a list of row values alone is not searched by index.
        sql.push_str(&format!(
            "DELETE FROM kv WHERE keyspace = ? AND mod_revision IN ({}) \
             AND (mod_revision, sub) IN (VALUES {})",
            placeholders(chunk.len()),
            vec!["(?, ?)"; chunk.len()].join(", ")
        ));
        args.push(Arg::Int(keyspace));
        args.extend(chunk.iter().map(|row| Arg::Int(row.mod_revision)));
        for row in chunk {
            args.extend([Arg::Int(row.mod_revision), Arg::Int(row.sub)]);
        }
        let changed = execute::<D>(tx, "purge", &sql, &args).await?;
        // Each row of `kv` goes with exactly one row of the table naming it.
        removed += changed / 2;
    }
    Ok(removed)
}

/// The arguments of [`remove_rows`]'s terms naming `chunk`'s rows in their naming table.
fn naming_args(keyspace: KeyspaceId, chunk: &[NamedRow]) -> Vec<Arg<'_>> {
    let mut args = Vec::with_capacity(chunk.len() * 5);
    for row in chunk {
        args.push(Arg::Int(keyspace));
        args.extend(row.superseded.map(Arg::Int));
        args.extend([
            Arg::Bytes(&row.key),
            Arg::Int(row.mod_revision),
            Arg::Int(row.sub),
        ]);
    }
    args
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::storage::test_support::{MysqlTestDatabase, delete_key, put_keys};
    use crate::storage::{Backend, BatchKeys, sqlite};

    /// How many rows of `kv` the keyspace has.
    async fn kv_rows<D: Dialect>(backend: &SqlBackend<D>, keyspace: KeyspaceId) -> i64 {
        let mut conn = acquire::<D>(&backend.readers).await.expect("acquire");
        let rows = fetch_all::<D>(
            &mut conn,
            "test",
            "SELECT COUNT(*) FROM kv WHERE keyspace = ?",
            &[Arg::Int(keyspace)],
        )
        .await
        .expect("count");
        D::DB::int(&rows[0], 0).expect("count")
    }

    /// Of two tombstones the walk read without the lock, the one whose key was written again
    /// before the purge took the lock stays (its key's `kv_past` row names it now); the
    /// other goes with its head.
    async fn tombstones_written_over_since_the_walk_stay<D: Dialect>(
        backend: &SqlBackend<D>,
        keyspace: KeyspaceId,
    ) {
        let gone = Bytes::from_static(b"gone");
        let back = Bytes::from_static(b"back");
        put_keys(backend, keyspace, &[gone.clone(), back.clone()], |_| {
            Bytes::from_static(b"first")
        })
        .await;
        delete_key(backend, keyspace, &gone).await;
        let deleted = delete_key(backend, keyspace, &back).await;
        let (walked, tombstones, reached) = backend
            .walk_for_tombstones(keyspace, deleted + 1, 500, (0, -1))
            .await
            .expect("walk");
        assert_eq!(walked, 4, "two puts and two tombstones");
        assert_eq!(tombstones.len(), 2, "{tombstones:?}");
        assert_eq!(reached, Some((deleted, 0)));
        put_keys(backend, keyspace, std::slice::from_ref(&back), |_| {
            Bytes::from_static(b"again")
        })
        .await;
        let before = kv_rows(backend, keyspace).await;
        let (mut tx, _) = backend.begin_locked(keyspace).await.expect("lock");
        let removed = remove_current_tombstones::<D>(&mut tx, keyspace, &tombstones)
            .await
            .expect("remove");
        commit::<D>(tx).await.expect("commit");
        assert_eq!(
            removed, 1,
            "only the tombstone of the key not written since"
        );
        assert_eq!(kv_rows(backend, keyspace).await, before - 1);
        // The key written again keeps its value, and the deleted one stays deleted.
        let mut txn = backend
            .begin_group_write(
                keyspace,
                &BatchKeys {
                    all: vec![gone.clone(), back.clone()],
                    created: Vec::new(),
                },
                false,
            )
            .await
            .expect("begin");
        assert_eq!(txn.get(&gone).await.expect("get"), None);
        let value = txn.get(&back).await.expect("get").expect("back is live");
        assert_eq!(value.value, Bytes::from_static(b"again"));
    }

    #[tokio::test]
    async fn sqlite_tombstones_written_over_since_the_walk_stay() {
        let (backend, keyspace) = sqlite::open_memory_keyspace("t").await;
        tombstones_written_over_since_the_walk_stay(&backend, keyspace).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mysql_tombstones_written_over_since_the_walk_stay() {
        let db = MysqlTestDatabase::new("kine_unit_past_purge_tombstones").await;
        tombstones_written_over_since_the_walk_stay(&db.backend, db.keyspace).await;
        db.drop_database().await;
    }

    /// On MySQL the superseded rows go, and the walk that follows them passes, while a
    /// writer holds the keyspace's lock: a purge step no longer makes the writers wait.
    /// (Waiting for the lock, the step would time out; InnoDB gives up after 50 s.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mysql_superseded_rows_go_while_a_writer_holds_the_keyspace() {
        let db = MysqlTestDatabase::new("kine_unit_past_purge_lock").await;
        let (backend, keyspace) = (&db.backend, db.keyspace);
        let key = Bytes::from_static(b"a");
        let mut last = 0;
        for round in 0..5u8 {
            last = put_keys(backend, keyspace, std::slice::from_ref(&key), |_| {
                Bytes::from(vec![round])
            })
            .await;
        }
        let mut writer = backend.writer_pool().begin().await.expect("begin");
        sqlx::query("SELECT revision FROM keyspaces WHERE id = ? FOR UPDATE")
            .bind(keyspace)
            .fetch_one(&mut *writer)
            .await
            .expect("the keyspace's lock");
        let step = || {
            tokio::time::timeout(
                Duration::from_secs(20),
                backend.purge_compacted(keyspace, last, 500),
            )
        };
        let superseded = step()
            .await
            .expect("the purge of superseded rows waited for the keyspace's lock")
            .expect("purge");
        assert_eq!(superseded, 4);
        let walked = step()
            .await
            .expect("the walk waited for the keyspace's lock")
            .expect("purge");
        assert_eq!(walked, 0);
        writer.rollback().await.expect("rollback");
        assert_eq!(kv_rows(backend, keyspace).await, 1);
        db.drop_database().await;
    }
}
