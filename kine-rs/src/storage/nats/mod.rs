//! NATS JetStream as a datastore: `nats://[user:pass@]host:4222[,host2:4222][?bucket=NAME]`.
//!
//! # Design
//!
//! **One stream per keyspace, one message per committed write transaction.** Keyspace `id`
//! lives in the stream `<bucket>-ks-<id>` (subject `kine.<bucket>.ks.<id>`); tenant names
//! never appear in NATS names (the bucket is validated to letters, digits, `-` and `_`, and
//! the id is a number). Each message is a [`codec::Batch`]: the whole write set of one
//! [`WriteTxn`] (rows with key, revisions, version, lease, value and tombstone flag; lease
//! inserts, deadline moves and deletes; compaction revision; freeze flag; quota; migration
//! role, pin and record), protobuf-encoded, in chunks when larger than the server's
//! `max_payload` (see [`codec`]).
//!
//! **Commits are serialized by the stream sequence.** A write transaction starts from the
//! sequence its process has applied (after catching up with the stream's last sequence), and
//! its commit publishes with `Nats-Expected-Last-Sequence` set to that sequence. If another
//! process committed in between, the server refuses the message (wrong last sequence),
//! nothing is written, the commit fails with [`KineError::Conflict`], and the writer
//! (`writer.rs`) evaluates the batch again on a fresh transaction (which first catches up
//! with the stream), up to 64 times after random pauses of at most 32 ms.
//! Revisions are the keyspace counter carried in the batches (one per etcd transaction,
//! several per message with group commit): gapless and ordered because each batch is
//! computed on the state left by the previous one.
//!
//! **The writer's batches skip the round trip.** A batch of the keyspace's writer starts
//! from the image without asking the server where the stream ends (the expected sequence
//! catches an image that lags another process; a batch that publishes nothing confirms the
//! last sequence instead), and the requests that arrive while a batch is in flight wait for
//! its acknowledgement and then go together in the next message, so each JetStream sync
//! carries everything that queued during the one before. A batch that fills up while
//! another is in flight is sent on top of it ([`inflight`]): stored only right after that
//! message, by sequence and message id.
//!
//! **Every process keeps an in-memory MVCC image per open keyspace** ([`image::Image`]):
//! rows by key with their history, an event log, leases, counters. It is rebuilt by
//! replaying the stream on open and kept current by an ordered push consumer
//! ([`keyspace`]); a process applies its own commits right after the acknowledgement.
//! Reads (`range`, `state`, leases) are linearizable: they first fetch the stream's last
//! sequence and wait until the image has applied it. Watch hubs are woken through
//! [`Backend::changes`] whenever the follower applies a batch of another process.
//!
//! **Compaction** prunes history in every process's image when the batch recording it is
//! applied. The process that compacted then cuts the stream: it publishes a snapshot (the
//! whole retained keyspace as one batch, chunked, at the next sequence) and purges every
//! message before it, so the stream holds at most one snapshot plus the writes since the
//! last compaction, and a process starting up replays from the snapshot.
//!
//! **Leases.** Grants, revokes and expiries are batches like any write. A keep-alive is not
//! a revision and is not written to the keyspace stream: it stores the lease's new deadline
//! in the key-value bucket `<bucket>-leases` (one small put, history 1). A lease's effective
//! deadline is the later of the one in the image and the stored keep-alive one; expiry
//! checks consult the bucket only for leases whose image deadline has passed. Unfreezing
//! writes every lease's shifted deadline into the batch, so all processes agree.
//!
//! **Directory.** Tenant names map to ids in the key-value bucket `<bucket>-keyspaces`
//! ([`directory`]); an id is the bucket revision of the entry's creation, so two processes
//! racing to create a tenant agree on one id, and a re-created tenant gets a new id and a
//! new, empty stream.
//!
//! Known limits:
//! * every process holds each keyspace it serves in memory; a gateway that expires leases
//!   for all tenants (`expired_leases_all`) opens, and so holds, every tenant of the bucket;
//! * a read costs one JetStream API request (the stream's last sequence) before it is
//!   served from memory;
//! * a process that looked a tenant up just before another deleted it may recreate the
//!   deleted tenant's (empty, unlisted) stream;
//! * a keep-alive that races an expiry in another process may lose (the SQL backends lock
//!   the lease row); a keep-alive is one key-value put, which is a (non-growing) stream
//!   write of the leases bucket.

mod codec;
mod context;
mod directory;
mod endpoint;
mod errors;
mod image;
mod inflight;
mod keyspace;
mod txn;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::{ConnectErrorKind, ConnectOptions, ServerAddr};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use self::directory::Directory;
use self::endpoint::Endpoint;
use self::errors::{storage, unavailable};
use self::keyspace::{Keyspace, names};
use self::txn::{NatsWriteTxn, effective};
use super::feed::CommitFeed;
use super::{
    Backend, BackendOptions, BatchKeys, KeyspaceId, KeyspaceState, MigrationRole, RangeQuery,
    RangeRows, WriteTxn,
};
use crate::error::{KineError, Result};
use crate::gates::Gates;
use crate::model::{Event, KeyRange, LeaseRecord, Revision};

/// Bytes of a message kept free for headers.
const HEADER_ROOM: usize = 4096;
/// Most expired leases one look returns per keyspace.
const EXPIRED_BATCH: usize = 1000;

/// A NATS JetStream datastore.
pub struct NatsBackend {
    js: jetstream::Context,
    bucket: String,
    replicas: usize,
    directory: Arc<Directory>,
    open: std::sync::Mutex<HashMap<KeyspaceId, Arc<Keyspace>>>,
    names: std::sync::Mutex<HashMap<KeyspaceId, String>>,
    /// One gate per keyspace being opened: different keyspaces open side by side.
    opening: Gates<KeyspaceId>,
    changes: Arc<CommitFeed>,
    max_chunk: usize,
}

/// Connects to the NATS servers an endpoint names and opens the directory.
pub async fn open(endpoint: &str, options: &BackendOptions) -> Result<NatsBackend> {
    let endpoint = Endpoint::parse(endpoint)?;
    let context = match &endpoint.context_file {
        Some(path) => context::NatsContext::read(path)?,
        None => context::NatsContext::default(),
    };
    let mut connect = ConnectOptions::new()
        .name("kine-rs")
        .connection_timeout(Duration::from_secs(5));
    // Credentials in the endpoint win over the context file's.
    if let Some(user) = &endpoint.user {
        connect =
            connect.user_and_password(user.clone(), endpoint.password.clone().unwrap_or_default());
    } else if let Some(user) = &context.user {
        connect =
            connect.user_and_password(user.clone(), context.password.clone().unwrap_or_default());
    } else if let Some(token) = &context.token {
        connect = connect.token(token.clone());
    } else if let Some(creds) = &context.creds_file {
        connect = connect.credentials_file(creds).await.map_err(|e| {
            KineError::Storage(format!(
                "the NATS credentials file {creds:?} cannot be used ({})",
                e.kind()
            ))
        })?;
    } else if let Some(nkey) = &context.nkey_file {
        connect = connect.nkey(context::NatsContext::nkey_seed(nkey)?);
    }
    // TLS files: the flags, else the context file's.
    let tls = &options.tls;
    let ca_file = tls.ca_file.as_ref().or(context.ca_file.as_ref());
    let (cert_file, key_file) = if tls.cert_file.is_some() || tls.key_file.is_some() {
        (tls.cert_file.as_ref(), tls.key_file.as_ref())
    } else {
        (context.cert_file.as_ref(), context.key_file.as_ref())
    };
    if ca_file.is_some() || cert_file.is_some() || key_file.is_some() {
        connect = connect.require_tls(true);
        if let Some(ca) = ca_file {
            connect = connect.add_root_certificates(PathBuf::from(ca));
        }
        match (cert_file, key_file) {
            (Some(cert), Some(key)) => {
                connect = connect.add_client_certificate(PathBuf::from(cert), PathBuf::from(key));
            }
            (None, None) => {}
            _ => {
                return Err(KineError::Storage(
                    "--cert-file and --key-file go together".into(),
                ));
            }
        }
    }
    let named = if endpoint.servers_named || context.servers.is_empty() {
        &endpoint.servers
    } else {
        &context.servers
    };
    let mut servers = Vec::new();
    for server in named {
        let address: ServerAddr = format!("nats://{server}")
            .parse()
            .map_err(|e| storage(&format!("server address {server:?}"), e))?;
        servers.push(address);
    }
    let client = connect
        .connect(servers)
        .await
        .map_err(|error| match error.kind() {
            ConnectErrorKind::Authentication
            | ConnectErrorKind::AuthorizationViolation
            | ConnectErrorKind::Tls
            | ConnectErrorKind::ServerParse => storage("connecting", error),
            _ => unavailable("connecting", error),
        })?;
    let max_payload = client.server_info().max_payload;
    let js = jetstream::new(client);
    account_info(&js).await?;
    let directory = Directory::open(&js, &endpoint.bucket, endpoint.replicas).await?;
    let changes = CommitFeed::new();
    Ok(NatsBackend {
        js,
        bucket: endpoint.bucket,
        replicas: endpoint.replicas,
        directory: Arc::new(directory),
        open: std::sync::Mutex::new(HashMap::new()),
        names: std::sync::Mutex::new(HashMap::new()),
        opening: Gates::default(),
        changes,
        max_chunk: max_payload.saturating_sub(HEADER_ROOM).max(1024),
    })
}

/// The JetStream account's information, as JSON (async-nats' typed answer expects fields
/// that NATS 2.9 does not send). Fails when JetStream is not enabled.
async fn account_info(js: &jetstream::Context) -> Result<serde_json::Value> {
    let info: serde_json::Value = js
        .request("INFO", &serde_json::json!({}))
        .await
        .map_err(|e| unavailable("JetStream (is nats-server running with -js?)", e))?;
    if let Some(error) = info.get("error") {
        return Err(unavailable(
            "JetStream (is nats-server running with -js?)",
            error,
        ));
    }
    Ok(info)
}

impl NatsBackend {
    /// [`Backend::begin_group_write`] before the batch's keys are looked up.
    async fn begin_group_write_unfetched(&self, keyspace: KeyspaceId) -> Result<Box<dyn WriteTxn>> {
        // No round trip: on top of this process's batch in flight, or from the image. A
        // commit from a state that lags the stream fails with a conflict, and the writer
        // evaluates the batch again with `begin_write`.
        let handle = self.handle(keyspace).await?;
        let guard = handle.write_lock.clone().lock_owned().await;
        let parent = match handle.in_flight() {
            // Its own parent is applied (or failed) first: the overlay is its writes only.
            Some(parent) if parent.parent_settled().await => Some(parent),
            Some(_) => return Err(KineError::Conflict("an earlier batch failed".into())),
            None => None,
        };
        let (start_seq, state, written, leases) = match &parent {
            Some(parent) => (
                parent.seq,
                parent.state,
                parent.written.clone(),
                parent.leases.clone(),
            ),
            None => {
                let image = handle.read();
                (
                    image.seq,
                    image.state(keyspace),
                    HashMap::new(),
                    HashMap::new(),
                )
            }
        };
        Ok(Box::new(NatsWriteTxn {
            keyspace: handle,
            directory: self.directory.clone(),
            _guard: guard,
            start_seq,
            start: state,
            state,
            written,
            leases,
            batch: codec::Batch::default(),
            max_chunk: self.max_chunk,
            synced: false,
            parent,
            own_keys: HashSet::new(),
            own_leases: HashSet::new(),
        }))
    }

    fn cached(&self, id: KeyspaceId) -> Option<Arc<Keyspace>> {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }

    fn forget(&self, id: KeyspaceId) {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    fn remember_name(&self, id: KeyspaceId, name: &str) {
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, name.to_string());
    }

    /// The open keyspace `id`; opened on first use, and then replayed up to the stream's
    /// current end. The keyspace is cached before its replay completes, so a replay that
    /// outlasts one request's patience goes on for the next.
    async fn handle(&self, id: KeyspaceId) -> Result<Arc<Keyspace>> {
        let usable = |keyspace: Arc<Keyspace>| {
            if keyspace.is_deleted() {
                self.forget(id);
                Err(KineError::KeyspaceDeleted)
            } else {
                Ok(keyspace)
            }
        };
        if let Some(keyspace) = self.cached(id) {
            return usable(keyspace);
        }
        let (keyspace, opened) = self
            .opening
            .run(&id, async {
                if let Some(keyspace) = self.cached(id) {
                    return Ok((keyspace, false));
                }
                let keyspace =
                    Keyspace::open(self.js.clone(), &self.bucket, id, self.changes.clone()).await?;
                self.open
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id, keyspace.clone());
                Ok::<_, KineError>((keyspace, true))
            })
            .await?;
        if !opened {
            return usable(keyspace);
        }
        if let Err(error) = keyspace.sync().await {
            if matches!(error, KineError::KeyspaceDeleted) {
                self.forget(id);
            }
            return Err(error);
        }
        Ok(keyspace)
    }

    /// The keyspace, caught up with its stream.
    async fn synced(&self, id: KeyspaceId) -> Result<Arc<Keyspace>> {
        let keyspace = self.handle(id).await?;
        if let Err(error) = keyspace.sync().await {
            if matches!(error, KineError::KeyspaceDeleted) {
                self.forget(id);
            }
            return Err(error);
        }
        Ok(keyspace)
    }

    /// Creates keyspace `id`'s stream unless it exists.
    async fn ensure_stream(&self, id: KeyspaceId) -> Result<()> {
        let (name, subject) = names(&self.bucket, id);
        let config = stream::Config {
            name,
            subjects: vec![subject],
            storage: stream::StorageType::File,
            num_replicas: self.replicas,
            ..Default::default()
        };
        self.js
            .get_or_create_stream(config)
            .await
            .map(|_| ())
            .map_err(|e| unavailable("creating a keyspace stream", e))
    }

    async fn name_of(&self, id: KeyspaceId) -> Result<Option<String>> {
        if let Some(name) = self
            .names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
        {
            return Ok(Some(name.clone()));
        }
        Ok(self
            .directory
            .list()
            .await?
            .into_iter()
            .find(|(_, found)| *found == id)
            .map(|(name, _)| name))
    }

    /// Leases of `keyspace` expired at `now`, keep-alives of any process considered.
    async fn expired(&self, keyspace: &Keyspace, now: i64) -> Result<Vec<i64>> {
        let candidates: Vec<LeaseRecord> = {
            let image = keyspace.read();
            if image.frozen {
                return Ok(Vec::new());
            }
            let mut due: Vec<LeaseRecord> = image
                .leases
                .values()
                .filter(|lease| lease.expires_at_ms <= now)
                .copied()
                .collect();
            due.sort_by_key(|lease| (lease.expires_at_ms, lease.id));
            due
        };
        let mut expired = Vec::new();
        for lease in candidates {
            if expired.len() >= EXPIRED_BATCH {
                break;
            }
            if effective(&self.directory, keyspace.id, lease, now)
                .await?
                .expires_at_ms
                <= now
            {
                expired.push(lease.id);
            }
        }
        Ok(expired)
    }
}

#[async_trait]
impl Backend for NatsBackend {
    fn driver(&self) -> &'static str {
        "nats"
    }

    async fn keyspace(&self, name: &str, create: bool) -> Result<Option<KeyspaceId>> {
        let id = match self.directory.find(name).await? {
            Some(id) => id,
            None if create => self.directory.create(name).await?,
            None => return Ok(None),
        };
        if create {
            // Also repairs a creation interrupted between the directory and the stream.
            self.ensure_stream(id).await?;
        }
        self.remember_name(id, name);
        Ok(Some(id))
    }

    async fn state(&self, keyspace: KeyspaceId) -> Result<KeyspaceState> {
        Ok(self.synced(keyspace).await?.read().state(keyspace))
    }

    async fn keyspaces(&self) -> Result<Vec<(String, KeyspaceState)>> {
        let mut out = Vec::new();
        for (name, id) in self.directory.list().await? {
            self.remember_name(id, &name);
            match self.state(id).await {
                Ok(state) => out.push((name, state)),
                Err(KineError::KeyspaceDeleted) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(out)
    }

    async fn migration_record(&self, keyspace: KeyspaceId) -> Result<Option<String>> {
        Ok(self.synced(keyspace).await?.read().record.clone())
    }

    async fn delete_keyspace(&self, keyspace: KeyspaceId) -> Result<bool> {
        let open = self.cached(keyspace);
        let _guard = match &open {
            Some(open) => {
                let guard = open.write_lock.clone().lock_owned().await;
                open.settle_in_flight().await;
                Some(guard)
            }
            None => None,
        };
        if let Some(name) = self.name_of(keyspace).await? {
            self.directory.remove(&name).await?;
        }
        let (stream, _) = names(&self.bucket, keyspace);
        let deleted = match self.js.delete_stream(&stream).await {
            Ok(status) => status.success,
            Err(error) => match error.kind() {
                jetstream::context::DeleteStreamErrorKind::JetStream(e)
                    if keyspace::is_stream_not_found(&e) =>
                {
                    false
                }
                _ => return Err(unavailable("deleting a keyspace stream", error)),
            },
        };
        if let Some(open) = open {
            // Keep-alive deadlines of its leases are of no use any more.
            let leases: Vec<i64> = open.read().leases.keys().copied().collect();
            for lease in leases {
                self.directory.forget(keyspace, lease).await;
            }
            open.mark_deleted();
        }
        self.forget(keyspace);
        self.changes.announce(keyspace, None);
        Ok(deleted)
    }

    async fn expired_leases_all(
        &self,
        now_ms: i64,
        limit: i64,
    ) -> Result<Vec<(String, KeyspaceId, i64)>> {
        let limit = usize::try_from(limit).unwrap_or(0);
        let mut out = Vec::new();
        for (name, id) in self.directory.list().await? {
            if out.len() >= limit {
                break;
            }
            let keyspace = match self.handle(id).await {
                Ok(keyspace) => keyspace,
                Err(KineError::KeyspaceDeleted) => continue,
                Err(error) => return Err(error),
            };
            let role = keyspace.read().migration;
            if !matches!(role, MigrationRole::None | MigrationRole::Source) {
                continue;
            }
            for lease in self.expired(&keyspace, now_ms).await? {
                out.push((name.clone(), id, lease));
            }
        }
        out.truncate(limit);
        Ok(out)
    }

    async fn range(&self, keyspace: KeyspaceId, query: RangeQuery<'_>) -> Result<RangeRows> {
        let handle = self.synced(keyspace).await?;
        let image = handle.read();
        let at = if query.revision <= 0 || query.revision == image.revision {
            None
        } else if query.revision > image.revision {
            return Err(KineError::FutureRevision);
        } else if query.revision < image.compact_revision {
            return Err(KineError::Compacted);
        } else {
            Some(query.revision)
        };
        let (kvs, count) = image.range(
            query.range,
            at,
            query.limit,
            query.keys_only,
            query.count_only,
        );
        Ok(RangeRows {
            revision: image.revision,
            kvs,
            count,
        })
    }

    async fn events(
        &self,
        keyspace: KeyspaceId,
        after: Revision,
        up_to: Revision,
        range: Option<&KeyRange>,
    ) -> Result<Vec<Event>> {
        let handle = self.handle(keyspace).await?;
        let image = handle.read();
        if after + 1 < image.compact_revision {
            return Err(KineError::Compacted);
        }
        Ok(image.events(after, up_to, range))
    }

    async fn begin_write(&self, keyspace: KeyspaceId) -> Result<Box<dyn WriteTxn>> {
        let handle = self.handle(keyspace).await?;
        let guard = handle.write_lock.clone().lock_owned().await;
        handle.settle_in_flight().await;
        if let Err(error) = handle.sync().await {
            if matches!(error, KineError::KeyspaceDeleted) {
                self.forget(keyspace);
            }
            return Err(error);
        }
        let (start_seq, state) = {
            let image = handle.read();
            (image.seq, image.state(keyspace))
        };
        Ok(Box::new(NatsWriteTxn {
            keyspace: handle,
            directory: self.directory.clone(),
            _guard: guard,
            start_seq,
            start: state,
            state,
            written: HashMap::new(),
            leases: HashMap::new(),
            batch: codec::Batch::default(),
            max_chunk: self.max_chunk,
            synced: true,
            parent: None,
            own_keys: HashSet::new(),
            own_leases: HashSet::new(),
        }))
    }

    async fn begin_group_write(
        &self,
        keyspace: KeyspaceId,
        keys: &BatchKeys,
        _optimistic: bool,
    ) -> Result<Box<dyn WriteTxn>> {
        let mut txn = self.begin_group_write_unfetched(keyspace).await?;
        txn.prefetch(&keys.all).await?;
        Ok(txn)
    }

    async fn lease(&self, keyspace: KeyspaceId, id: i64) -> Result<Option<LeaseRecord>> {
        let handle = self.synced(keyspace).await?;
        let lease = handle.read().leases.get(&id).copied();
        match lease {
            Some(lease) => Ok(Some(
                // Always with the last keep-alive of any process: the TTL left is reported.
                effective(&self.directory, keyspace, lease, i64::MAX).await?,
            )),
            None => Ok(None),
        }
    }

    async fn leases(&self, keyspace: KeyspaceId) -> Result<Vec<LeaseRecord>> {
        let handle = self.synced(keyspace).await?;
        let mut leases: Vec<LeaseRecord> = handle.read().leases.values().copied().collect();
        leases.sort_by_key(|lease| (lease.expires_at_ms, lease.id));
        Ok(leases)
    }

    async fn lease_keys(&self, keyspace: KeyspaceId, id: i64) -> Result<Vec<Bytes>> {
        let handle = self.synced(keyspace).await?;
        let image = handle.read();
        Ok(image
            .lease_keys
            .get(&id)
            .map(|keys| keys.iter().cloned().collect())
            .unwrap_or_default())
    }

    async fn expired_leases(&self, keyspace: KeyspaceId, now_ms: i64) -> Result<Vec<i64>> {
        let handle = self.handle(keyspace).await?;
        self.expired(&handle, now_ms).await
    }

    async fn renew_lease(
        &self,
        keyspace: KeyspaceId,
        id: i64,
        now_ms: i64,
    ) -> Result<Option<LeaseRecord>> {
        let handle = self.synced(keyspace).await?;
        let (lease, frozen, frozen_at) = {
            let image = handle.read();
            (
                image.leases.get(&id).copied(),
                image.frozen,
                image.frozen_at_ms,
            )
        };
        let Some(lease) = lease else {
            return Ok(None);
        };
        let lease = effective(&self.directory, keyspace, lease, now_ms).await?;
        if lease.expires_at_ms <= now_ms && !(frozen && lease.expires_at_ms > frozen_at) {
            return Ok(None);
        }
        let expires_at_ms = now_ms.saturating_add(lease.ttl.saturating_mul(1000));
        let granted_until = {
            let image = handle.read();
            image.leases.get(&id).map_or(i64::MIN, |l| l.expires_at_ms)
        };
        if !self
            .directory
            .renew(keyspace, id, expires_at_ms, granted_until, now_ms)
            .await?
        {
            // An expiry in some process claimed it first: gone, as etcd answers a
            // keep-alive that comes too late.
            return Ok(None);
        }
        Ok(Some(LeaseRecord {
            expires_at_ms,
            ..lease
        }))
    }

    async fn purge_compacted(
        &self,
        keyspace: KeyspaceId,
        revision: Revision,
        _batch: i64,
    ) -> Result<u64> {
        // Every process prunes its image when it applies the compaction. Here the stream
        // is cut: a snapshot of the retained state, then a purge of everything before it.
        let handle = self.handle(keyspace).await?;
        let _guard = handle.write_lock.clone().lock_owned().await;
        handle.settle_in_flight().await;
        handle.sync().await?;
        let (snapshot, start) = {
            let image = handle.read();
            if image.compact_revision < revision || image.snapshot_compact >= image.compact_revision
            {
                return Ok(0);
            }
            (image.snapshot(), image.seq)
        };
        let last = match handle.publish(&snapshot, start, self.max_chunk).await {
            Ok(last) => last,
            // A write got there first; the next compaction snapshots.
            Err(KineError::Conflict(_)) => return Ok(0),
            Err(error) => return Err(error),
        };
        handle.apply_own(last, snapshot);
        handle.purge_before(start + 1).await
    }

    async fn size(&self) -> Result<(i64, i64)> {
        // The bytes of this bucket's streams (not of the whole account, which other
        // deployments may share).
        let (keyspaces, buckets) = (
            format!("{}-ks-", self.bucket),
            format!("KV_{}-", self.bucket),
        );
        let mut streams = self.js.streams();
        let mut used = 0u64;
        while let Some(info) = streams.next().await {
            let info = info.map_err(|e| unavailable("listing streams", e))?;
            if info.config.name.starts_with(&keyspaces) || info.config.name.starts_with(&buckets) {
                used = used.saturating_add(info.state.bytes);
            }
        }
        let used = i64::try_from(used).unwrap_or(i64::MAX);
        Ok((used, used))
    }

    async fn defragment(&self) -> Result<()> {
        Ok(())
    }

    fn poll_cadence(&self) -> Option<super::feed::PollCadence> {
        // Followers announce every commit of another process through `changes`.
        None
    }

    fn feed(&self) -> &Arc<CommitFeed> {
        &self.changes
    }
}
