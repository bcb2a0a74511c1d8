//! The transaction a write batch holds the keyspace's lock in.
//!
//! On SQLite every call is a hand-off to the connection's worker thread and back, and the
//! keyspace's next batch waits for all of them. sqlx begins a transaction with a call of its
//! own, and cannot begin one with a statement that returns rows; so there the batch's first
//! read carries `BEGIN IMMEDIATE` in the same call ([`WriteTx::Fused`]), and this type keeps
//! what sqlx's transaction would: a COMMIT when asked, a ROLLBACK when dropped without one.

use sqlx::Transaction;
use sqlx::pool::PoolConnection;

use super::{Conn, Dialect, execute};
use crate::error::{KineError, Result};

/// The transaction a write batch holds the keyspace's lock in.
pub(super) enum WriteTx<D: Dialect> {
    /// sqlx's own: BEGIN and COMMIT are calls of their own.
    Tracked(Transaction<'static, D::DB>),
    /// Begun by a statement sent with the batch's first read ([`FusedTx`]).
    Fused(FusedTx<D>),
}

impl<D: Dialect> WriteTx<D> {
    /// The transaction's connection.
    pub(super) fn conn(&mut self) -> Result<&mut Conn<D>> {
        match self {
            WriteTx::Tracked(tx) => Ok(&mut **tx),
            WriteTx::Fused(tx) => tx.conn(),
        }
    }

    /// Commits, recorded as query `commit`.
    pub(super) async fn commit(self) -> Result<()> {
        match self {
            WriteTx::Tracked(tx) => super::commit::<D>(tx).await,
            WriteTx::Fused(tx) => tx.commit().await,
        }
    }
}

/// A transaction begun on a pooled connection by a statement of the caller's (`BEGIN
/// IMMEDIATE` in front of a read), which sqlx does not know of.
pub(super) struct FusedTx<D: Dialect> {
    conn: Option<PoolConnection<D::DB>>,
    /// Whether the transaction may still be open: set before the call that begins it (an
    /// error in that call may come after its BEGIN), cleared by a commit that succeeded.
    open: bool,
}

impl<D: Dialect> FusedTx<D> {
    /// Takes `conn` for a transaction that its next call begins.
    pub(super) fn beginning(conn: PoolConnection<D::DB>) -> Self {
        FusedTx {
            conn: Some(conn),
            open: true,
        }
    }

    fn conn(&mut self) -> Result<&mut Conn<D>> {
        match &mut self.conn {
            Some(conn) => Ok(&mut **conn),
            None => Err(KineError::Storage(
                "a write transaction lost its connection".into(),
            )),
        }
    }

    async fn commit(mut self) -> Result<()> {
        execute::<D>(self.conn()?, "commit", "COMMIT", &[]).await?;
        self.open = false;
        Ok(())
    }
}

impl<D: Dialect> Drop for FusedTx<D> {
    /// Rolls an uncommitted transaction back before the connection goes back to the pool
    /// (the pool's next user, the keyspace's next batch, waits for it); where no runtime can
    /// run the ROLLBACK, or it fails, the connection is closed instead, which ends the
    /// transaction too.
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take().filter(|_| self.open) else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            conn.close_on_drop();
            return;
        };
        runtime.spawn(async move {
            if let Err(error) = execute::<D>(&mut conn, "rollback", "ROLLBACK", &[]).await {
                // Also when the call that was to begin it failed before its BEGIN.
                tracing::debug!(%error, "a write transaction's rollback failed; closing");
                conn.close_on_drop();
            }
        });
    }
}
