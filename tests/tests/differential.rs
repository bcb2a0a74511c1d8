//! Differential test: the same random operation sequences against a real etcd (the oracle) and
//! kine-rs, comparing every response (see `kine_tests::differential` for what is compared,
//! what is ignored and why, and the one named etcd bug the comparison does not copy).
//!
//! `DIFF_SEED` (number, 0x-hex or `random`), `DIFF_OPS` (default 10,000), `DIFF_TARGET`
//! (`kine-rs`, the default, or `etcd` to validate the harness against a second etcd) and
//! `DIFF_BACKEND` (`memory`, `sqlite`, `postgres`, `mysql` or `nats`) tune a run; the seed is always printed.

use kine_tests::differential::{Config, run};

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
