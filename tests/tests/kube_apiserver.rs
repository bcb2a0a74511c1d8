//! The yardstick "kube-apiserver runs on kine-rs": a real kube-apiserver (v1.36.3, built from
//! Go modules by `scripts/peers.sh`) stores its state in kine-rs, on SQLite, PostgreSQL and
//! MySQL/MariaDB, and the real kubectl drives it: create a namespace and configmaps, update,
//! list, delete, a conflicting update with a stale resourceVersion, `kubectl get --watch`
//! seeing a change made meanwhile, a raw watch from an old resourceVersion, and the
//! apiserver's own compactor compacting kine-rs.
//!
//! The binaries come from `$KUBE_APISERVER_BIN` and `$KUBECTL_BIN` (`scripts/test.sh` builds
//! them and sets both), else from `scripts/peers.sh`'s cache. Missing binaries fail the tests:
//! run `scripts/peers.sh`.
//!
//! Every backend is a test of its own (a kube-apiserver takes seconds to become ready).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kine_tests::{Backend, ChildGuard, TestDatabase, free_port, spawn_etcd, spawn_kine_logged};

/// The Kubernetes version `scripts/peers.sh` builds.
const KUBE_VERSION: &str = "v1.36.3";

/// How long kube-apiserver may take to answer `/readyz` with `ok`.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// How long one kubectl command may take.
const KUBECTL_TIMEOUT: Duration = Duration::from_secs(60);

/// The bearer token of the `system:masters` user in the token file.
const TOKEN: &str = "kine-rs-test-token";

/// The apiserver's compaction interval (the default is 5 minutes): short, so that its
/// compactor (a txn on `compact_rev_key`, then Compact) runs against kine-rs during the test.
const COMPACTION_INTERVAL: &str = "2s";

#[test]
fn kube_apiserver_on_sqlite() {
    run(Backend::Sqlite);
}

#[test]
fn kube_apiserver_on_postgres() {
    run(Backend::Postgres);
}

#[test]
fn kube_apiserver_on_mysql() {
    run(Backend::Mysql);
}

#[test]
fn kube_apiserver_on_nats() {
    run(Backend::Nats);
}

/// Through the etcd proxy, on a real etcd (etcd 3.5.1, the test oracle's binary).
#[test]
fn kube_apiserver_on_etcd_proxy() {
    run_on(Store::EtcdProxy);
}

/// kube-apiserver on a gateway (mTLS, its client certificate names tenant `t`) keeps
/// serving while the gateway moves `t` from PostgreSQL to MariaDB (`kine-rs tenant migrate`):
/// a `kubectl get -w` started before the move goes on and shows what is created after it,
/// objects keep their resourceVersions, and writes after the move get later ones.
#[test]
fn kube_apiserver_through_a_gateway_migration() {
    let cluster = Cluster::start(Store::Gateway);
    cluster.kubectl(&["create", "namespace", "move"]);
    for i in 0..5 {
        cluster.kubectl(&[
            "-n",
            "move",
            "create",
            "configmap",
            &format!("before-{i}"),
            "--from-literal=a=1",
        ]);
    }
    let before = cluster.resource_version("move", "configmap/before-4");

    let mut watch = cluster
        .command(&["-n", "move", "get", "configmaps", "-w", "-o", "name"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl get -w");
    let stdout = watch.stdout.take().expect("stdout");
    let (lines, seen) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let wait_for = |name: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match seen.recv_timeout(left) {
                Ok(line) if line.trim() == name => return,
                Ok(_) => {}
                Err(e) => panic!("kubectl get -w did not show {name}: {e}"),
            }
        }
    };
    wait_for("configmap/before-4");

    let target = TestDatabase::new(Backend::Mysql).expect("mysql");
    let socket = cluster.admin_socket.clone().expect("admin socket");
    let mut migrate = Command::new(kine_tests::kine_rs_binary());
    migrate
        .args(["tenant", "--admin-socket", &socket, "-o", "json"])
        .args(["migrate", "t", "--to", &target.endpoint]);
    let moved = run_bounded(migrate, Duration::from_secs(180));
    assert!(
        moved.status.success(),
        "kine-rs tenant migrate failed: {}\n{}",
        moved.stdout,
        moved.stderr
    );
    // The summary: the target took over at or after the last revision the apiserver had
    // written, with everything the apiserver wrote copied (as keys or as events).
    let summary: serde_json::Value = moved
        .stdout
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| panic!("no JSON summary: {}", moved.stdout));
    eprintln!("moved: {summary}");
    let count = |field: &str| summary[field].as_u64().unwrap_or(0);
    assert!(count("revision") >= before, "{summary}");
    assert!(count("keys") + count("events") >= 5, "{summary}");

    for i in 0..5 {
        cluster.kubectl(&[
            "-n",
            "move",
            "create",
            "configmap",
            &format!("after-{i}"),
            "--from-literal=a=2",
        ]);
    }
    for i in 0..5 {
        wait_for(&format!("configmap/after-{i}"));
    }
    assert!(
        watch.try_wait().expect("try_wait").is_none(),
        "kubectl get -w ended across the move"
    );
    assert_eq!(
        cluster.resource_version("move", "configmap/before-4"),
        before
    );
    assert!(cluster.resource_version("move", "configmap/after-0") > before);
    cluster.kubectl(&["-n", "move", "delete", "configmap", "before-0"]);
    let listed = cluster.kubectl(&["-n", "move", "get", "configmaps", "-o", "name"]);
    assert!(
        !listed.contains("configmap/before-0") && listed.contains("configmap/after-4"),
        "{listed}"
    );
    let _ = watch.kill();
    let _ = watch.wait();
}

/// What kine-rs stores the apiserver's state in.
#[derive(Debug, Clone, Copy)]
enum Store {
    Backend(Backend),
    EtcdProxy,
    /// A gateway (mTLS, tenant `t` = the apiserver's client certificate) on PostgreSQL,
    /// with an admin socket.
    Gateway,
}

/// A program from `$VAR`, else from `scripts/peers.sh`'s cache; panics when missing.
fn peer_binary(var: &str, name: &str) -> PathBuf {
    let path = match std::env::var_os(var) {
        Some(path) => PathBuf::from(path),
        None => {
            let home = std::env::var_os("HOME").expect("HOME is not set");
            let cache = std::env::var_os("KINE_PEERS_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(&home).join(".cache/kine-rs-peers"));
            cache.join(format!("{name}-{KUBE_VERSION}")).join(name)
        }
    };
    assert!(
        path.is_file(),
        "{name} is missing at {} (${var}): run scripts/peers.sh (scripts/test.sh does) to build \
         kube-apiserver and kubectl {KUBE_VERSION} from Go modules",
        path.display()
    );
    path
}

/// What a finished command printed.
struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `command` with its output captured, killing it after `timeout`.
fn run_bounded(mut command: Command, timeout: Duration) -> Output {
    let what = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let stdout = read_all(child.stdout.take().expect("stdout"));
    let stderr = read_all(child.stderr.take().expect("stderr"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} did not finish within {timeout:?}; it printed:\n{}\n{}",
                stdout.join().unwrap_or_default(),
                stderr.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

fn read_all(mut from: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = from.read_to_string(&mut text);
        text
    })
}

/// The last `lines` lines of a log file.
fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A kube-apiserver on kine-rs, and kubectl pointed at it.
struct Cluster {
    apiserver: Child,
    kine: ChildGuard,
    /// The etcd behind the etcd proxy (stopped after kine-rs).
    _etcd: Option<ChildGuard>,
    kubectl: PathBuf,
    kubeconfig: PathBuf,
    cache_dir: PathBuf,
    apiserver_log: PathBuf,
    kine_log: PathBuf,
    /// The gateway's admin socket (`Store::Gateway`).
    admin_socket: Option<String>,
    _pki_dir: tempfile::TempDir,
    _dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.apiserver.kill();
        let _ = self.apiserver.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- kube-apiserver log (last 60 lines of {}):\n{}",
                self.apiserver_log.display(),
                log_tail(&self.apiserver_log, 60)
            );
            eprintln!(
                "--- kine-rs log (last 40 lines of {}):\n{}",
                self.kine_log.display(),
                log_tail(&self.kine_log, 40)
            );
        }
    }
}

impl Cluster {
    /// Starts kine-rs on `backend` and a kube-apiserver on it; waits for `/readyz`.
    fn start(store: Store) -> Cluster {
        let apiserver_bin = peer_binary("KUBE_APISERVER_BIN", "kube-apiserver");
        let kubectl = peer_binary("KUBECTL_BIN", "kubectl");

        let kine_dir = tempfile::tempdir().expect("tempdir");
        let (database, etcd) = match store {
            Store::Backend(backend) => (TestDatabase::new(backend), None),
            Store::EtcdProxy => (None, Some(spawn_etcd())),
            Store::Gateway => (TestDatabase::new(Backend::Postgres), None),
        };
        let endpoint = match (&database, &etcd) {
            (Some(database), _) => database.endpoint.clone(),
            (None, Some(etcd)) => format!("etcd://{}", etcd.address),
            (None, None) => format!("sqlite://{}", kine_dir.path().join("state.db").display()),
        };
        // kine-rs's own compaction is off: only the apiserver's compactor compacts here.
        let mut kine_args = vec!["--compact-interval".to_string(), "0".to_string()];
        let pki_dir = tempfile::tempdir().expect("tempdir");
        let pki = kine_tests::pki::Pki::write(pki_dir.path(), &["t"]);
        let gateway = matches!(store, Store::Gateway);
        let admin_socket = gateway.then(|| {
            pki_dir
                .path()
                .join("admin.sock")
                .to_string_lossy()
                .into_owned()
        });
        if let Some(socket) = &admin_socket {
            kine_args.extend(
                [
                    "--gateway",
                    "--gateway-create-tenants",
                    "--server-cert-file",
                    &pki.server_cert,
                    "--server-key-file",
                    &pki.server_key,
                    "--trusted-ca-file",
                    &pki.ca,
                    "--admin-socket",
                    socket,
                ]
                .map(String::from),
            );
        }
        let kine_args: Vec<&str> = kine_args.iter().map(String::as_str).collect();
        let (mut kine, kine_log) = spawn_kine_logged(&endpoint, kine_dir, &kine_args);
        kine.database = database;
        let etcd_flags: Vec<String> = if gateway {
            let (cert, key) = pki.client("t");
            vec![
                format!("--etcd-servers=https://{}", kine.address),
                format!("--etcd-cafile={}", pki.ca),
                format!("--etcd-certfile={cert}"),
                format!("--etcd-keyfile={key}"),
            ]
        } else {
            vec![format!("--etcd-servers={}", kine.endpoint)]
        };

        let dir = tempfile::tempdir().expect("tempdir");
        // One ECDSA P-256 key signs service-account tokens (PKCS#8 PEM), its public half
        // verifies them (kube-apiserver takes RSA or ECDSA keys).
        let key_pair = rcgen::KeyPair::generate().expect("service-account key");
        let key = dir.path().join("sa.key");
        std::fs::write(&key, key_pair.serialize_pem()).expect("write key");
        let public_key = dir.path().join("sa.pub");
        std::fs::write(&public_key, key_pair.public_key_pem()).expect("write public key");
        let tokens = dir.path().join("tokens.csv");
        std::fs::write(&tokens, format!("{TOKEN},admin,admin,system:masters\n"))
            .expect("write token file");
        let port = free_port();
        let apiserver_log = dir.path().join("kube-apiserver.log");
        let log = std::fs::File::create(&apiserver_log).expect("log file");
        let apiserver = Command::new(&apiserver_bin)
            .args(&etcd_flags)
            .arg(format!("--etcd-compaction-interval={COMPACTION_INTERVAL}"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={port}"))
            .arg(format!("--cert-dir={}", dir.path().join("certs").display()))
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!(
                "--service-account-key-file={}",
                public_key.display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                key.display()
            ))
            .arg(format!("--token-auth-file={}", tokens.display()))
            .arg("--authorization-mode=AlwaysAllow")
            .arg("--service-cluster-ip-range=10.96.0.0/16")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", apiserver_bin.display()));

        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\n\
                 clusters:\n- name: kine\n  cluster:\n    server: https://127.0.0.1:{port}\n    \
                 insecure-skip-tls-verify: true\n\
                 users:\n- name: admin\n  user:\n    token: {TOKEN}\n\
                 contexts:\n- name: kine\n  context:\n    cluster: kine\n    user: admin\n\
                 current-context: kine\n"
            ),
        )
        .expect("write kubeconfig");
        let cluster = Cluster {
            apiserver,
            kine,
            _etcd: etcd,
            kubectl,
            kubeconfig,
            cache_dir: dir.path().join("kubectl-cache"),
            apiserver_log,
            kine_log,
            admin_socket,
            _pki_dir: pki_dir,
            _dir: dir,
        };
        cluster.wait_ready();
        cluster
    }

    /// A kubectl command pointed at the apiserver.
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.kubectl);
        command
            .env("KUBECONFIG", &self.kubeconfig)
            .arg(format!("--cache-dir={}", self.cache_dir.display()))
            .args(args);
        command
    }

    /// Runs kubectl and returns what it printed; panics when it fails.
    fn kubectl(&self, args: &[&str]) -> String {
        let output = self.try_kubectl(args);
        assert!(
            output.status.success(),
            "kubectl {args:?} failed ({}):\n{}\n{}",
            output.status,
            output.stdout,
            output.stderr
        );
        output.stdout
    }

    /// Runs kubectl, whatever its outcome.
    fn try_kubectl(&self, args: &[&str]) -> Output {
        run_bounded(self.command(args), KUBECTL_TIMEOUT)
    }

    fn wait_ready(&self) {
        let started = Instant::now();
        loop {
            let output = run_bounded(
                self.command(&["get", "--raw=/readyz", "--request-timeout=5s"]),
                KUBECTL_TIMEOUT,
            );
            if output.status.success() && output.stdout.trim() == "ok" {
                eprintln!(
                    "kube-apiserver ready after {:.1}s",
                    started.elapsed().as_secs_f64()
                );
                return;
            }
            let last = format!("{}{}", output.stdout, output.stderr);
            if started.elapsed() > READY_TIMEOUT {
                // The verbose form names the failing checks.
                let verbose = run_bounded(
                    self.command(&["get", "--raw=/readyz?verbose", "--request-timeout=5s"]),
                    KUBECTL_TIMEOUT,
                );
                panic!(
                    "kube-apiserver on kine-rs was not ready within {READY_TIMEOUT:?}: {last}\n{}{}",
                    verbose.stdout, verbose.stderr
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The `metadata.resourceVersion` of a namespaced object, as a number.
    fn resource_version(&self, namespace: &str, object: &str) -> u64 {
        let rv = self.kubectl(&[
            "-n",
            namespace,
            "get",
            object,
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ]);
        rv.trim()
            .parse()
            .unwrap_or_else(|e| panic!("resourceVersion of {object} is not a number: {rv:?}: {e}"))
    }

    /// The configmap's `data.a`.
    fn data_a(&self, namespace: &str, name: &str) -> String {
        self.kubectl(&[
            "-n",
            namespace,
            "get",
            "configmap",
            name,
            "-o",
            "jsonpath={.data.a}",
        ])
    }
}

fn run(backend: Backend) {
    run_on(Store::Backend(backend));
}

fn run_on(store: Store) {
    let started = Instant::now();
    let cluster = Cluster::start(store);
    let ns = "kine-test";

    // The apiserver is the version built, and it reaches its storage.
    let version = cluster.kubectl(&["version", "-o", "json"]);
    let version: serde_json::Value = serde_json::from_str(&version).expect("version json");
    assert_eq!(
        version["serverVersion"]["gitVersion"], KUBE_VERSION,
        "{version}"
    );
    let readyz = cluster.kubectl(&["get", "--raw=/readyz?verbose"]);
    assert!(readyz.contains("[+]etcd ok"), "{readyz}");
    // The bootstrap objects kube-apiserver writes while starting are there.
    let namespaces = cluster.kubectl(&["get", "namespaces", "-o", "name"]);
    for expected in ["namespace/default", "namespace/kube-system"] {
        assert!(namespaces.lines().any(|l| l == expected), "{namespaces}");
    }
    // (Not RBAC's bootstrap roles: with --authorization-mode=AlwaysAllow that hook is off.)
    let classes = cluster.kubectl(&["get", "priorityclasses", "-o", "name"]);
    for expected in [
        "priorityclass.scheduling.k8s.io/system-cluster-critical",
        "priorityclass.scheduling.k8s.io/system-node-critical",
    ] {
        assert!(classes.lines().any(|l| l == expected), "{classes}");
    }

    // Create.
    let out = cluster.kubectl(&["create", "namespace", ns]);
    assert_eq!(out.trim(), format!("namespace/{ns} created"));
    let out = cluster.kubectl(&["-n", ns, "create", "configmap", "cm1", "--from-literal=a=1"]);
    assert_eq!(out.trim(), "configmap/cm1 created");
    let out = cluster.try_kubectl(&["-n", ns, "create", "configmap", "cm1", "--from-literal=a=9"]);
    assert!(
        !out.status.success() && out.stderr.contains("already exists"),
        "creating cm1 twice: {}{}",
        out.stdout,
        out.stderr
    );
    let rv1 = cluster.resource_version(ns, "configmap/cm1");
    assert_eq!(cluster.data_a(ns, "cm1"), "1");

    // Update: the resourceVersion increases.
    let out = cluster.kubectl(&[
        "-n",
        ns,
        "patch",
        "configmap",
        "cm1",
        "--type=merge",
        "-p",
        r#"{"data":{"a":"2"}}"#,
    ]);
    assert_eq!(out.trim(), "configmap/cm1 patched");
    let rv2 = cluster.resource_version(ns, "configmap/cm1");
    assert!(rv2 > rv1, "resourceVersion {rv1} -> {rv2} after an update");
    assert_eq!(cluster.data_a(ns, "cm1"), "2");

    // An update that names the stale resourceVersion is refused (optimistic concurrency:
    // the apiserver's txn compares the key's mod revision in kine-rs).
    let stale = format!(
        r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"cm1","namespace":"{ns}","resourceVersion":"{rv1}"}},"data":{{"a":"stale"}}}}"#
    );
    let stale_file = cluster.cache_dir.with_file_name("stale.json");
    std::fs::write(&stale_file, stale).expect("write stale object");
    let out = cluster.try_kubectl(&["replace", "-f", &stale_file.display().to_string()]);
    assert!(
        !out.status.success() && out.stderr.contains("the object has been modified"),
        "replace with the stale resourceVersion {rv1}: {}{}",
        out.stdout,
        out.stderr
    );
    assert_eq!(cluster.data_a(ns, "cm1"), "2");
    assert_eq!(cluster.resource_version(ns, "configmap/cm1"), rv2);

    // List.
    cluster.kubectl(&["-n", ns, "create", "configmap", "cm2", "--from-literal=a=x"]);
    let rv_cm2 = cluster.resource_version(ns, "configmap/cm2");
    assert!(rv_cm2 > rv2, "cm2 created at {rv_cm2}, after cm1's {rv2}");
    // (The server's list, not kubectl's client-side List, which has no resourceVersion.)
    let list = cluster.kubectl(&["get", &format!("--raw=/api/v1/namespaces/{ns}/configmaps")]);
    let list: serde_json::Value = serde_json::from_str(&list).expect("list json");
    let mut names: Vec<&str> = list["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|item| item["metadata"]["name"].as_str())
        .filter(|name| *name != "kube-root-ca.crt")
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["cm1", "cm2"], "{list}");
    let list_rv: u64 = list["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|rv| rv.parse().ok())
        .expect("list resourceVersion");
    assert!(list_rv >= rv_cm2, "list at {list_rv}, cm2 at {rv_cm2}");

    // `kubectl get --watch` lists, then watches: a change made meanwhile arrives.
    let mut watch = cluster
        .command(&[
            "-n",
            ns,
            "get",
            "configmaps",
            "--watch",
            "--request-timeout=60s",
            "-o",
            r#"jsonpath={.metadata.name}={.data.a}{"\n"}"#,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kubectl get --watch");
    let watch_stderr = read_all(watch.stderr.take().expect("stderr"));
    let (lines_tx, lines) = mpsc::channel();
    let watch_stdout = BufReader::new(watch.stdout.take().expect("stdout"));
    std::thread::spawn(move || {
        for line in watch_stdout.lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let mut expect_line = |expected: &str, seen: &mut Vec<String>| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !seen.iter().any(|l| l == expected) {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => seen.push(line),
                Err(_) => {
                    let _ = watch.kill();
                    let _ = watch.wait();
                    panic!(
                        "kubectl get --watch did not print {expected:?} within 30s; it printed \
                         {seen:?}"
                    );
                }
            }
        }
    };
    // The initial list (the watch starts from its resourceVersion).
    expect_line("cm1=2", &mut seen);
    expect_line("cm2=x", &mut seen);
    cluster.kubectl(&[
        "-n",
        ns,
        "patch",
        "configmap",
        "cm1",
        "--type=merge",
        "-p",
        r#"{"data":{"a":"3"}}"#,
    ]);
    expect_line("cm1=3", &mut seen);
    cluster.kubectl(&[
        "-n",
        ns,
        "create",
        "configmap",
        "cm3",
        "--from-literal=a=new",
    ]);
    expect_line("cm3=new", &mut seen);
    let _ = watch.kill();
    let _ = watch.wait();
    let _ = watch_stderr.join();
    let rv3 = cluster.resource_version(ns, "configmap/cm1");
    assert!(
        rv3 > rv2,
        "resourceVersion {rv2} -> {rv3} after the second update"
    );

    // A watch from an old resourceVersion replays what happened after it, in order.
    let events = cluster.kubectl(&[
        "get",
        &format!("--raw=/api/v1/namespaces/{ns}/configmaps?watch=true&resourceVersion={rv1}&timeoutSeconds=3"),
    ]);
    let events: Vec<(String, String, u64)> = events
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let event: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("watch event {l:?}: {e}"));
            let object = &event["object"];
            (
                event["type"].as_str().unwrap_or_default().to_string(),
                format!(
                    "{}={}",
                    object["metadata"]["name"].as_str().unwrap_or_default(),
                    object["data"]["a"].as_str().unwrap_or_default()
                ),
                object["metadata"]["resourceVersion"]
                    .as_str()
                    .and_then(|rv| rv.parse().ok())
                    .unwrap_or(0),
            )
        })
        .collect();
    let kinds: Vec<(&str, &str)> = events
        .iter()
        .filter(|(kind, _, _)| kind != "BOOKMARK")
        .map(|(kind, what, _)| (kind.as_str(), what.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("MODIFIED", "cm1=2"),
            ("ADDED", "cm2=x"),
            ("MODIFIED", "cm1=3"),
            ("ADDED", "cm3=new"),
        ],
        "watch from resourceVersion {rv1}: {events:?}"
    );
    assert_eq!(events[0].2, rv2, "{events:?}");
    assert_eq!(events[2].2, rv3, "{events:?}");
    assert!(
        events.windows(2).all(|w| w[0].2 < w[1].2),
        "watch events out of resourceVersion order: {events:?}"
    );

    // Delete.
    let out = cluster.kubectl(&["-n", ns, "delete", "configmap", "cm1"]);
    assert!(out.starts_with("configmap \"cm1\" deleted"), "{out}");
    let out = cluster.try_kubectl(&["-n", ns, "get", "configmap", "cm1"]);
    assert!(
        !out.status.success() && out.stderr.contains("NotFound"),
        "cm1 after its deletion: {}{}",
        out.stdout,
        out.stderr
    );
    let names = cluster.kubectl(&["-n", ns, "get", "configmaps", "-o", "name"]);
    let mut names: Vec<&str> = names
        .lines()
        .filter(|l| *l != "configmap/kube-root-ca.crt")
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["configmap/cm2", "configmap/cm3"]);
    // Without a namespace controller (kube-controller-manager) the namespace stays
    // Terminating: the apiserver's part of the deletion is to mark it so.
    cluster.kubectl(&["delete", "namespace", ns, "--wait=false"]);
    let phase = cluster.kubectl(&["get", "namespace", ns, "-o", "jsonpath={.status.phase}"]);
    assert_eq!(phase, "Terminating");

    // The apiserver's compactor (every COMPACTION_INTERVAL) has compacted kine-rs: reading
    // at revision 1 is refused as compacted.
    let kine_endpoint = cluster.kine.endpoint.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut client = etcd_client::Client::connect([kine_endpoint.as_str()], None)
            .await
            .expect("connect to kine-rs");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let result = client
                .get(
                    "/registry/",
                    Some(
                        etcd_client::GetOptions::new()
                            .with_prefix()
                            .with_revision(1)
                            .with_count_only(),
                    ),
                )
                .await;
            match result {
                Err(e)
                    if e.to_string()
                        .contains("required revision has been compacted") =>
                {
                    break;
                }
                other => {
                    assert!(
                        Instant::now() < deadline,
                        "kube-apiserver's compactor did not compact kine-rs within 30s: {other:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    });
    eprintln!(
        "kube-apiserver on kine-rs ({store:?}): passed in {:.1}s",
        started.elapsed().as_secs_f64()
    );
}
