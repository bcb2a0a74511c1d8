//! The yardstick "the Kubernetes apiserver storage test suite passes": Kubernetes' own tests of
//! its etcd3 storage layer (`k8s.io/apiserver/pkg/storage/etcd3` of v0.36.3, the suite kine runs
//! as its conformance test: creates, gets, guaranteed updates, conditional deletes, paginated
//! and consistent lists, watches from every kind of resourceVersion, progress notifications,
//! compaction, leases) against kine-rs on SQLite, PostgreSQL, MySQL/MariaDB and NATS.
//!
//! `scripts/peers.sh` builds the suite's test binary from the module, with
//! `tests/apiserver-storage/test_server.go` in place of the file that starts an embedded etcd:
//! every server a test asks for is a kine-rs process of its own (this checkout's debug build),
//! serving a keyspace of its own (a SQLite file in the test's directory, or a tenant of one
//! shared database or bucket). The binary comes from `$APISERVER_STORAGE_TEST_BIN`, else from
//! `scripts/peers.sh`'s cache; a missing binary, or one built from another `test_server.go`,
//! fails the test. Every test the binary lists must pass: a partial run fails too.
//!
//! The suite is run unchanged: kine's own run of it edits two of its tests (one expecting the
//! revision of a fresh etcd, one timeout); kine-rs needs neither.
//!
//! Through the etcd proxy (on a real etcd 3.5.1) the tenants share the cluster's revisions and
//! history (README, "The etcd proxy"), and the tests that count on a fresh etcd of their own
//! fail: exactly those, each named below with why, and every other test must pass.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use kine_tests::{Backend, TestDatabase, kine_rs_binary, peer_binary, spawn_etcd_with};

/// Where `scripts/peers.sh` builds the suite, under its cache.
const SUITE: &str = "apiserver-storage-v0.36.3/etcd3.test";

/// Fewer tests than this listed means the binary is not the suite.
const MIN_TESTS: usize = 70;

/// The tests that fail through the etcd proxy, and why: what a tenant of a shared etcd sees
/// differently from a fresh etcd of its own.
const ETCD_PROXY_DIFFERENCES: &[(&str, &str)] = &[
    (
        "TestCompactConflict",
        "a tenant's compaction stores its record in etcd, which takes a revision of the \
         cluster: the revision after a compaction is one more than on etcd",
    ),
    (
        "TestList",
        "the same record: its consistent lists after a compaction expect the revision of the \
         compaction's own write, and its 'future' revision exists",
    ),
    (
        "TestEtcdWatchSemantics",
        "a watch from revision 1 in a tenant created after other tenants compacted the \
         shared etcd is compacted, as on that etcd",
    ),
    (
        "TestEtcdWatchSemanticsWithConcurrentDecode",
        "the same: a watch from revision 1",
    ),
    (
        "TestTooLargeResourceVersionErrorForWatchList",
        "revision 102 is not in the future of a cluster other tenants wrote to",
    ),
];

#[test]
fn apiserver_storage_suite_on_sqlite() {
    run("SQLite", None, &[]);
}

#[test]
fn apiserver_storage_suite_on_postgres() {
    let database = TestDatabase::new(Backend::Postgres).expect("a PostgreSQL database");
    run("PostgreSQL", Some(&database.endpoint), &[]);
}

#[test]
fn apiserver_storage_suite_on_mysql() {
    let database = TestDatabase::new(Backend::Mysql).expect("a MySQL database");
    run("MySQL", Some(&database.endpoint), &[]);
}

#[test]
fn apiserver_storage_suite_on_nats() {
    let database = TestDatabase::new(Backend::Nats).expect("a NATS bucket");
    run("NATS", Some(&database.endpoint), &[]);
}

/// Through the etcd proxy, each test a tenant of one etcd 3.5.1. The proxy's progress
/// notifications are etcd's, so etcd sends them at the 1 s the progress tests ask of the
/// server.
#[test]
fn apiserver_storage_suite_on_etcd_proxy() {
    let etcd = spawn_etcd_with(&[
        "--max-txn-ops",
        "256",
        "--experimental-watch-progress-notify-interval",
        "1s",
    ]);
    run(
        "the etcd proxy",
        Some(&format!("etcd://{}", etcd.address)),
        ETCD_PROXY_DIFFERENCES,
    );
}

/// The suite's test binary, checked to be built from this checkout's test server.
fn suite_binary() -> PathBuf {
    let binary = peer_binary(
        "APISERVER_STORAGE_TEST_BIN",
        SUITE,
        "Kubernetes' apiserver storage tests",
    );
    let ours = Path::new(env!("CARGO_MANIFEST_DIR")).join("apiserver-storage/test_server.go");
    let built_from = binary.with_file_name("test_server.go");
    assert!(
        fs::read(&ours).ok().is_some() && fs::read(&ours).ok() == fs::read(&built_from).ok(),
        "{} was not built from {}: run scripts/peers.sh",
        binary.display(),
        ours.display()
    );
    binary
}

/// Runs the whole suite against kine-rs on `endpoint` (`{dir}` standing for each test's
/// directory; a SQLite file there when `None`), and fails unless every listed test passed
/// except exactly the `expected_failures`, which must fail.
fn run(label: &str, endpoint: Option<&str>, expected_failures: &[(&str, &str)]) {
    let binary = suite_binary();
    let dir = tempfile::tempdir().expect("tempdir");
    let listed = Command::new(&binary)
        .args(["-test.list", "^Test"])
        .current_dir(dir.path())
        .output()
        .expect("list the apiserver storage tests");
    assert!(
        listed.status.success(),
        "{} -test.list failed: {}",
        binary.display(),
        String::from_utf8_lossy(&listed.stderr)
    );
    let tests: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter(|line| line.starts_with("Test"))
        .map(str::to_string)
        .collect();
    assert!(
        tests.len() >= MIN_TESTS,
        "{} lists {} tests, expected at least {MIN_TESTS}",
        binary.display(),
        tests.len()
    );

    let log_path = dir.path().join("suite.log");
    let log = fs::File::create(&log_path).expect("create the suite's log");
    let mut command = Command::new(&binary);
    command
        .args(["-test.v", "-test.count", "1", "-test.parallel", "1"])
        .args(["-test.timeout", "15m"])
        .env("KINE_RS_BIN", kine_rs_binary())
        // The tests' directories, and kine-rs's sockets, are removed with `dir`.
        .env("TMPDIR", dir.path())
        .current_dir(dir.path())
        .stdout(log.try_clone().expect("clone the log's handle"))
        .stderr(log);
    if let Some(endpoint) = endpoint {
        command.env("KINE_RS_ENDPOINT", endpoint);
    }
    let status = command.status().expect("run the apiserver storage tests");
    let output = fs::read_to_string(&log_path).unwrap_or_default();

    // Top-level results only ("--- PASS: TestName (0.03s)"); subtests are indented.
    let passed: HashSet<&str> = output
        .lines()
        .filter_map(|line| line.strip_prefix("--- PASS: "))
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    let failed: Vec<&str> = output
        .lines()
        .filter(|line| line.trim_start().starts_with("--- FAIL: "))
        .collect();
    let not_passed: Vec<&str> = tests
        .iter()
        .map(String::as_str)
        .filter(|test| !passed.contains(test))
        .collect();
    let expected: Vec<&str> = expected_failures.iter().map(|(test, _)| *test).collect();
    let mut unexpected: Vec<&str> = not_passed
        .iter()
        .copied()
        .filter(|test| !expected.contains(test))
        .collect();
    // A difference that went away is news too: the list says what users meet.
    unexpected.extend(
        expected
            .iter()
            .copied()
            .filter(|test| passed.contains(test)),
    );
    if (expected.is_empty() && !status.success()) || !unexpected.is_empty() {
        let lines: Vec<&str> = output.lines().collect();
        let tail = lines[lines.len().saturating_sub(200)..].join("\n");
        panic!(
            "the apiserver storage tests on {label} ({status}): failed {failed:#?}, \
             not passed {not_passed:?}, expected to fail {expected:?}, unexpected \
             {unexpected:?}\n--- the end of their output:\n{tail}"
        );
    }
    eprintln!(
        "the apiserver storage tests on {label}: {} of {} passed, the others as expected: {:?}",
        passed.len(),
        tests.len(),
        expected
    );
}
