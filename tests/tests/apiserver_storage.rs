//! The yardstick "the Kubernetes apiserver storage test suite passes": Kubernetes' own tests of
//! its etcd3 storage layer (`k8s.io/apiserver/pkg/storage/etcd3`, the suite kine runs as its
//! conformance test: creates, gets, guaranteed updates, conditional deletes, paginated and
//! consistent lists, watches from every kind of resourceVersion, progress notifications,
//! compaction, leases) against kine-rs on SQLite, PostgreSQL, MySQL/MariaDB and NATS, in two
//! versions: Kubernetes 1.36's (v0.36.3, the kube-apiserver the other tests run) and 1.37's
//! (v0.37.0, whose lists stream with etcd 3.7's RangeStream).
//!
//! `scripts/peers.sh` builds each version's test binary from the module, with
//! `tests/apiserver-storage/test_server.go` (and the version's `recorder_v0.MINOR.go`) in place
//! of the file that starts an embedded etcd: every server a test asks for is a kine-rs process
//! of its own (this checkout's debug build), serving a keyspace of its own (a SQLite file in the
//! test's directory, or a tenant of one shared database or bucket). The binaries come from
//! `$APISERVER_STORAGE_V036_BIN` and `$APISERVER_STORAGE_V037_BIN`, else from
//! `scripts/peers.sh`'s cache; a missing binary, or one built from other sources, fails the
//! test. Every test the binary lists must pass: a partial run fails too.
//!
//! The suites are run unchanged: kine's own run edits two of their tests (one expecting the
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

/// A version of the suite `scripts/peers.sh` builds: k8s.io/apiserver's version, the variable
/// naming its binary, and the recorder file built into it beside `test_server.go`.
struct Suite {
    version: &'static str,
    variable: &'static str,
    recorder: &'static str,
    /// The tests that fail through the etcd proxy, and why: what a tenant of a shared etcd
    /// sees differently from a fresh etcd of its own.
    proxy_differences: &'static [(&'static str, &'static str)],
}

/// Kubernetes 1.36's, the version of the kube-apiserver the other tests run.
const V0_36: Suite = Suite {
    version: "v0.36.3",
    variable: "APISERVER_STORAGE_V036_BIN",
    recorder: "recorder_v0.36.go",
    proxy_differences: &[
        COMPACTION_RECORD,
        COMPACTION_RECORD_IN_LISTS,
        ("TestEtcdWatchSemantics", WATCH_FROM_REVISION_1),
        (
            "TestEtcdWatchSemanticsWithConcurrentDecode",
            WATCH_FROM_REVISION_1,
        ),
        FUTURE_REVISION,
    ],
};

/// Kubernetes 1.37's, whose storage lists with etcd 3.7's RangeStream.
const V0_37: Suite = Suite {
    version: "v0.37.0",
    variable: "APISERVER_STORAGE_V037_BIN",
    recorder: "recorder_v0.37.go",
    proxy_differences: &[
        COMPACTION_RECORD,
        COMPACTION_RECORD_IN_LISTS,
        // v0.37 runs the watch semantics as subtests of TestWatch.
        ("TestWatch", WATCH_FROM_REVISION_1),
        FUTURE_REVISION,
    ],
};

/// Fewer tests than this listed means the binary is not the suite.
const MIN_TESTS: usize = 65;

const COMPACTION_RECORD: (&str, &str) = (
    "TestCompactConflict",
    "a tenant's compaction stores its record in etcd, which takes a revision of the cluster: \
     the revision after a compaction is one more than on etcd",
);
const COMPACTION_RECORD_IN_LISTS: (&str, &str) = (
    "TestList",
    "the same record: its consistent lists after a compaction expect the revision of the \
     compaction's own write, and its 'future' revision exists",
);
const WATCH_FROM_REVISION_1: &str = "a watch from revision 1 in a tenant created after other \
     tenants compacted the shared etcd is compacted, as on that etcd";
const FUTURE_REVISION: (&str, &str) = (
    "TestTooLargeResourceVersionErrorForWatchList",
    "revision 102 is not in the future of a cluster other tenants wrote to",
);

/// One test per suite version and datastore.
macro_rules! suites {
    ($($name:ident: $suite:expr;)*) => {
        $(
            mod $name {
                use super::*;

                #[test]
                fn on_sqlite() {
                    run(&$suite, "SQLite", None, &[]);
                }

                #[test]
                fn on_postgres() {
                    let database = TestDatabase::new(Backend::Postgres).expect("a database");
                    run(&$suite, "PostgreSQL", Some(&database.endpoint), &[]);
                }

                #[test]
                fn on_mysql() {
                    let database = TestDatabase::new(Backend::Mysql).expect("a database");
                    run(&$suite, "MySQL", Some(&database.endpoint), &[]);
                }

                #[test]
                fn on_nats() {
                    let database = TestDatabase::new(Backend::Nats).expect("a bucket");
                    run(&$suite, "NATS", Some(&database.endpoint), &[]);
                }

                /// Through the etcd proxy, each test a tenant of one etcd 3.5.1. The proxy's
                /// progress notifications are etcd's, so etcd sends them at the 1 s the
                /// progress tests ask of the server.
                #[test]
                fn on_etcd_proxy() {
                    let etcd = spawn_etcd_with(&[
                        "--max-txn-ops",
                        "256",
                        "--experimental-watch-progress-notify-interval",
                        "1s",
                    ]);
                    run(
                        &$suite,
                        "the etcd proxy",
                        Some(&format!("etcd://{}", etcd.address)),
                        $suite.proxy_differences,
                    );
                }
            }
        )*
    };
}

suites! {
    kubernetes_1_36: V0_36;
    kubernetes_1_37: V0_37;
}

/// The suite's test binary, checked to be built from this checkout's test server.
fn suite_binary(suite: &Suite) -> PathBuf {
    let binary = peer_binary(
        suite.variable,
        &format!("apiserver-storage-{}/etcd3.test", suite.version),
        "Kubernetes' apiserver storage tests",
    );
    let ours = Path::new(env!("CARGO_MANIFEST_DIR")).join("apiserver-storage");
    let sources = [ours.join("test_server.go"), ours.join(suite.recorder)]
        .iter()
        .map(fs::read)
        .collect::<Result<Vec<_>, _>>()
        .map(|texts| texts.concat())
        .ok();
    let built_from = fs::read(binary.with_file_name("sources")).ok();
    assert!(
        sources.is_some() && sources == built_from,
        "{} was not built from {}: run scripts/peers.sh",
        binary.display(),
        ours.display()
    );
    binary
}

/// Runs the whole suite against kine-rs on `endpoint` (`{dir}` standing for each test's
/// directory; a SQLite file there when `None`), and fails unless every listed test passed
/// except exactly the `expected_failures`, which must fail.
fn run(suite: &Suite, label: &str, endpoint: Option<&str>, expected_failures: &[(&str, &str)]) {
    let label = format!("{label} (k8s.io/apiserver {})", suite.version);
    let binary = suite_binary(suite);
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
