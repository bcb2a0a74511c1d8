//! `kine-load refusals`: write transactions at a fixed rate while a tenant is migrated, and
//! measure the window in which writes were refused as "frozen for maintenance" (issue 9's
//! freeze window, seen from a client). Writes refused because the tenant has moved (a CLI
//! migration leaves the source refusing for good) are counted apart, and make a second
//! window with the frozen ones (for a gateway, which refuses as moved until it switches).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bytes::Bytes;
use clap::Args;
use kine_proto::etcdserverpb::request_op::Request;
use kine_proto::etcdserverpb::{PutRequest, RequestOp, TxnRequest};
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Mutex;

use crate::connect;
use crate::gateway::Access;
use crate::workloads::kv_client;

#[derive(Args, Debug, Clone)]
pub struct RefusalOpts {
    /// The endpoint to write to (the first one is used).
    #[arg(long, value_delimiter = ',', required = true)]
    pub endpoints: Vec<String>,
    /// Write transactions per second (each a Txn with one put of a fresh key).
    #[arg(long, default_value_t = 500)]
    pub rate: u64,
    /// Stop after this many seconds (or at SIGINT/SIGTERM, whichever comes first).
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 128)]
    pub val_size: usize,
    /// Key prefix.
    #[arg(long, default_value = "/kine-load/refusals/")]
    pub prefix: String,
    /// Connect over mTLS as tenant `tenant-0000` with the certificates `kine-load pki` wrote
    /// in this directory (a gateway).
    #[arg(long)]
    pub pki_dir: Option<PathBuf>,
    /// The server name to verify (default: the endpoint's host).
    #[arg(long)]
    pub tls_domain: Option<String>,
    /// Before writing at `--rate`: put this many keys of `--val-size` bytes under
    /// `PREFIX/preload/` (32 at a time), so the tenant has something to copy.
    #[arg(long, default_value_t = 0)]
    pub preload: u64,
}

/// What happened to one write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Acked,
    Frozen,
    Moved,
    Failed,
}

/// Writes until the deadline or a signal, then prints one JSON line.
pub async fn refusals(opts: &RefusalOpts) -> Result<()> {
    if opts.rate == 0 {
        bail!("--rate must be positive");
    }
    let channel = match &opts.pki_dir {
        Some(dir) => {
            Access::tls(&opts.endpoints, dir, opts.tls_domain.clone())?
                .channel(0)
                .await?
        }
        None => connect(&opts.endpoints[..1], 1).await?.remove(0),
    };
    let value = Bytes::from(vec![b'v'; opts.val_size]);
    if opts.preload > 0 {
        let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut loaders = Vec::new();
        for _ in 0..32 {
            let (mut kv, next, value) = (kv_client(&channel), next.clone(), value.clone());
            let prefix = format!("{}preload/", opts.prefix);
            let total = opts.preload;
            loaders.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= total {
                        return Ok::<_, tonic::Status>(());
                    }
                    let key = Bytes::from(format!("{prefix}{i:012}"));
                    kv.put(PutRequest {
                        key,
                        value: value.clone(),
                        ..Default::default()
                    })
                    .await?;
                }
            }));
        }
        for loader in loaders {
            loader.await??;
        }
    }
    // A script waits for this line before it starts the migration.
    eprintln!("kine-load: writing at {} txns/s", opts.rate);
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let deadline = tokio::time::sleep(Duration::from_secs_f64(opts.duration.max(0.0)));
    tokio::pin!(deadline);
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / opts.rate as f64));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let outcomes: Arc<Mutex<Vec<(Instant, Instant, Outcome)>>> = Arc::default();
    let first_error_slot: Arc<Mutex<Option<String>>> = Arc::default();
    let start = Instant::now();
    let mut tasks = Vec::new();
    let mut seq = 0u64;
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = ticks.tick() => {}
        }
        let mut kv = kv_client(&channel);
        let key = Bytes::from(format!("{}{seq:012}", opts.prefix));
        seq += 1;
        let (value, outcomes, first_error) =
            (value.clone(), outcomes.clone(), first_error_slot.clone());
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let txn = TxnRequest {
                success: vec![RequestOp {
                    request: Some(Request::RequestPut(PutRequest {
                        key,
                        value,
                        ..Default::default()
                    })),
                }],
                ..Default::default()
            };
            let outcome = match kv.txn(txn).await {
                Ok(_) => Outcome::Acked,
                Err(status) => {
                    let message = status.message().to_string();
                    if status.code() == tonic::Code::FailedPrecondition
                        && message.contains("frozen")
                    {
                        Outcome::Frozen
                    } else if message.contains("moved") {
                        Outcome::Moved
                    } else {
                        first_error.lock().await.get_or_insert(message);
                        Outcome::Failed
                    }
                }
            };
            outcomes.lock().await.push((sent, Instant::now(), outcome));
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let first_error = first_error_slot.lock().await.take();
    let mut outcomes = std::mem::take(&mut *outcomes.lock().await);
    outcomes.sort_by_key(|(sent, _, _)| *sent);
    let count = |o: Outcome| outcomes.iter().filter(|(_, _, x)| *x == o).count();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    // The window: from the first refused write's request to the last one's answer; frozen
    // only (a CLI migration's source refuses as moved for good), or frozen or moved (a
    // gateway that has not switched yet refuses as moved until it does).
    let window = |refused: &dyn Fn(Outcome) -> bool| {
        let mut them = outcomes.iter().filter(|(_, _, o)| refused(*o));
        let first = them.next();
        let last = them.last().or(first);
        match (first, last) {
            (Some(first), Some(last)) => ms(last.1.duration_since(first.0)),
            _ => 0.0,
        }
    };
    let frozen_window = window(&|o| o == Outcome::Frozen);
    let any_window = window(&|o| o == Outcome::Frozen || o == Outcome::Moved);
    // Acknowledged writes' latencies: a freeze that held writes instead of refusing them
    // would show here.
    let mut latencies: Vec<f64> = outcomes
        .iter()
        .filter(|(_, _, o)| *o == Outcome::Acked)
        .map(|(sent, done, _)| ms(done.duration_since(*sent)))
        .collect();
    latencies.sort_by(f64::total_cmp);
    let quantile = |q: f64| {
        if latencies.is_empty() {
            0.0
        } else {
            latencies[((latencies.len() - 1) as f64 * q).round() as usize]
        }
    };
    println!(
        "{}",
        json!({
            "workload": "refusals",
            "seconds": start.elapsed().as_secs_f64(),
            "writes": outcomes.len(),
            "acked": count(Outcome::Acked),
            "refused_frozen": count(Outcome::Frozen),
            "refused_moved": count(Outcome::Moved),
            "failed": count(Outcome::Failed),
            "first_error": first_error,
            "refused_window_ms": frozen_window,
            "refused_or_moved_window_ms": any_window,
            "acked_latency_p50_ms": quantile(0.5),
            "acked_latency_p99_ms": quantile(0.99),
            "acked_latency_max_ms": latencies.last().copied().unwrap_or(0.0),
        })
    );
    Ok(())
}
