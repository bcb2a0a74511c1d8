//! Reports: one per run, as a text table or one JSON line; and the side-by-side Markdown table
//! `bench/run.sh` prints from many JSON lines.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{Map, Value, json};

use crate::Opts;

/// What one client (or a whole run) measured.
#[derive(Debug, Default)]
pub struct Stats {
    /// Latencies of successful operations, in microseconds.
    pub latencies: Vec<u32>,
    pub ops: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Workload-specific counters and facts (conflicts, missing events, keys loaded, ...).
    pub extra: BTreeMap<String, Value>,
}

impl Stats {
    pub fn record(&mut self, latency: Duration) {
        self.ops += 1;
        self.latencies
            .push(u32::try_from(latency.as_micros()).unwrap_or(u32::MAX));
    }

    pub fn error(&mut self, message: impl std::fmt::Display) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(message.to_string());
        }
    }

    pub fn count(&mut self, name: &str, by: u64) {
        let entry = self.extra.entry(name.to_string()).or_insert(json!(0u64));
        *entry = json!(entry.as_u64().unwrap_or(0) + by);
    }

    pub fn set(&mut self, name: &str, value: Value) {
        self.extra.insert(name.to_string(), value);
    }

    pub fn merge(&mut self, other: Stats) {
        self.latencies.extend(other.latencies);
        self.ops += other.ops;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        for (name, value) in other.extra {
            match (
                self.extra.get(&name).and_then(Value::as_u64),
                value.as_u64(),
            ) {
                (Some(a), Some(b)) => {
                    self.extra.insert(name, json!(a + b));
                }
                _ => {
                    self.extra.insert(name, value);
                }
            }
        }
    }

    /// Finishes a run that took `elapsed`.
    pub fn into_report(mut self, elapsed: Duration) -> Report {
        self.latencies.sort_unstable();
        let quantile = |q: f64| -> f64 {
            if self.latencies.is_empty() {
                return 0.0;
            }
            let index = ((self.latencies.len() as f64 * q).ceil() as usize)
                .clamp(1, self.latencies.len())
                - 1;
            f64::from(self.latencies[index]) / 1000.0
        };
        let secs = elapsed.as_secs_f64();
        Report {
            workload: String::new(),
            target: String::new(),
            label: String::new(),
            clients: 0,
            conns: 0,
            ops: self.ops,
            errors: self.errors,
            first_error: self.first_error.clone(),
            elapsed_s: secs,
            ops_per_sec: if secs > 0.0 {
                self.ops as f64 / secs
            } else {
                0.0
            },
            p50_ms: quantile(0.50),
            p99_ms: quantile(0.99),
            max_ms: quantile(1.0),
            extra: self.extra,
        }
    }
}

/// The outcome of one run.
#[derive(Debug)]
pub struct Report {
    pub workload: String,
    pub target: String,
    pub label: String,
    pub clients: usize,
    pub conns: usize,
    pub ops: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed_s: f64,
    pub ops_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub extra: BTreeMap<String, Value>,
}

impl Report {
    pub fn finish(mut self, workload: &str, opts: &Opts) -> Report {
        self.workload = workload.to_string();
        self.target = opts.target.clone();
        self.clients = opts.clients;
        self.conns = opts.conns;
        self.label = opts
            .label
            .clone()
            .unwrap_or_else(|| format!("{workload} x{}", opts.clients));
        if let Some(goal) = &opts.goal {
            self.extra.insert("goal".to_string(), json!(goal));
        }
        self
    }

    pub fn to_json(&self) -> Value {
        let mut extra = Map::new();
        for (k, v) in &self.extra {
            extra.insert(k.clone(), v.clone());
        }
        json!({
            "workload": self.workload,
            "target": self.target,
            "label": self.label,
            "clients": self.clients,
            "conns": self.conns,
            "ops": self.ops,
            "errors": self.errors,
            "first_error": self.first_error,
            "elapsed_s": round(self.elapsed_s, 3),
            "ops_per_sec": round(self.ops_per_sec, 1),
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "max_ms": round(self.max_ms, 3),
            "extra": Value::Object(extra),
        })
    }

    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<16} {:<12} {:>8} {:>10} {:>10} {:>10} {:>10} {:>8}",
            "workload", "target", "clients", "ops", "ops/s", "p50 ms", "p99 ms", "errors"
        );
        let _ = writeln!(
            out,
            "{:<16} {:<12} {:>8} {:>10} {:>10.1} {:>10.3} {:>10.3} {:>8}",
            self.workload,
            self.target,
            self.clients,
            self.ops,
            self.ops_per_sec,
            self.p50_ms,
            self.p99_ms,
            self.errors
        );
        for (k, v) in &self.extra {
            let _ = writeln!(out, "  {k}: {v}");
        }
        out
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

fn num(v: &Value, key: &str) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or(0.0)
}

fn extra(v: &Value, key: &str) -> Option<f64> {
    v.get("extra")
        .and_then(|e| e.get(key))
        .and_then(Value::as_f64)
}

/// The figure a ratio is taken of.
fn headline(v: &Value) -> f64 {
    match v.get("workload").and_then(Value::as_str).unwrap_or("") {
        "put" | "txn-create" | "txn-update" | "noisy-neighbour" => num(v, "ops_per_sec"),
        "watch-latency" => num(v, "p99_ms"),
        "rss" => extra(v, "rss_mib").unwrap_or(0.0),
        "gateway-watch" => extra(v, "open_s").unwrap_or(0.0),
        "startup" => extra(v, "first_read_s").unwrap_or(0.0),
        "size" => extra(v, "bytes_per_key").unwrap_or(0.0),
        _ => num(v, "p50_ms"),
    }
}

fn cell(v: &Value, base: Option<&Value>) -> String {
    let workload = v.get("workload").and_then(Value::as_str).unwrap_or("");
    let ratio = |x: f64, b: Option<f64>| match b {
        Some(b) if b > 0.0 => format!(" ({:.2}×)", x / b),
        _ => String::new(),
    };
    let mut s = match workload {
        "put" | "txn-create" | "txn-update" => {
            let ops = num(v, "ops_per_sec");
            let p50 = num(v, "p50_ms");
            let p99 = num(v, "p99_ms");
            let mut s = format!(
                "{ops:.0}/s{}, p50 {p50:.2}{} / p99 {p99:.1} ms",
                ratio(ops, base.map(|b| num(b, "ops_per_sec"))),
                ratio(p50, base.map(|b| num(b, "p50_ms")))
            );
            if let Some(c) = extra(v, "conflicts").filter(|c| *c > 0.0) {
                let _ = write!(s, ", {c:.0} conflicts");
            }
            s
        }
        "list" if num(v, "ops") == 0.0 => "not measured".to_string(),
        "list" => {
            let ms = num(v, "p50_ms");
            format!("{ms:.0} ms{}", ratio(ms, base.map(|b| num(b, "p50_ms"))))
        }
        "watch-latency" => {
            let p99 = num(v, "p99_ms");
            format!(
                "p50 {:.2} / p99 {p99:.2} ms{}, {:.0} writes/s, missing {:.0}, dup {:.0}, out-of-order {:.0}",
                num(v, "p50_ms"),
                ratio(p99, base.map(|b| num(b, "p99_ms"))),
                extra(v, "write_rate").unwrap_or(0.0),
                extra(v, "missing").unwrap_or(0.0),
                extra(v, "duplicates").unwrap_or(0.0),
                extra(v, "out_of_order").unwrap_or(0.0),
            )
        }
        "rss" => {
            let mib = extra(v, "rss_mib").unwrap_or(0.0);
            format!(
                "{mib:.1} MiB{}",
                ratio(mib, base.and_then(|b| extra(b, "rss_mib")))
            )
        }
        "gateway-watch" => {
            let open = extra(v, "open_s").unwrap_or(0.0);
            format!(
                "{:.0}/{:.0} watches open in {open:.1} s{}, events p50 {:.1} / p99 {:.1} ms; \
                 missing {:.0}, foreign {:.0}, lost {:.0}",
                extra(v, "opened").unwrap_or(0.0),
                extra(v, "tenants").unwrap_or(0.0),
                ratio(open, base.and_then(|b| extra(b, "open_s"))),
                num(v, "p50_ms"),
                num(v, "p99_ms"),
                extra(v, "missing").unwrap_or(0.0),
                extra(v, "foreign").unwrap_or(0.0),
                extra(v, "lost").unwrap_or(0.0),
            )
        }
        "startup" => {
            let seconds = extra(v, "first_read_s").unwrap_or(0.0);
            format!(
                "{seconds:.2} s{} ({:.0} keys)",
                ratio(seconds, base.and_then(|b| extra(b, "first_read_s"))),
                extra(v, "keys").unwrap_or(0.0),
            )
        }
        "size" => {
            let per_key = extra(v, "bytes_per_key").unwrap_or(0.0);
            format!(
                "{per_key:.0} bytes/live key{} ({:.0} MiB, {:.0} keys)",
                ratio(per_key, base.and_then(|b| extra(b, "bytes_per_key"))),
                extra(v, "db_bytes").unwrap_or(0.0) / 1_048_576.0,
                extra(v, "keys").unwrap_or(0.0),
            )
        }
        "noisy-neighbour" => {
            let ops = num(v, "ops_per_sec");
            let mib =
                |key: &str| extra(v, key).map_or_else(|| "?".to_string(), |m| format!("{m:.0}"));
            format!(
                "B alone {:.0}/s, p99 {:.1} ms; with A {ops:.0}/s{} ({:.0}% kept), p99 {:.1} ms \
                 ({:.2}× alone); RSS {} → {} (peak) → {} MiB; A: {:.0} keep-alives, {:.0} huge \
                 txns, {:.0} × 1 MiB puts, {:.0} watches ({:.0} events), {:.0} never-reading \
                 watchers, {:.0} refusals",
                extra(v, "alone_ops_per_sec").unwrap_or(0.0),
                extra(v, "alone_p99_ms").unwrap_or(0.0),
                ratio(ops, base.map(|b| num(b, "ops_per_sec"))),
                extra(v, "kept").unwrap_or(0.0) * 100.0,
                num(v, "p99_ms"),
                extra(v, "p99_vs_alone").unwrap_or(0.0),
                mib("rss_before_mib"),
                mib("rss_peak_mib"),
                mib("rss_after_mib"),
                extra(v, "a_keepalives").unwrap_or(0.0),
                extra(v, "a_huge_txns").unwrap_or(0.0),
                extra(v, "a_big_puts").unwrap_or(0.0),
                extra(v, "a_watches_open").unwrap_or(0.0),
                extra(v, "a_watch_events").unwrap_or(0.0),
                extra(v, "a_slow_watchers_open").unwrap_or(0.0),
                extra(v, "a_refused").unwrap_or(0.0),
            )
        }
        _ => format!("{:.2} ms", num(v, "p50_ms")),
    };
    let errors = num(v, "errors");
    if errors > 0.0 {
        let first = v.get("first_error").and_then(Value::as_str).unwrap_or("");
        let first: String = first.chars().take(60).collect();
        let _ = write!(s, "; **{errors:.0} errors** ({first})");
    }
    s
}

/// The side-by-side Markdown table: one row per label, one column per target (in order of
/// first appearance, `etcd` first), ratios kine-rs / etcd in brackets.
pub fn table(input: &Path) -> Result<String> {
    let text =
        std::fs::read_to_string(input).with_context(|| format!("reading {}", input.display()))?;
    let mut labels: Vec<(String, String)> = Vec::new();
    let mut targets: Vec<String> = Vec::new();
    let mut runs: BTreeMap<(String, String), Vec<Value>> = BTreeMap::new();
    for line in text.lines().filter(|l| l.trim_start().starts_with('{')) {
        let v: Value = serde_json::from_str(line).with_context(|| format!("bad line {line}"))?;
        let label = v["label"].as_str().unwrap_or("?").to_string();
        let target = v["target"].as_str().unwrap_or("?").to_string();
        let goal = v
            .get("extra")
            .and_then(|e| e.get("goal"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        match labels.iter_mut().find(|(l, _)| *l == label) {
            Some((_, g)) if g.is_empty() => *g = goal,
            Some(_) => {}
            None => labels.push((label.clone(), goal)),
        }
        if !targets.contains(&target) {
            targets.push(target.clone());
        }
        runs.entry((label, target)).or_default().push(v);
    }
    // Repeated runs of a point: the median one, by the figure its ratio is taken of.
    let cells: BTreeMap<(String, String), Value> = runs
        .into_iter()
        .map(|(k, mut vs)| {
            vs.sort_by(|a, b| headline(a).total_cmp(&headline(b)));
            let median = vs.swap_remove(vs.len() / 2);
            (k, median)
        })
        .collect();
    targets.sort_by_key(|t| t != "etcd");
    let mut out = String::new();
    let _ = write!(out, "| measurement | issue 5 target |");
    for t in &targets {
        let _ = write!(out, " {t} |");
    }
    let _ = write!(out, "\n| --- | --- |");
    for _ in &targets {
        let _ = write!(out, " --- |");
    }
    out.push('\n');
    for (label, goal) in &labels {
        let _ = write!(out, "| {label} | {goal} |");
        let base = cells.get(&(label.clone(), "etcd".to_string()));
        for t in &targets {
            match cells.get(&(label.clone(), t.clone())) {
                Some(v) => {
                    let base = if t == "etcd" { None } else { base };
                    let base = base.filter(|b| headline(b) > 0.0);
                    let _ = write!(out, " {} |", cell(v, base));
                }
                None => out.push_str(" – |"),
            }
        }
        out.push('\n');
    }
    Ok(out)
}
