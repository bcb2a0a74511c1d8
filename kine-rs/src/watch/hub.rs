//! The watch hub of one keyspace.
//!
//! It reads every committed revision once from the backend, in order, and broadcasts it as an
//! [`EventBatch`] shared by all watch streams (`Arc`: one copy of each event however many
//! watchers see it). It learns of commits from this process's writer immediately and, for
//! backends shared by several processes, by polling (or the backend's notifications).

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, broadcast};
use tracing::warn;

use crate::error::KineError;
use crate::model::{Event, Revision};
use crate::storage::{Backend, Change, KeyspaceId};

/// Revisions read from the backend per step.
const REVISIONS_PER_BATCH: i64 = 1000;
/// Batches kept for slow streams before they fall back to reading history.
const CHANNEL_CAPACITY: usize = 1024;
/// How often a hub checks the backend when nothing told it of a commit.
const SAFETY_POLL: Duration = Duration::from_secs(1);

/// The events of the revisions in `(after, revision]`, in order.
#[derive(Debug)]
pub struct EventBatch {
    pub after: Revision,
    pub revision: Revision,
    pub events: Vec<Event>,
}

/// Broadcasts one keyspace's committed events.
pub struct WatchHub {
    backend: Arc<dyn Backend>,
    keyspace: KeyspaceId,
    /// The last revision broadcast. Held while sending, so a subscriber learns it together
    /// with a receiver that gets exactly the batches after it.
    published: Mutex<Revision>,
    sender: broadcast::Sender<Arc<EventBatch>>,
    wake: Notify,
    /// The highest revision this process knows to be committed.
    committed: AtomicI64,
}

impl WatchHub {
    /// A hub that starts after revision `published`.
    pub fn new(backend: Arc<dyn Backend>, keyspace: KeyspaceId, published: Revision) -> Self {
        let (sender, _) = broadcast::channel(CHANNEL_CAPACITY);
        WatchHub {
            backend,
            keyspace,
            published: Mutex::new(published),
            sender,
            wake: Notify::new(),
            committed: AtomicI64::new(published),
        }
    }

    /// Tells the hub that revisions up to `revision` are committed.
    pub fn committed(&self, revision: Revision) {
        self.committed.fetch_max(revision, Ordering::AcqRel);
        self.wake.notify_one();
    }

    /// The newest revision known to be committed: what headers of responses that do not read
    /// the store report, so a client never sees a revision lower than one it was already given.
    pub fn known_revision(&self) -> Revision {
        self.committed.load(Ordering::Acquire).max(self.published())
    }

    /// The last broadcast revision and a receiver of every batch after it.
    pub fn subscribe(&self) -> (Revision, broadcast::Receiver<Arc<EventBatch>>) {
        let published = self.published.lock().unwrap_or_else(|e| e.into_inner());
        (*published, self.sender.subscribe())
    }

    /// The last broadcast revision.
    pub fn published(&self) -> Revision {
        *self.published.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tails the backend until the task is aborted.
    ///
    /// It looks when this process's writer commits, when the backend announces a commit of
    /// another process ([`Backend::changes`]), and every poll interval; a poll first reads
    /// only the keyspace's counter (one primary-key lookup) and tails only if it moved.
    pub async fn run(self: Arc<Self>) {
        let poll = self.backend.poll_interval().unwrap_or(SAFETY_POLL);
        let mut changes = self.backend.changes();
        loop {
            let polled = tokio::select! {
                _ = self.wake.notified() => false,
                _ = tokio::time::sleep(poll) => true,
                change = next_change(&mut changes) => match change {
                    Ok(Change::Keyspace(id)) if id != self.keyspace => continue,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => false,
                    Err(broadcast::error::RecvError::Closed) => {
                        changes = None;
                        false
                    }
                },
            };
            if polled {
                match self.backend.state(self.keyspace).await {
                    Ok(state) if state.revision <= self.published() => continue,
                    Ok(_) => {}
                    Err(error) => {
                        warn!(%error, "watch hub cannot read the keyspace state");
                        continue;
                    }
                }
            }
            self.tail().await;
        }
    }

    async fn tail(&self) {
        loop {
            let after = self.published();
            let events = match self
                .backend
                .events(self.keyspace, after, after + REVISIONS_PER_BATCH, None)
                .await
            {
                Ok(events) => events,
                Err(KineError::Compacted) => {
                    // Compacted past what was broadcast: skip ahead; streams see the gap,
                    // read history, and cancel their watchers as compacted, like etcd.
                    match self.backend.state(self.keyspace).await {
                        Ok(state) => {
                            self.publish(EventBatch {
                                after: state.compact_revision,
                                revision: state.compact_revision,
                                events: Vec::new(),
                            });
                            continue;
                        }
                        Err(error) => {
                            warn!(%error, "watch hub cannot read the keyspace state");
                            return;
                        }
                    }
                }
                Err(error) => {
                    warn!(%error, "watch hub cannot read new events");
                    return;
                }
            };
            let Some(revision) = events
                .last()
                .and_then(|e| e.kv.as_ref())
                .map(|kv| kv.mod_revision)
            else {
                return;
            };
            self.publish(EventBatch {
                after,
                revision,
                events,
            });
        }
    }

    fn publish(&self, batch: EventBatch) {
        let mut published = self.published.lock().unwrap_or_else(|e| e.into_inner());
        *published = batch.revision;
        self.committed.fetch_max(batch.revision, Ordering::AcqRel);
        // No receivers is fine: nobody watches.
        let _ = self.sender.send(Arc::new(batch));
    }
}

/// The next announcement of `changes`; never, when there are none.
async fn next_change(
    changes: &mut Option<broadcast::Receiver<Change>>,
) -> Result<Change, broadcast::error::RecvError> {
    match changes {
        Some(receiver) => receiver.recv().await,
        None => std::future::pending().await,
    }
}
