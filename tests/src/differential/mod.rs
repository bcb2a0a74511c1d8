//! Differential testing: the same random operation sequences run against a real etcd (the
//! oracle) and against a target — kine-rs, or a second etcd to validate the harness itself —
//! and every response is compared, ignoring only what legitimately differs (see
//! [`compare`]'s and [`watch`]'s module comments, which list each ignored difference and the
//! one named etcd bug the harness does not copy).
//!
//! Environment:
//! - `DIFF_SEED`: the seed (decimal or 0x-hex); `random` picks one. Default: a fixed seed, so
//!   CI is reproducible. The seed is always printed.
//! - `DIFF_OPS`: the number of top-level operations (default 10,000).
//! - `DIFF_TARGET`: `kine-rs` (default; on `DIFF_BACKEND` = `memory` (default), `sqlite`, `postgres` or
//!   `mysql`), `proxy` (kine-rs's etcd proxy in front of a private etcd; its revisions are
//!   mapped to the oracle's, see [`revmap`])
//!   or `etcd` (a second etcd: must give zero mismatches, which validates the normalization).
//! - `DIFF_TRACE`: print every operation as it runs.
//! - `ETCD_BIN`: the oracle etcd (default: `etcd` on PATH, which should be 3.5.1).

mod compare;
mod ops;
mod revmap;
mod server;
mod watch;

use std::collections::VecDeque;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use kine_proto::etcdserverpb::alarm_request::AlarmAction;
use kine_proto::etcdserverpb::{
    AlarmRequest, DefragmentRequest, LeaseLeasesRequest, RangeRequest, ResponseHeader,
    WatchCreateRequest,
};

pub use crate::spawn_etcd_with;
use crate::{Backend, ChildGuard};
use compare::{Outcome, outcome, same};
use ops::{Ctx, Gen, Op};
use revmap::RevisionMap;
use server::{Clients, call};
use watch::{GlobalLog, SideWatches, WATCH_WAIT, WatchSpec};

/// How long servers get to catch up a watch that starts in the past and has nothing to deliver,
/// before a compaction (etcd's catch-up loop runs every 100ms).
const CATCH_UP_GRACE: Duration = Duration::from_millis(400);

/// The seed used when `DIFF_SEED` is not set.
pub const DEFAULT_SEED: u64 = 0x006b_696e_652d_7273;

/// What a differential run compares etcd with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// kine-rs on a backend.
    KineRs(Backend),
    /// A second real etcd (validates the harness: must never mismatch).
    Etcd,
    /// kine-rs's etcd proxy (tenant `t`) in front of a private etcd: revisions are mapped
    /// ([`revmap`]).
    EtcdProxy,
}

/// A differential run's settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub seed: u64,
    pub ops: usize,
    pub target: Target,
    /// Print every operation (`DIFF_TRACE=1`).
    pub trace: bool,
}

impl Config {
    /// Reads `DIFF_SEED`, `DIFF_OPS`, `DIFF_TARGET` and `DIFF_BACKEND`.
    pub fn from_env() -> anyhow::Result<Config> {
        let seed = match std::env::var("DIFF_SEED") {
            Err(_) => DEFAULT_SEED,
            Ok(s) if s == "random" => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .context("clock before 1970")?
                    .as_nanos();
                (nanos as u64) ^ u64::from(std::process::id()).rotate_left(32)
            }
            Ok(s) => match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            }
            .with_context(|| format!("DIFF_SEED={s:?} is not a number"))?,
        };
        let ops = match std::env::var("DIFF_OPS") {
            Err(_) => 10_000,
            Ok(s) => s
                .parse()
                .with_context(|| format!("DIFF_OPS={s:?} is not a number"))?,
        };
        let backend = match std::env::var("DIFF_BACKEND").as_deref() {
            Err(_) | Ok("memory") => Backend::Memory,
            Ok("sqlite") => Backend::Sqlite,
            Ok("postgres") => Backend::Postgres,
            Ok("mysql") => Backend::Mysql,
            Ok("nats") => Backend::Nats,
            Ok(other) => anyhow::bail!(
                "DIFF_BACKEND={other:?}: expected memory, sqlite, postgres, mysql or nats"
            ),
        };
        let target = match std::env::var("DIFF_TARGET").as_deref() {
            Err(_) | Ok("kine-rs") | Ok("kine") => Target::KineRs(backend),
            Ok("etcd") => Target::Etcd,
            Ok("proxy") => Target::EtcdProxy,
            Ok(other) => anyhow::bail!("DIFF_TARGET={other:?}: expected kine-rs, proxy or etcd"),
        };
        let trace = std::env::var_os("DIFF_TRACE").is_some();
        Ok(Config {
            seed,
            ops,
            target,
            trace,
        })
    }

    fn target_name(&self) -> String {
        match self.target {
            Target::KineRs(backend) => format!("kine-rs ({backend:?} backend)"),
            Target::Etcd => "a second etcd".to_string(),
            Target::EtcdProxy => "kine-rs's etcd proxy".to_string(),
        }
    }
}

/// What a passing run did.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub ops: usize,
    pub errors_compared: usize,
    pub watches: usize,
    pub events_compared: usize,
    pub final_revision: i64,
    /// Watch comparisons that waited [`WATCH_WAIT`] in vain (the comparison then decides).
    pub wait_timeouts: usize,
    /// DELETE events etcd dropped by the named exception, added back to its side.
    pub exception_events: usize,
    /// Waits for events the named etcd exception may or may not drop.
    pub exception_waits: usize,
    /// Waits before a compaction for servers to catch up recent watches.
    pub catch_up_waits: usize,
    pub elapsed: Duration,
}

/// The servers of a run; dropped (killed) at its end.
enum TargetProcess {
    /// kine-rs, and its log.
    Kine(ChildGuard, std::path::PathBuf),
    Etcd(crate::ChildGuard),
    /// kine-rs (dropped first), then the etcd behind it.
    Proxy {
        kine: ChildGuard,
        _etcd: Box<ChildGuard>,
    },
}

impl TargetProcess {
    fn endpoint(&self) -> &str {
        match self {
            TargetProcess::Kine(g, _) => &g.endpoint,
            TargetProcess::Etcd(g) => &g.endpoint,
            TargetProcess::Proxy { kine, .. } => &kine.endpoint,
        }
    }
}

/// etcd behind the proxy: as fast as the oracle, and with room for the operations of the
/// transaction guarding a client's (README, "The etcd proxy").
const PROXIED_ETCD: &[&str] = &[
    "--unsafe-no-fsync",
    "--snapshot-count",
    "1000000",
    "--max-txn-ops",
    "256",
];

fn spawn_proxy() -> TargetProcess {
    let etcd = spawn_etcd_with(PROXIED_ETCD);
    let kine = crate::spawn_kine_on(
        &format!("etcd://{}", etcd.address),
        tempfile::tempdir().expect("tempdir"),
        &["--tenant", "t", "--compact-interval", "0"],
    );
    TargetProcess::Proxy {
        kine,
        _etcd: Box::new(etcd),
    }
}

/// etcd flags that make a long run fast; durability is not under test here.
const FAST_ETCD: &[&str] = &["--unsafe-no-fsync", "--snapshot-count", "1000000"];

/// Runs a differential test; `Err` carries a readable mismatch report.
pub async fn run(cfg: &Config) -> anyhow::Result<Summary> {
    eprintln!(
        "differential: seed={} (0x{:x}), ops={}, oracle={}, target={}",
        cfg.seed,
        cfg.seed,
        cfg.ops,
        crate::etcd_binary().display(),
        cfg.target_name()
    );
    let oracle_proc = tokio::task::spawn_blocking(|| spawn_etcd_with(FAST_ETCD))
        .await
        .context("start the oracle etcd")?;
    let target = cfg.target;
    let target_proc = tokio::task::spawn_blocking(move || match target {
        Target::KineRs(backend) => {
            let (kine, log) = crate::spawn_kine_with_log(backend, &[]);
            TargetProcess::Kine(kine, log)
        }
        Target::Etcd => TargetProcess::Etcd(spawn_etcd_with(FAST_ETCD)),
        Target::EtcdProxy => spawn_proxy(),
    })
    .await
    .context("start the target")?;
    let oracle = Clients::connect(&oracle_proc.endpoint, "etcd (oracle)").await?;
    let target_clients = Clients::connect(target_proc.endpoint(), &cfg.target_name()).await?;
    let revisions = match cfg.target {
        Target::EtcdProxy => {
            // The oracle is at revision 1, empty; the proxy's etcd at whatever registering
            // the tenant took.
            let probe = RangeRequest {
                key: "differential-probe".into(),
                ..Default::default()
            };
            let start = call(target_clients.kv.clone().range(probe))
                .await
                .context("the proxy's first revision")?;
            Some(Arc::new(Mutex::new(RevisionMap::new(rev_of(
                &start.header,
            )))))
        }
        _ => None,
    };
    let mut runner = Runner::new(cfg.clone(), oracle, target_clients, revisions);
    let started = Instant::now();
    let result = runner.run_all().await;
    // A mismatch report carries the end of kine-rs's log: a refusal's cause (a datastore's
    // own error) is only there, never in the answer.
    let log_tail = match (&result, &target_proc) {
        (Err(_), TargetProcess::Kine(_, log)) => std::fs::read_to_string(log)
            .map(|text| {
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(40)..].join("\n")
            })
            .unwrap_or_default(),
        _ => String::new(),
    };
    drop(target_proc);
    drop(oracle_proc);
    match result {
        Ok(()) => {
            let mut summary = runner.summary.clone();
            summary.elapsed = started.elapsed();
            summary.final_revision = runner.cur_rev;
            eprintln!("differential: passed: {summary:?}");
            Ok(summary)
        }
        Err(m) if log_tail.is_empty() => Err(anyhow::anyhow!(runner.report(&m))),
        Err(m) => Err(anyhow::anyhow!(
            "{}\nthe end of kine-rs's log:\n{log_tail}\n",
            runner.report(&m)
        )),
    }
}

/// A difference between the servers (or a broken invariant).
#[derive(Debug)]
struct Mismatch {
    what: String,
    request: String,
    oracle: String,
    target: String,
}

impl Mismatch {
    fn new(
        what: impl Into<String>,
        request: &impl Debug,
        oracle: &impl Debug,
        target: &impl Debug,
    ) -> Mismatch {
        Mismatch {
            what: what.into(),
            request: format!("{request:?}"),
            oracle: format!("{oracle:?}"),
            target: format!("{target:?}"),
        }
    }

    fn plain(what: impl Into<String>) -> Mismatch {
        Mismatch {
            what: what.into(),
            request: String::new(),
            oracle: String::new(),
            target: String::new(),
        }
    }
}

struct Runner {
    cfg: Config,
    /// The target's revisions as the oracle's (the etcd proxy only).
    revisions: Option<Arc<Mutex<RevisionMap>>>,
    generator: Gen,
    oracle: Clients,
    target: Clients,
    ow: SideWatches,
    tw: SideWatches,
    specs: Vec<WatchSpec>,
    log: GlobalLog,
    cur_rev: i64,
    compact_rev: i64,
    op_index: usize,
    recent: VecDeque<String>,
    summary: Summary,
}

fn rev_of(h: &Option<ResponseHeader>) -> i64 {
    h.as_ref().map_or(0, |h| h.revision)
}

impl Runner {
    fn new(
        cfg: Config,
        oracle: Clients,
        target: Clients,
        revisions: Option<Arc<Mutex<RevisionMap>>>,
    ) -> Runner {
        let ow = SideWatches::new(&oracle, "etcd", None, true);
        let target_is_etcd = matches!(cfg.target, Target::Etcd | Target::EtcdProxy);
        let tw = SideWatches::new(&target, "target", revisions.clone(), target_is_etcd);
        Runner {
            revisions,
            generator: Gen::new(cfg.seed),
            cfg,
            oracle,
            target,
            ow,
            tw,
            specs: Vec::new(),
            log: GlobalLog::default(),
            cur_rev: 1,
            compact_rev: 0,
            op_index: 0,
            recent: VecDeque::new(),
            summary: Summary::default(),
        }
    }

    /// Whether the target's watches are etcd's (a second etcd, or the one behind the
    /// proxy): they share the named etcd exception.
    fn target_is_etcd(&self) -> bool {
        matches!(self.cfg.target, Target::Etcd | Target::EtcdProxy)
    }

    /// The revision map, when the target needs one.
    fn map(&self) -> Option<std::sync::MutexGuard<'_, RevisionMap>> {
        self.revisions
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Before a request naming `revision` (the oracle's): when it is a future one, the
    /// target's current revision is asked, so that it maps to as far in the target's future.
    async fn prepare(&mut self, revision: i64) {
        if !self.map().is_some_and(|m| m.is_future(revision)) {
            return;
        }
        let probe = RangeRequest {
            key: "differential-probe".into(),
            ..Default::default()
        };
        if let Ok(r) = call(self.target.kv.clone().range(probe)).await
            && let Some(mut map) = self.map()
        {
            map.set_target_now(rev_of(&r.header));
        }
    }

    /// Records the revisions a write took on both sides (when both answered), then gives the
    /// target's answer the oracle's revisions.
    fn map_back<T>(
        &self,
        a: &Outcome<T>,
        b: &mut Outcome<T>,
        header: impl Fn(&T) -> &Option<ResponseHeader>,
        map_response: impl Fn(&RevisionMap, &mut T),
    ) {
        let Some(mut map) = self.map() else { return };
        if let (Ok(a), Ok(b)) = (a, &*b) {
            map.record(rev_of(header(a)), rev_of(header(b)));
        }
        if let Ok(b) = b {
            map_response(&map, b);
        }
    }

    fn report(&self, m: &Mismatch) -> String {
        let target = self.cfg.target_name();
        let mut s = format!(
            "\n==== differential mismatch: etcd (oracle) vs {target} ====\n\
             seed: {seed} (0x{seed:x})   op index: {idx} (of {ops})   store revision: {rev}, compacted: {crev}\n\
             reproduce: DIFF_SEED={seed} DIFF_OPS={upto} DIFF_TARGET={target_env} cargo test -p kine-tests --test differential random_sequences_match_etcd\n\
             what: {what}\n",
            seed = self.cfg.seed,
            idx = self.op_index,
            ops = self.cfg.ops,
            rev = self.cur_rev,
            crev = self.compact_rev,
            upto = self.op_index + 1,
            what = m.what,
            target_env = match self.cfg.target {
                Target::KineRs(backend) => {
                    format!(
                        "kine-rs DIFF_BACKEND={}",
                        format!("{backend:?}").to_lowercase()
                    )
                }
                Target::Etcd => "etcd".to_string(),
                Target::EtcdProxy => "proxy".to_string(),
            },
        );
        if !m.request.is_empty() {
            s.push_str(&format!("request:\n  {}\n", m.request));
            s.push_str(&format!("etcd answered (normalized):\n  {}\n", m.oracle));
            s.push_str(&format!(
                "{target} answered (normalized):\n  {}\n",
                m.target
            ));
        }
        s.push_str("the operations before it (newest last):\n");
        for r in &self.recent {
            s.push_str(&format!("  {r}\n"));
        }
        s
    }

    fn ctx_open(&self) -> Vec<usize> {
        self.specs
            .iter()
            .enumerate()
            .filter(|(i, s)| *i > 0 && s.open)
            .map(|(i, _)| i)
            .collect()
    }

    async fn run_all(&mut self) -> Result<(), Mismatch> {
        // Watch #0: the all-keys log, from the first write on, with prev_kv.
        self.watch_create(
            0,
            WatchCreateRequest {
                key: vec![0u8].into(),
                range_end: vec![0u8].into(),
                prev_kv: true,
                ..Default::default()
            },
        )
        .await?;
        while self.op_index < self.cfg.ops {
            let open = self.ctx_open();
            let ctx = Ctx {
                cur_rev: self.cur_rev,
                compact_rev: self.compact_rev,
                open_watches: &open,
            };
            let op = self.generator.next_op(&ctx);
            if self.cfg.trace {
                eprintln!("#{} {op:?}", self.op_index);
            }
            let mut line = format!("#{} {op:?}", self.op_index);
            if line.len() > 400 {
                line.truncate(400);
                line.push_str(" …");
            }
            self.recent.push_back(line);
            if self.recent.len() > 8 {
                self.recent.pop_front();
            }
            self.step(op).await?;
            self.op_index += 1;
            if self.op_index.is_multiple_of(500) {
                self.sync_all().await?;
            }
        }
        self.sync_all().await?;
        self.summary.exception_events = (0..self.specs.len())
            .map(|idx| {
                watch::complete_bug_events(&self.specs[idx], &self.ow.watches[idx].items, &self.log)
                    .iter()
                    .filter(|e| e.tolerant_prev.is_some())
                    .count()
            })
            .sum();
        self.summary.ops = self.op_index;
        self.summary.watches = self.specs.len();
        Ok(())
    }

    fn seen(&mut self, h: &Option<ResponseHeader>) {
        self.cur_rev = self.cur_rev.max(rev_of(h));
    }

    fn check<T: PartialEq + Debug>(
        &mut self,
        what: &str,
        req: &impl Debug,
        a: &Outcome<T>,
        b: &Outcome<T>,
    ) -> Result<(), Mismatch> {
        if a.is_err() {
            self.summary.errors_compared += 1;
        }
        match same(a, b) {
            None => Ok(()),
            Some(d) => Err(Mismatch::new(format!("{what}: {d}"), req, a, b)),
        }
    }

    async fn step(&mut self, op: Op) -> Result<(), Mismatch> {
        match op {
            Op::Range(req) => self.range(req).await,
            Op::Put(req) => {
                let (mut o, mut t) = (self.oracle.kv.clone(), self.target.kv.clone());
                let (a, b) = tokio::join!(call(o.put(req.clone())), call(t.put(req.clone())));
                let (mut a, mut b) = (outcome(a), outcome(b));
                self.map_back(&a, &mut b, |r| &r.header, RevisionMap::put_response);
                if let Ok(r) = &a {
                    self.seen(&r.header);
                }
                for r in [&mut a, &mut b].into_iter().flatten() {
                    compare::norm_put(r);
                }
                self.check("Put", &req, &a, &b)
            }
            Op::Delete(req) => {
                let (mut o, mut t) = (self.oracle.kv.clone(), self.target.kv.clone());
                let (a, b) = tokio::join!(
                    call(o.delete_range(req.clone())),
                    call(t.delete_range(req.clone()))
                );
                let (mut a, mut b) = (outcome(a), outcome(b));
                self.map_back(&a, &mut b, |r| &r.header, RevisionMap::delete_response);
                if let Ok(r) = &a {
                    self.seen(&r.header);
                }
                for r in [&mut a, &mut b].into_iter().flatten() {
                    compare::norm_delete(r);
                }
                self.check("DeleteRange", &req, &a, &b)
            }
            Op::Txn(mut req) => {
                if self.cfg.target == Target::EtcdProxy {
                    ops::end_from_key_deletes(&mut req);
                }
                self.prepare(RevisionMap::txn_revisions(&req)).await;
                let mut treq = req.clone();
                if let Some(map) = self.map() {
                    map.txn_request(&mut treq);
                }
                let (mut o, mut t) = (self.oracle.kv.clone(), self.target.kv.clone());
                let (a, b) = tokio::join!(call(o.txn(req.clone())), call(t.txn(treq)));
                let (mut a, mut b) = (outcome(a), outcome(b));
                self.map_back(&a, &mut b, |r| &r.header, RevisionMap::txn_response);
                if let Ok(r) = &a {
                    self.seen(&r.header);
                }
                let pa = compare::norm_txn(&mut a, &req);
                let pb = compare::norm_txn(&mut b, &req);
                if !pa.is_empty() {
                    return Err(Mismatch::new(
                        format!("Txn: the oracle's cut tie runs look wrong (harness bug?): {pa:?}"),
                        &req,
                        &a,
                        &b,
                    ));
                }
                if !pb.is_empty() {
                    return Err(Mismatch::new(
                        format!("Txn: the target's sorted range has problems: {pb:?}"),
                        &req,
                        &a,
                        &b,
                    ));
                }
                self.check("Txn", &req, &a, &b)
            }
            Op::Compact(req) => {
                // Every watch must have caught up before a compaction, so that which watches
                // a compaction cancels does not depend on timing.
                self.sync_all().await?;
                self.wait_catch_up().await;
                self.prepare(req.revision).await;
                let mut treq = req;
                if let Some(map) = self.map() {
                    map.compaction_request(&mut treq);
                }
                let (mut o, mut t) = (self.oracle.kv.clone(), self.target.kv.clone());
                let (a, b) = tokio::join!(call(o.compact(req)), call(t.compact(treq)));
                let (mut a, mut b) = (outcome(a), outcome(b));
                self.map_back(&a, &mut b, |r| &r.header, |m, r| m.header(&mut r.header));
                if let Ok(r) = &a {
                    self.seen(&r.header);
                    self.compact_rev = self.compact_rev.max(req.revision);
                }
                for r in [&mut a, &mut b].into_iter().flatten() {
                    compare::norm_compact(r);
                }
                self.check("Compact", &req, &a, &b)
            }
            Op::LeaseGrant(req) => {
                let (mut o, mut t) = (self.oracle.lease.clone(), self.target.lease.clone());
                let (a, b) = tokio::join!(call(o.lease_grant(req)), call(t.lease_grant(req)));
                let (mut a, mut b) = (outcome(a), outcome(b));
                self.map_back(&a, &mut b, |r| &r.header, RevisionMap::grant_response);
                if let Ok(r) = &a {
                    self.seen(&r.header);
                }
                for r in [&mut a, &mut b].into_iter().flatten() {
                    compare::norm_grant(r);
                }
                self.check("LeaseGrant", &req, &a, &b)
            }
            Op::LeaseRevoke(req) => {
                let (mut o, mut t) = (self.oracle.lease.clone(), self.target.lease.clone());
                let (a, b) = tokio::join!(call(o.lease_revoke(req)), call(t.lease_revoke(req)));
                let (mut a, mut b) = (outcome(a), outcome(b));
                self.map_back(&a, &mut b, |r| &r.header, RevisionMap::revoke_response);
                if let Ok(r) = &a {
                    self.seen(&r.header);
                }
                for r in [&mut a, &mut b].into_iter().flatten() {
                    compare::norm_revoke(r);
                }
                self.check("LeaseRevoke", &req, &a, &b)
            }
            Op::LeaseTimeToLive(req) => {
                let (mut o, mut t) = (self.oracle.lease.clone(), self.target.lease.clone());
                let (a, b) = tokio::join!(
                    call(o.lease_time_to_live(req)),
                    call(t.lease_time_to_live(req))
                );
                let (mut a, mut b) = (outcome(a), outcome(b));
                self.map_back(&a, &mut b, |r| &r.header, RevisionMap::ttl_response);
                if let Ok(r) = &a {
                    self.seen(&r.header);
                }
                for r in [&mut a, &mut b].into_iter().flatten() {
                    compare::norm_ttl(r);
                }
                compare::align_ttl(&a, &mut b);
                self.check("LeaseTimeToLive (remaining TTL within 2s)", &req, &a, &b)
            }
            Op::LeaseLeases => {
                let req = LeaseLeasesRequest {};
                let (mut o, mut t) = (self.oracle.lease.clone(), self.target.lease.clone());
                let (a, b) = tokio::join!(call(o.lease_leases(req)), call(t.lease_leases(req)));
                let (mut a, mut b) = (outcome(a), outcome(b));
                self.map_back(&a, &mut b, |r| &r.header, RevisionMap::leases_response);
                if let Ok(r) = &a {
                    self.seen(&r.header);
                }
                for r in [&mut a, &mut b].into_iter().flatten() {
                    compare::norm_leases(r);
                }
                self.check("LeaseLeases (as a set)", &req, &a, &b)
            }
            Op::LeaseKeepAlive(req) => {
                let o = self.oracle.keep_alive_stream();
                let t = self.target.keep_alive_stream();
                let (a, b) = tokio::join!(o.keep_alive(req), t.keep_alive(req));
                let (mut a, mut b) = (outcome(a), outcome(b));
                self.map_back(&a, &mut b, |r| &r.header, RevisionMap::keep_alive_response);
                if let Ok(r) = &a {
                    self.seen(&r.header);
                }
                for r in [&mut a, &mut b].into_iter().flatten() {
                    compare::norm_keep_alive(r);
                }
                self.check("LeaseKeepAlive (stream)", &req, &a, &b)
            }
            Op::AlarmList => {
                let req = AlarmRequest {
                    action: AlarmAction::Get as i32,
                    member_id: 0,
                    alarm: 0,
                };
                let (mut o, mut t) = (self.oracle.maint.clone(), self.target.maint.clone());
                let (a, b) = tokio::join!(call(o.alarm(req)), call(t.alarm(req)));
                let (mut a, mut b) = (outcome(a), outcome(b));
                self.map_back(&a, &mut b, |r| &r.header, |m, r| m.header(&mut r.header));
                for r in [&mut a, &mut b].into_iter().flatten() {
                    compare::norm_alarm(r);
                }
                self.check("Alarm GET", &req, &a, &b)
            }
            Op::Defragment => {
                let req = DefragmentRequest {};
                let (mut o, mut t) = (self.oracle.maint.clone(), self.target.maint.clone());
                let (a, b) = tokio::join!(call(o.defragment(req)), call(t.defragment(req)));
                let (mut a, mut b) = (outcome(a), outcome(b));
                self.map_back(&a, &mut b, |r| &r.header, |m, r| m.header(&mut r.header));
                for r in [&mut a, &mut b].into_iter().flatten() {
                    compare::norm_defrag(r);
                }
                self.check("Defragment", &req, &a, &b)
            }
            Op::WatchCreate { stream, req } => self.watch_create(stream, req).await,
            Op::WatchCancel { watch } => self.watch_cancel(watch).await,
            Op::WatchCancelUnknown { stream, watch_id } => {
                // Nothing may come back; a stray answer shows up as a violation at the next
                // comparison of watches.
                self.ow.send_cancel(stream, watch_id);
                self.tw.send_cancel(stream, watch_id);
                Ok(())
            }
            Op::WatchSync => self.sync_all().await,
        }
    }

    async fn range(&mut self, req: RangeRequest) -> Result<(), Mismatch> {
        self.prepare(RevisionMap::range_revisions(&req)).await;
        let mut treq = req.clone();
        if let Some(map) = self.map() {
            map.range_request(&mut treq);
        }
        let (mut o, mut t) = (self.oracle.kv.clone(), self.target.kv.clone());
        let (a, b) = tokio::join!(call(o.range(req.clone())), call(t.range(treq)));
        let (mut a, mut b) = (outcome(a), outcome(b));
        self.map_back(&a, &mut b, |r| &r.header, RevisionMap::range_response);
        let served_at = match &a {
            Ok(r) => {
                self.seen(&r.header);
                rev_of(&r.header)
            }
            Err(_) => self.cur_rev,
        };
        let need = [&a, &b]
            .iter()
            .any(|x| matches!(x, Ok(r) if compare::needs_truth(&req, r)));
        let truth = if need {
            let treq = compare::truth_request(&req, served_at);
            match call(o.range(treq.clone())).await {
                Ok(r) => Some(compare::truth_map(&r)),
                Err(e) => {
                    return Err(Mismatch::new(
                        format!(
                            "Range: the oracle refused the uncut read used to check a sorted, cut response: {e}"
                        ),
                        &treq,
                        &a,
                        &b,
                    ));
                }
            }
        } else {
            None
        };
        let pa = compare::norm_range(&mut a, &req, truth.as_ref());
        let pb = compare::norm_range(&mut b, &req, truth.as_ref());
        if !pa.is_empty() {
            return Err(Mismatch::new(
                format!("Range: the oracle's cut tie run looks wrong (harness bug?): {pa:?}"),
                &req,
                &a,
                &b,
            ));
        }
        if !pb.is_empty() {
            return Err(Mismatch::new(
                format!("Range: the target's cut tie run is wrong: {pb:?}"),
                &req,
                &a,
                &b,
            ));
        }
        self.check("Range", &req, &a, &b)
    }

    async fn watch_create(
        &mut self,
        stream: usize,
        req: WatchCreateRequest,
    ) -> Result<(), Mismatch> {
        let idx = self.specs.len();
        let bug_case = req.start_revision > 0 && req.start_revision == self.compact_rev;
        self.specs.push(WatchSpec {
            stream,
            req: req.clone(),
            op_index: self.op_index,
            created_rev: self.cur_rev,
            created_at: Instant::now(),
            compact_rev: self.compact_rev,
            open: false,
            bug_case,
        });
        self.prepare(req.start_revision).await;
        let mut treq = req.clone();
        let mut future_start = None;
        if let Some(map) = self.map() {
            map.watch_create(&mut treq);
            if map.is_future(req.start_revision) {
                future_start = Some((treq.start_revision, req.start_revision));
            }
        }
        if let Some((sent, oracle_start)) = future_start {
            self.tw.expect_future_start(idx, sent, oracle_start);
        }
        self.ow.send_create(stream, idx, req.clone());
        self.tw.send_create(stream, idx, treq);
        let deadline = Instant::now() + WATCH_WAIT;
        let created = |w: &SideWatches| w.watches[idx].created.is_some();
        let (ok_o, ok_t) = tokio::join!(
            self.ow.wait_until(deadline, created),
            self.tw.wait_until(deadline, created)
        );
        let a = self.ow.watches[idx].created.clone();
        let b = self.tw.watches[idx].created.clone();
        if self.cfg.trace {
            let answer = |r: &Option<kine_proto::etcdserverpb::WatchResponse>| {
                r.as_ref()
                    .map(|r| (r.watch_id, r.canceled, r.cancel_reason.clone()))
            };
            eprintln!(
                "  watch #{idx} created: etcd {:?}, target {:?}",
                answer(&a),
                answer(&b)
            );
        }
        if !ok_o || !ok_t {
            return Err(Mismatch::new(
                format!(
                    "Watch create: no created response within {WATCH_WAIT:?} from {}",
                    if ok_o { "the target" } else { "etcd" }
                ),
                &req,
                &a,
                &b,
            ));
        }
        if a != b {
            return Err(Mismatch::new(
                "Watch create: the created responses differ (watch ids are compared too: etcd numbers a stream's watches from 0)",
                &req,
                &a,
                &b,
            ));
        }
        let accepted = a.as_ref().is_some_and(|r| !r.canceled);
        self.specs[idx].open = accepted;
        self.specs[idx].bug_case = bug_case && accepted;
        self.summary.watches += 1;
        Ok(())
    }

    /// A watch that starts in the past is caught up by the server in the background (etcd:
    /// every 100ms); a compaction above its start revision before that cancels it, so which
    /// watches a compaction cancels would depend on timing. Catching up is proven when the
    /// watch delivered its events (`sync_all`); for a recent one with nothing to deliver,
    /// this gives the servers [`CATCH_UP_GRACE`] after its creation.
    async fn wait_catch_up(&mut self) {
        let newest = self
            .specs
            .iter()
            .filter(|s| {
                s.open && s.starts_in_past() && self.log.last_expected_rev(s, false).is_none()
            })
            .map(|s| s.created_at)
            .max();
        if let Some(created_at) = newest {
            self.summary.catch_up_waits += 1;
            let wait = (created_at + CATCH_UP_GRACE).saturating_duration_since(Instant::now());
            tokio::time::sleep(wait).await;
        }
    }

    /// Waits until the oracle's all-keys log has every event up to the store's revision.
    async fn sync_log(&mut self) -> Result<(), Mismatch> {
        let rev = self.cur_rev;
        let deadline = Instant::now() + WATCH_WAIT;
        let ok = self
            .ow
            .wait_until(deadline, |w| w.watches[0].last_event_rev >= rev || rev <= 1)
            .await;
        self.log.absorb(&self.ow.watches[0]);
        if !ok {
            return Err(Mismatch::plain(format!(
                "etcd's all-keys watch did not reach revision {rev} within {WATCH_WAIT:?} (it is at {}): harness assumption broken",
                self.ow.watches[0].last_event_rev
            )));
        }
        Ok(())
    }

    async fn sync_watch(&mut self, idx: usize) -> Result<(), Mismatch> {
        let spec = self.specs[idx].clone();
        let kine_like = !self.target_is_etcd();
        let last_o = self.log.last_expected_rev(&spec, false);
        let last_t = self.log.last_expected_rev(&spec, kine_like);
        let deadline = Instant::now() + WATCH_WAIT;
        let (ok_o, ok_t) = tokio::join!(
            self.ow.wait_until(deadline, |w| watch::delivered_enough(
                &spec,
                &w.watches[idx],
                last_o
            )),
            self.tw.wait_until(deadline, |w| watch::delivered_enough(
                &spec,
                &w.watches[idx],
                last_t
            ))
        );
        if !ok_o || !ok_t {
            self.summary.wait_timeouts += 1;
            if self.cfg.trace {
                eprintln!(
                    "wait timed out (etcd ok: {ok_o}, target ok: {ok_t}; expected last revisions {last_o:?}/{last_t:?}) for {}",
                    spec.describe(idx)
                );
            }
        }
        if spec.bug_case && self.log.bug_drops_events(&spec) {
            self.summary.exception_waits += 1;
            // The oracle may still deliver the events the named exception drops (when the
            // compaction had not physically finished when the watch started catching up):
            // give it CATCH_UP_GRACE from the watch's creation.
            let until = spec.created_at + CATCH_UP_GRACE;
            tokio::time::sleep(until.saturating_duration_since(Instant::now())).await;
            self.ow.pump();
            self.tw.pump();
        }
        self.compare_watch(idx)
    }

    fn compare_watch(&mut self, idx: usize) -> Result<(), Mismatch> {
        let spec = &self.specs[idx];
        let oracle = watch::complete_bug_events(spec, &self.ow.watches[idx].items, &self.log);
        let target_items = if self.target_is_etcd() {
            watch::complete_bug_events(spec, &self.tw.watches[idx].items, &self.log)
                .into_iter()
                .map(|e| e.item)
                .collect()
        } else {
            self.tw.watches[idx].items.clone()
        };
        if let Some(diff) = watch::compare_items(&oracle, &target_items) {
            let mut what = format!("{}\n{diff}", spec.describe(idx));
            if spec.bug_case {
                what.push_str(
                    "NOTE: this watch starts exactly at the compaction revision: the named exception \
                     etcd-io/etcd#18089 applies (etcd 3.5.1 drops DELETE events at that revision; \
                     they were added to etcd's side from the all-keys log and the target must send them)\n",
                );
            }
            return Err(Mismatch::plain(what));
        }
        if self.ow.watches[idx].canceled {
            self.specs[idx].open = false;
        }
        Ok(())
    }

    fn check_violations(&self) -> Result<(), Mismatch> {
        if !self.ow.violations.is_empty() {
            return Err(Mismatch::plain(format!(
                "etcd broke a watch invariant the harness relies on (harness assumption broken):\n{}",
                self.ow.violations.join("\n")
            )));
        }
        if !self.tw.violations.is_empty() {
            return Err(Mismatch::plain(format!(
                "the target broke a watch invariant:\n{}",
                self.tw.violations.join("\n")
            )));
        }
        Ok(())
    }

    async fn sync_all(&mut self) -> Result<(), Mismatch> {
        self.sync_log().await?;
        for idx in 0..self.specs.len() {
            self.sync_watch(idx).await?;
        }
        self.summary.events_compared = self.ow.watches.iter().map(|w| w.items.len()).sum();
        self.check_violations()
    }

    async fn watch_cancel(&mut self, idx: usize) -> Result<(), Mismatch> {
        self.sync_log().await?;
        self.sync_watch(idx).await?;
        if !self.specs[idx].open {
            return Ok(());
        }
        let stream = self.specs[idx].stream;
        match (self.ow.watch_id(idx), self.tw.watch_id(idx)) {
            (Some(a), Some(b)) => {
                self.ow.send_cancel(stream, a);
                self.tw.send_cancel(stream, b);
            }
            (a, b) => {
                return Err(Mismatch::new(
                    format!(
                        "Watch cancel: a server has no id for {}",
                        self.specs[idx].describe(idx)
                    ),
                    &"cancel",
                    &a,
                    &b,
                ));
            }
        }
        let deadline = Instant::now() + WATCH_WAIT;
        let canceled = |w: &SideWatches| w.watches[idx].canceled;
        let (_, _) = tokio::join!(
            self.ow.wait_until(deadline, canceled),
            self.tw.wait_until(deadline, canceled)
        );
        self.compare_watch(idx)?;
        self.specs[idx].open = false;
        self.check_violations()
    }
}
