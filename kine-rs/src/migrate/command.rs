//! `kine-rs migrate`: the command line of the migration engine.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use serde_json::json;

use super::etcd_prefix::EtcdPrefixSource;
use super::etcd_tenant::EtcdTenantSource;
use super::kine_schema::{KineSource, is_kine_endpoint};
use super::{BackendSource, Options, Phase, Progress, Source, Summary};
use crate::run::redact_endpoint;
use crate::storage::{self, Backend, BackendOptions, MigrationRole};
use crate::tenants::validate_name;

/// `kine-rs migrate`: what to move, from where to where.
#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// The datastore the tenant is in, as `--endpoint` names it (an etcd cluster,
    /// `etcd://HOST:PORT[,HOST:PORT]`, is read as the etcd proxy's tenant `--tenant`); or
    /// kine's own table (`kine+postgres://…`, `kine+mysql://…`, `kine+sqlite://PATH`); or a
    /// plain etcd's keys under `--from-prefix`.
    #[arg(long)]
    pub from: String,

    /// With an etcd `--from`: the prefix whose keys move (the apiserver's `--etcd-prefix`,
    /// e.g. `/tenant1`); keys arrive without it.
    #[arg(long)]
    pub from_prefix: Option<String>,

    /// With an etcd `--from` and no `--from-prefix`: where the etcd proxy keeps its tenants'
    /// keys, as the proxy's `--etcd-tenant-prefix` says (`{tenant}` stands for `--tenant`).
    #[arg(long, default_value = "/{tenant}/")]
    pub etcd_tenant_prefix: String,

    /// With a `kine+…` `--from`: the name of kine's table.
    #[arg(long, default_value = "kine")]
    pub from_kine_table: String,

    /// The writers of a source kine-rs cannot freeze (a plain etcd) are stopped: cut over.
    /// Without it such a migration copies and stops before the freeze (a rerun with it
    /// resumes). A write seen after the freeze point still aborts the switch.
    #[arg(long)]
    pub source_writers_stopped: bool,

    /// The datastore to move it to, as `--endpoint` names it (SQLite, PostgreSQL, MySQL,
    /// NATS; not etcd, which cannot keep the tenant's revisions).
    #[arg(long)]
    pub to: String,

    /// The tenant to move; `default` is the keyspace of a kine-rs without tenants.
    #[arg(long, default_value = crate::run::DEFAULT_KEYSPACE, conflicts_with = "all_tenants")]
    pub tenant: String,

    /// Move every tenant of the source datastore, one after the other.
    #[arg(long)]
    pub all_tenants: bool,

    /// Print what would be moved (keys, bytes, history, leases, an estimate of the time) and
    /// change nothing.
    #[arg(long, conflicts_with = "abort")]
    pub dry_run: bool,

    /// Roll an unfinished migration back: the source writable and unpinned, the target's
    /// partial import deleted. A finished migration is not undone.
    #[arg(long)]
    pub abort: bool,

    /// How to print progress: a progress line on a terminal, JSON lines otherwise.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Auto)]
    pub output: Output,

    /// Keys copied per snapshot page (bounds memory with the largest values).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(i64).range(1..=100_000))]
    pub page_keys: i64,

    /// Bytes of keys and values a page of the snapshot, a window of events or a page of the
    /// digests holds at most (one key or revision always): with --page-keys and
    /// --window-revisions, what bounds the memory of the migration (default 4 MiB).
    #[arg(long, default_value_t = super::PAGE_BYTES as u64, value_parser = clap::value_parser!(u64).range(1024..=1 << 30))]
    pub page_bytes: u64,

    /// Revisions copied per window of events.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(i64).range(1..=100_000))]
    pub window_revisions: i64,

    /// Freeze the source once the copy is at most this many revisions behind.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(0..=1_000_000))]
    pub freeze_lag: i64,
}

/// How `kine-rs migrate` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Text on a terminal, JSON lines otherwise.
    Auto,
    Text,
    Json,
}

/// Runs `kine-rs migrate`.
pub async fn run(args: MigrateArgs) -> anyhow::Result<()> {
    let json = match args.output {
        Output::Json => true,
        Output::Text => false,
        Output::Auto => !std::io::stdout().is_terminal(),
    };
    if !args.all_tenants {
        validate_name(&args.tenant).map_err(|e| anyhow::anyhow!("--tenant: {e}"))?;
    }
    let (mut source_name, target_name) = (redact_endpoint(&args.from), redact_endpoint(&args.to));
    if crate::etcd_proxy::is_etcd_endpoint(&args.to) {
        bail!(
            "--to {target_name}: an etcd cluster cannot be a migration target: etcd gives every              write a revision of its own, so the tenant's revisions, create revisions and              versions cannot be kept (every client would have to relist and every watch start              over), and importing with new revisions (--allow-new-revisions) is not supported              yet"
        );
    }
    if let Some(prefix) = &args.from_prefix {
        source_name = format!("{source_name} (prefix {prefix})");
    }
    if source_name == target_name {
        bail!("--from and --to name the same datastore ({source_name})");
    }
    let source = open_source(&args).await?;
    let target = open(&args.to, "--to").await?;

    let tenants = match &source {
        Opened::Backend(backend) if args.all_tenants => backend
            .keyspaces()
            .await
            .context("listing the source's tenants")?
            .into_iter()
            .filter(|(_, state)| state.migration != MigrationRole::Moved)
            .map(|(name, _)| name)
            .collect(),
        Opened::Backend(_) => vec![args.tenant.clone()],
        _ if args.all_tenants => {
            bail!(
                "--all-tenants: kine's table and an etcd prefix hold one tenant, and the etcd                  proxy's tenants move one at a time; name it with --tenant"
            )
        }
        _ => vec![args.tenant.clone()],
    };
    for tenant in tenants {
        let backend_source;
        let source: &dyn Source = match &source {
            Opened::Backend(backend) => {
                backend_source = BackendSource::open(&**backend, &tenant)
                    .await
                    .with_context(|| format!("reading tenant {tenant:?} of the source"))?
                    .ok_or_else(|| super::MigrateError::UnknownTenant(tenant.clone()))?;
                &backend_source
            }
            Opened::Kine(kine) => &**kine,
            Opened::Etcd(etcd) => &**etcd,
            Opened::EtcdTenant(etcd) => &**etcd,
        };
        if args.dry_run {
            let plan = super::plan_from(source, &tenant).await?;
            let freeze = freeze_note(source);
            if json {
                print_json(json!({
                    "event": "plan",
                    "tenant": plan.tenant,
                    "from": source_name,
                    "source": source.describe(),
                    "to": target_name,
                    "keys": plan.keys,
                    "bytes": plan.bytes,
                    "revision": plan.revision,
                    "compact_revision": plan.compact_revision,
                    "history_revisions": plan.history_revisions,
                    "leases": plan.leases,
                    "frozen": plan.frozen,
                    "freeze": freeze,
                    "estimated_seconds": plan.estimated.as_secs_f64(),
                }));
            } else {
                println!(
                    "tenant {:?} ({}): {} keys ({}), revision {} (compacted at {}), {} revisions \
                     of history to replay, {} leases{}; about {} to move from {source_name} to \
                     {target_name}. Freeze: {freeze}. Nothing was changed (--dry-run).",
                    plan.tenant,
                    source.describe(),
                    plan.keys,
                    human_bytes(plan.bytes.max(0) as u64),
                    plan.revision,
                    plan.compact_revision,
                    plan.history_revisions,
                    plan.leases,
                    if plan.frozen { "; frozen" } else { "" },
                    human_duration(plan.estimated),
                );
            }
            continue;
        }
        if args.abort {
            let aborted = super::abort_from(source, &*target, &tenant).await?;
            if json {
                print_json(json!({
                    "event": "aborted",
                    "tenant": tenant,
                    "source_released": aborted.source_released,
                    "import_removed": aborted.import_removed,
                }));
            } else {
                println!(
                    "tenant {tenant:?}: {}; {}",
                    if aborted.source_released {
                        "the source is writable again and unpinned"
                    } else {
                        "the source was not migrating"
                    },
                    if aborted.import_removed {
                        "the target's partial import was deleted"
                    } else {
                        "the target held no partial import"
                    }
                );
            }
            continue;
        }
        let options = Options {
            target_name: target_name.clone(),
            source_name: source_name.clone(),
            page_keys: args.page_keys,
            window_revisions: args.window_revisions,
            page_bytes: usize::try_from(args.page_bytes).unwrap_or(usize::MAX),
            freeze_lag: args.freeze_lag,
            writers_stopped: args.source_writers_stopped,
            ..Options::new(&tenant)
        };
        let mut printer = ProgressPrinter::new(json);
        let result = super::run_from(source, &*target, &options, &mut |p| printer.show(p)).await;
        printer.finish();
        let summary = result?;
        print_summary(&summary, &source_name, &target_name, json);
    }
    Ok(())
}

/// The source a `--from` names.
enum Opened {
    Backend(Arc<dyn Backend>),
    Kine(Box<KineSource>),
    Etcd(Box<EtcdPrefixSource>),
    EtcdTenant(Box<EtcdTenantSource>),
}

async fn open_source(args: &MigrateArgs) -> anyhow::Result<Opened> {
    let name = redact_endpoint(&args.from);
    if is_kine_endpoint(&args.from) {
        if args.from_prefix.is_some() {
            bail!("--from-prefix is for an etcd --from, not kine's table");
        }
        return Ok(Opened::Kine(Box::new(
            KineSource::open(&args.from, &args.from_kine_table)
                .await
                .map_err(|e| anyhow::anyhow!("--from {name}: {e}"))?,
        )));
    }
    if crate::etcd_proxy::is_etcd_endpoint(&args.from) {
        let Some(prefix) = &args.from_prefix else {
            if args.all_tenants {
                bail!(
                    "--all-tenants: the etcd proxy's tenants move one at a time; name one with \
                     --tenant"
                );
            }
            return Ok(Opened::EtcdTenant(Box::new(
                EtcdTenantSource::open(&args.from, &args.etcd_tenant_prefix, &args.tenant)
                    .await
                    .map_err(|e| anyhow::anyhow!("--from {name}: {e}"))?,
            )));
        };
        return Ok(Opened::Etcd(Box::new(
            EtcdPrefixSource::open(&args.from, prefix)
                .await
                .map_err(|e| anyhow::anyhow!("--from {name}: {e}"))?,
        )));
    }
    if args.from_prefix.is_some() {
        bail!("--from-prefix is for an etcd --from (etcd://HOST:PORT)");
    }
    if args.etcd_tenant_prefix != "/{tenant}/" {
        bail!("--etcd-tenant-prefix is for an etcd --from (etcd://HOST:PORT)");
    }
    Ok(Opened::Backend(open(&args.from, "--from").await?))
}

/// How the source is frozen for the cut-over, for the plan.
fn freeze_note(source: &dyn Source) -> &'static str {
    if source.needs_stopped_writers() {
        "kine-rs cannot freeze a plain etcd: stop the tenant's writers and pass \
         --source-writers-stopped; a write after the freeze point aborts the switch"
    } else {
        "writes refused by the datastore itself for the final catch-up, then the source is \
         marked moved"
    }
}

async fn open(endpoint: &str, flag: &str) -> anyhow::Result<Arc<dyn Backend>> {
    if endpoint.starts_with("memory:") {
        bail!("{flag}: a memory:// datastore lives inside one process; name a datastore to keep");
    }
    storage::open(endpoint, &BackendOptions::default())
        .await
        .map_err(|e| anyhow::anyhow!("{flag} {}: {e}", redact_endpoint(endpoint)))
}

fn print_json(value: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

/// Prints progress: JSON lines, or one line rewritten in place on a terminal, at most a few
/// times a second (and at every change of phase).
struct ProgressPrinter {
    json: bool,
    last: Option<(Instant, Phase)>,
    line_open: bool,
}

impl ProgressPrinter {
    fn new(json: bool) -> Self {
        ProgressPrinter {
            json,
            last: None,
            line_open: false,
        }
    }

    fn show(&mut self, p: &Progress) {
        let now = Instant::now();
        if let Some((at, phase)) = self.last
            && phase == p.phase
            && now.duration_since(at) < Duration::from_millis(250)
        {
            return;
        }
        self.last = Some((now, p.phase));
        let seconds = p.elapsed.as_secs_f64().max(0.001);
        let rate = (p.keys + p.events) as f64 / seconds;
        let remaining = p.keys_total.saturating_sub(p.keys) as f64 + p.lag() as f64;
        let eta = Duration::from_secs_f64(if rate > 0.0 { remaining / rate } else { 0.0 });
        if self.json {
            print_json(json!({
                "event": "progress",
                "tenant": p.tenant,
                "phase": p.phase.name(),
                "keys": p.keys,
                "keys_total": p.keys_total,
                "bytes": p.bytes,
                "events": p.events,
                "applied_revision": p.applied_revision,
                "source_revision": p.source_revision,
                "lag": p.lag(),
                "rate_per_second": rate.round(),
                "elapsed_seconds": seconds,
                "eta_seconds": eta.as_secs_f64(),
            }));
            return;
        }
        let width = 24usize;
        let done = if p.keys_total == 0 {
            1.0
        } else {
            (p.keys as f64 / p.keys_total as f64).min(1.0)
        };
        let filled = (done * width as f64) as usize;
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r{:<8} [{}{}] {} / {} keys, {} events, {}, {:.0}/s, lag {}, ETA {}   ",
            p.phase.name(),
            "#".repeat(filled),
            ".".repeat(width - filled),
            p.keys,
            p.keys_total,
            p.events,
            human_bytes(p.bytes),
            rate,
            p.lag(),
            human_duration(eta),
        );
        let _ = err.flush();
        self.line_open = true;
    }

    fn finish(&mut self) {
        if self.line_open {
            eprintln!();
        }
    }
}

fn print_summary(summary: &Summary, from: &str, to: &str, json: bool) {
    let seconds = summary.duration.as_secs_f64().max(0.001);
    if json {
        print_json(json!({
            "event": "summary",
            "tenant": summary.tenant,
            "from": from,
            "to": to,
            "duration_seconds": seconds,
            "keys": summary.keys,
            "bytes": summary.bytes,
            "events": summary.events,
            "leases": summary.leases,
            "keys_per_second": ((summary.keys + summary.events) as f64 / seconds).round(),
            "freeze_window_ms": summary.freeze_window.as_secs_f64() * 1000.0,
            "revision": summary.revision,
            "compact_revision": summary.compact_revision,
            "digest": summary.digest.to_string(),
            "resumed": summary.resumed,
            "largest_page_bytes": summary.largest_page_bytes,
            // Where the time went: every datastore query of this process so far, by kind
            // (the source's and the target's run side by side, so the sums overlap).
            "queries": crate::metrics::sql_totals()
                .into_iter()
                .map(|(driver, query, count, seconds)| json!({
                    "driver": driver, "query": query, "count": count, "seconds": seconds,
                }))
                .collect::<Vec<_>>(),
        }));
    } else {
        println!(
            "tenant {:?} moved from {from} to {to}{}: {} keys and {} events ({}) in {}, {:.0} \
             keys/s; {} leases; writes were refused for {:.0} ms; revision {} (compacted at \
             {}), verified: {}",
            summary.tenant,
            if summary.resumed { " (resumed)" } else { "" },
            summary.keys,
            summary.events,
            human_bytes(summary.bytes),
            human_duration(summary.duration),
            (summary.keys + summary.events) as f64 / seconds,
            summary.leases,
            summary.freeze_window.as_secs_f64() * 1000.0,
            summary.revision,
            summary.compact_revision,
            summary.digest,
        );
    }
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn human_duration(duration: Duration) -> String {
    let seconds = duration.as_secs_f64();
    if seconds < 60.0 {
        format!("{seconds:.1}s")
    } else {
        format!(
            "{}m{:02}s",
            (seconds / 60.0) as u64,
            (seconds % 60.0) as u64
        )
    }
}
