//! A batch this process has published whose acknowledgement is still awaited (pipelining).
//!
//! With `sync_interval: always` JetStream fsyncs every message before acknowledging it, one
//! message at a time per stream. A writer that waited for each acknowledgement before it
//! evaluated the next batch left the server idle for the round trip and the evaluation, and
//! its next batch held only the few requests that arrived in between. So the keyspace's
//! writer evaluates its next batch on top of the one in flight (its writes, leases and
//! counters are this overlay) and publishes it right away, with
//! `Nats-Expected-Last-Sequence` set to where the batch in flight lands and
//! `Nats-Expected-Last-Msg-Id` set to that batch's message id: the server stores the next
//! batch only if the one it was computed on is the stream's last message, so if the batch in
//! flight fails, the next fails too, and both are evaluated again. Nothing is acknowledged to
//! a client before its own batch's publish is.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::watch;

use crate::model::{KeyValue, LeaseRecord};
use crate::storage::KeyspaceState;

pub struct InFlight {
    /// The stream sequence the batch lands at when it is stored.
    pub seq: u64,
    /// Its `Nats-Msg-Id`.
    pub msg_id: String,
    /// The keyspace's counters as the batch leaves them.
    pub state: KeyspaceState,
    /// Keys the batch wrote: their live key-value after it (`None`: deleted).
    pub written: HashMap<Bytes, Option<KeyValue>>,
    /// Leases the batch stored (`Some`) or removed (`None`).
    pub leases: HashMap<i64, Option<LeaseRecord>>,
    /// The batch in flight this one was computed on, until that one settles.
    parent: std::sync::Mutex<Option<Arc<InFlight>>>,
    /// `Some(true)` once stored and applied to the image, `Some(false)` once failed.
    outcome: watch::Sender<Option<bool>>,
}

impl InFlight {
    pub fn new(
        seq: u64,
        msg_id: String,
        state: KeyspaceState,
        written: HashMap<Bytes, Option<KeyValue>>,
        leases: HashMap<i64, Option<LeaseRecord>>,
        parent: Option<Arc<InFlight>>,
    ) -> Self {
        InFlight {
            seq,
            msg_id,
            state,
            written,
            leases,
            parent: std::sync::Mutex::new(parent),
            outcome: watch::channel(None).0,
        }
    }

    /// Waits until the batch is stored and applied (`true`) or has failed (`false`).
    pub async fn settled(&self) -> bool {
        let mut outcome = self.outcome.subscribe();
        match outcome.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.unwrap_or(false),
            Err(_) => false,
        }
    }

    /// Records the outcome, and forgets the batch below (settled before this one), so
    /// settled batches do not stay chained in memory.
    pub fn settle(&self, stored: bool) {
        self.outcome.send_replace(Some(stored));
        *self.parent.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Waits until the batch this one was computed on (if any) has settled; `false` when it
    /// failed.
    pub async fn parent_settled(&self) -> bool {
        let parent = self
            .parent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match parent {
            Some(parent) => parent.settled().await,
            None => true,
        }
    }
}

/// Keeps of a transaction's `written` keys (or leases) only those it wrote itself, not the
/// ones it saw in the batch in flight below it (that batch is applied to the image, or
/// failed, before a batch on top of this one is evaluated).
pub fn own<K: std::hash::Hash + Eq, V>(all: &mut HashMap<K, V>, own: &HashSet<K>) {
    all.retain(|key, _| own.contains(key));
}
