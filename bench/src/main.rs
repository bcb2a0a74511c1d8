//! `kine-load`: a load generator that speaks the etcd v3 gRPC API to any endpoint (kine-rs or
//! a real etcd), with kube-apiserver's request shapes. Every workload checks its answers, not
//! only their timing: a wrong answer counts as an error and is reported.
//!
//! ```sh
//! kine-load put --endpoints http://127.0.0.1:2379 --clients 16 --duration 10
//! kine-load txn-create --clients 128 --conns 8 --duration 5 --json
//! kine-load txn-update --clients 16 --keys 100
//! kine-load list --keys 10000 --val-size 1024 --page 500 --iterations 3
//! kine-load watch-latency --endpoints http://A --watch-endpoint http://B --rate 1000
//! kine-load pki --dir pki --clients 1000   # CA, server and tenant-NNNN client certificates
//! kine-load gateway-watch --endpoints https://127.0.0.1:2379 --pki-dir pki --tenants 1000 --hold 10
//! kine-load noisy-neighbour --endpoints https://127.0.0.1:2379 --pki-dir pki --clients 16 --server-pid PID
//! kine-load table --input results.jsonl     # the side-by-side Markdown table of run.sh
//! kine-load refusals --endpoints http://127.0.0.1:2379 --rate 500   # writes refused by a freeze
//! ```
//!
//! Every run is bounded: it stops after `--duration` seconds or `--total` operations,
//! whichever comes first.

mod gateway;
mod noisy;
mod refusals;
mod report;
mod workloads;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use tonic::transport::{Channel, Endpoint};

#[derive(Parser, Debug)]
#[command(
    name = "kine-load",
    about = "etcd v3 API load generator that verifies its answers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Puts of unique keys; checks every key landed (a count of the prefix at the end).
    Put(Opts),
    /// kube-apiserver's create: Txn(mod_revision(key) = 0, put, else get) on fresh keys.
    TxnCreate(Opts),
    /// kube-apiserver's update: get, then Txn(mod_revision = seen, put, else get), retried on
    /// conflict, over `--keys` keys; checks the sum of key versions against the successes.
    TxnUpdate(Opts),
    /// Loads `--keys` keys once, then lists the prefix paginated by `--page` at a fixed
    /// revision, following `more`; checks the count, order and uniqueness of the keys.
    List(Opts),
    /// Puts through `--endpoints` at `--rate` writes/s, watches through `--watch-endpoint`;
    /// reports acknowledgement-to-event delay and missing/duplicate/out-of-order revisions.
    WatchLatency(Opts),
    /// A gateway's tenants: `--tenants` clients, each with its own client certificate (common
    /// name = tenant, from `--pki-dir`) and connection, open one watch each, write one key
    /// each, and check every watch gets its own tenant's event and nothing else; then the
    /// watches stay open `--hold` seconds (sample the server's memory meanwhile). `--duration`
    /// bounds opening and writing. Without `--pki-dir`, the watches share `--conns` plain
    /// connections; `--no-tenants` (etcd) gives each tenant a prefix of its own instead.
    GatewayWatch(gateway::GatewayOpts),
    /// Tenant B's creates at `--clients` clients, alone and then while tenant A runs the worst
    /// load the API allows (keep-alive flood, huge-range transactions, thousands of watches,
    /// watchers that never read under 1 MiB values); B's throughput and latency in both phases
    /// and the server's memory (`--server-pid`). A gateway with `--pki-dir` (A = tenant-0000,
    /// B = tenant-0001), or two prefixes with `--no-tenants`.
    NoisyNeighbour(noisy::NoisyOpts),
    /// Writes a throwaway PKI for `gateway-watch` into `--dir`: `ca.pem`, `server.pem` and
    /// `server-key.pem` (for `localhost` and 127.0.0.1), and `tenant-NNNN.pem` and
    /// `tenant-NNNN-key.pem` (common name `tenant-NNNN`) for `--clients` tenants.
    Pki {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 1000)]
        clients: usize,
    },
    /// Txns at `--rate` a second until `--duration` or SIGTERM, then one JSON line: how many
    /// were refused as "frozen" (and the window from the first such request to the last
    /// answer), refused as "moved", failed otherwise, and acknowledged (with latencies): the
    /// freeze window of a migration as a client sees it.
    Refusals(refusals::RefusalOpts),
    /// Reads JSON reports (one per line, from `--json` runs with `--target` and `--label`)
    /// and prints the side-by-side Markdown table with ratios to the `etcd` target.
    Table {
        #[arg(long)]
        input: PathBuf,
    },
}

/// Options shared by the workloads (each uses the ones that apply to it).
#[derive(Args, Debug, Clone)]
pub struct Opts {
    /// Endpoints to send requests to (comma-separated); connections go round-robin.
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    pub endpoints: Vec<String>,
    /// Endpoint the watch-latency workload watches through (default: the first endpoint).
    #[arg(long)]
    pub watch_endpoint: Option<String>,
    /// Concurrent clients (each has one request in flight at a time).
    #[arg(long, default_value_t = 1)]
    pub clients: usize,
    /// gRPC connections the clients share.
    #[arg(long, default_value_t = 1)]
    pub conns: usize,
    /// Seconds to run (the list workload: at most this long for its iterations after loading).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Stop after this many operations (whichever comes first with `--duration`).
    #[arg(long)]
    pub total: Option<u64>,
    /// Key size in bytes (keys are padded to it).
    #[arg(long, default_value_t = 32)]
    pub key_size: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 256)]
    pub val_size: usize,
    /// Keys of txn-update and list.
    #[arg(long, default_value_t = 100)]
    pub keys: usize,
    /// put: write keys drawn at random from this many (under a fixed `--prefix`, so that
    /// repeated runs overwrite keys with history, as kube-apiserver's updates do) instead of
    /// fresh keys.
    #[arg(long)]
    pub key_space: Option<u64>,
    /// Page size (Range limit) of the list workload.
    #[arg(long, default_value_t = 500)]
    pub page: i64,
    /// Full lists to time in the list workload.
    #[arg(long, default_value_t = 3)]
    pub iterations: u64,
    /// The list workload reads each page with etcd 3.7's RangeStream instead of Range, as
    /// kube-apiserver 1.37 does.
    #[arg(long)]
    pub stream: bool,
    /// Seconds the list workload may spend loading its keys before it gives up (bounded runs
    /// on slow targets); the report then says how many keys it loaded.
    #[arg(long, default_value_t = 120.0)]
    pub load_timeout: f64,
    /// Writes per second of the watch-latency workload.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Key prefix (default: a fresh random prefix per run).
    #[arg(long)]
    pub prefix: Option<String>,
    /// Name of the system under test, for the report (e.g. `etcd`, `sqlite`).
    #[arg(long, default_value = "target")]
    pub target: String,
    /// Name of this measurement point, for the report (default: workload and clients).
    #[arg(long)]
    pub label: Option<String>,
    /// The target this point is measured against, for the side-by-side table.
    #[arg(long)]
    pub goal: Option<String>,
    /// Print the report as one JSON line instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl Opts {
    /// The key prefix of this run.
    pub fn prefix(&self, workload: &str) -> String {
        self.prefix.clone().unwrap_or_else(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            format!(
                "/kine-load/{workload}/{:x}/",
                nanos ^ u128::from(std::process::id())
            )
        })
    }

    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration.max(0.0))
    }
}

/// Opens `count` connections, spread over `endpoints`.
pub async fn connect(endpoints: &[String], count: usize) -> Result<Vec<Channel>> {
    let mut channels = Vec::with_capacity(count.max(1));
    for i in 0..count.max(1) {
        let url = &endpoints[i % endpoints.len()];
        let channel = Endpoint::from_shared(url.clone())
            .with_context(|| format!("bad endpoint {url}"))?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connecting to {url}"))?;
        channels.push(channel);
    }
    Ok(channels)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut gateway_opts = None;
        let mut noisy_opts = None;
        let (name, opts) = match cli.command {
            Command::Table { input } => {
                print!("{}", report::table(&input)?);
                return Ok(());
            }
            Command::Refusals(r) => return refusals::refusals(&r).await,
            Command::Put(o) => ("put", o),
            Command::TxnCreate(o) => ("txn-create", o),
            Command::TxnUpdate(o) => ("txn-update", o),
            Command::List(o) => ("list", o),
            Command::WatchLatency(o) => ("watch-latency", o),
            Command::Pki { dir, clients } => {
                let start = std::time::Instant::now();
                gateway::write_pki(&dir, clients)?;
                eprintln!(
                    "kine-load: CA, server and {clients} client certificates in {} ({:.2} s)",
                    dir.display(),
                    start.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            Command::GatewayWatch(g) => {
                let mut opts = g.opts.clone();
                opts.clients = g.tenants;
                if g.pki_dir.is_some() {
                    opts.conns = g.tenants;
                }
                gateway_opts = Some(g);
                ("gateway-watch", opts)
            }
            Command::NoisyNeighbour(n) => {
                let opts = n.opts.clone();
                noisy_opts = Some(n);
                ("noisy-neighbour", opts)
            }
        };
        if opts.endpoints.is_empty() {
            anyhow::bail!("no --endpoints");
        }
        let report = match (gateway_opts, noisy_opts) {
            (Some(g), _) => gateway::gateway_watch(&g).await?,
            (_, Some(n)) => noisy::noisy_neighbour(&n).await?,
            _ => match name {
                "put" => workloads::put(&opts).await?,
                "txn-create" => workloads::txn_create(&opts).await?,
                "txn-update" => workloads::txn_update(&opts).await?,
                "list" => workloads::list(&opts).await?,
                _ => workloads::watch_latency(&opts).await?,
            },
        };
        let report = report.finish(name, &opts);
        if opts.json {
            println!("{}", report.to_json());
        } else {
            print!("{}", report.to_text());
        }
        if report.errors > 0 {
            eprintln!(
                "kine-load: {} error(s); first: {}",
                report.errors,
                report.first_error.as_deref().unwrap_or("?")
            );
        }
        Ok(())
    })
}
