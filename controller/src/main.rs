//! `kine-rs-controller`: runs the controller (in a cluster, or outside it with the usual
//! kubeconfig resolution), or prints the CRDs (`kine-rs-controller crds`).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use std::time::Duration;

use kine_controller::Context;
use kine_controller::leader::LeaderElection;
use kine_controller::wiring::SidecarSettings;

#[derive(Debug, Parser)]
#[command(name = "kine-rs-controller", version, about)]
struct Cli {
    /// The kine-rs image of the sidecars the controller adds.
    #[arg(
        long,
        env = "KINE_SIDECAR_IMAGE",
        default_value = "ghcr.io/kine-rs/kine-rs:latest"
    )]
    sidecar_image: String,
    /// Their image pull policy.
    #[arg(
        long,
        env = "KINE_SIDECAR_IMAGE_PULL_POLICY",
        default_value = "IfNotPresent"
    )]
    sidecar_image_pull_policy: String,
    /// Their CPU request.
    #[arg(long, env = "KINE_SIDECAR_CPU_REQUEST", default_value = "50m")]
    sidecar_cpu_request: String,
    /// Their memory request.
    #[arg(long, env = "KINE_SIDECAR_MEMORY_REQUEST", default_value = "64Mi")]
    sidecar_memory_request: String,
    /// Their memory limit.
    #[arg(long, env = "KINE_SIDECAR_MEMORY_LIMIT", default_value = "256Mi")]
    sidecar_memory_limit: String,
    /// More kine-rs flags for every sidecar (repeatable).
    #[arg(long = "sidecar-arg", env = "KINE_SIDECAR_ARGS", value_delimiter = ' ')]
    sidecar_args: Vec<String>,
    /// Where to serve /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "KINE_CONTROLLER_HTTP_ADDRESS",
        default_value = "0.0.0.0:8080"
    )]
    http_address: SocketAddr,
    /// Log as JSON lines.
    #[arg(long, env = "KINE_CONTROLLER_LOG_JSON")]
    log_json: bool,
    /// Elect a leader among replicas with a Lease in this namespace (in a pod: its own
    /// namespace, `POD_NAMESPACE`); empty: no election (run one replica only).
    #[arg(
        long,
        env = "KINE_CONTROLLER_LEADER_ELECTION_NAMESPACE",
        default_value = ""
    )]
    leader_election_namespace: String,
    /// The Lease's name.
    #[arg(
        long,
        env = "KINE_CONTROLLER_LEADER_ELECTION_LEASE",
        default_value = "kine-rs-controller"
    )]
    leader_election_lease: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Prints the CustomResourceDefinitions (YAML).
    Crds,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Crds) = cli.command {
        print!("{}", kine_controller::crd::crds_yaml()?);
        return Ok(());
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if cli.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let client = kube::Client::try_default()
        .await
        .context("connecting to Kubernetes (in-cluster or kubeconfig)")?;
    let sidecar = SidecarSettings {
        image: cli.sidecar_image,
        image_pull_policy: cli.sidecar_image_pull_policy,
        cpu_request: cli.sidecar_cpu_request,
        memory_request: cli.sidecar_memory_request,
        memory_limit: cli.sidecar_memory_limit,
        extra_args: cli
            .sidecar_args
            .into_iter()
            .filter(|a| !a.is_empty())
            .collect(),
    };
    let ctx = Arc::new(Context::new(client.clone(), sidecar));
    let http = tokio::spawn(kine_controller::controller::serve_http(
        cli.http_address,
        ctx.clone(),
    ));
    let election = (!cli.leader_election_namespace.is_empty()).then(|| {
        let identity = std::env::var("POD_NAME")
            .unwrap_or_else(|_| format!("kine-rs-controller-{}", std::process::id()));
        LeaderElection::new(
            client,
            &cli.leader_election_namespace,
            &cli.leader_election_lease,
            &identity,
            Duration::from_secs(15),
        )
    });
    if let Some(election) = &election {
        election.acquire().await;
    }
    let keep = async {
        match &election {
            Some(election) => election.keep().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = kine_controller::controller::run(ctx) => Ok(()),
        () = keep => anyhow::bail!("lost the leader election lease; exiting so another replica leads"),
        served = http => {
            served.context("the HTTP server task")?.context("serving /metrics")?;
            Ok(())
        }
    }
}
