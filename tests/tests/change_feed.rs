//! One change feed per process (DESIGN.md, "Seams"): a gateway watching many tenants costs the
//! database one notification stream or one poll, not a poll per tenant; and every event of a
//! tenant written through another process sharing the database still reaches its watchers
//! exactly once, in order (invariant 2).
//!
//! What the process asks of the database is counted from its metrics
//! (`kine_sql_query_duration_seconds_count` by kind of statement), never timed.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions, WatchOptions};
use kine_tests::conformance::{collect_events, watch};
use kine_tests::pki::Pki;
use kine_tests::{Backend, ChildGuard, TestDatabase, free_port, spawn_kine_on};

/// Tenants watched in the first gateway.
const TENANTS: usize = 24;
/// How long the watched gateway is left idle while its statements are counted.
const IDLE: Duration = Duration::from_secs(3);
/// How long after the watches open the feed is left to see no change before the count
/// begins: it keeps polling at its busy interval for a second after the last one it saw
/// (`kine::storage::feed::BUSY_HOLD`).
const SETTLE: Duration = Duration::from_millis(1500);
/// How long the watching gateway writes to a watched tenant itself while its feed's polls
/// are counted.
const OWN_WRITES: Duration = Duration::from_secs(2);

/// Statements of kind `query` the process behind `metrics` has issued.
fn statements(metrics: &str, driver: &str, query: &str) -> f64 {
    let body = kine_tests::http_get(metrics, "/metrics").expect("GET /metrics");
    let series =
        format!("kine_sql_query_duration_seconds_count{{driver=\"{driver}\",query=\"{query}\"}}");
    body.lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
        .unwrap_or(0.0)
}

async fn client_as(kine: &ChildGuard, pki: &Pki, name: &str) -> Result<Client> {
    let (cert, key) = pki.client(name);
    let tls = TlsOptions::new()
        .domain_name("localhost")
        .ca_certificate(Certificate::from_pem(std::fs::read(&pki.ca)?))
        .identity(Identity::from_pem(
            std::fs::read(cert)?,
            std::fs::read(key)?,
        ));
    let options = ConnectOptions::new()
        .with_tls(tls)
        .with_connect_timeout(Duration::from_secs(10));
    let endpoint = format!("https://{}", kine.address);
    Ok(Client::connect([endpoint.as_str()], Some(options)).await?)
}

/// Two gateways on one database. The first holds a watch on each of `TENANTS` tenants, each
/// created on its first use with one lookup and one insert (`finds_per_new_tenant` lookups in
/// all, so MySQL's lookup after its insert counts too): while
/// nobody writes, it reads no keyspace's state or events (only its feed's poll, one
/// statement for all of them, at most once per `quiet_poll`); while it writes a watched
/// tenant itself, its feed still polls at most once per `quiet_poll` (its own commits are no
/// news to it); then the second gateway writes each tenant twice, and every watch gets
/// exactly its tenant's two events, in order.
async fn one_feed_for_many_tenants(
    backend: Backend,
    driver: &str,
    quiet_poll: Duration,
    finds_per_new_tenant: f64,
) -> Result<()> {
    let database = TestDatabase::new(backend).context("a database server backend")?;
    let dir = tempfile::tempdir()?;
    let names: Vec<String> = (0..TENANTS).map(|i| format!("feed-{i:02}")).collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let pki = Pki::write(dir.path(), &name_refs);
    let metrics = format!("127.0.0.1:{}", free_port());
    let start = |extra: Vec<String>| {
        let endpoint = database.endpoint.clone();
        let mut args: Vec<String> = pki.gateway_args().iter().map(|s| s.to_string()).collect();
        args.extend(["--compact-interval".to_string(), "0".to_string()]);
        args.extend(extra);
        async move {
            tokio::task::spawn_blocking(move || {
                let dir = tempfile::tempdir().expect("tempdir");
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                spawn_kine_on(&endpoint, dir, &args)
            })
            .await
        }
    };
    let watching = start(vec!["--metrics-bind-address".into(), metrics.clone()]).await?;
    let writing = start(Vec::new()).await?;

    let count = |query: &str| statements(&metrics, driver, query);
    let (finds, creates) = (count("keyspace_find"), count("keyspace_create"));
    let opening = std::time::Instant::now();
    let mut streams = Vec::new();
    for name in &names {
        let mut client = client_as(&watching, &pki, name).await?;
        let (stream, _) = watch(&mut client, "k/", Some(WatchOptions::new().with_prefix())).await?;
        streams.push((client, stream));
    }
    // Each tenant was created on its first use: one lookup and one insert answering its id
    // (MySQL, without `RETURNING`: a lookup after the insert too). The health probe looks
    // the default keyspace up once a second besides.
    let (finds, creates) = (
        count("keyspace_find") - finds,
        count("keyspace_create") - creates,
    );
    let probes = opening.elapsed().as_secs_f64().ceil() + 1.0;
    let tenants = TENANTS as f64;
    let expected = tenants * finds_per_new_tenant;
    ensure!(
        creates == tenants && finds >= expected && finds <= expected + probes,
        "{TENANTS} tenants created on first use cost {finds} lookups (with at most {probes} \
         of the health probe) and {creates} inserts"
    );

    // Idle: no per-tenant statement at all, whatever the number of watched tenants, and the
    // feed's poll at its quiet interval.
    tokio::time::sleep(SETTLE).await;
    let (state, events, polls) = (count("state"), count("events"), count("feed_poll"));
    tokio::time::sleep(IDLE).await;
    let idle_state = count("state") - state;
    let idle_events = count("events") - events;
    let idle_polls = count("feed_poll") - polls;
    eprintln!(
        "{driver}: {TENANTS} watched tenants idle for {IDLE:?}: {idle_state} state reads, \
         {idle_events} event reads, {idle_polls} feed polls"
    );
    ensure!(
        idle_state == 0.0 && idle_events == 0.0,
        "an idle watched tenant cost statements of its own: {idle_state} state reads, \
         {idle_events} event reads in {IDLE:?} for {TENANTS} tenants"
    );
    ensure!(idle_polls >= 1.0, "the change feed never polled");
    // A timer only fires late, so a busy machine polls less, never more.
    let most = (IDLE.as_secs_f64() / quiet_poll.as_secs_f64()).ceil() + 2.0;
    ensure!(
        idle_polls <= most,
        "the change feed polled {idle_polls} times in {IDLE:?} while nothing changed: more \
         than once every {quiet_poll:?}"
    );

    // Its own writes to a watched tenant (outside the watched prefix) are no news to its
    // feed: its hubs get them from its writer.
    let mut own = client_as(&watching, &pki, &names[0]).await?;
    let polls = count("feed_poll");
    let started = std::time::Instant::now();
    let mut puts = 0;
    while started.elapsed() < OWN_WRITES {
        own.put(format!("own/{puts}"), "v", None).await?;
        puts += 1;
    }
    let own_polls = count("feed_poll") - polls;
    let elapsed = started.elapsed();
    eprintln!(
        "{driver}: {puts} puts through the watching gateway in {elapsed:?}: {own_polls} feed polls"
    );
    let most = (elapsed.as_secs_f64() / quiet_poll.as_secs_f64()).ceil() + 2.0;
    ensure!(
        own_polls <= most,
        "the change feed polled {own_polls} times in {elapsed:?} while only its own process \
         wrote: more than once every {quiet_poll:?}"
    );

    // Writes through the other process reach every watcher, exactly once and in order.
    let mut revisions = Vec::new();
    for name in &names {
        let mut client = client_as(&writing, &pki, name).await?;
        let first = client.put("k/a", name.as_str(), None).await?;
        let second = client.put("k/b", name.as_str(), None).await?;
        revisions.push((
            first.header().context("header")?.revision(),
            second.header().context("header")?.revision(),
        ));
    }
    for ((name, (_, stream)), (first, second)) in names.iter().zip(&mut streams).zip(revisions) {
        let seen = collect_events(stream, 2).await?;
        let got: Vec<(&str, &str, i64)> = seen
            .iter()
            .map(|s| (s.key.as_str(), s.value.as_str(), s.revision))
            .collect();
        ensure!(
            got == [
                ("k/a", name.as_str(), first),
                ("k/b", name.as_str(), second)
            ],
            "{name}: {got:?}"
        );
    }
    drop((watching, writing));
    Ok(())
}

async fn run(backend: Backend, driver: &str, quiet_poll: Duration, finds_per_new_tenant: f64) {
    tokio::time::timeout(
        Duration::from_secs(180),
        one_feed_for_many_tenants(backend, driver, quiet_poll, finds_per_new_tenant),
    )
    .await
    .expect("timed out")
    .expect("one change feed for many tenants");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_one_feed_for_many_watched_tenants() {
    // PostgreSQL announces commits; its poll is the safety net, once a second.
    run(Backend::Postgres, "postgres", Duration::from_secs(1), 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_one_feed_for_many_watched_tenants() {
    // MySQL's only source: every 5 ms while commits come, every 30 ms at rest.
    run(Backend::Mysql, "mysql", Duration::from_millis(30), 2.0).await;
}
