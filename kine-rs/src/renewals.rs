//! Lease renewals of one keyspace, batched.
//!
//! A keep-alive that the coalescing window does not answer from memory renews the lease in
//! the datastore. Renewals of a keyspace go through one task that takes every renewal waiting
//! and stores them together (one statement for up to [`MAX_BATCH`] leases on the SQL
//! datastores), one batch at a time. A tenant flooding keep-alives over thousands of leases
//! thus costs the datastore one renewal statement at a time on one connection, instead of
//! thousands of commits a second on the connections every tenant's writers share.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::error::{KineError, Result};
use crate::model::{LeaseRecord, now_ms};
use crate::storage::{Backend, KeyspaceId};

/// Most leases renewed by one batch.
pub const MAX_BATCH: usize = 256;
/// Renewals waiting for their batch before keep-alives wait to be queued.
const QUEUE: usize = 4096;

struct Renewal {
    id: i64,
    reply: oneshot::Sender<Result<Option<LeaseRecord>>>,
}

/// The handle keep-alives renew leases through.
pub struct Renewer {
    requests: mpsc::Sender<Renewal>,
}

impl Renewer {
    /// Starts the renewal task of `keyspace`; it ends when the `Renewer` is dropped.
    pub fn start(backend: Arc<dyn Backend>, keyspace: KeyspaceId) -> (Renewer, JoinHandle<()>) {
        let (requests, queue) = mpsc::channel(QUEUE);
        let task = tokio::spawn(run(backend, keyspace, queue));
        (Renewer { requests }, task)
    }

    /// Renews lease `id` (in the next batch); `None` when it does not exist or has expired.
    pub async fn renew(&self, id: i64) -> Result<Option<LeaseRecord>> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Renewal { id, reply })
            .await
            .map_err(|_| KineError::Stopped)?;
        answer.await.map_err(|_| KineError::Stopped)?
    }
}

async fn run(backend: Arc<dyn Backend>, keyspace: KeyspaceId, mut queue: mpsc::Receiver<Renewal>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let ids: Vec<i64> = batch.iter().map(|renewal| renewal.id).collect();
        let renewed = backend.renew_leases(keyspace, &ids, now_ms()).await;
        for (i, renewal) in batch.drain(..).enumerate() {
            let answer = match &renewed {
                Ok(leases) => Ok(leases.get(i).copied().flatten()),
                Err(e) => Err(e.clone()),
            };
            // The keep-alive stream may be gone meanwhile: nobody waits for this answer.
            let _ = renewal.reply.send(answer);
        }
    }
}
