//! Tenants (DESIGN.md invariants 3 and 4), on every backend: a gateway serving tenants named by
//! their client certificates, attacks of tenant A on tenant B, tenant names shaped like SQL
//! injection or path traversal, the admin API and its command line, quotas, and the freeze
//! (also across two kine-rs processes sharing a PostgreSQL or MySQL database).

use std::collections::BTreeSet;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, PutOptions,
    TlsOptions, Txn, TxnOp, WatchOptions,
};
use kine_tests::conformance::{
    Seen, collect_events, current_revision, expect_code, header_revision, keys, watch,
};
use kine_tests::pki::Pki;
use kine_tests::{
    Backend, ChildGuard, TestDatabase, kine_rs_binary, spawn_kine_on, spawn_kine_with,
};
use tonic::Code;

/// A kine-rs gateway with its PKI and admin socket.
struct Gateway {
    kine: ChildGuard,
    pki: Pki,
    socket: String,
    _dir: tempfile::TempDir,
}

const CLIENTS: &[&str] = &[
    "tenant-a",
    "tenant-b",
    "admin",
    "x'; DROP TABLE kv; --",
    "../../etc/passwd",
    "unknown-tenant",
];

fn start_gateway(backend: Backend, extra: &[&str]) -> Gateway {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::write(dir.path(), CLIENTS);
    let socket = dir.path().join("admin.sock").display().to_string();
    let mut args = vec![
        "--gateway",
        "--server-cert-file",
        &pki.server_cert,
        "--server-key-file",
        &pki.server_key,
        "--trusted-ca-file",
        &pki.ca,
        "--admin-identity",
        "admin",
        "--admin-socket",
        &socket,
        "--compact-interval",
        "0",
    ];
    args.extend_from_slice(extra);
    let kine = spawn_kine_with(backend, &args);
    Gateway {
        kine,
        pki,
        socket,
        _dir: dir,
    }
}

impl Gateway {
    /// An etcd client authenticated as `name`.
    async fn client(&self, name: &str) -> Result<Client> {
        let (cert, key) = self.pki.client(name);
        let tls = TlsOptions::new()
            .domain_name("localhost")
            .ca_certificate(Certificate::from_pem(std::fs::read(&self.pki.ca)?))
            .identity(Identity::from_pem(
                std::fs::read(cert)?,
                std::fs::read(key)?,
            ));
        let options = ConnectOptions::new()
            .with_tls(tls)
            .with_connect_timeout(Duration::from_secs(5));
        let endpoint = format!("https://{}", self.kine.address);
        Ok(Client::connect([endpoint.as_str()], Some(options)).await?)
    }

    /// Runs `kine-rs tenant --admin-socket … ARGS`.
    fn admin(&self, args: &[&str]) -> Output {
        admin_cli(&["--admin-socket", &self.socket], args)
    }
}

fn admin_cli(connection: &[&str], args: &[&str]) -> Output {
    Command::new(kine_rs_binary())
        .arg("tenant")
        .args(connection)
        .args(args)
        .env_remove("KINE_ADMIN_SOCKET")
        .stdin(Stdio::null())
        .output()
        .expect("run kine-rs tenant")
}

fn ok(output: Output) -> Result<String> {
    ensure!(
        output.status.success(),
        "kine-rs tenant failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A number field of `kine-rs tenant … -o json` output.
fn json_number(text: &str, field: &str) -> Result<i64> {
    let pattern = format!("\"{field}\":");
    let start = text.find(&pattern).context(format!("{field} in {text}"))? + pattern.len();
    let digits: String = text[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '-')
        .collect();
    Ok(digits.parse()?)
}

fn everything() -> Option<GetOptions> {
    Some(GetOptions::new().with_all_keys())
}

/// Tenant A attacks tenant B through one gateway; nothing of B is seen or changed.
async fn attack(backend: Backend) -> Result<()> {
    let gateway = start_gateway(backend, &[]);
    // Tenants exist only once created; unknown ones are refused.
    let mut unknown = gateway.client("unknown-tenant").await?;
    expect_code(unknown.get("k", None).await, Code::PermissionDenied)?;
    ok(gateway.admin(&["create", "tenant-a"]))?;
    ok(gateway.admin(&["create", "tenant-b"]))?;
    let mut a = gateway.client("tenant-a").await?;
    let mut b = gateway.client("tenant-b").await?;

    // B's data: keys everywhere in the key space, a lease with a key, some history.
    for (key, value) in [
        ("\u{1}", "b"),
        ("shared/x", "b1"),
        ("shared/x", "b2"),
        ("zzz", "b"),
    ] {
        b.put(key, value, None).await?;
    }
    let lease_b = b.lease_grant(600, None).await?.id();
    b.put("b-leased", "b", Some(PutOptions::new().with_lease(lease_b)))
        .await?;
    let b_revision = current_revision(&mut b).await?;
    ensure!(b_revision == 6, "B's revision {b_revision}");

    // A's own revision sequence starts at 1, whatever B did.
    ensure!(
        current_revision(&mut a).await? == 1,
        "A does not start at 1"
    );
    let put = a.put("shared/x", "a", None).await?;
    ensure!(header_revision(put.header())? == 2, "A's first write");

    // A's watch over everything from revision 1 sees only A's events.
    let (mut a_watch, _) = watch(
        &mut a,
        "",
        Some(WatchOptions::new().with_all_keys().with_start_revision(1)),
    )
    .await?;

    // Ranges over everything: `\0` range end, empty key, from-key, revision 1, B's revision.
    let all = a.get("", everything()).await?;
    ensure!(
        keys(all.kvs()) == ["shared/x"],
        "A sees {:?}",
        keys(all.kvs())
    );
    let from_nul = a.get("\0", Some(GetOptions::new().with_from_key())).await?;
    ensure!(keys(from_nul.kvs()) == ["shared/x"], "from \\0");
    let at_1 = a
        .get("", Some(GetOptions::new().with_all_keys().with_revision(1)))
        .await?;
    ensure!(
        at_1.kvs().is_empty(),
        "A at revision 1 sees {:?}",
        keys(at_1.kvs())
    );
    expect_code(
        a.get("", Some(GetOptions::new().with_all_keys().with_revision(5)))
            .await,
        Code::OutOfRange,
    )?;
    let count = a
        .get(
            "",
            Some(GetOptions::new().with_all_keys().with_count_only()),
        )
        .await?;
    ensure!(count.count() == 1, "A counts {}", count.count());

    // Txn compares on B's keys see A's keyspace only.
    let txn = Txn::new()
        .when([
            Compare::version("zzz", CompareOp::Greater, 0),
            Compare::value("shared/x", CompareOp::Equal, "b2"),
        ])
        .and_then([TxnOp::put("leak", "yes", None)])
        .or_else([TxnOp::get("b-leased", None)]);
    let response = a.txn(txn).await?;
    ensure!(
        !response.succeeded(),
        "a compare on B's keys succeeded in A"
    );

    // B's lease id: unknown to A in every call; A may even use the same id for its own.
    let keep = a.lease_keep_alive(lease_b).await;
    if let Ok((mut keeper, mut responses)) = keep {
        keeper.keep_alive().await?;
        let answer = responses.message().await?.context("keep-alive answer")?;
        ensure!(
            answer.ttl() == 0,
            "A renewed B's lease: ttl {}",
            answer.ttl()
        );
    }
    let ttl = a.lease_time_to_live(lease_b, None).await?;
    ensure!(ttl.ttl() == -1, "A sees B's lease: ttl {}", ttl.ttl());
    expect_code(a.lease_revoke(lease_b).await, Code::NotFound)?;
    ensure!(a.leases().await?.leases().is_empty(), "A lists B's leases");
    let mine = a
        .lease_grant(
            600,
            Some(etcd_client::LeaseGrantOptions::new().with_id(lease_b)),
        )
        .await?;
    ensure!(mine.id() == lease_b, "A's lease with B's id");
    a.lease_revoke(lease_b).await?;
    let b_ttl = b.lease_time_to_live(lease_b, None).await?;
    ensure!(b_ttl.ttl() > 0, "B's lease was revoked through A");
    ensure!(
        b.get("b-leased", None).await?.kvs().len() == 1,
        "B's leased key is gone"
    );

    // Compaction of A leaves B's history alone; B's revisions are A's future.
    expect_code(a.compact(b_revision, None).await, Code::OutOfRange)?;
    let a_revision = current_revision(&mut a).await?;
    a.compact(a_revision, None).await?;
    let b_old = b
        .get("shared/x", Some(GetOptions::new().with_revision(3)))
        .await?;
    ensure!(
        b_old.kvs().first().map(|kv| kv.value()) == Some(b"b1".as_slice()),
        "B's history was compacted by A"
    );

    // Status: A's own revision and size, unmoved by B's writes.
    let status = a.status().await?;
    ensure!(
        header_revision(status.header())? == a_revision,
        "status revision {:?}",
        status.header()
    );
    let own_bytes = ("shared/x".len() + "a".len()) as i64;
    ensure!(
        status.db_size() == own_bytes,
        "A's db size {} is not its own {own_bytes}",
        status.db_size()
    );
    for i in 0..5 {
        b.put(format!("b/{i}"), vec![7u8; 1000], None).await?;
    }
    ensure!(
        current_revision(&mut a).await? == a_revision,
        "A's revision moved when B wrote"
    );
    let after = a.status().await?;
    ensure!(
        after.db_size() == own_bytes && header_revision(after.header())? == a_revision,
        "A's status moved when B wrote: {after:?}"
    );

    // A deletes everything it can see: B keeps all its keys.
    let b_keys = b.get("", everything()).await?.count();
    let deleted = a
        .delete("", Some(etcd_client::DeleteOptions::new().with_all_keys()))
        .await?;
    ensure!(deleted.deleted() == 1, "A deleted {}", deleted.deleted());
    ensure!(
        b.get("", everything()).await?.count() == b_keys,
        "A's delete reached B"
    );

    // A's watch: A's events only, in A's revisions (the marker comes after B's writes).
    a.put("marker", "m", None).await?;
    let events = collect_events(&mut a_watch, 3).await?;
    let seen: Vec<(String, i64)> = events
        .iter()
        .map(|e: &Seen| (e.key.clone(), e.revision))
        .collect();
    ensure!(
        seen == [
            ("shared/x".to_string(), 2),
            ("shared/x".to_string(), a_revision + 1),
            ("marker".to_string(), a_revision + 2)
        ],
        "A's watch saw {seen:?}"
    );

    // Hostile names: refused as tenants and by the admin API; the tables are intact.
    for hostile in ["x'; DROP TABLE kv; --", "../../etc/passwd"] {
        let mut client = gateway.client(hostile).await?;
        expect_code(client.get("k", None).await, Code::PermissionDenied)?;
        let create = gateway.admin(&["create", hostile]);
        ensure!(!create.status.success(), "created tenant {hostile:?}");
        ensure!(
            String::from_utf8_lossy(&create.stderr).contains("invalid tenant name"),
            "{create:?}"
        );
    }
    ensure!(
        b.get("", everything()).await?.count() == b_keys,
        "B's keys after hostile names"
    );

    // The admin API: not for tenants, fine for admin identities over TLS.
    let (cert_a, key_a) = gateway.pki.client("tenant-a");
    let endpoint = format!("https://{}", gateway.kine.address);
    let as_tenant = admin_cli(
        &[
            "--endpoint",
            &endpoint,
            "--cacert",
            &gateway.pki.ca,
            "--cert",
            cert_a,
            "--key",
            key_a,
        ],
        &["list"],
    );
    ensure!(!as_tenant.status.success(), "a tenant used the admin API");
    ensure!(
        String::from_utf8_lossy(&as_tenant.stderr).contains("PermissionDenied"),
        "{as_tenant:?}"
    );
    let (cert, key) = gateway.pki.client("admin");
    let list = ok(admin_cli(
        &[
            "--endpoint",
            &endpoint,
            "--cacert",
            &gateway.pki.ca,
            "--cert",
            cert,
            "--key",
            key,
        ],
        &["list", "-o", "json"],
    ))?;
    ensure!(
        list.contains("\"name\":\"tenant-a\"") && list.contains("\"name\":\"tenant-b\""),
        "{list}"
    );
    let status = ok(gateway.admin(&["status", "tenant-b", "-o", "json"]))?;
    ensure!(json_number(&status, "keys")? == 9, "{status}");
    ensure!(
        json_number(&status, "revision")? == b_revision + 5,
        "{status}"
    );
    Ok(())
}

/// Freeze on one process: reads, watches and keep-alives go on, every write is refused,
/// lease expiry pauses and resumes with the remaining TTL; quotas; deleting a watched tenant.
async fn freeze_and_quota(backend: Backend) -> Result<()> {
    let gateway = start_gateway(backend, &[]);
    ok(gateway.admin(&["create", "tenant-a"]))?;
    ok(gateway.admin(&["create", "tenant-b"]))?;
    let mut a = gateway.client("tenant-a").await?;
    let mut b = gateway.client("tenant-b").await?;
    a.put("k", "v", None).await?;
    let lease = a.lease_grant(6, None).await?.id();
    a.put("leased", "x", Some(PutOptions::new().with_lease(lease)))
        .await?;
    let doomed = a.lease_grant(600, None).await?.id();
    let (mut a_watch, _) = watch(&mut a, "", Some(WatchOptions::new().with_all_keys())).await?;

    let frozen = ok(gateway.admin(&["freeze", "tenant-a", "-o", "json"]))?;
    ensure!(frozen.contains("\"frozen\":true"), "{frozen}");
    let revision = json_number(&frozen, "revision")?;
    // Idempotent.
    ok(gateway.admin(&["freeze", "tenant-a"]))?;

    let refused = |status: tonic::Status| -> Result<()> {
        ensure!(
            status.message().contains("\"tenant-a\" is frozen"),
            "{}",
            status.message()
        );
        Ok(())
    };
    refused(expect_code(
        a.put("k", "w", None).await,
        Code::FailedPrecondition,
    )?)?;
    refused(expect_code(
        a.delete("k", None).await,
        Code::FailedPrecondition,
    )?)?;
    refused(expect_code(
        a.txn(Txn::new().and_then([TxnOp::put("k", "t", None)]))
            .await,
        Code::FailedPrecondition,
    )?)?;
    refused(expect_code(
        a.lease_grant(60, None).await,
        Code::FailedPrecondition,
    )?)?;
    refused(expect_code(
        a.lease_revoke(doomed).await,
        Code::FailedPrecondition,
    )?)?;
    refused(expect_code(
        a.compact(revision, None).await,
        Code::FailedPrecondition,
    )?)?;
    // Reads, read-only transactions and keep-alives go on; B is not frozen.
    ensure!(
        a.get("k", None).await?.kvs()[0].value() == b"v",
        "read while frozen"
    );
    let read_txn = a.txn(Txn::new().and_then([TxnOp::get("k", None)])).await?;
    ensure!(read_txn.succeeded(), "read-only txn while frozen");
    let (mut keeper, mut answers) = a.lease_keep_alive(doomed).await?;
    keeper.keep_alive().await?;
    let answer = answers.message().await?.context("keep-alive")?;
    ensure!(
        answer.ttl() == 600,
        "keep-alive while frozen: {}",
        answer.ttl()
    );
    b.put("k", "b", None).await?;

    // The leased key outlives its TTL while frozen (expiry is paused) ...
    tokio::time::sleep(Duration::from_secs(8)).await;
    ensure!(
        a.get("leased", None).await?.kvs().len() == 1,
        "a lease expired while frozen"
    );
    ensure!(
        current_revision(&mut a).await? == revision,
        "a write landed"
    );

    // ... and after unfreezing has time left, then expires.
    let unfrozen = ok(gateway.admin(&["unfreeze", "tenant-a", "-o", "json"]))?;
    ensure!(unfrozen.contains("\"frozen\":false"), "{unfrozen}");
    ok(gateway.admin(&["unfreeze", "tenant-a"]))?;
    let ttl = a.lease_time_to_live(lease, None).await?.ttl();
    ensure!(ttl > 0, "the lease lost its remaining TTL: {ttl}");
    let put = a.put("k", "after", None).await?;
    ensure!(
        header_revision(put.header())? == revision + 1,
        "first write after unfreeze"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !a.get("leased", None).await?.kvs().is_empty() {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The watch saw the write and the expiry, nothing of the frozen time or of B.
    let events = collect_events(&mut a_watch, 2).await?;
    ensure!(
        events.iter().map(|e| e.key.as_str()).collect::<Vec<_>>() == ["k", "leased"],
        "{events:?}"
    );

    // Quotas: keys and bytes, etcd's error; deletes still pass.
    ok(gateway.admin(&["set-quota", "tenant-b", "--keys", "3"]))?;
    b.put("k2", "x", None).await?;
    b.put("k3", "x", None).await?;
    let over = expect_code(b.put("k4", "x", None).await, Code::ResourceExhausted)?;
    ensure!(
        over.message() == "etcdserver: mvcc: database space exceeded",
        "{}",
        over.message()
    );
    b.put("k3", "overwrite", None).await?;
    b.delete("k3", None).await?;
    b.put("k4", "x", None).await?;
    ok(gateway.admin(&["set-quota", "tenant-b", "--bytes", "100"]))?;
    expect_code(
        b.put("big", vec![0u8; 200], None).await,
        Code::ResourceExhausted,
    )?;
    ok(gateway.admin(&["set-quota", "tenant-b"]))?;
    b.put("big", vec![0u8; 200], None).await?;

    // Deleting a watched tenant is refused unless forced, which ends the watch.
    let busy = gateway.admin(&["delete", "tenant-a"]);
    ensure!(
        !busy.status.success() && String::from_utf8_lossy(&busy.stderr).contains("open watches"),
        "{busy:?}"
    );
    ensure!(
        a.get("k", None).await?.count() == 1,
        "refused delete lost data"
    );
    ok(gateway.admin(&["delete", "tenant-a", "--force"]))?;
    match a_watch.message().await {
        Err(_) | Ok(None) => {}
        Ok(Some(response)) => bail!("watch of a deleted tenant goes on: {response:?}"),
    }
    expect_code(a.get("k", None).await, Code::PermissionDenied)?;
    let gone = gateway.admin(&["status", "tenant-a"]);
    ensure!(
        String::from_utf8_lossy(&gone.stderr).contains("NotFound"),
        "{gone:?}"
    );
    ensure!(b.get("big", None).await?.count() == 1, "B lost data");
    Ok(())
}

async fn run(what: &str, backend: Backend, test: impl std::future::Future<Output = Result<()>>) {
    match tokio::time::timeout(Duration::from_secs(180), test).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{what} on {backend:?}: {e:#}"),
        Err(_) => panic!("{what} on {backend:?}: timed out"),
    }
}

macro_rules! per_backend {
    ($($name:ident: $backend:expr),* $(,)?) => {
        $(
            mod $name {
                use super::*;

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn tenant_a_cannot_reach_tenant_b() {
                    run("attack", $backend, attack($backend)).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn freeze_quota_and_delete() {
                    run("freeze", $backend, freeze_and_quota($backend)).await;
                }
            }
        )*
    };
}

per_backend! {
    memory: Backend::Memory,
    sqlite: Backend::Sqlite,
    postgres: Backend::Postgres,
    mysql: Backend::Mysql,
    nats: Backend::Nats,
    nats_newest: Backend::NatsNewest,
}

#[test]
fn every_backend_is_covered() {
    assert_eq!(Backend::all().len(), 6);
}

/// Two sidecar processes of one tenant share a database; writers hammer both; after
/// `kine-rs tenant freeze` returns no write lands, and unfreeze restores writes and expiry.
async fn freeze_across_processes(backend: Backend) -> Result<()> {
    let database = TestDatabase::new(backend).context("a database server backend")?;
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("admin.sock").display().to_string();
    let start = |args: Vec<String>| {
        let endpoint = database.endpoint.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let dir = tempfile::tempdir().expect("tempdir");
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                spawn_kine_on(&endpoint, dir, &args)
            })
            .await
        }
    };
    let base = |extra: &[&str]| -> Vec<String> {
        ["--tenant", "shared-t", "--compact-interval", "0"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let p1 = start(base(&["--admin-socket", &socket])).await?;
    let p2 = start(base(&[])).await?;
    let connect = |p: &ChildGuard| {
        let endpoint = p.endpoint.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(mut client) = Client::connect([endpoint.as_str()], None).await
                    && client.get("probe", None).await.is_ok()
                {
                    return Ok::<_, anyhow::Error>(client);
                }
                ensure!(
                    tokio::time::Instant::now() < deadline,
                    "{endpoint} not ready"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let mut c1 = connect(&p1).await?;
    let mut c2 = connect(&p2).await?;
    let lease = c2.lease_grant(4, None).await?.id();
    c2.put("leased", "x", Some(PutOptions::new().with_lease(lease)))
        .await?;

    let frozen = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (p, client) in [(1, &c1), (2, &c2)] {
        for w in 0..3 {
            let mut client = client.clone();
            let frozen = frozen.clone();
            tasks.push(tokio::spawn(async move {
                let mut acknowledged = Vec::new();
                let mut refused_after_freeze = 0;
                let mut i = 0;
                while refused_after_freeze < 5 {
                    let was_frozen = frozen.load(Ordering::SeqCst);
                    let key = format!("w/{p}/{w}/{i}");
                    i += 1;
                    match client.put(key.as_str(), "v", None).await {
                        Ok(r) => {
                            let revision = r.header().context("header")?.revision();
                            ensure!(
                                !was_frozen,
                                "{key} acknowledged at {revision} after the freeze returned"
                            );
                            acknowledged.push(revision);
                        }
                        Err(etcd_client::Error::GRpcStatus(s))
                            if s.code() == Code::FailedPrecondition =>
                        {
                            if was_frozen {
                                refused_after_freeze += 1;
                            }
                        }
                        Err(e) => bail!("{key}: {e}"),
                    }
                }
                Ok::<_, anyhow::Error>(acknowledged)
            }));
        }
    }
    // Let the writers run, then freeze through process 1's admin socket.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while current_revision(&mut c1).await? < 40 {
        ensure!(tokio::time::Instant::now() < deadline, "writers are stuck");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let socket_for_cli = socket.clone();
    let output = tokio::task::spawn_blocking(move || {
        admin_cli(
            &["--admin-socket", &socket_for_cli],
            &["freeze", "shared-t", "-o", "json"],
        )
    })
    .await?;
    frozen.store(true, Ordering::SeqCst);
    let freeze_revision = json_number(&ok(output)?, "revision")?;
    let mut acknowledged = BTreeSet::new();
    for task in tasks {
        for revision in task.await?? {
            ensure!(
                revision <= freeze_revision,
                "a write landed at {revision} after the freeze at {freeze_revision}"
            );
            ensure!(acknowledged.insert(revision), "revision {revision} twice");
        }
    }
    // Nothing landed after the freeze, on either process; nothing acknowledged was lost.
    for client in [&mut c1, &mut c2] {
        ensure!(
            current_revision(client).await? == freeze_revision,
            "revision moved past the freeze"
        );
    }
    let writes = c1
        .get(
            "w/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await?
        .count();
    ensure!(
        writes as usize == acknowledged.len(),
        "{writes} keys, {} acknowledged",
        acknowledged.len()
    );
    // Two initial writes (lease key) + every acknowledged put = the freeze revision.
    ensure!(
        acknowledged.len() as i64 + 2 == freeze_revision,
        "{} writes up to revision {freeze_revision}",
        acknowledged.len()
    );
    // Expiry is paused on both processes.
    tokio::time::sleep(Duration::from_secs(6)).await;
    ensure!(
        c2.get("leased", None).await?.count() == 1,
        "expired while frozen"
    );
    let output = tokio::task::spawn_blocking(move || {
        admin_cli(&["--admin-socket", &socket], &["unfreeze", "shared-t"])
    })
    .await?;
    ok(output)?;
    let put = c2.put("after", "v", None).await?;
    ensure!(
        header_revision(put.header())? == freeze_revision + 1,
        "write after unfreeze"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while c1.get("leased", None).await?.count() != 0 {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop((p1, p2));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_freeze_across_two_processes() {
    run(
        "freeze across processes",
        Backend::Postgres,
        freeze_across_processes(Backend::Postgres),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_freeze_across_two_processes() {
    run(
        "freeze across processes",
        Backend::Mysql,
        freeze_across_processes(Backend::Mysql),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_freeze_across_two_processes() {
    run(
        "freeze across processes",
        Backend::Nats,
        freeze_across_processes(Backend::Nats),
    )
    .await;
}

/// Two gateways on one datastore (`endpoint`: a database server's, or one SQLite file), each
/// with an admin socket of its own in `dir`.
async fn two_gateways(endpoint: &str, dir: &std::path::Path) -> Result<(Gateway, Gateway)> {
    let pki = Pki::write(dir, CLIENTS);
    let start = |socket: String| {
        let endpoint = endpoint.to_string();
        let (ca, cert, key) = (
            pki.ca.clone(),
            pki.server_cert.clone(),
            pki.server_key.clone(),
        );
        async move {
            tokio::task::spawn_blocking(move || {
                let args = [
                    "--gateway",
                    "--server-cert-file",
                    &cert,
                    "--server-key-file",
                    &key,
                    "--trusted-ca-file",
                    &ca,
                    "--admin-socket",
                    &socket,
                    "--compact-interval",
                    "0",
                ];
                spawn_kine_on(&endpoint, tempfile::tempdir().expect("tempdir"), &args)
            })
            .await
        }
    };
    let gateway = |kine: ChildGuard, socket: String| Gateway {
        kine,
        pki: Pki {
            ca: pki.ca.clone(),
            server_cert: pki.server_cert.clone(),
            server_key: pki.server_key.clone(),
            clients: pki.clients.clone(),
        },
        socket,
        _dir: tempfile::tempdir().expect("tempdir"),
    };
    let socket_a = dir.join("a.sock").display().to_string();
    let socket_b = dir.join("b.sock").display().to_string();
    let a = gateway(start(socket_a.clone()).await?, socket_a);
    let b = gateway(start(socket_b.clone()).await?, socket_b);
    Ok((a, b))
}

/// A read of `k` through `client` fails with `code` and a message containing `text`.
async fn refused(
    client: &mut etcd_client::Client,
    code: Code,
    text: &str,
    when: &str,
) -> Result<()> {
    let status = match client.get("k", None).await {
        Err(etcd_client::Error::GRpcStatus(status)) => status,
        other => anyhow::bail!("{when}: a read of a deleted tenant answered {other:?}"),
    };
    ensure!(
        status.code() == code && status.message().contains(text),
        "{when}: {status:?}"
    );
    Ok(())
}

/// A deleted tenant's client: its first request says the tenant was deleted, the next one
/// resolves the tenant afresh (unknown now).
async fn refused_as_deleted(client: &mut etcd_client::Client) -> Result<()> {
    refused(
        client,
        Code::NotFound,
        "was deleted",
        "first request after the delete",
    )
    .await?;
    refused(
        client,
        Code::PermissionDenied,
        "does not exist",
        "the tenant must be resolved afresh",
    )
    .await
}

/// Two gateways share a database; a tenant deleted through one is not left half-open in the
/// other: its next request says the tenant was deleted (not an internal error), the one after
/// resolves the tenant afresh (unknown now), and once the tenant is created again it works.
async fn deleted_elsewhere(endpoint: String, dir: std::path::PathBuf) -> Result<()> {
    let (a, b) = two_gateways(&endpoint, &dir).await?;
    ok(a.admin(&["create", "tenant-a"]))?;
    let mut through_b = b.client("tenant-a").await?;
    through_b.put("k", "before", None).await?;

    ok(a.admin(&["delete", "tenant-a"]))?;
    refused_as_deleted(&mut through_b).await?;

    ok(a.admin(&["create", "tenant-a"]))?;
    let fresh = through_b.get("k", None).await?;
    ensure!(fresh.kvs().is_empty(), "the re-created tenant starts empty");
    through_b.put("k", "after", None).await?;
    Ok(())
}

/// Two gateways share a datastore; a tenant deleted through one and another created right
/// after it: the other gateway, which still had the deleted tenant open, refuses its next
/// request as deleted and never serves it the new tenant's keys (SQLite gave the new
/// keyspace the deleted one's id, whose row that gateway then found again).
async fn replaced_elsewhere(endpoint: String, dir: std::path::PathBuf) -> Result<()> {
    let (a, b) = two_gateways(&endpoint, &dir).await?;
    ok(a.admin(&["create", "tenant-a"]))?;
    let mut through_b = b.client("tenant-a").await?;
    through_b.put("k", "a's", None).await?;

    ok(a.admin(&["delete", "tenant-a"]))?;
    ok(a.admin(&["create", "tenant-b"]))?;
    let mut b_through_a = a.client("tenant-b").await?;
    b_through_a.put("k", "b's", None).await?;
    refused_as_deleted(&mut through_b).await
}

/// Two gateways share a datastore; a tenant deleted through one ends the watches another
/// gateway holds on it (as a delete in their own process does), though no request of theirs
/// came to find out.
async fn watched_elsewhere(endpoint: String, dir: std::path::PathBuf) -> Result<()> {
    let (a, b) = two_gateways(&endpoint, &dir).await?;
    ok(a.admin(&["create", "tenant-a"]))?;
    let mut through_b = b.client("tenant-a").await?;
    through_b.put("k", "v", None).await?;
    let (mut watching, _) = watch(&mut through_b, "k", None).await?;
    ok(a.admin(&["delete", "tenant-a"]))?;
    match tokio::time::timeout(Duration::from_secs(20), watching.message()).await {
        Err(_) => bail!("the watch of a tenant deleted elsewhere is still open after 20 s"),
        Ok(Err(_) | Ok(None)) => Ok(()),
        Ok(Ok(Some(response))) => bail!("watch of a deleted tenant goes on: {response:?}"),
    }
}

/// Runs `scenario` on a datastore that two processes share: a file of a temporary directory
/// for SQLite, a fresh database of its server otherwise.
async fn on_shared_datastore<F, Fut>(what: &str, backend: Backend, scenario: F)
where
    F: FnOnce(String, std::path::PathBuf) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let dir = tempfile::tempdir().expect("tempdir");
    let database = (!matches!(backend, Backend::Sqlite))
        .then(|| TestDatabase::new(backend).expect("a database server backend"));
    let endpoint = match &database {
        Some(database) => database.endpoint.clone(),
        None => format!("sqlite://{}", dir.path().join("state.db").display()),
    };
    run(what, backend, scenario(endpoint, dir.path().to_path_buf())).await;
}

macro_rules! shared_datastore_tests {
    ($($deleted:ident, $replaced:ident, $watched:ident: $backend:expr),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $deleted() {
                on_shared_datastore("deleted elsewhere", $backend, deleted_elsewhere).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $replaced() {
                on_shared_datastore("replaced elsewhere", $backend, replaced_elsewhere).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $watched() {
                on_shared_datastore("watched elsewhere", $backend, watched_elsewhere).await;
            }
        )*
    };
}

shared_datastore_tests! {
    sqlite_tenant_deleted_through_another_gateway,
        sqlite_tenant_replaced_through_another_gateway,
        sqlite_tenant_watched_through_another_gateway: Backend::Sqlite,
    postgres_tenant_deleted_through_another_gateway,
        postgres_tenant_replaced_through_another_gateway,
        postgres_tenant_watched_through_another_gateway: Backend::Postgres,
    mysql_tenant_deleted_through_another_gateway,
        mysql_tenant_replaced_through_another_gateway,
        mysql_tenant_watched_through_another_gateway: Backend::Mysql,
    nats_tenant_deleted_through_another_gateway,
        nats_tenant_replaced_through_another_gateway,
        nats_tenant_watched_through_another_gateway: Backend::Nats,
}

/// A gateway opens tenants side by side: while one tenant's creation waits on the database
/// (another transaction holds an uncommitted row of the same name), other tenants open,
/// write and read; the waiting one goes on once the row is released. A gateway restarting
/// under a thousand reconnecting apiservers opens them all at once; opening them one at a
/// time made each wait for every other's round trips.
async fn tenants_open_side_by_side() -> Result<()> {
    use std::io::Write;

    let gateway = start_gateway(Backend::Postgres, &["--gateway-create-tenants"]);
    let endpoint = gateway
        .kine
        .database
        .as_ref()
        .context("the gateway's PostgreSQL database")?
        .endpoint
        .clone();

    // Another session inserts tenant-a's row and keeps its transaction open: the gateway's
    // insert of the same name waits for it.
    let mut holder = Command::new("psql")
        .args([endpoint.as_str(), "-X", "-q", "-v", "ON_ERROR_STOP=1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .context("psql")?;
    let mut holder_input = holder.stdin.take().context("psql's stdin")?;
    writeln!(
        holder_input,
        "BEGIN; INSERT INTO keyspaces (name) VALUES ('tenant-a');"
    )?;
    holder_input.flush()?;
    let idle_in_transaction = || -> Result<bool> {
        let output = Command::new("psql")
            .args([endpoint.as_str(), "-X", "-q", "-t", "-A", "-c"])
            .arg(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND state = 'idle in transaction' AND query LIKE 'INSERT INTO keyspaces%'",
            )
            .output()?;
        Ok(String::from_utf8_lossy(&output.stdout).trim() == "1")
    };
    let mut waited = 0;
    while !idle_in_transaction()? {
        ensure!(waited < 100, "the holding transaction did not start");
        waited += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut a = gateway.client("tenant-a").await?;
    let blocked = tokio::spawn(async move { a.put("k", "a", None).await });
    // Long enough for tenant-a's open to reach the insert that waits.
    tokio::time::sleep(Duration::from_millis(500)).await;
    ensure!(
        !blocked.is_finished(),
        "tenant-a's put did not wait for its creation: {:?}",
        blocked.await
    );

    let mut b = gateway.client("tenant-b").await?;
    let beside = async {
        b.put("k", "b", None).await?;
        b.get("k", None).await
    };
    let read = tokio::time::timeout(Duration::from_secs(30), beside)
        .await
        .context("tenant-b could not open while tenant-a's creation waited")??;
    ensure!(
        read.kvs().first().map(|kv| kv.value()) == Some(b"b".as_slice()),
        "tenant-b's read: {read:?}"
    );
    ensure!(
        !blocked.is_finished(),
        "tenant-a's put finished before its row was released"
    );

    writeln!(holder_input, "ROLLBACK;")?;
    drop(holder_input);
    holder.wait()?;
    tokio::time::timeout(Duration::from_secs(30), blocked)
        .await
        .context("tenant-a's put after the row was released")???;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_tenants_open_side_by_side() {
    run(
        "tenants open side by side",
        Backend::Postgres,
        tenants_open_side_by_side(),
    )
    .await;
}
