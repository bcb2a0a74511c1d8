//! Reading the keys under one prefix of an etcd cluster as a migration source: what the two
//! etcd sources share ([`super::etcd_prefix::EtcdPrefixSource`], a plain etcd prefix, and
//! [`super::etcd_tenant::EtcdTenantSource`], a tenant of kine-rs's etcd proxy).
//!
//! * **Snapshot pages**: a Range of the prefix at the snapshot revision, keys stripped.
//! * **Events**: a watch of the whole keyspace from a revision, read until an event at or past
//!   the window's end: every revision of etcd is some key's write (not necessarily under the
//!   prefix), and the events of one revision come in one response, so then every event of the
//!   window has arrived. Other keys' events are dropped as they come; at most one window of
//!   the prefix's events is held.
//! * **Changes after the freeze point**, for the check before the switch.

use std::time::Duration;

use bytes::Bytes;
use kine_proto::etcdserverpb::watch_request::RequestUnion;
use kine_proto::etcdserverpb::{
    LeaseTimeToLiveRequest, RangeRequest, WatchCreateRequest, WatchRequest,
};
use thiserror::Error;
use tonic::transport::{Channel, Endpoint};

use crate::error::{KineError, Result};
use crate::etcd_proxy::{Upstream, parse_endpoint, upstream_error};
use crate::model::{Event, EventType, KeyValue, LeaseRecord, Revision, now_ms};

/// How long connecting to etcd may take before the command gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Keys per page when the prefix's size is summed.
const USAGE_PAGE: i64 = 1000;

/// Why an etcd source cannot be read.
#[derive(Debug, Error)]
pub enum EtcdSourceError {
    #[error("{0}")]
    Endpoint(String),
    #[error(
        "--from-prefix {0:?}: a prefix is a key path like /tenant1 (starting with /, not just /)"
    )]
    BadPrefix(String),
    #[error("etcd at {endpoint} does not answer: {reason}")]
    Unreachable { endpoint: String, reason: String },
    #[error(
        "no key under {0:?} in the source etcd (is --from-prefix the apiserver's --etcd-prefix?)"
    )]
    EmptyPrefix(String),
    #[error("--etcd-tenant-prefix: {0}")]
    BadTemplate(String),
    #[error(
        "tenant {tenant:?} is not a tenant of the etcd proxy at {endpoint} (there is no {record}); \
         check --tenant and --etcd-tenant-prefix, or pass --from-prefix to read keys a \
         kube-apiserver wrote to etcd directly"
    )]
    UnknownTenant {
        tenant: String,
        endpoint: String,
        record: String,
    },
}

/// The keys under one prefix of an etcd cluster.
pub struct EtcdKeys {
    pub upstream: Upstream,
    /// The members, for messages.
    pub endpoint: String,
    /// What is stripped from keys (`/tenant1` of a plain prefix, `/t/` of a proxy tenant).
    strip: Bytes,
    /// The range read: from `start` (the prefix with its separator) to its end.
    start: Bytes,
    end: Bytes,
}

impl EtcdKeys {
    /// Clients of the etcd at `endpoint` (plain `etcd://HOST:PORT[,HOST:PORT]`) for the keys
    /// starting with `start`, arriving without `strip` (a prefix of `start`); connects lazily.
    pub fn new(endpoint: &str, strip: Bytes, start: Bytes) -> Result<Self, EtcdSourceError> {
        let crate::etcd_proxy::EtcdEndpoint {
            members,
            tls,
            credentials,
        } = parse_endpoint(endpoint).map_err(|e| EtcdSourceError::Endpoint(e.to_string()))?;
        if tls {
            return Err(EtcdSourceError::Endpoint(
                "reading a TLS etcd (etcds://, https://) is not supported by kine-rs migrate \
                 yet"
                .into(),
            ));
        }
        let endpoints = members
            .iter()
            .map(|member| {
                Endpoint::from_shared(format!("http://{member}"))
                    .map(|e| {
                        e.connect_timeout(CONNECT_TIMEOUT)
                            .timeout(REQUEST_TIMEOUT)
                            .tcp_nodelay(true)
                    })
                    .map_err(|e| EtcdSourceError::Endpoint(format!("{member:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let channel = Channel::balance_list(endpoints.into_iter());
        let end = crate::etcd_proxy::prefix::prefix_end(&start);
        Ok(EtcdKeys {
            upstream: Upstream::new(channel, credentials),
            endpoint: members.join(","),
            strip,
            start,
            end,
        })
    }

    /// The number of keys under the prefix now, failing clearly when etcd does not answer.
    pub async fn reachable(&self) -> Result<i64, EtcdSourceError> {
        let unreachable = |reason: String| EtcdSourceError::Unreachable {
            endpoint: self.endpoint.clone(),
            reason,
        };
        let (_, count) = tokio::time::timeout(CONNECT_TIMEOUT * 2, self.count(0))
            .await
            .map_err(|_| unreachable("no answer within 10s".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        Ok(count)
    }

    /// The range of the prefix's keys as etcd holds them.
    pub fn range(&self) -> (Bytes, Bytes) {
        (self.start.clone(), self.end.clone())
    }

    /// The prefix, as messages show it.
    pub fn shown(&self) -> String {
        String::from_utf8_lossy(&self.start).to_string()
    }

    /// The cluster's revision and the number of keys under the prefix at `revision`.
    pub async fn count(&self, revision: Revision) -> Result<(Revision, i64)> {
        let response = self
            .upstream
            .kv
            .clone()
            .range(RangeRequest {
                key: self.start.clone(),
                range_end: self.end.clone(),
                revision,
                count_only: true,
                ..Default::default()
            })
            .await
            .map_err(upstream_error)?
            .into_inner();
        Ok((
            response.header.map(|h| h.revision).unwrap_or_default(),
            response.count,
        ))
    }

    /// The bytes (keys without the prefix, plus values) under the prefix at `revision`,
    /// summed a page at a time (memory stays bounded).
    pub async fn bytes_at(&self, revision: Revision) -> Result<i64> {
        let mut bytes = 0i64;
        let mut after: Option<Bytes> = None;
        loop {
            let page = self.page(revision, after.as_deref(), USAGE_PAGE).await?;
            bytes += page
                .iter()
                .map(|kv| (kv.key.len() + kv.value.len()) as i64)
                .sum::<i64>();
            match page.last() {
                Some(last) if page.len() as i64 == USAGE_PAGE => after = Some(last.key.clone()),
                _ => return Ok(bytes),
            }
        }
    }

    /// etcd's compaction revision (-1 when never compacted). A client learns it only by
    /// trying: a read at a revision below it fails, so a binary search over reads of one
    /// absent key (a few dozen tiny requests) finds the lowest revision still readable.
    pub async fn compact_revision(&self, current: Revision) -> Result<Revision> {
        let readable = |revision: Revision| async move {
            let request = RangeRequest {
                key: Bytes::from_static(b"\0kine-rs/compaction-probe"),
                revision,
                count_only: true,
                ..Default::default()
            };
            let mut kv = self.upstream.kv.clone();
            match kv.range(request).await.map_err(upstream_error) {
                Ok(_) => Ok(true),
                Err(KineError::Etcd { message, .. }) if message.contains("compacted") => Ok(false),
                Err(error) => Err(error),
            }
        };
        if current <= 1 || readable(1).await? {
            return Ok(-1);
        }
        // Not readable at `low`, readable at `high`.
        let (mut low, mut high) = (1, current);
        while high - low > 1 {
            let middle = low + (high - low) / 2;
            if readable(middle).await? {
                high = middle;
            } else {
                low = middle;
            }
        }
        Ok(high)
    }

    /// Whether etcd still holds its history at `revision` (not compacted).
    pub async fn readable_at(&self, revision: Revision) -> Result<bool> {
        match self.count(revision).await {
            Ok(_) => Ok(true),
            Err(KineError::Etcd { message, .. }) if message.contains("compacted") => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// A key under the prefix, without what is stripped.
    fn strip_key(&self, key: &[u8]) -> Option<Bytes> {
        if !key.starts_with(self.start.as_ref()) {
            return None;
        }
        key.strip_prefix(self.strip.as_ref())
            .map(|rest| Bytes::from(rest.to_vec()))
    }

    /// Up to `limit` keys live at `revision`, after `after` (a stripped key).
    pub async fn page(
        &self,
        revision: Revision,
        after: Option<&[u8]>,
        limit: i64,
    ) -> Result<Vec<KeyValue>> {
        let key = match after {
            Some(after) => {
                let mut key = self.strip.to_vec();
                key.extend_from_slice(after);
                key.push(0);
                Bytes::from(key)
            }
            None => self.start.clone(),
        };
        let response = self
            .upstream
            .kv
            .clone()
            .range(RangeRequest {
                key,
                range_end: self.end.clone(),
                revision,
                limit: limit.max(1),
                ..Default::default()
            })
            .await
            .map_err(upstream_error)?
            .into_inner();
        Ok(response
            .kvs
            .into_iter()
            .filter_map(|mut kv| {
                kv.key = self.strip_key(&kv.key)?;
                Some(kv)
            })
            .collect())
    }

    /// The prefix's events with revisions in `(after, up_to]` (`up_to` at most the cluster's
    /// current revision), keys stripped, without `prev_kv`.
    pub async fn events(&self, after: Revision, up_to: Revision) -> Result<Vec<Event>> {
        if up_to <= after {
            return Ok(Vec::new());
        }
        // (etcd's progress report cannot end the window instead: before 3.5.8 it may come
        // before the history it covers.)
        let (requests, receiver) = tokio::sync::mpsc::channel(4);
        let create = WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: Bytes::from_static(b"\0"),
                range_end: Bytes::from_static(b"\0"),
                start_revision: after + 1,
                ..Default::default()
            })),
        };
        let _ = requests.send(create).await;
        let mut stream = self
            .upstream
            .watch
            .clone()
            .watch(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await
            .map_err(upstream_error)?
            .into_inner();
        let mut events = Vec::new();
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        loop {
            let response = tokio::time::timeout_at(deadline, stream.message())
                .await
                .map_err(|_| {
                    KineError::Unavailable(format!(
                        "etcd's watch did not reach revision {up_to} within {}s",
                        REQUEST_TIMEOUT.as_secs()
                    ))
                })?
                .map_err(upstream_error)?
                .ok_or_else(|| KineError::Unavailable("etcd closed the watch stream".into()))?;
            if response.compact_revision > 0 {
                return Err(KineError::Compacted);
            }
            if response.canceled {
                return Err(KineError::Unavailable(format!(
                    "etcd cancelled the watch: {}",
                    response.cancel_reason
                )));
            }
            let mut reached = false;
            for mut event in response.events {
                let Some(kv) = event.kv.as_mut() else {
                    continue;
                };
                if kv.mod_revision >= up_to {
                    reached = true;
                }
                if kv.mod_revision > up_to {
                    break;
                }
                let Some(key) = self.strip_key(&kv.key) else {
                    continue;
                };
                kv.key = key;
                if event.r#type == EventType::Delete as i32 {
                    // A delete event carries the key and its revision only.
                    let mod_revision = kv.mod_revision;
                    *kv = KeyValue {
                        key: kv.key.clone(),
                        mod_revision,
                        ..Default::default()
                    };
                }
                event.prev_kv = None;
                events.push(event);
            }
            if reached {
                drop(requests);
                return Ok(events);
            }
        }
    }

    /// The first change of the prefix after `revision` (a write, a lease expiring), as a
    /// message; `None` when there is none up to the cluster's current revision.
    pub async fn first_change_after(&self, revision: Revision) -> Result<Option<String>> {
        let (now, _) = self.count(0).await?;
        let changes = self.events(revision, now).await?;
        Ok(changes.first().map(|event| {
            let kv = event.kv.clone().unwrap_or_default();
            format!(
                "{} {}{} at revision {}",
                if event.r#type == EventType::Delete as i32 {
                    "a delete of"
                } else {
                    "a put of"
                },
                String::from_utf8_lossy(&self.strip),
                String::from_utf8_lossy(&kv.key),
                kv.mod_revision
            )
        }))
    }

    /// Lease `id` with its remaining TTL and the keys attached to it; `None` once it expired.
    pub async fn lease(&self, id: i64) -> Result<Option<(LeaseRecord, Vec<Bytes>)>> {
        let now = now_ms();
        let ttl = self
            .upstream
            .lease
            .clone()
            .lease_time_to_live(LeaseTimeToLiveRequest { id, keys: true })
            .await
            .map_err(upstream_error)?
            .into_inner();
        if ttl.ttl <= 0 {
            return Ok(None);
        }
        Ok(Some((
            LeaseRecord {
                id,
                ttl: ttl.granted_ttl,
                expires_at_ms: now + ttl.ttl * 1000,
            },
            ttl.keys,
        )))
    }

    /// Whether `key` (as etcd holds it) is under the prefix.
    pub fn covers(&self, key: &[u8]) -> bool {
        key.starts_with(self.start.as_ref())
    }
}
