//! Starting kine-rs: open the datastore, serve every gRPC service, compact periodically,
//! expose metrics, and stop cleanly on SIGINT/SIGTERM.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use kine_proto::etcdserverpb::cluster_server::ClusterServer;
use kine_proto::etcdserverpb::kv_server::KvServer;
use kine_proto::etcdserverpb::lease_server::LeaseServer;
use kine_proto::etcdserverpb::maintenance_server::MaintenanceServer;
use kine_proto::etcdserverpb::watch_server::WatchServer;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tracing::{info, warn};

use crate::config::Config;
use crate::error::KineError;
use crate::etcd_proxy;
use crate::health::{Probe, Readiness, backend_probe};
use crate::keyspace::HeaderIdentity;
use crate::metrics::{MethodLabels, Metrics, RpcLabels, code_label, method_label};
use crate::routes::{DatastoreSettings, RoutedTenants};
use crate::served::TenantDirectory;
use crate::server::Tenancy;
use crate::server::admin::AdminService;
use crate::server::cluster::ClusterService;
use crate::server::kv::KvService;
use crate::server::lease::LeaseService;
use crate::server::maintenance::MaintenanceService;
use crate::server::watch::WatchService;
use crate::storage::Quota;
use crate::storage::{self, Backend, BackendOptions, PoolOptions, TlsFiles};
use crate::tenants::{self, ExpiryScope, Tenants, validate_name};
use crate::txn::RequestLimits;
use kine_proto::kine::admin::v1::tenant_admin_server::TenantAdminServer;

/// The tenant served in sidecar mode without `--tenant`: the keyspace of a kine-rs without
/// tenants.
pub const DEFAULT_KEYSPACE: &str = "default";
/// Headroom gRPC allows above the request limit, as etcd does, so oversized requests reach
/// the server and get etcd's "request is too large" instead of a transport error.
const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// A gateway tenant's default budgets (`--max-read-rows-per-second`,
/// `--max-write-bytes-per-second`): far above what a control plane's apiserver needs (its
/// watch cache serves lists; its writes are small objects), far below what one hostile tenant
/// can make the datastore do.
const GATEWAY_READ_ROWS_PER_SECOND: u64 = 50_000;
const GATEWAY_WRITE_BYTES_PER_SECOND: u64 = 8 << 20;

/// Leases a tenant may hold and keep-alives it gets answered per second
/// (`--max-leases-per-tenant`, `--max-keepalives-per-second`), in a gateway and in a process
/// serving one tenant. A control plane's apiserver holds a few dozen leases and keeps none
/// alive in a flood; in a gateway a flood of 10,000 keep-alives a second (TLS, HTTP/2 and an
/// answer each) took about half of a neighbour's throughput on two cores
/// (`kine-load noisy-neighbour`), 2,000 about a quarter. Each pair keeps every lease the limit
/// allows alive at a third of a 30 s TTL.
const GATEWAY_MAX_LEASES: u64 = 20_000;
const GATEWAY_KEEPALIVES_PER_SECOND: u32 = 2_000;
const MAX_LEASES: u64 = 100_000;
const KEEPALIVES_PER_SECOND: u32 = 10_000;

/// The limits every tenant is held to: the flags, and where a flag is not given, the
/// default of a gateway (tenants share the process) or of a process serving one tenant.
fn request_limits(config: &Config) -> RequestLimits {
    RequestLimits {
        max_request_bytes: config.max_request_bytes,
        max_txn_ops: config.max_txn_ops,
        max_watches_per_stream: config.max_watches_per_stream,
        max_leases_per_tenant: i64::try_from(config.max_leases_per_tenant.unwrap_or(
            if config.gateway {
                GATEWAY_MAX_LEASES
            } else {
                MAX_LEASES
            },
        ))
        .unwrap_or(i64::MAX),
        repeated_keepalives_per_second: config.max_repeated_keepalives_per_second,
        keepalives_per_second: config
            .max_keepalives_per_second
            .unwrap_or(if config.gateway {
                GATEWAY_KEEPALIVES_PER_SECOND
            } else {
                KEEPALIVES_PER_SECOND
            }),
        // Budgets of datastore work share it fairly between the tenants of a gateway; a
        // process serving one tenant has no neighbour to share with.
        read_rows_per_second: config
            .max_read_rows_per_second
            .unwrap_or(if config.gateway {
                GATEWAY_READ_ROWS_PER_SECOND
            } else {
                0
            }),
        write_bytes_per_second: config
            .max_write_bytes_per_second
            .unwrap_or(if config.gateway {
                GATEWAY_WRITE_BYTES_PER_SECOND
            } else {
                0
            }),
        watch_stream_buffer_bytes: config.watch_stream_buffer_bytes,
        watch_hub_buffer_bytes: config.watch_hub_buffer_bytes,
    }
}

/// Why kine-rs could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot open the datastore: {0}")]
    Datastore(#[from] KineError),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: String,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("the gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("{0}")]
    Config(String),
    #[error(
        "tenant {tenant:?} was moved to another datastore by a live migration; this sidecar \
         stopped serving it: restart it with the new --endpoint"
    )]
    Moved { tenant: String },
}

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddress {
    Tcp(String),
    Unix(String),
}

impl ListenAddress {
    /// Parses kine's forms: `host:port`, `:port`, `http(s)://host:port`, `unix://PATH`.
    pub fn parse(text: &str) -> Self {
        if let Some(path) = text.strip_prefix("unix://") {
            return ListenAddress::Unix(path.to_string());
        }
        let address = text
            .strip_prefix("http://")
            .or_else(|| text.strip_prefix("https://"))
            .unwrap_or(text);
        let address = if address.starts_with(':') {
            format!("0.0.0.0{address}")
        } else {
            address.to_string()
        };
        ListenAddress::Tcp(address)
    }

    fn client_url(&self, tls: bool) -> String {
        match self {
            ListenAddress::Unix(path) => format!("unix://{path}"),
            ListenAddress::Tcp(address) => {
                format!("{}://{address}", if tls { "https" } else { "http" })
            }
        }
    }
}

/// A stable 64-bit FNV-1a hash, for ids that stay the same across restarts.
fn stable_id(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
        (hash ^ byte as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Removes credentials from an endpoint, for ids and logs: the value of every parameter
/// whose name ends in `password` (`?password=`, `&sslpassword=`, or libpq's `key=value`
/// form), then `user:password@`.
pub fn redact_endpoint(endpoint: &str) -> String {
    // Parameters first: a password parameter's value may contain an `@`.
    let endpoint = redact_password_parameters(endpoint);
    match (endpoint.find("://"), endpoint.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}***{}", &endpoint[..scheme + 3], &endpoint[at..])
        }
        _ => endpoint,
    }
}

/// Replaces the value of every `NAMEpassword=VALUE` parameter by `***`. A parameter starts
/// after `?`, `&`, whitespace or at the start; its value ends at `&` or whitespace.
fn redact_password_parameters(text: &str) -> String {
    const KEY: &str = "password=";
    // ASCII lowercasing keeps every byte offset.
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let (mut copied, mut search) = (0, 0);
    while let Some(found) = lower[search..].find(KEY) {
        let at = search + found;
        let value = at + KEY.len();
        let name_start = lower[..at]
            .rfind(|c: char| c == '?' || c == '&' || c.is_whitespace())
            .map_or(0, |i| i + 1);
        let end = lower[value..]
            .find(|c: char| c == '&' || c.is_whitespace())
            .map_or(lower.len(), |i| value + i);
        let is_parameter = lower[name_start..at]
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if is_parameter {
            out.push_str(&text[copied..value]);
            out.push_str("***");
            copied = end;
        }
        search = value;
    }
    out.push_str(&text[copied..]);
    out
}

/// How long start-up waits for an unreachable datastore before giving up.
const DATASTORE_WAIT: Duration = Duration::from_secs(60);
/// How often start-up retries an unreachable datastore.
const DATASTORE_RETRY: Duration = Duration::from_secs(1);

/// The datastore settings of the command line.
fn backend_options(config: &Config) -> BackendOptions {
    let positive = |n: i64| u32::try_from(n.max(0)).unwrap_or(u32::MAX);
    let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
    BackendOptions {
        relaxed_durability: false,
        sqlite_wal_limit_bytes: config.sqlite_wal_limit_bytes,
        pool: PoolOptions {
            max_open: positive(config.datastore_max_open_connections),
            max_idle: positive(config.datastore_max_idle_connections),
            max_lifetime: nonzero(config.datastore_connection_max_lifetime),
            max_idle_time: nonzero(config.datastore_connection_max_idle_time),
        },
        tls: TlsFiles {
            ca_file: config.ca_file.clone(),
            cert_file: config.cert_file.clone(),
            key_file: config.key_file.clone(),
        },
    }
}

/// Opens the datastore, waiting up to [`DATASTORE_WAIT`] while it is unreachable and saying
/// so (without credentials) on every attempt.
async fn open_datastore(
    endpoint: &str,
    redacted: &str,
    options: &BackendOptions,
) -> Result<Arc<dyn Backend>, RunError> {
    let deadline = Instant::now() + DATASTORE_WAIT;
    loop {
        match storage::open(endpoint, options).await {
            Ok(backend) => return Ok(backend),
            Err(KineError::Unavailable(error)) if Instant::now() < deadline => {
                warn!("waiting for the datastore at {redacted}: {error}");
                tokio::time::sleep(DATASTORE_RETRY).await;
            }
            Err(KineError::Unavailable(error)) => {
                return Err(RunError::Config(format!(
                    "the datastore at {redacted} did not become reachable within {}s: {error}",
                    DATASTORE_WAIT.as_secs()
                )));
            }
            Err(error) => {
                return Err(RunError::Config(format!(
                    "cannot open the datastore at {redacted}: {error}"
                )));
            }
        }
    }
}

/// What serves the tenants of one datastore.
struct Served {
    directory: Arc<dyn TenantDirectory>,
    /// A gateway on a database datastore moves tenants itself (the admin API).
    mover: Option<Arc<RoutedTenants>>,
    probe: Probe,
    /// The datastore is shared with others whatever the flags say (a proxied etcd): Status
    /// and Defragment never act on it as a whole.
    always_shared: bool,
}

/// A database-backed datastore: its tenants, and the loops that run once per process.
async fn serve_database(
    config: &Config,
    endpoint: &str,
    redacted: &str,
    limits: RequestLimits,
    identity: HeaderIdentity,
) -> Result<Served, RunError> {
    let backend = open_datastore(endpoint, redacted, &backend_options(config)).await?;
    let default_quota = if config.gateway {
        Quota {
            keys: config.quota_keys,
            bytes: config.quota_backend_bytes,
        }
    } else {
        Quota::default()
    };
    let tenants = Tenants::new(backend.clone(), limits, identity, default_quota);
    let scope = if config.gateway {
        ExpiryScope::All
    } else {
        ExpiryScope::Open
    };
    tokio::spawn(tenants::expire_leases(tenants.clone(), scope));
    if !config.compact_interval.is_zero() {
        tokio::spawn(tenants::compact_periodically(
            tenants.clone(),
            config.compact_interval,
            config.compact_min_retain,
        ));
    }
    let probe = backend_probe(backend);
    if !config.gateway {
        return Ok(Served {
            directory: tenants,
            mover: None,
            probe,
            always_shared: false,
        });
    }
    let settings = DatastoreSettings {
        limits,
        identity,
        default_quota,
        backend: backend_options(config),
        compact_interval: config.compact_interval,
        compact_min_retain: config.compact_min_retain,
    };
    let routed = RoutedTenants::new(tenants, endpoint, settings);
    for extra in &config.extra_endpoint {
        let name = redact_endpoint(extra);
        routed.add_datastore(extra).await.map_err(|error| {
            RunError::Config(format!("cannot open the --extra-endpoint {name}: {error}"))
        })?;
    }
    Ok(Served {
        directory: routed.clone(),
        mover: Some(routed),
        probe,
        always_shared: false,
    })
}

/// A real etcd cluster behind the tenant-prefixing proxy.
async fn serve_etcd(
    config: &Config,
    endpoint: &str,
    redacted: &str,
    limits: RequestLimits,
) -> Result<Served, RunError> {
    let options = etcd_proxy::ProxyOptions {
        tls: backend_options(config).tls,
        limits,
        prefix: config.etcd_tenant_prefix.clone(),
        default_quota: if config.gateway {
            Quota {
                keys: config.quota_keys,
                bytes: config.quota_backend_bytes,
            }
        } else {
            Quota::default()
        },
    };
    let proxy = etcd_proxy::EtcdProxy::connect(endpoint, options)
        .await
        .map_err(|error| {
            RunError::Config(format!(
                "cannot use the etcd cluster at {redacted}: {error}"
            ))
        })?;
    Ok(Served {
        probe: proxy.probe(),
        directory: proxy,
        mover: None,
        always_shared: true,
    })
}

/// Runs kine-rs until a shutdown signal.
pub async fn run(config: Config) -> Result<(), RunError> {
    config.validate().map_err(RunError::Config)?;
    let endpoint = config.endpoint();
    let is_sql_server = endpoint.starts_with("postgres")
        || endpoint.starts_with("mysql")
        || endpoint.starts_with("nats://")
        || etcd_proxy::is_etcd_endpoint(&endpoint);
    if !is_sql_server
        && (config.ca_file.is_some() || config.cert_file.is_some() || config.key_file.is_some())
    {
        return Err(RunError::Config(
            "--ca-file, --cert-file and --key-file configure TLS to a database server; \
             they do not apply to this --endpoint"
                .into(),
        ));
    }
    crate::metrics::set_slow_sql_threshold(config.slow_sql_threshold);
    let redacted = redact_endpoint(&endpoint);
    let listen = ListenAddress::parse(&config.listen_address);
    let tls = config.server_cert_file.is_some();
    let identity = HeaderIdentity {
        cluster_id: stable_id(&redacted),
        member_id: stable_id(&format!("{redacted}|{}", config.listen_address)),
        raft_term: 1,
    };
    let limits = request_limits(&config);
    let quota = Quota {
        keys: config.quota_keys,
        bytes: config.quota_backend_bytes,
    };
    let mtls = config.trusted_ca_file.is_some();
    if config.gateway && !mtls {
        return Err(RunError::Config(
            "--gateway identifies tenants by client certificates: it needs --server-cert-file, \
             --server-key-file and --trusted-ca-file"
                .into(),
        ));
    }
    if !config.admin_identity.is_empty() && !mtls {
        return Err(RunError::Config(
            "--admin-identity names client certificates: it needs --trusted-ca-file".into(),
        ));
    }
    if !config.gateway {
        validate_name(&config.tenant).map_err(|e| RunError::Config(format!("--tenant: {e}")))?;
        if !config.extra_endpoint.is_empty() {
            return Err(RunError::Config(
                "--extra-endpoint names datastores a gateway's tenants moved to: it needs \
                 --gateway"
                    .into(),
            ));
        }
    }
    let served = if etcd_proxy::is_etcd_endpoint(&endpoint) {
        serve_etcd(&config, &endpoint, &redacted, limits).await?
    } else {
        serve_database(&config, &endpoint, &redacted, limits, identity).await?
    };
    if !config.gateway && quota != Quota::default() {
        let tenant = served
            .directory
            .get(&config.tenant, true)
            .await?
            .ok_or_else(|| RunError::Config("the tenant could not be created".into()))?;
        tenant.set_quota(quota).await?;
    }
    // A sidecar whose tenant a live migration moved away stops: it has no credentials for
    // the target (the migration records only its redacted name), so whoever wires it (the
    // controller, or an operator) restarts it with the new --endpoint.
    let moved = Arc::new(tokio::sync::Notify::new());
    let moved_away = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tenancy = if config.gateway {
        Tenancy::gateway(
            served.directory.clone(),
            config.gateway_identity,
            config.gateway_create_tenants,
        )
    } else {
        let tenant = served
            .directory
            .get(&config.tenant, true)
            .await?
            .ok_or_else(|| RunError::Config("the tenant's keyspace could not be created".into()))?;
        tokio::spawn(watch_for_move(
            tenant.clone(),
            moved.clone(),
            moved_away.clone(),
        ));
        Tenancy::single(tenant)
    };
    let tenants = served.directory.clone();
    if !config.tenant_idle_timeout.is_zero() {
        tokio::spawn(tenants::close_idle_tenants(
            tenants.clone(),
            config.tenant_idle_timeout,
        ));
    }
    let shared = config.gateway || config.tenant != DEFAULT_KEYSPACE || served.always_shared;
    if let Some(path) = &config.admin_socket {
        serve_admin_socket(path, tenants.clone(), served.mover.clone())?;
    }
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let readiness = Readiness::start(served.probe.clone(), health_reporter).await;
    let metrics = Metrics::global().clone();
    if !config.metrics_bind_address.is_empty() {
        serve_metrics(
            &config.metrics_bind_address,
            metrics.clone(),
            readiness.clone(),
        )
        .await?;
    }

    let max_message = config.max_request_bytes + GRPC_OVERHEAD_BYTES;
    let keepalive =
        (!config.grpc_keepalive_interval.is_zero()).then_some(config.grpc_keepalive_interval);
    let mut builder = Server::builder()
        .max_concurrent_streams(config.max_concurrent_streams)
        .http2_keepalive_interval(keepalive)
        .http2_keepalive_timeout(Some(config.grpc_keepalive_timeout));
    if let (Some(cert), Some(key)) = (&config.server_cert_file, &config.server_key_file) {
        let read = |path: &str| {
            std::fs::read(path).map_err(|e| RunError::Tls(format!("cannot read {path}: {e}")))
        };
        let mut tls_config =
            ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
        if let Some(ca) = &config.trusted_ca_file {
            tls_config = tls_config.client_ca_root(Certificate::from_pem(read(ca)?));
        }
        builder = builder
            .tls_config(tls_config)
            .map_err(|e| RunError::Tls(e.to_string()))?;
    }
    let member_name = std::env::var("HOSTNAME").unwrap_or_else(|_| "kine-rs".to_string());
    let router = builder
        .layer(MetricsLayer(metrics))
        .add_service(health_service)
        .add_service(
            KvServer::new(KvService {
                tenancy: tenancy.clone(),
                max_request_bytes: config.max_request_bytes,
            })
            .max_decoding_message_size(max_message),
        )
        .add_service(
            WatchServer::new(WatchService {
                tenancy: tenancy.clone(),
                progress_notify_interval: config.watch_progress_notify_interval,
                stream_buffer_bytes: config.watch_stream_buffer_bytes,
            })
            .max_decoding_message_size(max_message),
        )
        .add_service(
            LeaseServer::new(LeaseService {
                tenancy: tenancy.clone(),
            })
            .max_decoding_message_size(max_message),
        )
        .add_service(MaintenanceServer::new(MaintenanceService {
            tenancy: tenancy.clone(),
            version: config.emulated_etcd_version.clone(),
            shared,
        }))
        .add_service(TenantAdminServer::new(AdminService {
            tenants: tenants.clone(),
            admin_identities: config.admin_identity.clone(),
            local: false,
            mover: served.mover.clone(),
        }))
        .add_service(ClusterServer::new(ClusterService {
            tenancy,
            name: member_name,
            client_url: listen.client_url(tls),
        }));

    info!(endpoint = %redacted, listen = %config.listen_address, tls, "kine-rs serving");
    match &listen {
        ListenAddress::Tcp(address) => {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .map_err(|source| RunError::Listen {
                    address: address.clone(),
                    source,
                })?;
            // Without TCP_NODELAY, the tail of a large response (a page of a list) waits for
            // the client's delayed ACK, about 40 ms.
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            let stopping = Arc::new(tokio::sync::Notify::new());
            let serving = router.serve_with_incoming_shutdown(
                incoming,
                shutdown_signal(readiness.clone(), moved.clone(), stopping.clone()),
            );
            until_grace_ends(serving, stopping).await?;
        }
        ListenAddress::Unix(path) => {
            // A socket left by a previous run would make bind fail.
            let _ = std::fs::remove_file(path);
            let listener =
                tokio::net::UnixListener::bind(path).map_err(|source| RunError::Listen {
                    address: path.clone(),
                    source,
                })?;
            let stopping = Arc::new(tokio::sync::Notify::new());
            let serving = router.serve_with_incoming_shutdown(
                UnixListenerStream::new(listener),
                shutdown_signal(readiness.clone(), moved.clone(), stopping.clone()),
            );
            until_grace_ends(serving, stopping).await?;
        }
    }
    if moved_away.load(std::sync::atomic::Ordering::Acquire) {
        return Err(RunError::Moved {
            tenant: config.tenant.clone(),
        });
    }
    info!("kine-rs stopped");
    Ok(())
}

/// How often a sidecar asks whether its tenant was moved.
const MOVE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Notifies `moved` once the tenant was moved away by a live migration.
async fn watch_for_move(
    tenant: Arc<dyn crate::served::ServedTenant>,
    moved: Arc<tokio::sync::Notify>,
    moved_away: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut interval = tokio::time::interval(MOVE_CHECK_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        if let Ok(true) = tenant.moved().await {
            warn!(
                tenant = tenant.name(),
                "the tenant was moved to another datastore; stopping"
            );
            moved_away.store(true, std::sync::atomic::Ordering::Release);
            moved.notify_one();
            return;
        }
    }
}

/// Waits for SIGINT or SIGTERM (or the tenant's move); health turns NOT_SERVING as the
/// shutdown begins.
async fn shutdown_signal(
    readiness: Readiness,
    moved: Arc<tokio::sync::Notify>,
    stopping: Arc<tokio::sync::Notify>,
) {
    tokio::select! {
        _ = wait_for_signal() => {}
        _ = moved.notified() => {}
    }
    readiness.shutting_down().await;
    stopping.notify_one();
}

/// How long a shutdown waits for open streams (watches, keep-alives) to end: clients keep
/// them open for ever, so a graceful stop would otherwise never end.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Runs `serving` until it ends, or until [`SHUTDOWN_GRACE`] after `stopping`.
async fn until_grace_ends<F>(
    serving: F,
    stopping: Arc<tokio::sync::Notify>,
) -> Result<(), tonic::transport::Error>
where
    F: Future<Output = Result<(), tonic::transport::Error>>,
{
    tokio::select! {
        result = serving => result,
        _ = async {
            stopping.notified().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            warn!("streams still open {}s into the shutdown: closing them", SHUTDOWN_GRACE.as_secs());
            Ok(())
        }
    }
}

async fn wait_for_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

/// Serves the admin API alone on a local unix socket, readable and writable by the owner only.
fn serve_admin_socket(
    path: &str,
    tenants: Arc<dyn TenantDirectory>,
    mover: Option<Arc<RoutedTenants>>,
) -> Result<(), RunError> {
    use std::os::unix::fs::PermissionsExt;
    // A socket left by a previous run would make bind fail.
    let _ = std::fs::remove_file(path);
    let listen_error = |source| RunError::Listen {
        address: path.to_string(),
        source,
    };
    let listener = tokio::net::UnixListener::bind(path).map_err(listen_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(listen_error)?;
    let router = Server::builder().add_service(TenantAdminServer::new(AdminService {
        tenants,
        admin_identities: Vec::new(),
        local: true,
        mover,
    }));
    info!(socket = path, "serving the admin API");
    tokio::spawn(async move {
        if let Err(error) = router
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), wait_for_signal())
            .await
        {
            warn!(%error, "the admin socket stopped");
        }
    });
    Ok(())
}

async fn serve_metrics(
    address: &str,
    metrics: Arc<Metrics>,
    readiness: Readiness,
) -> Result<(), RunError> {
    let address = if address.starts_with(':') {
        format!("0.0.0.0{address}")
    } else {
        address.to_string()
    };
    let listener = tokio::net::TcpListener::bind(&address)
        .await
        .map_err(|source| RunError::Listen {
            address: address.clone(),
            source,
        })?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let metrics = metrics.clone();
                async move { metrics.render() }
            }),
        )
        .route(
            "/readyz",
            axum::routing::get(move || {
                let ready = readiness.is_ready();
                async move {
                    if ready {
                        (axum::http::StatusCode::OK, "ok")
                    } else {
                        (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            "not ready: the datastore does not answer, or kine-rs is stopping",
                        )
                    }
                }
            }),
        );
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            warn!(%error, "metrics server stopped");
        }
    });
    Ok(())
}

/// Counts and times every gRPC request by method and status code (both from fixed sets).
#[derive(Clone)]
struct MetricsLayer(Arc<Metrics>);

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MetricsService {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Clone)]
struct MetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B, R> tower::Service<http::Request<B>> for MetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = method_label(request.uri().path());
        let started = Instant::now();
        let metrics = self.metrics.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await;
            if let Ok(response) = &mut response {
                translate_oversized_message(response.headers_mut());
                // Errors travel as a trailers-only response: the status is in the headers.
                let code = code_label(
                    response
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("0"),
                );
                metrics
                    .latency
                    .get_or_create(&MethodLabels { method })
                    .observe(started.elapsed().as_secs_f64());
                metrics
                    .requests
                    .get_or_create(&RpcLabels { method, code })
                    .inc();
            }
            response
        })
    }
}

/// Rewrites tonic's answer to a message over the gRPC size limit into grpc-go's, which etcd
/// clients expect: `ResourceExhausted`, "grpc: received message larger than max (N vs. M)".
fn translate_oversized_message(headers: &mut http::HeaderMap) {
    const TONIC_PREFIX: &str = "Error, decoded message length too large: found ";
    if headers.get("grpc-status").and_then(|v| v.to_str().ok()) != Some("11") {
        return;
    }
    let Some(message) = headers.get("grpc-message").and_then(|v| v.to_str().ok()) else {
        return;
    };
    // grpc-message is percent-encoded on the wire.
    let message = message
        .replace("%20", " ")
        .replace("%2C", ",")
        .replace("%3A", ":");
    let Some(rest) = message.strip_prefix(TONIC_PREFIX) else {
        return;
    };
    let numbers: Vec<&str> = rest
        .split(|c: char| !c.is_ascii_digit())
        .filter(|part| !part.is_empty())
        .collect();
    let [found, limit] = numbers[..] else {
        return;
    };
    let translated = format!("grpc: received message larger than max ({found} vs. {limit})");
    if let Ok(value) = http::HeaderValue::from_str(&translated.replace(' ', "%20")) {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
        headers.insert("grpc-message", value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gateway_holds_tenants_to_smaller_lease_limits_unless_told_otherwise() {
        use clap::Parser;
        let limits = |args: &[&str]| {
            let config =
                Config::try_parse_from(std::iter::once("kine-rs").chain(args.iter().copied()))
                    .expect("flags");
            let limits = request_limits(&config);
            (
                limits.max_leases_per_tenant,
                limits.keepalives_per_second,
                limits.read_rows_per_second,
            )
        };
        assert_eq!(limits(&[]), (100_000, 10_000, 0));
        assert_eq!(limits(&["--gateway"]), (20_000, 2_000, 50_000));
        assert_eq!(
            limits(&[
                "--gateway",
                "--max-leases-per-tenant",
                "7",
                "--max-keepalives-per-second",
                "0"
            ]),
            (7, 0, 50_000)
        );
    }

    #[test]
    fn translates_oversized_messages_to_grpc_gos_error() {
        let mut headers = http::HeaderMap::new();
        headers.insert("grpc-status", http::HeaderValue::from_static("11"));
        headers.insert(
            "grpc-message",
            http::HeaderValue::from_static(
                "Error,%20decoded%20message%20length%20too%20large:%20found%203145739%20bytes,%20the%20limit%20is:%202097152%20bytes",
            ),
        );
        translate_oversized_message(&mut headers);
        assert_eq!(headers["grpc-status"], "8");
        assert_eq!(
            headers["grpc-message"],
            "grpc:%20received%20message%20larger%20than%20max%20(3145739%20vs.%202097152)"
        );
    }

    #[test]
    fn parses_kines_listen_addresses() {
        assert_eq!(
            ListenAddress::parse("unix:///run/kine.sock"),
            ListenAddress::Unix("/run/kine.sock".into())
        );
        assert_eq!(
            ListenAddress::parse(":2379"),
            ListenAddress::Tcp("0.0.0.0:2379".into())
        );
        assert_eq!(
            ListenAddress::parse("http://127.0.0.1:2379"),
            ListenAddress::Tcp("127.0.0.1:2379".into())
        );
    }

    #[test]
    fn redacts_credentials() {
        assert_eq!(
            redact_endpoint("postgres://user:secret@db:5432/kine"),
            "postgres://***@db:5432/kine"
        );
        assert_eq!(
            redact_endpoint("sqlite://./db/state.db"),
            "sqlite://./db/state.db"
        );
        assert_eq!(
            redact_endpoint("mysql://kine:p@ss@tcp(db:3306)/kine"),
            "mysql://***@tcp(db:3306)/kine"
        );
        assert_eq!(
            redact_endpoint("postgres://kine@db/kine?sslmode=disable&password=s3@cr&x=1"),
            "postgres://***@db/kine?sslmode=disable&password=***&x=1"
        );
        assert_eq!(
            redact_endpoint("postgres://db/kine?sslPassword=s3cr"),
            "postgres://db/kine?sslPassword=***"
        );
        assert_eq!(
            redact_endpoint("host=db password=s3cr user=kine"),
            "host=db password=*** user=kine"
        );
        // Not a parameter: part of the user information, which goes whole.
        assert_eq!(
            redact_endpoint("postgres://kine:mypassword=x@db/kine"),
            "postgres://***@db/kine"
        );
    }
}
