//! The hub's broadcast buffer, bounded in bytes.
//!
//! Like `tokio::sync::broadcast`, each receiver reads every batch in order, a batch is freed
//! once every receiver has read it, and a receiver that falls behind the buffer learns it
//! lagged (and reads the gap from history). Unlike it, the buffer is bounded by the bytes of
//! the batches it holds, not their count: 1,024 batches of 1 MiB values would otherwise stay
//! pinned for one watch stream that stopped reading.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;
use tokio::sync::broadcast::error::RecvError;

use super::hub::EventBatch;

/// Most batches held whatever their size (empty batches cost little but are not free).
const MAX_BATCHES: usize = 1024;

/// A broadcast of [`EventBatch`]es holding at most `budget` bytes of unread batches (and
/// always the newest batch, whatever its size).
pub struct Ring {
    state: Mutex<State>,
    arrived: Notify,
    budget: usize,
}

struct State {
    entries: VecDeque<Entry>,
    /// Sequence number of `entries[0]`.
    first: u64,
    /// Bytes of the batches in `entries`.
    bytes: usize,
    receivers: usize,
}

struct Entry {
    batch: Arc<EventBatch>,
    bytes: usize,
    /// Receivers that have not read it yet.
    unread: usize,
}

impl State {
    fn next(&self) -> u64 {
        self.first + self.entries.len() as u64
    }

    fn pop_front(&mut self) {
        if let Some(entry) = self.entries.pop_front() {
            self.bytes -= entry.bytes;
            self.first += 1;
        }
    }

    /// Frees the batches every receiver has read.
    fn pop_read(&mut self) {
        while self.entries.front().is_some_and(|e| e.unread == 0) {
            self.pop_front();
        }
    }
}

impl Ring {
    /// A ring holding at most `budget` bytes of unread batches.
    pub fn new(budget: usize) -> Arc<Ring> {
        Arc::new(Ring {
            state: Mutex::new(State {
                entries: VecDeque::new(),
                first: 0,
                bytes: 0,
                receivers: 0,
            }),
            arrived: Notify::new(),
            budget,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A receiver of every batch sent from now on.
    pub fn subscribe(self: &Arc<Self>) -> BatchReceiver {
        let mut state = self.lock();
        state.receivers += 1;
        BatchReceiver {
            ring: self.clone(),
            next: state.next(),
        }
    }

    /// Receivers alive.
    pub fn receiver_count(&self) -> usize {
        self.lock().receivers
    }

    /// Bytes of the batches held (for tests and metrics).
    pub fn held_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Sends `batch` (of `bytes` bytes) to every receiver; the oldest batches go when the
    /// buffer is over its budget, and receivers that had not read them lag.
    pub fn send(&self, batch: Arc<EventBatch>, bytes: usize) {
        let mut state = self.lock();
        if state.receivers == 0 {
            return;
        }
        let unread = state.receivers;
        state.entries.push_back(Entry {
            batch,
            bytes,
            unread,
        });
        state.bytes += bytes;
        while state.entries.len() > 1
            && (state.bytes > self.budget || state.entries.len() > MAX_BATCHES)
        {
            state.pop_front();
        }
        drop(state);
        self.arrived.notify_waiters();
    }
}

/// One receiver of a [`Ring`].
pub struct BatchReceiver {
    ring: Arc<Ring>,
    /// Sequence number of the next batch this receiver reads.
    next: u64,
}

impl BatchReceiver {
    /// The next batch; `Lagged` when batches this receiver had not read were dropped (the
    /// next call returns the oldest batch still held). Cancel-safe.
    pub async fn recv(&mut self) -> Result<Arc<EventBatch>, RecvError> {
        let ring = self.ring.clone();
        loop {
            let arrived = ring.arrived.notified();
            tokio::pin!(arrived);
            // Registered before looking, so a batch sent in between wakes this waiter.
            arrived.as_mut().enable();
            if let Some(result) = self.try_recv() {
                return result;
            }
            arrived.await;
        }
    }

    fn try_recv(&mut self) -> Option<Result<Arc<EventBatch>, RecvError>> {
        let mut state = self.ring.lock();
        if self.next < state.first {
            let missed = state.first - self.next;
            self.next = state.first;
            return Some(Err(RecvError::Lagged(missed)));
        }
        let index = (self.next - state.first) as usize;
        let entry = state.entries.get_mut(index)?;
        entry.unread -= 1;
        let batch = entry.batch.clone();
        self.next += 1;
        state.pop_read();
        Some(Ok(batch))
    }
}

impl Drop for BatchReceiver {
    fn drop(&mut self) {
        let mut state = self.ring.lock();
        state.receivers -= 1;
        let start = self.next.saturating_sub(state.first) as usize;
        for entry in state.entries.iter_mut().skip(start) {
            entry.unread -= 1;
        }
        state.pop_read();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A panic is how a test reports.
mod tests {
    use super::*;

    fn batch(revision: i64) -> Arc<EventBatch> {
        Arc::new(EventBatch {
            after: revision - 1,
            revision,
            events: Vec::new(),
        })
    }

    #[tokio::test]
    async fn frees_batches_read_by_everyone_and_drops_the_oldest_over_budget() {
        let ring = Ring::new(1_000);
        let mut fast = ring.subscribe();
        let mut slow = ring.subscribe();
        ring.send(batch(1), 400);
        ring.send(batch(2), 400);
        assert_eq!(fast.recv().await.unwrap().revision, 1);
        assert_eq!(ring.held_bytes(), 800, "the slow receiver has read neither");
        assert_eq!(slow.recv().await.unwrap().revision, 1);
        assert_eq!(ring.held_bytes(), 400, "batch 1 was read by both");
        assert_eq!(fast.recv().await.unwrap().revision, 2);
        // Over budget: batch 2 goes although `slow` has not read it.
        ring.send(batch(3), 400);
        ring.send(batch(4), 400);
        assert!(ring.held_bytes() <= 1_000);
        assert!(matches!(slow.recv().await, Err(RecvError::Lagged(1))));
        assert_eq!(slow.recv().await.unwrap().revision, 3);
        assert_eq!(fast.recv().await.unwrap().revision, 3);
        // A dropped receiver releases what it had not read.
        drop(slow);
        assert_eq!(fast.recv().await.unwrap().revision, 4);
        assert_eq!(ring.held_bytes(), 0);
        // The newest batch stays whatever its size.
        ring.send(batch(5), 5_000);
        assert_eq!(fast.recv().await.unwrap().revision, 5);
        drop(fast);
        assert_eq!(ring.receiver_count(), 0);
        ring.send(batch(6), 10);
        assert_eq!(ring.held_bytes(), 0, "nobody receives: nothing is kept");
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_when_a_batch_arrives() {
        let ring = Ring::new(1_000);
        let mut receiver = ring.subscribe();
        let waiting = tokio::spawn(async move { receiver.recv().await.map(|b| b.revision) });
        tokio::task::yield_now().await;
        ring.send(batch(7), 10);
        assert_eq!(waiting.await.unwrap().unwrap(), 7);
    }
}
