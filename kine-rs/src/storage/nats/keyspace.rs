//! One open keyspace of this process: its stream, its in-memory [`Image`], and the task that
//! follows the stream with an ordered consumer and applies every new message.
//!
//! Messages are applied strictly in stream-sequence order, whoever delivers them: the
//! follower task, or this process's writer right after its publish is acknowledged (so its
//! own commits are visible without waiting for delivery). A message at or below the image's
//! sequence is skipped, so each is applied once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::context::{PublishAckFuture, PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, ErrorCode, consumer, response::Response, stream};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{Mutex, watch};
use tracing::{error, warn};

use super::codec::{self, Batch, CHUNK_HEADER, parse_chunk};
use super::errors::unavailable;
use super::image::{Image, Partial};
use super::inflight::InFlight;
use crate::error::{KineError, Result};
use crate::storage::KeyspaceId;
use crate::storage::feed::CommitFeed;

/// How long a read waits for the follower to apply what the stream already holds.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause before the follower re-subscribes after a failure.
const FOLLOW_RETRY: Duration = Duration::from_millis(250);

pub struct Keyspace {
    pub id: KeyspaceId,
    pub stream: String,
    pub subject: String,
    js: jetstream::Context,
    image: RwLock<Image>,
    /// The image's sequence, for waiters.
    applied: watch::Sender<u64>,
    /// Held by a write transaction (and a keyspace deletion) of this process.
    pub write_lock: Arc<Mutex<()>>,
    deleted: AtomicBool,
    /// The sequence of a message this process could not decode (0: none). The image misses
    /// what it held, so the keyspace is not served from it any more.
    undecodable: std::sync::atomic::AtomicU64,
    follower: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// This process's last published batch while its acknowledgement is awaited.
    in_flight: std::sync::Mutex<Option<Arc<InFlight>>>,
}

impl Drop for Keyspace {
    fn drop(&mut self) {
        if let Some(task) = self
            .follower
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            task.abort();
        }
    }
}

/// The name of keyspace `id`'s stream and its subject: the validated bucket and the id only.
pub fn names(bucket: &str, id: KeyspaceId) -> (String, String) {
    (
        format!("{bucket}-ks-{id}"),
        format!("kine.{bucket}.ks.{id}"),
    )
}

/// Whether a JetStream API error says the stream does not exist.
pub fn is_stream_not_found(error: &jetstream::Error) -> bool {
    error.error_code() == ErrorCode::STREAM_NOT_FOUND
}

impl Keyspace {
    /// Opens keyspace `id` whose stream exists and starts replaying it ([`Keyspace::sync`]
    /// waits for the replay).
    pub async fn open(
        js: jetstream::Context,
        bucket: &str,
        id: KeyspaceId,
        changes: Arc<CommitFeed>,
    ) -> Result<Arc<Keyspace>> {
        let (stream, subject) = names(bucket, id);
        let (applied, _) = watch::channel(0);
        let keyspace = Arc::new(Keyspace {
            id,
            stream,
            subject,
            js: js.clone(),
            image: RwLock::new(Image::default()),
            applied,
            write_lock: Arc::new(Mutex::new(())),
            deleted: AtomicBool::new(false),
            undecodable: std::sync::atomic::AtomicU64::new(0),
            follower: std::sync::Mutex::new(None),
            in_flight: std::sync::Mutex::new(None),
        });
        // Fails with KeyspaceDeleted before a follower starts when the stream is missing.
        keyspace.last_sequence().await?;
        let task = tokio::spawn(follow(js, Arc::downgrade(&keyspace), changes));
        *keyspace.follower.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        Ok(keyspace)
    }

    pub fn read(&self) -> RwLockReadGuard<'_, Image> {
        self.image.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Image> {
        self.image.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    pub fn mark_deleted(&self) {
        self.deleted.store(true, Ordering::Release);
        // Wake waiters so they notice.
        self.applied.send_modify(|_| {});
    }

    /// The stream's last sequence, from the server.
    pub async fn last_sequence(&self) -> Result<u64> {
        if self.is_deleted() {
            return Err(KineError::KeyspaceDeleted);
        }
        let started = Instant::now();
        let result = self.ask_last_sequence().await;
        crate::metrics::sql_query(
            "nats",
            "stream_info",
            started.elapsed(),
            result.as_ref().err(),
        );
        result
    }

    async fn ask_last_sequence(&self) -> Result<u64> {
        let response: Response<stream::Info> = self
            .js
            .request(
                format!("STREAM.INFO.{}", self.stream),
                &serde_json::json!({}),
            )
            .await
            .map_err(|e| unavailable("reading the keyspace stream's state", e))?;
        match response {
            Response::Ok(info) => Ok(info.state.last_sequence),
            Response::Err { error } if is_stream_not_found(&error) => {
                self.mark_deleted();
                Err(KineError::KeyspaceDeleted)
            }
            Response::Err { error } => {
                Err(unavailable("reading the keyspace stream's state", error))
            }
        }
    }

    /// Makes the image reflect every message the stream held when this was called: the
    /// linearizable point of a read.
    pub async fn sync(&self) -> Result<()> {
        let last = self.last_sequence().await?;
        self.wait_applied(last).await
    }

    pub async fn wait_applied(&self, sequence: u64) -> Result<()> {
        self.check_decodable()?;
        let mut applied = self.applied.subscribe();
        let caught_up = tokio::time::timeout(
            CATCH_UP_TIMEOUT,
            applied.wait_for(|&seq| seq >= sequence || self.is_deleted()),
        )
        .await;
        if self.is_deleted() {
            return Err(KineError::KeyspaceDeleted);
        }
        self.check_decodable()?;
        match caught_up {
            Ok(Ok(_)) => Ok(()),
            _ => Err(KineError::Unavailable(format!(
                "NATS: the keyspace stream {} was not replayed up to sequence {sequence} within {}s",
                self.stream,
                CATCH_UP_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Fails once a message of the stream could not be decoded: serving the image would
    /// answer from a state that misses that message's writes.
    fn check_decodable(&self) -> Result<()> {
        match self.undecodable.load(Ordering::Acquire) {
            0 => Ok(()),
            seq => Err(KineError::Storage(format!(
                "NATS: message {seq} of the keyspace stream {} cannot be decoded (written by a \
                 newer kine-rs?); this process no longer serves the keyspace",
                self.stream
            ))),
        }
    }

    /// Applies the message at `seq`; `true` when it completed a batch.
    fn ingest(&self, seq: u64, headers: Option<&HeaderMap>, payload: &Bytes) -> bool {
        let mut image = self.write();
        if seq <= image.seq {
            return false;
        }
        // After a purge the stream starts at (and a lagging follower jumps to) a snapshot.
        let contiguous = seq == image.seq + 1;
        if !contiguous {
            image.partial = None;
        }
        image.seq = seq;
        let chunk = headers
            .and_then(|h| h.get(CHUNK_HEADER))
            .and_then(|v| parse_chunk(v.as_str()));
        let data = match chunk {
            None => {
                image.partial = None;
                Some((payload.to_vec(), seq, contiguous))
            }
            Some((0, count)) => {
                image.partial = Some(Partial {
                    next: 1,
                    count,
                    data: payload.to_vec(),
                    first_seq: seq,
                    contiguous,
                });
                None
            }
            Some((index, count)) => match image.partial.take() {
                Some(mut partial) if partial.next == index && partial.count == count => {
                    partial.data.extend_from_slice(payload);
                    partial.next += 1;
                    if partial.next == count {
                        Some((partial.data, partial.first_seq, partial.contiguous))
                    } else {
                        image.partial = Some(partial);
                        None
                    }
                }
                // A chunk of an abandoned batch.
                _ => None,
            },
        };
        let applied = match data.map(|(data, first, contiguous)| {
            Batch::decode_bytes(&data).map(|batch| (batch, first, contiguous))
        }) {
            Some(Ok((batch, first, contiguous))) if batch.snapshot_of > 0 => {
                if contiguous && first == batch.snapshot_of + 1 {
                    // The image already is the state the snapshot describes.
                    image.snapshot_compact = batch.compact_revision.unwrap_or(-1);
                } else {
                    *image = Image::restore(batch, seq);
                }
                true
            }
            Some(Ok((batch, _, _))) => {
                image.apply(batch);
                true
            }
            Some(Err(failure)) => {
                error!(stream = %self.stream, seq, %failure, "an undecodable message: the keyspace is not served any more by this process");
                self.undecodable
                    .compare_exchange(0, seq, Ordering::AcqRel, Ordering::Acquire)
                    .ok();
                false
            }
            None => false,
        };
        drop(image);
        self.applied.send_replace(seq);
        applied
    }

    /// Applies this process's own batch, committed at sequences up to `last`.
    pub fn apply_own(&self, last: u64, batch: Batch) {
        let mut image = self.write();
        if image.seq >= last {
            return;
        }
        image.seq = last;
        image.partial = None;
        if batch.snapshot_of > 0 {
            // Published from this very image.
            image.snapshot_compact = batch.compact_revision.unwrap_or(-1);
        } else {
            image.apply(batch);
        }
        drop(image);
        self.applied.send_replace(last);
    }

    /// This process's batch in flight, if any.
    pub fn in_flight(&self) -> Option<Arc<InFlight>> {
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_in_flight(&self, batch: Arc<InFlight>) {
        *self.in_flight.lock().unwrap_or_else(|e| e.into_inner()) = Some(batch);
    }

    /// Forgets `batch` as the batch in flight, unless a newer one took its place.
    pub fn clear_in_flight(&self, batch: &Arc<InFlight>) {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        if in_flight
            .as_ref()
            .is_some_and(|current| Arc::ptr_eq(current, batch))
        {
            *in_flight = None;
        }
    }

    /// Waits until this process has no batch in flight (called with the write lock held,
    /// so no new one starts).
    pub async fn settle_in_flight(&self) {
        if let Some(batch) = self.in_flight() {
            batch.settled().await;
            self.clear_in_flight(&batch);
        }
    }

    /// Applies this process's own batch stored at sequence `last` (one message) when the
    /// image ends right before it; `false` when the image has not reached it yet (then the
    /// follower applies it).
    pub fn apply_after(&self, last: u64, batch: Batch) -> bool {
        let mut image = self.write();
        if image.seq >= last {
            return true;
        }
        if image.seq + 1 != last {
            return false;
        }
        image.seq = last;
        image.partial = None;
        image.apply(batch);
        drop(image);
        self.applied.send_replace(last);
        true
    }

    /// Sends one encoded batch as a single message stored only right after sequence
    /// `expected` and, with `parent`, only when the stream's last message is that message id;
    /// returns without waiting for the acknowledgement.
    pub async fn send_batch(
        &self,
        data: Bytes,
        expected: u64,
        msg_id: &str,
        parent: Option<&str>,
    ) -> Result<PublishAckFuture> {
        let mut message = PublishMessage::build()
            .payload(data)
            .expected_last_sequence(expected)
            .message_id(msg_id);
        if let Some(parent) = parent {
            message = message.expected_last_message_id(parent);
        }
        self.connected()?;
        self.js
            .send_publish(self.subject.clone(), message)
            .await
            .map_err(|error| self.publish_error(error))
    }

    /// Refuses to publish while the client is not connected: async-nats would hold the
    /// message and send it after reconnecting, so a write whose client was told it failed
    /// (the acknowledgement timed out) could land later.
    fn connected(&self) -> Result<()> {
        match self.js.client().connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            _ => Err(KineError::Unavailable(
                "NATS: not connected to the server".into(),
            )),
        }
    }

    /// The error a failed publish stands for.
    pub fn publish_error(&self, error: PublishError) -> KineError {
        match error.kind() {
            PublishErrorKind::WrongLastSequence | PublishErrorKind::WrongLastMessageId => {
                KineError::Conflict("another process committed to this keyspace first".into())
            }
            PublishErrorKind::StreamNotFound => {
                self.mark_deleted();
                KineError::KeyspaceDeleted
            }
            _ => unavailable("publishing a write batch", error),
        }
    }

    /// Publishes `batch` (in chunks of at most `max_chunk` bytes) right after stream sequence
    /// `expected`; returns the sequence of its last message. Fails with
    /// [`KineError::Conflict`] when another message got there first.
    pub async fn publish(&self, batch: &Batch, expected: u64, max_chunk: usize) -> Result<u64> {
        let started = Instant::now();
        let result = self.publish_chunks(batch, expected, max_chunk).await;
        // One observation per batch: the wait for every chunk's acknowledgement.
        crate::metrics::sql_query("nats", "publish", started.elapsed(), result.as_ref().err());
        result
    }

    async fn publish_chunks(&self, batch: &Batch, expected: u64, max_chunk: usize) -> Result<u64> {
        let data = batch.encode_bytes();
        let chunks = codec::chunks(&data, max_chunk);
        let count = chunks.len();
        let mut last = expected;
        for (index, chunk) in chunks.into_iter().enumerate() {
            let mut message = PublishMessage::build()
                .payload(chunk)
                .expected_last_sequence(last);
            if count > 1 {
                message = message.header(CHUNK_HEADER, format!("{index}/{count}").as_str());
            }
            self.connected()?;
            let ack = async {
                self.js
                    .send_publish(self.subject.clone(), message)
                    .await?
                    .await
            }
            .await;
            match ack {
                Ok(ack) => last = ack.sequence,
                Err(error) => return Err(self.publish_error(error)),
            }
        }
        Ok(last)
    }

    /// Removes every message before stream sequence `first`; returns how many.
    pub async fn purge_before(&self, first: u64) -> Result<u64> {
        let stream = self
            .js
            .get_stream_no_info(&self.stream)
            .await
            .map_err(|e| unavailable("purging the keyspace stream", e))?;
        let purged = stream
            .purge()
            .sequence(first)
            .await
            .map_err(|e| unavailable("purging the keyspace stream", e))?;
        Ok(purged.purged)
    }
}

/// Follows the keyspace's stream until the keyspace is dropped or deleted.
async fn follow(js: jetstream::Context, keyspace: Weak<Keyspace>, changes: Arc<CommitFeed>) {
    loop {
        let (start, stream, id) = match keyspace.upgrade() {
            Some(k) => (k.read().seq + 1, k.stream.clone(), k.id),
            None => return,
        };
        let failure = match follow_from(&js, &keyspace, &stream, start, &changes).await {
            Ok(()) => return,
            Err(failure) => failure,
        };
        let Some(k) = keyspace.upgrade() else { return };
        match k.last_sequence().await {
            Err(KineError::KeyspaceDeleted) => {
                changes.announce(id, None);
                return;
            }
            _ => warn!(%stream, %failure, "following the keyspace stream failed; resubscribing"),
        }
        drop(k);
        tokio::time::sleep(FOLLOW_RETRY).await;
    }
}

async fn follow_from(
    js: &jetstream::Context,
    keyspace: &Weak<Keyspace>,
    stream: &str,
    start: u64,
    changes: &Arc<CommitFeed>,
) -> std::result::Result<(), String> {
    let stream = js
        .get_stream_no_info(stream)
        .await
        .map_err(|e| e.to_string())?;
    let config = consumer::push::OrderedConfig {
        deliver_subject: js.client().new_inbox(),
        deliver_policy: consumer::DeliverPolicy::ByStartSequence {
            start_sequence: start,
        },
        ..Default::default()
    };
    let consumer = stream
        .create_consumer(config)
        .await
        .map_err(|e| e.to_string())?;
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    while let Some(message) = messages.next().await {
        let message = message.map_err(|e| e.to_string())?;
        let seq = message.info().map_err(|e| e.to_string())?.stream_sequence;
        let Some(keyspace) = keyspace.upgrade() else {
            return Ok(());
        };
        if keyspace.ingest(seq, message.headers.as_ref(), &message.payload) {
            changes.announce(keyspace.id, None);
        }
    }
    Err("the ordered consumer ended".into())
}
