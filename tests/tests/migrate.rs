//! `kine-rs migrate` between real datastores (DESIGN.md invariant 5): every ordered pair of
//! SQLite, PostgreSQL and MySQL, with a kine-rs serving the source throughout. The tenant
//! arrives with its revisions (current, compaction, create/mod, versions), its history
//! (reads at older revisions, a watch resumed from an old revision), and its lease with the
//! remaining TTL; the source refuses writes afterwards, naming the move. The live test keeps a
//! writer and a watcher running through the migration: every acknowledged write is on the
//! target, and the watcher, resumed on the target, sees every revision exactly once.
//! (Memory-to-anything pairs run in process: `kine::migrate`'s unit tests.)

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use kine_tests::conformance::{collect_events, watch};
use kine_tests::{Backend, ChildGuard, TestDatabase, kine_rs_binary, serve_and_connect};

/// A datastore that outlives the kine-rs processes serving it.
struct Store {
    endpoint: String,
    _database: Option<TestDatabase>,
    _dir: tempfile::TempDir,
}

impl Store {
    fn new(backend: Backend) -> Store {
        let dir = tempfile::tempdir().expect("tempdir");
        let database = TestDatabase::new(backend);
        let endpoint = match (&database, backend) {
            (Some(database), _) => database.endpoint.clone(),
            (None, Backend::Sqlite) => {
                format!("sqlite://{}", dir.path().join("state.db").display())
            }
            (None, other) => panic!("{other:?} is not a datastore another process can open"),
        };
        Store {
            endpoint,
            _database: database,
            _dir: dir,
        }
    }

    async fn serve(&self) -> Result<(ChildGuard, Client)> {
        serve_and_connect(&self.endpoint, &[]).await
    }
}

/// Runs `kine-rs migrate ARGS -o json`; returns its JSON lines, or fails with its stderr.
async fn migrate(args: Vec<String>) -> Result<Vec<serde_json::Value>> {
    let output = tokio::task::spawn_blocking(move || {
        Command::new(kine_rs_binary())
            .arg("migrate")
            .args(&args)
            .args(["-o", "json"])
            .stdin(Stdio::null())
            .output()
    })
    .await??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "kine-rs migrate failed ({}): {}{stdout}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).with_context(|| format!("not JSON: {line}")))
        .collect()
}

fn pair(from: &Store, to: &Store) -> Vec<String> {
    vec![
        "--from".into(),
        from.endpoint.clone(),
        "--to".into(),
        to.endpoint.clone(),
    ]
}

/// Every key, value, revision and version at `revision`.
async fn snapshot(
    client: &mut Client,
    revision: i64,
) -> Result<Vec<(String, String, i64, i64, i64, i64)>> {
    let response = client
        .get(
            "\0",
            Some(GetOptions::new().with_from_key().with_revision(revision)),
        )
        .await?;
    Ok(response
        .kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str().unwrap_or_default().to_string(),
                kv.value_str().unwrap_or_default().to_string(),
                kv.create_revision(),
                kv.mod_revision(),
                kv.version(),
                kv.lease(),
            )
        })
        .collect())
}

/// History, a compaction, deletes, a transaction and a lease: returns the lease id and
/// the compaction revision.
async fn populate(client: &mut Client) -> Result<(i64, i64)> {
    for round in 0..3 {
        for i in 0..40 {
            client
                .put(format!("/registry/k{i:03}"), format!("v{round}-{i}"), None)
                .await?;
        }
    }
    let compact_at = 60;
    client.compact(compact_at, None).await?;
    let lease = client.lease_grant(300, None).await?.id();
    client
        .put(
            "/registry/leased",
            "x",
            Some(PutOptions::new().with_lease(lease)),
        )
        .await?;
    client
        .delete(
            "/registry/k010",
            Some(etcd_client::DeleteOptions::new().with_range("/registry/k015")),
        )
        .await?;
    client
        .txn(
            Txn::new()
                .when([Compare::version("/registry/k001", CompareOp::Equal, 3)])
                .and_then([
                    TxnOp::put("/registry/t1", "a", None),
                    TxnOp::put("/registry/t2", "b", None),
                    TxnOp::delete("/registry/k002", None),
                ]),
        )
        .await?;
    Ok((lease, compact_at))
}

fn without_watch_ids(
    mut events: Vec<kine_tests::conformance::Seen>,
) -> Vec<kine_tests::conformance::Seen> {
    for event in &mut events {
        event.watch_id = 0;
    }
    events
}

async fn migrate_pair(from: Backend, to: Backend) -> Result<()> {
    let (source, target) = (Store::new(from), Store::new(to));
    let (mut source_server, mut client) = source.serve().await?;
    let (lease, compact_at) = populate(&mut client).await?;
    // The plan changes nothing.
    let plan = migrate([pair(&source, &target), vec!["--dry-run".into()]].concat()).await?;
    ensure!(
        plan[0]["event"] == "plan" && plan[0]["keys"] == 37,
        "plan: {plan:?}"
    );
    ensure!(
        client
            .put("/registry/still-writable", "1", None)
            .await
            .is_ok()
    );
    client.delete("/registry/still-writable", None).await?;
    let head = client
        .get("/", None)
        .await?
        .header()
        .context("header")?
        .revision();
    let revisions = [compact_at, compact_at + 1, 100, head - 1, head];
    let mut before = Vec::new();
    for revision in revisions {
        before.push(snapshot(&mut client, revision).await?);
    }
    let (mut history, _) = watch(
        &mut client,
        "/registry/",
        Some(
            WatchOptions::new()
                .with_prefix()
                .with_start_revision(compact_at + 1),
        ),
    )
    .await?;
    // One event per revision after the compaction, but 5 for the delete and 3 for the txn.
    let event_count = (head - compact_at - 2) as usize + 5 + 3;
    let expected_events = without_watch_ids(collect_events(&mut history, event_count).await?);

    // The move, with the source's kine-rs still serving.
    let lines = migrate(pair(&source, &target)).await?;
    let summary = lines.last().context("no summary")?;
    ensure!(summary["event"] == "summary", "last line: {summary}");
    ensure!(summary["revision"] == head, "summary: {summary}");
    ensure!(
        summary["compact_revision"] == compact_at,
        "summary: {summary}"
    );
    ensure!(summary["leases"] == 1, "summary: {summary}");
    ensure!(
        lines
            .iter()
            .any(|l| l["event"] == "progress" && l["phase"] == "snapshot"),
        "no progress lines: {lines:?}"
    );

    // The source's kine-rs refuses writes and names the move; or, when its check for a move
    // (once a second) came first, it has stopped serving and exits with an error.
    let error = client
        .put("/registry/late", "x", None)
        .await
        .err()
        .context("a write to the moved source was accepted")?;
    if !error.to_string().contains("moved to another datastore") {
        let mut status = None;
        for _ in 0..100 {
            status = source_server.exit_status();
            if status.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ensure!(
            status.is_some_and(|status| !status.success()),
            "the moved source answered {error} and {}",
            match status {
                Some(status) => format!("exited with {status}"),
                None => "kept running".to_string(),
            }
        );
    }
    source_server.kill();

    // The target serves the same tenant, revisions and history.
    let (_target_server, mut moved) = target.serve().await?;
    let header = moved
        .get("/", None)
        .await?
        .header()
        .context("header")?
        .revision();
    ensure!(header == head, "target revision {header}, source {head}");
    for (revision, expected) in revisions.iter().zip(&before) {
        let got = snapshot(&mut moved, *revision).await?;
        ensure!(
            &got == expected,
            "at revision {revision}: {got:?} != {expected:?}"
        );
    }
    let error = moved
        .get(
            "/registry/k001",
            Some(GetOptions::new().with_revision(compact_at - 1)),
        )
        .await
        .err()
        .context("a read below the compaction revision succeeded")?;
    ensure!(error.to_string().contains("compacted"), "{error}");
    let (mut history, _) = watch(
        &mut moved,
        "/registry/",
        Some(
            WatchOptions::new()
                .with_prefix()
                .with_start_revision(compact_at + 1),
        ),
    )
    .await?;
    let events = without_watch_ids(collect_events(&mut history, expected_events.len()).await?);
    ensure!(
        events == expected_events,
        "{events:#?} != {expected_events:#?}"
    );
    let ttl = moved.lease_time_to_live(lease, None).await?;
    ensure!(
        ttl.ttl() > 250 && ttl.ttl() <= 300,
        "lease TTL left {}",
        ttl.ttl()
    );
    ensure!(ttl.granted_ttl() == 300);
    // And takes writes at the next revision.
    let put = moved.put("/registry/after", "1", None).await?;
    ensure!(put.header().context("header")?.revision() == head + 1);
    // A second run says the tenant moved already.
    ensure!(migrate(pair(&source, &target)).await.is_err());
    Ok(())
}

macro_rules! pairs {
    ($($name:ident: $from:ident -> $to:ident,)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() -> Result<()> {
            migrate_pair(Backend::$from, Backend::$to).await
        }
    )*};
}

pairs! {
    sqlite_to_postgres: Sqlite -> Postgres,
    sqlite_to_mysql: Sqlite -> Mysql,
    postgres_to_sqlite: Postgres -> Sqlite,
    postgres_to_mysql: Postgres -> Mysql,
    mysql_to_sqlite: Mysql -> Sqlite,
    mysql_to_postgres: Mysql -> Postgres,
    sqlite_to_sqlite: Sqlite -> Sqlite,
    sqlite_to_nats: Sqlite -> Nats,
    nats_to_postgres: Nats -> Postgres,
    nats_to_nats: Nats -> Nats,
}

/// Large values move in pages and windows bounded by bytes as well as by count: a tenant of
/// 300 KiB values (12 keys in the snapshot, 12 overwrites after the compaction) moved with
/// `--page-bytes 1000000` never holds more than three values in one page or window, where
/// pages of 1,000 keys and windows of 1,000 revisions would each hold all twelve (3.6 MB).
async fn large_values_pair(from: Backend, to: Backend) -> Result<()> {
    const VALUE_BYTES: usize = 300 * 1024;
    const BUDGET: u64 = 1_000_000;
    let (source, target) = (Store::new(from), Store::new(to));
    let (mut source_server, mut client) = source.serve().await?;
    let value = |i: usize| vec![b'a' + (i % 26) as u8; VALUE_BYTES];
    for i in 0..12 {
        client.put(format!("/big/{i:03}"), value(i), None).await?;
    }
    let compact_at = client
        .get("/", None)
        .await?
        .header()
        .context("header")?
        .revision();
    client.compact(compact_at, None).await?;
    for i in 0..12 {
        client
            .put(format!("/big/{i:03}"), value(i + 1), None)
            .await?;
    }
    let head = compact_at + 12;
    let before = snapshot(&mut client, head).await?;
    let lines = migrate(
        [
            pair(&source, &target),
            vec!["--page-bytes".into(), BUDGET.to_string()],
        ]
        .concat(),
    )
    .await?;
    let summary = lines.last().context("no summary")?;
    ensure!(
        summary["keys"] == 12 && summary["events"] == 12 && summary["revision"] == head,
        "summary: {summary}"
    );
    let largest = summary["largest_page_bytes"].as_u64().unwrap_or(0);
    ensure!(
        largest >= VALUE_BYTES as u64 && largest <= BUDGET,
        "the largest page or window held {largest} bytes, the budget was {BUDGET}"
    );
    source_server.kill();
    let (_target_server, mut moved) = target.serve().await?;
    let got = snapshot(&mut moved, head).await?;
    ensure!(got == before, "the moved values differ");
    let old = snapshot(&mut moved, compact_at).await?;
    ensure!(
        old.len() == 12 && old.iter().all(|kv| kv.3 <= compact_at),
        "history at the compaction revision: {} keys",
        old.len()
    );
    Ok(())
}

macro_rules! large_value_pairs {
    ($($name:ident: $from:ident -> $to:ident,)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() -> Result<()> {
            large_values_pair(Backend::$from, Backend::$to).await
        }
    )*};
}

large_value_pairs! {
    large_values_postgres_to_mysql: Postgres -> Mysql,
    large_values_mysql_to_postgres: Mysql -> Postgres,
    large_values_sqlite_to_postgres: Sqlite -> Postgres,
}

/// A writer and a watcher run throughout: every acknowledged write is on the target, none was
/// acknowledged by the source after its final revision, and the watch, resumed on the target
/// from the last revision it saw, sees every revision exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_writer_and_watcher_across_the_cutover() -> Result<()> {
    let (source, target) = (Store::new(Backend::Postgres), Store::new(Backend::Mysql));
    let (mut source_server, mut client) = source.serve().await?;
    for i in 0..300 {
        client.put(format!("/live/seed{i:03}"), "s", None).await?;
    }
    let start = client
        .get("/", None)
        .await?
        .header()
        .context("header")?
        .revision();
    let (mut stream, _) = watch(
        &mut client,
        "/live/",
        Some(
            WatchOptions::new()
                .with_prefix()
                .with_start_revision(start + 1),
        ),
    )
    .await?;
    let writer = {
        let mut client = client.clone();
        tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for i in 0..100_000 {
                match client
                    .put(format!("/live/w{i:06}"), format!("{i}"), None)
                    .await
                {
                    Ok(response) => {
                        acknowledged.push((i, response.header().map_or(0, |h| h.revision())))
                    }
                    Err(_) => break,
                }
                // ~500 writes a second.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            acknowledged
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let lines = migrate(
        [
            pair(&source, &target),
            vec!["--page-keys".into(), "50".into()],
        ]
        .concat(),
    )
    .await?;
    let summary = lines.last().context("no summary")?.clone();
    let acknowledged = writer.await?;
    let last = summary["revision"].as_i64().context("revision")?;
    ensure!(
        acknowledged.len() > 10,
        "the writer wrote only {}",
        acknowledged.len()
    );
    for (_, revision) in &acknowledged {
        ensure!(
            *revision <= last,
            "write acknowledged at {revision} after the final {last}"
        );
    }
    // What the source's watcher saw, then the rest from the target.
    let mut seen = Vec::new();
    while let Ok(Some(response)) =
        tokio::time::timeout(Duration::from_millis(300), stream.message()).await?
    {
        for event in response.events() {
            ensure!(event.event_type() == EventType::Put);
            seen.push(event.kv().context("kv")?.mod_revision());
        }
        if seen.last() == Some(&last) {
            break;
        }
    }
    let resume_from = seen.last().copied().unwrap_or(start) + 1;
    let (_target_server, mut moved) = target.serve().await?;
    if resume_from <= last {
        let (mut stream, _) = watch(
            &mut moved,
            "/live/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(resume_from),
            ),
        )
        .await?;
        let rest = collect_events(&mut stream, (last + 1 - resume_from) as usize).await?;
        seen.extend(rest.iter().map(|event| event.revision));
    }
    let expected: Vec<i64> = (start + 1..=last).collect();
    ensure!(
        seen == expected,
        "watch saw {} revisions, expected {}",
        seen.len(),
        expected.len()
    );
    // The sidecar that served the source learns of the move and stops, failing, so that it
    // is restarted with the new endpoint.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = source_server.exit_status() {
            break status;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the source's sidecar still serves a moved tenant"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ensure!(
        !status.success(),
        "the source's sidecar exited with {status}"
    );
    for (i, revision) in acknowledged {
        let got = moved.get(format!("/live/w{i:06}"), None).await?;
        let kv = got
            .kvs()
            .first()
            .with_context(|| format!("write {i} missing"))?;
        ensure!(kv.mod_revision() == revision && kv.value_str()? == i.to_string());
    }
    Ok(())
}

/// `--abort` after an interrupted run (killed during the copy) leaves the source writable and
/// the target without the partial import; a rerun after a kill resumes and finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_migration_resumes_or_aborts() -> Result<()> {
    let (source, target) = (Store::new(Backend::Sqlite), Store::new(Backend::Postgres));
    let (_source_server, mut client) = source.serve().await?;
    for i in 0..3000 {
        client
            .put(format!("/big/{i:05}"), "x".repeat(200), None)
            .await?;
    }
    // Half the keys come through the snapshot, half through the events after it.
    client.compact(1500, None).await?;
    for attempt in 0..2 {
        // Start, let it copy some pages, kill -9.
        let mut child = Command::new(kine_rs_binary())
            .arg("migrate")
            .args(pair(&source, &target))
            .args([
                "--page-keys",
                "10",
                "--window-revisions",
                "10",
                "-o",
                "json",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let progressed = tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .filter_map(|line| serde_json::from_str::<serde_json::Value>(&line).ok())
                .any(|line| {
                    matches!(line["phase"].as_str(), Some("snapshot" | "tail"))
                        && (line["keys"].as_u64() > Some(0) || line["events"].as_u64() > Some(0))
                })
        })
        .await?;
        ensure!(progressed, "the migration reported no snapshot progress");
        child.kill()?;
        child.wait()?;
        // The source still takes writes.
        client
            .put(format!("/big/after-kill-{attempt}"), "y", None)
            .await?;
        if attempt == 0 {
            let lines = migrate([pair(&source, &target), vec!["--abort".into()]].concat()).await?;
            ensure!(
                lines[0]["source_released"] == true && lines[0]["import_removed"] == true,
                "abort: {lines:?}"
            );
        }
    }
    let lines = migrate(pair(&source, &target)).await?;
    let summary = lines.last().context("no summary")?;
    ensure!(summary["resumed"] == true, "not resumed: {summary}");
    let (_target_server, mut moved) = target.serve().await?;
    let count = moved
        .get(
            "/big/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await?
        .count();
    ensure!(count == 3002, "{count} keys on the target");
    Ok(())
}

/// A gateway on PostgreSQL moves its tenant to MariaDB live (`kine-rs tenant migrate`), and
/// the tenant's client notices nothing but a short freeze: the same connection, watch stream
/// and keep-alive stream carry on across the cutover on the same revisions; every
/// acknowledged write is seen once, in order; the lease outlives its TTL on the target; a
/// restarted gateway serves the tenant from the target when given it as `--extra-endpoint`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateway_moves_a_tenant_live() -> Result<()> {
    use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let (source, target) = (Store::new(Backend::Postgres), Store::new(Backend::Mysql));
    let dir = tempfile::tempdir()?;
    let pki = kine_tests::pki::Pki::write(dir.path(), &["t"]);
    let socket = dir.path().join("admin.sock").display().to_string();
    let gateway_args = |extra: &[&str]| -> Vec<String> {
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
            &socket,
            "--compact-interval",
            "0",
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
    };
    let start_gateway = |args: Vec<String>| {
        let endpoint = source.endpoint.clone();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            kine_tests::spawn_kine_on(&endpoint, tempfile::tempdir().expect("tempdir"), &args)
        })
    };
    let connect = |address: String| {
        let (cert, key) = pki.client("t");
        let tls = TlsOptions::new()
            .domain_name("localhost")
            .ca_certificate(Certificate::from_pem(std::fs::read(&pki.ca).expect("ca")))
            .identity(Identity::from_pem(
                std::fs::read(cert).expect("cert"),
                std::fs::read(key).expect("key"),
            ));
        async move {
            let options = ConnectOptions::new()
                .with_tls(tls)
                .with_connect_timeout(Duration::from_secs(5));
            Ok::<_, anyhow::Error>(
                Client::connect([format!("https://{address}")], Some(options)).await?,
            )
        }
    };
    let gateway = start_gateway(gateway_args(&[])).await?;
    let mut client = connect(gateway.address.clone()).await?;
    for i in 0..200 {
        client.put(format!("/seed/{i:03}"), "s", None).await?;
    }
    let lease = client.lease_grant(4, None).await?.id();
    client
        .put("/leased", "l", Some(PutOptions::new().with_lease(lease)))
        .await?;
    let (mut keeper, mut renewals) = client.lease_keep_alive(lease).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop_keeping = stop.clone();
    let keeping = tokio::spawn(async move {
        let mut answered = 0;
        while !stop_keeping.load(Ordering::SeqCst) {
            if keeper.keep_alive().await.is_err() {
                return answered;
            }
            match renewals.message().await {
                Ok(Some(answer)) if answer.ttl() > 0 => answered += 1,
                _ => return answered,
            }
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
        answered
    });
    let start = client
        .get("/", None)
        .await?
        .header()
        .context("header")?
        .revision();
    let (mut stream, _) = watch(
        &mut client,
        "/live/",
        Some(
            WatchOptions::new()
                .with_prefix()
                .with_start_revision(start + 1),
        ),
    )
    .await?;
    let writer = {
        let mut client = client.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut acknowledged, mut refused) = (Vec::new(), 0u32);
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                match client
                    .put(format!("/live/w{i:06}"), format!("{i}"), None)
                    .await
                {
                    Ok(response) => {
                        acknowledged.push(response.header().map_or(0, |h| h.revision()))
                    }
                    // The freeze: refused, not applied; the client goes on.
                    Err(_) => refused += 1,
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (acknowledged, refused)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let to = target.endpoint.clone();
    let admin_socket = socket.clone();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(kine_rs_binary())
            .args(["tenant", "--admin-socket", &admin_socket, "-o", "json"])
            .args(["migrate", "t", "--to", &to])
            .stdin(Stdio::null())
            .output()
    })
    .await??;
    ensure!(
        output.status.success(),
        "kine-rs tenant migrate failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let moved_at = summary["revision"].as_i64().context("revision")?;
    ensure!(
        !summary["target"].as_str().unwrap_or_default().is_empty(),
        "{summary}"
    );
    // Writes go on through the same connection, now to the target; and the lease outlives
    // its TTL there.
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::SeqCst);
    let (acknowledged, refused) = writer.await?;
    ensure!(
        acknowledged.iter().any(|r| *r > moved_at),
        "no write landed after the move at {moved_at} ({} acknowledged, {refused} refused)",
        acknowledged.len()
    );
    ensure!(
        client.get("/leased", None).await?.count() == 1,
        "the lease expired on the target although kept alive"
    );
    ensure!(
        client.lease_time_to_live(lease, None).await?.ttl() > 0,
        "the lease is gone"
    );
    // The watch stream opened before the move saw every acknowledged write once, in order.
    let events = collect_events(&mut stream, acknowledged.len()).await?;
    let seen: Vec<i64> = events.iter().map(|e| e.revision).collect();
    ensure!(
        seen == acknowledged,
        "the watch saw {} revisions, {} were acknowledged (first differences: {:?})",
        seen.len(),
        acknowledged.len(),
        seen.iter().zip(&acknowledged).find(|(a, b)| a != b)
    );
    // The keep-alive stream carried on too.
    drop(client);
    let renewed = tokio::time::timeout(Duration::from_secs(10), keeping).await??;
    ensure!(
        renewed >= 6,
        "the keep-alive stream answered only {renewed} times"
    );

    // A restarted gateway serves the tenant from the target when it has it...
    drop(gateway);
    let gateway = start_gateway(gateway_args(&["--extra-endpoint", &target.endpoint])).await?;
    let mut client = connect(gateway.address.clone()).await?;
    let live = client
        .get(
            "/live/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await?;
    ensure!(
        live.count() as usize == acknowledged.len(),
        "{} keys after the restart, {} acknowledged",
        live.count(),
        acknowledged.len()
    );
    let put = client.put("/after-restart", "v", None).await?;
    ensure!(
        put.header().context("header")?.revision() > *acknowledged.last().context("writes")?,
        "revisions go on after the restart"
    );
    // ... and refuses it, naming the move, when it does not.
    drop(gateway);
    let gateway = start_gateway(gateway_args(&[])).await?;
    let mut client = connect(gateway.address.clone()).await?;
    match client.get("/live/", None).await {
        Err(etcd_client::Error::GRpcStatus(status)) => ensure!(
            status.message().contains("moved to another datastore"),
            "{status:?}"
        ),
        other => anyhow::bail!("a gateway without the target served the moved tenant: {other:?}"),
    }
    Ok(())
}
