//! Faults (DESIGN.md invariant 6, "nothing is lost"), on PostgreSQL and MariaDB:
//!
//! * kill -9 of kine-rs under concurrent write load: after a restart every acknowledged write
//!   is there, no transaction is half-applied and the history is gapless;
//! * the database restarts while kine-rs runs: requests fail with `Unavailable` (within a
//!   bound) while it is down, kine-rs recovers by itself, and an open watch stream goes on
//!   without losing or repeating an event;
//! * the database drops kine-rs's connections mid-watch (`pg_terminate_backend`, MySQL's
//!   `KILL`), including PostgreSQL's LISTEN connection: no watch event is lost or repeated.
//!
//! Restarting a database needs a server of the test's own ([`kine_tests::private_db`]); the
//! other faults use a fresh database on the shared servers.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use etcd_client::{Client, EventType, Txn, TxnOp, WatchOptions, WatchStream};
use kine_tests::private_db::{PrivateMariadb, PrivateNats, PrivatePostgres};
use kine_tests::{Backend, ChildGuard, TestDatabase, serve_and_connect, spawn_kine_on};
use tokio::time::Instant;

/// Longest a request may take to fail while the database is down: the connection pool's
/// acquire timeout, twice (a write may queue behind a batch that is failing), plus slack.
const UNAVAILABLE_BOUND: Duration = Duration::from_secs(15);
/// How long kine-rs may take to serve again once the database is back.
const RECOVERY: Duration = Duration::from_secs(60);
/// How long a watch may take to deliver what was written.
const DELIVERY: Duration = Duration::from_secs(30);

/// One watch event, reduced to what the checks compare.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ev {
    revision: i64,
    put: bool,
    key: String,
    value: String,
}

/// Starts kine-rs on `endpoint` and waits until it answers.
async fn start(endpoint: &str) -> Result<(ChildGuard, Client)> {
    serve_and_connect(endpoint, &[]).await
}

/// The gRPC code of a failed request; `None` for a failure that is not a gRPC status
/// (transport errors).
fn code_of(error: &etcd_client::Error) -> Option<tonic::Code> {
    match error {
        etcd_client::Error::GRpcStatus(status) => Some(status.code()),
        _ => None,
    }
}

/// The current revision, retrying (within [`RECOVERY`]) while kine-rs cannot answer.
async fn current_revision(client: &mut Client) -> Result<i64> {
    let deadline = Instant::now() + RECOVERY;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), client.get("f/", None)).await {
            Ok(Ok(response)) => return Ok(response.header().context("header")?.revision()),
            outcome if Instant::now() > deadline => {
                bail!("no current revision within {RECOVERY:?}: {outcome:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Opens a watch of prefix `f/` from `start`, consuming its `created` response.
async fn watch_from(client: &mut Client, start: i64) -> Result<WatchStream> {
    let options = WatchOptions::new().with_prefix().with_start_revision(start);
    let mut stream = client.watch("f/", Some(options)).await?;
    let created = tokio::time::timeout(DELIVERY, stream.message())
        .await
        .context("no `created` response")??
        .context("the watch stream ended before `created`")?;
    ensure!(created.created(), "not a `created` response: {created:?}");
    Ok(stream)
}

/// Why [`read_until`] stopped.
#[derive(Debug)]
enum Read {
    /// An event at the target revision arrived.
    Reached,
    /// The stream ended (or its watch was canceled), for the given reason.
    Ended(String),
}

/// Appends the events of `stream` to `out` until one at `revision` (or later) arrives.
async fn read_until(stream: &mut WatchStream, revision: i64, out: &mut Vec<Ev>) -> Result<Read> {
    let deadline = Instant::now() + DELIVERY;
    loop {
        if out.last().is_some_and(|e| e.revision >= revision) {
            return Ok(Read::Reached);
        }
        let message = match tokio::time::timeout_at(deadline, stream.message()).await {
            Ok(message) => message,
            Err(_) => bail!(
                "the watch reached revision {:?}, not {revision}, within {DELIVERY:?}",
                out.last().map(|e| e.revision)
            ),
        };
        let response = match message {
            Ok(Some(response)) => response,
            Ok(None) => return Ok(Read::Ended("the stream ended".into())),
            Err(error) => return Ok(Read::Ended(format!("the stream failed: {error}"))),
        };
        if response.canceled() {
            return Ok(Read::Ended(format!(
                "the watch was canceled: {}",
                response.cancel_reason()
            )));
        }
        for event in response.events() {
            let kv = event.kv().context("an event without kv")?;
            out.push(Ev {
                revision: kv.mod_revision(),
                put: event.event_type() == EventType::Put,
                key: String::from_utf8_lossy(kv.key()).into_owned(),
                value: String::from_utf8_lossy(kv.value()).into_owned(),
            });
        }
    }
}

/// Checks that `events` hold every revision `first..=last`, in order, each revision's events
/// together and none repeated; returns them grouped by revision.
fn gapless(events: &[Ev], first: i64, last: i64) -> Result<BTreeMap<i64, Vec<Ev>>> {
    let mut by_revision: BTreeMap<i64, Vec<Ev>> = BTreeMap::new();
    let mut previous = first - 1;
    for event in events {
        ensure!(
            event.revision >= previous,
            "revision {} after {previous}: out of order",
            event.revision
        );
        if event.revision != previous {
            ensure!(
                !by_revision.contains_key(&event.revision),
                "revision {} delivered twice",
                event.revision
            );
        }
        let group = by_revision.entry(event.revision).or_default();
        ensure!(
            !group.iter().any(|e| e.key == event.key),
            "event {event:?} repeated"
        );
        group.push(event.clone());
        previous = event.revision;
    }
    let revisions: Vec<i64> = by_revision.keys().copied().collect();
    let expected: Vec<i64> = (first..=last).collect();
    if revisions != expected {
        let missing: Vec<i64> = expected
            .iter()
            .filter(|r| !by_revision.contains_key(r))
            .copied()
            .collect();
        bail!(
            "revisions {first}..={last} expected; missing {missing:?}, extra {:?}",
            revisions
                .iter()
                .filter(|r| **r < first || **r > last)
                .collect::<Vec<_>>()
        );
    }
    Ok(by_revision)
}

// ---------------------------------------------------------------------------------------
// kill -9 under write load
// ---------------------------------------------------------------------------------------

/// Concurrent writer tasks.
const WRITERS: usize = 8;
/// Acknowledged transactions to wait for before the kill.
const ACKNOWLEDGED_BEFORE_KILL: usize = 300;

/// Each transaction writes `f/a/<id>` and `f/b/<id>` with value `<id>`, at one revision.
async fn kill_9_under_write_load(backend: Backend) -> Result<()> {
    let database = TestDatabase::new(backend).context("a database server backend")?;
    let (mut kine, client) = start(&database.endpoint).await?;

    // (id, revision) of every acknowledged transaction.
    let acknowledged: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let mut client = client.clone();
        let acknowledged = acknowledged.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                let id = format!("{writer}-{i:05}");
                let txn = Txn::new().and_then(vec![
                    TxnOp::put(format!("f/a/{id}"), id.as_str(), None),
                    TxnOp::put(format!("f/b/{id}"), id.as_str(), None),
                ]);
                match tokio::time::timeout(Duration::from_secs(10), client.txn(txn)).await {
                    Ok(Ok(response)) => {
                        let revision = response.header().map_or(0, |h| h.revision());
                        acknowledged.lock().expect("lock").push((id, revision));
                    }
                    // The kill landed: this one is not acknowledged.
                    Ok(Err(_)) | Err(_) => return,
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while acknowledged.lock().expect("lock").len() < ACKNOWLEDGED_BEFORE_KILL {
        ensure!(
            Instant::now() < deadline,
            "only {} transactions acknowledged within 120s",
            acknowledged.lock().expect("lock").len()
        );
        ensure!(
            !tasks.iter().all(|t| t.is_finished()),
            "every writer stopped before the kill"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // SIGKILL while the writers are still sending.
    kine = tokio::task::spawn_blocking(move || {
        kine.kill();
        kine
    })
    .await?;
    for task in tasks {
        task.await?;
    }
    drop(kine);
    let acknowledged = acknowledged.lock().expect("lock").clone();

    let (_kine, mut client) = start(&database.endpoint).await?;
    let current = current_revision(&mut client).await?;
    let mut stream = watch_from(&mut client, 1).await?;
    let mut events = Vec::new();
    match read_until(&mut stream, current, &mut events).await? {
        Read::Reached => {}
        Read::Ended(why) => bail!("the history watch ended: {why}"),
    }
    // Every revision 2..=current, each one whole transaction: f/a/<id> and f/b/<id>.
    let by_revision = gapless(&events, 2, current)?;
    let mut applied: BTreeMap<String, i64> = BTreeMap::new();
    for (revision, group) in &by_revision {
        let mut keys: Vec<&str> = group.iter().map(|e| e.key.as_str()).collect();
        keys.sort_unstable();
        let id = group[0].value.clone();
        ensure!(
            group.iter().all(|e| e.put && e.value == id)
                && keys == [format!("f/a/{id}"), format!("f/b/{id}")],
            "revision {revision} is not one whole transaction: {group:?}"
        );
        applied.insert(id, *revision);
    }
    for (id, revision) in &acknowledged {
        ensure!(
            applied.get(id) == Some(revision),
            "acknowledged transaction {id} at revision {revision} was lost (applied at {:?})",
            applied.get(id)
        );
    }
    // At most one transaction per writer was in flight when the kill landed.
    ensure!(
        applied.len() <= acknowledged.len() + WRITERS,
        "{} transactions applied, {} acknowledged, {WRITERS} writers",
        applied.len(),
        acknowledged.len()
    );
    // The current state agrees: both halves of each transaction, nothing else.
    let all = client
        .get("f/", Some(etcd_client::GetOptions::new().with_prefix()))
        .await?;
    let mut halves: BTreeMap<String, BTreeSet<char>> = BTreeMap::new();
    for kv in all.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let (half, id) = key
            .strip_prefix("f/")
            .and_then(|k| k.split_once('/'))
            .context("unexpected key")?;
        ensure!(
            applied.get(id) == Some(&kv.mod_revision()),
            "{key} at {} is not in the history",
            kv.mod_revision()
        );
        halves
            .entry(id.to_string())
            .or_default()
            .insert(half.chars().next().unwrap_or('?'));
    }
    ensure!(halves.len() == applied.len(), "keys and history disagree");
    ensure!(
        halves.values().all(|h| h.len() == 2),
        "a half-applied transaction"
    );
    // And the restarted process writes on from there.
    let next = client.put("f/after", "x", None).await?;
    ensure!(
        next.header().context("header")?.revision() == current + 1,
        "the first write after the restart is not revision {}",
        current + 1
    );
    eprintln!(
        "{backend:?}: {} acknowledged, {} applied, current revision {current}",
        acknowledged.len(),
        applied.len()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The database restarts
// ---------------------------------------------------------------------------------------

/// A database server of the test's own that can be stopped and started again.
enum PrivateServer {
    Postgres(PrivatePostgres),
    Mariadb(PrivateMariadb),
    Nats(PrivateNats),
}

impl PrivateServer {
    fn start(backend: Backend) -> PrivateServer {
        match backend {
            Backend::Postgres => PrivateServer::Postgres(PrivatePostgres::start()),
            Backend::Mysql => PrivateServer::Mariadb(PrivateMariadb::start()),
            Backend::Nats => PrivateServer::Nats(PrivateNats::start()),
            other => panic!("{other:?} has no database server"),
        }
    }

    fn url(&self) -> String {
        match self {
            PrivateServer::Postgres(server) => server.url("kine"),
            PrivateServer::Mariadb(server) => server.url("kine"),
            PrivateServer::Nats(server) => server.url("kine"),
        }
    }

    /// Stops the server: a clean shutdown or a crash.
    fn stop(&mut self, crash: bool) {
        match self {
            PrivateServer::Postgres(server) => {
                server.stop(if crash { "immediate" } else { "fast" })
            }
            PrivateServer::Mariadb(server) => server.stop(crash),
            PrivateServer::Nats(server) => server.stop(crash),
        }
    }

    fn resume(&mut self) {
        match self {
            PrivateServer::Postgres(server) => server.resume(),
            PrivateServer::Mariadb(server) => server.resume(),
            PrivateServer::Nats(server) => server.resume(),
        }
    }
}

/// Runs `work` on a blocking thread with the server, and gives the server back.
async fn with_server(
    server: PrivateServer,
    work: impl FnOnce(&mut PrivateServer) + Send + 'static,
) -> Result<PrivateServer> {
    Ok(tokio::task::spawn_blocking(move || {
        let mut server = server;
        work(&mut server);
        server
    })
    .await?)
}

/// Checks that a request made while the database is down fails with `Unavailable` within
/// [`UNAVAILABLE_BOUND`].
async fn expect_unavailable<T: std::fmt::Debug>(
    what: &str,
    request: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<()> {
    let started = Instant::now();
    let outcome = tokio::time::timeout(UNAVAILABLE_BOUND, request)
        .await
        .with_context(|| {
            format!("{what} hung for {UNAVAILABLE_BOUND:?} while the database was down")
        })?;
    match outcome {
        Ok(answer) => bail!("{what} succeeded while the database was down: {answer:?}"),
        Err(error) => ensure!(
            code_of(&error) == Some(tonic::Code::Unavailable),
            "{what} failed with {error} ({:?}), not Unavailable",
            code_of(&error)
        ),
    }
    eprintln!(
        "{what} failed with Unavailable after {:?}",
        started.elapsed()
    );
    Ok(())
}

async fn database_restart(backend: Backend, crash: bool) -> Result<()> {
    let server = tokio::task::spawn_blocking(move || PrivateServer::start(backend)).await?;
    let endpoint = server.url();
    let (_kine, mut client) = start(&endpoint).await?;

    let mut acknowledged: BTreeMap<i64, (String, String)> = BTreeMap::new();
    for i in 0..10 {
        let key = format!("f/before/{i}");
        let response = client.put(key.as_str(), "v", None).await?;
        acknowledged.insert(
            response.header().context("header")?.revision(),
            (key, "v".into()),
        );
    }
    let first = 2;
    let mut stream = watch_from(&mut client, first).await?;
    let mut seen = Vec::new();
    let before = *acknowledged.keys().last().context("writes")?;
    match read_until(&mut stream, before, &mut seen).await? {
        Read::Reached => {}
        Read::Ended(why) => bail!("the watch ended before the restart: {why}"),
    }

    let mut server = with_server(server, move |s| s.stop(crash)).await?;
    // While it is down: writes, reads and new watches fail with Unavailable, in bounded time.
    for i in 0..3 {
        let mut writer = client.clone();
        expect_unavailable(&format!("put #{i}"), async move {
            writer.put(format!("f/down/{i}"), "lost", None).await
        })
        .await?;
    }
    let mut reader = client.clone();
    expect_unavailable("get", async move { reader.get("f/before/1", None).await }).await?;
    let mut ranger = client.clone();
    expect_unavailable("range", async move {
        ranger
            .get("f/", Some(etcd_client::GetOptions::new().with_prefix()))
            .await
    })
    .await?;

    server = with_server(server, PrivateServer::resume).await?;
    // It recovers by itself: the first write that succeeds (no restart of kine-rs).
    let deadline = Instant::now() + RECOVERY;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let key = format!("f/after/{attempt}");
        match tokio::time::timeout(Duration::from_secs(10), client.put(key.as_str(), "v", None))
            .await
        {
            Ok(Ok(response)) => {
                acknowledged.insert(
                    response.header().context("header")?.revision(),
                    (key, "v".into()),
                );
                break;
            }
            Ok(Err(error)) => ensure!(
                code_of(&error) == Some(tonic::Code::Unavailable),
                "a write while recovering failed with {error}, not Unavailable"
            ),
            Err(_) => {}
        }
        ensure!(
            Instant::now() < deadline,
            "kine-rs did not recover within {RECOVERY:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 0..10 {
        let key = format!("f/later/{i}");
        let response = client.put(key.as_str(), "v", None).await?;
        acknowledged.insert(
            response.header().context("header")?.revision(),
            (key, "v".into()),
        );
    }
    let current = current_revision(&mut client).await?;

    // The watch opened before the restart goes on: nothing lost, nothing repeated.
    let outcome = read_until(&mut stream, current, &mut seen).await?;
    if let Read::Ended(why) = &outcome {
        bail!("the watch stream opened before the restart did not continue: {why}");
    }
    // The history, read afresh, is exactly what the open stream delivered.
    let mut history = Vec::new();
    let mut fresh = watch_from(&mut client, first).await?;
    match read_until(&mut fresh, current, &mut history).await? {
        Read::Reached => {}
        Read::Ended(why) => bail!("a watch after recovery ended: {why}"),
    }
    ensure!(
        seen == history,
        "the stream across the restart differs from the history:\n{seen:?}\n{history:?}"
    );
    let by_revision = gapless(&seen, first, current)?;
    for (revision, (key, value)) in &acknowledged {
        let group = by_revision
            .get(revision)
            .with_context(|| format!("acknowledged {key} at {revision} is missing"))?;
        ensure!(
            group.len() == 1 && group[0].key == *key && group[0].value == *value,
            "revision {revision}: {group:?}, acknowledged {key}"
        );
    }
    // Writes attempted while the database was down were not applied.
    ensure!(
        !seen.iter().any(|e| e.key.starts_with("f/down/")),
        "a write that failed while the database was down was applied"
    );
    drop(server);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Connections dropped mid-watch
// ---------------------------------------------------------------------------------------

/// Drops every connection to `database` (both kine-rs processes' pools and PostgreSQL's
/// LISTEN connection) from the server side; returns how many were dropped.
fn drop_connections(backend: Backend, database: &TestDatabase) -> usize {
    match backend {
        Backend::Postgres => {
            let output = Command::new("psql")
                .arg(&database.endpoint)
                .args([
                    "-X",
                    "-q",
                    "-A",
                    "-t",
                    "-c",
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) \
                     FROM pg_stat_activity \
                     WHERE datname = current_database() AND pid <> pg_backend_pid()",
                ])
                .stdin(Stdio::null())
                .output()
                .expect("run psql");
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
            String::from_utf8_lossy(&output.stdout)
                .trim()
                .parse()
                .unwrap_or(0)
        }
        Backend::Mysql => {
            let (args, name) = mysql_args(&database.endpoint);
            let list = Command::new("mysql")
                .args(&args)
                .args(["-N", "-B", "-e"])
                .arg(format!(
                    "SELECT id FROM information_schema.processlist \
                     WHERE db = '{name}' AND id <> CONNECTION_ID()"
                ))
                .stdin(Stdio::null())
                .output()
                .expect("run mysql");
            assert!(
                list.status.success(),
                "{}",
                String::from_utf8_lossy(&list.stderr)
            );
            let ids: Vec<String> = String::from_utf8_lossy(&list.stdout)
                .split_whitespace()
                .map(str::to_string)
                .collect();
            if ids.is_empty() {
                return 0;
            }
            let kills: String = ids.iter().map(|id| format!("KILL {id};")).collect();
            // --force: a connection may have gone by itself between the list and its KILL.
            let _ = Command::new("mysql")
                .args(&args)
                .args(["--force", "-e", &kills])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            ids.len()
        }
        other => panic!("{other:?} has no database server"),
    }
}

/// `mysql` client arguments and the database name of a `mysql://user@host:port/db` URL.
fn mysql_args(url: &str) -> (Vec<String>, String) {
    let args = kine_tests::mysql_client_args(url).expect("a mysql:// URL");
    let rest = url.strip_prefix("mysql://").expect("a mysql:// URL");
    let (_, path) = rest.split_once('/').expect("a database in the URL");
    let name = path.split('?').next().unwrap_or(path).to_string();
    (args, name)
}

/// Concurrent writers through process A while connections are dropped.
const DROP_WRITERS: usize = 4;
/// Puts each of them writes.
const PUTS: usize = 100;
/// Times every connection is dropped while they are written.
const DROPS: usize = 10;

async fn dropped_connections_mid_watch(backend: Backend) -> Result<()> {
    let database = Arc::new(TestDatabase::new(backend).context("a database server backend")?);
    let (_a, mut client_a) = start(&database.endpoint).await?;
    let (_b, mut client_b) = start(&database.endpoint).await?;
    // A watcher on the writing process and one on the other (fed by LISTEN or polling).
    let mut stream_a = watch_from(&mut client_a, 1).await?;
    let mut stream_b = watch_from(&mut client_b, 1).await?;

    let mut writers = Vec::new();
    for writer in 0..DROP_WRITERS {
        let mut client = client_a.clone();
        writers.push(tokio::spawn(async move {
            let mut acknowledged: BTreeMap<i64, (String, String)> = BTreeMap::new();
            let mut failures = Vec::new();
            for i in 0..PUTS {
                let key = format!("f/{writer}/{i:04}");
                for attempt in 0.. {
                    let value = format!("{i}-{attempt}");
                    let request = client.put(key.as_str(), value.as_str(), None);
                    match tokio::time::timeout(Duration::from_secs(20), request).await {
                        Ok(Ok(response)) => {
                            let revision = response.header().context("header")?.revision();
                            acknowledged.insert(revision, (key.clone(), value));
                            break;
                        }
                        Ok(Err(error)) => {
                            failures.push(format!("{:?}: {error}", code_of(&error)));
                            ensure!(attempt < 50, "put {key} keeps failing: {failures:?}");
                        }
                        Err(_) => bail!("put {key} hung for 20s"),
                    }
                }
            }
            anyhow::Ok((acknowledged, failures))
        }));
    }
    let mut dropped = 0;
    for _ in 0..DROPS {
        // Pacing, not a timing assertion: let some writes land between the drops.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let database = database.clone();
        dropped +=
            tokio::task::spawn_blocking(move || drop_connections(backend, &database)).await?;
        if writers.iter().all(|w| w.is_finished()) {
            break;
        }
    }
    let mut acknowledged = BTreeMap::new();
    let mut failures = Vec::new();
    for writer in writers {
        let (mine, failed) = writer.await??;
        let count = mine.len();
        acknowledged.extend(mine);
        ensure!(count == PUTS, "a writer lost acknowledgements");
        failures.extend(failed);
    }
    ensure!(
        acknowledged.len() == DROP_WRITERS * PUTS,
        "two writes acknowledged at one revision"
    );
    ensure!(dropped > 0, "no connection was dropped");
    // A dropped connection fails the requests on it with Unavailable, nothing else.
    ensure!(
        failures.iter().all(|f| f.starts_with("Some(Unavailable)")),
        "writes failed otherwise than Unavailable: {failures:?}"
    );
    let current = current_revision(&mut client_a).await?;

    let mut streams = Vec::new();
    for (name, stream, client) in [
        ("A", &mut stream_a, &mut client_a),
        ("B", &mut stream_b, &mut client_b),
    ] {
        let mut seen = Vec::new();
        let mut resumed = 0;
        loop {
            match read_until(stream, current, &mut seen).await? {
                Read::Reached => break,
                Read::Ended(why) => {
                    // The client resumes after the last revision it saw.
                    resumed += 1;
                    ensure!(resumed < 10, "process {name}'s watch keeps ending: {why}");
                    eprintln!("process {name}'s watch ended ({why}); resuming");
                    let next = seen.last().map_or(1, |e: &Ev| e.revision + 1);
                    *stream = watch_from(client, next).await?;
                }
            }
        }
        let by_revision =
            gapless(&seen, 2, current).with_context(|| format!("process {name}'s watch"))?;
        for (revision, (key, value)) in &acknowledged {
            let group = by_revision.get(revision).context("gapless")?;
            ensure!(
                group.len() == 1 && group[0].key == *key && group[0].value == *value,
                "process {name}: revision {revision} is {group:?}, acknowledged {key}={value}"
            );
        }
        eprintln!(
            "{backend:?}: process {name}'s watch: {} events, resumed {resumed} times",
            seen.len()
        );
        streams.push(seen);
    }
    ensure!(
        streams[0] == streams[1],
        "the two processes' watch streams differ"
    );
    eprintln!(
        "{backend:?}: {dropped} connections dropped, {} writes failed and were retried",
        failures.len()
    );
    Ok(())
}

/// A database error reaches the client as `Internal` with kine-rs's fixed message; the
/// driver's text (SQL, table names) goes to the log only.
async fn database_error_without_the_drivers_text() -> Result<()> {
    let database = TestDatabase::new(Backend::Postgres).context("a PostgreSQL database")?;
    let endpoint = database.endpoint.clone();
    let (kine, log) = tokio::task::spawn_blocking(move || {
        let dir = tempfile::tempdir().expect("tempdir");
        kine_tests::spawn_kine_logged(&endpoint, dir, &["--compact-interval", "0"])
    })
    .await?;
    let address = format!("http://{}", kine.address);
    let mut client = Client::connect([address.as_str()], None).await?;
    client.put("before", "v", None).await?;

    // The key-value table goes: every read and write fails in the database.
    let output = Command::new("psql")
        .arg(&database.endpoint)
        .args(["-X", "-q", "-c", "DROP TABLE kv CASCADE"])
        .stdin(Stdio::null())
        .output()?;
    ensure!(
        output.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let failures = [
        ("a read", client.get("before", None).await.map(|_| ())),
        ("a write", client.put("after", "v", None).await.map(|_| ())),
    ];
    for (what, outcome) in failures {
        let Err(etcd_client::Error::GRpcStatus(status)) = outcome else {
            bail!("{what} on a dropped table answered {outcome:?}");
        };
        ensure!(status.code() == tonic::Code::Internal, "{what}: {status:?}");
        ensure!(
            status.message() == "kine-rs: datastore error",
            "{what}: the client got the driver's text: {:?}",
            status.message()
        );
    }
    // The operator still learns what failed.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("relation \"kv\" does not exist") {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the log does not name the failure:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_database_error_reaches_the_client_without_the_drivers_text() {
    run("postgres", database_error_without_the_drivers_text()).await;
}

/// Runs `sql` in `database` with psql; its output.
fn psql(database: &TestDatabase, sql: &str) -> Result<String> {
    let output = Command::new("psql")
        .arg(&database.endpoint)
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .stdin(Stdio::null())
        .output()?;
    ensure!(
        output.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// Rows of history a compaction at `revision` leaves to purge: rows with a newer row of
/// their key at or before it, and tombstones below it.
fn unpurged(database: &TestDatabase, revision: i64) -> Result<i64> {
    Ok(psql(
        database,
        &format!(
            "SELECT count(*) FROM kv o WHERE EXISTS (SELECT 1 FROM kv n \
             WHERE n.keyspace = o.keyspace AND n.key = o.key \
             AND n.mod_revision > o.mod_revision AND n.mod_revision <= {revision}) \
             OR (o.deleted = 1 AND o.mod_revision < {revision})"
        ),
    )?
    .parse()?)
}

/// A physical Compact answers once the compacted rows are gone, and fails when purging them
/// fails (here: a trigger refuses every DELETE on the key-value table).
async fn physical_compaction_waits_for_the_purge() -> Result<()> {
    let database = TestDatabase::new(Backend::Postgres).context("a PostgreSQL database")?;
    let (_kine, mut client) = start(&database.endpoint).await?;
    let physical = || Some(etcd_client::CompactionOptions::new().with_physical());
    let mut last = 0;
    for i in 0..8 {
        last = client
            .put("history", format!("v{i}"), None)
            .await?
            .header()
            .context("header")?
            .revision();
    }
    // The first compaction is at a delete's revision: its tombstone outlives it (etcd
    // keeps a compaction revision's own events), and the last compaction must purge it.
    client.put("gone", "1", None).await?;
    let first_compaction = client
        .delete("gone", None)
        .await?
        .header()
        .context("header")?
        .revision();
    ensure!(
        unpurged(&database, first_compaction)? > 0,
        "no history to purge"
    );
    client.compact(first_compaction, physical()).await?;
    ensure!(
        unpurged(&database, first_compaction)? == 0,
        "a physical compaction answered before its rows were purged"
    );

    psql(
        &database,
        "CREATE FUNCTION refuse_delete() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'the test refuses deletes'; END $$; \
         CREATE TRIGGER refuse_delete BEFORE DELETE ON kv \
         FOR EACH ROW EXECUTE FUNCTION refuse_delete();",
    )?;
    for i in 0..4 {
        last = client
            .put("history", format!("w{i}"), None)
            .await?
            .header()
            .context("header")?
            .revision();
    }
    let second_compaction = last - 1;
    match client.compact(second_compaction, physical()).await {
        Err(etcd_client::Error::GRpcStatus(status)) => ensure!(
            status.code() == tonic::Code::Internal
                && status.message() == "kine-rs: datastore error",
            "a failed purge answered {status:?}"
        ),
        other => bail!("a physical compaction whose purge failed answered {other:?}"),
    }
    ensure!(
        unpurged(&database, second_compaction)? > 0,
        "the trigger let rows go"
    );

    // Once deletes work again, the next physical compaction purges everything.
    psql(&database, "DROP TRIGGER refuse_delete ON kv")?;
    client.compact(last, physical()).await?;
    ensure!(unpurged(&database, last)? == 0, "rows left after the purge");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_physical_compaction_waits_for_the_purge() {
    run("postgres", physical_compaction_waits_for_the_purge()).await;
}

async fn run(name: &str, test: impl std::future::Future<Output = Result<()>>) {
    match tokio::time::timeout(Duration::from_secs(300), test).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => panic!("{name}: {error:#}"),
        Err(_) => panic!("{name}: timed out"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_kill_9_under_write_load() {
    run("postgres", kill_9_under_write_load(Backend::Postgres)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_kill_9_under_write_load() {
    run("mysql", kill_9_under_write_load(Backend::Mysql)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_clean_restart() {
    run("postgres", database_restart(Backend::Postgres, false)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_crash_restart() {
    run("postgres", database_restart(Backend::Postgres, true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_clean_restart() {
    run("mysql", database_restart(Backend::Mysql, false)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_crash_restart() {
    run("mysql", database_restart(Backend::Mysql, true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_dropped_connections_mid_watch() {
    run("postgres", dropped_connections_mid_watch(Backend::Postgres)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_dropped_connections_mid_watch() {
    run("mysql", dropped_connections_mid_watch(Backend::Mysql)).await;
}

/// gRPC health and `/readyz` follow the datastore: SERVING while it answers, NOT_SERVING
/// within a few seconds of it going away, SERVING again once it is back (no restart).
async fn health_follows_the_datastore() -> Result<()> {
    let server = tokio::task::spawn_blocking(|| PrivateServer::start(Backend::Postgres)).await?;
    let endpoint = server.url();
    let metrics = format!("127.0.0.1:{}", kine_tests::free_port());
    let guard = {
        let metrics = metrics.clone();
        tokio::task::spawn_blocking(move || {
            spawn_kine_on(
                &endpoint,
                tempfile::tempdir().expect("tempdir"),
                &["--metrics-bind-address", &metrics],
            )
        })
        .await?
    };
    let channel = tonic::transport::Endpoint::from_shared(guard.endpoint.clone())?
        .connect()
        .await?;
    let health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = || {
        let mut health = health.clone();
        async move {
            let response = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await?;
            anyhow::Ok(response.into_inner().status)
        }
    };
    let readyz = |metrics: String| async move {
        tokio::task::spawn_blocking(move || {
            let response = kine_tests::http_get(&metrics, "/readyz")?;
            anyhow::Ok(response.lines().next().unwrap_or_default().to_string())
        })
        .await?
    };
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    let wait_for = |want: i32| async move {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if status().await? == want {
                return anyhow::Ok(());
            }
            ensure!(Instant::now() < deadline, "health never became {want}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    wait_for(serving).await?;
    ensure!(readyz(metrics.clone()).await?.contains("200"));
    let server = with_server(server, |s| s.stop(false)).await?;
    wait_for(not_serving).await?;
    let line = readyz(metrics.clone()).await?;
    ensure!(
        line.contains("503"),
        "readyz while the database is down: {line}"
    );
    let _server = with_server(server, PrivateServer::resume).await?;
    wait_for(serving).await?;
    ensure!(readyz(metrics.clone()).await?.contains("200"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_health_follows_the_datastore() {
    run("postgres", health_follows_the_datastore()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_kill_9_under_write_load() {
    run("nats", kill_9_under_write_load(Backend::Nats)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_clean_restart() {
    run("nats", database_restart(Backend::Nats, false)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_crash_restart() {
    run("nats", database_restart(Backend::Nats, true)).await;
}
