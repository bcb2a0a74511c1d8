//! The watch hub of one keyspace.
//!
//! It broadcasts every committed revision once, in order, as an [`EventBatch`] shared by all
//! watch streams (`Arc`: one copy of each event however many watchers see it). This
//! process's writer hands it the events of its own commits ([`EventLog`]), so a gateway's
//! watchers get a write's events without a read of it; other processes' commits, announced by
//! the process's one change feed ([`crate::storage::feed`]), and any gap it cannot close
//! from what it was handed, it reads from the backend.
//!
//! The broadcast buffer ([`Ring`]) is bounded in bytes (`--watch-hub-buffer-bytes`): a stream
//! that stops reading makes the hub drop the oldest batches, not hold them; that stream then
//! reads what it missed from history, in steps bounded in bytes too ([`StepSizer`]).
//!
//! A hub runs only while someone watches: the first subscriber starts its task (and its
//! broadcast buffer), and the task ends when the last subscriber has gone. A gateway holding
//! thousands of idle tenants therefore reads nothing for them, and the watched ones share
//! one feed.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use tokio::sync::Notify;
use tracing::warn;

use super::ring::{BatchReceiver, Ring};

use crate::error::KineError;
use crate::model::{Event, EventType, KeyValue, Revision, tombstone};
use crate::storage::feed::Subscription;
use crate::storage::{Backend, KeyspaceId};

/// Most revisions read from the backend per step.
const REVISIONS_PER_BATCH: i64 = 1000;
/// Revisions of the first step, before the size of revisions is known.
const FIRST_STEP: i64 = 16;
/// How often a running hub checks whether its last subscriber left (no database work).
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// The events of the revisions in `(after, revision]`, in order.
#[derive(Debug)]
pub struct EventBatch {
    pub after: Revision,
    pub revision: Revision,
    pub events: Vec<Event>,
}

/// The events a write batch makes, in the order it writes them, recorded as it is applied so
/// that the hub need not read them back. A batch that makes a write it cannot describe
/// (revoking a lease deletes keys whose values it has not read) gives up, and the hub reads
/// that batch's revisions instead.
#[derive(Debug)]
pub struct EventLog {
    events: Option<Vec<Event>>,
    /// The revision of the last event, and the value each key it wrote had before that
    /// revision: an event's `prev_kv` is its key at the revision before (etcd's), also when
    /// the same transaction wrote the key earlier (a put, then a delete of a range holding it).
    revision: Revision,
    before: HashMap<Bytes, Option<KeyValue>>,
}

impl EventLog {
    /// A log that records (`true`: someone watches the keyspace) or one that does not.
    pub fn new(record: bool) -> Self {
        EventLog {
            events: record.then(Vec::new),
            revision: 0,
            before: HashMap::new(),
        }
    }

    /// `kv` written over `current` (the key's live value when it was written).
    pub fn put(&mut self, kv: &KeyValue, current: Option<&KeyValue>) {
        let prev_kv = self.before(&kv.key, kv.mod_revision, current);
        if let Some(events) = &mut self.events {
            events.push(Event {
                r#type: EventType::Put as i32,
                kv: Some(kv.clone()),
                prev_kv,
            });
        }
    }

    /// `current` (the key's live value) deleted at `revision`.
    pub fn delete(&mut self, current: &KeyValue, revision: Revision) {
        let prev_kv = self.before(&current.key, revision, Some(current));
        if let Some(events) = &mut self.events {
            events.push(Event {
                r#type: EventType::Delete as i32,
                kv: Some(tombstone(current.key.clone(), revision)),
                prev_kv,
            });
        }
    }

    /// The value `key` had before `revision`, given its value now.
    fn before(
        &mut self,
        key: &Bytes,
        revision: Revision,
        current: Option<&KeyValue>,
    ) -> Option<KeyValue> {
        // Nothing to tell when nothing is recorded.
        self.events.as_ref()?;
        if revision != self.revision {
            self.revision = revision;
            self.before.clear();
        }
        self.before
            .entry(key.clone())
            .or_insert_with(|| current.cloned())
            .clone()
    }

    /// A write was made that this log does not describe.
    pub fn give_up(&mut self) {
        self.events = None;
    }

    /// The recorded events, unless the log gave up or never recorded.
    pub fn into_events(self) -> Option<Vec<Event>> {
        self.events
    }
}

/// Broadcasts one keyspace's committed events.
pub struct WatchHub {
    backend: Arc<dyn Backend>,
    keyspace: KeyspaceId,
    /// The last revision broadcast, and the broadcast channel while the hub runs. Held while
    /// sending, so a subscriber learns the revision together with a receiver that gets
    /// exactly the batches after it.
    state: Mutex<HubState>,
    wake: Notify,
    /// The highest revision this process knows to be committed.
    committed: AtomicI64,
    /// The highest revision this process's writer is committing (0: none): an announcement
    /// of it (the database's echo of the commit can come before the writer hears back) is
    /// left to the writer, which hands the hub its events.
    writing: AtomicI64,
    /// Most bytes of batches held for streams that have not read them.
    buffer_bytes: usize,
    /// Becomes `true` when the keyspace is deleted (here, or by another process as a request
    /// or the change feed found out), or moved to another datastore inside this process: its
    /// watch and keep-alive streams end, or carry on with the keyspace's successor.
    closed: tokio::sync::watch::Sender<bool>,
}

struct HubState {
    published: Revision,
    /// `Some` exactly while the hub's task runs.
    sender: Option<Arc<Ring>>,
}

/// Sizes steps of reading events so that one step holds about `budget` bytes: revisions can
/// be tiny or carry megabytes (a step of 1,000 revisions of 1 MiB values would read 2 GiB
/// with their previous values), so the step follows the bytes per revision seen so far.
#[derive(Debug, Clone, Copy)]
pub struct StepSizer {
    step: i64,
    budget: usize,
}

impl StepSizer {
    pub fn new(budget: usize) -> Self {
        StepSizer {
            step: FIRST_STEP,
            budget: budget.max(1),
        }
    }

    /// Revisions to read next.
    pub fn step(&self) -> i64 {
        self.step
    }

    /// Learns that `revisions` revisions held `bytes` bytes.
    pub fn observe(&mut self, revisions: i64, bytes: usize) {
        let revisions = revisions.max(1);
        if bytes > self.budget {
            let fitting = (revisions as u128 * self.budget as u128 / bytes as u128) as i64;
            self.step = fitting.clamp(1, REVISIONS_PER_BATCH);
        } else if bytes <= self.budget / 2 && revisions >= self.step {
            self.step = (self.step * 2).min(REVISIONS_PER_BATCH);
        }
    }
}

/// The bytes `events` take, encoded.
pub fn events_bytes(events: &[Event]) -> usize {
    events.iter().map(|e| e.encoded_len() + 4).sum()
}

impl WatchHub {
    /// A hub that starts after revision `published`.
    pub fn new(
        backend: Arc<dyn Backend>,
        keyspace: KeyspaceId,
        published: Revision,
        buffer_bytes: usize,
    ) -> Self {
        WatchHub {
            buffer_bytes,
            backend,
            keyspace,
            state: Mutex::new(HubState {
                published,
                sender: None,
            }),
            wake: Notify::new(),
            committed: AtomicI64::new(published),
            writing: AtomicI64::new(0),
            closed: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Becomes `true` when the keyspace is deleted.
    pub fn closed(&self) -> tokio::sync::watch::Receiver<bool> {
        self.closed.subscribe()
    }

    /// Ends every watch and keep-alive stream of the keyspace (it was deleted).
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Whether the keyspace was deleted (as far as this process knows).
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the hub's task runs (someone watches).
    pub fn running(&self) -> bool {
        self.lock().sender.is_some()
    }

    /// Tells the hub that revisions up to `revision` are committed.
    pub fn committed(&self, revision: Revision) {
        self.committed.fetch_max(revision, Ordering::AcqRel);
        self.wake.notify_one();
    }

    /// This process's writer is committing revisions up to `revision`.
    pub fn writing(&self, revision: Revision) {
        self.writing.fetch_max(revision, Ordering::AcqRel);
    }

    /// This process's writer settled its commits up to `revision` (`None`: all of them, or
    /// they failed); it has told the hub what committed.
    pub fn settled(&self, revision: Option<Revision>) {
        let _ = self
            .writing
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |writing| {
                revision
                    .is_none_or(|revision| writing <= revision)
                    .then_some(0)
            });
        self.wake.notify_one();
    }

    /// This process's writer committed the revisions in `(after, revision]`, making `events`
    /// (`None`: not recorded). When the hub runs and has published exactly up to `after`,
    /// it broadcasts them at once; otherwise (a gap: another process's commits not read yet)
    /// its task reads them.
    pub fn committed_events(
        &self,
        after: Revision,
        revision: Revision,
        events: Option<Vec<Event>>,
    ) {
        if let Some(events) = events
            && revision > after
        {
            // Sized before the lock: streams and the task wait on it.
            let bytes = events_bytes(&events);
            let mut hub = self.lock();
            if hub.sender.is_some() && hub.published == after {
                Self::send(
                    &mut hub,
                    EventBatch {
                        after,
                        revision,
                        events,
                    },
                    bytes,
                );
            }
        }
        self.committed(revision);
    }

    /// The newest revision known to be committed: what headers of responses that do not read
    /// the store report, so a client never sees a revision lower than one it was already given.
    pub fn known_revision(&self) -> Revision {
        self.committed.load(Ordering::Acquire).max(self.published())
    }

    /// The last broadcast revision and a receiver of every batch after it; starts the hub's
    /// task when it is not running.
    pub async fn subscribe(self: &Arc<Self>) -> (Revision, BatchReceiver) {
        // A hub that starts from the state read here needs no first read of events.
        let mut feed = None;
        if !self.running() {
            // Subscribed to the feed before the state is read, so that what is committed
            // after the read is announced.
            let subscription =
                self.backend
                    .feed()
                    .subscribe(self.keyspace, self.published(), &self.backend);
            // Nobody receives batches: skip ahead to the current revision, so the task does
            // not replay what happened while nobody watched (streams read their own history).
            if let Ok(state) = self.backend.state(self.keyspace).await {
                let mut hub = self.lock();
                if hub.sender.is_none() {
                    hub.published = hub.published.max(state.revision);
                    self.committed.fetch_max(state.revision, Ordering::AcqRel);
                    feed = Some(subscription);
                }
            }
        }
        let mut hub = self.lock();
        let receiver = match &hub.sender {
            Some(sender) => sender.subscribe(),
            None => {
                let sender = Ring::new(self.buffer_bytes);
                let receiver = sender.subscribe();
                hub.sender = Some(sender);
                tokio::spawn(self.clone().run(feed));
                receiver
            }
        };
        (hub.published, receiver)
    }

    /// The last broadcast revision.
    pub fn published(&self) -> Revision {
        self.lock().published
    }

    /// Stops the task when nobody subscribes any more; `true` when it should stop.
    fn idle(&self) -> bool {
        let mut hub = self.lock();
        if hub
            .sender
            .as_ref()
            .is_none_or(|sender| sender.receiver_count() == 0)
        {
            hub.sender = None;
            return true;
        }
        false
    }

    /// Tails the backend until nobody subscribes any more.
    ///
    /// It looks when this process's writer commits (no round trip to learn of it) and when
    /// the process's change feed announces a commit of the keyspace past what the hub
    /// published ([`crate::storage::feed`]: another process's commit, announced by the
    /// database or found by the feed's one poll for all keyspaces); never on a timer of its
    /// own.
    ///
    /// `caught_up`: the feed subscription taken before the hub read the keyspace's current
    /// revision as its start; without it, the hub subscribes and reads what it may have
    /// missed first.
    async fn run(self: Arc<Self>, caught_up: Option<Subscription>) {
        let mut sizer = StepSizer::new(self.tail_step_bytes());
        let feed = match caught_up {
            Some(feed) => feed,
            None => {
                // Subscribed before the first tail: what is committed later is announced,
                // what was committed before is read by the tail.
                let feed =
                    self.backend
                        .feed()
                        .subscribe(self.keyspace, self.published(), &self.backend);
                self.tail(&mut sizer, None).await;
                feed
            }
        };
        feed.published(self.published());
        loop {
            if self.idle() {
                return;
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = feed.changed() => {}
                // Only to notice that the last subscriber left.
                _ = tokio::time::sleep(IDLE_CHECK) => continue,
            }
            if feed.take_missing() && !self.is_closed() {
                // The feed's poll no longer found the keyspace: deleted, if its state says so
                // too (another process's delete; this process's own closes it anyway).
                if let Err(KineError::KeyspaceDeleted) = self.backend.state(self.keyspace).await {
                    self.close();
                    continue;
                }
            }
            let published = self.published();
            let unknown = feed.take_unknown();
            let target = self.committed.load(Ordering::Acquire).max(feed.announced());
            if !unknown && target <= published {
                // A commit already published: this process's own, handed over by its
                // writer or echoed by the database.
                feed.published(published);
                continue;
            }
            if !unknown && target <= self.writing.load(Ordering::Acquire) {
                // This process's own commit, announced before its writer heard back: the
                // writer hands its events over (or, if it failed, wakes the hub again).
                continue;
            }
            self.tail(&mut sizer, (!unknown).then_some(target)).await;
            let read = self.published();
            if read > published {
                feed.found_news();
            }
            feed.published(read);
        }
    }

    /// Bytes one step of the hub's reading holds: a fraction of the buffer, so that a step
    /// never pushes out most of what slower streams have not read yet.
    fn tail_step_bytes(&self) -> usize {
        (self.buffer_bytes / 4).max(1)
    }

    /// Bytes of batches held for streams that have not read them.
    pub fn held_bytes(&self) -> usize {
        self.lock()
            .sender
            .as_ref()
            .map_or(0, |ring| ring.held_bytes())
    }

    /// Reads and broadcasts new events until a read finds none or, when the revision to
    /// reach is known (`until`), until it is reached: a read that would find nothing more
    /// costs a statement per commit, and a later commit wakes the hub again anyway.
    async fn tail(&self, sizer: &mut StepSizer, until: Option<Revision>) {
        loop {
            let after = self.published();
            let step = sizer.step();
            let events = match self
                .backend
                .events(self.keyspace, after, after + step, None)
                .await
            {
                Ok(events) => events,
                Err(KineError::Compacted) => {
                    // Compacted past what was broadcast: skip ahead; streams see the gap,
                    // read history, and cancel their watchers as compacted, like etcd.
                    match self.backend.state(self.keyspace).await {
                        Ok(state) => {
                            self.publish(
                                EventBatch {
                                    after: state.compact_revision,
                                    revision: state.compact_revision,
                                    events: Vec::new(),
                                },
                                0,
                            );
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
            let bytes = events_bytes(&events);
            sizer.observe(revision - after, bytes);
            self.publish(
                EventBatch {
                    after,
                    revision,
                    events,
                },
                bytes,
            );
            if until.is_some_and(|until| revision >= until) {
                return;
            }
        }
    }

    /// Broadcasts a batch the task read. The writer may have published some of its revisions
    /// meanwhile ([`WatchHub::committed_events`]): only what follows them goes out.
    fn publish(&self, mut batch: EventBatch, mut bytes: usize) {
        let mut hub = self.lock();
        if batch.revision <= hub.published {
            return;
        }
        if batch.after < hub.published {
            let published = hub.published;
            batch.events.retain(|event| {
                event
                    .kv
                    .as_ref()
                    .is_some_and(|kv| kv.mod_revision > published)
            });
            batch.after = published;
            bytes = events_bytes(&batch.events);
        }
        Self::send(&mut hub, batch, bytes);
    }

    /// Publishes `batch`, which follows what was published, under the state lock.
    fn send(hub: &mut HubState, batch: EventBatch, bytes: usize) {
        hub.published = batch.revision;
        // No receivers is fine: nobody watches.
        if let Some(sender) = &hub.sender {
            sender.send(Arc::new(batch), bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(
        key: &'static str,
        value: &'static str,
        create: Revision,
        modified: Revision,
    ) -> KeyValue {
        KeyValue {
            key: Bytes::from_static(key.as_bytes()),
            value: Bytes::from_static(value.as_bytes()),
            create_revision: create,
            mod_revision: modified,
            version: modified - create + 1,
            lease: 0,
        }
    }

    #[test]
    fn an_event_log_gives_each_event_its_key_at_the_revision_before() {
        let mut log = EventLog::new(true);
        // Revision 5: `a` overwritten, then deleted by a range in the same transaction;
        // `b` created.
        let a4 = kv("a", "old", 3, 4);
        let a5 = kv("a", "new", 3, 5);
        log.put(&a5, Some(&a4));
        log.delete(&a5, 5);
        log.put(&kv("b", "b", 5, 5), None);
        // Revision 6: `a` created again, over nothing.
        log.put(&kv("a", "again", 6, 6), None);
        let events = log.into_events().expect("recorded");
        // (type, value, previous value) of each event.
        type Seen<'a> = (i32, &'a [u8], Option<&'a [u8]>);
        let seen: Vec<Seen> = events
            .iter()
            .map(|e| {
                (
                    e.r#type,
                    e.kv.as_ref().expect("kv").value.as_ref(),
                    e.prev_kv.as_ref().map(|p| p.value.as_ref()),
                )
            })
            .collect();
        let (put, delete) = (EventType::Put as i32, EventType::Delete as i32);
        assert_eq!(
            seen,
            [
                (put, &b"new"[..], Some(&b"old"[..])),
                (delete, &b""[..], Some(&b"old"[..])),
                (put, &b"b"[..], None),
                (put, &b"again"[..], None),
            ]
        );
    }

    #[test]
    fn an_event_log_that_gave_up_or_does_not_record_hands_nothing_over() {
        let mut log = EventLog::new(true);
        log.put(&kv("a", "1", 2, 2), None);
        log.give_up();
        log.put(&kv("b", "1", 3, 3), None);
        assert!(log.into_events().is_none());
        let mut idle = EventLog::new(false);
        idle.put(&kv("a", "1", 2, 2), None);
        assert!(idle.into_events().is_none());
    }
}
