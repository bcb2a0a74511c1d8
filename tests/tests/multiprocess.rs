//! Several kine-rs processes on one database (DESIGN.md invariant 2): two processes share a
//! fresh PostgreSQL (or MySQL) database or NATS bucket, clients write through both at once, and a watcher on
//! each process, from revision 1, must see the identical stream: gapless, in order, every
//! acknowledged write exactly once. A lease granted through one process expires once (one
//! DELETE), although both processes look for expired leases.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use etcd_client::{
    Client, Compare, CompareOp, EventType, LeaseGrantOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use kine_tests::conformance::{Seen, collect_events, expect_quiet, watch};
use kine_tests::{Backend, ChildGuard, TestDatabase, serve_and_connect};

/// Writer tasks per process.
const WRITERS: usize = 4;
/// Puts per writer task.
const PUTS: usize = 40;
/// Writer tasks per process when more requests than one batch holds (256) queue while a
/// batch is in flight, so each process sends batches on top of its batch in flight (NATS),
/// and commit races with the other process hit batches computed on top of one that loses.
const BUSY_WRITERS: usize = 320;
/// Puts per busy writer task.
const BUSY_PUTS: usize = 3;

async fn start(endpoint: String) -> Result<(ChildGuard, Client)> {
    serve_and_connect(&endpoint, &[]).await
}

async fn two_processes_one_database(backend: Backend, writers: usize, puts: usize) -> Result<()> {
    let database = TestDatabase::new(backend).context("a database server backend")?;
    // The first process creates the database and its schema; the second finds them.
    let (_a, mut client_a) = start(database.endpoint.clone()).await?;
    let (_b, mut client_b) = start(database.endpoint.clone()).await?;

    let from_start = || Some(WatchOptions::new().with_prefix().with_start_revision(1));
    let (mut stream_a, _) = watch(&mut client_a, "mp/", from_start()).await?;
    let (mut stream_b, _) = watch(&mut client_b, "mp/", from_start()).await?;

    // A lease through A, with a key through B; it expires while the writes go on.
    let lease = client_a.lease_grant(2, None).await?.id();
    let lease_put = client_b
        .put("mp/leased", "x", Some(PutOptions::new().with_lease(lease)))
        .await?;
    let mut acknowledged = vec![(
        "mp/leased".to_string(),
        "x".to_string(),
        lease_put.header().context("header")?.revision(),
    )];

    let mut tasks = Vec::new();
    for (process, client) in [("a", &client_a), ("b", &client_b)] {
        for writer in 0..writers {
            let mut client = client.clone();
            tasks.push(tokio::spawn(async move {
                let mut written = Vec::new();
                for i in 0..puts {
                    let key = format!("mp/{process}/{writer}/{}", i % 7);
                    let value = format!("{process}-{writer}-{i}");
                    let response = client.put(key.as_str(), value.as_str(), None).await?;
                    let revision = response.header().context("header")?.revision();
                    written.push((key, value, revision));
                }
                anyhow::Ok(written)
            }));
        }
    }
    for task in tasks {
        acknowledged.extend(task.await??);
    }
    let writes = acknowledged.len();

    // Every write, then the lease's expiry: one DELETE.
    let events_a = collect_events(&mut stream_a, writes + 1).await?;
    let events_b = collect_events(&mut stream_b, writes + 1).await?;
    let summary = |events: &[Seen]| -> Vec<(i64, EventType, String, String)> {
        events
            .iter()
            .map(|e| (e.revision, e.kind, e.key.clone(), e.value.clone()))
            .collect()
    };
    ensure!(
        summary(&events_a) == summary(&events_b),
        "the two processes' watch streams differ"
    );

    // Gapless and in order: one event per revision (every write is one put), from the
    // first write on.
    let first = events_a.first().context("no events")?.revision;
    for (i, event) in events_a.iter().enumerate() {
        ensure!(
            event.revision == first + i as i64,
            "revision {} at position {i}, expected {}",
            event.revision,
            first + i as i64
        );
    }
    ensure!(
        first == 2,
        "the first write of a fresh keyspace is revision 2"
    );

    // Each acknowledged write exactly once, at the revision it was acknowledged with.
    let mut puts: BTreeMap<i64, (String, String)> = BTreeMap::new();
    for event in events_a.iter().filter(|e| e.kind == EventType::Put) {
        ensure!(
            puts.insert(event.revision, (event.key.clone(), event.value.clone()))
                .is_none(),
            "revision {} seen twice",
            event.revision
        );
    }
    ensure!(
        puts.len() == writes,
        "{} puts for {writes} writes",
        puts.len()
    );
    for (key, value, revision) in &acknowledged {
        ensure!(
            puts.get(revision) == Some(&(key.clone(), value.clone())),
            "acknowledged write {key}={value} at {revision} is not in the stream"
        );
    }

    let deletes: Vec<&Seen> = events_a
        .iter()
        .filter(|e| e.kind == EventType::Delete)
        .collect();
    ensure!(
        deletes.len() == 1 && deletes[0].key == "mp/leased",
        "the lease expires once: {deletes:?}"
    );
    // No second expiry from the other process, and nothing else.
    expect_quiet(&mut stream_a, Duration::from_secs(2)).await?;
    expect_quiet(&mut stream_b, Duration::from_millis(200)).await?;
    let last = events_a.last().context("no events")?.revision;
    for client in [&mut client_a, &mut client_b] {
        let revision = client
            .get("mp/", None)
            .await?
            .header()
            .context("header")?
            .revision();
        ensure!(
            revision == last,
            "current revision {revision}, last event {last}"
        );
    }
    Ok(())
}

/// Grants through `client` with a kine-rs-chosen id.
async fn grant(client: &mut Client) -> Result<i64> {
    let id = client.lease_grant(60, None).await?.id();
    ensure!(id > 0, "lease id {id} is not positive");
    Ok(id)
}

/// Lease ids increase like etcd's: every new id of a keyspace is larger than every earlier
/// one, whichever of two processes on one database grants it, also after the newest lease was
/// revoked; a client-chosen id still works; Txn compares of lease ids agree with that order.
async fn lease_ids_increase_across_processes(backend: Backend) -> Result<()> {
    let database = TestDatabase::new(backend).context("a database server backend")?;
    let (_a, mut client_a) = start(database.endpoint.clone()).await?;
    let (_b, mut client_b) = start(database.endpoint.clone()).await?;

    let mut ids = Vec::new();
    for i in 0..60 {
        let client = if i % 3 == 0 {
            &mut client_b
        } else {
            &mut client_a
        };
        ids.push(grant(client).await?);
        if i % 10 == 9 {
            // The newest lease goes: its id is not handed out again.
            let newest = *ids.last().context("ids")?;
            client.lease_revoke(newest).await?;
        }
    }
    // Concurrent grants through both processes, each ordered after every earlier one.
    let mut tasks = Vec::new();
    for client in [&client_a, &client_b] {
        for _ in 0..4 {
            let mut client = client.clone();
            tasks.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                for _ in 0..10 {
                    ids.push(grant(&mut client).await?);
                }
                anyhow::Ok(ids)
            }));
        }
    }
    let before = *ids.last().context("ids")?;
    let mut concurrent = Vec::new();
    for task in tasks {
        let mine = task.await??;
        ensure!(
            mine.windows(2).all(|w| w[0] < w[1]),
            "one client's ids do not increase: {mine:?}"
        );
        concurrent.extend(mine);
    }
    ensure!(
        concurrent.iter().all(|id| *id > before),
        "a concurrent grant's id is not above the earlier ones ({before}): {concurrent:?}"
    );
    let distinct: std::collections::BTreeSet<i64> = concurrent.iter().copied().collect();
    ensure!(distinct.len() == concurrent.len(), "an id was given twice");
    ids.push(*distinct.last().context("ids")?);
    ids.push(grant(&mut client_b).await?);
    ensure!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "lease ids do not increase: {ids:?}"
    );

    // A client-chosen id works as before, and does not stop ids from increasing.
    let chosen = 4242;
    let granted = client_a
        .lease_grant(60, Some(LeaseGrantOptions::new().with_id(chosen)))
        .await?
        .id();
    ensure!(granted == chosen, "asked for lease {chosen}, got {granted}");
    let after = grant(&mut client_a).await?;
    ensure!(after > *ids.last().context("ids")?, "{after} after {ids:?}");

    // Txn compares of lease ids answer in the same order, on either process.
    let (older, newer) = (ids[0], after);
    client_a
        .put(
            "lease/older",
            "x",
            Some(PutOptions::new().with_lease(older)),
        )
        .await?;
    client_b
        .put(
            "lease/newer",
            "x",
            Some(PutOptions::new().with_lease(newer)),
        )
        .await?;
    for (client, name) in [(&mut client_a, "a"), (&mut client_b, "b")] {
        for (key, op, lease, expected) in [
            ("lease/older", CompareOp::Less, newer, true),
            ("lease/older", CompareOp::Greater, newer, false),
            ("lease/newer", CompareOp::Greater, older, true),
            ("lease/newer", CompareOp::Less, older, false),
        ] {
            let response = client
                .txn(
                    Txn::new()
                        .when([Compare::lease(key, op, lease)])
                        .and_then([TxnOp::get(key, None)]),
                )
                .await?;
            ensure!(
                response.succeeded() == expected,
                "process {name}: lease of {key} {op:?} {lease} answered {}",
                response.succeeded()
            );
        }
    }
    Ok(())
}

/// Runs one scenario against `backend` for at most two minutes; panics with its error.
async fn bounded(backend: Backend, scenario: impl Future<Output = Result<()>>) {
    match tokio::time::timeout(Duration::from_secs(120), scenario).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{backend:?}: {e:#}"),
        Err(_) => panic!("{backend:?}: timed out"),
    }
}

async fn run_leases(backend: Backend) {
    bounded(backend, lease_ids_increase_across_processes(backend)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_lease_ids_increase_across_processes() {
    run_leases(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_lease_ids_increase_across_processes() {
    run_leases(Backend::Mysql).await;
}

async fn run(backend: Backend) {
    run_with(backend, WRITERS, PUTS).await;
}

async fn run_with(backend: Backend, writers: usize, puts: usize) {
    bounded(backend, two_processes_one_database(backend, writers, puts)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_two_processes_one_database() {
    run(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_two_processes_one_database() {
    run(Backend::Mysql).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_two_processes_one_database() {
    run(Backend::Nats).await;
}

/// Compare-and-swap increments per writer task in [`increments_across_processes`].
const INCREMENTS: usize = 30;
/// The keys those increments share.
const COUNTERS: usize = 3;

/// kube-apiserver's update from two processes at once on the same few keys: read a counter,
/// then put its value + 1 only if its mod revision is unchanged, retried on a failed compare.
/// Every acknowledged increment must count exactly once (a write decided on a stale read
/// would lose one), and each key's version must equal its increments. On PostgreSQL a write
/// batch reads without the keyspace lock and commits with one call that refuses a keyspace
/// changed since the read; these clients make it refuse often.
async fn increments_across_processes(backend: Backend) -> Result<()> {
    let database = TestDatabase::new(backend).context("a database server backend")?;
    let (_a, client_a) = start(database.endpoint.clone()).await?;
    let (_b, client_b) = start(database.endpoint.clone()).await?;
    let mut tasks = Vec::new();
    for client in [&client_a, &client_b] {
        for writer in 0..WRITERS {
            let mut client = client.clone();
            tasks.push(tokio::spawn(async move {
                let mut done = [0usize; COUNTERS];
                let mut conflicts = 0usize;
                for i in 0..INCREMENTS {
                    let counter = (writer + i) % COUNTERS;
                    let key = format!("cas/{counter}");
                    loop {
                        let got = client.get(key.as_str(), None).await?;
                        let (value, modified) = match got.kvs().first() {
                            Some(kv) => (kv.value_str()?.parse::<usize>()?, kv.mod_revision()),
                            None => (0, 0),
                        };
                        let txn = Txn::new()
                            .when([Compare::mod_revision(
                                key.as_str(),
                                CompareOp::Equal,
                                modified,
                            )])
                            .and_then([TxnOp::put(key.as_str(), (value + 1).to_string(), None)]);
                        if client.txn(txn).await?.succeeded() {
                            done[counter] += 1;
                            break;
                        }
                        conflicts += 1;
                    }
                }
                anyhow::Ok((done, conflicts))
            }));
        }
    }
    let mut expected = [0usize; COUNTERS];
    let mut conflicts = 0;
    for task in tasks {
        let (done, lost) = task.await??;
        conflicts += lost;
        for (total, n) in expected.iter_mut().zip(done) {
            *total += n;
        }
    }
    for (counter, increments) in expected.iter().enumerate() {
        let key = format!("cas/{counter}");
        for client in [&client_a, &client_b] {
            let got = client.clone().get(key.as_str(), None).await?;
            let kv = got.kvs().first().context("a counter is missing")?;
            ensure!(
                kv.value_str()?.parse::<usize>()? == *increments
                    && kv.version() == *increments as i64,
                "{key}: value {} version {} after {increments} acknowledged increments \
                 ({conflicts} failed compares)",
                kv.value_str()?,
                kv.version()
            );
        }
    }
    Ok(())
}

async fn run_increments(backend: Backend) {
    bounded(backend, increments_across_processes(backend)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_increments_across_processes() {
    run_increments(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_increments_across_processes() {
    run_increments(Backend::Mysql).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_busy_two_processes_one_database() {
    run_with(Backend::Nats, BUSY_WRITERS, BUSY_PUTS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_newest_busy_two_processes_one_database() {
    run_with(Backend::NatsNewest, BUSY_WRITERS, BUSY_PUTS).await;
}

/// A process that wrote a key, then another process that wrote it after: the first process's
/// next compare must see the other's write. On PostgreSQL a process remembers what it
/// committed and starts its next batch from that without reading; a compare decided on it
/// is stale here, and must be decided again (a failed compare writes nothing, so no commit
/// call would refuse it), as must the response revision.
async fn compare_after_another_process_wrote(backend: Backend) -> Result<()> {
    let database = TestDatabase::new(backend).context("a database server backend")?;
    let (_a, mut client_a) = start(database.endpoint.clone()).await?;
    let (_b, mut client_b) = start(database.endpoint.clone()).await?;
    for round in 0..5i64 {
        let key = format!("stale/{round}");
        // Twice from A: its second batch is the one that starts from what A remembers.
        client_a.put(key.as_str(), "a1", None).await?;
        client_a.put(key.as_str(), "a2", None).await?;
        let written_by_b = client_b.put(key.as_str(), "b", None).await?;
        let b_revision = written_by_b.header().map(|h| h.revision()).unwrap_or(0);
        let txn = Txn::new()
            .when([Compare::version(key.as_str(), CompareOp::Equal, 3)])
            .and_then([TxnOp::put(key.as_str(), "a3", None)])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let answer = client_a.txn(txn).await?;
        ensure!(
            answer.succeeded(),
            "round {round}: the key's version is 3 after B's put, but A's compare failed \
             (answered from A's own last commit?)"
        );
        let revision = answer.header().map(|h| h.revision()).unwrap_or(0);
        ensure!(
            revision == b_revision + 1,
            "round {round}: A's put after B's revision {b_revision} answered revision {revision}"
        );
        // And a compare that fails, answered with the current revision.
        let failing = Txn::new()
            .when([Compare::value(key.as_str(), CompareOp::Equal, "b")])
            .and_then([TxnOp::put(key.as_str(), "never", None)]);
        client_b.put(key.as_str(), "b2", None).await?;
        let answer = client_a.txn(failing).await?;
        let now = client_b.get(key.as_str(), None).await?;
        ensure!(
            !answer.succeeded(),
            "round {round}: a compare with an old value succeeded"
        );
        ensure!(
            answer.header().map(|h| h.revision()) == now.header().map(|h| h.revision()),
            "round {round}: a failed compare answered a revision older than B's last put"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_compare_after_another_process_wrote() {
    bounded(
        Backend::Postgres,
        compare_after_another_process_wrote(Backend::Postgres),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_compare_after_another_process_wrote() {
    bounded(
        Backend::Mysql,
        compare_after_another_process_wrote(Backend::Mysql),
    )
    .await;
}

/// A process takes keys it has not seen for absent when a request would create them (a plain
/// put, a compare with revision 0) and its last commit is the keyspace's newest: no read, and
/// the commit call refuses the batch if one is live. Here each key was written by another
/// process before this one's last commit, so each is live and unknown to it: every request
/// must be answered as etcd would, from the key's real state — a put's version, create
/// revision and previous value, a create's failed compare — whether the batch commits through
/// the call (put), writes nothing (a read-only branch) or takes the lock (a lease).
async fn keys_another_process_wrote_are_not_taken_for_absent(backend: Backend) -> Result<()> {
    let database = TestDatabase::new(backend).context("a database server backend")?;
    let (_a, mut client_a) = start(database.endpoint.clone()).await?;
    let (_b, mut client_b) = start(database.endpoint.clone()).await?;
    let by_b = |key: &str| format!("absent/{key}");
    let mut created_by_b = BTreeMap::new();
    for key in ["put", "create", "read-only", "leased", "compared"] {
        let put = client_b.put(by_b(key), "b", None).await?;
        created_by_b.insert(key, put.header().map(|h| h.revision()).unwrap_or(0));
    }
    let lease = client_a.lease_grant(60, None).await?.id();
    // Before each case A commits a key of its own, so that its next batch starts from what it
    // committed (a refused batch makes A read unknown keys for a moment: wait that out).
    let mut warm = 0;
    let mut warm_up = async |client: &mut Client| -> Result<()> {
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        warm += 1;
        client.put(format!("absent/warm-{warm}"), "a", None).await?;
        Ok(())
    };

    warm_up(&mut client_a).await?;
    let put = client_a
        .put(by_b("put"), "a", Some(PutOptions::new().with_prev_key()))
        .await?;
    let prev = put
        .prev_key()
        .context("a put over B's key answers its previous value")?;
    ensure!(
        prev.value() == b"b",
        "previous value {:?}",
        prev.value_str()
    );
    let got = client_a.get(by_b("put"), None).await?;
    let kv = got.kvs().first().context("the key after A's put")?;
    ensure!(
        (kv.version(), kv.create_revision()) == (2, created_by_b["put"]),
        "A's put over B's key: version {} (2 expected), create revision {} ({} expected)",
        kv.version(),
        kv.create_revision(),
        created_by_b["put"]
    );

    let create = |key: &str, lease: Option<i64>| {
        let options = lease.map(|id| PutOptions::new().with_lease(id));
        Txn::new()
            .when([Compare::mod_revision(by_b(key), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(by_b(key), "a", options)])
            .or_else([TxnOp::get(by_b(key), None)])
    };
    for (key, lease) in [("create", None), ("leased", Some(lease))] {
        warm_up(&mut client_a).await?;
        let answer = client_a.txn(create(key, lease)).await?;
        ensure!(
            !answer.succeeded(),
            "A created {key}, which B had created (lease {lease:?})"
        );
    }

    // A create's compare that passes on a key the transaction does not write (it writes a
    // key A just committed, so A knows every other key): B's key is read, the compare fails.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    client_a.put("absent/elsewhere", "0", None).await?;
    let elsewhere = Txn::new()
        .when([Compare::mod_revision(by_b("compared"), CompareOp::Equal, 0)])
        .and_then([TxnOp::put("absent/elsewhere", "a", None)]);
    let answer = client_a.txn(elsewhere).await?;
    ensure!(
        !answer.succeeded(),
        "a compare of B's key with mod revision 0 succeeded (the write went elsewhere)"
    );
    let got = client_b.get("absent/elsewhere", None).await?;
    ensure!(
        got.kvs().first().map(|kv| kv.value()) == Some(&b"0"[..]),
        "the failed transaction wrote"
    );

    warm_up(&mut client_a).await?;
    let read_only = Txn::new()
        .when([Compare::create_revision(
            by_b("read-only"),
            CompareOp::Equal,
            0,
        )])
        .and_then([TxnOp::get(by_b("read-only"), None)]);
    let answer = client_a.txn(read_only).await?;
    ensure!(
        !answer.succeeded(),
        "a compare of B's key with create revision 0 succeeded"
    );

    for key in ["put", "create", "read-only", "leased"] {
        let got = client_b.get(by_b(key), None).await?;
        let value = got.kvs().first().map(|kv| kv.value().to_vec());
        let expected: &[u8] = if key == "put" { b"a" } else { b"b" };
        ensure!(
            value.as_deref() == Some(expected),
            "{key}: {value:?} through B"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_keys_another_process_wrote_are_not_taken_for_absent() {
    bounded(
        Backend::Postgres,
        keys_another_process_wrote_are_not_taken_for_absent(Backend::Postgres),
    )
    .await;
}

/// The connections of one kine-rs process to the test database, by the application name it
/// connected with.
fn connections_named(endpoint: &str, application: &str) -> Result<i64> {
    let output = std::process::Command::new("psql")
        .args([endpoint, "-X", "-q", "-t", "-A", "-c"])
        .arg(format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = '{application}'"
        ))
        .output()
        .context("psql")?;
    ensure!(output.status.success(), "psql: {output:?}");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .context("a count")
}

/// A process serving watches of another process's writes has the connections its watch
/// reads need open before they need them, and opens none while they run: a connection
/// opened on demand (TLS, authentication) held that watch's events for ~100 ms, the p99 of
/// `bench/run.sh`'s watch across two processes.
async fn watch_reads_find_their_connections_open() -> Result<()> {
    let database = TestDatabase::new(Backend::Postgres).context("PostgreSQL")?;
    let (_a, client_a) = start(database.endpoint.clone()).await?;
    let watcher_endpoint = format!("{}?application_name=kine_rs_watcher", database.endpoint);
    // No idle connections beyond the busy ones: the count below is the busy connections, the
    // LISTEN connection and the watch readers.
    let (_b, mut client_b) = serve_and_connect(
        &watcher_endpoint,
        &["--datastore-max-idle-connections", "0"],
    )
    .await?;
    let count = || connections_named(&database.endpoint, "kine_rs_watcher");
    // Connections are opened in the background after start: wait until the count holds.
    let mut settled = count()?;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = count()?;
        if now == settled {
            break;
        }
        settled = now;
    }
    // 4 busy connections (`BUSY_CONNECTIONS`, one of which becomes the LISTEN connection)
    // and 4 watch readers (`WATCH_CONNECTIONS`); 5 when only one watch reader was opened.
    ensure!(
        settled >= 8,
        "the watching process holds {settled} connections before any watch; its watch \
         readers are not all open"
    );

    let (mut stream, _) =
        watch(&mut client_b, "w/", Some(WatchOptions::new().with_prefix())).await?;
    let writers: Vec<_> = (0..8)
        .map(|writer| {
            let mut client = client_a.clone();
            tokio::spawn(async move {
                for i in 0..50 {
                    client.put(format!("w/{writer}/{i}"), "v", None).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for writer in writers {
        writer.await??;
    }
    let events = collect_events(&mut stream, 400).await?;
    ensure!(events.len() == 400, "{} events of 400", events.len());
    let after = count()?;
    ensure!(
        after == settled,
        "the watching process opened connections while serving the watch: {settled} → {after}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_watch_reads_find_their_connections_open() {
    bounded(Backend::Postgres, watch_reads_find_their_connections_open()).await;
}
