//! Several kine-rs processes on one database (DESIGN.md invariant 2): two processes share a
//! fresh PostgreSQL (or MySQL) database or NATS bucket, clients write through both at once, and a watcher on
//! each process, from revision 1, must see the identical stream: gapless, in order, every
//! acknowledged write exactly once. A lease granted through one process expires once (one
//! DELETE), although both processes look for expired leases.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use etcd_client::{Client, EventType, PutOptions, WatchOptions};
use kine_tests::conformance::{Seen, collect_events, expect_quiet, watch};
use kine_tests::{Backend, ChildGuard, TestDatabase, spawn_kine_on};

/// Writer tasks per process.
const WRITERS: usize = 4;
/// Puts per writer task.
const PUTS: usize = 40;

async fn start(endpoint: String) -> Result<(ChildGuard, Client)> {
    let guard = tokio::task::spawn_blocking(move || {
        let dir = tempfile::tempdir().expect("tempdir");
        spawn_kine_on(&endpoint, dir, &["--compact-interval", "0"])
    })
    .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = async {
            let mut client = Client::connect([guard.endpoint.as_str()], None).await?;
            client.get("ready-probe", None).await?;
            anyhow::Ok(client)
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(client)) => return Ok((guard, client)),
            _ if tokio::time::Instant::now() > deadline => {
                anyhow::bail!("kine-rs at {} did not answer", guard.endpoint)
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn two_processes_one_database(backend: Backend) -> Result<()> {
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
        for writer in 0..WRITERS {
            let mut client = client.clone();
            tasks.push(tokio::spawn(async move {
                let mut written = Vec::new();
                for i in 0..PUTS {
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

async fn run(backend: Backend) {
    let outcome = tokio::time::timeout(
        Duration::from_secs(120),
        two_processes_one_database(backend),
    )
    .await;
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{backend:?}: {e:#}"),
        Err(_) => panic!("{backend:?}: timed out"),
    }
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
