//! The etcd proxy datastore (issue 12) beyond the conformance suite it also passes: tenants
//! of one real etcd attacking each other through a gateway (with names whose prefixes would
//! nest), two proxies sharing one etcd (freeze, leases, identical watch streams), and a
//! 3-member etcd cluster on loopback losing one member, then all, then coming back.
//!
//! etcd is the test oracle's binary (`$ETCD_BIN`, etcd 3.5.1), except the cluster whose
//! members are killed under writes: etcd 3.5.0–3.5.2 can come back from that with members one
//! revision apart (etcd-io/etcd#13766), so that cluster is the newest etcd
//! (`$ETCD_NEWEST_BIN`, built by `scripts/peers.sh`). Every etcd runs with
//! `--max-txn-ops 256`: the proxy nests a client's transaction in the one that guards the
//! tenant's freeze, and etcd counts the outer operations against the nested ones (README).

use std::collections::BTreeSet;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions, WatchStream,
};
use kine_tests::conformance::{collect_events, current_revision, expect_code, keys, watch};
use kine_tests::pki::Pki;
use kine_tests::{
    ChildGuard, etcd_newest_binary, free_port, kine_rs_binary, spawn_etcd_with, spawn_kine_on,
    wait_for_port,
};
use tonic::Code;

const ETCD_ARGS: &[&str] = &["--max-txn-ops", "256"];

fn admin_cli(socket: &str, args: &[&str]) -> Output {
    Command::new(kine_rs_binary())
        .arg("tenant")
        .args(["--admin-socket", socket])
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

async fn admin(socket: &str, args: &[&str]) -> Result<String> {
    let socket = socket.to_string();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let output = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        admin_cli(&socket, &args)
    })
    .await?;
    ok(output)
}

async fn spawn_kine(endpoint: String, args: Vec<String>) -> Result<ChildGuard> {
    Ok(tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        spawn_kine_on(&endpoint, tempfile::tempdir().expect("tempdir"), &args)
    })
    .await?)
}

async fn connect(endpoint: &str, options: Option<ConnectOptions>) -> Result<Client> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut client) = Client::connect([endpoint], options.clone()).await
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

fn all_keys() -> Option<GetOptions> {
    Some(GetOptions::new().with_all_keys())
}

fn code_of<T: std::fmt::Debug>(result: Result<T, etcd_client::Error>) -> Option<Code> {
    match result {
        Err(etcd_client::Error::GRpcStatus(status)) => Some(status.code()),
        _ => None,
    }
}

/// Tenant `a` attacks tenant `ab` (whose prefix `/ab/` would contain `/a` without the
/// separator) through one gateway on a shared etcd: nothing of `ab` is seen or changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_attack_each_other_through_a_gateway() -> Result<()> {
    let etcd = spawn_etcd_with(ETCD_ARGS);
    let dir = tempfile::tempdir()?;
    let pki = Pki::write(dir.path(), &["a", "ab", "unknown", "x'; DROP TABLE kv; --"]);
    let socket = dir.path().join("admin.sock").display().to_string();
    let kine = spawn_kine(
        format!("etcd://{}", etcd.address),
        [
            "--gateway",
            "--server-cert-file",
            &pki.server_cert,
            "--server-key-file",
            &pki.server_key,
            "--trusted-ca-file",
            &pki.ca,
            "--admin-socket",
            &socket,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    )
    .await?;
    let client = |name: &str| {
        let (cert, key) = pki.client(name);
        let tls = TlsOptions::new()
            .domain_name("localhost")
            .ca_certificate(Certificate::from_pem(std::fs::read(&pki.ca).expect("ca")))
            .identity(Identity::from_pem(
                std::fs::read(cert).expect("cert"),
                std::fs::read(key).expect("key"),
            ));
        let options = ConnectOptions::new()
            .with_tls(tls)
            .with_connect_timeout(Duration::from_secs(5));
        let endpoint = format!("https://{}", kine.address);
        async move { Ok::<_, anyhow::Error>(Client::connect([endpoint], Some(options)).await?) }
    };
    let mut raw = Client::connect([etcd.endpoint.as_str()], None).await?;

    // Unknown tenants are refused; hostile names cannot be created.
    let mut unknown = client("unknown").await?;
    expect_code(unknown.get("k", None).await, Code::PermissionDenied)?;
    let hostile = admin_cli(&socket, &["create", "x'; DROP TABLE kv; --"]);
    ensure!(!hostile.status.success(), "created a hostile tenant");
    let mut hostile_client = client("x'; DROP TABLE kv; --").await?;
    expect_code(hostile_client.get("k", None).await, Code::PermissionDenied)?;
    admin(&socket, &["create", "a"]).await?;
    admin(&socket, &["create", "ab"]).await?;
    let mut a = client("a").await?;
    let mut b = client("ab").await?;

    // B's data: keys everywhere in its key space, a lease with a key, some history.
    let first = b.put("shared/x", "b1", None).await?;
    let b1_revision = first.header().context("header")?.revision();
    for (key, value) in [("\u{1}", "b"), ("shared/x", "b2"), ("zzz", "b")] {
        b.put(key, value, None).await?;
    }
    let lease_b = b.lease_grant(600, None).await?.id();
    b.put("b-leased", "b", Some(PutOptions::new().with_lease(lease_b)))
        .await?;

    // A's watch over everything, from now on.
    let (mut a_watch, _) = watch(&mut a, "", Some(WatchOptions::new().with_all_keys())).await?;
    a.put("shared/x", "a", None).await?;

    // Ranges over everything: `\0` range end, from-key `\0`, counts, an old revision.
    let all = a.get("", all_keys()).await?;
    ensure!(
        keys(all.kvs()) == ["shared/x"],
        "A sees {:?}",
        keys(all.kvs())
    );
    ensure!(all.count() == 1, "A counts {}", all.count());
    let from_nul = a.get("\0", Some(GetOptions::new().with_from_key())).await?;
    ensure!(keys(from_nul.kvs()) == ["shared/x"], "from \\0");
    let back_then = a
        .get(
            "",
            Some(GetOptions::new().with_all_keys().with_revision(b1_revision)),
        )
        .await?;
    ensure!(
        back_then.kvs().is_empty(),
        "A at B's revision sees {:?}",
        keys(back_then.kvs())
    );
    let range = a
        .get("a", Some(GetOptions::new().with_range("\u{ff}")))
        .await?;
    ensure!(
        range.count() == 1,
        "a range past the end counts {}",
        range.count()
    );

    // Txn compares on B's keys see A's keyspace only.
    let response = a
        .txn(
            Txn::new()
                .when([
                    Compare::version("zzz", CompareOp::Greater, 0),
                    Compare::value("shared/x", CompareOp::Equal, "b2"),
                ])
                .and_then([TxnOp::put("leak", "yes", None)])
                .or_else([TxnOp::get("b-leased", None)]),
        )
        .await?;
    ensure!(
        !response.succeeded(),
        "a compare on B's keys succeeded in A"
    );

    // B's lease: unknown to A in every call.
    if let Ok((mut keeper, mut responses)) = a.lease_keep_alive(lease_b).await {
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
    expect_code(
        a.put("mine", "v", Some(PutOptions::new().with_lease(lease_b)))
            .await,
        Code::NotFound,
    )?;
    let in_txn = a
        .txn(Txn::new().and_then([TxnOp::put(
            "mine",
            "v",
            Some(PutOptions::new().with_lease(lease_b)),
        )]))
        .await;
    ensure!(
        code_of(in_txn) == Some(Code::NotFound),
        "a txn attached A's key to B's lease"
    );
    let b_ttl = b
        .lease_time_to_live(
            lease_b,
            Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys()),
        )
        .await?;
    ensure!(b_ttl.ttl() > 0, "B's lease was revoked through A");
    ensure!(
        b_ttl
            .keys()
            .iter()
            .map(|k| k.as_slice())
            .collect::<Vec<_>>()
            == [b"b-leased".as_slice()],
        "B's lease keys: {:?}",
        b_ttl.keys()
    );
    ensure!(b.leases().await?.leases().len() == 1, "B's own leases");

    // Compaction of A leaves B's history alone; A's reads below it fail as etcd's do.
    let a_revision = current_revision(&mut a).await?;
    a.compact(a_revision, None).await?;
    let b_old = b
        .get(
            "shared/x",
            Some(GetOptions::new().with_revision(b1_revision)),
        )
        .await?;
    ensure!(
        b_old.kvs().first().map(|kv| kv.value()) == Some(b"b1".as_slice()),
        "B's history was compacted by A"
    );
    expect_code(
        a.get(
            "shared/x",
            Some(GetOptions::new().with_revision(a_revision - 1)),
        )
        .await,
        Code::OutOfRange,
    )?;

    // Status: A's own size, unmoved by B's writes.
    let own_bytes = ("shared/x".len() + "a".len()) as i64;
    ensure!(a.status().await?.db_size() == own_bytes, "A's db size");
    for i in 0..5 {
        b.put(format!("b/{i}"), vec![7u8; 1000], None).await?;
    }
    ensure!(
        a.status().await?.db_size() == own_bytes,
        "A's status moved when B wrote"
    );

    // A deletes everything it can see: B keeps all its keys.
    let b_keys = b.get("", all_keys()).await?.count();
    let deleted = a
        .delete("", Some(etcd_client::DeleteOptions::new().with_all_keys()))
        .await?;
    ensure!(deleted.deleted() == 1, "A deleted {}", deleted.deleted());
    ensure!(
        b.get("", all_keys()).await?.count() == b_keys,
        "A's delete reached B"
    );

    // A's watch: A's events only, keys without the prefix.
    a.put("marker", "m", None).await?;
    let events = collect_events(&mut a_watch, 3).await?;
    let seen: Vec<(String, String)> = events
        .iter()
        .map(|e| (e.key.clone(), e.value.clone()))
        .collect();
    ensure!(
        seen == [
            ("shared/x".to_string(), "a".to_string()),
            ("shared/x".to_string(), String::new()),
            ("marker".to_string(), "m".to_string()),
        ],
        "A's watch saw {seen:?}"
    );

    // In the shared etcd, each tenant's keys are under its own prefix.
    let stored = raw
        .get("/a/", Some(GetOptions::new().with_prefix()))
        .await?;
    ensure!(
        keys(stored.kvs()) == ["/a/marker"],
        "{:?}",
        keys(stored.kvs())
    );
    let stored_b = raw
        .get("/ab/", Some(GetOptions::new().with_prefix()))
        .await?;
    ensure!(
        stored_b.count() == b_keys,
        "B's keys in etcd: {}",
        stored_b.count()
    );

    // Freeze of A: A's writes are refused, its reads go on; B writes on.
    admin(&socket, &["freeze", "a"]).await?;
    expect_code(a.put("k", "v", None).await, Code::FailedPrecondition)?;
    expect_code(a.delete("marker", None).await, Code::FailedPrecondition)?;
    expect_code(a.lease_grant(60, None).await, Code::FailedPrecondition)?;
    ensure!(
        a.get("marker", None).await?.count() == 1,
        "A's reads while frozen"
    );
    b.put("b-while-a-frozen", "v", None).await?;
    let status = admin(&socket, &["status", "a", "-o", "json"]).await?;
    ensure!(status.contains("\"frozen\":true"), "{status}");
    admin(&socket, &["unfreeze", "a"]).await?;
    a.put("k", "v", None).await?;

    // Deleting a tenant removes its keys and records, and nothing of the other.
    admin(&socket, &["delete", "a", "--force"]).await?;
    ensure!(
        raw.get("/a/", Some(GetOptions::new().with_prefix()))
            .await?
            .count()
            == 0,
        "A's keys"
    );
    ensure!(
        b.get("", all_keys()).await?.count() == b_keys + 1,
        "B after A's deletion"
    );
    let list = admin(&socket, &["list"]).await?;
    ensure!(
        list.contains("ab")
            && !list
                .lines()
                .any(|l| l.split_whitespace().next() == Some("a")),
        "{list}"
    );
    drop(kine);
    Ok(())
}

/// Two sidecar proxies of one tenant on one etcd: a freeze through one stops the writes of
/// both, atomically; leases and watches are the same through either.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_proxies_share_a_tenant() -> Result<()> {
    let etcd = spawn_etcd_with(ETCD_ARGS);
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("admin.sock").display().to_string();
    let endpoint = format!("etcd://{}", etcd.address);
    let args = |extra: &[&str]| -> Vec<String> {
        ["--tenant", "shared-t"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let p1 = spawn_kine(endpoint.clone(), args(&["--admin-socket", &socket])).await?;
    let p2 = spawn_kine(endpoint.clone(), args(&[])).await?;
    let mut c1 = connect(&p1.endpoint, None).await?;
    let mut c2 = connect(&p2.endpoint, None).await?;
    let mut raw = Client::connect([etcd.endpoint.as_str()], None).await?;

    // Leases through either proxy.
    let lease = c1.lease_grant(60, None).await?.id();
    c2.put("leased", "x", Some(PutOptions::new().with_lease(lease)))
        .await?;
    let (mut keeper, mut renewals) = c2.lease_keep_alive(lease).await?;
    keeper.keep_alive().await?;
    let renewed = renewals.message().await?.context("keep-alive answer")?;
    ensure!(renewed.ttl() == 60, "{renewed:?}");
    let ttl = c1
        .lease_time_to_live(
            lease,
            Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys()),
        )
        .await?;
    ensure!(ttl.keys() == [b"leased".to_vec()], "{ttl:?}");
    c2.lease_revoke(lease).await?;
    ensure!(
        c1.lease_time_to_live(lease, None).await?.ttl() == -1,
        "revoked through p2"
    );
    ensure!(
        c1.get("leased", None).await?.count() == 0,
        "the leased key went with it"
    );

    // The same watch through both proxies.
    let start = current_revision(&mut c1).await? + 1;
    let options = || {
        Some(
            WatchOptions::new()
                .with_prefix()
                .with_start_revision(start)
                .with_prev_key(),
        )
    };
    let (mut w1, _) = watch(&mut c1, "w/", options()).await?;
    let (mut w2, _) = watch(&mut c2, "w/", options()).await?;

    // Writers on both, then a freeze through p1's admin socket.
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
                                "{key} acknowledged at {revision} after the freeze"
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
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while c1
        .get(
            "w/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await?
        .count()
        < 60
    {
        ensure!(tokio::time::Instant::now() < deadline, "writers are stuck");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    admin(&socket, &["freeze", "shared-t"]).await?;
    frozen.store(true, Ordering::SeqCst);
    let record = raw.get("/_kine-rs/frozen/shared-t", None).await?;
    let freeze_revision = record
        .kvs()
        .first()
        .context("the freeze record")?
        .mod_revision();
    let mut acknowledged = BTreeSet::new();
    for task in tasks {
        for revision in task.await?? {
            ensure!(
                revision < freeze_revision,
                "a write landed at {revision} after the freeze at {freeze_revision}"
            );
            ensure!(acknowledged.insert(revision), "revision {revision} twice");
        }
    }
    let stored = raw
        .get("/shared-t/w/", Some(GetOptions::new().with_prefix()))
        .await?;
    ensure!(
        stored.count() as usize == acknowledged.len(),
        "{} keys, {} acknowledged",
        stored.count(),
        acknowledged.len()
    );
    ensure!(
        stored
            .kvs()
            .iter()
            .all(|kv| kv.mod_revision() < freeze_revision),
        "a key written after the freeze"
    );

    // Both watches saw exactly the acknowledged writes, in order, the same through both.
    let e1 = collect_events(&mut w1, acknowledged.len()).await?;
    let e2 = collect_events(&mut w2, acknowledged.len()).await?;
    let revisions: Vec<i64> = e1.iter().map(|e| e.revision).collect();
    ensure!(
        revisions == acknowledged.iter().copied().collect::<Vec<_>>(),
        "watch through p1 differs from the writes"
    );
    let as_tuples = |events: &[kine_tests::conformance::Seen]| -> Vec<(String, i64)> {
        events.iter().map(|e| (e.key.clone(), e.revision)).collect()
    };
    ensure!(
        as_tuples(&e1) == as_tuples(&e2),
        "the two proxies' watches differ"
    );
    ensure!(
        e1.iter().all(|e| e.key.starts_with("w/")),
        "keys carry the prefix"
    );

    admin(&socket, &["unfreeze", "shared-t"]).await?;
    c2.put("after", "v", None).await?;
    drop((p1, p2));
    Ok(())
}

/// One member of a loopback etcd cluster, restartable on the same data and ports.
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    cluster: String,
    data: std::path::PathBuf,
    child: Option<Child>,
}

impl Member {
    fn start(&mut self) {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut child = Command::new(etcd_newest_binary())
            .args(["--name", &self.name])
            .arg("--data-dir")
            .arg(&self.data)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &self.cluster])
            .args([
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "kine-rs-test",
            ])
            .args(["--log-level", "error"])
            .args(ETCD_ARGS)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd (scripts/test.sh installs it)");
        wait_for_port(
            &format!("127.0.0.1:{}", self.client_port),
            &mut child,
            "etcd member",
        );
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

fn cluster(dir: &std::path::Path) -> Vec<Member> {
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let cluster = ports
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
        .collect::<Vec<_>>()
        .join(",");
    ports
        .into_iter()
        .enumerate()
        .map(|(i, (client_port, peer_port))| Member {
            name: format!("m{i}"),
            client_port,
            peer_port,
            cluster: cluster.clone(),
            data: dir.join(format!("m{i}")),
            child: None,
        })
        .collect()
}

/// Writes `key` once, retrying for up to `within` while the cluster cannot answer; the
/// revision it was written at. Each try creates the key only if it is absent, so a try that
/// was applied but whose answer was lost (a member dying under it) is not written twice.
async fn put_retrying(client: &mut Client, key: &str, within: Duration) -> Result<i64> {
    let deadline = tokio::time::Instant::now() + within;
    let create = Txn::new()
        .when([Compare::version(key, CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key, "v", None)])
        .or_else([TxnOp::get(key, None)]);
    loop {
        match client.txn(create.clone()).await {
            Ok(r) if r.succeeded() => return Ok(r.header().context("header")?.revision()),
            Ok(r) => {
                let kv = r
                    .op_responses()
                    .into_iter()
                    .find_map(|op| match op {
                        TxnOpResponse::Get(get) => get.kvs().first().cloned(),
                        _ => None,
                    })
                    .context("the key exists but its read found nothing")?;
                return Ok(kv.mod_revision());
            }
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => bail!("{key}: {e}"),
        }
    }
}

/// Every event of `stream` until `count` arrived: (key, revision).
async fn events_of(stream: &mut WatchStream, count: usize) -> Result<Vec<(String, i64)>> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < count {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let response = tokio::time::timeout(left, stream.message())
            .await
            .context(format!("{} of {count} events", seen.len()))??
            .context("the watch stream ended")?;
        ensure!(!response.canceled(), "the watch was canceled: {response:?}");
        for event in response.events() {
            ensure!(event.event_type() == EventType::Put, "{event:?}");
            let kv = event.kv().context("kv")?;
            seen.push((kv.key_str()?.to_string(), kv.mod_revision()));
        }
    }
    Ok(seen)
}

/// A 3-member etcd cluster: the proxy serves through the others while one member is down;
/// with all down, requests fail `Unavailable`; once they are back it serves again by itself,
/// and a watch opened before it all sees every write once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_members_go_down_and_come_back() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut members = cluster(dir.path());
    // Members of a new cluster wait for each other: start them side by side.
    let started: Vec<Member> = members
        .drain(..)
        .map(|mut member| {
            std::thread::spawn(move || {
                member.start();
                member
            })
        })
        .map(|handle| handle.join().expect("member start"))
        .collect();
    let mut members = started;
    let endpoint = format!(
        "etcd://{}",
        members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect::<Vec<_>>()
            .join(",")
    );
    let kine = spawn_kine(endpoint, vec!["--tenant".into(), "t".into()]).await?;
    let mut c = connect(&kine.endpoint, None).await?;
    let (mut w, _) = watch(&mut c, "k/", Some(WatchOptions::new().with_prefix())).await?;

    let mut written = Vec::new();
    for i in 0..10 {
        let key = format!("k/{i:03}");
        written.push((
            key.clone(),
            put_retrying(&mut c, &key, Duration::ZERO).await?,
        ));
    }
    // One member down: the proxy serves through the others (a request caught on the dying
    // connection may fail once, as with etcd's own clients).
    members[0].kill();
    for i in 10..30 {
        let key = format!("k/{i:03}");
        written.push((
            key.clone(),
            put_retrying(&mut c, &key, Duration::from_secs(15)).await?,
        ));
    }
    ensure!(
        c.get(
            "k/",
            Some(GetOptions::new().with_prefix().with_count_only())
        )
        .await?
        .count()
            == 30,
        "reads with a member down"
    );
    // All down: Unavailable, no hang.
    for member in &mut members {
        member.kill();
    }
    let answer = tokio::time::timeout(Duration::from_secs(30), c.put("k/down", "v", None)).await?;
    ensure!(
        code_of(answer) == Some(Code::Unavailable),
        "a write with every member down"
    );
    // Back: serving again by itself; the watch resumes without loss or repeat.
    let restarted: Vec<Member> = members
        .drain(..)
        .map(|mut member| {
            std::thread::spawn(move || {
                member.start();
                member
            })
        })
        .map(|handle| handle.join().expect("member restart"))
        .collect();
    let _members = restarted;
    for i in 30..40 {
        let key = format!("k/{i:03}");
        written.push((
            key.clone(),
            put_retrying(&mut c, &key, Duration::from_secs(60)).await?,
        ));
    }
    let seen = events_of(&mut w, written.len()).await?;
    ensure!(
        seen == written,
        "the watch saw {seen:?}\nwrites were {written:?}"
    );
    // Nothing more (no repeats) within a moment.
    let extra = tokio::time::timeout(Duration::from_secs(2), w.message()).await;
    if let Ok(Ok(Some(response))) = extra {
        ensure!(
            response.events().is_empty(),
            "a repeated event: {response:?}"
        );
    }
    drop(kine);
    Ok(())
}

/// A number field of `kine-rs tenant … -o json` output.
fn json_number(text: &str, field: &str) -> Result<i64> {
    let value: serde_json::Value = serde_json::from_str(text.trim())?;
    value
        .get(field)
        .and_then(|v| v.as_i64())
        .context(format!("{field} in {text}"))
}

/// Quotas on the etcd datastore: keys and bytes, etcd's error, deletes pass; the usage kept
/// by two proxies writing at once equals a count of the tenant's keys; a quota set on a
/// tenant with data counts it first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quotas_kept_in_etcd_by_two_proxies() -> Result<()> {
    let etcd = spawn_etcd_with(ETCD_ARGS);
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("admin.sock").display().to_string();
    let endpoint = format!("etcd://{}", etcd.address);
    let args = |extra: &[&str]| -> Vec<String> {
        ["--tenant", "q"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let p1 = spawn_kine(endpoint.clone(), args(&["--admin-socket", &socket])).await?;
    let p2 = spawn_kine(endpoint.clone(), args(&[])).await?;
    let mut c1 = connect(&p1.endpoint, None).await?;
    let mut c2 = connect(&p2.endpoint, None).await?;

    // Data before any quota; then a quota of 3 keys counts it.
    c1.put("k1", "x", None).await?;
    admin(&socket, &["set-quota", "q", "--keys", "3"]).await?;
    let status = admin(&socket, &["status", "q", "-o", "json"]).await?;
    ensure!(json_number(&status, "keys")? == 1, "{status}");
    c2.put("k2", "x", None).await?;
    c1.put("k3", "x", None).await?;
    let over = c2.put("k4", "x", None).await;
    let Err(etcd_client::Error::GRpcStatus(over)) = over else {
        bail!("a fourth key passed a quota of 3: {over:?}");
    };
    ensure!(
        over.code() == Code::ResourceExhausted
            && over.message() == "etcdserver: mvcc: database space exceeded",
        "{over:?}"
    );
    // Overwrites and deletes pass; a transaction counts the puts of both branches.
    c1.put("k3", "overwrite", None).await?;
    c2.delete("k3", None).await?;
    let txn = Txn::new()
        .when([Compare::version("k1", CompareOp::Equal, 1)])
        .and_then([TxnOp::put("t1", "v", None)])
        .or_else([TxnOp::put("t2", "v", None)]);
    ensure!(
        code_of(c1.txn(txn).await) == Some(Code::ResourceExhausted),
        "two new keys in a tenant with room for one"
    );
    c1.put("k4", "x", None).await?;

    // Bytes, with room for the writers below.
    admin(&socket, &["set-quota", "q", "--bytes", "100000"]).await?;
    expect_code(
        c1.put("big", vec![0u8; 200_000], None).await,
        Code::ResourceExhausted,
    )?;

    // Two proxies, several writers each, puts, overwrites and deletes at once: the usage
    // record is exact.
    let mut tasks = Vec::new();
    for (p, client) in [(1, &c1), (2, &c2)] {
        for w in 0..3 {
            let mut client = client.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..30 {
                    let key = format!("w/{}", (i * 7 + w) % 20);
                    let value = "v".repeat((p * 10 + i) % 40);
                    if i % 5 == 4 {
                        client.delete(key, None).await?;
                    } else {
                        client.put(key, value, None).await?;
                    }
                }
                Ok::<_, anyhow::Error>(())
            }));
        }
    }
    for task in tasks {
        task.await??;
    }
    let all = c1.get("", Some(GetOptions::new().with_all_keys())).await?;
    let keys = all.kvs().len() as i64;
    let bytes: i64 = all
        .kvs()
        .iter()
        .map(|kv| (kv.key().len() + kv.value().len()) as i64)
        .sum();
    let status = admin(&socket, &["status", "q", "-o", "json"]).await?;
    ensure!(
        json_number(&status, "keys")? == keys && json_number(&status, "bytes")? == bytes,
        "usage {status} differs from the tenant's {keys} keys and {bytes} bytes"
    );
    ensure!(
        c2.status().await?.db_size() == bytes,
        "Status reports the usage"
    );

    // No quota: writes are plain again, and any size passes.
    admin(&socket, &["set-quota", "q"]).await?;
    c2.put("big", vec![0u8; 200_000], None).await?;
    drop((p1, p2));
    Ok(())
}

/// Whether `key` of `client`'s tenant exists.
async fn exists(client: &mut Client, key: &str) -> Result<bool> {
    Ok(client.get(key, None).await?.count() == 1)
}

/// Waits up to `within` for `key` to be gone.
async fn gone_within(client: &mut Client, key: &str, within: Duration) -> Result<bool> {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if !exists(client, key).await? {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(false)
}

/// Lease expiry is a write (it deletes the lease's keys), so a frozen tenant's leases do not
/// expire, as on the other datastores: the proxy renews them while the freeze lasts, whether
/// it froze the tenant itself (admin socket) or another process wrote the freeze record (as
/// `kine-rs migrate` does). A revoke is refused and deletes nothing. After the unfreeze the
/// leases run out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_of_a_frozen_tenant_do_not_expire() -> Result<()> {
    let etcd = spawn_etcd_with(ETCD_ARGS);
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("admin.sock").display().to_string();
    let kine = spawn_kine(
        format!("etcd://{}", etcd.address),
        ["--tenant", "ft", "--admin-socket", &socket]
            .iter()
            .map(|s| s.to_string())
            .collect(),
    )
    .await?;
    let mut client = connect(&kine.endpoint, None).await?;
    let mut raw = Client::connect([etcd.endpoint.as_str()], None).await?;
    // Longer than the 2 s leases below live without renewal.
    let frozen_for = Duration::from_secs(5);

    // Frozen through this proxy.
    let lease = client.lease_grant(2, None).await?.id();
    client
        .put("leased", "v", Some(PutOptions::new().with_lease(lease)))
        .await?;
    admin(&socket, &["freeze", "ft"]).await?;
    tokio::time::sleep(frozen_for).await;
    ensure!(
        exists(&mut client, "leased").await?,
        "a lease expired while its tenant was frozen (admin freeze)"
    );
    expect_code(client.lease_revoke(lease).await, Code::FailedPrecondition)?;
    ensure!(
        exists(&mut client, "leased").await?,
        "a refused revoke deleted the key"
    );
    admin(&socket, &["unfreeze", "ft"]).await?;
    ensure!(
        gone_within(&mut client, "leased", Duration::from_secs(15)).await?,
        "the lease did not expire after the unfreeze"
    );

    // Frozen by another process: the freeze record written into etcd directly.
    let lease = client.lease_grant(2, None).await?.id();
    client
        .put("leased2", "v", Some(PutOptions::new().with_lease(lease)))
        .await?;
    raw.put("/_kine-rs/frozen/ft", "1", None).await?;
    tokio::time::sleep(frozen_for).await;
    ensure!(
        exists(&mut client, "leased2").await?,
        "a lease expired while its tenant was frozen (freeze record from elsewhere)"
    );
    raw.delete("/_kine-rs/frozen/ft", None).await?;
    ensure!(
        gone_within(&mut client, "leased2", Duration::from_secs(15)).await?,
        "the lease did not expire after the freeze record went"
    );
    Ok(())
}

/// What etcd answers a transaction (succeeded, or the error's code and message), and which
/// of `keys` it left (without `base`).
async fn txn_outcome(client: &mut Client, base: &str, txn: Txn, keys: &[&str]) -> Result<String> {
    let answer = match client.txn(txn).await {
        Ok(response) => format!("succeeded {}", response.succeeded()),
        Err(etcd_client::Error::GRpcStatus(status)) => {
            format!("{:?}: {}", status.code(), status.message())
        }
        Err(error) => return Err(error.into()),
    };
    let mut present = Vec::new();
    for key in keys {
        if client.get(*key, None).await?.count() > 0 {
            present.push(key.strip_prefix(base).unwrap_or(key));
        }
    }
    Ok(format!("{answer}; keys {present:?}"))
}

/// etcd checks the leases of the branch a transaction takes only: a lease that does not
/// exist, or that another tenant holds, in the branch not taken does not stop the
/// transaction; in the branch taken it does (`requested lease not found`, nothing written),
/// after an earlier put with `ignore_value` of a missing key (`key not found`) in the same
/// order as etcd; at any depth of nested transactions, whose branch not taken stops nothing
/// either. The same through the proxy as on etcd directly, with and without a quota.
/// (Through the proxy, a nested transaction's leases used to count for the branch holding
/// it, so a lease in the branch a nested transaction does not take refused it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_check_the_leases_of_the_branch_taken() -> Result<()> {
    let etcd = spawn_etcd_with(ETCD_ARGS);
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("admin.sock").display().to_string();
    let kine = spawn_kine(
        format!("etcd://{}", etcd.address),
        ["--tenant", "lb", "--admin-socket", &socket]
            .iter()
            .map(|s| s.to_string())
            .collect(),
    )
    .await?;
    let mut proxied = connect(&kine.endpoint, None).await?;
    // etcd directly, in keys of its own (no tenant prefix covers `/direct/`).
    let mut direct = Client::connect([etcd.endpoint.as_str()], None).await?;
    let own_proxied = proxied.lease_grant(600, None).await?.id();
    let own_direct = direct.lease_grant(600, None).await?.id();
    // Granted in etcd, not by the tenant: another tenant's, as far as the proxy is concerned.
    let foreign = direct.lease_grant(600, None).await?.id();
    let unknown = 0x7e57_1ea5e;
    // The one id the proxy sends for a lease the tenant does not own: never granted.
    let reserved = proxied
        .lease_grant(
            600,
            Some(etcd_client::LeaseGrantOptions::new().with_id(i64::MIN)),
        )
        .await;
    ensure!(
        matches!(&reserved, Err(etcd_client::Error::GRpcStatus(status))
            if status.message() == "etcdserver: lease already exists"),
        "granting lease {}: {reserved:?}",
        i64::MIN
    );

    let with_lease = |lease| Some(PutOptions::new().with_lease(lease));
    for quota in [false, true] {
        if quota {
            admin(&socket, &["set-quota", "lb", "--keys", "1000"]).await?;
        }
        for (case, lease) in [("unknown", unknown), ("foreign", foreign)] {
            // (client, key prefix, the tenant's own lease, the lease it must not use): to a
            // tenant, another's lease is one that does not exist.
            let mut outcomes = Vec::new();
            for (client, base, own, lease) in [
                (&mut proxied, "", own_proxied, lease),
                (&mut direct, "/direct/", own_direct, unknown),
            ] {
                let key = |name: &str| format!("{base}{quota}/{case}/{name}");
                let (k1, k2, k3, k4) = (key("k1"), key("k2"), key("k3"), key("k4"));
                let missing = key("missing");
                let keys = [k1.as_str(), k2.as_str(), k3.as_str(), k4.as_str()];
                let absent = || Compare::version(key("absent"), CompareOp::Greater, 0);
                let mut outcome = Vec::new();
                // The lease in the branch not taken, either one.
                let txn = Txn::new()
                    .when([absent()])
                    .and_then([TxnOp::put(k1.as_str(), "v", with_lease(lease))])
                    .or_else([TxnOp::put(k2.as_str(), "v", with_lease(own))]);
                outcome.push(txn_outcome(client, base, txn, &keys).await?);
                let txn = Txn::new()
                    .and_then([TxnOp::put(k3.as_str(), "v", None)])
                    .or_else([TxnOp::put(k4.as_str(), "v", with_lease(lease))]);
                outcome.push(txn_outcome(client, base, txn, &keys).await?);
                // In the branch taken: refused, nothing written.
                let txn = Txn::new().when([absent()]).or_else([
                    TxnOp::put(k1.as_str(), "w", None),
                    TxnOp::put(k2.as_str(), "w", with_lease(lease)),
                ]);
                outcome.push(txn_outcome(client, base, txn, &keys).await?);
                // Both refusals in one branch: the first in order is answered.
                let ignore = Some(PutOptions::new().with_ignore_value());
                let txn = Txn::new().and_then([
                    TxnOp::put(missing.as_str(), "", ignore.clone()),
                    TxnOp::put(k1.as_str(), "w", with_lease(lease)),
                ]);
                outcome.push(txn_outcome(client, base, txn, &keys).await?);
                let txn = Txn::new().and_then([
                    TxnOp::put(k1.as_str(), "w", with_lease(lease)),
                    TxnOp::put(missing.as_str(), "", ignore),
                ]);
                outcome.push(txn_outcome(client, base, txn, &keys).await?);
                // The branch taken by a value compare, told apart by the error.
                client.put(k4.as_str(), "x", None).await?;
                let ignore = Some(PutOptions::new().with_ignore_value());
                let txn = Txn::new()
                    .when([Compare::value(k4.as_str(), CompareOp::Equal, "x")])
                    .and_then([TxnOp::put(k1.as_str(), "w", with_lease(lease))])
                    .or_else([TxnOp::put(missing.as_str(), "", ignore)]);
                outcome.push(txn_outcome(client, base, txn, &keys).await?);
                // In a nested transaction: the branch it does not take stops nothing...
                client.delete(k1.as_str(), None).await?;
                let nested = |then: TxnOp, or_else: TxnOp| {
                    Txn::new()
                        .when([Compare::value(k4.as_str(), CompareOp::Equal, "x")])
                        .and_then([then])
                        .or_else([or_else])
                };
                let txn = Txn::new().and_then([
                    TxnOp::put(k1.as_str(), "n", None),
                    TxnOp::txn(nested(
                        TxnOp::put(k2.as_str(), "n", with_lease(own)),
                        TxnOp::put(k3.as_str(), "n", with_lease(lease)),
                    )),
                ]);
                outcome.push(txn_outcome(client, base, txn, &keys).await?);
                // ...the branch it takes refuses the whole transaction, its enclosing
                // branch's earlier put included...
                client.delete(k1.as_str(), None).await?;
                let txn = Txn::new().and_then([
                    TxnOp::put(k1.as_str(), "n", None),
                    TxnOp::txn(nested(
                        TxnOp::put(k3.as_str(), "n", with_lease(lease)),
                        TxnOp::put(k2.as_str(), "n", with_lease(own)),
                    )),
                ]);
                outcome.push(txn_outcome(client, base, txn, &keys).await?);
                // ...in etcd's order, whichever comes first on the path taken.
                let ignore = Some(PutOptions::new().with_ignore_value());
                let txn = Txn::new().and_then([
                    TxnOp::txn(nested(
                        TxnOp::put(missing.as_str(), "", ignore.clone()),
                        TxnOp::put(k2.as_str(), "n", None),
                    )),
                    TxnOp::put(k1.as_str(), "n", with_lease(lease)),
                ]);
                outcome.push(txn_outcome(client, base, txn, &keys).await?);
                let txn = Txn::new().and_then([
                    TxnOp::put(k1.as_str(), "n", with_lease(lease)),
                    TxnOp::txn(nested(
                        TxnOp::put(missing.as_str(), "", ignore.clone()),
                        TxnOp::put(k2.as_str(), "n", None),
                    )),
                ]);
                outcome.push(txn_outcome(client, base, txn, &keys).await?);
                // One put with both: in a transaction, etcd looks for the missing key first;
                // a put alone, for the lease first.
                let both = Some(PutOptions::new().with_ignore_value().with_lease(lease));
                let txn = Txn::new().and_then([TxnOp::put(missing.as_str(), "", both.clone())]);
                outcome.push(txn_outcome(client, base, txn, &keys).await?);
                let alone = match client.put(missing.as_str(), "", both.clone()).await {
                    Ok(_) => "succeeded".to_string(),
                    Err(etcd_client::Error::GRpcStatus(status)) => {
                        format!("{:?}: {}", status.code(), status.message())
                    }
                    Err(error) => return Err(error.into()),
                };
                outcome.push(alone);
                let txn = Txn::new().and_then([TxnOp::put(k4.as_str(), "", both)]);
                outcome.push(txn_outcome(client, base, txn, &keys).await?);
                outcomes.push(outcome);
            }
            let direct_outcome = outcomes.pop().context("direct")?;
            let proxied_outcome = outcomes.pop().context("proxied")?;
            ensure!(
                proxied_outcome == direct_outcome,
                "a {case} lease (quota {quota}): through the proxy {proxied_outcome:#?}, \
                 etcd {direct_outcome:#?}"
            );
        }
    }
    Ok(())
}

/// What a watch stream answers to `requests` (sent in order): every response until none
/// comes for a second, with its id, flags, compact revision and reason, sorted (etcd sends
/// a compaction's cancel when its watchers next sync, not in the order of the requests).
async fn watch_answers(
    endpoint: &str,
    requests: Vec<kine_proto::etcdserverpb::WatchRequest>,
) -> Result<Vec<String>> {
    use kine_proto::etcdserverpb::watch_client::WatchClient;
    let mut client = WatchClient::connect(endpoint.to_string()).await?;
    let (sender, receiver) = tokio::sync::mpsc::channel(8);
    for request in requests {
        sender.send(request).await?;
    }
    let mut responses = client
        .watch(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await?
        .into_inner();
    let mut answers = Vec::new();
    while let Ok(response) = tokio::time::timeout(Duration::from_secs(1), responses.message()).await
    {
        let Some(response) = response? else { break };
        answers.push(format!(
            "id {} created {} canceled {} compacted {} {:?}",
            response.watch_id,
            response.created,
            response.canceled,
            response.compact_revision > 0,
            response.cancel_reason
        ));
    }
    answers.sort();
    Ok(answers)
}

/// A watch stream whose first request cancels a watch it does not have (etcd answers
/// nothing), then creates one, then one whose range ends before its key (refused), then,
/// after a compaction, one starting below it (canceled) and one reusing its id with an
/// empty range (refused for the range first, as etcd checks it before the id), and, on
/// another stream, one with a chosen id starting below the compaction (canceled) and then
/// watches whose ids etcd picks (skipping the canceled one's, which it keeps until the client
/// cancels it): the same answers through the proxy as from etcd directly. (Through the proxy,
/// such a first cancel used to open the stream to etcd, which never answered it, and the
/// stream hung; and the proxy's own cancel of the compacted watch freed its id on the stream
/// to etcd, which then gave it to the next watch.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_answer_as_etcd() -> Result<()> {
    use kine_proto::etcdserverpb::watch_request::RequestUnion;
    use kine_proto::etcdserverpb::{WatchCancelRequest, WatchCreateRequest, WatchRequest};
    let etcd = spawn_etcd_with(ETCD_ARGS);
    let kine = spawn_kine(
        format!("etcd://{}", etcd.address),
        vec!["--tenant".to_string(), "w".to_string()],
    )
    .await?;
    let mut proxied = connect(&kine.endpoint, None).await?;
    let create = |key: &str, range_end: &str, start_revision: i64, watch_id: i64| WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: key.as_bytes().to_vec().into(),
            range_end: range_end.as_bytes().to_vec().into(),
            start_revision,
            watch_id,
            ..Default::default()
        })),
    };
    let requests = vec![
        WatchRequest {
            request_union: Some(RequestUnion::CancelRequest(WatchCancelRequest {
                watch_id: 9999,
            })),
        },
        create("a", "", 0, 0),
        create("c", "b", 0, 0),
    ];
    let direct = watch_answers(&etcd.endpoint, requests.clone()).await?;
    let through = watch_answers(&kine.endpoint, requests).await?;
    ensure!(
        through == direct,
        "through the proxy {through:#?}, etcd {direct:#?}"
    );

    // The tenant compacted (and with it the shared etcd, the tenant being its only one).
    for value in ["1", "2", "3"] {
        proxied.put("k", value, None).await?;
    }
    let revision = proxied
        .put("k", "4", None)
        .await?
        .header()
        .context("header")?
        .revision();
    proxied.compact(revision, None).await?;
    let requests = vec![create("a", "", 1, 7), create("c", "b", 0, 7)];
    let direct = watch_answers(&etcd.endpoint, requests.clone()).await?;
    let through = watch_answers(&kine.endpoint, requests).await?;
    ensure!(
        through == direct,
        "after a compaction: through the proxy {through:#?}, etcd {direct:#?}"
    );

    // A watch the compaction canceled keeps its id until the client cancels it: the ids
    // etcd picks skip it.
    let requests = vec![
        create("a", "", 1, 1),
        create("a", "", 0, 0),
        create("a", "", 0, 0),
        create("a", "", 0, 0),
    ];
    let direct = watch_answers(&etcd.endpoint, requests.clone()).await?;
    let through = watch_answers(&kine.endpoint, requests).await?;
    ensure!(
        through == direct,
        "ids after a compacted watch: through the proxy {through:#?}, etcd {direct:#?}"
    );
    Ok(())
}

/// An event at a tenant's compaction revision has no previous value, as on etcd (which reads
/// it at the revision before the event, compacted away), also while another tenant that never
/// compacted keeps the shared etcd's history: the previous value is still in etcd then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_at_the_compaction_revision_has_no_previous_value() -> Result<()> {
    let etcd = spawn_etcd_with(ETCD_ARGS);
    let upstream = format!("etcd://{}", etcd.address);
    let holder = spawn_kine(
        upstream.clone(),
        vec!["--tenant".to_string(), "holder".to_string()],
    )
    .await?;
    let mut holder_client = connect(&holder.endpoint, None).await?;
    holder_client.put("h", "history", None).await?;
    let kine = spawn_kine(upstream, vec!["--tenant".to_string(), "w".to_string()]).await?;
    let mut client = connect(&kine.endpoint, None).await?;
    client.put("k", "1", None).await?;
    client.put("k", "2", None).await?;
    let compacted = client
        .put("k", "3", None)
        .await?
        .header()
        .context("header")?
        .revision();
    client.compact(compacted, None).await?;
    // The tenant's earlier revisions are still in the shared etcd.
    let (mut held, _) = watch(
        &mut holder_client,
        "h",
        Some(WatchOptions::new().with_start_revision(1)),
    )
    .await?;
    ensure!(
        collect_events(&mut held, 1).await?[0].value == "history",
        "the holder's history is gone"
    );

    let (mut stream, _) = watch(
        &mut client,
        "k",
        Some(
            WatchOptions::new()
                .with_start_revision(compacted)
                .with_prev_key(),
        ),
    )
    .await?;
    let events = collect_events(&mut stream, 1).await?;
    ensure!(
        events[0].value == "3" && events[0].prev_value.is_none(),
        "at the compaction revision: {events:?}"
    );
    client.put("k", "4", None).await?;
    let events = collect_events(&mut stream, 1).await?;
    ensure!(
        events[0].value == "4" && events[0].prev_value.as_deref() == Some("3"),
        "after it: {events:?}"
    );
    Ok(())
}
