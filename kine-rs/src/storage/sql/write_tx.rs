//! The transaction a write batch holds the keyspace's lock in, and SQLite's connection of its
//! own for write batches.
//!
//! sqlx gives a pooled connection back through a task it spawns, which pings the connection
//! before the pool lends it again: on SQLite a hand-off to the connection's worker thread, and
//! under load a wait for the runtime to run that task, between every two batches of the
//! database's single writer (`begin_write` took 3–5 ms a batch at 128 clients, 0.06 ms at one).
//! So SQLite's write batches run on a connection taken out of the pool for good
//! ([`BatchConnection`]), behind an async lock, and begin and commit their transactions
//! themselves ([`WriteTx::Own`]): `BEGIN IMMEDIATE` in the call of the batch's first read
//! (or, for a batch started from the commit cache, its first call, `super::UnreadBatch`),
//! `COMMIT` at the end of its last call (after the checks of [`super::ChangedRowsCheck`]) or
//! when asked, `ROLLBACK` when dropped without one.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::pool::PoolConnection;
use sqlx::{Pool, Transaction};
use tokio::sync::{Mutex, OwnedMutexGuard};

use super::{Conn, Dialect, execute};
use crate::error::{KineError, Result};

/// The transaction a write batch holds the keyspace's lock in.
pub(super) enum WriteTx<D: Dialect> {
    /// sqlx's own, on a pooled connection: BEGIN and COMMIT are calls of their own.
    Tracked(Transaction<'static, D::DB>),
    /// On the [`BatchConnection`], begun by a statement sent with the batch's first read.
    Own(OwnTx<D>),
}

impl<D: Dialect> WriteTx<D> {
    /// The transaction's connection.
    pub(super) fn conn(&mut self) -> Result<&mut Conn<D>> {
        match self {
            WriteTx::Tracked(tx) => Ok(&mut **tx),
            WriteTx::Own(tx) => tx.conn(),
        }
    }

    /// Ends a transaction the batch's last call committed
    /// ([`super::ChangedRowsCheck`]).
    pub(super) fn committed(self) {
        if let WriteTx::Own(mut tx) = self {
            tx.open = false;
        }
    }

    /// Commits, recorded as query `commit`.
    pub(super) async fn commit(self) -> Result<()> {
        match self {
            WriteTx::Tracked(tx) => super::commit::<D>(tx).await,
            WriteTx::Own(tx) => tx.commit().await,
        }
    }
}

/// A connection of the write pool's database kept out of the pool for write batches (SQLite,
/// whose single writer they are). Empty after a rollback failed: the next batch takes a new
/// connection from the pool.
pub(super) struct BatchConnection<D: Dialect> {
    conn: Arc<Mutex<Option<Conn<D>>>>,
    pool: Pool<D::DB>,
    /// How many connections it took before the current one: what one connection observed
    /// (SQLite's `data_version`) says nothing about the next.
    generation: Arc<AtomicU64>,
}

impl<D: Dialect> Clone for BatchConnection<D> {
    fn clone(&self) -> Self {
        BatchConnection {
            conn: self.conn.clone(),
            pool: self.pool.clone(),
            generation: self.generation.clone(),
        }
    }
}

impl<D: Dialect> BatchConnection<D> {
    /// Takes a connection out of `pool` (which may open another for its other users).
    pub(super) async fn take_from(pool: &Pool<D::DB>) -> Result<Self> {
        let conn = Self::detached(pool).await?;
        Ok(BatchConnection {
            conn: Arc::new(Mutex::new(Some(conn))),
            pool: pool.clone(),
            generation: Arc::new(AtomicU64::new(0)),
        })
    }

    /// A connection of `pool` kept out of it, set up for write calls that commit
    /// ([`super::ChangedRowsCheck`]).
    async fn detached(pool: &Pool<D::DB>) -> Result<Conn<D>> {
        let mut conn = PoolConnection::detach(super::acquire::<D>(pool).await?);
        if let Some(check) = D::CHANGED_ROWS_CHECK {
            execute::<D>(&mut conn, "batch_setup", check.setup, &[]).await?;
        }
        Ok(conn)
    }

    /// The connection, for a transaction its next call begins; batches wait here for each
    /// other.
    pub(super) async fn begin(&self) -> Result<OwnTx<D>> {
        let mut guard = self.conn.clone().lock_owned().await;
        if guard.is_none() {
            *guard = Some(Self::detached(&self.pool).await?);
            self.generation.fetch_add(1, Ordering::SeqCst);
        }
        Ok(OwnTx {
            guard: Some(guard),
            open: true,
            generation: self.generation.load(Ordering::SeqCst),
        })
    }

    /// Which connection batches run on now (see `generation`).
    pub(super) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }
}

/// A transaction on the [`BatchConnection`], which sqlx does not know of.
pub(super) struct OwnTx<D: Dialect> {
    /// The connection's lock; `None` only while dropping.
    guard: Option<OwnedMutexGuard<Option<Conn<D>>>>,
    /// Whether the transaction may still be open: set before the call that begins it (an
    /// error in that call may come after its BEGIN), cleared by a commit that succeeded.
    open: bool,
    /// The [`BatchConnection`]'s generation of the connection held.
    generation: u64,
}

impl<D: Dialect> OwnTx<D> {
    /// The generation of its connection ([`BatchConnection::generation`]).
    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    /// Gives the connection back to the next batch without having begun a transaction.
    pub(super) fn release(mut self) {
        self.open = false;
    }

    fn conn(&mut self) -> Result<&mut Conn<D>> {
        self.guard
            .as_mut()
            .and_then(|guard| guard.as_mut())
            .ok_or_else(|| KineError::Storage("a write transaction lost its connection".into()))
    }

    async fn commit(mut self) -> Result<()> {
        execute::<D>(self.conn()?, "commit", "COMMIT", &[]).await?;
        self.open = false;
        Ok(())
    }
}

impl<D: Dialect> Drop for OwnTx<D> {
    /// Rolls an uncommitted transaction back before the next batch gets the connection (it
    /// waits for the lock, which the rollback holds); where no runtime can run the ROLLBACK,
    /// or it fails, the connection is dropped instead (closing it ends the transaction too)
    /// and the next batch takes a new one from the pool.
    fn drop(&mut self) {
        let Some(mut guard) = self.guard.take().filter(|_| self.open) else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            *guard = None;
            return;
        };
        runtime.spawn(async move {
            let Some(mut conn) = guard.take() else {
                return;
            };
            match execute::<D>(&mut conn, "rollback", "ROLLBACK", &[]).await {
                Ok(_) => *guard = Some(conn),
                // Also when the call that was to begin it failed before its BEGIN.
                Err(error) => tracing::debug!(%error, "a write batch's rollback failed"),
            }
        });
    }
}
