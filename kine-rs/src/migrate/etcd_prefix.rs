//! A migration source that reads the keys under a prefix of a **plain etcd** cluster: what a
//! kube-apiserver started with `--etcd-prefix=/<name>` writes (Kamaji's etcd layout,
//! `/<schema>/…`). `--from etcd://HOST:PORT[,HOST:PORT] --from-prefix /<name>`.
//!
//! * **Keys** land in the target tenant with the prefix stripped: `/<name>/pods/a` becomes
//!   `/pods/a` (the prefix is taken as a directory: `/<name>` reads the keys under
//!   `/<name>/`, never `/<name>2/…`). The tenant's kube-apiserver then runs on kine-rs with
//!   `--etcd-prefix=/`.
//! * **Revisions** are etcd's own, global to the cluster, kept as they are: within one prefix
//!   they are sparse, which etcd semantics allow (a revision is a point in the cluster's
//!   history, not a counter of this tenant's writes), so resourceVersions stay valid.
//! * **History**: etcd's compaction cannot be held by a client, so the copy starts at the
//!   current revision `R` when it begins (a Range at `R` in pages, then the events after `R`
//!   from Watch in windows: a watch of the whole keyspace, as every revision is some key's
//!   write, so reaching the window's last revision proves the window complete; the other
//!   tenants' events are dropped as they come) and the target's compaction revision is `R`: reads and watches
//!   from before `R` are answered "compacted" there (a client relists, as after any
//!   compaction). The snapshot must be read before etcd's own compaction passes `R`
//!   (kube-apiserver compacts every 5 minutes to the revision of the previous pass, so `R`
//!   stays readable for 5 to 10 minutes); if it is not, the copy stops with "compacted" and
//!   a rerun starts over.
//! * **Leases**: `LeaseLeases`, then `LeaseTimeToLive(keys)` of each: the leases attached to a
//!   key under the prefix, with their remaining TTLs, read at the switch.
//! * **Freeze**: a plain etcd cannot be frozen without its auth (not supported here): the
//!   cut-over needs `--source-writers-stopped` (the user stopped the tenant's apiserver);
//!   the freeze point is then etcd's revision at that moment, and before the switch every
//!   change of the prefix after it (a write, a lease expiring) is looked for: one aborts the
//!   switch, and the source keeps serving. Nothing is written to the source etcd: it is not
//!   marked moved (stop its writers for good).

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use kine_proto::etcdserverpb::kv_client::KvClient;
use kine_proto::etcdserverpb::lease_client::LeaseClient;
use kine_proto::etcdserverpb::watch_client::WatchClient;
use kine_proto::etcdserverpb::watch_request::RequestUnion;
use kine_proto::etcdserverpb::{
    LeaseLeasesRequest, LeaseTimeToLiveRequest, RangeRequest, WatchCreateRequest, WatchRequest,
};
use thiserror::Error;
use tonic::transport::{Channel, Endpoint};

use crate::error::{KineError, Result};
use crate::etcd_proxy::prefix::prefix_end;
use crate::etcd_proxy::{parse_endpoint, upstream_error};
use crate::model::{Event, EventType, KeyValue, LeaseRecord, Revision, now_ms};
use crate::storage::Quota;

use super::MigrateError;
use super::source::{Source, SourceState};

/// How long connecting to etcd may take before the command gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Keys per page when the prefix's size is summed.
const USAGE_PAGE: i64 = 1000;

/// Why an etcd prefix cannot be read.
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
}

/// The keys under one prefix of a plain etcd, read as a migration source.
pub struct EtcdPrefixSource {
    kv: KvClient<Channel>,
    watch: WatchClient<Channel>,
    lease: LeaseClient<Channel>,
    endpoint: String,
    /// The prefix stripped from keys (`/tenant1`).
    strip: Bytes,
    /// The range read: `/tenant1/` to its end.
    start: Bytes,
    end: Bytes,
    /// What this process did: the snapshot revision it pinned, whether it froze.
    local: Mutex<Local>,
}

#[derive(Default, Clone, Copy)]
struct Local {
    pinned: Option<Revision>,
    frozen: bool,
    usage: Option<(i64, i64)>,
}

impl EtcdPrefixSource {
    /// Connects to the etcd at `endpoint` and checks that `prefix` holds keys.
    pub async fn open(endpoint: &str, prefix: &str) -> Result<Self, EtcdSourceError> {
        let trimmed = prefix.trim_end_matches('/');
        if !trimmed.starts_with('/') || trimmed.len() < 2 {
            return Err(EtcdSourceError::BadPrefix(prefix.to_string()));
        }
        let (members, tls) =
            parse_endpoint(endpoint).map_err(|e| EtcdSourceError::Endpoint(e.to_string()))?;
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
        let strip = Bytes::from(trimmed.as_bytes().to_vec());
        let mut start = trimmed.as_bytes().to_vec();
        start.push(b'/');
        let end = prefix_end(&start);
        let source = EtcdPrefixSource {
            kv: KvClient::new(channel.clone()).max_decoding_message_size(usize::MAX),
            watch: WatchClient::new(channel.clone()).max_decoding_message_size(usize::MAX),
            lease: LeaseClient::new(channel),
            endpoint: members.join(","),
            strip,
            start: Bytes::from(start),
            end,
            local: Mutex::new(Local::default()),
        };
        let count = tokio::time::timeout(CONNECT_TIMEOUT * 2, source.count(0))
            .await
            .map_err(|_| EtcdSourceError::Unreachable {
                endpoint: source.endpoint.clone(),
                reason: "no answer within 10s".into(),
            })?
            .map_err(|e| EtcdSourceError::Unreachable {
                endpoint: source.endpoint.clone(),
                reason: e.to_string(),
            })?;
        if count.1 == 0 {
            return Err(EtcdSourceError::EmptyPrefix(format!(
                "{}/",
                String::from_utf8_lossy(&source.strip)
            )));
        }
        Ok(source)
    }

    fn local(&self) -> Local {
        *self.local.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_local(&self, change: impl FnOnce(&mut Local)) {
        change(&mut self.local.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// The cluster's revision and the number of keys under the prefix at `revision`.
    async fn count(&self, revision: Revision) -> Result<(Revision, i64)> {
        let response = self
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

    /// etcd's compaction revision (-1 when never compacted). A client learns it only by
    /// trying: a read at a revision below it fails, so a binary search over reads of one
    /// absent key (a few dozen tiny requests) finds the lowest revision still readable.
    async fn compact_revision(&self, current: Revision) -> Result<Revision> {
        let readable = |revision: Revision| async move {
            let request = RangeRequest {
                key: Bytes::from_static(b"\0kine-rs/compaction-probe"),
                revision,
                count_only: true,
                ..Default::default()
            };
            match self.kv.clone().range(request).await.map_err(upstream_error) {
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

    /// A key under the prefix (`/tenant1/…`, not `/tenant10/…`), without it.
    fn strip_key(&self, key: &[u8]) -> Option<Bytes> {
        if !key.starts_with(self.start.as_ref()) {
            return None;
        }
        key.strip_prefix(self.strip.as_ref())
            .map(|rest| Bytes::from(rest.to_vec()))
    }
}

#[async_trait]
impl Source for EtcdPrefixSource {
    fn describe(&self) -> String {
        format!(
            "the prefix {}/ of etcd at {}",
            String::from_utf8_lossy(&self.strip),
            self.endpoint
        )
    }

    fn needs_stopped_writers(&self) -> bool {
        true
    }

    async fn state(&self) -> Result<SourceState> {
        let local = self.local();
        let (revision, keys) = self.count(0).await?;
        // Once pinned, the copy's history begins at the snapshot: the target's compaction.
        let compact = match local.pinned {
            Some(pinned) => pinned,
            None => self.compact_revision(revision).await?,
        };
        let bytes = match local.usage {
            Some((_, bytes)) => bytes,
            None => {
                // Summed once, a page at a time (memory stays bounded).
                let mut bytes = 0i64;
                let mut after: Option<Bytes> = None;
                loop {
                    let page = self.page(revision, after.as_deref(), USAGE_PAGE).await?;
                    bytes += page
                        .iter()
                        .map(|kv| (kv.key.len() + kv.value.len()) as i64)
                        .sum::<i64>();
                    match page.last() {
                        Some(last) if page.len() as i64 == USAGE_PAGE => {
                            after = Some(last.key.clone())
                        }
                        _ => break,
                    }
                }
                self.set_local(|l| l.usage = Some((keys, bytes)));
                bytes
            }
        };
        Ok(SourceState {
            revision,
            compact_revision: compact,
            keys,
            bytes,
            frozen: local.frozen,
            // etcd's leases keep running while the writers are stopped: no pause to add.
            frozen_at_ms: 0,
            moved: false,
            pinned: local.pinned.is_some(),
            quota: Quota::default(),
        })
    }

    async fn recover(&self) -> Result<()> {
        Ok(())
    }

    async fn pin(&self, _target: &str) -> Result<Revision> {
        let (revision, _) = self.count(0).await?;
        self.set_local(|l| l.pinned = Some(revision));
        Ok(revision)
    }

    async fn can_resume(&self, snapshot: Revision) -> Result<bool> {
        match self.count(snapshot).await {
            Ok(_) => {
                self.set_local(|l| l.pinned = Some(snapshot));
                Ok(true)
            }
            Err(KineError::Etcd { message, .. }) if message.contains("compacted") => Ok(false),
            Err(error) => Err(error),
        }
    }

    async fn page(
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

    async fn events(&self, after: Revision, up_to: Revision) -> Result<Vec<Event>> {
        if up_to <= after {
            return Ok(Vec::new());
        }
        // A watch of the whole keyspace from `after + 1`, read until an event at or past
        // `up_to`: every revision up to the cluster's current one is a write of some key
        // (not necessarily under the prefix), and the events of one revision come in one
        // response, so then every event up to `up_to` has arrived. (etcd's progress report
        // cannot be used instead: before 3.5.8 it may come before the history it covers.)
        // Events of other keys are dropped as they come; at most one window is held.
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

    async fn leases(&self) -> Result<Vec<LeaseRecord>> {
        let ids = self
            .lease
            .clone()
            .lease_leases(LeaseLeasesRequest {})
            .await
            .map_err(upstream_error)?
            .into_inner()
            .leases;
        let now = now_ms();
        let mut leases = Vec::new();
        for lease in ids {
            let ttl = self
                .lease
                .clone()
                .lease_time_to_live(LeaseTimeToLiveRequest {
                    id: lease.id,
                    keys: true,
                })
                .await
                .map_err(upstream_error)?
                .into_inner();
            let ours = ttl
                .keys
                .iter()
                .any(|key| key.starts_with(self.start.as_ref()));
            if ours && ttl.ttl > 0 {
                leases.push(LeaseRecord {
                    id: lease.id,
                    ttl: ttl.granted_ttl,
                    expires_at_ms: now + ttl.ttl * 1000,
                });
            }
        }
        leases.sort_by_key(|lease| lease.id);
        Ok(leases)
    }

    async fn freeze(&self, _target: &str) -> Result<SourceState> {
        // The writers are stopped (the caller said so): the freeze point is now.
        self.set_local(|l| l.frozen = true);
        self.state().await
    }

    async fn check_frozen(
        &self,
        final_revision: Revision,
    ) -> std::result::Result<(), MigrateError> {
        let (now, _) = self.count(0).await.map_err(MigrateError::Source)?;
        let changes = self
            .events(final_revision, now)
            .await
            .map_err(MigrateError::Source)?;
        if let Some(event) = changes.first() {
            let kv = event.kv.clone().unwrap_or_default();
            return Err(MigrateError::SourceWritten {
                final_revision,
                what: format!(
                    "{} {}{} at revision {}",
                    if event.r#type == EventType::Delete as i32 {
                        "a delete of"
                    } else {
                        "a put of"
                    },
                    String::from_utf8_lossy(&self.strip),
                    String::from_utf8_lossy(&kv.key),
                    kv.mod_revision
                ),
            });
        }
        Ok(())
    }

    async fn release(&self, keep_pin: bool) -> Result<()> {
        self.set_local(|l| {
            l.frozen = false;
            if !keep_pin {
                l.pinned = None;
            }
        });
        Ok(())
    }

    async fn mark_moved(&self, _target: &str) -> Result<()> {
        // Nothing is written to an etcd kine-rs does not own (see the module's comment).
        Ok(())
    }
}
