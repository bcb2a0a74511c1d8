//! The responses of one Watch stream on their way to the client, bounded in bytes.
//!
//! A channel bounded by a count of responses (as `mpsc` is) bounds nothing when responses
//! carry megabytes of values: 128 responses of 1.5 MiB each would be pinned for a client
//! that stopped reading. Here each queued response holds permits worth its encoded size from
//! a byte budget, and gives them back when the gRPC layer takes it to send; the stream's task
//! waits for room, like etcd's stream waits on a full gRPC send buffer. A response larger
//! than the whole budget still goes, alone.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use kine_proto::etcdserverpb::WatchResponse;
use prost::Message;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tonic::Status;

/// What one Watch stream sends: a response, or the error that ends the stream.
pub type Item = Result<WatchResponse, Status>;

/// Bytes counted for every response besides its encoding, so that a flood of empty responses
/// (progress notifications) is bounded too.
const PER_RESPONSE_BYTES: usize = 64;

/// The client went away: nothing more can be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

/// A byte-bounded channel of Watch responses holding at most about `budget` bytes.
pub fn channel(budget: usize) -> (ResponseSender, ResponseReceiver) {
    let budget = budget.clamp(
        PER_RESPONSE_BYTES,
        Semaphore::MAX_PERMITS.min(u32::MAX as usize),
    );
    let (sender, receiver) = mpsc::unbounded_channel();
    (
        ResponseSender {
            sender,
            room: Arc::new(Semaphore::new(budget)),
            budget,
        },
        ResponseReceiver { receiver },
    )
}

/// Queues responses for the client; see [`channel`].
#[derive(Clone)]
pub struct ResponseSender {
    sender: mpsc::UnboundedSender<(Item, OwnedSemaphorePermit)>,
    room: Arc<Semaphore>,
    budget: usize,
}

impl std::fmt::Debug for ResponseSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseSender")
            .field("budget", &self.budget)
            .field("room", &self.room.available_permits())
            .finish()
    }
}

impl ResponseSender {
    /// Queues `item`, first waiting until the queue has room for its bytes; fails once the
    /// client has gone.
    pub async fn send(&self, item: Item) -> Result<(), Closed> {
        let size = match &item {
            Ok(response) => response.encoded_len(),
            Err(status) => status.message().len(),
        };
        let cost = (size + PER_RESPONSE_BYTES).min(self.budget);
        let permit = tokio::select! {
            permit = self.room.clone().acquire_many_owned(cost as u32) => {
                permit.map_err(|_| Closed)?
            }
            // Queued responses are dropped with the receiver, giving their room back, but a
            // stream waiting for room should not wait for that to notice the client left.
            _ = self.sender.closed() => return Err(Closed),
        };
        self.sender.send((item, permit)).map_err(|_| Closed)
    }

    /// Whether the client has gone.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// Bytes queued and not yet taken by the gRPC layer (for tests).
    pub fn queued_bytes(&self) -> usize {
        self.budget - self.room.available_permits()
    }
}

/// The gRPC layer's end of [`channel`]: a response's room is freed as it is taken.
pub struct ResponseReceiver {
    receiver: mpsc::UnboundedReceiver<(Item, OwnedSemaphorePermit)>,
}

impl Stream for ResponseReceiver {
    type Item = Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        self.receiver
            .poll_recv(cx)
            .map(|next| next.map(|(item, _permit)| item))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A panic is how a test reports.
mod tests {
    use super::*;
    use futures::StreamExt;

    fn response(bytes: usize) -> Item {
        Ok(WatchResponse {
            cancel_reason: "x".repeat(bytes),
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn holds_at_most_its_budget_in_bytes() {
        let (sender, mut receiver) = channel(10_000);
        sender.send(response(4_000)).await.unwrap();
        sender.send(response(4_000)).await.unwrap();
        assert!(sender.queued_bytes() <= 10_000);
        // A third does not fit until the client takes one.
        let third = tokio::spawn({
            let sender = sender.clone();
            async move { sender.send(response(4_000)).await }
        });
        tokio::task::yield_now().await;
        assert!(!third.is_finished());
        assert!(receiver.next().await.is_some());
        third.await.unwrap().unwrap();
        // A response larger than the budget still goes, alone.
        let (sender, mut receiver) = channel(1_000);
        sender.send(response(5_000)).await.unwrap();
        assert_eq!(sender.queued_bytes(), 1_000);
        assert!(receiver.next().await.is_some());
        assert_eq!(sender.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn a_sender_waiting_for_room_notices_the_client_left() {
        let (sender, receiver) = channel(1_000);
        sender.send(response(900)).await.unwrap();
        let waiting = tokio::spawn({
            let sender = sender.clone();
            async move { sender.send(response(900)).await }
        });
        tokio::task::yield_now().await;
        drop(receiver);
        assert_eq!(waiting.await.unwrap(), Err(Closed));
        assert!(sender.is_closed());
    }
}
