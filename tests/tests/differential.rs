//! Differential test: the same random operation sequences against a real etcd (the oracle) and
//! kine-rs, comparing every response (see `kine_tests::differential` for what is compared,
//! what is ignored and why, and the one named etcd bug the comparison does not copy).
//!
//! `DIFF_SEED` (number, 0x-hex or `random`), `DIFF_OPS` (default 10,000), `DIFF_TARGET`
//! (`kine-rs`, the default, `proxy` for kine-rs's etcd proxy in front of a private etcd, or
//! `etcd` to validate the harness against a second etcd) and
//! `DIFF_BACKEND` (`memory`, `sqlite`, `postgres`, `mysql` or `nats`) tune a run; the seed is always printed.

use kine_tests::Backend;
use kine_tests::differential::{Config, Target, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_sequences_match_etcd() {
    let cfg = Config::from_env().expect("DIFF_* environment variables");
    match run(&cfg).await {
        Ok(summary) => assert!(
            summary.ops >= cfg.ops,
            "ran {} operations of {}",
            summary.ops,
            cfg.ops
        ),
        Err(report) => panic!("{report:#}"),
    }
}

/// More seeds, on every backend, and a self-check of the harness with etcd on both sides
/// (it must never find a difference). Shorter sequences than the main run, to keep CI fast.
async fn matrix_run(seed: u64, target: Target) {
    let cfg = Config {
        seed,
        ops: 3_000,
        target,
        trace: false,
    };
    match run(&cfg).await {
        Ok(summary) => assert!(summary.ops >= cfg.ops, "ran {} operations", summary.ops),
        Err(report) => panic!("{report:#}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_seed_2_matches_etcd() {
    matrix_run(2, Target::KineRs(Backend::Sqlite)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_seed_3_matches_etcd() {
    matrix_run(3, Target::KineRs(Backend::Postgres)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_seed_4_matches_etcd() {
    matrix_run(4, Target::KineRs(Backend::Mysql)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_seed_5_matches_etcd() {
    matrix_run(5, Target::KineRs(Backend::Memory)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_self_check_etcd_against_etcd() {
    matrix_run(6, Target::Etcd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_seed_7_matches_etcd() {
    matrix_run(7, Target::KineRs(Backend::Nats)).await;
}

/// Through the etcd proxy (tenant `t` of a private etcd): its revisions are etcd's, with
/// gaps where kine-rs's own records took one; they are mapped to the oracle's write by
/// write, never ignored (`kine_tests::differential` `revmap`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_proxy_seed_8_matches_etcd() {
    matrix_run(8, Target::EtcdProxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_proxy_seed_9_matches_etcd() {
    matrix_run(9, Target::EtcdProxy).await;
}
