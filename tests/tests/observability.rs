//! What an operator sees of the datastore: Prometheus metrics per kind of SQL query and of
//! group-commit batch sizes, and the slow-query log (`--slow-sql-threshold`), which names the
//! kind of query and its duration but never a key, a value or a password.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kine_tests::{free_port, kine_rs_binary, spawn_kine_on, wait_for_port};

/// Concurrent writers, so that some writes share a database transaction.
const WRITERS: usize = 16;
/// Puts each writer sends.
const PUTS: usize = 10;

/// The value of the sample line `name` (with its labels, exactly) in a text exposition.
fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        (series == name).then(|| value.parse().ok())?
    })
}

/// A server on `backend` with its metrics on a port of its own; the metrics' address.
fn spawn_with_metrics(backend: kine_tests::Backend) -> (kine_tests::ChildGuard, String) {
    let metrics_address = format!("127.0.0.1:{}", free_port());
    let kine = kine_tests::spawn_kine_with(backend, &["--metrics-bind-address", &metrics_address]);
    (kine, metrics_address)
}

/// How many times the server whose metrics listen on `metrics_address` ran statement `query`
/// of `driver` (0 before its first run).
fn statements(metrics_address: &str, driver: &str, query: &str) -> f64 {
    let body = kine_tests::http_get(metrics_address, "/metrics").expect("GET /metrics");
    sample(
        &body,
        &format!("kine_sql_query_duration_seconds_count{{driver=\"{driver}\",query=\"{query}\"}}"),
    )
    .unwrap_or(0.0)
}

/// How many `range` statements and read transactions (`begin_read`) of `driver` the server
/// ran.
fn range_and_read_begin_counts(metrics_address: &str, driver: &str) -> (f64, f64) {
    (
        statements(metrics_address, driver, "range"),
        statements(metrics_address, driver, "begin_read"),
    )
}

/// Sends `WRITERS` × `PUTS` keys' puts at once, each key twice, then one read.
fn write_load(endpoint: &str) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let client = etcd_client::Client::connect([endpoint], None)
            .await
            .expect("connect");
        let mut tasks = Vec::new();
        for writer in 0..WRITERS {
            let mut client = client.clone();
            tasks.push(tokio::spawn(async move {
                // Each key written twice: the second write supersedes the first.
                for value in ["v1", "v2"] {
                    for i in 0..PUTS {
                        client
                            .put(format!("obs/{writer}/{i}"), value, None)
                            .await
                            .expect("put");
                    }
                }
            }));
        }
        for task in tasks {
            task.await.expect("writer");
        }
        let mut client = client.clone();
        let got = client
            .get("obs/", Some(etcd_client::GetOptions::new().with_prefix()))
            .await
            .expect("get");
        assert_eq!(got.kvs().len(), WRITERS * PUTS);
    });
}

#[test]
fn metrics_show_sql_queries_by_kind_and_write_batch_sizes() {
    let metrics_address = format!("127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().expect("tempdir");
    let endpoint = format!("sqlite://{}", dir.path().join("state.db").display());
    let kine = spawn_kine_on(
        &endpoint,
        tempfile::tempdir().expect("tempdir"),
        &["--metrics-bind-address", &metrics_address],
    );
    write_load(&kine.endpoint);
    let body = kine_tests::http_get(&metrics_address, "/metrics").expect("GET /metrics");

    // SQLite's write batches begin in the call that reads their keys, `batch_read`, and
    // supersede and insert in one call, `write`.
    for query in ["write", "batch_read", "commit", "range"] {
        let count = sample(
            &body,
            &format!(
                "kine_sql_query_duration_seconds_count{{driver=\"sqlite\",query=\"{query}\"}}"
            ),
        );
        assert!(
            count.is_some_and(|c| c >= 1.0),
            "no {query} queries recorded:\n{body}"
        );
    }
    // Rows are inserted with multi-row statements, in the batch's one `write` call: one per
    // batch, at most one per write request.
    let requests = (2 * WRITERS * PUTS) as f64;
    let inserts = sample(
        &body,
        "kine_sql_query_duration_seconds_count{driver=\"sqlite\",query=\"write\"}",
    )
    .expect("write count");
    let batches = sample(&body, "kine_write_batch_size_count").expect("batch count");
    assert!(inserts >= batches && inserts <= requests, "{body}");
    let reads = sample(
        &body,
        "kine_sql_query_duration_seconds_bucket{le=\"+Inf\",driver=\"sqlite\",query=\"range\"}",
    );
    assert!(
        reads.is_some_and(|r| r >= 1.0),
        "no histogram buckets for range:\n{body}"
    );

    // Group commit: every write request is in exactly one batch, and no more batches than
    // requests (fewer when writes shared a transaction).
    let batched = sample(&body, "kine_write_batch_size_sum").expect("batch size sum");
    assert_eq!(batched, requests, "{body}");
    assert!(batches >= 1.0 && batches <= batched, "{body}");
    assert!(
        body.contains("kine_write_batch_size_bucket{le=\"1.0\"}"),
        "{body}"
    );
    eprintln!("{batched} writes in {batches} group commits");
}

/// Calls `path` on `endpoint` with an empty message; the status it fails with.
async fn call_path(channel: tonic::transport::Channel, path: &'static str) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("channel ready");
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    grpc.unary(tonic::Request::new(()), path, codec)
        .await
        .expect_err("no such method")
}

/// Request metrics are labelled by the methods kine-rs serves: any other path a client sends
/// is one `unknown` series, so clients cannot grow the registry without bound.
#[test]
fn request_metrics_label_unknown_paths_as_one_series() {
    const PATHS: &[&str] = &[
        "/leaky.Service/Method",
        "/leaky.Service/Other",
        "/etcdserverpb.KV/LeakyMethod",
        "/etcdserverpb.LeakyService/Range",
        "/etcdserverpb.KV/Range/leaky",
        "/leaky-but-not-grpc",
    ];
    let (kine, metrics_address, _dir) = sqlite_kine_with_metrics();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(kine.endpoint.clone())
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        for path in PATHS {
            let status = call_path(channel.clone(), path).await;
            assert_eq!(
                status.code(),
                tonic::Code::Unimplemented,
                "{path}: {status:?}"
            );
        }
        let mut client = etcd_client::Client::connect([kine.endpoint.as_str()], None)
            .await
            .expect("connect");
        client.put("known", "method", None).await.expect("put");
    });
    let body = kine_tests::http_get(&metrics_address, "/metrics").expect("GET /metrics");
    assert!(
        !body.contains("leaky"),
        "a request path leaked into a label:\n{body}"
    );
    assert_eq!(
        sample(
            &body,
            "kine_grpc_requests_total{method=\"unknown\",code=\"12\"}"
        ),
        Some(PATHS.len() as f64),
        "{body}"
    );
    assert_eq!(
        sample(
            &body,
            "kine_grpc_request_duration_seconds_count{method=\"unknown\"}"
        ),
        Some(PATHS.len() as f64),
        "{body}"
    );
    assert_eq!(
        sample(
            &body,
            "kine_grpc_requests_total{method=\"/etcdserverpb.KV/Put\",code=\"0\"}"
        ),
        Some(1.0),
        "{body}"
    );
}

/// A kine-rs process, killed when dropped.
struct Kine {
    child: Child,
    endpoint: String,
}

impl Drop for Kine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts kine-rs on SQLite with `args`, its log in a file; returns it, the log's path and
/// the directory both live in.
fn spawn_logging(args: &[&str]) -> (Kine, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("kine.log");
    let endpoint = format!("sqlite://{}", dir.path().join("state.db").display());
    let address = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(kine_rs_binary())
        .current_dir(dir.path())
        .args(["--endpoint", &endpoint, "--listen-address", &address])
        .args(args)
        .env_remove("KINE_LOG")
        .env_remove("KINE_SLOW_SQL_THRESHOLD")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("start kine-rs");
    wait_for_port(&address, &mut child, "kine-rs");
    let kine = Kine {
        child,
        endpoint: format!("http://{address}"),
    };
    (kine, log, dir)
}

/// Removes ANSI colour sequences from a log.
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Reads `log` until it contains `needle`, for at most 10 seconds.
fn log_with(log: &Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = plain(&std::fs::read_to_string(log).unwrap_or_default());
        if text.contains(needle) || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn slow_queries_are_logged_by_kind_without_values() {
    let (kine, log, _dir) = spawn_logging(&["--slow-sql-threshold", "1ns"]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut client = etcd_client::Client::connect([kine.endpoint.as_str()], None)
            .await
            .expect("connect");
        client
            .put("secret-key-4f1d", "secret-value-9a2c", None)
            .await
            .expect("put");
        client.get("secret-key-4f1d", None).await.expect("get");
    });
    let text = log_with(&log, "query=range");
    let slow: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("slow SQL query"))
        .collect();
    assert!(
        slow.iter().any(|line| line.contains("WARN")
            && line.contains("driver=\"sqlite\"")
            && line.contains("query=\"write\"")
            && line.contains("duration=")),
        "no slow-query WARN line for the insert:\n{text}"
    );
    assert!(
        slow.iter().any(|line| line.contains("query=\"range\"")),
        "no slow-query line for the read:\n{text}"
    );
    assert!(
        !text.contains("secret-key-4f1d") && !text.contains("secret-value-9a2c"),
        "the log names a key or value:\n{text}"
    );
    assert!(
        !text.contains("INSERT") && !text.contains("SELECT"),
        "the log shows statements:\n{text}"
    );
}

/// Whatever form a datastore password takes in `--endpoint` (`user:pass@` of PostgreSQL,
/// MySQL or etcd, `?password=`, `sslpassword=`), it appears nowhere in kine-rs's output, also while kine-rs waits for an
/// unreachable datastore and logs every attempt.
#[test]
fn endpoint_secrets_never_reach_the_log() {
    // Nothing listens on this port: every attempt fails, and each is logged.
    let port = free_port();
    let cases = [
        (
            format!("postgres://kine:Secret1-userinfo@127.0.0.1:{port}/kine"),
            "Secret1-userinfo",
        ),
        (
            format!("postgres://kine@127.0.0.1:{port}/kine?sslmode=disable&password=Secret2-query"),
            "Secret2-query",
        ),
        (
            format!("postgres://kine@127.0.0.1:{port}/kine?password=Secret3@at&sslmode=disable"),
            "Secret3",
        ),
        (
            format!(
                "postgres://kine@127.0.0.1:{port}/kine?sslpassword=Secret4-ssl&sslmode=disable"
            ),
            "Secret4-ssl",
        ),
        (
            format!("mysql://kine:Secret5-go@tcp(127.0.0.1:{port})/kine"),
            "Secret5-go",
        ),
        (
            format!("mysql://kine@127.0.0.1:{port}/kine?password=Secret6-query"),
            "Secret6-query",
        ),
        (
            format!("etcd://kine:Secret7-etcd@127.0.0.1:{port}"),
            "Secret7-etcd",
        ),
        (
            format!("etcd://kine:Secret8%40members@127.0.0.1:{port},http://127.0.0.1:{port}"),
            "Secret8",
        ),
    ];
    for (endpoint, secret) in &cases {
        for debug in [false, true] {
            let dir = tempfile::tempdir().expect("tempdir");
            let log = dir.path().join("kine.log");
            let file = std::fs::File::create(&log).expect("log file");
            let mut command = Command::new(kine_rs_binary());
            command
                .current_dir(dir.path())
                .args(["--endpoint", endpoint])
                .args(["--listen-address", &format!("127.0.0.1:{}", free_port())])
                .env_remove("KINE_LOG")
                .stdin(Stdio::null())
                .stdout(file.try_clone().expect("log file"))
                .stderr(file);
            if debug {
                command.arg("--debug");
            }
            let child = command.spawn().expect("start kine-rs");
            let kine = Kine {
                child,
                endpoint: String::new(),
            };
            // Two attempts logged: the first and a retry.
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let text = plain(&std::fs::read_to_string(&log).unwrap_or_default());
                if text.matches("waiting for the datastore").count() >= 2
                    || Instant::now() > deadline
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            drop(kine);
            let text = plain(&std::fs::read_to_string(&log).unwrap_or_default());
            assert!(
                text.contains("waiting for the datastore"),
                "{endpoint}: no retry was logged:\n{text}"
            );
            assert!(
                !text.contains(secret),
                "{endpoint} (debug: {debug}): the log shows the password:\n{text}"
            );
        }
    }
}

#[test]
fn slow_query_log_is_off_at_zero() {
    let (kine, log, _dir) = spawn_logging(&["--slow-sql-threshold", "0"]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut client = etcd_client::Client::connect([kine.endpoint.as_str()], None)
            .await
            .expect("connect");
        for i in 0..20 {
            client.put(format!("k{i}"), "v", None).await.expect("put");
        }
    });
    drop(kine);
    let text = plain(&std::fs::read_to_string(&log).unwrap_or_default());
    assert!(text.contains("kine-rs serving"), "{text}");
    assert!(!text.contains("slow SQL query"), "{text}");
}

/// kine-rs on a fresh SQLite file with its metrics listener: the process, the listener's
/// address, and the directory holding the file.
fn sqlite_kine_with_metrics() -> (kine_tests::ChildGuard, String, tempfile::TempDir) {
    let metrics_address = format!("127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().expect("tempdir");
    let endpoint = format!("sqlite://{}", dir.path().join("state.db").display());
    let kine = spawn_kine_on(
        &endpoint,
        tempfile::tempdir().expect("tempdir"),
        &["--metrics-bind-address", &metrics_address],
    );
    (kine, metrics_address, dir)
}

/// One keep-alive on `keeper`, and its answer.
async fn keep_alive_once(
    keeper: &mut etcd_client::LeaseKeeper,
    responses: &mut etcd_client::LeaseKeepAliveStream,
) -> etcd_client::LeaseKeepAliveResponse {
    keeper.keep_alive().await.expect("keep-alive");
    tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .expect("a keep-alive answer in time")
        .expect("stream")
        .expect("stream open")
}

/// Lease renewal statements SQLite ran, from the query metric.
fn lease_renew_statements(metrics_address: &str) -> f64 {
    let body = kine_tests::http_get(metrics_address, "/metrics").expect("GET /metrics");
    sample(
        &body,
        "kine_sql_query_duration_seconds_count{driver=\"sqlite\",query=\"lease_renew\"}",
    )
    .expect("lease_renew statements are counted")
}

/// A keep-alive flood costs the datastore one write per tenth of the lease's TTL, not one per
/// message: 300 keep-alives of one lease at once, each answered with the full TTL, store the
/// renewal a few times at most (the `lease_renew` statements in the metrics).
#[test]
fn a_keep_alive_flood_is_not_a_write_per_message() {
    const KEEP_ALIVES: usize = 300;
    let (kine, metrics_address, _dir) = sqlite_kine_with_metrics();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut client = etcd_client::Client::connect([kine.endpoint.as_str()], None)
            .await
            .expect("connect");
        let lease = client.lease_grant(60, None).await.expect("grant").id();
        let (mut keeper, mut responses) = client.lease_keep_alive(lease).await.expect("stream");
        for _ in 0..KEEP_ALIVES {
            keeper.keep_alive().await.expect("keep-alive");
        }
        for _ in 0..KEEP_ALIVES {
            let response = tokio::time::timeout(Duration::from_secs(10), responses.message())
                .await
                .expect("a keep-alive answer in time")
                .expect("stream")
                .expect("stream open");
            assert_eq!((response.id(), response.ttl()), (lease, 60));
        }
        // Revoked, the lease answers TTL 0 at once, not from what was remembered.
        client.lease_revoke(lease).await.expect("revoke");
        keeper.keep_alive().await.expect("keep-alive");
        let response = tokio::time::timeout(Duration::from_secs(10), responses.message())
            .await
            .expect("answer")
            .expect("stream")
            .expect("open");
        assert_eq!(response.ttl(), 0);
    });
    let renewals = lease_renew_statements(&metrics_address);
    assert!(
        renewals <= 5.0,
        "{renewals} renewals stored for {KEEP_ALIVES} keep-alives"
    );
}

/// A lease of a minute kept alive ten times a second for three seconds is stored once or
/// twice (its coalescing window is a tenth of the TTL, 6 s capped at 5 s; at half a second,
/// as before, it was six to seven times), and LeaseTimeToLive after the last keep-alive still
/// reports the full TTL that keep-alive promised, as etcd does.
#[test]
fn keep_alives_within_a_tenth_of_the_ttl_are_not_stored() {
    let (kine, metrics_address, _dir) = sqlite_kine_with_metrics();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut client = etcd_client::Client::connect([kine.endpoint.as_str()], None)
            .await
            .expect("connect");
        let lease = client.lease_grant(60, None).await.expect("grant").id();
        let (mut keeper, mut responses) = client.lease_keep_alive(lease).await.expect("stream");
        for _ in 0..30 {
            let response = keep_alive_once(&mut keeper, &mut responses).await;
            assert_eq!((response.id(), response.ttl()), (lease, 60));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // 100 ms after the last keep-alive: 59 whole seconds left of the 60 it promised (58
        // on a slow machine); the stored deadline, from the first keep-alive, is over 3 s
        // short of that.
        let ttl = client.lease_time_to_live(lease, None).await.expect("ttl");
        assert!(ttl.ttl() >= 58, "{ttl:?}");
    });
    let renewals = lease_renew_statements(&metrics_address);
    assert!(
        renewals <= 2.0,
        "{renewals} renewals stored for 30 keep-alives over 3 s"
    );
}

/// A lease whose stored deadline passes while this process had promised it longer (its
/// keep-alives answered from memory) is not expired early: a lease of 30 s kept alive ten
/// times a second for 2.9 s after its stored renewal was promised ~32.9 s, and is still alive
/// at 31.5 s (the expiry stores the promised deadline instead), and gone by 35 s.
#[test]
fn a_lease_lives_as_long_as_its_last_keep_alive_promised() {
    let dir = tempfile::tempdir().expect("tempdir");
    let endpoint = format!("sqlite://{}", dir.path().join("state.db").display());
    let kine = spawn_kine_on(&endpoint, tempfile::tempdir().expect("tempdir"), &[]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut client = etcd_client::Client::connect([kine.endpoint.as_str()], None)
            .await
            .expect("connect");
        let lease = client.lease_grant(30, None).await.expect("grant").id();
        let options = etcd_client::PutOptions::new().with_lease(lease);
        client
            .put("promised", "v", Some(options))
            .await
            .expect("put");
        let (mut keeper, mut responses) = client.lease_keep_alive(lease).await.expect("stream");
        let first = Instant::now();
        while first.elapsed() < Duration::from_millis(2_900) {
            let response = keep_alive_once(&mut keeper, &mut responses).await;
            assert_eq!(response.ttl(), 30);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(keeper);
        tokio::time::sleep(Duration::from_millis(31_500).saturating_sub(first.elapsed())).await;
        let ttl = client.lease_time_to_live(lease, None).await.expect("ttl");
        assert!(
            ttl.ttl() > 0,
            "expired before its promised deadline: {ttl:?}"
        );
        let kept = client.get("promised", None).await.expect("get");
        assert_eq!(
            kept.kvs().len(),
            1,
            "the lease's key went with an early expiry"
        );
        // Kept to its promise, not renewed for ever: gone by 35 s.
        tokio::time::sleep(Duration::from_secs(35).saturating_sub(first.elapsed())).await;
        let ttl = client.lease_time_to_live(lease, None).await.expect("ttl");
        assert_eq!(
            ttl.ttl(),
            -1,
            "still alive after its promised deadline: {ttl:?}"
        );
        let gone = client.get("promised", None).await.expect("get");
        assert!(gone.kvs().is_empty(), "the lease's key outlived it");
    });
}

/// A keep-alive flood over many leases is stored in batches: 512 leases kept alive once each
/// through one stream take a few `lease_renew` statements (each renews up to 256 leases),
/// not 512, so one tenant's flood holds one datastore connection at a time instead of
/// competing with every tenant's writers for them. Each answer is still the lease's own, in
/// the order asked.
#[test]
fn keep_alives_of_many_leases_are_stored_in_batches() {
    const LEASES: usize = 512;
    let (kine, metrics_address, _dir) = sqlite_kine_with_metrics();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        use kine_proto::etcdserverpb::lease_client::LeaseClient;
        use kine_proto::etcdserverpb::{LeaseGrantRequest, LeaseKeepAliveRequest};
        let channel = tonic::transport::Endpoint::from_shared(kine.endpoint.clone())
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        let mut client = LeaseClient::new(channel);
        let mut leases = Vec::with_capacity(LEASES);
        for _ in 0..LEASES {
            let granted = client
                .lease_grant(LeaseGrantRequest { ttl: 60, id: 0 })
                .await
                .expect("grant");
            leases.push(granted.into_inner().id);
        }
        let requests: Vec<LeaseKeepAliveRequest> = leases
            .iter()
            .map(|id| LeaseKeepAliveRequest { id: *id })
            .collect();
        let mut answers = client
            .lease_keep_alive(futures::stream::iter(requests))
            .await
            .expect("keep-alive stream")
            .into_inner();
        for id in &leases {
            let answer = tokio::time::timeout(Duration::from_secs(30), answers.message())
                .await
                .expect("a keep-alive answer in time")
                .expect("stream")
                .expect("stream open");
            assert_eq!((answer.id, answer.ttl), (*id, 60));
        }
    });
    let renewals = lease_renew_statements(&metrics_address);
    assert!(
        renewals <= (LEASES / 8) as f64,
        "{renewals} renewal statements for {LEASES} leases kept alive at once"
    );
}

/// A read at the current revision whose count follows from its rows (no limit, or one key) is
/// one statement on PostgreSQL and MySQL, outside any transaction: it must not begin a read
/// transaction, and its answers (rows, count, header revision) are those of one snapshot. A
/// limited range still reads in a transaction (its count is a second statement of the same
/// snapshot).
#[test]
fn postgres_current_reads_are_one_statement() {
    current_reads_are_one_statement(kine_tests::Backend::Postgres, "postgres", true);
}

#[test]
fn mysql_current_reads_are_one_statement() {
    current_reads_are_one_statement(kine_tests::Backend::Mysql, "mysql", false);
}

/// On SQLite a get of one key at the current revision is one statement (each statement is a
/// hand-off to a connection's thread; kube-apiserver's update reads its object first), with
/// the answers of one snapshot; a range of several keys still reads in a transaction.
#[test]
fn sqlite_gets_are_one_statement() {
    let (kine, metrics_address) = spawn_with_metrics(kine_tests::Backend::Sqlite);
    let counts = || range_and_read_begin_counts(&metrics_address, "sqlite");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut client = etcd_client::Client::connect([kine.endpoint.as_str()], None)
            .await
            .expect("connect");
        client.put("get/a", "1", None).await.expect("put");
        client.put("get/b", "22", None).await.expect("put");
        let last = client
            .delete("get/b", None)
            .await
            .expect("delete")
            .header()
            .expect("header")
            .revision();
        let (ranges, begins) = counts();

        let got = client.get("get/a", None).await.expect("get");
        assert_eq!(got.header().expect("header").revision(), last);
        assert_eq!((got.count(), got.kvs()[0].value()), (1, &b"1"[..]));
        assert_eq!(got.kvs()[0].mod_revision(), last - 2);
        let missing = client.get("get/b", None).await.expect("get deleted");
        assert_eq!((missing.count(), missing.kvs().len()), (0, 0));
        assert_eq!(missing.header().expect("header").revision(), last);
        let (after_ranges, after_begins) = counts();
        assert_eq!(after_ranges - ranges, 2.0, "one statement per get");
        assert_eq!(after_begins, begins, "no read transaction for a get");

        let prefix = etcd_client::GetOptions::new().with_prefix();
        let got = client.get("get/", Some(prefix)).await.expect("prefix");
        assert_eq!((got.count(), got.kvs().len()), (1, 1));
        assert_eq!(
            counts().1,
            begins + 1.0,
            "a range of keys reads in a transaction"
        );
    });
}

/// Gets of one key sent together share statements (`storage/sql/point_reads.rs`): 256 gets
/// at once over one connection take fewer than 256 `range` statements, and each answer is
/// its own key's row (or none, for a deleted key and one never written) at a revision no
/// older than the last write.
#[test]
fn postgres_gets_sent_together_share_statements() {
    gets_sent_together_share_statements(kine_tests::Backend::Postgres, "postgres");
}

#[test]
fn mysql_gets_sent_together_share_statements() {
    gets_sent_together_share_statements(kine_tests::Backend::Mysql, "mysql");
}

#[test]
fn sqlite_gets_sent_together_share_statements() {
    gets_sent_together_share_statements(kine_tests::Backend::Sqlite, "sqlite");
}

fn gets_sent_together_share_statements(backend: kine_tests::Backend, driver: &str) {
    const KEYS: usize = 64;
    const GETS: usize = 256;
    let (kine, metrics_address) = spawn_with_metrics(backend);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let client = etcd_client::Client::connect([kine.endpoint.as_str()], None)
            .await
            .expect("connect");
        let mut kv = client.kv_client();
        for index in 0..KEYS {
            let key = format!("together/{index:02}");
            kv.put(key, format!("value {index}"), None)
                .await
                .expect("put");
        }
        let last = kv
            .delete("together/00", None)
            .await
            .expect("delete")
            .header()
            .expect("header")
            .revision();
        let before = statements(&metrics_address, driver, "range");

        let gets = (0..GETS).map(|get| {
            let mut kv = kv.clone();
            // Key 64 was never written; key 00 is deleted.
            let index = get % (KEYS + 1);
            async move {
                let answer = kv
                    .get(format!("together/{index:02}"), None)
                    .await
                    .expect("get");
                (index, answer)
            }
        });
        for (index, answer) in futures::future::join_all(gets).await {
            assert!(answer.header().expect("header").revision() >= last);
            if index == 0 || index == KEYS {
                assert_eq!((answer.count(), answer.kvs().len()), (0, 0), "key {index}");
                continue;
            }
            assert_eq!(answer.count(), 1, "key {index}");
            let got = &answer.kvs()[0];
            assert_eq!(got.key(), format!("together/{index:02}").as_bytes());
            assert_eq!(got.value(), format!("value {index}").as_bytes());
            assert_eq!(got.mod_revision(), last - (KEYS - index) as i64);
        }
        let taken = statements(&metrics_address, driver, "range") - before;
        assert!(
            (1.0..GETS as f64).contains(&taken),
            "{GETS} gets sent together took {taken} statements"
        );
    });
}

/// `pages`: a later page at the current revision is one statement too (PostgreSQL; MySQL
/// reads it in a transaction, which MariaDB runs faster than the join).
fn current_reads_are_one_statement(backend: kine_tests::Backend, driver: &str, pages: bool) {
    let (kine, metrics_address) = spawn_with_metrics(backend);
    let counts = || range_and_read_begin_counts(&metrics_address, driver);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut client = etcd_client::Client::connect([kine.endpoint.as_str()], None)
            .await
            .expect("connect");
        let mut last = 0;
        for (key, value) in [("one/a", "1"), ("one/b", "22"), ("one/c", "333")] {
            last = client
                .put(key, value, None)
                .await
                .expect("put")
                .header()
                .expect("header")
                .revision();
        }
        client.delete("one/b", None).await.expect("delete");
        last += 1;
        let (ranges, begins) = counts();

        let got = client.get("one/a", None).await.expect("get");
        assert_eq!(got.header().expect("header").revision(), last);
        assert_eq!((got.count(), got.kvs()[0].value()), (1, &b"1"[..]));
        let missing = client.get("one/b", None).await.expect("get deleted");
        assert_eq!((missing.count(), missing.kvs().len()), (0, 0));
        let limited_one = etcd_client::GetOptions::new().with_limit(1);
        let got = client.get("one/c", Some(limited_one)).await.expect("get");
        assert_eq!((got.count(), got.kvs()[0].value()), (1, &b"333"[..]));
        let prefix = etcd_client::GetOptions::new()
            .with_prefix()
            .with_keys_only();
        let got = client.get("one/", Some(prefix)).await.expect("prefix");
        let keys: Vec<&[u8]> = got.kvs().iter().map(|kv| kv.key()).collect();
        assert_eq!(keys, [&b"one/a"[..], b"one/c"]);
        assert_eq!(got.count(), 2);
        assert!(got.kvs().iter().all(|kv| kv.value().is_empty()));
        assert_eq!(got.header().expect("header").revision(), last);
        let (after_ranges, after_begins) = counts();
        assert_eq!(after_ranges - ranges, 4.0, "one statement per read");
        assert_eq!(after_begins, begins, "no read transaction");

        let paged = etcd_client::GetOptions::new().with_prefix().with_limit(1);
        let got = client.get("one/", Some(paged)).await.expect("page");
        assert_eq!((got.count(), got.kvs().len(), got.more()), (2, 1, true));
        // The next page at the revision of the first, which is still the current one, is read
        // ahead (`read_ahead.rs`): its count is known from the first page, so it is one
        // statement too where `pages`.
        let (ranges, begins_after_page) = settled(&counts, (after_ranges + 2.0, 0.0));
        assert!(
            begins_after_page > begins,
            "a limited range reads in a transaction"
        );
        if pages {
            assert_eq!(
                begins_after_page,
                begins + 1.0,
                "the next page is one statement"
            );
        } else {
            assert_eq!(begins_after_page, begins + 2.0, "a read transaction each");
        }

        // Asked for, it is answered from that read.
        let next = etcd_client::GetOptions::new()
            .with_range("one0")
            .with_revision(last)
            .with_limit(1);
        let got = client
            .get("one/a\0", Some(next.clone()))
            .await
            .expect("next page");
        let keys: Vec<&[u8]> = got.kvs().iter().map(|kv| kv.key()).collect();
        assert_eq!(keys, [&b"one/c"[..]]);
        assert_eq!((got.count(), got.more()), (1, false));
        assert_eq!(got.header().expect("header").revision(), last);
        assert_eq!(counts(), (ranges, begins_after_page), "read ahead");

        // After a write, the same page is read at its revision, in a transaction.
        client.put("one/d", "4", None).await.expect("put");
        let got = client
            .get("one/a\0", Some(next))
            .await
            .expect("next page, older");
        let keys: Vec<&[u8]> = got.kvs().iter().map(|kv| kv.key()).collect();
        assert_eq!(keys, [&b"one/c"[..]]);
        assert_eq!((got.count(), got.more()), (1, false));
        assert_eq!(got.header().expect("header").revision(), last + 1);
        assert!(counts().1 > begins_after_page, "read at its revision");
    });
}

/// Puts of the 100 keys `batch/000` … `batch/099`, each with the value `round`.
fn hundred_puts(round: usize) -> Vec<etcd_client::TxnOp> {
    (0..100)
        .map(|i| etcd_client::TxnOp::put(format!("batch/{i:03}"), format!("{round}"), None))
        .collect()
}

/// The keys of [`hundred_puts`] after rounds 0 and 1: all there, at version 2, value `1`.
async fn assert_hundred_keys_overwritten(client: &mut etcd_client::Client) {
    let got = client
        .get("batch/", Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .expect("get");
    assert_eq!(got.count(), 100);
    assert!(
        got.kvs()
            .iter()
            .all(|kv| kv.version() == 2 && kv.value() == b"1")
    );
}

/// A write batch of up to 128 keys reads their current rows with the keyspace row in one
/// statement (`batch_read`) on PostgreSQL: no lookups of the rest one after another (`get`),
/// which the keyspace's next batch would wait for. 100 keys were a read of 64, then 32, then 4.
/// And a batch whose keys this process committed last does not read them at all.
#[test]
fn postgres_write_batch_reads_its_keys_in_one_statement_and_not_after_its_own_commit() {
    let (kine, metrics_address) = spawn_with_metrics(kine_tests::Backend::Postgres);
    let count = |query: &str| statements(&metrics_address, "postgres", query);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut client = etcd_client::Client::connect([kine.endpoint.as_str()], None)
            .await
            .expect("connect");
        // Twice: the second batch supersedes the 100 rows the first created. The first reads
        // its keys in one statement; the second, whose keys this process committed last,
        // commits without reading (the commit call checks nothing changed since).
        let mut reads = Vec::new();
        for round in 0..2 {
            let txn = etcd_client::Txn::new().and_then(hundred_puts(round));
            assert!(client.txn(txn).await.expect("txn").succeeded());
            reads.push((count("batch_read"), count("commit_batch")));
        }
        assert_eq!(reads[0].0, 1.0, "the first batch reads its keys once");
        assert_eq!(
            reads[1],
            (1.0, reads[0].1 + 1.0),
            "the second batch commits without a read"
        );
        assert_hundred_keys_overwritten(&mut client).await;
    });
    assert_eq!(count("get"), 0.0, "keys looked up after the batch's read");
}

/// A write batch on SQLite is at most two calls to the connection's worker thread, whatever it
/// writes: the lock (`BEGIN IMMEDIATE`) with the keyspace row and the batch's keys
/// (`batch_read`), then the superseded rows, new rows and counters, each checked for the rows
/// it changed, and the commit (`write`). Each statement alone was a hand-off there and back,
/// six or seven per batch, while the next batch waited for the lock; the commit was a call of
/// its own until the checks moved into the call. A batch whose keys this process committed
/// last (or creates) has no read call: its `write` call begins with the lock and the check
/// that nothing changed since (the plain puts below); one naming a key this process has not
/// seen reads first (each txn below deletes one).
#[test]
fn sqlite_write_batches_are_one_call_from_the_cache_else_two() {
    let (kine, metrics_address) = spawn_with_metrics(kine_tests::Backend::Sqlite);
    let count = |query: &str| statements(&metrics_address, "sqlite", query);
    let one_by_one = [
        "get",
        "state_lock",
        "supersede",
        "insert_kv",
        "revision",
        "begin_write",
    ];
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut client = etcd_client::Client::connect([kine.endpoint.as_str()], None)
            .await
            .expect("connect");
        client.put("w/a", "0", None).await.expect("put");
        let put = client.put("w/b", "0", None).await.expect("put");
        let start = put.header().expect("header").revision();
        let before: Vec<f64> = one_by_one.iter().map(|query| count(query)).collect();
        let (reads, writes, commits) = (count("batch_read"), count("write"), count("commit"));
        for i in 1..=3 {
            // An overwrite (supersede, insert, counters), then a txn overwriting one key,
            // creating one and deleting another.
            client
                .put("w/a", format!("put-{i}"), None)
                .await
                .expect("put");
            let txn = etcd_client::Txn::new()
                .when([etcd_client::Compare::version(
                    "w/a",
                    etcd_client::CompareOp::Equal,
                    2 * i,
                )])
                .and_then([
                    etcd_client::TxnOp::put("w/a", format!("txn-{i}"), None),
                    etcd_client::TxnOp::put(format!("w/new-{i}"), "1", None),
                    etcd_client::TxnOp::delete(format!("w/new-{}", i - 1), None),
                ]);
            let answer = client.txn(txn).await.expect("txn");
            assert!(answer.succeeded(), "txn {i}");
        }
        let after: Vec<f64> = one_by_one.iter().map(|query| count(query)).collect();
        assert_eq!(after, before, "statements one by one: {one_by_one:?}");
        assert_eq!(
            count("batch_read"),
            reads + 3.0,
            "the puts read, or the txns did not"
        );
        assert_eq!(count("write"), writes + 6.0);
        assert_eq!(
            count("commit"),
            commits,
            "a batch committed in a call of its own"
        );
        let got = client
            .get("w/", Some(etcd_client::GetOptions::new().with_prefix()))
            .await
            .expect("get");
        let seen: Vec<(String, String, i64)> = got
            .kvs()
            .iter()
            .map(|kv| {
                let key = kv.key_str().expect("key").to_string();
                let value = kv.value_str().expect("value").to_string();
                (key, value, kv.version())
            })
            .collect();
        let expected = [("w/a", "txn-3", 7), ("w/b", "0", 1), ("w/new-3", "1", 1)];
        let expected: Vec<(String, String, i64)> = expected
            .iter()
            .map(|(key, value, version)| (key.to_string(), value.to_string(), *version))
            .collect();
        assert_eq!(seen, expected);
        let status = client.status().await.expect("status");
        assert_eq!(status.header().expect("header").revision(), start + 6);
    });
}

/// Puts and creates (a compare with mod revision 0, kube-apiserver's) of keys nobody wrote
/// are one statement each on PostgreSQL once this process has committed to the keyspace: the
/// keys are taken for absent, without the batch read, and the commit call checks it (the
/// checks themselves: `multiprocess.rs`, keys another process wrote).
#[test]
fn postgres_puts_and_creates_of_new_keys_are_one_statement() {
    let (kine, metrics_address) = spawn_with_metrics(kine_tests::Backend::Postgres);
    let count = |query: &str| statements(&metrics_address, "postgres", query);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut client = etcd_client::Client::connect([kine.endpoint.as_str()], None)
            .await
            .expect("connect");
        client.put("new/first", "0", None).await.expect("put");
        let (reads, commits) = (count("batch_read"), count("commit_batch"));
        for i in 0..5 {
            let put = client
                .put(format!("new/put-{i}"), "1", None)
                .await
                .expect("put");
            let revision = put.header().expect("header").revision();
            let key = format!("new/create-{i}");
            let create = etcd_client::Txn::new()
                .when([etcd_client::Compare::mod_revision(
                    key.as_str(),
                    etcd_client::CompareOp::Equal,
                    0,
                )])
                .and_then([etcd_client::TxnOp::put(key.as_str(), "1", None)]);
            let created = client.txn(create).await.expect("txn");
            assert!(created.succeeded(), "create {key}");
            assert_eq!(created.header().expect("header").revision(), revision + 1);
        }
        assert_eq!(count("batch_read"), reads, "a batch read for a new key");
        assert_eq!(count("commit_batch"), commits + 10.0);
        let got = client
            .get("new/", Some(etcd_client::GetOptions::new().with_prefix()))
            .await
            .expect("get");
        assert_eq!(got.count(), 11);
        assert!(
            got.kvs()
                .iter()
                .all(|kv| kv.version() == 1 && kv.create_revision() == kv.mod_revision())
        );
    });
}

/// A watcher of a keyspace this process writes gets the events of those writes from the
/// writer itself, previous values included: none is read back from the datastore (`events`).
/// A lease revoke, whose deleted values the writer does not read, is read back.
fn watchers_get_this_process_writes_without_reading_them_back(
    backend: kine_tests::Backend,
    driver: &str,
) {
    let (kine, metrics_address) = spawn_with_metrics(backend);
    let reads = || statements(&metrics_address, driver, "events");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut client = etcd_client::Client::connect([kine.endpoint.as_str()], None)
            .await
            .expect("connect");
        client.put("w/a", "0", None).await.expect("put");
        let options = etcd_client::WatchOptions::new()
            .with_prefix()
            .with_prev_key();
        let mut stream = client.watch("w/", Some(options)).await.expect("watch");
        let created = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("created within 10 s")
            .expect("watch stream")
            .expect("watch open");
        assert!(created.created(), "the first answer creates the watch");
        // (type, key, value, version, previous value) of each event, in order.
        type Seen = (i32, String, String, i64, Option<String>);
        let mut next_events = async |n: usize| -> Vec<Seen> {
            let mut seen = Vec::new();
            while seen.len() < n {
                let response = tokio::time::timeout(Duration::from_secs(10), stream.message())
                    .await
                    .expect("events within 10 s")
                    .expect("watch stream")
                    .expect("watch open");
                for event in response.events() {
                    let kv = event.kv().expect("kv");
                    seen.push((
                        event.event_type() as i32,
                        kv.key_str().expect("utf-8").to_string(),
                        kv.value_str().expect("utf-8").to_string(),
                        kv.version(),
                        event
                            .prev_kv()
                            .map(|prev| prev.value_str().expect("utf-8").to_string()),
                    ));
                }
            }
            seen
        };
        let put = etcd_client::EventType::Put as i32;
        let delete = etcd_client::EventType::Delete as i32;
        client.put("w/a", "1", None).await.expect("put");
        assert_eq!(
            next_events(1).await,
            [(put, "w/a".into(), "1".into(), 2, Some("0".into()))]
        );
        let before = reads();

        client.put("w/b", "2", None).await.expect("put");
        let txn = etcd_client::Txn::new().and_then([
            etcd_client::TxnOp::put("w/c", "3", None),
            etcd_client::TxnOp::put("w/a", "4", None),
        ]);
        assert!(client.txn(txn).await.expect("txn").succeeded());
        client.delete("w/b", None).await.expect("delete");
        // Many writers at once: group commits of several revisions each.
        let writes = (0..32).map(|i| {
            let mut client = client.clone();
            async move {
                client
                    .put(format!("w/many/{i:02}"), "x", None)
                    .await
                    .expect("put")
            }
        });
        futures::future::join_all(writes).await;
        let seen = next_events(4 + 32).await;
        assert_eq!(
            seen[..4],
            [
                (put, "w/b".into(), "2".into(), 1, None),
                (put, "w/c".into(), "3".into(), 1, None),
                (put, "w/a".into(), "4".into(), 3, Some("1".into())),
                (delete, "w/b".into(), String::new(), 0, Some("2".into())),
            ]
        );
        let mut many: Vec<&str> = seen[4..].iter().map(|e| e.1.as_str()).collect();
        many.sort_unstable();
        many.dedup();
        assert_eq!(many.len(), 32, "each write's event once");
        assert_eq!(reads(), before, "events read back from the datastore");

        let lease = client.lease_grant(60, None).await.expect("grant").id();
        let with_lease = etcd_client::PutOptions::new().with_lease(lease);
        client.put("w/l", "5", Some(with_lease)).await.expect("put");
        client.lease_revoke(lease).await.expect("revoke");
        assert_eq!(
            next_events(2).await,
            [
                (put, "w/l".into(), "5".into(), 1, None),
                (delete, "w/l".into(), String::new(), 0, Some("5".into())),
            ]
        );
        assert!(reads() > before, "a revoke's events are read back");
    });
}

#[test]
fn sqlite_watchers_get_this_process_writes_without_reading_them_back() {
    watchers_get_this_process_writes_without_reading_them_back(
        kine_tests::Backend::Sqlite,
        "sqlite",
    );
}

#[test]
fn postgres_watchers_get_this_process_writes_without_reading_them_back() {
    watchers_get_this_process_writes_without_reading_them_back(
        kine_tests::Backend::Postgres,
        "postgres",
    );
}

/// On PostgreSQL a lease renewal's commit does not wait for the log flush (`SET LOCAL
/// synchronous_commit = off` in its own transaction): a keep-alive flood is not a stream of
/// flushes every writer queues behind. etcd keeps renewals in memory only; a renewal lost in
/// a crash here leaves the deadline stored before it.
#[test]
fn postgres_lease_renewals_do_not_wait_for_the_log_flush() {
    let (kine, metrics_address) = spawn_with_metrics(kine_tests::Backend::Postgres);
    let count = |query: &str| statements(&metrics_address, "postgres", query);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut client = etcd_client::Client::connect([kine.endpoint.as_str()], None)
            .await
            .expect("connect");
        for _ in 0..3 {
            let id = client.lease_grant(30, None).await.expect("grant").id();
            let (mut keeper, mut answers) = client.lease_keep_alive(id).await.expect("keep-alive");
            keeper.keep_alive().await.expect("send");
            let answer = tokio::time::timeout(Duration::from_secs(10), answers.message())
                .await
                .expect("an answer in time")
                .expect("stream")
                .expect("stream open");
            assert_eq!((answer.id(), answer.ttl()), (id, 30));
            let ttl = client.lease_time_to_live(id, None).await.expect("ttl");
            assert!(ttl.ttl() >= 29, "renewed: {} s left", ttl.ttl());
        }
    });
    let (renewals, lazy) = (count("lease_renew"), count("lazy_commit"));
    assert!(renewals >= 1.0, "keep-alives were stored");
    assert_eq!(lazy, renewals, "every renewal's transaction commits lazily");
}

/// A MariaDB server of the test's own whose slow log (the table `mysql.slow_log`) records
/// every statement that examined 2,000 rows or more. Set before kine-rs connects: a
/// connection keeps the `long_query_time` it started with.
fn mariadb_logging_walks() -> kine_tests::private_db::PrivateMariadb {
    let mariadb = kine_tests::private_db::PrivateMariadb::start();
    mariadb.mysql(
        "SET GLOBAL log_output = 'TABLE'; SET GLOBAL long_query_time = 0; \
         SET GLOBAL min_examined_row_limit = 2000; SET GLOBAL slow_query_log = 1",
    );
    mariadb
}

/// A limited read at an older revision on MySQL/MariaDB examines the rows of its page, not
/// the rest of the range: MariaDB planned the branch of rows superseded after the revision
/// as a walk of the primary key from the page's first key to the range's end (to spare a
/// sort under its LIMIT), so each page of a migration's snapshot out of MariaDB read the
/// rest of the table. MariaDB's own slow log, on a server of the test's own, records every
/// statement that examined 2,000 rows or more.
#[test]
fn mysql_reads_at_an_older_revision_examine_their_page_only() {
    const KEYS: usize = 20_000;
    const PER_TXN: usize = 100;
    const CHANGED: usize = 10;
    let mariadb = mariadb_logging_walks();
    let dir = tempfile::tempdir().expect("tempdir");
    let kine = spawn_kine_on(&mariadb.url("kine"), dir, &[]);
    let key = |i: usize| format!("page/{i:05}");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut client = etcd_client::Client::connect([kine.endpoint.as_str()], None)
            .await
            .expect("connect");
        let mut loaded = 0;
        for first in (0..KEYS).step_by(PER_TXN) {
            let puts: Vec<etcd_client::TxnOp> = (first..first + PER_TXN)
                .map(|i| etcd_client::TxnOp::put(key(i), format!("old-{i}"), None))
                .collect();
            let txn = etcd_client::Txn::new().and_then(puts);
            loaded = client
                .txn(txn)
                .await
                .expect("load")
                .header()
                .expect("header")
                .revision();
        }
        // The first keys change after `loaded`: at `loaded`, their rows are superseded ones.
        for i in 0..CHANGED {
            client.put(key(i), "new", None).await.expect("overwrite");
        }
        mariadb.mysql("TRUNCATE TABLE mysql.slow_log");

        let page = etcd_client::GetOptions::new()
            .with_prefix()
            .with_revision(loaded)
            .with_limit(100);
        let got = client
            .get("page/", Some(page))
            .await
            .expect("page at a revision");
        let values: Vec<(String, String)> = got
            .kvs()
            .iter()
            .map(|kv| {
                let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                (text(kv.key()), text(kv.value()))
            })
            .collect();
        let expected: Vec<(String, String)> =
            (0..100).map(|i| (key(i), format!("old-{i}"))).collect();
        assert_eq!(values, expected, "the first 100 keys as they were");
        assert_eq!((got.count(), got.more()), (KEYS as i64, true));

        // The rows statements of that read: the count examines the range, as it must.
        let walks = mariadb.mysql(
            "SELECT rows_examined, LEFT(sql_text, 120) FROM mysql.slow_log \
             WHERE sql_text LIKE '%kv_superseded%' AND sql_text NOT LIKE '%COUNT(%'",
        );
        assert!(
            walks.trim().is_empty(),
            "a page of 100 keys examined 2,000 rows or more:\n{walks}"
        );
        // The slow log sees the statements at all (the count's walk is in it).
        let counts = mariadb.mysql(
            "SELECT COUNT(*) FROM mysql.slow_log WHERE sql_text LIKE '%COUNT(%' \
             AND sql_text LIKE '%kv_past%'",
        );
        assert_ne!(counts.trim(), "0", "the slow log recorded nothing");
    });
}

/// A compaction's purge on MySQL examines a bounded number of rows per step (each step holds
/// the keyspace's lock): the walk for current tombstones below the compaction revision goes
/// on from where the step before stopped. Searched from the start of `kv` at every step, it
/// scanned the keyspace's whole history each time: with 10,000,000 rows, puts fell to 17/s
/// while the compaction ran. MariaDB's slow log, on a server of the test's own, records
/// every statement that examined 2,000 rows or more.
#[test]
fn mysql_compaction_steps_examine_a_batch_of_rows_each() {
    const KEYS: usize = 6_000;
    const PER_TXN: usize = 100;
    let mariadb = mariadb_logging_walks();
    let dir = tempfile::tempdir().expect("tempdir");
    let kine = spawn_kine_on(&mariadb.url("kine"), dir, &[]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut client = etcd_client::Client::connect([kine.endpoint.as_str()], None)
            .await
            .expect("connect");
        // Every key twice (so half the rows are superseded), then one deleted: the walk must
        // pass all the live rows below it to find its tombstone.
        let mut revision = 0;
        for round in 0..2 {
            for first in (0..KEYS).step_by(PER_TXN) {
                let puts: Vec<etcd_client::TxnOp> = (first..first + PER_TXN)
                    .map(|i| {
                        etcd_client::TxnOp::put(format!("walk/{i:05}"), format!("{round}"), None)
                    })
                    .collect();
                revision = client
                    .txn(etcd_client::Txn::new().and_then(puts))
                    .await
                    .expect("load")
                    .header()
                    .expect("header")
                    .revision();
            }
        }
        client.delete("walk/05999", None).await.expect("delete");
        client.put("walk/last", "x", None).await.expect("put");
        mariadb.mysql("TRUNCATE TABLE mysql.slow_log");
        let compact_at = revision + 2;
        client
            .compact(
                compact_at,
                Some(etcd_client::CompactionOptions::new().with_physical()),
            )
            .await
            .expect("compact");
        // The purge ran: the tombstone and the superseded rows are gone.
        let rows = mariadb.mysql("SELECT COUNT(*) FROM kine.kv");
        assert_eq!(rows.trim(), KEYS.to_string(), "rows left after the purge");
        let walks = mariadb.mysql(
            "SELECT rows_examined, LEFT(sql_text, 120) FROM mysql.slow_log \
             WHERE sql_text LIKE '%FROM kv %JOIN kv_head h%'",
        );
        assert!(
            walks.trim().is_empty(),
            "a step of the purge examined 2,000 rows or more:\n{walks}"
        );
        // The slow log sees such statements at all: the count above examined every row.
        let counts = mariadb.mysql(
            "SELECT COUNT(*) FROM mysql.slow_log WHERE sql_text LIKE 'SELECT COUNT(*) FROM kine.kv%'",
        );
        assert_ne!(counts.trim(), "0", "the slow log recorded nothing");
        let got = client
            .get("walk/", Some(etcd_client::GetOptions::new().with_prefix()))
            .await
            .expect("get");
        assert_eq!(got.count(), KEYS as i64, "live keys after the purge");
    });
}

/// On MySQL and SQLite (key lists, no arrays) a write batch looks its keys up and supersedes
/// their rows with one statement each, whatever the number of keys up to 128: the list is
/// padded to a power of two instead of split into power-of-two pieces (100 keys were three
/// lookups and three updates, each a round trip under the keyspace's lock).
/// `lookup` and `supersede` name the statements (or, on SQLite, the calls) that look keys up
/// and name superseded rows (MySQL: its `kv_past` rows); `overwrite_lookups`, the lookups of
/// the overwrite (none on SQLite, where a batch of keys this process committed last starts
/// from the cache).
fn write_batch_statements_per_key_list(
    backend: kine_tests::Backend,
    driver: &str,
    lookup: &str,
    supersede: &str,
    overwrite_lookups: f64,
) {
    let (kine, metrics_address) = spawn_with_metrics(backend);
    let count = |query: &str| statements(&metrics_address, driver, query);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut client = etcd_client::Client::connect([kine.endpoint.as_str()], None)
            .await
            .expect("connect");
        let mut counts = vec![(count(lookup), count(supersede))];
        for round in 0..2 {
            let txn = etcd_client::Txn::new().and_then(hundred_puts(round));
            assert!(client.txn(txn).await.expect("txn").succeeded());
            counts.push((count(lookup), count(supersede)));
        }
        assert_eq!(
            counts[1].0 - counts[0].0,
            1.0,
            "creating 100 keys looks them up once"
        );
        assert_eq!(
            (counts[2].0 - counts[1].0, counts[2].1 - counts[1].1),
            (overwrite_lookups, 1.0),
            "overwriting 100 keys: {overwrite_lookups} lookup, one update"
        );
        assert_hundred_keys_overwritten(&mut client).await;
    });
}

#[test]
fn mysql_write_batch_names_its_keys_in_one_statement_each() {
    write_batch_statements_per_key_list(
        kine_tests::Backend::Mysql,
        "mysql",
        "get",
        "insert_past",
        1.0,
    );
    // The heads too, padded the same way.
    write_batch_statements_per_key_list(
        kine_tests::Backend::Mysql,
        "mysql",
        "get",
        "place_heads",
        1.0,
    );
}

#[test]
fn sqlite_write_batch_names_its_keys_in_one_statement_each() {
    write_batch_statements_per_key_list(
        kine_tests::Backend::Sqlite,
        "sqlite",
        "batch_read",
        "write",
        // The keys are this process's own last commit: that batch starts from the cache.
        0.0,
    );
}

/// MySQL finds a write batch's current rows by key whatever InnoDB's statistics say: each
/// key's head by `kv_head`'s primary key, then its row by `kv`'s. (Before migration 0007,
/// current rows were marked in `kv.superseded`; once `kv` had history, MariaDB read them
/// through `ref` on `(keyspace, superseded)` alone and filtered every current row of the
/// keyspace by key: a lookup of 64 keys took 62.9 ms. And a JSON table of keys joined to a
/// small `kv_head` was planned as a read of every head.) The test builds history, refreshes
/// the statistics, takes the lookups kine-rs sent from the server's general log and asks the
/// server for their plans.
#[test]
fn mysql_current_rows_are_found_by_key_whatever_the_statistics() {
    const KEYS: usize = 5_000;
    const PER_TXN: usize = 100;
    const WRITERS: usize = 16;
    let mariadb = kine_tests::private_db::PrivateMariadb::start();
    // MariaDB writes a prepared statement's parameters into the general log only when the
    // log was on as it was prepared, and kine-rs prepares its lookups during the load.
    mariadb.mysql("SET GLOBAL log_output = 'TABLE'; SET GLOBAL general_log = 1");
    let dir = tempfile::tempdir().expect("tempdir");
    let kine = spawn_kine_on(&mariadb.url("kine"), dir, &[]);
    let key = |i: usize| format!("live/{i:05}");
    // Values of kube-apiserver's size make the rows' pages what a key's history costs.
    let value = "v".repeat(1024);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut client = etcd_client::Client::connect([kine.endpoint.as_str()], None)
            .await
            .expect("connect");
        for first in (0..KEYS).step_by(PER_TXN) {
            let puts: Vec<etcd_client::TxnOp> = (first..first + PER_TXN)
                .map(|i| etcd_client::TxnOp::put(key(i), value.clone(), None))
                .collect();
            let txn = etcd_client::Txn::new().and_then(puts);
            client.txn(txn).await.expect("load");
        }
        // Then every key once more in a put of its own, as kube-apiserver's updates come: as
        // many superseded rows as current ones, each with its own `superseded` revision.
        let writers = (0..WRITERS).map(|w| {
            let mut client = client.clone();
            let value = value.clone();
            async move {
                for i in (w..KEYS).step_by(WRITERS) {
                    client
                        .put(key(i), value.clone(), None)
                        .await
                        .expect("overwrite");
                }
            }
        });
        futures::future::join_all(writers).await;
        mariadb.mysql(
            "ANALYZE TABLE kine.kv, kine.kv_head, kine.kv_past; TRUNCATE TABLE mysql.general_log",
        );
        let puts: Vec<etcd_client::TxnOp> = (0..64)
            .map(|i| etcd_client::TxnOp::put(key(i * 70), "2", None))
            .collect();
        client
            .txn(etcd_client::Txn::new().and_then(puts))
            .await
            .expect("overwrite 64 keys");
        let got = client.get(key(70), None).await.expect("get");
        assert_eq!(got.kvs()[0].value(), b"2");
    });
    mariadb.mysql("SET GLOBAL general_log = 0");
    // The batch's 64 keys come as one JSON table (`Dialect::KEYS_JOINED`), the get's one key
    // as an `IN` list: both ways must find each key's head, then its row, by primary key.
    let lookups = [
        (
            "the batch's 64 keys",
            "SELECT %FROM JSON_TABLE(%JOIN (SELECT %) AS kv_current ON kv_current.keyspace = %",
        ),
        (
            "the get's key",
            "SELECT %) AS kv_current WHERE keyspace = %IN (%",
        ),
    ];
    for (what, pattern) in lookups {
        let lookup = mariadb.mysql(&format!(
            "SELECT argument FROM mysql.general_log WHERE command_type = 'Execute' \
             AND argument LIKE '{pattern}' LIMIT 1"
        ));
        // `mysql -B` writes a backslash of the logged text (the JSON's quotes are escaped in
        // its literal) as two.
        let lookup = lookup.trim().replace("\\\\", "\\");
        assert!(
            !lookup.is_empty(),
            "the general log holds no lookup of {what}"
        );
        let plan = mariadb.mysql(&format!("USE kine; EXPLAIN FORMAT=JSON {lookup}"));
        let plan: String = plan.split_whitespace().collect();
        assert!(
            plan.contains(r#""used_key_parts":["keyspace","key"]"#)
                && plan.contains(r#""used_key_parts":["keyspace","mod_revision","sub"]"#),
            "the lookup of {what} does not find heads and rows by primary key:\n{plan}"
        );
        assert!(
            !plan.contains(r#""used_key_parts":["keyspace"],"#),
            "the lookup of {what} reads every head or row of the keyspace:\n{plan}"
        );
    }
}

/// `counts()` once its first figure reaches `at_least.0` (a read ahead runs after the answer
/// that started it), or after 5 s.
fn settled(counts: &impl Fn() -> (f64, f64), at_least: (f64, f64)) -> (f64, f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = counts();
        if now.0 >= at_least.0 || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A paginated list's next page is read while the client handles the page before
/// (`read_ahead.rs`), and the client's request for it is answered from that read: with the
/// current revision in its header, and `Compacted` once a compaction passed the page's
/// revision, as a read at that moment answers.
#[test]
fn sqlite_lists_read_the_next_page_ahead() {
    let (kine, metrics_address) = spawn_with_metrics(kine_tests::Backend::Sqlite);
    let ranges = || (statements(&metrics_address, "sqlite", "range"), 0.0);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut client = etcd_client::Client::connect([kine.endpoint.as_str()], None)
            .await
            .expect("connect");
        let mut last = 0;
        for i in 0..30 {
            last = client
                .put(format!("ra/{i:02}"), "v", None)
                .await
                .expect("put")
                .header()
                .expect("header")
                .revision();
        }
        // A page's keys, count and `more`.
        let shape = |got: &etcd_client::GetResponse| -> (Vec<String>, i64, bool) {
            let keys = got
                .kvs()
                .iter()
                .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
                .collect();
            (keys, got.count(), got.more())
        };
        let expected = |from: usize| -> Vec<String> {
            (from..from + 10).map(|i| format!("ra/{i:02}")).collect()
        };
        let page = |after: &str, revision: i64| {
            (
                format!("{after}\0"),
                etcd_client::GetOptions::new()
                    .with_range("ra0")
                    .with_revision(revision)
                    .with_limit(10),
            )
        };
        let (before, _) = ranges();

        let first = etcd_client::GetOptions::new().with_prefix().with_limit(10);
        let got = client.get("ra/", Some(first)).await.expect("page 1");
        assert_eq!(shape(&got), (expected(0), 30, true));
        let (read, _) = settled(&ranges, (before + 2.0, 0.0));
        assert_eq!(read, before + 2.0, "page 1 and page 2 read ahead");

        let (key, options) = page("ra/09", last);
        let got = client.get(key, Some(options)).await.expect("page 2");
        assert_eq!(shape(&got), (expected(10), 20, true));
        assert_eq!(got.header().expect("header").revision(), last);
        // Page 3 is read ahead in turn; page 2 itself was not read again.
        assert_eq!(settled(&ranges, (before + 3.0, 0.0)).0, before + 3.0);

        // A write meanwhile: page 3 is still the rows at `last`, its header the revision now.
        let now = client
            .put("zz", "v", None)
            .await
            .expect("put")
            .header()
            .expect("header")
            .revision();
        let (key, options) = page("ra/19", last);
        let got = client.get(key, Some(options)).await.expect("page 3");
        assert_eq!(shape(&got), (expected(20), 10, false));
        assert_eq!(got.header().expect("header").revision(), now);
        assert_eq!(ranges().0, before + 3.0, "page 3 was read ahead");

        // A compaction past the list's revision between two pages: the page read ahead is
        // refused as etcd refuses a read at a compacted revision.
        let first = etcd_client::GetOptions::new()
            .with_prefix()
            .with_limit(10)
            .with_revision(last);
        client.get("ra/", Some(first)).await.expect("page 1 again");
        settled(&ranges, (before + 5.0, 0.0));
        client.compact(now, None).await.expect("compact");
        let (key, options) = page("ra/09", last);
        let refused = client.get(key, Some(options)).await;
        assert!(
            matches!(&refused, Err(etcd_client::Error::GRpcStatus(status))
                if status.message().contains("required revision has been compacted")),
            "{refused:?}"
        );
    });
}

/// Under a constant stream of writes SQLite's passive checkpoints never catch up with the
/// log's end, so the log never starts over by itself. Past `--sqlite-wal-limit-bytes` the
/// background checkpoint restarts it (recorded as `checkpoint_restart`, the time writers were
/// held off) and the file is reused and cut back to the limit rather than emptied and grown
/// again with every commit; once the writes stop, it comes back under the limit.
#[test]
fn sqlite_wal_restarts_under_constant_writes() {
    const LIMIT: u64 = 2 << 20;
    // On tmpfs where there is one: the test writes tens of MiB, and fsyncs are not its point.
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm).expect("tempdir")
    } else {
        tempfile::tempdir().expect("tempdir")
    };
    let wal = dir.path().join("state.db-wal");
    let endpoint = format!("sqlite://{}", dir.path().join("state.db").display());
    let metrics_address = format!("127.0.0.1:{}", free_port());
    let limit = LIMIT.to_string();
    let kine = spawn_kine_on(
        &endpoint,
        dir,
        &[
            "--metrics-bind-address",
            &metrics_address,
            "--sqlite-wal-limit-bytes",
            &limit,
        ],
    );
    let count = |query: &str| statements(&metrics_address, "sqlite", query);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let client = etcd_client::Client::connect([kine.endpoint.as_str()], None)
            .await
            .expect("connect");
        let value = vec![b'v'; 16 << 10];
        // Four writers, 64 MiB of overwrites of 64 keys: 32 times the limit.
        let mut writers = Vec::new();
        for writer in 0..4 {
            let (mut client, value) = (client.clone(), value.clone());
            writers.push(tokio::spawn(async move {
                for i in 0..1024 {
                    client
                        .put(
                            format!("wal/{}", (i * 4 + writer) % 64),
                            value.clone(),
                            None,
                        )
                        .await
                        .expect("put");
                }
            }));
        }
        for writer in writers {
            writer.await.expect("writer");
        }
        assert!(
            count("checkpoint_restart") >= 1.0,
            "64 MiB written past a 2 MiB limit without a restart of the log"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut size = u64::MAX;
        while Instant::now() < deadline {
            size = std::fs::metadata(&wal).map_or(0, |m| m.len());
            if size <= LIMIT {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(size <= LIMIT, "the log holds {size} bytes after the writes");
    });
}
