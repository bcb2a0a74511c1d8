//! etcd as a datastore: a tenant-prefixing proxy in front of a real etcd cluster.
//!
//! Each tenant is a key prefix of the shared etcd ([`prefix`]); every request is confined to
//! it and every answer stripped of it ([`rewrite`]). etcd owns the revisions (shared by all
//! tenants and increasing, with gaps between one tenant's writes) and evaluates compares;
//! kine-rs keeps its own records beside the tenants' keys ([`Control`]): the tenant registry,
//! freezes, per-tenant compaction revisions and lease ownership. Every write transaction the
//! proxy sends carries a compare on the tenant's freeze record, so etcd itself refuses writes
//! of a frozen tenant, atomically, whichever proxy they come through.

pub mod auth;
pub mod prefix;
pub(crate) mod quota;
pub mod rewrite;
mod tenant;
mod watch;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kine_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use kine_proto::etcdserverpb::kv_client::KvClient;
use kine_proto::etcdserverpb::lease_client::LeaseClient;
use kine_proto::etcdserverpb::request_op::Request;
use kine_proto::etcdserverpb::response_op::Response;
use kine_proto::etcdserverpb::watch_client::WatchClient;
use kine_proto::etcdserverpb::{
    CompactionRequest, Compare, DeleteRangeRequest, LeaseRevokeRequest, PutRequest, RangeRequest,
    RangeResponse, RequestOp, TxnRequest,
};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use self::auth::{AuthChannel, Credentials};
use tracing::{info, warn};

use self::prefix::{KeyPrefix, PrefixTemplate};
pub use self::tenant::ProxiedTenant;
use crate::error::{KineError, Result};
use crate::health::Probe;
use crate::served::{ServedTenant, TenantDirectory};
use crate::storage::{KeyspaceState, MigrationRole, Quota, TlsFiles};
use crate::tenants::validate_name;
use crate::txn::RequestLimits;

/// How long start-up waits for an etcd cluster that does not answer.
const CONNECT_WAIT: Duration = Duration::from_secs(60);
/// How long one connection attempt to a member may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Connections to each etcd member.
const CONNECTIONS_PER_MEMBER: usize = 4;
/// Keys read per page when a tenant's size is summed.
const USAGE_PAGE: i64 = 1000;
/// How often the keeper looks for frozen tenants whose leases it must renew.
const FROZEN_KEEPER_TICK: Duration = Duration::from_millis(250);

/// Whether `endpoint` names an etcd cluster.
pub fn is_etcd_endpoint(endpoint: &str) -> bool {
    ["etcd://", "etcds://", "http://", "https://"]
        .iter()
        .any(|scheme| endpoint.starts_with(scheme))
}

/// Settings of the proxy.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// Client TLS to etcd (`--ca-file`, `--cert-file`, `--key-file`).
    pub tls: TlsFiles,
    pub limits: RequestLimits,
    /// `--etcd-tenant-prefix`.
    pub prefix: String,
    /// The quota of tenants created by this process.
    pub default_quota: Quota,
}

/// Why the etcd cluster cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Endpoint(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error(
        "etcd refused kine-rs: {0} (the user needs read and write access to the tenants' \
         prefixes and to kine-rs's records, `/_kine-rs/`)"
    )]
    Refused(String),
    #[error("etcd refused kine-rs's user: {0}")]
    Login(String),
    #[error("no member answered within {seconds}s: {reason}")]
    Unreachable { seconds: u64, reason: String },
}

/// What an etcd endpoint names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdEndpoint {
    /// `HOST:PORT` of each member.
    pub members: Vec<String>,
    /// TLS asked for by the scheme (`etcds://`, `https://`).
    pub tls: bool,
    /// `USER:PASSWORD@` before the members: etcd's user authentication.
    pub credentials: Option<auth::Credentials>,
}

/// Parses `etcd://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]` (also `etcds://`, `http://`,
/// `https://`; user and password %-escaped as in any URL).
pub fn parse_endpoint(endpoint: &str) -> std::result::Result<EtcdEndpoint, ConnectError> {
    let (rest, tls) = if let Some(rest) = endpoint.strip_prefix("etcd://") {
        (rest, false)
    } else if let Some(rest) = endpoint.strip_prefix("etcds://") {
        (rest, true)
    } else if let Some(rest) = endpoint.strip_prefix("http://") {
        (rest, false)
    } else if let Some(rest) = endpoint.strip_prefix("https://") {
        (rest, true)
    } else {
        return Err(ConnectError::Endpoint(
            "an etcd endpoint is etcd://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]".into(),
        ));
    };
    // Host names never hold an `@`; an unescaped one in the password is taken as typed.
    let (credentials, rest) = match rest.rsplit_once('@') {
        Some((userinfo, members)) => (Some(parse_credentials(userinfo)?), members),
        None => (None, rest),
    };
    let mut members = Vec::new();
    for member in rest.split(',') {
        // Each member may repeat the scheme (`http://a:2379,http://b:2379`, as etcdctl takes).
        let member = ["http://", "https://", "etcd://", "etcds://"]
            .iter()
            .find_map(|scheme| member.strip_prefix(scheme))
            .unwrap_or(member)
            .trim_end_matches('/');
        if member.is_empty() || member.contains('/') || member.contains('?') {
            return Err(ConnectError::Endpoint(format!(
                "{member:?} is not a HOST:PORT of an etcd member"
            )));
        }
        let member = if member
            .rsplit_once(':')
            .is_some_and(|(_, port)| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
        {
            member.to_string()
        } else {
            format!("{member}:2379")
        };
        members.push(member);
    }
    Ok(EtcdEndpoint {
        members,
        tls,
        credentials,
    })
}

/// `USER:PASSWORD` of an etcd endpoint; never quoted in an error, which may be logged.
fn parse_credentials(userinfo: &str) -> std::result::Result<auth::Credentials, ConnectError> {
    let missing = || {
        ConnectError::Endpoint(
            "etcd credentials are USER:PASSWORD@ before the members (%-escape `:`, `@`, `%` \
             in them)"
                .into(),
        )
    };
    let (user, password) = userinfo.split_once(':').ok_or_else(missing)?;
    let (user, password) = (percent_decode(user)?, percent_decode(password)?);
    if user.is_empty() || password.is_empty() {
        return Err(missing());
    }
    Ok(auth::Credentials::new(user, password))
}

/// Decodes the `%XX` escapes of a user name or password.
fn percent_decode(text: &str) -> std::result::Result<String, ConnectError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let byte = text
                .get(i + 1..i + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or_else(|| {
                    ConnectError::Endpoint(
                        "a malformed %-escape in the etcd endpoint's credentials".into(),
                    )
                })?;
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| ConnectError::Endpoint("the etcd endpoint's credentials are not UTF-8".into()))
}

/// Clients of the etcd cluster; cheap to clone.
#[derive(Clone)]
pub struct Upstream {
    pub kv: KvClient<AuthChannel>,
    pub watch: WatchClient<AuthChannel>,
    pub lease: LeaseClient<AuthChannel>,
    channel: AuthChannel,
}

impl Upstream {
    /// Clients over `channel`, authenticating as `credentials` when given.
    pub fn new(channel: Channel, credentials: Option<Credentials>) -> Self {
        let channel = AuthChannel::new(channel, credentials);
        Upstream {
            kv: KvClient::new(channel.clone()).max_decoding_message_size(usize::MAX),
            watch: WatchClient::new(channel.clone()).max_decoding_message_size(usize::MAX),
            lease: LeaseClient::new(channel.clone()),
            channel,
        }
    }

    /// The connection's authentication (to renew a token a stream was refused for).
    pub fn auth(&self) -> &AuthChannel {
        &self.channel
    }
}

impl Upstream {
    /// The keys under `prefix`, without it, in key order: one keys-only read. Also the
    /// read's header.
    pub async fn keys_under(
        &self,
        prefix: &KeyPrefix,
    ) -> Result<(Vec<Bytes>, Option<kine_proto::etcdserverpb::ResponseHeader>)> {
        let response = self
            .kv
            .clone()
            .range(RangeRequest {
                key: prefix.prefix().clone(),
                range_end: prefix.end().clone(),
                keys_only: true,
                ..Default::default()
            })
            .await
            .map_err(upstream_error)?
            .into_inner();
        let keys = response
            .kvs
            .iter()
            .filter_map(|kv| prefix.strip(&kv.key))
            .collect();
        Ok((keys, response.header))
    }
}

/// The lease id a lease ownership record names (its key's last part, in hex).
pub fn lease_id_of(hex: &[u8]) -> Option<i64> {
    i64::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
}

/// An error answered by etcd (or by the connection to it), as the client will see it: etcd's
/// own errors pass unchanged; a failed connection is `Unavailable` without its details.
pub fn upstream_error(status: tonic::Status) -> KineError {
    let from_etcd = status.message().starts_with("etcdserver:");
    match status.code() {
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
            if !from_etcd =>
        {
            KineError::Unavailable(status.message().to_string())
        }
        code => KineError::Etcd {
            code,
            message: status.message().to_string(),
        },
    }
}

/// A lease id no proxy grants (a tenant asking for it is told it exists): sent in place of a
/// lease the tenant does not own, so that etcd refuses a put naming it as it refuses a put
/// naming a lease that does not exist, where and when etcd would check it.
pub const NO_SUCH_LEASE: i64 = i64::MIN;

/// Where kine-rs keeps its records of the tenants in the shared etcd.
#[derive(Debug, Clone)]
pub struct Control {
    root: String,
}

impl Control {
    /// The records of the tenants of `template` (`--etcd-tenant-prefix`).
    pub fn of(template: &PrefixTemplate) -> Self {
        Control {
            root: template.control_root(),
        }
    }

    fn key(&self, kind: &str, name: &str) -> Bytes {
        Bytes::from(format!("{}{kind}/{name}", self.root))
    }

    /// The tenant registry: one key per tenant, its value the tenant's record.
    pub fn registry(&self, name: &str) -> Bytes {
        self.key("tenants", name)
    }

    pub fn registry_prefix(&self) -> KeyPrefix {
        KeyPrefix::new(format!("{}tenants/", self.root))
    }

    /// Present while the tenant is frozen; its value is when the freeze began (ms).
    pub fn frozen(&self, name: &str) -> Bytes {
        self.key("frozen", name)
    }

    pub fn frozen_prefix(&self) -> KeyPrefix {
        KeyPrefix::new(format!("{}frozen/", self.root))
    }

    /// The tenant's quota (`keys bytes`); absent when it has none.
    pub fn quota(&self, name: &str) -> Bytes {
        self.key("quota", name)
    }

    /// The tenant's usage while it has a quota ([`quota::UsageRecord`]).
    pub fn usage(&self, name: &str) -> Bytes {
        self.key("usage", name)
    }

    /// The tenant's compaction revision (decimal); absent when never compacted.
    pub fn compacted(&self, name: &str) -> Bytes {
        self.key("compacted", name)
    }

    pub fn compacted_prefix(&self) -> KeyPrefix {
        KeyPrefix::new(format!("{}compacted/", self.root))
    }

    /// Present while a migration copies the tenant away (`kine-rs migrate`): its value (JSON,
    /// [`PinRecord`]) holds the revision the copy's history starts at, which the shared
    /// etcd's compaction never passes ([`compact_shared`]).
    pub fn pinned(&self, name: &str) -> Bytes {
        self.key("pinned", name)
    }

    pub fn pinned_prefix(&self) -> KeyPrefix {
        KeyPrefix::new(format!("{}pinned/", self.root))
    }

    /// Present once a migration moved the tenant to another datastore; its value is the
    /// target, without credentials. The tenant stays frozen; proxies no longer open it.
    pub fn moved(&self, name: &str) -> Bytes {
        self.key("moved", name)
    }

    /// The keys that say which tenant owns which lease: attached to the lease, so they go
    /// when it goes.
    pub fn leases(&self, name: &str) -> KeyPrefix {
        KeyPrefix::new(format!("{}leases/{name}/", self.root))
    }

    pub fn lease(&self, name: &str, id: i64) -> Bytes {
        self.leases(name).key(format!("{id:016x}").as_bytes())
    }

    /// A key nobody writes: the watchers that hold the ids of watches the proxy canceled
    /// itself (below the tenant's compaction) watch it, so they never deliver anything.
    pub fn held_watch(&self, name: &str) -> Bytes {
        self.key("held-watch", name)
    }
}

/// A migration's pin of a tenant: the value of [`Control::pinned`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PinRecord {
    /// The revision the copy's history starts at: the shared etcd is not compacted past it.
    pub revision: i64,
    /// The target datastore, without credentials.
    pub target: String,
    /// The migration froze the tenant (and unfreezes it if it stops before the switch).
    pub froze: bool,
}

impl PinRecord {
    pub fn encode(&self) -> String {
        serde_json::json!({
            "revision": self.revision,
            "target": self.target,
            "froze": self.froze,
        })
        .to_string()
    }

    /// `None` when `value` is not a pin record.
    pub fn decode(value: &[u8]) -> Option<Self> {
        let value: serde_json::Value = serde_json::from_slice(value).ok()?;
        Some(PinRecord {
            revision: value["revision"].as_i64()?,
            target: value["target"].as_str().unwrap_or_default().to_string(),
            froze: value["froze"].as_bool().unwrap_or(false),
        })
    }
}

/// A compare that holds while `key` does not exist.
pub fn absent(key: Bytes) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Version as i32,
        key,
        range_end: Bytes::new(),
        target_union: Some(TargetUnion::Version(0)),
    }
}

/// A compare that holds while `key`'s mod revision is `revision` (0: the key is absent).
pub fn mod_revision_is(key: Bytes, revision: i64) -> Compare {
    Compare {
        result: kine_proto::etcdserverpb::compare::CompareResult::Equal as i32,
        target: kine_proto::etcdserverpb::compare::CompareTarget::Mod as i32,
        key,
        range_end: Bytes::new(),
        target_union: Some(kine_proto::etcdserverpb::compare::TargetUnion::ModRevision(
            revision,
        )),
    }
}

/// A compare that holds while `key` exists.
pub fn present(key: Bytes) -> Compare {
    Compare {
        result: CompareResult::Greater as i32,
        target: CompareTarget::Version as i32,
        key,
        range_end: Bytes::new(),
        target_union: Some(TargetUnion::Version(0)),
    }
}

pub fn get_op(key: Bytes) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestRange(RangeRequest {
            key,
            ..Default::default()
        })),
    }
}

pub fn put_op(key: Bytes, value: impl Into<Bytes>, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestPut(PutRequest {
            key,
            value: value.into(),
            lease,
            ..Default::default()
        })),
    }
}

pub fn delete_op(key: Bytes, range_end: Bytes) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
            key,
            range_end,
            ..Default::default()
        })),
    }
}

/// The range response of op `index` of a transaction response.
pub fn range_at(
    responses: &[kine_proto::etcdserverpb::ResponseOp],
    index: usize,
) -> Option<&RangeResponse> {
    match responses.get(index).and_then(|op| op.response.as_ref()) {
        Some(Response::ResponseRange(range)) => Some(range),
        _ => None,
    }
}

/// The tenant record kept in the registry.
fn record(quota: Quota) -> String {
    serde_json::json!({ "quota_keys": quota.keys, "quota_bytes": quota.bytes }).to_string()
}

/// Whether a tenant exists in the shared etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Presence {
    Absent,
    Registered,
    /// A migration moved it to another datastore: its keys stay, frozen, until it is deleted.
    Moved,
}

/// The tenants of one etcd cluster, served through this process.
pub struct EtcdProxy {
    upstream: Upstream,
    template: PrefixTemplate,
    control: Control,
    limits: RequestLimits,
    default_quota: Quota,
    open: Mutex<HashMap<String, Arc<ProxiedTenant>>>,
}

impl EtcdProxy {
    /// Connects to the cluster at `endpoint`, waiting up to a minute for a member to answer.
    pub async fn connect(
        endpoint: &str,
        options: ProxyOptions,
    ) -> std::result::Result<Arc<Self>, ConnectError> {
        let template = PrefixTemplate::parse(&options.prefix).map_err(ConnectError::Endpoint)?;
        let EtcdEndpoint {
            members,
            tls: scheme_tls,
            credentials,
        } = parse_endpoint(endpoint)?;
        let tls = scheme_tls || options.tls.any();
        let tls_config = if tls {
            Some(client_tls(&options.tls)?)
        } else {
            None
        };
        let mut endpoints = Vec::new();
        for member in &members {
            let url = format!("{}://{member}", if tls { "https" } else { "http" });
            let mut endpoint = Endpoint::from_shared(url)
                .map_err(|e| ConnectError::Endpoint(format!("{member:?}: {e}")))?
                .connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true);
            if let Some(config) = &tls_config {
                endpoint = endpoint
                    .tls_config(config.clone())
                    .map_err(|e| ConnectError::Tls(e.to_string()))?;
            }
            endpoints.push(endpoint);
        }
        // Several connections per member: one HTTP/2 connection carrying every client's
        // requests is a bottleneck of its own.
        let (channel, changes) =
            Channel::balance_channel::<(usize, usize)>(endpoints.len() * CONNECTIONS_PER_MEMBER);
        for (member, endpoint) in endpoints.into_iter().enumerate() {
            for copy in 0..CONNECTIONS_PER_MEMBER {
                let _ = changes.try_send(tonic::transport::channel::Change::Insert(
                    (member, copy),
                    endpoint.clone(),
                ));
            }
        }
        let proxy = Arc::new(EtcdProxy {
            upstream: Upstream::new(channel, credentials),
            control: Control::of(&template),
            template,
            limits: options.limits,
            default_quota: options.default_quota,
            open: Mutex::new(HashMap::new()),
        });
        let deadline = Instant::now() + CONNECT_WAIT;
        loop {
            match proxy.ping().await {
                Ok(()) => break,
                // Waiting does not mend wrong credentials or a role without kine-rs's records.
                Err(KineError::Etcd { message, .. }) if auth::is_refused_login(&message) => {
                    return Err(ConnectError::Login(message));
                }
                Err(KineError::Etcd {
                    code: Code::PermissionDenied,
                    message,
                }) => {
                    return Err(ConnectError::Refused(message));
                }
                Err(error) if Instant::now() < deadline => {
                    warn!(%error, "waiting for the datastore (etcd cluster)");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(error) => {
                    return Err(ConnectError::Unreachable {
                        seconds: CONNECT_WAIT.as_secs(),
                        reason: error.to_string(),
                    });
                }
            }
        }
        info!(
            members = members.len(),
            "serving tenants of an etcd cluster"
        );
        tokio::spawn(keep_frozen_leases(Arc::downgrade(&proxy)));
        Ok(proxy)
    }

    async fn ping(&self) -> Result<()> {
        let request = RangeRequest {
            key: self.control.registry(crate::run::DEFAULT_KEYSPACE),
            count_only: true,
            ..Default::default()
        };
        self.upstream
            .kv
            .clone()
            .range(request)
            .await
            .map_err(upstream_error)?;
        Ok(())
    }

    /// The health probe: a linearizable read of one key, which needs a quorum.
    pub fn probe(self: &Arc<Self>) -> Probe {
        let proxy = self.clone();
        Arc::new(move || {
            let proxy = proxy.clone();
            Box::pin(async move { proxy.ping().await.is_ok() })
        })
    }

    /// An open tenant, without counting it as used (the idle timeout still closes it).
    fn cached_quietly(&self, name: &str) -> Option<Arc<ProxiedTenant>> {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    fn cached(&self, name: &str) -> Option<Arc<ProxiedTenant>> {
        let tenant = self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned();
        if let Some(tenant) = &tenant {
            crate::tenants::Cached::last_use(&**tenant).touch();
        }
        tenant
    }

    fn tenant_prefix(&self, name: &str) -> Result<KeyPrefix> {
        self.template.tenant(name).map_err(KineError::InvalidTenant)
    }

    /// Registers tenant `name` unless it exists; `true` when this call created it.
    async fn register(&self, name: &str, quota: Quota) -> Result<bool> {
        let key = self.control.registry(name);
        let response = self
            .upstream
            .kv
            .clone()
            .txn(TxnRequest {
                compare: vec![absent(key.clone())],
                success: vec![put_op(key, record(quota), 0)],
                failure: vec![],
            })
            .await
            .map_err(upstream_error)?
            .into_inner();
        if response.succeeded {
            info!(tenant = name, "created tenant");
        }
        Ok(response.succeeded)
    }

    async fn exists(&self, name: &str) -> Result<bool> {
        Ok(self.presence(name).await? != Presence::Absent)
    }

    /// Whether tenant `name` is registered, and whether a migration moved it away.
    async fn presence(&self, name: &str) -> Result<Presence> {
        let count = |key: Bytes| RequestOp {
            request: Some(Request::RequestRange(RangeRequest {
                key,
                count_only: true,
                ..Default::default()
            })),
        };
        let response = self
            .upstream
            .kv
            .clone()
            .txn(TxnRequest {
                compare: vec![],
                success: vec![
                    count(self.control.registry(name)),
                    count(self.control.moved(name)),
                ],
                failure: vec![],
            })
            .await
            .map_err(upstream_error)?
            .into_inner();
        let found = |index| range_at(&response.responses, index).is_some_and(|r| r.count > 0);
        Ok(if found(1) {
            Presence::Moved
        } else if found(0) {
            Presence::Registered
        } else {
            Presence::Absent
        })
    }

    /// A tenant's counters: the cluster's revision, the tenant's compaction revision, freeze,
    /// and its keys and bytes (summed by reading its keys, page by page).
    async fn tenant_state(&self, name: &str) -> Result<KeyspaceState> {
        let prefix = self.tenant_prefix(name)?;
        let response = self
            .upstream
            .kv
            .clone()
            .txn(TxnRequest {
                compare: vec![],
                success: vec![
                    get_op(self.control.frozen(name)),
                    get_op(self.control.compacted(name)),
                    get_op(self.control.quota(name)),
                    get_op(self.control.usage(name)),
                    get_op(self.control.moved(name)),
                    get_op(self.control.pinned(name)),
                ],
                failure: vec![],
            })
            .await
            .map_err(upstream_error)?
            .into_inner();
        let pin = range_at(&response.responses, 5)
            .and_then(|r| r.kvs.first())
            .and_then(|kv| PinRecord::decode(&kv.value));
        let (migration, pinned_revision) =
            if range_at(&response.responses, 4).is_some_and(|r| !r.kvs.is_empty()) {
                (MigrationRole::Moved, 0)
            } else if let Some(pin) = pin {
                (MigrationRole::Source, pin.revision)
            } else {
                (MigrationRole::None, 0)
            };
        let frozen_at_ms = range_at(&response.responses, 0)
            .and_then(|r| r.kvs.first())
            .map(|kv| parse_number(&kv.value).max(1));
        let compact_revision = range_at(&response.responses, 1)
            .and_then(|r| r.kvs.first())
            .map_or(-1, |kv| parse_number(&kv.value));
        let revision = response.header.map_or(0, |h| h.revision);
        let quota_kv = range_at(&response.responses, 2).and_then(|r| r.kvs.first());
        let quota = quota_kv.map_or(Quota::default(), |kv| quota::decode_quota(&kv.value));
        let counted = range_at(&response.responses, 3)
            .and_then(|r| r.kvs.first())
            .and_then(|kv| match quota::UsageRecord::decode(&kv.value) {
                Some(quota::UsageRecord::Counted(usage)) => Some(usage),
                _ => None,
            });
        let (keys, bytes) = match counted {
            Some(usage) => (usage.keys, usage.bytes),
            None => {
                let (keys, bytes, _) = usage(&self.upstream, &prefix).await?;
                (keys, bytes)
            }
        };
        Ok(KeyspaceState {
            id: 0,
            revision,
            compact_revision,
            frozen: frozen_at_ms.is_some(),
            frozen_at_ms: frozen_at_ms.unwrap_or(0),
            keys,
            bytes,
            quota,
            migration,
            pinned_revision,
        })
    }
}

/// While a tenant this process has open is frozen, whoever froze it (this process, another
/// proxy, `kine-rs migrate`), renews its leases so that none expires
/// ([`ProxiedTenant::renew_frozen_leases`]): one keys-only read of the freeze records per
/// tick. Ends with the proxy.
async fn keep_frozen_leases(proxy: std::sync::Weak<EtcdProxy>) {
    let mut renewing: std::collections::HashSet<String> = Default::default();
    loop {
        tokio::time::sleep(FROZEN_KEEPER_TICK).await;
        let Some(proxy) = proxy.upgrade() else { return };
        let frozen = match proxy
            .upstream
            .keys_under(&proxy.control.frozen_prefix())
            .await
        {
            Ok((names, _)) => names,
            Err(error) => {
                warn!(%error, "cannot read the tenants' freezes (their leases are not renewed)");
                continue;
            }
        };
        let frozen: std::collections::HashSet<String> = frozen
            .iter()
            .filter_map(|name| String::from_utf8(name.to_vec()).ok())
            .collect();
        for name in renewing.difference(&frozen) {
            if let Some(tenant) = proxy.cached_quietly(name) {
                tenant.thawed().await;
            }
        }
        renewing.clear();
        for name in frozen {
            let Some(tenant) = proxy.cached_quietly(&name) else {
                continue;
            };
            if let Err(error) = tenant.renew_frozen_leases().await {
                warn!(tenant = name, %error, "cannot renew a frozen tenant's leases");
            }
            renewing.insert(name);
        }
    }
}

/// A decimal number stored by kine-rs; 0 when unreadable.
pub fn parse_number(value: &[u8]) -> i64 {
    std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(0)
}

/// The keys and bytes (keys plus values) under `prefix`, and the revision they were read at.
pub async fn usage(upstream: &Upstream, prefix: &KeyPrefix) -> Result<(i64, i64, i64)> {
    let mut kv = upstream.kv.clone();
    let mut start = prefix.prefix().clone();
    let (mut keys, mut bytes, mut revision) = (0i64, 0i64, 0i64);
    loop {
        let page = kv
            .range(RangeRequest {
                key: start.clone(),
                range_end: prefix.end().clone(),
                limit: USAGE_PAGE,
                revision,
                ..Default::default()
            })
            .await
            .map_err(upstream_error)?
            .into_inner();
        if revision == 0 {
            revision = page.header.as_ref().map_or(0, |h| h.revision);
        }
        for kv in &page.kvs {
            keys += 1;
            bytes += (kv.key.len() - prefix.prefix().len() + kv.value.len()) as i64;
        }
        match page.kvs.last() {
            Some(last) if page.more => {
                let mut next = last.key.to_vec();
                next.push(0);
                start = Bytes::from(next);
            }
            _ => return Ok((keys, bytes, revision)),
        }
    }
}

fn client_tls(files: &TlsFiles) -> std::result::Result<ClientTlsConfig, ConnectError> {
    let read = |path: &str| {
        std::fs::read(path).map_err(|e| ConnectError::Tls(format!("cannot read {path}: {e}")))
    };
    let mut config = ClientTlsConfig::new();
    match &files.ca_file {
        Some(ca) => config = config.ca_certificate(Certificate::from_pem(read(ca)?)),
        None => {
            return Err(ConnectError::Tls(
                "TLS to etcd needs --ca-file (the CA that signed the members' certificates)".into(),
            ));
        }
    }
    match (&files.cert_file, &files.key_file) {
        (Some(cert), Some(key)) => {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        (None, None) => {}
        _ => {
            return Err(ConnectError::Tls(
                "--cert-file and --key-file go together".into(),
            ));
        }
    }
    Ok(config)
}

#[async_trait::async_trait]
impl TenantDirectory for EtcdProxy {
    async fn get(&self, name: &str, create: bool) -> Result<Option<Arc<dyn ServedTenant>>> {
        if let Some(tenant) = self.cached(name) {
            return Ok(Some(tenant));
        }
        let prefix = self.tenant_prefix(name)?;
        let mut created = false;
        match self.presence(name).await? {
            Presence::Registered => {}
            Presence::Moved => {
                return Err(KineError::TenantMoved {
                    tenant: name.to_string(),
                });
            }
            Presence::Absent if !create => return Ok(None),
            Presence::Absent => created = self.register(name, self.default_quota).await?,
        }
        let tenant = Arc::new(ProxiedTenant::new(
            name.to_string(),
            prefix,
            self.control.clone(),
            self.upstream.clone(),
            self.limits,
        ));
        let tenant = {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            let tenant = open.entry(name.to_string()).or_insert(tenant).clone();
            crate::metrics::open_tenants(open.len());
            tenant
        };
        if created && self.default_quota != Quota::default() {
            tenant.set_quota(self.default_quota).await?;
        }
        Ok(Some(tenant))
    }

    async fn create(&self, name: &str, quota: Option<Quota>) -> Result<bool> {
        validate_name(name).map_err(KineError::InvalidTenant)?;
        let quota = quota.unwrap_or(self.default_quota);
        if !self.register(name, quota).await? {
            return Ok(false);
        }
        if quota != Quota::default()
            && let Some(tenant) = self.get(name, false).await?
        {
            tenant.set_quota(quota).await?;
        }
        Ok(true)
    }

    async fn state(&self, name: &str) -> Result<Option<KeyspaceState>> {
        validate_name(name).map_err(KineError::InvalidTenant)?;
        if !self.exists(name).await? {
            return Ok(None);
        }
        Ok(Some(self.tenant_state(name).await?))
    }

    async fn list(&self) -> Result<Vec<(String, KeyspaceState)>> {
        let (names, _) = self
            .upstream
            .keys_under(&self.control.registry_prefix())
            .await?;
        let mut tenants = Vec::new();
        for name in names {
            let Ok(name) = String::from_utf8(name.to_vec()) else {
                continue;
            };
            if validate_name(&name).is_ok() {
                let state = self.tenant_state(&name).await?;
                tenants.push((name, state));
            }
        }
        Ok(tenants)
    }

    fn watches(&self, name: &str) -> i64 {
        self.cached(name).map_or(0, |tenant| tenant.watches())
    }

    fn evict_idle(&self, idle: Duration) -> usize {
        crate::tenants::evict_idle(&self.open, idle)
    }

    async fn delete(&self, name: &str, force: bool) -> Result<bool> {
        validate_name(name).map_err(KineError::InvalidTenant)?;
        if let Some(tenant) = self.cached(name)
            && tenant.watches() > 0
            && !force
        {
            return Err(KineError::TenantBusy {
                tenant: name.to_string(),
                watches: tenant.watches(),
            });
        }
        if !self.exists(name).await? {
            return Ok(false);
        }
        // The tenant's leases first (their keys go with them), then its keys and records.
        let leases = self.control.leases(name);
        let owned = self
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
        for kv in owned.kvs {
            if let Some(id) = leases
                .strip(&kv.key)
                .and_then(|hex| i64::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok())
            {
                let revoked = self
                    .upstream
                    .lease
                    .clone()
                    .lease_revoke(LeaseRevokeRequest { id })
                    .await;
                if let Err(status) = revoked
                    && status.code() != Code::NotFound
                {
                    return Err(upstream_error(status));
                }
            }
        }
        let prefix = self.tenant_prefix(name)?;
        let response = self
            .upstream
            .kv
            .clone()
            .txn(TxnRequest {
                compare: vec![],
                success: vec![
                    delete_op(prefix.prefix().clone(), prefix.end().clone()),
                    delete_op(leases.prefix().clone(), leases.end().clone()),
                    delete_op(self.control.frozen(name), Bytes::new()),
                    delete_op(self.control.compacted(name), Bytes::new()),
                    delete_op(self.control.quota(name), Bytes::new()),
                    delete_op(self.control.usage(name), Bytes::new()),
                    delete_op(self.control.pinned(name), Bytes::new()),
                    delete_op(self.control.moved(name), Bytes::new()),
                    delete_op(self.control.registry(name), Bytes::new()),
                ],
                failure: vec![],
            })
            .await
            .map_err(upstream_error)?;
        drop(response);
        if let Some(tenant) = self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
        {
            tenant.close();
        }
        info!(tenant = name, "deleted tenant");
        Ok(true)
    }
}

/// Compacts the shared etcd up to the lowest compaction revision of every tenant (a tenant
/// that never compacted holds it back), so no tenant loses history it can still read; and
/// never past a migration's pin ([`Control::pinned`]), so a copy reading a tenant's history
/// keeps it. (A pin is written only while the tenant's compaction record is unchanged since
/// the copy read it, so a compaction computed from the records before the pin stops at or
/// below the pinned revision too.)
pub async fn compact_shared(upstream: &Upstream, control: &Control) -> Result<()> {
    let mut kv = upstream.kv.clone();
    let registry = control.registry_prefix();
    let compacted = control.compacted_prefix();
    let pinned = control.pinned_prefix();
    let response = kv
        .txn(TxnRequest {
            compare: vec![],
            success: vec![
                RequestOp {
                    request: Some(Request::RequestRange(RangeRequest {
                        key: registry.prefix().clone(),
                        range_end: registry.end().clone(),
                        count_only: true,
                        ..Default::default()
                    })),
                },
                RequestOp {
                    request: Some(Request::RequestRange(RangeRequest {
                        key: compacted.prefix().clone(),
                        range_end: compacted.end().clone(),
                        ..Default::default()
                    })),
                },
                RequestOp {
                    request: Some(Request::RequestRange(RangeRequest {
                        key: pinned.prefix().clone(),
                        range_end: pinned.end().clone(),
                        ..Default::default()
                    })),
                },
            ],
            failure: vec![],
        })
        .await
        .map_err(upstream_error)?
        .into_inner();
    let tenants = range_at(&response.responses, 0).map_or(0, |r| r.count);
    let Some(revisions) = range_at(&response.responses, 1) else {
        return Ok(());
    };
    if revisions.kvs.is_empty() || (revisions.kvs.len() as i64) < tenants {
        return Ok(());
    }
    let pins = range_at(&response.responses, 2).map_or(&[][..], |r| &r.kvs[..]);
    let lowest = revisions
        .kvs
        .iter()
        .map(|kv| parse_number(&kv.value))
        // An unreadable pin holds everything back rather than nothing.
        .chain(
            pins.iter()
                .map(|kv| PinRecord::decode(&kv.value).map_or(0, |pin| pin.revision)),
        )
        .min()
        .unwrap_or(0);
    if lowest <= 0 {
        return Ok(());
    }
    match kv
        .compact(CompactionRequest {
            revision: lowest,
            physical: false,
        })
        .await
    {
        Ok(_) => Ok(()),
        // Compacted there already (by an earlier call or another proxy).
        Err(status) if status.code() == Code::OutOfRange => Ok(()),
        Err(status) => Err(upstream_error(status)),
    }
}
