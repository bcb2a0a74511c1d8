//! Start-up against database servers: kine's endpoint forms, waiting for an unreachable
//! database (without logging its password), and a clear error for a schema newer than this
//! kine-rs.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kine_tests::{Backend, TestDatabase, free_port, kine_rs_binary, spawn_kine_on};

/// Runs kine-rs on `endpoint` for at most `wait`; returns whether it exited by itself and
/// what it wrote to stderr.
fn run_for(endpoint: &str, wait: Duration) -> (Option<std::process::ExitStatus>, String) {
    let mut child = Command::new(kine_rs_binary())
        .args(["--endpoint", endpoint, "--listen-address"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kine-rs");
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let exited = child.try_wait().ok().flatten();
    if exited.is_none() {
        let _ = child.kill();
    }
    let status = child.wait().ok().filter(|_| exited.is_some());
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    (status, stderr)
}

#[test]
fn waits_for_an_unreachable_database_without_logging_its_password() {
    let port = free_port();
    let endpoint = format!("postgres://kine:hunter2@127.0.0.1:{port}/kine");
    let (status, stderr) = run_for(&endpoint, Duration::from_secs(3));
    assert!(status.is_none(), "kine-rs gave up at once: {stderr}");
    let expected = format!("waiting for the datastore at postgres://***@127.0.0.1:{port}/kine");
    assert!(
        stderr.matches(&expected).count() >= 2,
        "no repeated waiting line: {stderr}"
    );
    assert!(!stderr.contains("hunter2"), "password logged: {stderr}");
}

#[test]
fn refuses_a_newer_schema_version_by_name() {
    let database = TestDatabase::new(Backend::Postgres).expect("postgres");
    // The first start creates the database and its schema.
    drop(spawn_kine_on(
        &database.endpoint,
        tempfile::tempdir().expect("tempdir"),
        &[],
    ));
    let inserted = Command::new("psql")
        .arg(&database.endpoint)
        .args([
            "-q",
            "-c",
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, \
             execution_time) VALUES (99, 'from the future', true, '\\x00', 1)",
        ])
        .status()
        .expect("psql");
    assert!(inserted.success());
    let (status, stderr) = run_for(&database.endpoint, Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| !s.success()),
        "kine-rs started on a newer schema: {stderr}"
    );
    assert!(
        stderr.contains("incompatible schema") && stderr.contains("version 99"),
        "unclear error: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_mysql_through_kines_go_style_endpoint() {
    let database = TestDatabase::new(Backend::Mysql).expect("mysql");
    // mysql://user@host:port/db -> mysql://user@tcp(host:port)/db
    let rest = database
        .endpoint
        .strip_prefix("mysql://")
        .expect("a mysql:// URL");
    let (userinfo, rest) = rest.rsplit_once('@').expect("user@host");
    let (address, path) = rest.split_once('/').expect("host/db");
    let endpoint = format!("mysql://{userinfo}@tcp({address})/{path}");
    let guard = tokio::task::spawn_blocking(move || {
        spawn_kine_on(&endpoint, tempfile::tempdir().expect("tempdir"), &[])
    })
    .await
    .expect("spawn");
    let mut client = etcd_client::Client::connect([guard.endpoint.as_str()], None)
        .await
        .expect("connect");
    client.put("k", "v", None).await.expect("put");
    let got = client.get("k", None).await.expect("get");
    assert_eq!(got.kvs()[0].value(), b"v");
}

/// A key longer than the database can index fails only its own request, with a clear
/// InvalidArgument, while writes sharing its group-commit batch succeed.
async fn an_over_long_key_fails_alone(backend: Backend, limit: usize) {
    let kine = kine_tests::spawn_kine(backend);
    let client = etcd_client::Client::connect([kine.endpoint.as_str()], None)
        .await
        .expect("connect");
    let long_key = vec![b'k'; limit + 1];
    let mut writes = Vec::new();
    for i in 0..32 {
        let mut client = client.clone();
        writes.push(tokio::spawn(async move {
            client.put(format!("neighbour/{i}"), "v", None).await
        }));
    }
    let mut long_client = client.clone();
    let long = long_client.put(long_key, "v", None).await;
    for write in writes {
        write
            .await
            .expect("join")
            .expect("a neighbour's write must not fail with the long key");
    }
    let error = long.expect_err("the long key must be refused");
    let status = match error {
        etcd_client::Error::GRpcStatus(status) => status,
        other => panic!("expected a gRPC status, got {other}"),
    };
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("longer than"), "{status:?}");
    let mut reader = client.clone();
    let stored = reader
        .get(
            "neighbour/",
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only(),
            ),
        )
        .await
        .expect("count");
    assert_eq!(stored.count(), 32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_refuses_an_over_long_key_alone() {
    an_over_long_key_fails_alone(Backend::Postgres, 2600).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_refuses_an_over_long_key_alone() {
    an_over_long_key_fails_alone(Backend::Mysql, 3000).await;
}

#[test]
fn waits_for_an_unreachable_nats_without_logging_its_password() {
    let port = free_port();
    let endpoint = format!("nats://kine:hunter2@127.0.0.1:{port}?bucket=unreachable");
    let (status, stderr) = run_for(&endpoint, Duration::from_secs(3));
    assert!(status.is_none(), "kine-rs gave up at once: {stderr}");
    let expected =
        format!("waiting for the datastore at nats://***@127.0.0.1:{port}?bucket=unreachable");
    assert!(
        stderr.matches(&expected).count() >= 2,
        "no repeated waiting line: {stderr}"
    );
    assert!(!stderr.contains("hunter2"), "password logged: {stderr}");
}

#[test]
fn refuses_embedded_nats_server_options_by_name() {
    for option in ["serverConfig=/etc/nats.conf", "dontListen", "stdoutLogging"] {
        let endpoint = format!("nats://127.0.0.1:4222?noEmbed&{option}");
        let (status, stderr) = run_for(&endpoint, Duration::from_secs(10));
        assert!(
            status.is_some_and(|s| !s.success()),
            "{option} was accepted: {stderr}"
        );
        let name = option.split('=').next().unwrap_or(option);
        assert!(
            stderr.contains(name) && stderr.contains("never embeds"),
            "{option}: {stderr}"
        );
    }
}

/// A write batch larger than a NATS message (1 MB by default) is published in chunks; both
/// the writing process and another one see it whole, and later writes go on normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_batches_larger_than_a_message() {
    let database = TestDatabase::new(Backend::Nats).expect("nats");
    let start = |endpoint: String| {
        tokio::task::spawn_blocking(move || {
            spawn_kine_on(&endpoint, tempfile::tempdir().expect("tempdir"), &[])
        })
    };
    let a = start(database.endpoint.clone()).await.expect("spawn");
    let b = start(database.endpoint.clone()).await.expect("spawn");
    let mut client_a = etcd_client::Client::connect([a.endpoint.as_str()], None)
        .await
        .expect("connect");
    let mut client_b = etcd_client::Client::connect([b.endpoint.as_str()], None)
        .await
        .expect("connect");
    let big: Vec<u8> = (0..1_400_000u32).map(|i| (i % 251) as u8).collect();
    let put = client_a.put("big", big.clone(), None).await.expect("put");
    let revision = put.header().expect("header").revision();
    client_b.put("after", "v", None).await.expect("put after");
    for client in [&mut client_a, &mut client_b] {
        let got = client.get("big", None).await.expect("get");
        assert_eq!(got.kvs()[0].value(), big.as_slice());
        assert_eq!(got.kvs()[0].mod_revision(), revision);
        let after = client.get("after", None).await.expect("get");
        assert_eq!(after.kvs()[0].mod_revision(), revision + 1);
    }
}

/// The first and last sequence of the only keyspace stream of the bucket `endpoint` names.
async fn nats_stream_bounds(endpoint: &str) -> (u64, u64) {
    let bucket = endpoint
        .split("bucket=")
        .nth(1)
        .and_then(|rest| rest.split('&').next())
        .expect("bucket")
        .to_string();
    let client = async_nats::connect("127.0.0.1:4222").await.expect("nats");
    let js = async_nats::jetstream::new(client);
    let mut names = js.stream_names();
    let mut found = None;
    while let Some(Ok(name)) = futures::StreamExt::next(&mut names).await {
        if name.starts_with(&format!("{bucket}-ks-")) {
            found = Some(name);
        }
    }
    let mut stream = js
        .get_stream(found.expect("a keyspace stream"))
        .await
        .expect("stream");
    let info = stream.info().await.expect("info");
    (info.state.first_sequence, info.state.last_sequence)
}

/// Everything a read returns of a key-value, comparable.
type KvSummary = (Vec<u8>, Vec<u8>, i64, i64, i64, i64);

fn summary(kvs: &[etcd_client::KeyValue]) -> Vec<KvSummary> {
    kvs.iter()
        .map(|kv| {
            (
                kv.key().to_vec(),
                kv.value().to_vec(),
                kv.create_revision(),
                kv.mod_revision(),
                kv.version(),
                kv.lease(),
            )
        })
        .collect()
}

/// A compaction cuts the stream (a snapshot, then a purge of what precedes it); a process
/// starting afterwards replays from the snapshot and answers exactly like the one that
/// compacted: current keys, history after the compaction, leases, compacted reads refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_compaction_cuts_the_stream() {
    use etcd_client::{Client, GetOptions, PutOptions};
    let database = TestDatabase::new(Backend::Nats).expect("nats");
    let start = |endpoint: String| {
        tokio::task::spawn_blocking(move || {
            spawn_kine_on(
                &endpoint,
                tempfile::tempdir().expect("tempdir"),
                &["--compact-interval", "0"],
            )
        })
    };
    let a = start(database.endpoint.clone()).await.expect("spawn");
    let mut client_a = Client::connect([a.endpoint.as_str()], None)
        .await
        .expect("connect");
    let lease = client_a.lease_grant(600, None).await.expect("grant").id();
    for i in 0..40 {
        let options = (i % 10 == 0).then(|| PutOptions::new().with_lease(lease));
        client_a
            .put(format!("k/{}", i % 7), format!("v{i}"), options)
            .await
            .expect("put");
    }
    client_a.delete("k/3", None).await.expect("delete");
    let compact_at = 30;
    client_a.compact(compact_at, None).await.expect("compact");
    for i in 40..45 {
        client_a
            .put(format!("k/{}", i % 7), format!("v{i}"), None)
            .await
            .expect("put");
    }
    let (first, last) = nats_stream_bounds(&database.endpoint).await;
    assert!(
        first > 30,
        "the stream was not cut: first {first}, last {last}"
    );

    let b = start(database.endpoint.clone()).await.expect("spawn");
    let mut client_b = Client::connect([b.endpoint.as_str()], None)
        .await
        .expect("connect");
    let all = || Some(GetOptions::new().with_prefix());
    for revision in [0, compact_at, compact_at + 5, 44] {
        let options = || all().map(|o| o.with_revision(revision));
        let got_a = client_a.get("k/", options()).await.expect("get a");
        let got_b = client_b.get("k/", options()).await.expect("get b");
        assert_eq!(
            summary(got_a.kvs()),
            summary(got_b.kvs()),
            "at revision {revision}"
        );
        assert!(!got_a.kvs().is_empty(), "at revision {revision}");
        assert_eq!(
            got_a.header().map(|h| h.revision()),
            got_b.header().map(|h| h.revision())
        );
    }
    let compacted = client_b
        .get("k/", all().map(|o| o.with_revision(compact_at - 1)))
        .await;
    assert!(compacted.is_err(), "a compacted revision was served");
    let ttl = client_b.lease_time_to_live(lease, None).await.expect("ttl");
    assert_eq!(ttl.granted_ttl(), 600);
    // Writes go on from either process at the next revision.
    let put = client_b.put("k/after", "x", None).await.expect("put");
    let got = client_a.get("k/after", None).await.expect("get");
    assert_eq!(
        got.kvs()[0].mod_revision(),
        put.header().expect("header").revision()
    );
}

/// `--ca-file`, `--cert-file` and `--key-file` reach a NATS server that requires TLS and
/// client certificates; without them kine-rs keeps waiting for the datastore.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_over_mutual_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = kine_tests::pki::Pki::write(dir.path(), &["kine"]);
    let (ca, cert, key) = (
        pki.ca.clone(),
        pki.server_cert.clone(),
        pki.server_key.clone(),
    );
    let nats = tokio::task::spawn_blocking(move || {
        kine_tests::private_db::PrivateNats::start_with(&[
            "--tls",
            "--tlscert",
            &cert,
            "--tlskey",
            &key,
            "--tlscacert",
            &ca,
            "--tlsverify",
        ])
    })
    .await
    .expect("nats");
    let endpoint = nats.url("tls");
    let (client_cert, client_key) = pki.client("kine");
    let args = [
        "--ca-file",
        pki.ca.as_str(),
        "--cert-file",
        client_cert,
        "--key-file",
        client_key,
    ]
    .map(str::to_string);
    let kine = {
        let endpoint = endpoint.clone();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            spawn_kine_on(&endpoint, tempfile::tempdir().expect("tempdir"), &args)
        })
        .await
        .expect("spawn")
    };
    let mut client = etcd_client::Client::connect([kine.endpoint.as_str()], None)
        .await
        .expect("connect");
    client.put("k", "v", None).await.expect("put over TLS");
    let got = client.get("k", None).await.expect("get");
    assert_eq!(got.kvs()[0].value(), b"v");
    // Without the client certificate the server refuses the connection.
    let (status, stderr) = run_for(&endpoint, Duration::from_secs(3));
    assert!(status.is_none(), "kine-rs gave up at once: {stderr}");
    assert!(stderr.contains("waiting for the datastore"), "{stderr}");
    drop(nats);
}

/// `?contextFile=PATH` (kine's option): the servers and the credentials come from a NATS
/// context file, as the `nats` CLI writes them. On a NATS that wants a token and on one that
/// wants an nkey, kine-rs serves through the context file; with the wrong or no credentials it
/// stops with an error that shows no secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_context_file_gives_servers_and_credentials() {
    use kine_tests::private_db::PrivateNats;
    let dir = tempfile::tempdir().expect("tempdir");
    let write_context = |name: &str, context: serde_json::Value| {
        let path = dir.path().join(name);
        std::fs::write(&path, context.to_string()).expect("write context");
        path.to_string_lossy().into_owned()
    };
    let server_url = |nats: &PrivateNats| nats.url("x").split('?').next().expect("url").to_string();
    let serves = |endpoint: String| async move {
        let kine = tokio::task::spawn_blocking(move || {
            spawn_kine_on(&endpoint, tempfile::tempdir().expect("tempdir"), &[])
        })
        .await
        .expect("spawn");
        let mut client = etcd_client::Client::connect([kine.endpoint.as_str()], None)
            .await
            .expect("connect");
        let put = client.put("k", "v", None).await.expect("put");
        let got = client.get("k", None).await.expect("get");
        assert_eq!(got.kvs()[0].value(), b"v");
        assert_eq!(
            got.kvs()[0].mod_revision(),
            put.header().expect("header").revision()
        );
    };
    let refused = |endpoint: String, secret: String| async move {
        let (status, stderr) =
            tokio::task::spawn_blocking(move || run_for(&endpoint, Duration::from_secs(20)))
                .await
                .expect("run");
        assert!(
            status.is_some_and(|s| !s.success()),
            "kine-rs did not stop: {stderr}"
        );
        assert!(
            !stderr.contains(&secret),
            "a secret in the output: {stderr}"
        );
    };

    // A token.
    let token = "tok-s3cret-4711";
    let nats = PrivateNats::start_with(&["--auth", token]);
    let good = write_context(
        "token.json",
        serde_json::json!({"description": "test", "url": server_url(&nats), "token": token}),
    );
    serves(format!("nats://?bucket=ctx&contextFile={good}")).await;
    let wrong = write_context(
        "wrong-token.json",
        serde_json::json!({"url": server_url(&nats), "token": "tok-wrong-0815"}),
    );
    refused(
        format!("nats://?bucket=ctx&contextFile={wrong}"),
        "tok-wrong-0815".into(),
    )
    .await;
    refused(nats.url("ctx"), token.into()).await;
    drop(nats);

    // An nkey: the server knows the public key, the context names the seed's file.
    let user = nkeys::KeyPair::new_user();
    let config = dir.path().join("nkey.conf");
    std::fs::write(
        &config,
        format!(
            "authorization {{ users: [ {{ nkey: \"{}\" }} ] }}\n",
            user.public_key()
        ),
    )
    .expect("write nats config");
    let nats = PrivateNats::start_with(&["-c", &config.to_string_lossy()]);
    let seed_file = dir.path().join("user.nk");
    let seed = user.seed().expect("seed");
    std::fs::write(&seed_file, format!("{seed}\n")).expect("write seed");
    let good = write_context(
        "nkey.json",
        serde_json::json!({"url": server_url(&nats), "nkey": seed_file.to_string_lossy()}),
    );
    serves(format!("nats://?bucket=ctx&contextFile={good}")).await;
    let stranger = nkeys::KeyPair::new_user();
    let stranger_seed = stranger.seed().expect("seed");
    let stranger_file = dir.path().join("stranger.nk");
    std::fs::write(&stranger_file, &stranger_seed).expect("write seed");
    let wrong = write_context(
        "stranger.json",
        serde_json::json!({"url": server_url(&nats), "nkey": stranger_file.to_string_lossy()}),
    );
    refused(
        format!("nats://?bucket=ctx&contextFile={wrong}"),
        stranger_seed,
    )
    .await;
    // A context file that is missing or names an unsupported feature: refused by name.
    let (status, stderr) = run_for(
        "nats://?contextFile=/nonexistent/ctx.json",
        Duration::from_secs(10),
    );
    assert!(status.is_some_and(|s| !s.success()), "{stderr}");
    assert!(stderr.contains("/nonexistent/ctx.json"), "{stderr}");
    let domain = write_context(
        "domain.json",
        serde_json::json!({"jetstream_domain": "hub"}),
    );
    let (status, stderr) = run_for(
        &format!("nats://?contextFile={domain}"),
        Duration::from_secs(10),
    );
    assert!(status.is_some_and(|s| !s.success()), "{stderr}");
    assert!(stderr.contains("jetstream_domain"), "{stderr}");
}

/// Runs the repository's migrations of `$database` before `$version` on `$db` (an sqlx
/// SQLite or MySQL connection, which spell these statements alike) and records them as sqlx
/// records them, so that kine-rs applies only the later ones.
macro_rules! apply_migrations_before {
    ($db:ident, $database:expr, $version:expr) => {{
        use sha2::{Digest, Sha384};
        $db.execute(
            "CREATE TABLE _sqlx_migrations (version BIGINT PRIMARY KEY, \
             description TEXT NOT NULL, installed_on TIMESTAMP NOT NULL \
             DEFAULT CURRENT_TIMESTAMP, success BOOLEAN NOT NULL, checksum BLOB NOT NULL, \
             execution_time BIGINT NOT NULL)",
        )
        .await
        .expect("the migrations' table");
        for (version, description, text) in migrations_before($database, $version) {
            $db.execute(sqlx::raw_sql(sqlx::AssertSqlSafe(text.clone())))
                .await
                .expect("a migration runs");
            sqlx::query(
                "INSERT INTO _sqlx_migrations (version, description, success, checksum, \
                 execution_time) VALUES (?, ?, 1, ?, 1)",
            )
            .bind(version)
            .bind(description)
            .bind(Sha384::digest(text.as_bytes()).to_vec())
            .execute(&mut $db)
            .await
            .expect("a migration recorded");
        }
    }};
}

/// A PostgreSQL database written by a kine-rs before migration 0008 (current rows marked in
/// `kv.superseded`) is served after the upgrade as it was: current values, reads at older
/// revisions, previous values of watch events, and a compaction that purges the old history.
/// The schema up to 0007 is applied from the repository's own migration files, recorded as
/// sqlx records them, and rows are written in that schema's model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_upgrade_keeps_the_data_of_the_superseded_column_model() {
    use sha2::{Digest, Sha384};
    let database = TestDatabase::new(Backend::Postgres).expect("postgres");
    let psql = |sql: &str| {
        let output = Command::new("psql")
            .arg(&database.endpoint)
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .stdin(Stdio::null())
            .output()
            .expect("psql");
        assert!(
            output.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    database.create_postgres();
    psql(
        "CREATE TABLE _sqlx_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL, \
         installed_on TIMESTAMPTZ NOT NULL DEFAULT now(), success BOOLEAN NOT NULL, \
         checksum BYTEA NOT NULL, execution_time BIGINT NOT NULL)",
    );
    for (version, description, text) in migrations_before("postgres", "0008") {
        psql(&text);
        let checksum: String = Sha384::digest(text.as_bytes())
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        psql(&format!(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, \
             execution_time) VALUES ({version}, '{description}', true, '\\x{checksum}', 1)"
        ));
    }
    // Revisions 2–6 of the keyspace kine-rs serves without tenants: a (v1, then v2), b, and c
    // put then deleted.
    psql(
        "INSERT INTO keyspaces (name, revision, keys_count, bytes_used) \
         VALUES ('default', 6, 2, 5); \
         INSERT INTO kv (keyspace, key, mod_revision, sub, create_revision, version, lease, \
         value, deleted, superseded) VALUES \
         (1, 'a', 2, 0, 2, 1, 0, 'v1', 0, 3), \
         (1, 'a', 3, 0, 2, 2, 0, 'v2', 0, 9223372036854775807), \
         (1, 'b', 4, 0, 4, 1, 0, 'b', 0, 9223372036854775807), \
         (1, 'c', 5, 0, 5, 1, 0, 'c1', 0, 6), \
         (1, 'c', 6, 0, 0, 0, 0, '', 1, 9223372036854775807)",
    );

    served_as_written_before_the_upgrade(&database.endpoint, tempfile::tempdir().expect("tempdir"), async || {
        let rows = Command::new("psql")
            .arg(&database.endpoint)
            .args(["-X", "-A", "-t", "-c", "SELECT string_agg(convert_from(key, 'UTF8') || mod_revision, ',' ORDER BY mod_revision) FROM kv"])
            .output()
            .expect("psql");
        String::from_utf8_lossy(&rows.stdout).trim().to_string()
    })
    .await;
}

/// An SQLite database written by a kine-rs before migration 0007 (current rows marked in
/// `kv.superseded`) is served after the upgrade as it was, like
/// [`postgres_upgrade_keeps_the_data_of_the_superseded_column_model`]: the schema up to 0006
/// from the repository's migration files, recorded as sqlx records them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_upgrade_keeps_the_data_of_the_superseded_column_model() {
    use sqlx::{Connection, Executor};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.db");
    let url = format!("sqlite://{}?mode=rwc", path.display());
    let mut db = sqlx::SqliteConnection::connect(&url).await.expect("sqlite");
    apply_migrations_before!(db, "sqlite", "0007");
    db.execute(
        "INSERT INTO keyspaces (name, revision, keys_count, bytes_used) \
         VALUES ('default', 6, 2, 5); \
         INSERT INTO kv (keyspace, key, mod_revision, sub, create_revision, version, lease, \
         value, deleted, superseded) VALUES \
         (1, CAST('a' AS BLOB), 2, 0, 2, 1, 0, CAST('v1' AS BLOB), 0, 3), \
         (1, CAST('a' AS BLOB), 3, 0, 2, 2, 0, CAST('v2' AS BLOB), 0, 9223372036854775807), \
         (1, CAST('b' AS BLOB), 4, 0, 4, 1, 0, CAST('b' AS BLOB), 0, 9223372036854775807), \
         (1, CAST('c' AS BLOB), 5, 0, 5, 1, 0, CAST('c1' AS BLOB), 0, 6), \
         (1, CAST('c' AS BLOB), 6, 0, 0, 0, 0, X'', 1, 9223372036854775807)",
    )
    .await
    .expect("rows of the old model");
    db.close().await.expect("closed");
    let endpoint = format!("sqlite://{}", path.display());
    served_as_written_before_the_upgrade(&endpoint, dir, async || {
        let mut db =
            sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=ro", path.display()))
                .await
                .expect("sqlite");
        let rows: Vec<(Vec<u8>, i64)> =
            sqlx::query_as("SELECT key, mod_revision FROM kv ORDER BY mod_revision")
                .fetch_all(&mut db)
                .await
                .expect("the rows");
        rows.iter()
            .map(|(key, revision)| format!("{}{revision}", String::from_utf8_lossy(key)))
            .collect::<Vec<_>>()
            .join(",")
    })
    .await;
}

/// A MySQL/MariaDB database written by a kine-rs before migration 0007 (current rows marked
/// in `kv.superseded`, `kv` ordered by key) is served after the upgrade as it was, like
/// [`postgres_upgrade_keeps_the_data_of_the_superseded_column_model`]: the schema up to 0006
/// from the repository's migration files, recorded as sqlx records them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_upgrade_keeps_the_data_of_the_superseded_column_model() {
    use sqlx::{Connection, Executor};
    let database = TestDatabase::new(Backend::Mysql).expect("mysql");
    let (server, name) = database
        .endpoint
        .rsplit_once('/')
        .expect("an endpoint with a database");
    let mut admin = sqlx::MySqlConnection::connect(&format!("{server}/mysql"))
        .await
        .expect("mysql");
    admin
        .execute(sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE {name}"
        ))))
        .await
        .expect("the database");
    admin.close().await.expect("closed");
    let mut db = sqlx::MySqlConnection::connect(&database.endpoint)
        .await
        .expect("mysql");
    apply_migrations_before!(db, "mysql", "0007");
    db.execute(
        "INSERT INTO keyspaces (name, revision, keys_count, bytes_used) \
         VALUES ('default', 6, 2, 5); \
         INSERT INTO kv (keyspace, `key`, mod_revision, sub, create_revision, version, lease, \
         value, deleted, superseded) VALUES \
         (1, 'a', 2, 0, 2, 1, 0, 'v1', 0, 3), \
         (1, 'a', 3, 0, 2, 2, 0, 'v2', 0, 9223372036854775807), \
         (1, 'b', 4, 0, 4, 1, 0, 'b', 0, 9223372036854775807), \
         (1, 'c', 5, 0, 5, 1, 0, 'c1', 0, 6), \
         (1, 'c', 6, 0, 0, 0, 0, '', 1, 9223372036854775807)",
    )
    .await
    .expect("rows of the old model");
    db.close().await.expect("closed");
    let endpoint = database.endpoint.clone();
    served_as_written_before_the_upgrade(
        &database.endpoint,
        tempfile::tempdir().expect("tempdir"),
        async || {
            let mut db = sqlx::MySqlConnection::connect(&endpoint)
                .await
                .expect("mysql");
            let rows: Vec<(Vec<u8>, i64)> =
                sqlx::query_as("SELECT `key`, mod_revision FROM kv ORDER BY mod_revision")
                    .fetch_all(&mut db)
                    .await
                    .expect("the rows");
            rows.iter()
                .map(|(key, revision)| format!("{}{revision}", String::from_utf8_lossy(key)))
                .collect::<Vec<_>>()
                .join(",")
        },
    )
    .await;
}

/// The repository's migrations of `database` (a directory of `kine-rs/migrations`) before
/// `version`, in order: each one's version, its description as sqlx records it, and its text.
fn migrations_before(database: &str, version: &str) -> Vec<(i64, String, String)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../kine-rs/migrations")
        .join(database);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("the migrations")
        .map(|entry| entry.expect("an entry").path())
        .collect();
    files.sort();
    files
        .iter()
        .filter(|file| {
            file.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .as_ref()
                < version
        })
        .map(|file| {
            let name = file
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let (number, description) = name.split_once('_').expect("NNNN_description");
            (
                number.parse().expect("a version"),
                description.replace('_', " "),
                std::fs::read_to_string(file).expect("a migration"),
            )
        })
        .collect()
}

/// The checks of the upgrade tests: kine-rs on `endpoint` (the database holding revisions
/// 2–6 of the keyspace served without tenants, in the model before the upgrade: a put as v1
/// then v2, b, and c put then deleted) answers current values, reads at older revisions and
/// previous values of watch events as they were written, and a compaction purges the old
/// history; `rows` lists the rows of `kv` as key and revision.
async fn served_as_written_before_the_upgrade(
    endpoint: &str,
    dir: tempfile::TempDir,
    rows: impl AsyncFn() -> String,
) {
    let kine = spawn_kine_on(endpoint, dir, &[]);
    let mut client = etcd_client::Client::connect([kine.endpoint.as_str()], None)
        .await
        .expect("connect");
    let all = || Some(etcd_client::GetOptions::new().with_all_keys());
    let values = |r: &etcd_client::GetResponse| -> Vec<(String, i64, i64)> {
        r.kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.value()).into_owned(),
                    kv.mod_revision(),
                    kv.version(),
                )
            })
            .collect()
    };
    let now = client.get("", all()).await.expect("get");
    assert_eq!(now.header().expect("header").revision(), 6);
    assert_eq!(values(&now), [("v2".into(), 3, 2), ("b".into(), 4, 1)]);
    let at = |revision| all().map(|options| options.with_revision(revision));
    let at_2 = client.get("", at(2)).await.expect("get at 2");
    assert_eq!(values(&at_2), [("v1".into(), 2, 1)]);
    let at_5 = client.get("", at(5)).await.expect("get at 5");
    assert_eq!(
        values(&at_5),
        [("v2".into(), 3, 2), ("b".into(), 4, 1), ("c1".into(), 5, 1)]
    );

    // The history, with previous values, as a watch from revision 2 sees it.
    let mut stream = client
        .watch(
            "",
            Some(
                etcd_client::WatchOptions::new()
                    .with_all_keys()
                    .with_start_revision(2)
                    .with_prev_key(),
            ),
        )
        .await
        .expect("watch");
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let response = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("events in time")
            .expect("a watch response")
            .expect("the stream open");
        for event in response.events() {
            let kv = event.kv().expect("kv");
            let prev = event
                .prev_kv()
                .map(|prev| String::from_utf8_lossy(prev.value()).into_owned());
            seen.push((
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.mod_revision(),
                prev,
            ));
        }
    }
    assert_eq!(
        seen,
        [
            ("a".into(), 2, None),
            ("a".into(), 3, Some("v1".into())),
            ("b".into(), 4, None),
            ("c".into(), 5, None),
            ("c".into(), 6, Some("c1".into())),
        ]
    );

    // New writes, then a compaction that purges what the old model left behind.
    client.put("a", "v3", None).await.expect("put");
    client
        .compact(
            7,
            Some(etcd_client::CompactionOptions::new().with_physical()),
        )
        .await
        .expect("compact");
    assert_eq!(rows().await, "b4,a7");
    let after = client.get("", all()).await.expect("get");
    assert_eq!(values(&after), [("v3".into(), 7, 3), ("b".into(), 4, 1)]);
}

/// On SQLite an overwrite's superseded row is appended to `kv_past` (ordered by the revision
/// that superseded it), as its new row is to `kv`: a transaction overwriting 64 keys spread
/// over 2,000 changes at most four leaf pages of `kv_past` (its last and new ones), where by key it changed about one
/// page per key (~30 here). Compaction then takes `kv_past`'s first rows, and a tombstone
/// superseded after the compaction revision stays until a compaction passes that revision;
/// reads and watches at or after the compaction revision never see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_superseded_rows_are_appended_and_purged_in_revision_order() {
    use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp, WatchOptions};
    use sqlx::Connection;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.db");
    let endpoint = format!("sqlite://{}", path.display());
    let kine = spawn_kine_on(&endpoint, dir, &["--compact-interval", "0"]);
    let mut client = etcd_client::Client::connect([kine.endpoint.as_str()], None)
        .await
        .expect("connect");
    let key = |i: usize| format!("/registry/pods/default/pod-{i:05}");
    let value = "v".repeat(200);
    let put_all = async |client: &mut etcd_client::Client, keys: &[usize]| {
        let ops: Vec<TxnOp> = keys
            .iter()
            .map(|&i| TxnOp::put(key(i), value.clone(), None))
            .collect();
        let response = client.txn(Txn::new().and_then(ops)).await.expect("txn");
        assert!(response.succeeded());
    };
    let all: Vec<usize> = (0..2000).collect();
    for _round in 0..2 {
        for chunk in all.chunks(100) {
            put_all(&mut client, chunk).await;
        }
    }
    let leaves = async || {
        let mut db =
            sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=ro", path.display()))
                .await
                .expect("sqlite");
        let pages: Vec<(i64, i64, i64)> = sqlx::query_as(
            "SELECT pageno, ncell, payload FROM dbstat WHERE name = 'kv_past' \
             AND pagetype = 'leaf'",
        )
        .fetch_all(&mut db)
        .await
        .expect("dbstat");
        pages
    };
    let before = leaves().await;
    assert!(before.len() >= 20, "kv_past leaves: {}", before.len());
    let spread: Vec<usize> = (0..64).map(|j| j * 31).collect();
    put_all(&mut client, &spread).await;
    let after = leaves().await;
    let changed = after.iter().filter(|page| !before.contains(page)).count();
    assert!(
        changed <= 4,
        "64 overwrites changed {changed} of {} leaves of kv_past",
        after.len()
    );

    // A key deleted, then created again after the compaction revision.
    client.put("t", "v1", None).await.expect("put");
    client.delete("t", None).await.expect("delete");
    let put_revision = async |client: &mut etcd_client::Client, value: &str| {
        let response = client.put("x", value, None).await.expect("put");
        response.header().expect("header").revision()
    };
    let compaction = put_revision(&mut client, "1").await;
    let created = client
        .txn(
            Txn::new()
                .when([Compare::version("t", CompareOp::Equal, 0)])
                .and_then([TxnOp::put("t", "v2", None)]),
        )
        .await
        .expect("txn")
        .header()
        .expect("header")
        .revision();
    let physical = || Some(etcd_client::CompactionOptions::new().with_physical());
    client
        .compact(compaction, physical())
        .await
        .expect("compact");
    let rows_of = async |name: &str| {
        let mut db =
            sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=ro", path.display()))
                .await
                .expect("sqlite");
        let rows: Vec<(i64, bool)> = sqlx::query_as(
            "SELECT mod_revision, deleted FROM kv WHERE key = ? ORDER BY mod_revision",
        )
        .bind(name.as_bytes())
        .fetch_all(&mut db)
        .await
        .expect("rows");
        rows
    };
    assert_eq!(
        rows_of("t").await,
        [(compaction - 1, true), (created, false)],
        "the tombstone superseded after the compaction stays, its key's first row goes"
    );
    assert_eq!(rows_of(&key(0)).await.len(), 1, "superseded rows purged");
    let at = client
        .get("t", Some(GetOptions::new().with_revision(compaction)))
        .await
        .expect("get at the compaction");
    assert!(at.kvs().is_empty());
    let mut stream = client
        .watch(
            "t",
            Some(
                WatchOptions::new()
                    .with_start_revision(compaction)
                    .with_prev_key(),
            ),
        )
        .await
        .expect("watch");
    let event = loop {
        let response = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("in time")
            .expect("a response")
            .expect("open");
        if let Some(event) = response.events().first() {
            break event.clone();
        }
    };
    assert_eq!(event.kv().expect("kv").mod_revision(), created);
    assert!(event.prev_kv().is_none(), "{:?}", event.prev_kv());

    let next = put_revision(&mut client, "2").await;
    client.compact(next, physical()).await.expect("compact");
    assert_eq!(rows_of("t").await, [(created, false)]);
    let now = client.get("t", None).await.expect("get");
    assert_eq!(now.kvs()[0].value(), b"v2");
}
