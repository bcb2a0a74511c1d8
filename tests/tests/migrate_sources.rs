//! `kine-rs migrate` from what users run today (issue 9, "Adopting what users run today"):
//!
//! * **kine's own schema**, written by a real k3s-io/kine v0.17.5 (`$KINE_BIN`, built by
//!   `scripts/peers.sh`) on PostgreSQL and MariaDB, and on SQLite: keys with history,
//!   deletes, a lease, a compaction and kube-apiserver's `compact_rev_key`, written through
//!   kine's etcd API while it runs; a writer keeps writing through kine during the move and
//!   is refused from the freeze on, naming the target;
//! * **a plain etcd prefix** on the oracle etcd 3.5.1 (`$ETCD_BIN`): keys under `/tenant1/`
//!   move without the prefix and keep etcd's revisions; another prefix stays behind; the
//!   cut-over waits for `--source-writers-stopped`; a write after the freeze point aborts it;
//!   a live writer and watcher run through the copy;
//! * **a tenant of the etcd proxy** (kine-rs `--endpoint etcd://…`) on the same etcd, with a
//!   writer and a watcher through the proxy and another tenant writing beside it: revisions,
//!   versions, history after the tenant's compaction and the lease move; the proxy's own
//!   freeze refuses writes from the freeze on, the tenant is marked moved (its sidecar stops,
//!   a new proxy refuses it); an unknown tenant, a bad name and an etcd target are refused;
//! * bad input: a table that is not kine's, a prefix with no keys, an unreachable etcd: clear
//!   errors, and the target is never created.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use kine_tests::conformance::{collect_events, watch};
use kine_tests::{
    Backend, ChildGuard, TestDatabase, free_port, kine_rs_binary, peer_binary, serve_and_connect,
    spawn_etcd, spawn_etcd_with, spawn_kine_on,
};

/// Path of k3s-io/kine: `$KINE_BIN`, else where `scripts/peers.sh` builds it. A missing
/// binary fails the test (run `scripts/peers.sh`).
fn kine_binary() -> PathBuf {
    peer_binary("KINE_BIN", "kine-v0.17.5/kine", "k3s-io/kine v0.17.5")
}

/// A running k3s-io/kine, killed when dropped.
struct Kine {
    child: Child,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl Drop for Kine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::env::var_os("KINE_TEST_LOG").is_some() {
            let log = std::fs::read_to_string(self._dir.path().join("kine.log"));
            eprintln!("kine's log:\n{}", log.unwrap_or_default());
        }
    }
}

/// The events of `stream` up to and including revision `last`.
async fn events_until(
    stream: &mut etcd_client::WatchStream,
    last: i64,
) -> Result<Vec<(EventType, String, i64)>> {
    let mut events = Vec::new();
    while events.last().is_none_or(|(_, _, r)| *r < last) {
        let response = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .context("no events for 10 s")??
            .context("the watch ended")?;
        if std::env::var_os("KINE_TEST_LOG").is_some() {
            eprintln!(
                "watch response: {:?}",
                response
                    .events()
                    .iter()
                    .map(|e| e.kv().map(|kv| kv.mod_revision()))
                    .collect::<Vec<_>>()
            );
        }
        for event in response.events() {
            let kv = event.kv().context("kv")?;
            events.push((
                event.event_type(),
                kv.key_str()?.to_string(),
                kv.mod_revision(),
            ));
        }
    }
    events.retain(|(_, _, r)| *r <= last);
    Ok(events)
}

/// Starts kine on `datastore` (kine's `--endpoint`), compaction on request only, and
/// connects to it.
async fn start_kine(datastore: &str) -> Result<(Kine, Client)> {
    let dir = tempfile::tempdir()?;
    let address = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(dir.path().join("kine.log"))?;
    let child = Command::new(kine_binary())
        .current_dir(dir.path())
        .args(["--endpoint", datastore, "--listen-address", &address])
        // Compaction only when asked (Compact RPC), keeping no minimum of revisions.
        .args(["--compact-interval", "0", "--compact-min-retain", "0"])
        .args([
            "--metrics-bind-address",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .context("start kine")?;
    let kine = Kine {
        child,
        endpoint: format!("http://{address}"),
        _dir: dir,
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let attempt = async {
            let mut client = Client::connect([kine.endpoint.as_str()], None).await?;
            client.get("/ready", None).await?;
            anyhow::Ok(client)
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(client)) => return Ok((kine, client)),
            _ if tokio::time::Instant::now() > deadline => {
                let log =
                    std::fs::read_to_string(kine._dir.path().join("kine.log")).unwrap_or_default();
                bail!("kine at {} did not answer: {log}", kine.endpoint)
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Runs `kine-rs migrate ARGS -o json`: its JSON lines, or its error output.
async fn migrate(args: Vec<String>) -> Result<Vec<serde_json::Value>, String> {
    let output = tokio::task::spawn_blocking(move || {
        Command::new(kine_rs_binary())
            .arg("migrate")
            .args(&args)
            .args(["-o", "json"])
            .stdin(Stdio::null())
            .output()
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    if !output.status.success() {
        return Err(format!(
            "kine-rs migrate failed ({}): {}{stdout}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).map_err(|e| format!("not JSON: {line}: {e}")))
        .collect()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// (key, value, create revision, mod revision, lease) of every key under `prefix` at
/// `revision` (0: now).
async fn state(
    client: &mut Client,
    prefix: &str,
    revision: i64,
) -> Result<Vec<(String, String, i64, i64, i64)>> {
    let response = client
        .get(
            prefix,
            Some(GetOptions::new().with_prefix().with_revision(revision)),
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
                kv.lease(),
            )
        })
        .collect())
}

/// kine's delete: the transaction kube-apiserver sends (delete if unchanged since read).
async fn kine_delete(client: &mut Client, key: &str) -> Result<i64> {
    let current = client.get(key, None).await?;
    let revision = current
        .kvs()
        .first()
        .context("no key to delete")?
        .mod_revision();
    let response = client
        .txn(
            Txn::new()
                .when([Compare::mod_revision(key, CompareOp::Equal, revision)])
                .and_then([TxnOp::delete(key, None)])
                .or_else([TxnOp::get(key, None)]),
        )
        .await?;
    ensure!(response.succeeded(), "kine did not delete {key}");
    Ok(response.header().context("header")?.revision())
}

fn header(revision: Option<&etcd_client::ResponseHeader>) -> Result<i64> {
    Ok(revision.context("header")?.revision())
}

/// The datastore a kine-schema test moves from.
struct KineStore {
    backend: Backend,
    /// kine's own `--endpoint`.
    kine_endpoint: String,
    /// kine-rs's `--from`.
    from: String,
    _database: Option<TestDatabase>,
    _dir: tempfile::TempDir,
}

fn kine_store(backend: Backend) -> KineStore {
    let dir = tempfile::tempdir().expect("tempdir");
    let database = TestDatabase::new(backend);
    let (kine_endpoint, from) = match (&database, backend) {
        (Some(db), Backend::Postgres) => (
            format!("{}?sslmode=disable", db.endpoint),
            format!("kine+{}", db.endpoint),
        ),
        (Some(db), Backend::Mysql) => {
            // kine takes Go's DSN: user@tcp(host:port)/db.
            let rest = db.endpoint.trim_start_matches("mysql://");
            let (user, rest) = rest.split_once('@').expect("user@host");
            let (host, name) = rest.split_once('/').expect("host/db");
            (
                format!("mysql://{user}@tcp({host})/{name}"),
                format!("kine+{}", db.endpoint),
            )
        }
        (None, Backend::Sqlite) => {
            let path = dir.path().join("state.db");
            (
                // kine's own defaults (WAL, a busy timeout) when it picks the file itself.
                format!(
                    "sqlite://{}?_journal_mode=WAL&_busy_timeout=30000&_txlock=immediate&cache=shared",
                    path.display()
                ),
                format!("kine+sqlite://{}", path.display()),
            )
        }
        other => panic!("no kine store on {other:?}"),
    };
    KineStore {
        backend,
        kine_endpoint,
        from,
        _database: database,
        _dir: dir,
    }
}

impl KineStore {
    /// Inserts a row into kine's table with the database's own client, as any kine process
    /// would: the client's error output, or `None` when the row was inserted.
    fn insert_directly(&self) -> Option<String> {
        let sql = "INSERT INTO kine(name, created, deleted, create_revision, prev_revision, \
                   lease, value, old_value) VALUES ('/direct', 1, 0, 0, 0, 0, 'v', 'v')";
        let mut command = match self.backend {
            Backend::Postgres => {
                let url = self.from.trim_start_matches("kine+");
                let mut c = Command::new("psql");
                c.args([url, "-v", "ON_ERROR_STOP=1", "-q", "-c", sql]);
                c
            }
            Backend::Mysql => {
                let url = self.from.trim_start_matches("kine+");
                let name = url.rsplit('/').next().unwrap_or_default().to_string();
                let mut c = Command::new("mysql");
                c.args(kine_tests::mysql_client_args(url).unwrap_or_default())
                    .args(["-D", &name, "-e", sql]);
                c
            }
            _ => {
                let path = self.from.trim_start_matches("kine+sqlite://");
                let mut c = Command::new("sqlite3");
                c.args([path, sql]);
                c
            }
        };
        let output = command.output().expect("the database's client");
        if output.status.success() {
            None
        } else {
            Some(String::from_utf8_lossy(&output.stderr).to_string())
        }
    }
}

/// A target datastore for kine-rs.
struct Target {
    endpoint: String,
    _database: Option<TestDatabase>,
    _dir: tempfile::TempDir,
}

fn target(backend: Backend) -> Target {
    let dir = tempfile::tempdir().expect("tempdir");
    let database = TestDatabase::new(backend);
    let endpoint = match &database {
        Some(db) => db.endpoint.clone(),
        None => format!("sqlite://{}", dir.path().join("target.db").display()),
    };
    Target {
        endpoint,
        _database: database,
        _dir: dir,
    }
}

/// kine on `from` gets history, deletes, a lease, a compaction and the apiserver's
/// compaction record; `kine-rs migrate` moves it to `to` while a writer writes through kine;
/// kine-rs then serves the same keys, revisions, history after the compaction, the lease and
/// the record, and kine refuses writes naming the move.
async fn kine_schema(from: Backend, to: Backend) -> Result<()> {
    let store = kine_store(from);
    let target = target(to);
    let (_kine, mut client) = start_kine(&store.kine_endpoint).await?;
    for round in 0..3 {
        for i in 0..30 {
            client
                .put(format!("/registry/k{i:02}"), format!("v{round}-{i}"), None)
                .await?;
        }
    }
    // kine's lease id is its TTL.
    let lease = client.lease_grant(300, None).await?.id();
    ensure!(lease == 300, "kine granted lease {lease}");
    client
        .put(
            "/registry/leased",
            "x",
            Some(PutOptions::new().with_lease(lease)),
        )
        .await?;
    for i in 0..5 {
        kine_delete(&mut client, &format!("/registry/k{i:02}")).await?;
    }
    // kube-apiserver's compaction record: a compare on its version.
    let record = client
        .txn(
            Txn::new()
                .when([Compare::version("compact_rev_key", CompareOp::Equal, 0)])
                .and_then([TxnOp::put("compact_rev_key", "42", None)])
                .or_else([TxnOp::get("compact_rev_key", None)]),
        )
        .await?;
    ensure!(record.succeeded(), "the compaction record was not written");
    let head = header(client.get("/registry/", None).await?.header())?;
    let compact_at = head - 40;
    client.compact(compact_at, None).await?;
    // More history after the compaction, and a key re-created after its delete.
    for i in 0..10 {
        client
            .put(format!("/registry/k{i:02}"), format!("v3-{i}"), None)
            .await?;
    }
    let head = header(client.get("/registry/", None).await?.header())?;
    let before = state(&mut client, "/registry/", 0).await?;
    let at_compaction = state(&mut client, "/registry/", compact_at + 1).await?;
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
    let expected_events = events_until(&mut history, head).await?;
    ensure!(
        expected_events.first().map(|e| e.2) == Some(compact_at + 1),
        "kine's watch from {}: {expected_events:?}",
        compact_at + 1
    );

    // The plan changes nothing.
    let plan = migrate(strings(&[
        "--from",
        &store.from,
        "--to",
        &target.endpoint,
        "--dry-run",
    ]))
    .await
    .map_err(anyhow::Error::msg)?;
    ensure!(
        plan[0]["event"] == "plan"
            // 30 keys, the leased one, /registry/health (kine's), compact_rev_key.
            && plan[0]["keys"] == 33
            && plan[0]["compact_revision"] == compact_at
            && plan[0]["leases"] == 1,
        "plan: {plan:?}"
    );
    client.put("/registry/after-plan", "1", None).await?;

    // A writer writes through kine during the move. kine answers a refused insert of a new
    // key as a success (its Create loses the error: kine v0.17.5, `LogStructured.Create`),
    // so what counts is what kine's table holds: read back through kine afterwards.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let mut client = client.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut answered = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok(response) = client
                    .put(format!("/live/w{i:06}"), format!("{i}"), None)
                    .await
                {
                    answered.push((i, response.header().map_or(0, |h| h.revision())));
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            answered
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines = migrate(strings(&[
        "--from",
        &store.from,
        "--to",
        &target.endpoint,
        "--page-keys",
        "7",
        "--window-revisions",
        "20",
    ]))
    .await
    .map_err(anyhow::Error::msg)?;
    let summary = lines.last().context("no summary")?.clone();
    ensure!(summary["event"] == "summary", "{summary}");
    ensure!(summary["compact_revision"] == compact_at, "{summary}");
    ensure!(summary["leases"] == 1, "{summary}");
    let last = summary["revision"].as_i64().context("revision")?;
    // The writer goes on a little after the move.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let answered = writer.await?;
    let mut landed = Vec::new();
    let mut refused = 0;
    for (i, revision) in &answered {
        let got = client.get(format!("/live/w{i:06}"), None).await?;
        match got.kvs().first() {
            Some(kv) => {
                ensure!(refused == 0, "write {i} landed after a refused one");
                ensure!(kv.mod_revision() == *revision && *revision <= last);
                landed.push((*i, *revision));
            }
            None => refused += 1,
        }
    }
    ensure!(landed.len() > 10, "only {} writes landed", landed.len());
    ensure!(refused > 0, "no write was refused after the freeze");
    // The table refuses every insert, naming the move, whoever makes it.
    let error = store
        .insert_directly()
        .context("an insert into the moved kine table succeeded")?;
    ensure!(error.contains("moved to"), "{error}");

    // kine-rs serves the same tenant from the target.
    let (_server, mut moved) = serve_and_connect(&target.endpoint, &[]).await?;
    let now = header(moved.get("/", None).await?.header())?;
    ensure!(now == last, "target revision {now}, kine's final {last}");
    let mut expected = before.clone();
    expected.retain(|(key, ..)| key != "/registry/after-plan");
    let got = state(&mut moved, "/registry/", head).await?;
    ensure!(got == expected, "at {head}: {got:#?} != {expected:#?}");
    let got = state(&mut moved, "/registry/", compact_at + 1).await?;
    ensure!(got == at_compaction, "{got:#?} != {at_compaction:#?}");
    // Versions: kine keeps none; the copy counts each key's writes since its creation.
    let k07 = moved.get("/registry/k07", None).await?;
    let kv = k07.kvs().first().context("k07")?;
    ensure!(kv.version() >= 1, "version {}", kv.version());
    let k03 = moved.get("/registry/k03", None).await?;
    let kv = k03.kvs().first().context("k03")?;
    ensure!(
        kv.version() == 1 && kv.create_revision() == kv.mod_revision(),
        "a key re-created after its delete: {kv:?}"
    );
    // Below the compaction: compacted, as on kine.
    let error = moved
        .get(
            "/registry/k10",
            Some(GetOptions::new().with_revision(compact_at - 1)),
        )
        .await
        .err()
        .context("a read below the compaction succeeded")?;
    ensure!(error.to_string().contains("compacted"), "{error}");
    // The history after the compaction, event by event.
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
    let events = events_until(&mut history, head).await?;
    ensure!(
        events == expected_events,
        "{events:#?} != {expected_events:#?}"
    );
    // kube-apiserver's compaction record, as kine showed it.
    let record = moved.get("compact_rev_key", None).await?;
    let kv = record.kvs().first().context("compact_rev_key")?;
    ensure!(
        kv.value_str()? == "42" && kv.version() == 1,
        "compact_rev_key: {kv:?}"
    );
    // The lease, with a fresh TTL (as after a restart of kine).
    let ttl = moved.lease_time_to_live(300, None).await?;
    ensure!(
        ttl.ttl() > 250 && ttl.ttl() <= 300 && ttl.granted_ttl() == 300,
        "lease: {ttl:?}"
    );
    // Every write that landed in kine's table, at its revision.
    for (i, revision) in landed {
        let got = moved.get(format!("/live/w{i:06}"), None).await?;
        let kv = got
            .kvs()
            .first()
            .with_context(|| format!("write {i} missing"))?;
        ensure!(kv.mod_revision() == revision && kv.value_str()? == i.to_string());
    }
    // And it takes writes at the next revision.
    let put = moved.put("/registry/after", "1", None).await?;
    ensure!(header(put.header())? == last + 1);
    // A second run says the source moved.
    let again = migrate(strings(&["--from", &store.from, "--to", &target.endpoint])).await;
    ensure!(
        again.as_ref().is_err_and(|e| e.contains("moved")),
        "{again:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kine_schema_postgres_to_sqlite() -> Result<()> {
    kine_schema(Backend::Postgres, Backend::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kine_schema_mysql_to_postgres() -> Result<()> {
    kine_schema(Backend::Mysql, Backend::Postgres).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kine_schema_sqlite_to_postgres() -> Result<()> {
    kine_schema(Backend::Sqlite, Backend::Postgres).await
}

/// Keys under `/tenant1/` of a real etcd move to kine-rs without the prefix, with etcd's
/// revisions; `/tenant2/` stays behind. A writer and a watcher run during the copy; the
/// cut-over waits for `--source-writers-stopped`; once the writer stops, the rerun with it
/// resumes the copy and switches: every write is on the target at its revision, and a watch
/// resumed on the target sees the same events as the watcher on etcd.
async fn etcd_prefix(to: Backend) -> Result<()> {
    let etcd = spawn_etcd();
    let target = target(to);
    let mut client = Client::connect([etcd.endpoint.as_str()], None).await?;
    for round in 0..3 {
        for i in 0..25 {
            client
                .put(
                    format!("/tenant1/registry/k{i:02}"),
                    format!("v{round}"),
                    None,
                )
                .await?;
            client
                .put(format!("/tenant2/registry/k{i:02}"), "other", None)
                .await?;
        }
    }
    client.put("/tenant10/registry/x", "not ours", None).await?;
    let compact_at = header(client.get("/", None).await?.header())? - 30;
    client.compact(compact_at, None).await?;
    let lease = client.lease_grant(300, None).await?.id();
    client
        .put(
            "/tenant1/registry/leased",
            "l",
            Some(PutOptions::new().with_lease(lease)),
        )
        .await?;
    let other_lease = client.lease_grant(300, None).await?.id();
    client
        .put(
            "/tenant2/registry/leased",
            "l",
            Some(PutOptions::new().with_lease(other_lease)),
        )
        .await?;
    client.delete("/tenant1/registry/k00", None).await?;
    let from = [
        "--from",
        etcd.endpoint.as_str(),
        "--from-prefix",
        "/tenant1",
    ];

    // The plan.
    let plan = migrate(
        [
            strings(&from),
            strings(&["--to", &target.endpoint, "--dry-run"]),
        ]
        .concat(),
    )
    .await
    .map_err(anyhow::Error::msg)?;
    ensure!(
        plan[0]["keys"] == 25
            && plan[0]["leases"] == 1
            && plan[0]["compact_revision"] == compact_at,
        "plan: {plan:?}"
    );
    ensure!(
        plan[0]["freeze"]
            .as_str()
            .is_some_and(|f| f.contains("--source-writers-stopped")),
        "{plan:?}"
    );

    // A live writer and watcher while the copy runs; the cut-over is refused without the
    // flag.
    let start = header(client.get("/", None).await?.header())?;
    let (mut stream, _) = watch(
        &mut client,
        "/tenant1/",
        Some(
            WatchOptions::new()
                .with_prefix()
                .with_start_revision(start + 1),
        ),
    )
    .await?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let mut client = client.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok(response) = client
                    .put(format!("/tenant1/live/w{i:06}"), format!("{i}"), None)
                    .await
                {
                    acknowledged.push((i, response.header().map_or(0, |h| h.revision())));
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            acknowledged
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = migrate(
        [
            strings(&from),
            strings(&["--to", &target.endpoint, "--page-keys", "6"]),
        ]
        .concat(),
    )
    .await;
    ensure!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("--source-writers-stopped")),
        "{refused:?}"
    );
    // The writers stop; the cut-over goes through.
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let acknowledged = writer.await?;
    ensure!(acknowledged.len() > 20, "{} writes", acknowledged.len());
    let lines = migrate(
        [
            strings(&from),
            strings(&["--to", &target.endpoint, "--source-writers-stopped"]),
        ]
        .concat(),
    )
    .await
    .map_err(anyhow::Error::msg)?;
    let summary = lines.last().context("no summary")?.clone();
    let last = summary["revision"].as_i64().context("revision")?;
    let snapshot = summary["compact_revision"].as_i64().context("compaction")?;
    ensure!(summary["leases"] == 1, "{summary}");
    ensure!(summary["resumed"] == true, "{summary}");
    let etcd_head = header(client.get("/", None).await?.header())?;
    ensure!(last == etcd_head, "final {last}, etcd at {etcd_head}");

    // The watcher on etcd saw every write; the target has each at the same revision.
    let seen = collect_events(&mut stream, acknowledged.len()).await?;
    let watched: Vec<i64> = seen.iter().map(|e| e.revision).collect();
    let written: Vec<i64> = acknowledged.iter().map(|(_, r)| *r).collect();
    ensure!(watched == written, "the watcher missed writes");
    let (_server, mut moved) = serve_and_connect(&target.endpoint, &[]).await?;
    ensure!(header(moved.get("/", None).await?.header())? == last);
    let expected: Vec<_> = state(&mut client, "/tenant1/", 0)
        .await?
        .into_iter()
        .map(|(key, value, create, modified, lease)| {
            (
                key.trim_start_matches("/tenant1").to_string(),
                value,
                create,
                modified,
                lease,
            )
        })
        .collect();
    let got = state(&mut moved, "/", 0).await?;
    ensure!(got == expected, "{got:#?} != {expected:#?}");
    let versions = moved.get("/registry/k05", None).await?;
    ensure!(versions.kvs().first().context("k05")?.version() == 3);
    // The copy began while the writer wrote: a watch resumed on the target from a revision
    // after the snapshot sees the same events as the watcher on etcd.
    ensure!(snapshot > compact_at, "snapshot {snapshot}");
    let after_snapshot: Vec<i64> = written.iter().copied().filter(|r| *r > snapshot).collect();
    ensure!(
        after_snapshot.len() > 5,
        "only {} writes after the snapshot at {snapshot}",
        after_snapshot.len()
    );
    let (mut resumed, _) = watch(
        &mut moved,
        "/live/",
        Some(
            WatchOptions::new()
                .with_prefix()
                .with_start_revision(after_snapshot[0]),
        ),
    )
    .await?;
    let rest: Vec<i64> = collect_events(&mut resumed, after_snapshot.len())
        .await?
        .iter()
        .map(|e| e.revision)
        .collect();
    ensure!(rest == after_snapshot, "resumed watch differs");
    // History before the snapshot is compacted on the target.
    let error = moved
        .get(
            "/registry/k01",
            Some(GetOptions::new().with_revision(snapshot - 1)),
        )
        .await
        .err()
        .context("a read below the snapshot succeeded")?;
    ensure!(error.to_string().contains("compacted"), "{error}");
    // The lease of /tenant1/, with its remaining TTL; not /tenant2/'s.
    let ttl = moved.lease_time_to_live(lease, None).await?;
    ensure!(
        ttl.ttl() > 250 && ttl.ttl() <= 300 && ttl.granted_ttl() == 300,
        "{ttl:?}"
    );
    ensure!(moved.lease_time_to_live(other_lease, None).await?.ttl() <= 0);
    ensure!(
        moved
            .get(
                "/",
                Some(GetOptions::new().with_from_key().with_count_only())
            )
            .await?
            .count()
            == expected.len() as i64
    );
    let put = moved.put("/registry/after", "1", None).await?;
    ensure!(header(put.header())? == last + 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_prefix_to_postgres() -> Result<()> {
    etcd_prefix(Backend::Postgres).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_prefix_to_sqlite() -> Result<()> {
    etcd_prefix(Backend::Sqlite).await
}

/// `--source-writers-stopped` while a writer still writes to the prefix: the write after the
/// freeze point is seen, the switch is aborted, the import removed, etcd untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_prefix_write_after_the_freeze_aborts() -> Result<()> {
    let etcd = spawn_etcd();
    let target = target(Backend::Sqlite);
    let mut client = Client::connect([etcd.endpoint.as_str()], None).await?;
    for i in 0..200 {
        client
            .put(format!("/tenant1/registry/k{i:03}"), "v", None)
            .await?;
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let mut client = client.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = client
                    .put(format!("/tenant1/live/w{i:06}"), "w", None)
                    .await;
                i += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let aborted = migrate(strings(&[
        "--from",
        &etcd.endpoint,
        "--from-prefix",
        "/tenant1",
        "--to",
        &target.endpoint,
        "--source-writers-stopped",
    ]))
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.await?;
    ensure!(
        aborted
            .as_ref()
            .is_err_and(|e| e.contains("written after the freeze point")),
        "{aborted:?}"
    );
    // The import is gone: the target serves an empty tenant.
    let (_server, mut moved) = serve_and_connect(&target.endpoint, &[]).await?;
    let count = moved
        .get(
            "/",
            Some(GetOptions::new().with_from_key().with_count_only()),
        )
        .await?
        .count();
    ensure!(count == 0, "{count} keys left on the target");
    // etcd still serves and takes writes.
    client.put("/tenant1/registry/after", "1", None).await?;
    Ok(())
}

/// Bad input gets a clear error and changes nothing: the target is not even created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sources_are_refused_clearly() -> Result<()> {
    let etcd = spawn_etcd();
    let mut client = Client::connect([etcd.endpoint.as_str()], None).await?;
    client.put("/tenant1/registry/a", "1", None).await?;
    let store = kine_store(Backend::Postgres);
    let (_kine, mut kine_client) = start_kine(&store.kine_endpoint).await?;
    let dir = tempfile::tempdir()?;
    let target_file = dir.path().join("target.db");
    let to = format!("sqlite://{}", target_file.display());
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            strings(&["--from", &store.from, "--from-kine-table", "key_value"]),
            "is not kine's table",
        ),
        (
            strings(&["--from", &store.from, "--from-kine-table", "kine;drop"]),
            "is not a table name",
        ),
        (
            strings(&["--from", "kine+sqlite:///nonexistent/state.db"]),
            "no such file",
        ),
        (
            strings(&["--from", &etcd.endpoint, "--from-prefix", "/nothing"]),
            "no key under",
        ),
        (
            strings(&["--from", &etcd.endpoint]),
            "is not a tenant of the etcd proxy",
        ),
        (
            strings(&["--from", &etcd.endpoint, "--from-prefix", "/"]),
            "a prefix is a key path",
        ),
        (
            strings(&["--from", "etcd://127.0.0.1:1", "--from-prefix", "/tenant1"]),
            "does not answer",
        ),
    ];
    for (args, expected) in cases {
        let started = std::time::Instant::now();
        let result = migrate([args.clone(), strings(&["--to", &to])].concat()).await;
        match result {
            Err(error) if error.contains(expected) => {}
            other => bail!("{args:?}: expected an error with {expected:?}, got {other:?}"),
        }
        ensure!(
            started.elapsed() < Duration::from_secs(30),
            "{args:?} took {:?}",
            started.elapsed()
        );
        ensure!(!target_file.exists(), "{args:?} created the target");
    }
    // kine's table is untouched: kine still takes writes, and they land.
    let put = kine_client.put("/registry/still", "ok", None).await?;
    let got = kine_client.get("/registry/still", None).await?;
    ensure!(
        got.kvs().first().map(|kv| kv.mod_revision()) == put.header().map(|h| h.revision()),
        "the write did not land in kine's table"
    );
    Ok(())
}

/// A program of `scripts/peers.sh`'s cache (kube-apiserver, kubectl v1.36.3), or `$VAR`;
/// missing fails the test.
fn kube_peer(var: &str, name: &str) -> PathBuf {
    let path = std::env::var(var).map(PathBuf::from).unwrap_or_else(|_| {
        PathBuf::from(std::env::var("HOME").unwrap_or_default())
            .join(format!(".cache/kine-rs-peers/{name}-v1.36.3/{name}"))
    });
    assert!(
        path.exists(),
        "{} is missing: run scripts/peers.sh",
        path.display()
    );
    path
}

/// A kube-apiserver, killed when dropped, and the kubeconfig to reach it.
struct ApiServer {
    child: Child,
    kubeconfig: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() || std::env::var_os("KINE_TEST_LOG").is_some() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("kube-apiserver log (end):\n{}", tail.join("\n"));
        }
    }
}

const TOKEN: &str = "kine-rs-migrate-token";

/// Starts a kube-apiserver on `etcd_servers` with `--etcd-prefix=prefix`; waits for `/readyz`.
fn start_apiserver(etcd_servers: &str, prefix: &str) -> Result<ApiServer> {
    let dir = tempfile::tempdir()?;
    let key_pair = rcgen::KeyPair::generate()?;
    let key = dir.path().join("sa.key");
    std::fs::write(&key, key_pair.serialize_pem())?;
    let public_key = dir.path().join("sa.pub");
    std::fs::write(&public_key, key_pair.public_key_pem())?;
    let tokens = dir.path().join("tokens.csv");
    std::fs::write(&tokens, format!("{TOKEN},admin,admin,system:masters\n"))?;
    let port = free_port();
    let log = dir.path().join("kube-apiserver.log");
    let file = std::fs::File::create(&log)?;
    let child = Command::new(kube_peer("KUBE_APISERVER_BIN", "kube-apiserver"))
        .arg(format!("--etcd-servers={etcd_servers}"))
        .arg(format!("--etcd-prefix={prefix}"))
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
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .context("start kube-apiserver")?;
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\n\
             clusters:\n- name: k\n  cluster:\n    server: https://127.0.0.1:{port}\n    \
             insecure-skip-tls-verify: true\n\
             users:\n- name: admin\n  user:\n    token: {TOKEN}\n\
             contexts:\n- name: k\n  context:\n    cluster: k\n    user: admin\n\
             current-context: k\n"
        ),
    )?;
    let server = ApiServer {
        child,
        kubeconfig,
        log,
        _dir: dir,
    };
    let started = std::time::Instant::now();
    loop {
        if kubectl(&server, &["get", "--raw=/readyz", "--request-timeout=5s"])
            .is_ok_and(|out| out.trim() == "ok")
        {
            return Ok(server);
        }
        ensure!(
            started.elapsed() < Duration::from_secs(120),
            "kube-apiserver was not ready within 120 s"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Runs kubectl against `server`: what it printed, or its error output.
fn kubectl(server: &ApiServer, args: &[&str]) -> Result<String> {
    let output = Command::new(kube_peer("KUBECTL_BIN", "kubectl"))
        .env("KUBECONFIG", &server.kubeconfig)
        .arg("--request-timeout=30s")
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    ensure!(
        output.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).to_string())
}

/// A kube-apiserver with `--etcd-prefix=/tenant1` on a real etcd (Kamaji's layout) writes a
/// namespace and a configmap; it is stopped, the prefix moves to kine-rs on SQLite, and a
/// kube-apiserver with `--etcd-prefix=/` on kine-rs serves the same objects with the same
/// resourceVersions, and goes on from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_apiserver_moves_from_an_etcd_prefix() -> Result<()> {
    let etcd = spawn_etcd();
    let target = target(Backend::Sqlite);
    let endpoint = etcd.endpoint.clone();
    let (rv, listed) = tokio::task::spawn_blocking(move || -> Result<(String, String)> {
        let before = start_apiserver(&endpoint, "/tenant1")?;
        kubectl(&before, &["create", "namespace", "moved"])?;
        kubectl(
            &before,
            &[
                "-n",
                "moved",
                "create",
                "configmap",
                "cm1",
                "--from-literal=a=1",
            ],
        )?;
        kubectl(
            &before,
            &[
                "-n",
                "moved",
                "patch",
                "configmap",
                "cm1",
                "--type=merge",
                "-p",
                r#"{"data":{"a":"2"}}"#,
            ],
        )?;
        let rv = kubectl(
            &before,
            &[
                "-n",
                "moved",
                "get",
                "configmap",
                "cm1",
                "-o",
                "jsonpath={.metadata.resourceVersion}",
            ],
        )?;
        let listed = kubectl(&before, &["get", "namespaces", "-o", "name"])?;
        // The tenant's apiserver stops (its writers), then the move.
        drop(before);
        Ok((rv, listed))
    })
    .await??;
    let lines = migrate(strings(&[
        "--from",
        &etcd.endpoint,
        "--from-prefix",
        "/tenant1",
        "--to",
        &target.endpoint,
        "--source-writers-stopped",
    ]))
    .await
    .map_err(anyhow::Error::msg)?;
    ensure!(lines.last().is_some_and(|l| l["event"] == "summary"));
    let (server, _) = serve_and_connect(&target.endpoint, &[]).await?;
    let kine_rs = server.endpoint.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        let after = start_apiserver(&kine_rs, "/")?;
        let moved_rv = kubectl(
            &after,
            &[
                "-n",
                "moved",
                "get",
                "configmap",
                "cm1",
                "-o",
                "jsonpath={.metadata.resourceVersion} {.data.a}",
            ],
        )?;
        ensure!(moved_rv == format!("{rv} 2"), "{moved_rv} != {rv} 2");
        let namespaces = kubectl(&after, &["get", "namespaces", "-o", "name"])?;
        ensure!(namespaces == listed, "{namespaces} != {listed}");
        kubectl(
            &after,
            &[
                "-n",
                "moved",
                "patch",
                "configmap",
                "cm1",
                "--type=merge",
                "-p",
                r#"{"data":{"a":"3"}}"#,
            ],
        )?;
        let next: u64 = kubectl(
            &after,
            &[
                "-n",
                "moved",
                "get",
                "configmap",
                "cm1",
                "-o",
                "jsonpath={.metadata.resourceVersion}",
            ],
        )?
        .trim()
        .parse()?;
        ensure!(next > rv.trim().parse::<u64>()?, "{next} after {rv}");
        Ok(())
    })
    .await??;
    drop(server);
    Ok(())
}

/// Starts `kine-rs migrate ARGS`, waits for its first page copied, and kills it (-9).
async fn start_and_kill(args: Vec<String>) -> Result<()> {
    let log = tempfile::NamedTempFile::new()?;
    let mut child = Command::new(kine_rs_binary())
        .arg("migrate")
        .args(&args)
        .args(["-o", "json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log.reopen()?))
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let progressed = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(&line).ok())
            .any(|line| line["phase"] == "snapshot" && line["keys"].as_u64() > Some(0))
    })
    .await?;
    child.kill()?;
    child.wait()?;
    ensure!(
        progressed,
        "the migration reported no snapshot progress: {}",
        std::fs::read_to_string(log.path()).unwrap_or_default()
    );
    Ok(())
}

/// A migration from kine's table killed during the copy leaves kine writable; `--abort`
/// removes the pin and the partial import; killed again, a rerun resumes and finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kine_schema_killed_migration_resumes_or_aborts() -> Result<()> {
    let store = kine_store(Backend::Postgres);
    let target = target(Backend::Sqlite);
    let (_kine, mut client) = start_kine(&store.kine_endpoint).await?;
    for i in 0..400 {
        client
            .put(format!("/big/{i:04}"), "x".repeat(100), None)
            .await?;
    }
    // Half the keys come through the snapshot, half through the events after it.
    client.compact(200, None).await?;
    let args = strings(&[
        "--from",
        &store.from,
        "--to",
        &target.endpoint,
        "--page-keys",
        "3",
        "--window-revisions",
        "3",
    ]);
    for attempt in 0..2 {
        start_and_kill(args.clone()).await?;
        // kine still takes writes, and they land.
        let key = format!("/big/after-kill-{attempt}");
        let put = client.put(key.as_str(), "y", None).await?;
        let got = client.get(key.as_str(), None).await?;
        ensure!(
            got.kvs().first().map(|kv| kv.mod_revision()) == put.header().map(|h| h.revision()),
            "a write after the kill did not land"
        );
        if attempt == 0 {
            let lines = migrate([args.clone(), strings(&["--abort"])].concat())
                .await
                .map_err(anyhow::Error::msg)?;
            ensure!(
                lines[0]["source_released"] == true && lines[0]["import_removed"] == true,
                "abort: {lines:?}"
            );
            ensure!(
                store.insert_directly().is_none(),
                "kine's table still refuses inserts after --abort"
            );
        }
    }
    let lines = migrate(args).await.map_err(anyhow::Error::msg)?;
    let summary = lines.last().context("no summary")?;
    ensure!(summary["resumed"] == true, "not resumed: {summary}");
    let (_server, mut moved) = serve_and_connect(&target.endpoint, &[]).await?;
    let count = moved
        .get(
            "/big/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await?
        .count();
    ensure!(count == 402, "{count} keys on the target");
    Ok(())
}

/// (key, value, create revision, mod revision, version, lease) of every key of `client`'s
/// range `[key, range_end)` (all keys when both are empty).
async fn full_state(
    client: &mut Client,
    prefix: &str,
) -> Result<Vec<(String, String, i64, i64, i64, i64)>> {
    let options = if prefix.is_empty() {
        GetOptions::new().with_all_keys()
    } else {
        GetOptions::new().with_prefix()
    };
    let response = client.get(prefix, Some(options)).await?;
    Ok(response
        .kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str()
                    .unwrap_or_default()
                    .trim_start_matches(prefix)
                    .to_string(),
                kv.value_str().unwrap_or_default().to_string(),
                kv.create_revision(),
                kv.mod_revision(),
                kv.version(),
                kv.lease(),
            )
        })
        .collect())
}

/// Starts a kine-rs proxy sidecar of tenant `tenant` on the etcd at `address`.
async fn spawn_proxy(address: &str, tenant: &str) -> Result<ChildGuard> {
    let endpoint = format!("etcd://{address}");
    let tenant = tenant.to_string();
    Ok(tokio::task::spawn_blocking(move || {
        spawn_kine_on(
            &endpoint,
            tempfile::tempdir().expect("tempdir"),
            &["--tenant", &tenant, "--compact-interval", "0"],
        )
    })
    .await?)
}

async fn connect_ready(endpoint: &str) -> Result<Client> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut client) = Client::connect([endpoint], None).await
            && client.get("probe", None).await.is_ok()
        {
            return Ok(client);
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "{endpoint} not ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn grpc_code<T>(result: &Result<T, etcd_client::Error>) -> Option<tonic::Code> {
    match result {
        Err(etcd_client::Error::GRpcStatus(status)) => Some(status.code()),
        _ => None,
    }
}

/// Tenant `t` of a kine-rs proxy on a real etcd moves to `to` while a writer and a watcher
/// use it through the proxy and another tenant writes to the same etcd: the proxy's freeze
/// refuses writes (FailedPrecondition), every acknowledged write is on the target at its
/// revision, the watcher saw each once, versions, history after the tenant's compaction and
/// the lease (with its TTL) are there; the tenant is marked moved (its sidecar stops, a new
/// proxy refuses it), its keys stay in etcd; a kine-rs on the target serves it.
async fn etcd_proxy_tenant(to: Backend) -> Result<()> {
    let etcd = spawn_etcd_with(&["--max-txn-ops", "256"]);
    let target = target(to);
    let mut raw = Client::connect([etcd.endpoint.as_str()], None).await?;
    let mut proxy = spawn_proxy(&etcd.address, "t").await?;
    let mut client = connect_ready(&proxy.endpoint).await?;
    for round in 0..3 {
        for i in 0..20 {
            client
                .put(format!("/registry/k{i:02}"), format!("v{round}"), None)
                .await?;
            // Another tenant's keys, written beside: etcd's revisions are shared.
            raw.put(format!("/u/registry/k{i:02}"), "other", None)
                .await?;
        }
    }
    let compact_at = header(client.get("/", None).await?.header())? - 20;
    client.compact(compact_at, None).await?;
    let lease = client.lease_grant(300, None).await?.id();
    client
        .put(
            "/registry/leased",
            "l",
            Some(PutOptions::new().with_lease(lease)),
        )
        .await?;
    client.delete("/registry/k00", None).await?;
    let from = [
        "--from",
        &format!("etcd://{}", etcd.address),
        "--tenant",
        "t",
    ]
    .map(String::from);

    // The plan.
    let plan = migrate(
        [
            from.to_vec(),
            strings(&["--to", &target.endpoint, "--dry-run"]),
        ]
        .concat(),
    )
    .await
    .map_err(anyhow::Error::msg)?;
    ensure!(
        plan[0]["keys"] == 20
            && plan[0]["leases"] == 1
            && plan[0]["compact_revision"] == compact_at
            && plan[0]["freeze"]
                .as_str()
                .is_some_and(|f| f.contains("refused by the datastore itself")),
        "plan: {plan:?}"
    );
    // Bad input: an unknown tenant, a name that is not one, etcd as the target.
    for (args, expected) in [
        (
            strings(&["--tenant", "nope", "--to", &target.endpoint]),
            "is not a tenant of the etcd proxy",
        ),
        (
            strings(&["--tenant", "Bad_Name", "--to", &target.endpoint]),
            "invalid tenant name",
        ),
        (
            strings(&["--tenant", "t", "--to", &etcd.endpoint]),
            "cannot be a migration target",
        ),
    ] {
        let result = migrate(
            [
                strings(&["--from", &format!("etcd://{}", etcd.address)]),
                args.clone(),
            ]
            .concat(),
        )
        .await;
        ensure!(
            result.as_ref().is_err_and(|e| e.contains(expected)),
            "{args:?}: expected {expected:?}, got {result:?}"
        );
    }

    // A writer and a watcher through the proxy, another tenant writing beside, during the
    // migration.
    let start = header(client.get("/", None).await?.header())?;
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
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let mut client = client.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            // (revision acknowledged) or (gRPC code refused), in order.
            let mut outcomes: Vec<Result<i64, Option<tonic::Code>>> = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let result = client
                    .put(format!("/live/w{i:06}"), format!("{i}"), None)
                    .await;
                outcomes.push(match &result {
                    Ok(response) => Ok(response.header().map_or(0, |h| h.revision())),
                    Err(_) => Err(grpc_code(&result)),
                });
                i += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            outcomes
        })
    };
    let other = {
        let mut raw = raw.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = raw.put(format!("/u/live/{i}"), "x", None).await;
                i += 1;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines = migrate(
        [
            from.to_vec(),
            strings(&["--to", &target.endpoint, "--page-keys", "6"]),
        ]
        .concat(),
    )
    .await
    .map_err(anyhow::Error::msg)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let outcomes = writer.await?;
    other.await?;
    let summary = lines.last().context("no summary")?.clone();
    ensure!(summary["event"] == "summary", "{summary}");
    let last = summary["revision"].as_i64().context("revision")?;
    ensure!(summary["leases"] == 1, "{summary}");
    ensure!(summary["compact_revision"] == compact_at, "{summary}");

    // Acknowledged until the freeze, refused with FailedPrecondition from then on (then the
    // sidecar stops: Unavailable); never acknowledged after a refusal.
    let first_refused = outcomes
        .iter()
        .position(Result::is_err)
        .context("no write was refused after the freeze")?;
    ensure!(
        outcomes[first_refused] == Err(Some(tonic::Code::FailedPrecondition)),
        "first refusal: {:?}",
        outcomes[first_refused]
    );
    ensure!(
        outcomes[first_refused..].iter().all(Result::is_err),
        "a write was acknowledged after the freeze"
    );
    let written: Vec<i64> = outcomes[..first_refused]
        .iter()
        .map(|r| *r.as_ref().unwrap_or(&0))
        .collect();
    ensure!(written.len() > 20, "{} writes", written.len());
    ensure!(
        written.iter().all(|r| *r <= last),
        "a write acknowledged after the switch revision {last}"
    );
    // The watcher through the proxy saw each acknowledged write once, in order.
    let seen = collect_events(&mut stream, written.len()).await?;
    let watched: Vec<i64> = seen.iter().map(|e| e.revision).collect();
    ensure!(watched == written, "the watcher missed writes");

    // Moved: the sidecar stops by itself; a new proxy refuses the tenant.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while proxy.is_running() {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the sidecar kept serving the moved tenant"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let endpoint = format!("etcd://{}", etcd.address);
    let refused = tokio::task::spawn_blocking(move || {
        Command::new(kine_rs_binary())
            .args(["--endpoint", &endpoint, "--tenant", "t"])
            .args(["--listen-address", &format!("127.0.0.1:{}", free_port())])
            .stdin(Stdio::null())
            .output()
    })
    .await??;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    ensure!(
        !refused.status.success() && stderr.contains("moved to another datastore"),
        "a new proxy of the moved tenant: {}: {stderr}",
        refused.status
    );
    // etcd keeps the tenant's keys (frozen, marked moved, no pin left); the other tenant's
    // stay untouched.
    let records = full_state(&mut raw, "/_kine-rs/").await?;
    let names: Vec<&str> = records.iter().map(|r| r.0.as_str()).collect();
    ensure!(
        names.contains(&"frozen/t") && names.contains(&"moved/t"),
        "{names:?}"
    );
    ensure!(!names.iter().any(|n| n.starts_with("pinned/")), "{names:?}");
    ensure!(full_state(&mut raw, "/u/registry/").await?.len() == 20);

    // A kine-rs on the target serves the tenant with the same keys, revisions, versions,
    // history after the compaction, the lease.
    let (_server, mut moved) = serve_and_connect(&target.endpoint, &["--tenant", "t"]).await?;
    ensure!(header(moved.get("/", None).await?.header())? == last);
    let expected = full_state(&mut raw, "/t/").await?;
    let got = full_state(&mut moved, "").await?;
    ensure!(got == expected, "{got:#?} != {expected:#?}");
    ensure!(
        got.iter()
            .any(|(key, _, _, _, version, _)| key == "/registry/k05" && *version == 3)
    );
    let on_etcd = raw
        .get(
            "/t//registry/k05",
            Some(GetOptions::new().with_revision(compact_at)),
        )
        .await?
        .kvs()
        .first()
        .map(|kv| (kv.value().to_vec(), kv.mod_revision()));
    let on_target = moved
        .get(
            "/registry/k05",
            Some(GetOptions::new().with_revision(compact_at)),
        )
        .await?
        .kvs()
        .first()
        .map(|kv| (kv.value().to_vec(), kv.mod_revision()));
    ensure!(
        on_target == on_etcd && on_etcd.is_some(),
        "{on_target:?} != {on_etcd:?}"
    );
    let error = moved
        .get(
            "/registry/k05",
            Some(GetOptions::new().with_revision(compact_at - 1)),
        )
        .await
        .err()
        .context("a read below the compaction succeeded")?;
    ensure!(error.to_string().contains("compacted"), "{error}");
    let (mut resumed, _) = watch(
        &mut moved,
        "/live/",
        Some(
            WatchOptions::new()
                .with_prefix()
                .with_start_revision(start + 1),
        ),
    )
    .await?;
    let again: Vec<i64> = collect_events(&mut resumed, written.len())
        .await?
        .iter()
        .map(|e| e.revision)
        .collect();
    ensure!(again == written, "the watch resumed on the target differs");
    let ttl = moved.lease_time_to_live(lease, None).await?;
    ensure!(
        ttl.ttl() > 250 && ttl.ttl() <= 300 && ttl.granted_ttl() == 300,
        "{ttl:?}"
    );
    let put = moved.put("/registry/after", "1", None).await?;
    ensure!(header(put.header())? == last + 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_proxy_tenant_to_postgres() -> Result<()> {
    etcd_proxy_tenant(Backend::Postgres).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_proxy_tenant_to_sqlite() -> Result<()> {
    etcd_proxy_tenant(Backend::Sqlite).await
}
