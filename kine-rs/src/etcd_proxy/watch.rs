//! A Watch stream of a tenant, forwarded to etcd over one upstream stream: watch ranges are
//! confined to the tenant's prefix, events stripped of it. etcd delivers the events (in
//! revision order, once each); this task keeps, per watcher, the first revision not yet
//! delivered, so that when the upstream stream breaks (a member went away) it re-creates
//! every watcher there on another stream from that revision, under the same id: the client
//! sees neither a gap nor a repeat, or, when the history is gone, etcd's compaction cancel.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kine_proto::etcdserverpb::watch_request::RequestUnion;
use kine_proto::etcdserverpb::{
    WatchCancelRequest, WatchCreateRequest, WatchRequest, WatchResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use tracing::{debug, warn};

use super::rewrite;
use super::tenant::ProxiedTenant;
use crate::served::{WatchRequests, WatchResponses};

/// Requests buffered towards etcd.
const UPSTREAM_BUFFER: usize = 256;
/// In etcd's cancel reason of a watch its user may not read (or whose stream's token is no
/// longer valid); etcd 3.5 words it `rpc error: code = PermissionDenied desc = ...`.
const PERMISSION_DENIED: &str = "etcdserver: permission denied";
/// etcd's cancel reason for a create naming a watch id in use on the stream.
const DUPLICATE_WATCH_ID: &str = "mvcc: duplicate watch ID provided on the WatchStream";
/// Longest wait between attempts to reopen the upstream stream.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// A watcher as etcd knows it (its request already confined to the tenant's prefix).
struct Forwarded {
    request: WatchCreateRequest,
    /// The first revision not yet delivered to the client.
    next: i64,
    /// The tenant's compaction revision when the watcher was created (-1: none, or not read).
    /// etcd has no previous value for an event at or below its compaction revision (the
    /// revision before it is gone); the shared etcd, compacted only as far as every tenant
    /// allows, still has it, so the proxy leaves it out of such events as etcd would.
    compacted_at: i64,
}

/// A create sent to etcd whose answer has not come yet (etcd answers creates in order).
enum Pending {
    /// The client's; `compacted` when its start revision is below the tenant's compaction
    /// (then `request` is the holding watcher sent in its place, see [`Session::held`]).
    Client {
        request: WatchCreateRequest,
        compacted: Option<i64>,
        /// The tenant's compaction revision as read for the create (-1: none, or not read).
        compacted_at: i64,
    },
    /// A watcher re-created after the upstream stream broke.
    Resume { id: i64 },
    /// A holding watcher re-created after the upstream stream broke.
    Hold { id: i64 },
    /// A client's create refused here (over `--max-watches-per-stream`): answered once the
    /// creates sent before it are, since clients match answers to their creates in order.
    Refused { reason: String },
}

struct Session {
    tenant: Arc<ProxiedTenant>,
    out: WatchResponses,
    watchers: HashMap<i64, Forwarded>,
    pending: VecDeque<Pending>,
    /// Watches the proxy canceled itself (below the tenant's compaction) that the client has
    /// not canceled yet. etcd keeps the id of a watch it canceled as compacted until the
    /// client cancels it: a create naming it is a duplicate, and the ids etcd picks skip it.
    /// So that the stream to etcd picks ids as the client's etcd would, each such id is
    /// held there by a watcher of a key nobody writes ([`Control::held_watch`]).
    ///
    /// [`Control::held_watch`]: super::Control::held_watch
    canceled_here: HashSet<i64>,
    /// The ids of `canceled_here` that a holding watcher on the current upstream stream has
    /// (the client's cancel of one goes to etcd, whose answer it gets).
    held: HashSet<i64>,
    /// Holding watchers the proxy cancels on etcd (the client canceled the watch while the
    /// holder was being re-created): etcd's answer is not shown.
    releasing: HashSet<i64>,
    upstream: Option<(mpsc::Sender<WatchRequest>, Streaming<WatchResponse>)>,
    /// The upstream stream was reopened with a new token after etcd refused a create, and
    /// no create succeeded since: a second refusal is the user's lack of permission.
    token_renewed: bool,
}

/// The client went away, or the tenant did.
struct Stop;

pub async fn serve(tenant: Arc<ProxiedTenant>, mut requests: WatchRequests, out: WatchResponses) {
    let mut closed = tenant.closed();
    let mut session = Session {
        tenant,
        out,
        watchers: HashMap::new(),
        pending: VecDeque::new(),
        canceled_here: HashSet::new(),
        held: HashSet::new(),
        releasing: HashSet::new(),
        upstream: None,
        token_renewed: false,
    };
    loop {
        let step = match session.upstream.as_mut() {
            Some((_, responses)) => {
                tokio::select! {
                    request = requests.next() => match request {
                        Some(Ok(request)) => session.client(request).await,
                        None | Some(Err(_)) => Err(Stop),
                    },
                    response = responses.message() => match response {
                        Ok(Some(response)) => session.upstream_response(response).await,
                        Ok(None) | Err(_) => session.reconnect().await,
                    },
                    _ = closed.changed() => session.tenant_closed().await,
                }
            }
            None => {
                tokio::select! {
                    request = requests.next() => match request {
                        Some(Ok(request)) => session.client(request).await,
                        None | Some(Err(_)) => Err(Stop),
                    },
                    _ = closed.changed() => session.tenant_closed().await,
                }
            }
        };
        if step.is_err() {
            break;
        }
    }
    let open = session.watchers.len() as i64;
    session.tenant.watch_count(-open);
}

impl Session {
    async fn tenant_closed(&mut self) -> Result<(), Stop> {
        if *self.tenant.closed().borrow() {
            let _ = self
                .out
                .send(Err(Status::not_found(format!(
                    "kine-rs: tenant {:?} was deleted",
                    crate::served::ServedTenant::name(&*self.tenant)
                ))))
                .await;
            return Err(Stop);
        }
        Ok(())
    }

    async fn send(&self, response: WatchResponse) -> Result<(), Stop> {
        self.out.send(Ok(response)).await.map_err(|_| Stop)
    }

    /// Sends `request` to etcd, opening the upstream stream first when there is none.
    async fn forward(&mut self, request: WatchRequest) -> Result<(), Stop> {
        if let Some((sender, _)) = &self.upstream
            && sender.send(request.clone()).await.is_ok()
        {
            return Ok(());
        }
        self.upstream = None;
        self.open(vec![request]).await
    }

    /// Opens an upstream stream whose first messages are `first` (etcd answers a stream's
    /// headers only with its first message, so the stream is opened with something to say).
    async fn open(&mut self, first: Vec<WatchRequest>) -> Result<(), Stop> {
        let mut backoff = Duration::from_millis(50);
        loop {
            let (sender, receiver) = mpsc::channel(UPSTREAM_BUFFER.max(first.len() + 1));
            for request in &first {
                let _ = sender.try_send(request.clone());
            }
            let opened = self
                .tenant
                .upstream()
                .watch
                .clone()
                .watch(ReceiverStream::new(receiver))
                .await;
            match opened {
                Ok(responses) => {
                    self.upstream = Some((sender, responses.into_inner()));
                    return Ok(());
                }
                Err(status) => {
                    warn!(code = ?status.code(), "cannot open a watch stream to etcd; retrying");
                    if self.out.is_closed() {
                        return Err(Stop);
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// The upstream stream broke: re-create every watcher (and every create not yet
    /// answered) on a new one.
    async fn reconnect(&mut self) -> Result<(), Stop> {
        self.upstream = None;
        self.held.clear();
        self.releasing.clear();
        debug!(
            watchers = self.watchers.len(),
            "the watch stream to etcd broke; resuming"
        );
        let unanswered: Vec<Pending> = self.pending.drain(..).collect();
        let mut first = Vec::new();
        let mut ids: Vec<i64> = self.watchers.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let watcher = &self.watchers[&id];
            let mut request = watcher.request.clone();
            request.watch_id = id;
            request.start_revision = watcher.next;
            first.push(create(request));
            self.pending.push_back(Pending::Resume { id });
        }
        let mut held: Vec<i64> = self.canceled_here.iter().copied().collect();
        held.sort_unstable();
        for id in held {
            first.push(create(self.holding(id)));
            self.pending.push_back(Pending::Hold { id });
        }
        for pending in unanswered {
            match pending {
                Pending::Client {
                    request,
                    compacted,
                    compacted_at,
                } => {
                    first.push(create(request.clone()));
                    self.pending.push_back(Pending::Client {
                        request,
                        compacted,
                        compacted_at,
                    });
                }
                Pending::Refused { reason } => self.pending.push_back(Pending::Refused { reason }),
                Pending::Resume { .. } | Pending::Hold { .. } => {}
            }
        }
        self.answer_refused().await?;
        if first.is_empty() {
            // Nothing to watch: the next request opens a stream.
            return Ok(());
        }
        self.open(first).await
    }

    async fn client(&mut self, request: WatchRequest) -> Result<(), Stop> {
        match request.request_union {
            Some(RequestUnion::CreateRequest(mut create_request)) => {
                // etcd watches "\0", the smallest key, when the key is empty.
                if create_request.key.is_empty() {
                    create_request.key = bytes::Bytes::from_static(b"\0");
                }
                // A range that ends at or before its key is refused before anything else,
                // as etcd does (before its duplicate-id check, which the proxy makes for
                // ids it canceled itself).
                let end = &create_request.range_end;
                if !end.is_empty() && end.as_ref() != b"\0" && create_request.key >= *end {
                    self.pending.push_back(Pending::Refused {
                        reason: "mvcc: watcher range is empty".to_string(),
                    });
                    return self.answer_refused().await;
                }
                let compacted_at = if create_request.start_revision > 0 {
                    match self.tenant.compact_revision().await {
                        Ok((revision, _)) => revision,
                        Err(error) => {
                            let _ = self.out.send(Err(error.into())).await;
                            return Err(Stop);
                        }
                    }
                } else {
                    -1
                };
                let compacted = (create_request.start_revision > 0
                    && create_request.start_revision < compacted_at)
                    .then_some(compacted_at);
                if create_request.watch_id != 0
                    && self.canceled_here.contains(&create_request.watch_id)
                {
                    // etcd keeps the id of a watcher it canceled as compacted until the
                    // client cancels it; so does the proxy for those it canceled itself.
                    self.pending.push_back(Pending::Refused {
                        reason: DUPLICATE_WATCH_ID.to_string(),
                    });
                    return self.answer_refused().await;
                }
                let max = self.tenant.limits().max_watches_per_stream;
                let creating = self
                    .pending
                    .iter()
                    .filter(|p| matches!(p, Pending::Client { .. }))
                    .count();
                if self.watchers.len() + creating >= max {
                    self.pending.push_back(Pending::Refused {
                        reason: crate::watch::stream::too_many_watches(max),
                    });
                    return self.answer_refused().await;
                }
                if compacted.is_some() {
                    // Canceled once created; what etcd keeps meanwhile is the id.
                    create_request = self.holding(create_request.watch_id);
                } else {
                    let prefix = self.tenant.prefix();
                    (create_request.key, create_request.range_end) =
                        prefix.range(&create_request.key, &create_request.range_end);
                }
                self.pending.push_back(Pending::Client {
                    request: create_request.clone(),
                    compacted,
                    compacted_at,
                });
                self.forward(create(create_request)).await
            }
            Some(RequestUnion::CancelRequest(cancel)) => {
                if self.canceled_here.remove(&cancel.watch_id)
                    && !(self.held.remove(&cancel.watch_id) && self.upstream.is_some())
                {
                    let response = WatchResponse {
                        header: Some(self.header().await),
                        watch_id: cancel.watch_id,
                        canceled: true,
                        ..Default::default()
                    };
                    return self.send(response).await;
                }
                if self.upstream.is_none() && !self.watchers.contains_key(&cancel.watch_id) {
                    // No stream to etcd, so no such watcher: etcd answers nothing, and a
                    // stream opened with this cancel would never get its headers.
                    return Ok(());
                }
                self.forward(WatchRequest {
                    request_union: Some(RequestUnion::CancelRequest(cancel)),
                })
                .await
            }
            Some(RequestUnion::ProgressRequest(progress)) => {
                self.forward(WatchRequest {
                    request_union: Some(RequestUnion::ProgressRequest(progress)),
                })
                .await
            }
            None => Ok(()),
        }
    }

    /// The create of a watcher holding watch id `id` on the upstream stream.
    fn holding(&self, id: i64) -> WatchCreateRequest {
        WatchCreateRequest {
            key: self.tenant.held_watch_key(),
            watch_id: id,
            ..Default::default()
        }
    }

    async fn header(&self) -> kine_proto::etcdserverpb::ResponseHeader {
        crate::served::ServedTenant::header(&*self.tenant)
            .await
            .unwrap_or_default()
    }

    async fn upstream_response(&mut self, mut response: WatchResponse) -> Result<(), Stop> {
        let id = response.watch_id;
        let revision = response.header.as_ref().map_or(0, |h| h.revision);
        if response.created {
            self.answer_refused().await?;
            let Some(pending) = self.pending.pop_front() else {
                return self.send(response).await;
            };
            self.created(pending, response).await?;
            self.answer_refused().await
        } else if response.canceled {
            if self.releasing.remove(&id) {
                return Ok(());
            }
            if self.canceled_here.contains(&id) && !self.watchers.contains_key(&id) {
                // A holding watcher ended by etcd: the client was told of its end already.
                self.held.remove(&id);
                return Ok(());
            }
            self.remove(id);
            self.send(response).await
        } else {
            let prefix = self.tenant.prefix().clone();
            let compacted_at = self.watchers.get(&id).map_or(-1, |w| w.compacted_at);
            let mut last = 0;
            for event in &mut response.events {
                if let Some(kv) = &mut event.kv {
                    last = last.max(kv.mod_revision);
                    if kv.mod_revision <= compacted_at {
                        event.prev_kv = None;
                    }
                    rewrite::strip_kv(&prefix, kv);
                }
                if let Some(kv) = &mut event.prev_kv {
                    rewrite::strip_kv(&prefix, kv);
                }
            }
            if response.events.is_empty() {
                // A progress notification: the watcher (or, for -1, every watcher) has seen
                // everything up to the header's revision.
                for (watcher_id, watcher) in &mut self.watchers {
                    if id == -1 || *watcher_id == id {
                        watcher.next = watcher.next.max(revision + 1);
                    }
                }
            } else if !response.fragment
                && let Some(watcher) = self.watchers.get_mut(&id)
            {
                watcher.next = watcher.next.max(last + 1);
            }
            self.send(response).await
        }
    }

    /// etcd's answer to the create `pending` stood for.
    async fn created(&mut self, pending: Pending, mut response: WatchResponse) -> Result<(), Stop> {
        let id = response.watch_id;
        let revision = response.header.as_ref().map_or(0, |h| h.revision);
        if response.canceled && self.stale_token(&response) {
            // Sent again, first, on a stream opened with a new token.
            self.pending.push_front(pending);
            self.token_renewed = true;
            self.tenant.upstream().auth().forget_token();
            return self.reconnect().await;
        }
        if !response.canceled {
            self.token_renewed = false;
        }
        match pending {
            Pending::Client {
                request,
                compacted,
                compacted_at,
            } => {
                if response.canceled {
                    return self.send(response).await;
                }
                let Some(compact_revision) = compacted else {
                    let next = if request.start_revision > 0 {
                        request.start_revision
                    } else {
                        revision + 1
                    };
                    self.watchers.insert(
                        id,
                        Forwarded {
                            request,
                            next,
                            compacted_at,
                        },
                    );
                    self.tenant.watch_count(1);
                    return self.send(response).await;
                };
                // Below the tenant's compaction: created, then canceled as etcd cancels a
                // watch whose start revision was compacted away; etcd holds the id.
                self.canceled_here.insert(id);
                self.held.insert(id);
                self.send(response).await?;
                self.send(WatchResponse {
                    header: Some(response_header(revision.max(compact_revision))),
                    watch_id: id,
                    canceled: true,
                    compact_revision,
                    ..Default::default()
                })
                .await
            }
            Pending::Resume { id: resumed } => {
                if response.canceled {
                    // The watcher could not be re-created: tell the client it ended.
                    self.remove(resumed);
                    response.watch_id = resumed;
                    return self.send(response).await;
                }
                Ok(())
            }
            Pending::Hold { id: held } => {
                if response.canceled {
                    return Ok(());
                }
                if self.canceled_here.contains(&held) {
                    self.held.insert(held);
                    return Ok(());
                }
                // The client canceled the watch meanwhile: etcd no longer holds its id.
                self.releasing.insert(held);
                self.forward(WatchRequest {
                    request_union: Some(RequestUnion::CancelRequest(WatchCancelRequest {
                        watch_id: held,
                    })),
                })
                .await
            }
            // Answered before any later create's answer is looked at.
            Pending::Refused { .. } => Ok(()),
        }
    }

    /// Whether etcd refused a create for the token the stream was opened with: a stream keeps
    /// its token, which may have expired since (etcd then answers `permission denied`), so
    /// the stream is reopened once with a new one.
    fn stale_token(&self, response: &WatchResponse) -> bool {
        response.cancel_reason.contains(PERMISSION_DENIED)
            && self.tenant.upstream().auth().authenticates()
            && !self.token_renewed
    }

    /// Answers the refused creates at the head of the queue (every create before them has
    /// been answered).
    async fn answer_refused(&mut self) -> Result<(), Stop> {
        while let Some(Pending::Refused { .. }) = self.pending.front() {
            let Some(Pending::Refused { reason }) = self.pending.pop_front() else {
                break;
            };
            let response = WatchResponse {
                header: Some(self.header().await),
                watch_id: -1,
                created: true,
                canceled: true,
                cancel_reason: reason,
                ..Default::default()
            };
            self.send(response).await?;
        }
        Ok(())
    }

    fn remove(&mut self, id: i64) {
        if self.watchers.remove(&id).is_some() {
            self.tenant.watch_count(-1);
        }
    }
}

fn create(request: WatchCreateRequest) -> WatchRequest {
    WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(request)),
    }
}

fn response_header(revision: i64) -> kine_proto::etcdserverpb::ResponseHeader {
    kine_proto::etcdserverpb::ResponseHeader {
        revision,
        ..Default::default()
    }
}
