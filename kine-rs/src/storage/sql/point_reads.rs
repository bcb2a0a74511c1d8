//! Gets of one key at the current revision, several in one statement.
//!
//! kube-apiserver reads a key before each compare-and-swap (`GuaranteedUpdate`), and every
//! get was a statement of its own: on PostgreSQL its setup (plan lookup, executor start, a
//! backend woken and answering) is most of what a one-row read costs, and under txn-update
//! at 16 clients those statements were most of the database's CPU. Here the gets of a
//! keyspace that arrive while [`RUNNERS`] of its statements are running wait for the next
//! one, which reads all their keys with the keyspace row: one snapshot, so every answer
//! carries the revision its rows were read at, as a get of its own would. A get that finds a
//! runner free starts a statement at once: one client sees no wait.
//!
//! Linearizable as etcd's reads are: a get's statement starts after the get arrived, so it
//! sees every write acknowledged before that. The statements run in spawned tasks, so a
//! client that goes away does not strand the gets that joined its statement.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use sqlx::Pool;
use tokio::sync::oneshot;

use super::{
    Arg, Dialect, Driver, MAX_ROWS_PER_STATEMENT, STATE_COLUMN_COUNT, STATE_COLUMNS, acquire,
    current_rows_sql, fetch_all, kv_from_row, named_keys, padded, state_from_row,
};
use crate::error::{KineError, Result};
use crate::model::KeyValue;
use crate::storage::{KeyspaceId, RangeRows, Revision};

/// Statements of one keyspace's gets running at once. With one, a get that arrives during
/// a statement waits for it to end (a tenth of a millisecond or two); measured against two
/// under txn-update at 16 clients on PostgreSQL (`README`), one cost the database less per
/// update and answered as fast, and at three clients neither was slower than no batching.
const RUNNERS: usize = 1;

/// Gets of one keyspace waiting for, or taken into, a statement.
#[derive(Default)]
struct Queue {
    /// Statements running (at most [`RUNNERS`]); each takes the waiting gets when it ends.
    running: usize,
    waiting: Vec<Get>,
}

struct Get {
    key: Bytes,
    keys_only: bool,
    answer: oneshot::Sender<Result<RangeRows>>,
}

/// The gets of every keyspace a backend serves.
pub(super) struct PointReads<D: Dialect> {
    readers: Pool<D::DB>,
    queues: Mutex<HashMap<KeyspaceId, Queue>>,
    /// Statements run, for tests.
    statements: AtomicU64,
}

impl<D: Dialect> PointReads<D> {
    pub(super) fn new(readers: Pool<D::DB>) -> Arc<Self> {
        Arc::new(PointReads {
            readers,
            queues: Mutex::new(HashMap::new()),
            statements: AtomicU64::new(0),
        })
    }

    /// The current row of `key` (none when it has no live one), with the revision it was
    /// read at.
    pub(super) async fn get(
        self: &Arc<Self>,
        keyspace: KeyspaceId,
        key: Bytes,
        keys_only: bool,
    ) -> Result<RangeRows> {
        let (answer, answered) = oneshot::channel();
        let start = {
            let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
            let queue = queues.entry(keyspace).or_default();
            queue.waiting.push(Get {
                key,
                keys_only,
                answer,
            });
            let start = queue.running < RUNNERS;
            if start {
                queue.running += 1;
            }
            start
        };
        if start {
            tokio::spawn(Arc::clone(self).run(keyspace));
        }
        // The runner holds the sender until it answers; it is gone only if the runtime is.
        answered.await.unwrap_or(Err(KineError::Stopped))
    }

    /// How many statements the gets have taken.
    #[cfg(test)]
    pub(super) fn statements(&self) -> u64 {
        self.statements.load(Ordering::Relaxed)
    }

    /// Reads the keyspace's waiting gets, a statement at a time, until none wait.
    async fn run(self: Arc<Self>, keyspace: KeyspaceId) {
        loop {
            let batch: Vec<Get> = {
                let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
                let Some(queue) = queues.get_mut(&keyspace) else {
                    return;
                };
                if queue.waiting.is_empty() {
                    queue.running -= 1;
                    if queue.running == 0 {
                        queues.remove(&keyspace);
                    }
                    return;
                }
                let taken = queue.waiting.len().min(MAX_ROWS_PER_STATEMENT);
                queue.waiting.drain(..taken).collect()
            };
            match self.read(keyspace, &batch).await {
                Ok((revision, live)) => {
                    for get in batch {
                        let kv = live.get(&get.key).cloned().map(|mut kv| {
                            if get.keys_only {
                                kv.value = Bytes::new();
                            }
                            kv
                        });
                        let count = i64::from(kv.is_some());
                        // A get whose client went away has nobody to answer.
                        let _ = get.answer.send(Ok(RangeRows {
                            revision,
                            kvs: kv.into_iter().collect(),
                            count,
                        }));
                    }
                }
                Err(error) => {
                    for get in batch {
                        let _ = get.answer.send(Err(error.clone()));
                    }
                }
            }
        }
    }

    /// One statement: the keyspace row and the current rows of the batch's keys.
    async fn read(
        &self,
        keyspace: KeyspaceId,
        batch: &[Get],
    ) -> Result<(Revision, HashMap<Bytes, KeyValue>)> {
        let mut keys: Vec<&[u8]> = batch.iter().map(|get| get.key.as_ref()).collect();
        keys.sort_unstable();
        keys.dedup();
        // Key lists padded to a power of two with their last key, so that the few statement
        // shapes stay prepared (a repeated key's row comes back again, the same); a JSON
        // table of keys is one shape ([`named_keys`]).
        let values = batch.iter().any(|get| !get.keys_only);
        let named = if D::HEAD_TABLE {
            padded(&keys)
        } else {
            named_keys::<D>(&keys)
        };
        let (rows, mut args) = current_rows_sql::<D>(keyspace, &named, false, values);
        let sql = format!(
            "SELECT {STATE_COLUMNS}, r.* FROM keyspaces s LEFT JOIN ({rows}) r ON TRUE \
             WHERE s.id = ?"
        );
        args.push(Arg::Int(keyspace));
        self.statements.fetch_add(1, Ordering::Relaxed);
        let mut conn = acquire::<D>(&self.readers).await?;
        let rows = fetch_all::<D>(&mut conn, "range", &sql, &args).await?;
        drop(conn);
        let state = state_from_row::<D>(rows.first().ok_or(KineError::KeyspaceDeleted)?, keyspace)?;
        let mut live = HashMap::with_capacity(rows.len());
        for row in &rows {
            // The keyspace row alone (NULL columns of the join): none of the keys has a
            // current row.
            if D::DB::opt_bytes(row, STATE_COLUMN_COUNT)?.is_none() {
                continue;
            }
            // A tombstone is the current row of a deleted key: no live key-value.
            if D::DB::flag(row, STATE_COLUMN_COUNT + 6)? {
                continue;
            }
            let kv = kv_from_row::<D>(row, STATE_COLUMN_COUNT)?;
            live.insert(kv.key.clone(), kv);
        }
        Ok((state.revision, live))
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use crate::model::KeyRange;
    use crate::storage::test_support::{put_keys, read_together};
    use crate::storage::{Backend, BatchKeys, RangeQuery, sqlite};

    fn get(key: &'static str, keys_only: bool) -> (KeyRange, bool) {
        (
            KeyRange::new(Bytes::from_static(key.as_bytes()), Bytes::new()),
            keys_only,
        )
    }

    /// Gets that arrive together are answered from one statement, each with its own key's
    /// row (or none: never written, deleted), its value left out where it asked for keys
    /// only, and the revision of that statement. On a current-thread runtime every get is
    /// queued before the statement's task first runs, so the count is exact.
    #[tokio::test]
    async fn gets_arriving_together_share_one_statement() {
        let (backend, keyspace) = sqlite::open_memory_keyspace("t").await;
        let written: Vec<Bytes> = ["a", "b", "gone"]
            .iter()
            .map(|key| Bytes::from_static(key.as_bytes()))
            .collect();
        let first = put_keys(&backend, keyspace, &written, |index| {
            Bytes::from(format!("value of {:?}", written[index]))
        })
        .await;
        let keys = BatchKeys {
            all: written.clone(),
            created: Vec::new(),
        };
        let mut txn = backend
            .begin_group_write(keyspace, &keys, false)
            .await
            .expect("begin");
        txn.delete(b"gone", first + 1, 0).await.expect("delete");
        txn.commit(first + 1).await.expect("commit");

        let before = backend.point_reads.statements();
        let mut gets = Vec::new();
        for round in 0..30 {
            gets.push(get("a", round % 2 == 1));
            gets.push(get("b", false));
            gets.push(get("gone", false));
            gets.push(get("never", round % 3 == 0));
        }
        let answers = read_together(&backend, keyspace, &gets).await;
        assert_eq!(
            backend.point_reads.statements() - before,
            1,
            "one statement"
        );

        for ((range, keys_only), answer) in gets.iter().zip(&answers) {
            assert_eq!(answer.revision, first + 1, "{range:?}");
            match &range.start[..] {
                b"a" | b"b" => {
                    assert_eq!((answer.count, answer.kvs.len()), (1, 1));
                    let kv = &answer.kvs[0];
                    assert_eq!(kv.key, range.start);
                    assert_eq!(
                        (kv.create_revision, kv.mod_revision, kv.version),
                        (first, first, 1)
                    );
                    let value = if *keys_only {
                        Bytes::new()
                    } else {
                        Bytes::from(format!("value of {:?}", range.start))
                    };
                    assert_eq!(kv.value, value, "{range:?}, keys only: {keys_only}");
                }
                _ => assert_eq!((answer.count, answer.kvs.len()), (0, 0), "{range:?}"),
            }
        }

        // One get alone is a statement of its own, at once.
        let (range, _) = get("b", false);
        let query = RangeQuery {
            range: &range,
            revision: 0,
            limit: None,
            keys_only: false,
            count_only: false,
        };
        let alone = backend.range(keyspace, query).await.expect("get");
        assert_eq!(alone.kvs.len(), 1);
        assert_eq!(backend.point_reads.statements() - before, 2);
    }

    /// On MySQL, gets of more keys than an `IN` list names arriving together name them in one
    /// JSON table (`Dialect::KEYS_JOINED`), inside the statement that reads the keyspace row:
    /// each get has its own key's row, or none. Against the server at `$KINE_TEST_MYSQL_URL`
    /// (the test command starts one); a missing server fails the test.
    #[tokio::test]
    async fn mysql_gets_of_many_keys_arriving_together_share_one_statement() {
        use crate::storage::test_support::MysqlTestDatabase;

        let db = MysqlTestDatabase::new("kine_unit_point_reads").await;
        let (backend, keyspace) = (&db.backend, db.keyspace);
        let written: Vec<Bytes> = (0..2 * super::super::LISTED_KEYS)
            .map(|index| Bytes::from(format!("key/{index:03}")))
            .collect();
        let revision = put_keys(backend, keyspace, &written, |index| {
            Bytes::from(format!("value of {index}"))
        })
        .await;

        let mut asked: Vec<(KeyRange, bool)> = written
            .iter()
            .map(|key| (KeyRange::new(key.clone(), Bytes::new()), false))
            .collect();
        asked.push((
            KeyRange::new(Bytes::from_static(b"key/never"), Bytes::new()),
            false,
        ));
        let before = backend.point_reads.statements();
        let answers = read_together(backend, keyspace, &asked).await;
        assert_eq!(
            backend.point_reads.statements() - before,
            1,
            "one statement"
        );
        for (index, answer) in answers.iter().enumerate() {
            assert_eq!(answer.revision, revision);
            match written.get(index) {
                Some(key) => {
                    assert_eq!(answer.kvs.len(), 1, "{key:?}");
                    assert_eq!(answer.kvs[0].key, key);
                    assert_eq!(answer.kvs[0].value, format!("value of {index}").as_bytes());
                }
                None => assert!(answer.kvs.is_empty(), "a key never written"),
            }
        }
        db.drop_database().await;
    }
}
