//! The gateway workload: many tenants, each with its own mTLS identity and connection and one
//! watch, held open so the caller can measure the server's memory; and the throwaway PKI it
//! needs (`kine-load pki`).
//!
//! In a kine-rs gateway a tenant is the common name of its client certificate, so each tenant
//! needs its own TLS connection. Every tenant watches the run's whole prefix and writes one key
//! under it: in a gateway each watch must see its own tenant's event and nothing else (the
//! other tenants' keys are in other keyspaces). A target without tenants (etcd, `--no-tenants`)
//! watches one prefix per tenant instead, the nearest equivalent.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Args;
use futures::StreamExt;
use kine_proto::etcdserverpb::watch_client::WatchClient;
use kine_proto::etcdserverpb::watch_request::RequestUnion;
use kine_proto::etcdserverpb::{PutRequest, WatchCreateRequest, WatchRequest, WatchResponse};
use kine_proto::mvccpb::event::EventType;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::Streaming;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::report::{Report, Stats};
use crate::workloads::{MAX_MESSAGE, kv_client, prefix_end};
use crate::{Opts, connect};

/// Longest wait for one connection, watch creation or put.
const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the last events after the last put.
const DELIVERY_GRACE: Duration = Duration::from_secs(10);

/// Options of `kine-load gateway-watch`.
#[derive(Args, Debug, Clone)]
pub struct GatewayOpts {
    #[command(flatten)]
    pub opts: Opts,
    /// Tenants: each opens one watch and writes one key.
    #[arg(long, default_value_t = 1000)]
    pub tenants: usize,
    /// Seconds to hold every watch open once the events arrived (sample the server then).
    #[arg(long, default_value_t = 5.0)]
    pub hold: f64,
    /// Directory written by `kine-load pki`: connect over mTLS, tenant i with the certificate
    /// `tenant-NNNN.pem` (one connection per tenant). Without it, the watches share `--conns`
    /// plain connections.
    #[arg(long)]
    pub pki_dir: Option<PathBuf>,
    /// Server name to verify the server certificate against (default: the endpoint's host).
    #[arg(long)]
    pub tls_domain: Option<String>,
    /// The target has no tenants (etcd): each tenant watches only its own prefix.
    #[arg(long)]
    pub no_tenants: bool,
    /// Connections opened (and puts sent) at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// File created once every watch is open and has had its event, before holding.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
}

/// The name (and certificate common name) of tenant `i`.
pub fn tenant_name(i: usize) -> String {
    format!("tenant-{i:04}")
}

/// Writes a CA (`ca.pem`), a server certificate for `localhost` and `127.0.0.1`
/// (`server.pem`, `server-key.pem`) and `clients` client certificates whose common names are
/// the tenant names (`tenant-NNNN.pem`, `tenant-NNNN-key.pem`) into `dir`. ECDSA P-256 keys.
pub fn write_pki(dir: &Path, clients: usize) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let write = |name: &str, pem: String| -> Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, pem).with_context(|| format!("writing {}", path.display()))
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "kine-load CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let mut server =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
    server
        .distinguished_name
        .push(DnType::CommonName, "kine-load server");
    server.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        // etcd also uses its server certificate as a client (its gRPC gateway).
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let server_key = KeyPair::generate()?;
    let server_cert = server.signed_by(&server_key, &ca)?;
    write("ca.pem", ca.pem())?;
    write("server.pem", server_cert.pem())?;
    write("server-key.pem", server_key.serialize_pem())?;
    for i in 0..clients {
        let name = tenant_name(i);
        let mut client = CertificateParams::new(Vec::<String>::new())?;
        client.distinguished_name.push(DnType::CommonName, &name);
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate()?;
        let cert = client.signed_by(&key, &ca)?;
        write(&format!("{name}.pem"), cert.pem())?;
        write(&format!("{name}-key.pem"), key.serialize_pem())?;
    }
    Ok(())
}

/// What one tenant's watch saw.
#[derive(Debug, Default)]
struct Seen {
    /// Events of its own key.
    own: u64,
    first_own_at: Option<Instant>,
    /// Events of any other key.
    foreign: u64,
    first_foreign: Option<String>,
    /// Why the watch ended before the run did, if it did.
    lost: Option<String>,
}

/// One tenant once its watch is open.
struct Tenant {
    index: usize,
    channel: Channel,
    key: Bytes,
    value: Bytes,
    watcher: JoinHandle<Seen>,
    acked: Option<Instant>,
}

/// Reads a watch until `stop`, counting the tenant's own and foreign events.
async fn watcher(
    mut events: Streaming<WatchResponse>,
    key: Bytes,
    value: Bytes,
    delivered: Arc<AtomicUsize>,
    mut stop: watch::Receiver<bool>,
) -> Seen {
    let mut seen = Seen::default();
    loop {
        let message = tokio::select! {
            _ = stop.changed() => break,
            m = events.message() => m,
        };
        let response = match message {
            Ok(Some(r)) => r,
            Ok(None) => {
                seen.lost = Some("watch stream ended".to_string());
                break;
            }
            Err(e) => {
                seen.lost = Some(format!("watch stream failed: {}", e.message()));
                break;
            }
        };
        if response.canceled {
            seen.lost = Some(format!("watch canceled: {}", response.cancel_reason));
            break;
        }
        for event in &response.events {
            let kv = event.kv.as_ref();
            let own = event.r#type == EventType::Put as i32
                && kv.is_some_and(|kv| kv.key == key && kv.value == value);
            if own {
                seen.own += 1;
                if seen.own == 1 {
                    seen.first_own_at = Some(Instant::now());
                    delivered.fetch_add(1, Ordering::AcqRel);
                }
            } else {
                seen.foreign += 1;
                if seen.first_foreign.is_none() {
                    seen.first_foreign = Some(
                        kv.map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
                            .unwrap_or_default(),
                    );
                }
            }
        }
    }
    seen
}

/// How tenants reach the target.
pub(crate) enum Access {
    /// A new mTLS connection per call, with the tenant's own certificate.
    Tls {
        url: String,
        ca: Certificate,
        dir: PathBuf,
        domain: Option<String>,
    },
    /// Plain connections shared by all tenants.
    Shared(Vec<Channel>),
    /// A new plain connection per call (a target without tenants).
    Fresh(Vec<String>),
}

impl Access {
    /// mTLS to the first of `endpoints` with the certificates `kine-load pki` wrote in `dir`.
    pub(crate) fn tls(endpoints: &[String], dir: &Path, domain: Option<String>) -> Result<Access> {
        let url = endpoints[0].clone();
        if !url.starts_with("https://") {
            bail!("--pki-dir needs an https:// endpoint, not {url}");
        }
        let ca = std::fs::read(dir.join("ca.pem"))
            .with_context(|| format!("reading {}/ca.pem", dir.display()))?;
        Ok(Access::Tls {
            url,
            ca: Certificate::from_pem(ca),
            dir: dir.to_path_buf(),
            domain,
        })
    }

    /// A connection of tenant `i`.
    pub(crate) async fn channel(&self, i: usize) -> Result<Channel> {
        match self {
            Access::Shared(channels) => Ok(channels[i % channels.len()].clone()),
            Access::Fresh(endpoints) => Ok(connect(endpoints, 1).await?.remove(0)),
            Access::Tls {
                url,
                ca,
                dir,
                domain,
            } => connect_as(url, ca, dir, &tenant_name(i), domain.as_deref()).await,
        }
    }
}

/// Opens an mTLS connection to `url` as `name`, with the certificate `name.pem` and key
/// `name-key.pem` from `dir` (written by `kine-load pki`).
pub(crate) async fn connect_as(
    url: &str,
    ca: &Certificate,
    dir: &Path,
    name: &str,
    domain: Option<&str>,
) -> Result<Channel> {
    let read = |file: String| {
        let path = dir.join(file);
        std::fs::read(&path).with_context(|| {
            format!(
                "reading {} (write it with `kine-load pki --dir {} --clients N`)",
                path.display(),
                dir.display()
            )
        })
    };
    let identity = Identity::from_pem(
        read(format!("{name}.pem"))?,
        read(format!("{name}-key.pem"))?,
    );
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(ca.clone())
        .identity(identity);
    if let Some(domain) = domain {
        tls = tls.domain_name(domain);
    }
    Endpoint::from_shared(url.to_string())
        .with_context(|| format!("bad endpoint {url}"))?
        .tls_config(tls)?
        .connect_timeout(OP_TIMEOUT)
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("connecting as {name}: {e:?}"))
}

/// Opens tenant `i`'s connection and watch.
async fn open(
    access: &Access,
    i: usize,
    prefix: &str,
    no_tenants: bool,
    delivered: Arc<AtomicUsize>,
    stop: watch::Receiver<bool>,
) -> Result<Tenant> {
    let name = tenant_name(i);
    let channel = access.channel(i).await?;
    let own_prefix = format!("{prefix}{name}/");
    // In a gateway every tenant watches the whole prefix: other tenants' keys under it are in
    // other keyspaces and must not show up.
    let watched = if no_tenants {
        own_prefix.as_str()
    } else {
        prefix
    };
    let create = WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: Bytes::copy_from_slice(watched.as_bytes()),
            range_end: prefix_end(watched.as_bytes()),
            ..Default::default()
        })),
    };
    let requests = futures::stream::iter([create]).chain(futures::stream::pending());
    let mut client = WatchClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE);
    let mut events = tokio::time::timeout(OP_TIMEOUT, client.watch(requests))
        .await
        .with_context(|| format!("{name}: no answer to the watch"))?
        .map_err(|e| anyhow::anyhow!("{name}: watch: {}", e.message()))?
        .into_inner();
    let created = tokio::time::timeout(OP_TIMEOUT, events.message())
        .await
        .with_context(|| format!("{name}: watch not created in time"))?
        .map_err(|e| anyhow::anyhow!("{name}: watch: {}", e.message()))?
        .with_context(|| format!("{name}: watch stream ended"))?;
    if !created.created || created.canceled {
        bail!(
            "{name}: watch not created ({})",
            if created.cancel_reason.is_empty() {
                "no created response"
            } else {
                &created.cancel_reason
            }
        );
    }
    let key = Bytes::from(format!("{own_prefix}k"));
    let value = Bytes::from(name);
    let watcher = tokio::spawn(watcher(events, key.clone(), value.clone(), delivered, stop));
    Ok(Tenant {
        index: i,
        channel,
        key,
        value,
        watcher,
        acked: None,
    })
}

/// `kine-load gateway-watch`: opens `--tenants` tenants' watches, writes one key per tenant,
/// checks each watch gets its own event and only that, holds the watches `--hold` seconds.
/// Opening, writing and delivery are bounded by `--duration` (plus 10 s for stragglers).
pub async fn gateway_watch(g: &GatewayOpts) -> Result<Report> {
    let opts = &g.opts;
    let prefix = opts.prefix("gateway-watch");
    let access = match &g.pki_dir {
        Some(dir) => Access::tls(&opts.endpoints, dir, g.tls_domain.clone())?,
        None => Access::Shared(connect(&opts.endpoints, opts.conns).await?),
    };
    let n = g.tenants.max(1);
    let concurrency = g.concurrency.max(1);
    let deadline = Instant::now() + opts.duration();
    let delivered = Arc::new(AtomicUsize::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut stats = Stats::default();

    // Open every tenant's connection and watch, `concurrency` at a time.
    let start = Instant::now();
    let mut open_latencies = Vec::with_capacity(n);
    let mut tenants: Vec<Tenant> = Vec::with_capacity(n);
    {
        let (access, prefix) = (&access, prefix.as_str());
        let mut opening = futures::stream::iter(0..n)
            .map(|i| {
                let (delivered, stop) = (delivered.clone(), stop_rx.clone());
                async move {
                    if Instant::now() >= deadline {
                        bail!("{}: not opened within --duration", tenant_name(i));
                    }
                    let t = Instant::now();
                    let tenant = open(access, i, prefix, g.no_tenants, delivered, stop).await?;
                    Ok((tenant, t.elapsed()))
                }
            })
            .buffer_unordered(concurrency);
        while let Some(result) = opening.next().await {
            match result {
                Ok((tenant, took)) => {
                    open_latencies.push(took);
                    tenants.push(tenant);
                }
                Err(e) => stats.error(format!("{e:#}")),
            }
        }
    }
    let open_elapsed = start.elapsed();
    tenants.sort_by_key(|t| t.index);
    let opened = tenants.len();
    eprintln!(
        "kine-load: {opened} of {n} watches open in {:.2} s",
        open_elapsed.as_secs_f64()
    );

    // One put per tenant, through its own connection.
    let put_start = Instant::now();
    {
        let mut putting = futures::stream::iter(tenants.iter_mut())
            .map(|tenant| async move {
                if Instant::now() >= deadline {
                    return Err(format!(
                        "{}: put not sent within --duration",
                        tenant_name(tenant.index)
                    ));
                }
                let request = PutRequest {
                    key: tenant.key.clone(),
                    value: tenant.value.clone(),
                    ..Default::default()
                };
                match tokio::time::timeout(OP_TIMEOUT, kv_client(&tenant.channel).put(request))
                    .await
                {
                    Ok(Ok(_)) => {
                        tenant.acked = Some(Instant::now());
                        Ok(())
                    }
                    Ok(Err(e)) => Err(format!(
                        "{}: put: {}",
                        tenant_name(tenant.index),
                        e.message()
                    )),
                    Err(_) => Err(format!("{}: put timed out", tenant_name(tenant.index))),
                }
            })
            .buffer_unordered(concurrency);
        while let Some(result) = putting.next().await {
            if let Err(e) = result {
                stats.error(e);
            }
        }
    }
    let put_elapsed = put_start.elapsed();
    let acked = tenants.iter().filter(|t| t.acked.is_some()).count();

    // Wait for every acknowledged put's event.
    let grace = Instant::now() + DELIVERY_GRACE;
    while delivered.load(Ordering::Acquire) < acked && Instant::now() < grace {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let deliver_elapsed = put_start.elapsed();
    let setup = start.elapsed();
    eprintln!(
        "kine-load: {acked} puts, {} events delivered; holding {opened} watches for {} s",
        delivered.load(Ordering::Acquire),
        g.hold
    );

    // Hold: the caller samples the server's memory now.
    if let Some(path) = &g.ready_file {
        std::fs::write(path, format!("{opened}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    tokio::time::sleep(Duration::from_secs_f64(g.hold.max(0.0))).await;
    let _ = stop_tx.send(true);

    let (mut missing, mut duplicates, mut foreign, mut lost) = (0u64, 0u64, 0u64, 0u64);
    for tenant in tenants {
        let name = tenant_name(tenant.index);
        let seen = tenant.watcher.await.context("watcher task")?;
        if let Some(why) = seen.lost {
            lost += 1;
            stats.error(format!("{name}: {why}"));
        }
        if seen.foreign > 0 {
            foreign += seen.foreign;
            stats.error(format!(
                "{name}: {} foreign event(s), first {:?}",
                seen.foreign,
                seen.first_foreign.unwrap_or_default()
            ));
        }
        if let Some(acked) = tenant.acked {
            match seen.first_own_at {
                Some(at) => stats.record(at.saturating_duration_since(acked)),
                None => {
                    missing += 1;
                    stats.error(format!("{name}: its own event never arrived"));
                }
            }
        }
        if seen.own > 1 {
            duplicates += seen.own - 1;
            stats.error(format!("{name}: its own event arrived {} times", seen.own));
        }
    }

    open_latencies.sort_unstable();
    let open_quantile = |q: f64| -> f64 {
        if open_latencies.is_empty() {
            return 0.0;
        }
        let i = ((open_latencies.len() as f64 * q).ceil() as usize).clamp(1, open_latencies.len());
        (open_latencies[i - 1].as_secs_f64() * 1000.0 * 10.0).round() / 10.0
    };
    let secs = |d: Duration| (d.as_secs_f64() * 1000.0).round() / 1000.0;
    stats.set("tenants", json!(n));
    stats.set("opened", json!(opened));
    stats.set(
        "mode",
        json!(match (&access, g.no_tenants) {
            (Access::Tls { .. }, false) => "mtls, one connection per tenant",
            (Access::Tls { .. }, true) => "mtls, one connection per watch, a prefix each",
            (Access::Shared(_), false) => "plain, shared connections",
            (Access::Shared(_), true) => "plain, shared connections, a prefix each",
            (Access::Fresh(_), false) => "plain, one connection per tenant",
            (Access::Fresh(_), true) => "plain, one connection per watch, a prefix each",
        }),
    );
    stats.set("open_s", json!(secs(open_elapsed)));
    stats.set("open_p50_ms", json!(open_quantile(0.5)));
    stats.set("open_p99_ms", json!(open_quantile(0.99)));
    stats.set("put_s", json!(secs(put_elapsed)));
    stats.set("deliver_s", json!(secs(deliver_elapsed)));
    stats.set("hold_s", json!(g.hold));
    stats.set("puts", json!(acked));
    stats.set("missing", json!(missing));
    stats.set("duplicates", json!(duplicates));
    stats.set("foreign", json!(foreign));
    stats.set("lost", json!(lost));
    Ok(stats.into_report(setup))
}
