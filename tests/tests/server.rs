//! The `kine-rs` process as an operator runs it: flags and their `KINE_*` variables, the
//! embedded default, unix sockets, mTLS (with the real `etcdctl`), metrics, and refusals.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kine_tests::{
    Backend, etcdctl_binary, free_port, kine_rs_binary, spawn_kine_on, spawn_kine_with,
};

fn etcdctl(args: &[&str]) -> Output {
    Command::new(etcdctl_binary())
        .env("ETCDCTL_API", "3")
        .args(["--command-timeout=5s", "--dial-timeout=3s"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run etcdctl")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs kine-rs with `args` expecting it to exit by itself, and returns its output.
fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut command = Command::new(kine_rs_binary());
    command
        .current_dir(dir.path())
        .args(args)
        .stdin(Stdio::null());
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kine-rs");
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("kine-rs {args:?} kept running; it was expected to refuse to start");
}

#[test]
fn a_kine_flag_we_do_not_support_is_refused_by_name() {
    let output = run_to_exit(&["--table-name", "kine"], &[]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--table-name is not supported"),
        "stderr: {stderr}"
    );
}

/// Flag values the server cannot run with are refused at start-up with a message naming the
/// flag, instead of a panic at the first timer or request (or a server that cannot serve).
#[test]
fn flags_that_would_break_the_server_are_refused_by_name() {
    let listen = format!("127.0.0.1:{}", free_port());
    let cases: &[(&[&str], &str)] = &[
        // A zero period panics tokio's interval when a watch asks for progress.
        (
            &["--watch-progress-notify-interval", "0"],
            "--watch-progress-notify-interval",
        ),
        (
            &["--watch-progress-notify-interval", "8761h"],
            "--watch-progress-notify-interval",
        ),
        // Longer than a year, or too large for a duration at all.
        (&["--compact-interval", "100000h"], "--compact-interval"),
        (
            &["--compact-interval", "99999999999999999999999999h"],
            "--compact-interval",
        ),
        (
            &["--slow-sql-threshold", "1000000000000000000000000s"],
            "--slow-sql-threshold",
        ),
        (
            &["--datastore-connection-max-lifetime", "87600h"],
            "--datastore-connection-max-lifetime",
        ),
        (
            &["--datastore-connection-max-idle-time", "600000m"],
            "--datastore-connection-max-idle-time",
        ),
        // Negative sizes.
        (&["--compact-min-retain=-1"], "--compact-min-retain"),
        (&["--quota-keys=-5"], "--quota-keys"),
        (&["--quota-backend-bytes=-1"], "--quota-backend-bytes"),
        // Zero where nothing could be served, and sizes past a gRPC message.
        (&["--max-request-bytes", "0"], "--max-request-bytes"),
        (
            &["--max-request-bytes", "18446744073709551615"],
            "--max-request-bytes",
        ),
        (&["--max-txn-ops", "0"], "--max-txn-ops"),
        // Limits of issue 14: zero would refuse every watch, lease or request.
        (
            &["--max-watches-per-stream", "0"],
            "--max-watches-per-stream",
        ),
        (&["--max-leases-per-tenant", "0"], "--max-leases-per-tenant"),
        (
            &["--sqlite-wal-limit-bytes", "0"],
            "--sqlite-wal-limit-bytes",
        ),
        (&["--max-leases-per-tenant=-1"], "--max-leases-per-tenant"),
        (
            &["--watch-stream-buffer-bytes", "100"],
            "--watch-stream-buffer-bytes",
        ),
        (
            &["--watch-hub-buffer-bytes", "0"],
            "--watch-hub-buffer-bytes",
        ),
        (
            &["--max-concurrent-streams", "0"],
            "--max-concurrent-streams",
        ),
        (
            &["--max-concurrent-streams", "4294967296"],
            "--max-concurrent-streams",
        ),
        (
            &["--grpc-keepalive-timeout", "0"],
            "--grpc-keepalive-timeout",
        ),
        (
            &["--grpc-keepalive-interval", "8761h"],
            "--grpc-keepalive-interval",
        ),
        (&["--tenant-idle-timeout", "5"], "--tenant-idle-timeout"),
    ];
    for (flags, name) in cases {
        let mut args = vec!["--endpoint", "memory://", "--listen-address", &listen];
        args.extend_from_slice(flags);
        let output = run_to_exit(&args, &[]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{flags:?} was accepted: {stderr}");
        assert!(!stderr.contains("panicked"), "{flags:?} panicked: {stderr}");
        assert!(
            stderr.contains(name),
            "{flags:?}: the message does not name {name}: {stderr}"
        );
    }
    // The same values through the flags' variables.
    let output = run_to_exit(
        &["--endpoint", "memory://", "--listen-address", &listen],
        &[("KINE_WATCH_PROGRESS_NOTIFY_INTERVAL", "0")],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("--watch-progress-notify-interval"),
        "{stderr}"
    );
}

#[test]
fn an_unknown_endpoint_scheme_is_refused() {
    let output = run_to_exit(&["--endpoint", "cassandra://db"], &[]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--endpoint scheme"), "stderr: {stderr}");
}

#[test]
fn database_tls_flags_are_refused_for_sqlite() {
    let output = run_to_exit(&["--endpoint", "memory://", "--ca-file", "ca.pem"], &[]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("do not apply"), "stderr: {stderr}");
}

#[test]
fn flags_come_from_kine_environment_variables() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let db = dir.path().join("env.db");
    let mut child = Command::new(kine_rs_binary())
        .current_dir(dir.path())
        .env("KINE_ENDPOINT", format!("sqlite://{}", db.display()))
        .env("KINE_LISTEN_ADDRESS", &address)
        .env("KINE_EMULATED_ETCD_VERSION", "3.6.1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start kine-rs");
    kine_tests::wait_for_port(&address, &mut child, "kine-rs");
    let status = etcdctl(&["--endpoints", &address, "endpoint", "status", "-w", "json"]);
    let _ = child.kill();
    let _ = child.wait();
    assert!(status.status.success(), "{status:?}");
    assert!(
        stdout(&status).contains("\"version\":\"3.6.1\""),
        "{}",
        stdout(&status)
    );
    assert!(db.exists(), "KINE_ENDPOINT was not used");
}

#[test]
fn without_flags_it_serves_127_0_0_1_2379_from_db_state_db() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port_free = std::net::TcpListener::bind("127.0.0.1:2379").is_ok();
    let mut child = Command::new(kine_rs_binary())
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kine-rs");
    if !port_free {
        // Something else owns the port here: kine-rs must say so and exit, not hang.
        let output = child.wait_with_output().expect("output");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("cannot listen on 127.0.0.1:2379"),
            "{stderr}"
        );
        return;
    }
    kine_tests::wait_for_port("127.0.0.1:2379", &mut child, "kine-rs");
    let put = etcdctl(&["--endpoints", "127.0.0.1:2379", "put", "k", "v"]);
    let _ = child.kill();
    let _ = child.wait();
    assert!(put.status.success(), "{put:?}");
    assert!(dir.path().join("db/state.db").exists());
}

/// A unix socket, named as k3s names kine's (`unix://kine.sock`, relative to the working
/// directory). etcd's Go client sends the socket path as the HTTP/2 `:authority`; a relative
/// path is a valid authority, while an absolute one is rejected by the Rust HTTP/2 stack (see
/// the README's limitations).
#[test]
fn serves_on_a_unix_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(kine_rs_binary())
        .current_dir(dir.path())
        .args([
            "--endpoint",
            "memory://",
            "--listen-address",
            "unix://kine.sock",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start kine-rs");
    let socket = dir.path().join("kine.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let in_dir = |args: &[&str]| {
        Command::new(etcdctl_binary())
            .current_dir(dir.path())
            .env("ETCDCTL_API", "3")
            .args(["--command-timeout=5s", "--endpoints", "unix://kine.sock"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run etcdctl")
    };
    let put = in_dir(&["put", "over", "socket"]);
    let get = in_dir(&["get", "over", "--print-value-only"]);
    let _ = child.kill();
    let _ = child.wait();
    assert!(put.status.success(), "{put:?}");
    assert_eq!(stdout(&get).trim(), "socket");
}

#[test]
fn serves_prometheus_metrics() {
    let metrics_port = free_port();
    let metrics_address = format!("127.0.0.1:{metrics_port}");
    let kine = spawn_kine_with(
        Backend::Memory,
        &["--metrics-bind-address", &metrics_address],
    );
    let put = etcdctl(&["--endpoints", &kine.address, "put", "m", "1"]);
    assert!(put.status.success(), "{put:?}");
    let body = kine_tests::http_get(&metrics_address, "/metrics").expect("GET /metrics");
    assert!(
        body.contains("kine_grpc_requests_total{method=\"/etcdserverpb.KV/Put\",code=\"0\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("kine_grpc_request_duration_seconds"),
        "{body}"
    );
}

struct Pki {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

fn write_pki(dir: &Path) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "kine-rs test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("ca key"))
        .expect("ca cert");

    let mut server = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("server params");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_key = KeyPair::generate().expect("server key");
    let server_cert = server.signed_by(&server_key, &ca).expect("server cert");

    let mut client = CertificateParams::new(Vec::<String>::new()).expect("client params");
    client
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_key = KeyPair::generate().expect("client key");
    let client_cert = client.signed_by(&client_key, &ca).expect("client cert");

    let write = |name: &str, pem: String| {
        let path = dir.join(name);
        std::fs::write(&path, pem).expect("write pem");
        path.display().to_string()
    };
    Pki {
        ca: write("ca.pem", ca.pem()),
        server_cert: write("server.pem", server_cert.pem()),
        server_key: write("server-key.pem", server_key.serialize_pem()),
        client_cert: write("client.pem", client_cert.pem()),
        client_key: write("client-key.pem", client_key.serialize_pem()),
    }
}

#[test]
fn mutual_tls_admits_only_clients_with_a_trusted_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = write_pki(dir.path());
    let kine = spawn_kine_on(
        "memory://",
        dir,
        &[
            "--server-cert-file",
            &pki.server_cert,
            "--server-key-file",
            &pki.server_key,
            "--trusted-ca-file",
            &pki.ca,
        ],
    );
    let endpoint = format!("https://{}", kine.address);
    let with_cert = etcdctl(&[
        "--endpoints",
        &endpoint,
        "--cacert",
        &pki.ca,
        "--cert",
        &pki.client_cert,
        "--key",
        &pki.client_key,
        "put",
        "secure",
        "yes",
    ]);
    assert!(with_cert.status.success(), "{with_cert:?}");
    let get = etcdctl(&[
        "--endpoints",
        &endpoint,
        "--cacert",
        &pki.ca,
        "--cert",
        &pki.client_cert,
        "--key",
        &pki.client_key,
        "get",
        "secure",
        "--print-value-only",
    ]);
    assert_eq!(stdout(&get).trim(), "yes");
    let without_cert = etcdctl(&[
        "--endpoints",
        &endpoint,
        "--cacert",
        &pki.ca,
        "get",
        "secure",
    ]);
    assert!(
        !without_cert.status.success(),
        "a client without a certificate was served: {without_cert:?}"
    );
    let plaintext = etcdctl(&["--endpoints", &kine.address, "get", "secure"]);
    assert!(!plaintext.status.success(), "plaintext was served");
}

/// Invariant 6 on the embedded default: every acknowledged write survives a kill -9.
#[test]
fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.db");
    let endpoint = format!("sqlite://{}", path.display());
    let keep = tempfile::tempdir().expect("tempdir");
    let mut kine = spawn_kine_on(&endpoint, keep, &[]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let acknowledged: Vec<String> = runtime.block_on(async {
        let mut client = etcd_client::Client::connect([kine.endpoint.as_str()], None)
            .await
            .expect("connect");
        let mut acknowledged = Vec::new();
        for i in 0..200 {
            let key = format!("durable/{i:04}");
            client.put(key.as_str(), "v", None).await.expect("put");
            acknowledged.push(key);
        }
        acknowledged
    });
    kine.kill();
    let restarted = spawn_kine_on(&endpoint, tempfile::tempdir().expect("tempdir"), &[]);
    let stored: Vec<String> = runtime.block_on(async {
        let mut client = etcd_client::Client::connect([restarted.endpoint.as_str()], None)
            .await
            .expect("connect");
        let response = client
            .get(
                "durable/",
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .expect("get");
        response
            .kvs()
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
            .collect()
    });
    assert_eq!(stored, acknowledged);
}

#[test]
fn compact_interval_compacts_history_keeping_the_minimum_retained() {
    let kine = spawn_kine_with(
        Backend::Memory,
        &["--compact-interval", "300ms", "--compact-min-retain", "5"],
    );
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut client = etcd_client::Client::connect([kine.endpoint.as_str()], None)
            .await
            .expect("connect");
        let mut revision = 0;
        for i in 0..20 {
            revision = client
                .put("compacted", format!("{i}"), None)
                .await
                .expect("put")
                .header()
                .expect("header")
                .revision();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let error = loop {
            let old = client
                .get(
                    "compacted",
                    Some(etcd_client::GetOptions::new().with_revision(2)),
                )
                .await;
            match old {
                Err(error) => break error,
                Ok(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Ok(_) => panic!("history at revision 2 was never compacted"),
            }
        };
        assert!(
            error
                .to_string()
                .contains("etcdserver: mvcc: required revision has been compacted"),
            "{error}"
        );
        // The retained window is still readable.
        let recent = client
            .get(
                "compacted",
                Some(etcd_client::GetOptions::new().with_revision(revision - 5)),
            )
            .await
            .expect("a retained revision stays readable");
        assert_eq!(recent.kvs().len(), 1);
    });
}

#[test]
fn request_limits_are_configurable() {
    let kine = spawn_kine_with(
        Backend::Memory,
        &["--max-txn-ops", "2", "--max-request-bytes", "1024"],
    );
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut client = etcd_client::Client::connect([kine.endpoint.as_str()], None)
            .await
            .expect("connect");
        let ops: Vec<etcd_client::TxnOp> = (0..3)
            .map(|i| etcd_client::TxnOp::put(format!("k{i}"), "v", None))
            .collect();
        let error = client
            .txn(etcd_client::Txn::new().and_then(ops))
            .await
            .expect_err("three operations exceed --max-txn-ops 2");
        assert!(
            error
                .to_string()
                .contains("etcdserver: too many operations in txn request"),
            "{error}"
        );
        let error = client
            .put("big", vec![b'x'; 2048], None)
            .await
            .expect_err("2 KiB exceeds --max-request-bytes 1024");
        assert!(
            error
                .to_string()
                .contains("etcdserver: request is too large"),
            "{error}"
        );
        client
            .put("small", "ok", None)
            .await
            .expect("a small put fits");
    });
}
