//! One tenant served from the shared etcd: requests confined to its prefix, writes guarded by
//! its freeze record, leases checked against its ownership records.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use kine_proto::etcdserverpb::request_op::Request;
use kine_proto::etcdserverpb::response_op::Response;
use kine_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, Compare, DeleteRangeRequest, DeleteRangeResponse,
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse, PutRequest, PutResponse, RangeRequest,
    RangeResponse, RequestOp, ResponseHeader, TxnRequest, TxnResponse,
};
use prost::Message;
use tokio::sync::mpsc;
use tonic::Streaming;

use super::prefix::KeyPrefix;
use super::{
    Control, Upstream, absent, compact_shared, delete_op, get_op, parse_number, present, put_op,
    range_at, rewrite, upstream_error, usage,
};
use crate::error::{KineError, Result};
use crate::keyspace::MAX_LEASE_TTL;
use crate::model::now_ms;
use crate::range;
use crate::served::{ServedTenant, StatusFacts, WatchRequests, WatchResponses};
use crate::storage::Quota;
use crate::txn::{self, RequestLimits};

/// One keep-alive stream to etcd, shared by the tenant's keep-alives (one at a time).
type KeepAliveStream = (
    mpsc::Sender<LeaseKeepAliveRequest>,
    Streaming<LeaseKeepAliveResponse>,
);

/// A tenant of the shared etcd.
pub struct ProxiedTenant {
    name: String,
    prefix: KeyPrefix,
    control: Control,
    upstream: Upstream,
    limits: RequestLimits,
    /// Leases this process saw the tenant own (a cache of the ownership records).
    owned: std::sync::Mutex<HashSet<i64>>,
    keep_alive: tokio::sync::Mutex<Option<KeepAliveStream>>,
    watches: AtomicI64,
    closed: tokio::sync::watch::Sender<bool>,
    /// When the tenant cache last handed it out.
    last_use: crate::tenants::LastUse,
}

impl crate::tenants::Cached for ProxiedTenant {
    fn last_use(&self) -> &crate::tenants::LastUse {
        &self.last_use
    }
}

impl ProxiedTenant {
    pub fn new(
        name: String,
        prefix: KeyPrefix,
        control: Control,
        upstream: Upstream,
        limits: RequestLimits,
    ) -> Self {
        ProxiedTenant {
            name,
            prefix,
            control,
            upstream,
            limits,
            owned: std::sync::Mutex::new(HashSet::new()),
            keep_alive: tokio::sync::Mutex::new(None),
            watches: AtomicI64::new(0),
            closed: tokio::sync::watch::Sender::new(false),
            last_use: Default::default(),
        }
    }

    pub fn prefix(&self) -> &KeyPrefix {
        &self.prefix
    }

    pub fn limits(&self) -> &RequestLimits {
        &self.limits
    }

    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Watchers open on this tenant in this process.
    pub fn watches(&self) -> i64 {
        self.watches.load(Ordering::Acquire)
    }

    pub fn watch_count(&self, delta: i64) {
        self.watches.fetch_add(delta, Ordering::AcqRel);
    }

    /// Ends the tenant's watch streams (it was deleted).
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    pub fn closed(&self) -> tokio::sync::watch::Receiver<bool> {
        self.closed.subscribe()
    }

    fn check_size(&self, request: &impl Message) -> Result<()> {
        if request.encoded_len() > self.limits.max_request_bytes {
            return Err(KineError::RequestTooLarge);
        }
        Ok(())
    }

    /// The tenant's compaction revision; -1 when it never compacted.
    pub async fn compact_revision(&self) -> Result<(i64, ResponseHeader)> {
        let response = self
            .upstream
            .kv
            .clone()
            .range(RangeRequest {
                key: self.control.compacted(&self.name),
                ..Default::default()
            })
            .await
            .map_err(upstream_error)?
            .into_inner();
        let revision = response
            .kvs
            .first()
            .map_or(-1, |kv| parse_number(&kv.value));
        Ok((revision, response.header.unwrap_or_default()))
    }

    /// Sends `ops` in a transaction that etcd applies only while the tenant is not frozen and
    /// every lease in `leases` is the tenant's.
    async fn guarded(&self, leases: &[i64], ops: Vec<RequestOp>) -> Result<TxnResponse> {
        let frozen = self.control.frozen(&self.name);
        let mut compare = vec![absent(frozen.clone())];
        let mut seen = HashSet::new();
        for &lease in leases {
            if seen.insert(lease) {
                compare.push(present(self.control.lease(&self.name, lease)));
            }
        }
        let response = self
            .upstream
            .kv
            .clone()
            .txn(TxnRequest {
                compare,
                success: ops,
                failure: vec![get_op(frozen)],
            })
            .await
            .map_err(upstream_error)?
            .into_inner();
        if response.succeeded {
            return Ok(response);
        }
        let is_frozen = range_at(&response.responses, 0).is_some_and(|r| !r.kvs.is_empty());
        Err(if is_frozen {
            KineError::Frozen {
                tenant: self.name.clone(),
            }
        } else {
            KineError::LeaseNotFound
        })
    }

    /// Whether the tenant owns lease `id`.
    async fn owns(&self, id: i64) -> Result<bool> {
        if self
            .owned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&id)
        {
            return Ok(true);
        }
        let response = self
            .upstream
            .kv
            .clone()
            .range(RangeRequest {
                key: self.control.lease(&self.name, id),
                count_only: true,
                ..Default::default()
            })
            .await
            .map_err(upstream_error)?
            .into_inner();
        let owned = response.count > 0;
        if owned {
            self.remember(id);
        }
        Ok(owned)
    }

    fn remember(&self, id: i64) {
        self.owned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id);
    }

    fn forget(&self, id: i64) {
        self.owned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    async fn is_frozen(&self) -> Result<bool> {
        let response = self
            .upstream
            .kv
            .clone()
            .range(RangeRequest {
                key: self.control.frozen(&self.name),
                count_only: true,
                ..Default::default()
            })
            .await
            .map_err(upstream_error)?
            .into_inner();
        Ok(response.count > 0)
    }

    /// A current header, read from etcd.
    async fn current_header(&self) -> Result<ResponseHeader> {
        Ok(self.compact_revision().await?.1)
    }

    async fn keep_alive_once(&self, id: i64) -> Result<LeaseKeepAliveResponse> {
        let mut stream = self.keep_alive.lock().await;
        let request = LeaseKeepAliveRequest { id };
        for _attempt in 0..2 {
            let sent = match stream.as_mut() {
                Some((sender, _)) => sender.send(request).await.is_ok(),
                None => {
                    // etcd answers a stream's headers only with its first message: open the
                    // stream with the request already in it.
                    let (sender, receiver) = mpsc::channel(4);
                    let _ = sender.try_send(request);
                    let responses = self
                        .upstream
                        .lease
                        .clone()
                        .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(receiver))
                        .await
                        .map_err(upstream_error)?
                        .into_inner();
                    *stream = Some((sender, responses));
                    true
                }
            };
            if sent
                && let Some((_, responses)) = stream.as_mut()
                && let Ok(Some(response)) = responses.message().await
            {
                return Ok(response);
            }
            // The stream broke (a member went away): open another once.
            *stream = None;
        }
        Err(KineError::Unavailable(
            "the keep-alive stream to etcd broke".into(),
        ))
    }
}

#[async_trait::async_trait]
impl ServedTenant for ProxiedTenant {
    fn name(&self) -> &str {
        &self.name
    }

    async fn range(&self, request: RangeRequest) -> Result<RangeResponse> {
        range::check(&request)?;
        let revision = request.revision;
        let request = rewrite::range_request(&self.prefix, request);
        let mut response = if revision > 0 {
            // Read the tenant's compaction revision in the same read, so the answer is
            // consistent with it.
            let response = self
                .upstream
                .kv
                .clone()
                .txn(TxnRequest {
                    compare: vec![],
                    success: vec![
                        get_op(self.control.compacted(&self.name)),
                        RequestOp {
                            request: Some(Request::RequestRange(request)),
                        },
                    ],
                    failure: vec![],
                })
                .await
                .map_err(upstream_error)?
                .into_inner();
            let compacted = range_at(&response.responses, 0)
                .and_then(|r| r.kvs.first())
                .map_or(-1, |kv| parse_number(&kv.value));
            if revision < compacted {
                return Err(KineError::Compacted);
            }
            let mut range = range_at(&response.responses, 1)
                .cloned()
                .ok_or_else(|| KineError::Storage("etcd answered no range".into()))?;
            range.header = response.header;
            range
        } else {
            self.upstream
                .kv
                .clone()
                .range(request)
                .await
                .map_err(upstream_error)?
                .into_inner()
        };
        rewrite::range_response(&self.prefix, &mut response);
        Ok(response)
    }

    async fn put(&self, request: PutRequest) -> Result<PutResponse> {
        txn::check_put(&request)?;
        self.check_size(&request)?;
        let leases = if request.lease != 0 && !request.ignore_lease {
            vec![request.lease]
        } else {
            Vec::new()
        };
        let request = rewrite::put_request(&self.prefix, request);
        let response = self
            .guarded(
                &leases,
                vec![RequestOp {
                    request: Some(Request::RequestPut(request)),
                }],
            )
            .await?;
        let header = response.header;
        match response
            .responses
            .into_iter()
            .next()
            .and_then(|op| op.response)
        {
            Some(Response::ResponsePut(mut put)) => {
                put.header = header;
                rewrite::put_response(&self.prefix, &mut put);
                Ok(put)
            }
            _ => Err(KineError::Storage("etcd answered no put".into())),
        }
    }

    async fn delete_range(&self, request: DeleteRangeRequest) -> Result<DeleteRangeResponse> {
        txn::check_delete(&request)?;
        self.check_size(&request)?;
        let request = rewrite::delete_request(&self.prefix, request);
        let response = self
            .guarded(
                &[],
                vec![RequestOp {
                    request: Some(Request::RequestDeleteRange(request)),
                }],
            )
            .await?;
        let header = response.header;
        match response
            .responses
            .into_iter()
            .next()
            .and_then(|op| op.response)
        {
            Some(Response::ResponseDeleteRange(mut delete)) => {
                delete.header = header;
                rewrite::delete_response(&self.prefix, &mut delete);
                Ok(delete)
            }
            _ => Err(KineError::Storage("etcd answered no delete".into())),
        }
    }

    async fn txn(&self, request: TxnRequest) -> Result<TxnResponse> {
        txn::check_txn(&request, &self.limits)?;
        self.check_size(&request)?;
        if !rewrite::txn_writes(&request) {
            // Reads only: a frozen tenant serves them, so no guard.
            let mut response = self
                .upstream
                .kv
                .clone()
                .txn(rewrite::txn_request(&self.prefix, request))
                .await
                .map_err(upstream_error)?
                .into_inner();
            rewrite::txn_response(&self.prefix, &mut response);
            return Ok(response);
        }
        let mut leases = Vec::new();
        rewrite::txn_leases(&request, &mut leases);
        let request = rewrite::txn_request(&self.prefix, request);
        // The client's transaction, whole, as the one operation of the guarded one: etcd
        // evaluates the client's compares only when the guard holds.
        let response = self
            .guarded(
                &leases,
                vec![RequestOp {
                    request: Some(Request::RequestTxn(request)),
                }],
            )
            .await?;
        let header = response.header;
        match response
            .responses
            .into_iter()
            .next()
            .and_then(|op| op.response)
        {
            Some(Response::ResponseTxn(mut inner)) => {
                inner.header = header;
                rewrite::txn_response(&self.prefix, &mut inner);
                Ok(inner)
            }
            _ => Err(KineError::Storage("etcd answered no transaction".into())),
        }
    }

    async fn compact(&self, request: CompactionRequest) -> Result<CompactionResponse> {
        let key = self.control.compacted(&self.name);
        let current = self
            .upstream
            .kv
            .clone()
            .range(RangeRequest {
                key: key.clone(),
                ..Default::default()
            })
            .await
            .map_err(upstream_error)?
            .into_inner();
        let header = current.header.unwrap_or_default();
        if request.revision > header.revision {
            return Err(KineError::FutureRevision);
        }
        let (compacted, mod_revision) = current
            .kvs
            .first()
            .map_or((-1, 0), |kv| (parse_number(&kv.value), kv.mod_revision));
        if request.revision <= compacted {
            return Err(KineError::Compacted);
        }
        // Only if nobody compacted the tenant since it was read, and not while it is frozen.
        let response = self
            .upstream
            .kv
            .clone()
            .txn(TxnRequest {
                compare: vec![
                    absent(self.control.frozen(&self.name)),
                    Compare {
                        result: kine_proto::etcdserverpb::compare::CompareResult::Equal as i32,
                        target: kine_proto::etcdserverpb::compare::CompareTarget::Mod as i32,
                        key: key.clone(),
                        range_end: Bytes::new(),
                        target_union: Some(
                            kine_proto::etcdserverpb::compare::TargetUnion::ModRevision(
                                mod_revision,
                            ),
                        ),
                    },
                ],
                success: vec![put_op(key, request.revision.to_string(), 0)],
                failure: vec![get_op(self.control.frozen(&self.name))],
            })
            .await
            .map_err(upstream_error)?
            .into_inner();
        if !response.succeeded {
            let frozen = range_at(&response.responses, 0).is_some_and(|r| !r.kvs.is_empty());
            return Err(if frozen {
                KineError::Frozen {
                    tenant: self.name.clone(),
                }
            } else {
                // Another request compacted the tenant meanwhile, at least as far.
                KineError::Compacted
            });
        }
        // Then the shared etcd, as far as every tenant allows; the tenant's compaction stands
        // whether or not that happens now.
        if let Err(error) = compact_shared(&self.upstream, &self.control).await {
            tracing::warn!(%error, "compacting the shared etcd failed; the next compaction retries");
        }
        Ok(CompactionResponse {
            header: response.header,
        })
    }

    async fn lease_grant(&self, request: LeaseGrantRequest) -> Result<LeaseGrantResponse> {
        if request.ttl > MAX_LEASE_TTL {
            return Err(KineError::LeaseTtlTooLarge);
        }
        if self.is_frozen().await? {
            return Err(KineError::Frozen {
                tenant: self.name.clone(),
            });
        }
        // The tenant's leases are its ownership records: one count-only read. (Two grants
        // racing may both pass at the limit; etcd holds no lock to prevent it cheaply.)
        let max = self.limits.max_leases_per_tenant;
        let leases = self.control.leases(&self.name);
        let held = self
            .upstream
            .kv
            .clone()
            .range(RangeRequest {
                key: leases.prefix().clone(),
                range_end: leases.end().clone(),
                count_only: true,
                ..Default::default()
            })
            .await
            .map_err(upstream_error)?
            .into_inner()
            .count;
        if held >= max {
            return Err(KineError::TooManyLeases { max });
        }
        let granted = self
            .upstream
            .lease
            .clone()
            .lease_grant(request)
            .await
            .map_err(upstream_error)?
            .into_inner();
        if !granted.error.is_empty() {
            return Ok(granted);
        }
        // Record the tenant's ownership, attached to the lease itself, while not frozen.
        let recorded = self
            .upstream
            .kv
            .clone()
            .txn(TxnRequest {
                compare: vec![absent(self.control.frozen(&self.name))],
                success: vec![put_op(
                    self.control.lease(&self.name, granted.id),
                    Bytes::new(),
                    granted.id,
                )],
                failure: vec![],
            })
            .await;
        match recorded {
            Ok(response) if response.get_ref().succeeded => {
                self.remember(granted.id);
                Ok(granted)
            }
            other => {
                let _ = self
                    .upstream
                    .lease
                    .clone()
                    .lease_revoke(LeaseRevokeRequest { id: granted.id })
                    .await;
                match other {
                    Err(status) => Err(upstream_error(status)),
                    Ok(_) => Err(KineError::Frozen {
                        tenant: self.name.clone(),
                    }),
                }
            }
        }
    }

    async fn lease_revoke(&self, id: i64) -> Result<LeaseRevokeResponse> {
        if !self.owns(id).await? {
            return Err(KineError::LeaseNotFound);
        }
        if self.is_frozen().await? {
            return Err(KineError::Frozen {
                tenant: self.name.clone(),
            });
        }
        self.forget(id);
        let response = self
            .upstream
            .lease
            .clone()
            .lease_revoke(LeaseRevokeRequest { id })
            .await
            .map_err(upstream_error)?
            .into_inner();
        Ok(response)
    }

    async fn lease_keep_alive(&self, id: i64) -> Result<LeaseKeepAliveResponse> {
        if !self.owns(id).await? {
            return Ok(LeaseKeepAliveResponse {
                header: Some(self.current_header().await?),
                id,
                ttl: 0,
            });
        }
        let response = self.keep_alive_once(id).await?;
        if response.ttl <= 0 {
            self.forget(id);
        }
        Ok(response)
    }

    async fn lease_time_to_live(
        &self,
        request: LeaseTimeToLiveRequest,
    ) -> Result<LeaseTimeToLiveResponse> {
        if !self.owns(request.id).await? {
            return Ok(LeaseTimeToLiveResponse {
                header: Some(self.current_header().await?),
                id: request.id,
                ttl: -1,
                granted_ttl: 0,
                keys: Vec::new(),
            });
        }
        let mut response = self
            .upstream
            .lease
            .clone()
            .lease_time_to_live(request)
            .await
            .map_err(upstream_error)?
            .into_inner();
        if response.ttl < 0 {
            self.forget(response.id);
        }
        // The ownership record is attached to the lease too: only the tenant's keys show.
        response.keys = response
            .keys
            .iter()
            .filter_map(|key| self.prefix.strip(key))
            .collect();
        Ok(response)
    }

    async fn lease_leases(&self) -> Result<LeaseLeasesResponse> {
        let leases = self.control.leases(&self.name);
        let response = self
            .upstream
            .kv
            .clone()
            .range(RangeRequest {
                key: leases.prefix().clone(),
                range_end: leases.end().clone(),
                keys_only: true,
                ..Default::default()
            })
            .await
            .map_err(upstream_error)?
            .into_inner();
        Ok(LeaseLeasesResponse {
            leases: response
                .kvs
                .iter()
                .filter_map(|kv| {
                    let hex = leases.strip(&kv.key)?;
                    i64::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()
                })
                .map(|id| LeaseStatus { id })
                .collect(),
            header: response.header,
        })
    }

    async fn watch(
        self: Arc<Self>,
        requests: WatchRequests,
        responses: WatchResponses,
        _progress_interval: Duration,
    ) {
        super::watch::serve(self, requests, responses).await;
    }

    async fn header(&self) -> Result<ResponseHeader> {
        self.current_header().await
    }

    async fn status(&self, _whole_datastore: bool) -> Result<StatusFacts> {
        // The shared etcd's size would tell of other tenants: always the tenant's own.
        let (_, bytes, revision) = usage(&self.upstream, &self.prefix).await?;
        let mut header = self.current_header().await?;
        header.revision = header.revision.max(revision);
        Ok(StatusFacts {
            header,
            db_size: bytes,
            db_size_in_use: bytes,
        })
    }

    async fn defragment(&self, _whole_datastore: bool) -> Result<()> {
        // A tenant does not get to defragment the shared cluster.
        Ok(())
    }

    async fn set_frozen(&self, frozen: bool) -> Result<()> {
        let key = self.control.frozen(&self.name);
        let op = if frozen {
            put_op(key.clone(), now_ms().to_string(), 0)
        } else {
            delete_op(key.clone(), Bytes::new())
        };
        // Freezing keeps the time of the first freeze; etcd orders this write with every
        // guarded write, so once it returns none of them lands.
        let compare = if frozen { vec![absent(key)] } else { vec![] };
        self.upstream
            .kv
            .clone()
            .txn(TxnRequest {
                compare,
                success: vec![op],
                failure: vec![],
            })
            .await
            .map_err(upstream_error)?;
        Ok(())
    }

    async fn set_quota(&self, quota: Quota) -> Result<()> {
        if quota != Quota::default() {
            return Err(KineError::Unsupported("a quota on the etcd datastore"));
        }
        Ok(())
    }
}
