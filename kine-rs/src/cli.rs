//! `kine-rs tenant …`: the command line of the admin API, over a local `--admin-socket` or an
//! endpoint with an admin client certificate.

use clap::{Args, Subcommand, ValueEnum};
use hyper_util::rt::TokioIo;
use kine_proto::kine::admin::v1::tenant_admin_client::TenantAdminClient;
use kine_proto::kine::admin::v1::{
    CreateTenantRequest, DeleteTenantRequest, FreezeTenantRequest, ListTenantsRequest,
    MigrateTenantRequest, Quota, SetQuotaRequest, TenantStatus, TenantStatusRequest,
    UnfreezeTenantRequest,
};
use serde_json::{Value, json};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// `kine-rs tenant`: where the admin API is, how to print, and what to do.
#[derive(Debug, Clone, Args)]
pub struct TenantArgs {
    /// The admin socket of a kine-rs on this machine (its `--admin-socket`).
    #[arg(
        long,
        global = true,
        env = "KINE_ADMIN_SOCKET",
        conflicts_with = "endpoint"
    )]
    pub admin_socket: Option<String>,

    /// A kine-rs serving the admin API, `https://HOST:PORT`; needs `--cert`/`--key` of an
    /// `--admin-identity`.
    #[arg(long, global = true)]
    pub endpoint: Option<String>,

    /// CA certificate that signed the server's certificate (PEM).
    #[arg(long, global = true)]
    pub cacert: Option<String>,

    /// Client certificate (PEM) of an admin identity.
    #[arg(long, global = true, requires = "key")]
    pub cert: Option<String>,

    /// Key of `--cert` (PEM).
    #[arg(long, global = true, requires = "cert")]
    pub key: Option<String>,

    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,

    #[command(subcommand)]
    pub action: TenantAction,
}

/// How `kine-rs tenant` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// What `kine-rs tenant` does.
#[derive(Debug, Clone, Subcommand)]
pub enum TenantAction {
    /// Lists every tenant of the datastore.
    List,
    /// Shows one tenant: revision, compaction, usage, quota, freeze, open watches.
    Status { name: String },
    /// Creates a tenant.
    Create {
        name: String,
        /// Most live keys (0: no limit).
        #[arg(long)]
        quota_keys: Option<i64>,
        /// Most bytes of live keys and values (0: no limit).
        #[arg(long)]
        quota_bytes: Option<i64>,
    },
    /// Refuses every write of the tenant, in every kine-rs sharing the datastore, once it
    /// returns; reads, watches and lease keep-alives go on, lease expiry pauses.
    Freeze { name: String },
    /// Restores writes and lease expiry (with the remaining TTLs).
    Unfreeze { name: String },
    /// Sets the tenant's quota (0: no limit).
    SetQuota {
        name: String,
        #[arg(long, default_value_t = 0)]
        keys: i64,
        #[arg(long, default_value_t = 0)]
        bytes: i64,
    },
    /// Gateway only: moves the tenant live to another datastore and serves it from there;
    /// its clients keep their connections, watches and leases.
    Migrate {
        name: String,
        /// The target datastore, as for `--endpoint`.
        #[arg(long)]
        to: String,
    },
    /// Deletes the tenant with all its data.
    Delete {
        name: String,
        /// Also when it has open watches (they end).
        #[arg(long)]
        force: bool,
    },
}

async fn connect(args: &TenantArgs) -> anyhow::Result<TenantAdminClient<Channel>> {
    let channel = if let Some(path) = &args.admin_socket {
        let path = path.clone();
        // The URI is not used: every connection goes to the socket.
        Endpoint::try_from("http://localhost")?
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            }))
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to the admin socket: {e}"))?
    } else if let Some(endpoint) = &args.endpoint {
        let mut endpoint = Endpoint::from_shared(endpoint.clone())?;
        if endpoint.uri().scheme_str() == Some("https") {
            let mut tls = ClientTlsConfig::new();
            if let Some(ca) = &args.cacert {
                tls = tls.ca_certificate(Certificate::from_pem(std::fs::read(ca)?));
            } else {
                tls = tls.with_enabled_roots();
            }
            if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
                tls = tls.identity(Identity::from_pem(
                    std::fs::read(cert)?,
                    std::fs::read(key)?,
                ));
            }
            endpoint = endpoint.tls_config(tls)?;
        }
        endpoint
            .connect()
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to {}: {e}", endpoint.uri()))?
    } else {
        anyhow::bail!("say where the admin API is: --admin-socket PATH or --endpoint URL");
    };
    Ok(TenantAdminClient::new(channel))
}

fn status_json(status: &TenantStatus) -> Value {
    let quota = status.quota.unwrap_or_default();
    json!({
        "name": status.name,
        "revision": status.revision,
        "compact_revision": status.compact_revision,
        "keys": status.keys,
        "bytes": status.bytes,
        "quota": { "keys": quota.keys, "bytes": quota.bytes },
        "frozen": status.frozen,
        "frozen_since_unix_ms": status.frozen_since_unix_ms,
        "open_watches": status.open_watches,
    })
}

fn limit(value: i64) -> String {
    if value == 0 {
        "-".to_string()
    } else {
        value.to_string()
    }
}

fn status_text(status: &TenantStatus) -> String {
    let quota = status.quota.unwrap_or_default();
    format!(
        "tenant:           {}\nrevision:         {}\ncompact revision: {}\nkeys:             {} \
         (quota {})\nbytes:            {} (quota {})\nfrozen:           {}\nopen watches:     {}\n",
        status.name,
        status.revision,
        status.compact_revision,
        status.keys,
        limit(quota.keys),
        status.bytes,
        limit(quota.bytes),
        if status.frozen { "yes" } else { "no" },
        status.open_watches,
    )
}

fn list_text(tenants: &[TenantStatus]) -> String {
    let mut out = format!(
        "{:<24} {:>10} {:>10} {:>12} {:>10} {:>12} {:>6} {:>7}\n",
        "NAME", "REVISION", "KEYS", "BYTES", "QUOTA-KEYS", "QUOTA-BYTES", "FROZEN", "WATCHES"
    );
    for t in tenants {
        let quota = t.quota.unwrap_or_default();
        out.push_str(&format!(
            "{:<24} {:>10} {:>10} {:>12} {:>10} {:>12} {:>6} {:>7}\n",
            t.name,
            t.revision,
            t.keys,
            t.bytes,
            limit(quota.keys),
            limit(quota.bytes),
            if t.frozen { "yes" } else { "no" },
            t.open_watches,
        ));
    }
    out
}

/// Runs `kine-rs tenant …`; errors carry the server's message.
pub async fn run(args: TenantArgs) -> anyhow::Result<()> {
    let mut client = connect(&args).await?;
    let json = args.output == Output::Json;
    let fail = |status: tonic::Status| anyhow::anyhow!("{:?}: {}", status.code(), status.message());
    let (text, value) = match args.action {
        TenantAction::List => {
            let tenants = client
                .list_tenants(ListTenantsRequest {})
                .await
                .map_err(fail)?
                .into_inner()
                .tenants;
            let value = json!({ "tenants": tenants.iter().map(status_json).collect::<Vec<_>>() });
            (list_text(&tenants), value)
        }
        TenantAction::Status { name } => {
            let status = client
                .tenant_status(TenantStatusRequest { name })
                .await
                .map_err(fail)?
                .into_inner();
            (status_text(&status), status_json(&status))
        }
        TenantAction::Create {
            name,
            quota_keys,
            quota_bytes,
        } => {
            let quota = (quota_keys.is_some() || quota_bytes.is_some()).then(|| Quota {
                keys: quota_keys.unwrap_or(0),
                bytes: quota_bytes.unwrap_or(0),
            });
            let status = client
                .create_tenant(CreateTenantRequest { name, quota })
                .await
                .map_err(fail)?
                .into_inner();
            (
                format!("created\n{}", status_text(&status)),
                status_json(&status),
            )
        }
        TenantAction::Freeze { name } => {
            let status = client
                .freeze_tenant(FreezeTenantRequest { name })
                .await
                .map_err(fail)?
                .into_inner();
            (
                format!("frozen\n{}", status_text(&status)),
                status_json(&status),
            )
        }
        TenantAction::Unfreeze { name } => {
            let status = client
                .unfreeze_tenant(UnfreezeTenantRequest { name })
                .await
                .map_err(fail)?
                .into_inner();
            (
                format!("unfrozen\n{}", status_text(&status)),
                status_json(&status),
            )
        }
        TenantAction::SetQuota { name, keys, bytes } => {
            let status = client
                .set_quota(SetQuotaRequest {
                    name,
                    quota: Some(Quota { keys, bytes }),
                })
                .await
                .map_err(fail)?
                .into_inner();
            (status_text(&status), status_json(&status))
        }
        TenantAction::Migrate { name, to } => {
            let moved = client
                .migrate_tenant(MigrateTenantRequest { name, to })
                .await
                .map_err(fail)?
                .into_inner();
            (
                format!(
                    "moved tenant {} to {} at revision {}: {} keys, {} events, {} leases; writes \
                     refused for {} ms, {} ms in all\n",
                    moved.name,
                    moved.target,
                    moved.revision,
                    moved.keys,
                    moved.events,
                    moved.leases,
                    moved.freeze_window_ms,
                    moved.duration_ms
                ),
                json!({
                    "name": moved.name,
                    "target": moved.target,
                    "revision": moved.revision,
                    "keys": moved.keys,
                    "events": moved.events,
                    "leases": moved.leases,
                    "freeze_window_ms": moved.freeze_window_ms,
                    "duration_ms": moved.duration_ms,
                }),
            )
        }
        TenantAction::Delete { name, force } => {
            let response = client
                .delete_tenant(DeleteTenantRequest {
                    name: name.clone(),
                    force,
                })
                .await
                .map_err(fail)?
                .into_inner();
            (
                format!("deleted tenant {name}\n"),
                json!({ "name": name, "deleted": response.deleted }),
            )
        }
    };
    if json {
        println!("{value}");
    } else {
        print!("{text}");
    }
    Ok(())
}
