//! One gRPC Watch stream: its watchers, served in revision order from the hub, with history
//! read from the backend for watchers that start in the past (or fell behind).
//!
//! A single task owns the stream, so everything it sends is ordered: a progress response at
//! revision R always follows every event up to R.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kine_proto::etcdserverpb::watch_create_request::FilterType;
use kine_proto::etcdserverpb::watch_request::RequestUnion;
use kine_proto::etcdserverpb::{WatchCreateRequest, WatchRequest, WatchResponse};
use prost::Message;
use tokio::sync::broadcast;
use tonic::Status;

use crate::error::{KineError, Result};
use crate::keyspace::Keyspace;
use crate::model::{Event, EventType, KeyRange, Revision};
use crate::served::{WatchRequests, WatchResponses};
use crate::watch::hub::{EventBatch, StepSizer, events_bytes};

struct Watcher {
    range: KeyRange,
    no_put: bool,
    no_delete: bool,
    prev_kv: bool,
    progress_notify: bool,
    fragment: bool,
    /// The first revision this watcher has not been sent yet.
    next: Revision,
    /// Whether events went out since the last progress tick.
    sent_since_tick: bool,
    /// Canceled because its history was compacted. Like etcd, the id stays taken (and can be
    /// canceled by the client) until the client cancels it; it gets nothing more.
    compacted: bool,
}

impl Watcher {
    fn wants(&self, event: &Event) -> bool {
        let Some(kv) = &event.kv else { return false };
        if self.compacted {
            return false;
        }
        if kv.mod_revision < self.next || !self.range.contains(&kv.key) {
            return false;
        }
        let is_delete = event.r#type == EventType::Delete as i32;
        !(is_delete && self.no_delete || !is_delete && self.no_put)
    }

    fn prepare(&self, event: &Event) -> Event {
        let mut event = event.clone();
        // etcd looks up no previous key-value for a creation (a put at version 1), even when
        // the key was deleted and recreated within the same revision.
        let is_create = event.r#type == EventType::Put as i32
            && event.kv.as_ref().is_some_and(|kv| kv.version == 1);
        if !self.prev_kv || is_create {
            event.prev_kv = None;
        }
        event
    }
}

/// Why a create beyond `--max-watches-per-stream` is refused.
pub fn too_many_watches(max: usize) -> String {
    format!(
        "kine-rs: this watch stream holds {max} watchers, the most --max-watches-per-stream \
         allows; cancel some or open another stream"
    )
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        self.keyspace.watch_count(-(self.watchers.len() as i64));
    }
}

/// The client went away: stop serving the stream.
struct Disconnected;

/// Serves one Watch stream until the client closes it.
pub struct WatchStream {
    keyspace: Arc<Keyspace>,
    out: WatchResponses,
    watchers: BTreeMap<i64, Watcher>,
    next_id: i64,
    /// Every event up to this revision has been handled for every watcher.
    position: Revision,
    /// A progress request waiting for `position` to reach this revision.
    pending_progress: Option<Revision>,
    /// The highest header revision sent: no later response reports less.
    header_floor: Revision,
    progress_interval: Duration,
    /// How many revisions of history one step of catching up reads: about as many bytes as
    /// the stream's response buffer holds, so a lagging stream holds at most about twice that.
    history_step: StepSizer,
}

impl WatchStream {
    /// A stream of `keyspace` answering into `out`.
    pub fn new(keyspace: Arc<Keyspace>, out: WatchResponses, progress_interval: Duration) -> Self {
        let history_step = StepSizer::new(keyspace.limits().watch_stream_buffer_bytes);
        WatchStream {
            history_step,
            keyspace,
            out,
            watchers: BTreeMap::new(),
            next_id: 0,
            position: 0,
            pending_progress: None,
            header_floor: 0,
            progress_interval,
        }
    }

    /// Runs the stream over the client's requests.
    pub async fn run(mut self, mut requests: WatchRequests) {
        let (position, mut batches) = self.keyspace.hub().subscribe().await;
        let mut closed = self.keyspace.closed();
        self.position = position;
        let mut ticker = tokio::time::interval_at(
            tokio::time::Instant::now() + self.progress_interval,
            self.progress_interval,
        );
        loop {
            let step = tokio::select! {
                request = requests.next() => match request {
                    Some(Ok(request)) => self.handle(request).await,
                    None | Some(Err(_)) => return,
                },
                batch = batches.recv() => match batch {
                    Ok(batch) => self.deliver(&batch).await,
                    // Missed batches show up as a gap before the next one.
                    Err(broadcast::error::RecvError::Lagged(_)) => Ok(()),
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = ticker.tick() => self.progress_tick().await,
                _ = closed.changed() => {
                    let ended = *closed.borrow_and_update();
                    if !ended {
                        Ok(())
                    } else if let Some(next) = self.keyspace.successor() {
                        // Moved inside this process: carry on from the new datastore, which
                        // has the same revisions; a gap is read from its history.
                        let open = self.watchers.len() as i64;
                        self.keyspace.watch_count(-open);
                        next.watch_count(open);
                        self.keyspace = next;
                        let (published, receiver) = self.keyspace.hub().subscribe().await;
                        batches = receiver;
                        closed = self.keyspace.closed();
                        self.catch_up_all(published).await
                    } else {
                        let _ = self.out.send(Err(Status::not_found(format!(
                            "kine-rs: tenant {:?} was deleted", self.keyspace.name()
                        )))).await;
                        return;
                    }
                }
            };
            if step.is_err() {
                return;
            }
        }
    }

    async fn send(&mut self, mut response: WatchResponse) -> Result<(), Disconnected> {
        if let Some(header) = &mut response.header {
            header.revision = header.revision.max(self.header_floor);
            self.header_floor = header.revision;
        }
        self.out.send(Ok(response)).await.map_err(|_| Disconnected)
    }

    fn response(&self, revision: Revision, watch_id: i64) -> WatchResponse {
        WatchResponse {
            header: Some(self.keyspace.header(revision)),
            watch_id,
            ..Default::default()
        }
    }

    async fn handle(&mut self, request: WatchRequest) -> Result<(), Disconnected> {
        match request.request_union {
            Some(RequestUnion::CreateRequest(create)) => self.create(create).await,
            Some(RequestUnion::CancelRequest(cancel)) => {
                if self.watchers.remove(&cancel.watch_id).is_some() {
                    self.keyspace.watch_count(-1);
                    let mut response = self.response(self.position, cancel.watch_id);
                    response.canceled = true;
                    self.send(response).await?;
                }
                Ok(())
            }
            Some(RequestUnion::ProgressRequest(_)) => {
                // Answer once every write already acknowledged to anyone has been delivered
                // on this stream, so the reported revision is current, as etcd's is.
                let target = self.keyspace.hub().known_revision();
                if self.position >= target {
                    self.send(self.response(self.position, -1)).await
                } else {
                    self.pending_progress = Some(target);
                    Ok(())
                }
            }
            None => Ok(()),
        }
    }

    async fn create(&mut self, create: WatchCreateRequest) -> Result<(), Disconnected> {
        let state = match self.keyspace.state().await {
            Ok(state) => state,
            Err(error) => {
                let _ = self.out.send(Err(error.into())).await;
                return Err(Disconnected);
            }
        };
        // etcd watches "\0", the smallest key, when the key is empty.
        let key = if create.key.is_empty() {
            bytes::Bytes::from_static(b"\0")
        } else {
            create.key.clone()
        };
        let range = KeyRange::new(key.clone(), create.range_end.clone());
        let refused = |reason: &str| {
            let mut response = self.response(state.revision, -1);
            response.created = true;
            response.canceled = true;
            response.cancel_reason = reason.to_string();
            response
        };
        if let crate::model::RangeEnd::Before(end) = &range.end
            && key >= *end
        {
            return self.send(refused("mvcc: watcher range is empty")).await;
        }
        let max = self.keyspace.limits().max_watches_per_stream;
        if self.watchers.len() >= max {
            return self.send(refused(&too_many_watches(max))).await;
        }
        let id = if create.watch_id != 0 {
            if self.watchers.contains_key(&create.watch_id) {
                return self
                    .send(refused(
                        "mvcc: duplicate watch ID provided on the WatchStream",
                    ))
                    .await;
            }
            create.watch_id
        } else {
            while self.watchers.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            self.next_id += 1;
            self.next_id - 1
        };
        let next = if create.start_revision == 0 {
            state.revision + 1
        } else {
            create.start_revision
        };
        let mut created = self.response(state.revision, id);
        created.created = true;
        self.send(created).await?;
        let filters = |f: FilterType| create.filters.contains(&(f as i32));
        self.keyspace.watch_count(1);
        self.watchers.insert(
            id,
            Watcher {
                range,
                no_put: filters(FilterType::Noput),
                no_delete: filters(FilterType::Nodelete),
                prev_kv: create.prev_kv,
                progress_notify: create.progress_notify,
                fragment: create.fragment,
                next,
                sent_since_tick: false,
                compacted: false,
            },
        );
        if next < state.compact_revision {
            return self.compacted(id, state.compact_revision).await;
        }
        if next <= self.position {
            self.catch_up(id, self.position).await?;
        }
        Ok(())
    }

    /// Cancels a watcher whose start was compacted away, as etcd does.
    async fn compacted(&mut self, id: i64, compact_revision: Revision) -> Result<(), Disconnected> {
        if let Some(watcher) = self.watchers.get_mut(&id) {
            watcher.compacted = true;
        }
        let mut response = self.response(self.position.max(compact_revision), id);
        response.compact_revision = compact_revision;
        response.canceled = true;
        self.send(response).await
    }

    /// Sends watcher `id` its events from history, up to `target`.
    async fn catch_up(&mut self, id: i64, target: Revision) -> Result<(), Disconnected> {
        loop {
            let Some(watcher) = self.watchers.get(&id) else {
                return Ok(());
            };
            if watcher.compacted || watcher.next > target {
                return Ok(());
            }
            let after = watcher.next - 1;
            let up_to = (after + self.history_step.step()).min(target);
            let events = self
                .keyspace
                .backend()
                .events(self.keyspace.id(), after, up_to, Some(&watcher.range))
                .await;
            let events = match events {
                Ok(events) => events,
                Err(KineError::Compacted) => {
                    let compact_revision = self
                        .keyspace
                        .state()
                        .await
                        .map(|s| s.compact_revision)
                        .unwrap_or(up_to);
                    return self.compacted(id, compact_revision).await;
                }
                Err(error) => {
                    let _ = self.out.send(Err(error.into())).await;
                    return Err(Disconnected);
                }
            };
            self.history_step
                .observe(up_to - after, events_bytes(&events));
            let selected: Vec<Event> = events
                .iter()
                .filter(|e| watcher.wants(e))
                .map(|e| watcher.prepare(e))
                .collect();
            // Not held while waiting for the client to take the responses.
            drop(events);
            self.send_events(id, up_to, selected).await?;
            if let Some(watcher) = self.watchers.get_mut(&id) {
                watcher.next = up_to + 1;
            }
        }
    }

    /// Brings every watcher up to `revision` from history.
    async fn catch_up_all(&mut self, revision: Revision) -> Result<(), Disconnected> {
        if revision <= self.position {
            return Ok(());
        }
        let ids: Vec<i64> = self.watchers.keys().copied().collect();
        for id in ids {
            self.catch_up(id, revision).await?;
        }
        self.position = revision;
        Ok(())
    }

    async fn deliver(&mut self, batch: &EventBatch) -> Result<(), Disconnected> {
        if batch.revision <= self.position {
            return Ok(());
        }
        if batch.after > self.position {
            // Batches were missed (slow stream or compaction): read the gap from history.
            let ids: Vec<i64> = self.watchers.keys().copied().collect();
            for id in ids {
                self.catch_up(id, batch.after).await?;
            }
            self.position = batch.after;
        }
        let ids: Vec<i64> = self.watchers.keys().copied().collect();
        for id in ids {
            let Some(watcher) = self.watchers.get_mut(&id) else {
                continue;
            };
            let selected: Vec<Event> = batch
                .events
                .iter()
                .filter(|e| watcher.wants(e))
                .map(|e| watcher.prepare(e))
                .collect();
            watcher.next = watcher.next.max(batch.revision + 1);
            self.send_events(id, batch.revision, selected).await?;
        }
        self.position = batch.revision;
        if self
            .pending_progress
            .is_some_and(|target| self.position >= target)
        {
            self.pending_progress = None;
            self.send(self.response(self.position, -1)).await?;
        }
        Ok(())
    }

    async fn send_events(
        &mut self,
        id: i64,
        revision: Revision,
        events: Vec<Event>,
    ) -> Result<(), Disconnected> {
        if events.is_empty() {
            return Ok(());
        }
        let Some(watcher) = self.watchers.get_mut(&id) else {
            return Ok(());
        };
        watcher.sent_since_tick = true;
        let fragment = watcher.fragment;
        self.keyspace.charge_rows_read(events.len() as u64);
        let mut response = self.response(revision, id);
        response.events = events;
        let limit = self.keyspace.limits().max_request_bytes;
        if !fragment || response.encoded_len() <= limit {
            return self.send(response).await;
        }
        // Split into responses under the limit; all but the last are marked as fragments.
        let events = std::mem::take(&mut response.events);
        let mut chunk = Vec::new();
        let mut size = 0;
        let count = events.len();
        for (i, event) in events.into_iter().enumerate() {
            let event_size = event.encoded_len() + 4;
            if !chunk.is_empty() && size + event_size > limit {
                let mut part = response.clone();
                part.events = std::mem::take(&mut chunk);
                part.fragment = true;
                self.send(part).await?;
                size = 0;
            }
            size += event_size;
            chunk.push(event);
            if i + 1 == count {
                let mut last = response.clone();
                last.events = std::mem::take(&mut chunk);
                self.send(last).await?;
            }
        }
        Ok(())
    }

    async fn progress_tick(&mut self) -> Result<(), Disconnected> {
        let position = self.position;
        let due: Vec<i64> = self
            .watchers
            .iter_mut()
            .filter_map(|(id, w)| {
                let due = w.progress_notify
                    && !w.compacted
                    && !w.sent_since_tick
                    && w.next <= position + 1;
                w.sent_since_tick = false;
                due.then_some(*id)
            })
            .collect();
        for id in due {
            self.send(self.response(position, id)).await?;
        }
        Ok(())
    }
}
