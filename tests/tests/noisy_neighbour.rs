//! A hostile tenant next to a well-behaved one, in a gateway on PostgreSQL (issue 14).
//!
//! Runs the same `kine-load noisy-neighbour` that `bench/run.sh` measures, small: tenant B
//! creates keys at 16 clients alone, then while tenant A floods keep-alives, runs
//! transactions over a huge range, holds a thousand watches fed by a writer and watchers
//! that never read under 1 MiB values. The figures (B's throughput and p99 with and without
//! A, memory) are the bench's; here no time is asserted, only what must hold whatever the
//! machine: every answer B and A got is right (the tool checks each one), A's load really
//! ran, A meets its own per-tenant limits while B, in the same process, does not (B still
//! gets a lease and opens watches), and the server's memory stays bounded.

use std::process::Command;

use anyhow::{Context, Result, ensure};
use kine_tests::{Backend, kine_load_binary, spawn_kine_with};
use serde_json::Value;

/// A's leases allowed by the gateway; A asks for twice as many.
const A_LEASE_LIMIT: u64 = 100;
/// Watches per stream allowed by the gateway; A opens 1,000 per stream.
const WATCH_LIMIT: u64 = 500;
/// A's watch streams (1,000 watches asked on each).
const A_WATCH_STREAMS: u64 = 2;
const A_SLOW_WATCHERS: u64 = 4;
/// Resident memory the gateway must stay under while A writes 1 MiB values to watchers that
/// never read (each of which would otherwise pin every one of them).
const RSS_BOUND_MIB: f64 = 512.0;

fn extra(report: &Value, key: &str) -> Result<f64> {
    report["extra"][key]
        .as_f64()
        .with_context(|| format!("the report has no {key}: {report}"))
}

#[test]
fn a_hostile_tenant_leaves_another_served_and_memory_bounded() -> Result<()> {
    let pki = tempfile::tempdir()?;
    let status = Command::new(kine_load_binary())
        .args(["pki", "--clients", "2", "--dir"])
        .arg(pki.path())
        .status()
        .context("running kine-load pki")?;
    ensure!(status.success(), "kine-load pki failed: {status}");
    let file = |name: &str| pki.path().join(name).display().to_string();
    let (cert, key, ca) = (file("server.pem"), file("server-key.pem"), file("ca.pem"));
    let (leases, watches) = (A_LEASE_LIMIT.to_string(), WATCH_LIMIT.to_string());
    let kine = spawn_kine_with(
        Backend::Postgres,
        &[
            "--gateway",
            "--gateway-create-tenants",
            "--server-cert-file",
            &cert,
            "--server-key-file",
            &key,
            "--trusted-ca-file",
            &ca,
            "--max-leases-per-tenant",
            &leases,
            "--max-watches-per-stream",
            &watches,
        ],
    );
    let output = Command::new(kine_load_binary())
        .args(["noisy-neighbour", "--json", "--tls-domain", "localhost"])
        .arg("--endpoints")
        .arg(format!("https://{}", kine.address))
        .arg("--pki-dir")
        .arg(pki.path())
        .args(["--server-pid", &kine.pid().to_string()])
        .args(["--clients", "16", "--conns", "4", "--duration", "3"])
        .args(["--a-keys", "20000", "--a-huge-txn-clients", "2"])
        .args(["--a-watches", &(A_WATCH_STREAMS * 1000).to_string()])
        .args(["--a-leases", &(2 * A_LEASE_LIMIT).to_string()])
        .args(["--a-slow-watchers", &A_SLOW_WATCHERS.to_string()])
        .output()
        .context("running kine-load noisy-neighbour")?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.success(),
        "kine-load noisy-neighbour failed: {stderr}"
    );
    let report: Value = serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "kine-load's report: {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })?;
    println!("{report}");

    ensure!(
        report["errors"].as_u64() == Some(0),
        "wrong or failed answers: {} (first: {})",
        report["errors"],
        report["first_error"]
    );
    ensure!(
        report["ops"].as_u64().unwrap_or(0) > 0 && extra(&report, "alone_ops_per_sec")? > 0.0,
        "B created nothing: {report}"
    );
    // A's load ran, each part of it.
    for part in [
        "a_keepalives",
        "a_huge_txns",
        "a_big_puts",
        "a_small_puts",
        "a_watch_events",
    ] {
        ensure!(
            extra(&report, part)? > 0.0,
            "A's {part} did not run: {report}"
        );
    }
    ensure!(
        extra(&report, "a_slow_watchers_open")? == A_SLOW_WATCHERS as f64,
        "A's never-reading watchers were not all open: {report}"
    );
    // A met its own limits: half its leases and half of each stream's watches were refused;
    // B, in the same gateway, was not limited by them (its lease came through: no error).
    ensure!(
        extra(&report, "a_leases_granted")? == A_LEASE_LIMIT as f64,
        "A got {} leases, the tenant limit is {A_LEASE_LIMIT}",
        extra(&report, "a_leases_granted")?
    );
    ensure!(
        extra(&report, "a_watches_open")? == (A_WATCH_STREAMS * WATCH_LIMIT) as f64,
        "A has {} watches open, the limit allows {} on its {A_WATCH_STREAMS} streams",
        extra(&report, "a_watches_open")?,
        A_WATCH_STREAMS * WATCH_LIMIT
    );
    let peak = extra(&report, "rss_peak_mib")?;
    ensure!(
        peak < RSS_BOUND_MIB,
        "the gateway's memory peaked at {peak:.0} MiB under A's load (bound {RSS_BOUND_MIB} MiB)"
    );
    Ok(())
}
