//! The etcd proxy logging in to an etcd with authentication enabled (issue 12: "etcd
//! user/password if given"), as `etcd://USER:PASSWORD@HOST:PORT`.
//!
//! Between the steps of the tests, root sets kine-rs's user's password again (to the same
//! one): etcd then drops every token of that user and moves its auth revision on, as when a
//! token expires or an administrator changes users and roles. A request after that passes
//! only if the proxy authenticates again when etcd answers `invalid auth token`, and a watch
//! created on an upstream stream opened before only if the proxy reopens that stream with a
//! new token. (Waiting for tokens to expire would not do: the proxy's freeze keeper uses its
//! token every 250 ms, which keeps a simple token alive.) kine-rs's user has a role limited
//! to what it needs: its tenants' prefixes and `/_kine-rs/`.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, GetOptions, Identity, PutOptions, TlsOptions,
    Txn, TxnOp, WatchOptions,
};
use kine_tests::conformance::watch;
use kine_tests::pki::Pki;
use kine_tests::{
    ChildGuard, etcdctl_binary, free_port, kine_rs_binary, spawn_etcd_with, spawn_kine_logged,
};
use tonic::Code;

const PASSWORD: &str = "Pw-7c41e9:@%";
/// [`PASSWORD`] %-escaped, as it goes in the endpoint.
const PASSWORD_ESCAPED: &str = "Pw-7c41e9%3A%40%25";

fn etcdctl(address: &str, args: &[&str]) -> Result<String> {
    etcdctl_with_input(address, args, "")
}

fn etcdctl_with_input(address: &str, args: &[&str], input: &str) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new(etcdctl_binary())
        .args(["--endpoints", address])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("etcdctl's stdin")?
        .write_all(input.as_bytes())?;
    let output = child.wait_with_output()?;
    ensure!(
        output.status.success(),
        "etcdctl {args:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Enables authentication: `root`, and `kine` whose role reads and writes only under
/// `prefixes`.
fn enable_auth(address: &str, prefixes: &[&str]) -> Result<()> {
    etcdctl(address, &["user", "add", "root:root-pw"])?;
    etcdctl(address, &["user", "grant-role", "root", "root"])?;
    etcdctl(address, &["role", "add", "kine"])?;
    for prefix in prefixes {
        etcdctl(
            address,
            &[
                "role",
                "grant-permission",
                "kine",
                "readwrite",
                prefix,
                "--prefix=true",
            ],
        )?;
    }
    etcdctl(address, &["user", "add", &format!("kine:{PASSWORD}")])?;
    etcdctl(address, &["user", "grant-role", "kine", "kine"])?;
    etcdctl(address, &["auth", "enable"])?;
    Ok(())
}

/// Makes etcd drop every token of kine-rs's user (its password set again, unchanged).
fn invalidate_tokens(address: &str) -> Result<()> {
    etcdctl_with_input(
        address,
        &[
            "--user",
            "root:root-pw",
            "user",
            "passwd",
            "kine",
            "--interactive=false",
        ],
        PASSWORD,
    )?;
    Ok(())
}

async fn spawn(endpoint: &str, args: &[&str]) -> Result<(ChildGuard, std::path::PathBuf)> {
    let endpoint = endpoint.to_string();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    Ok(tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        spawn_kine_logged(&endpoint, tempfile::tempdir().expect("tempdir"), &args)
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

fn code_of<T: std::fmt::Debug>(result: Result<T, etcd_client::Error>) -> Option<Code> {
    match result {
        Err(etcd_client::Error::GRpcStatus(status)) => Some(status.code()),
        _ => None,
    }
}

/// The next message of a watch stream, within 30 s.
async fn next(stream: &mut etcd_client::WatchStream) -> Result<etcd_client::WatchResponse> {
    tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .context("no watch response within 30 s")??
        .context("the watch stream ended")
}

fn log_of(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A sidecar on an etcd with authentication: every kind of request works, also after etcd
/// dropped its token (requests, and a watch created on a stream opened before); a lease with keys
/// is revoked (etcd checks the user may write them); etcd holds the keys under the tenant's
/// prefix; the password is in no log line (at debug level); kine-rs migrate reads the tenant
/// with the same credentials; a wrong password stops kine-rs at once, with etcd's reason and
/// without the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_and_migration_source_log_in_to_etcd() -> Result<()> {
    let etcd = spawn_etcd_with(&["--max-txn-ops", "256"]);
    enable_auth(&etcd.endpoint, &["/t/", "/_kine-rs/"])?;
    let endpoint = format!("etcd://kine:{PASSWORD_ESCAPED}@{}", etcd.address);
    let (kine, log) = spawn(&endpoint, &["--tenant", "t", "--debug"]).await?;
    let mut client = connect(&kine.endpoint, None).await?;

    client.put("k1", "v1", None).await?;
    let (mut events, _) = watch(&mut client, "k", Some(WatchOptions::new().with_prefix())).await?;
    let lease = client.lease_grant(60, None).await?.id();
    client
        .put("leased", "l", Some(PutOptions::new().with_lease(lease)))
        .await?;

    invalidate_tokens(&etcd.endpoint)?;
    let put = client.put("k2", "v2", None).await?;
    let revision = put.header().context("header")?.revision();
    let event = next(&mut events).await?;
    ensure!(
        event.events().len() == 1 && event.events()[0].kv().map(|kv| kv.key()) == Some(&b"k2"[..]),
        "{event:?}"
    );

    // A second watch on the same client stream, so on the upstream stream opened before,
    // with its old token.
    invalidate_tokens(&etcd.endpoint)?;
    events
        .watch(
            "other",
            Some(WatchOptions::new().with_start_revision(revision)),
        )
        .await?;
    let created = next(&mut events).await?;
    ensure!(
        created.created() && !created.canceled(),
        "the second watch: {created:?}"
    );
    client.put("other", "o", None).await?;
    let other = next(&mut events).await?;
    ensure!(
        other.watch_id() == created.watch_id()
            && other
                .events()
                .first()
                .and_then(|e| e.kv())
                .map(|kv| kv.key())
                == Some(&b"other"[..]),
        "{other:?}"
    );

    invalidate_tokens(&etcd.endpoint)?;
    let txn = client
        .txn(
            Txn::new()
                .when([etcd_client::Compare::value(
                    "k1",
                    etcd_client::CompareOp::Equal,
                    "v1",
                )])
                .and_then([TxnOp::put("k3", "v3", None)]),
        )
        .await?;
    ensure!(txn.succeeded(), "{txn:?}");
    invalidate_tokens(&etcd.endpoint)?;
    client.lease_revoke(lease).await?;
    ensure!(
        client.get("leased", None).await?.kvs().is_empty(),
        "the lease's key outlived it"
    );
    invalidate_tokens(&etcd.endpoint)?;
    client.compact(revision, None).await?;
    ensure!(
        code_of(
            client
                .get("k1", Some(GetOptions::new().with_revision(revision - 1)))
                .await
        ) == Some(Code::OutOfRange),
        "reads below the tenant's compaction"
    );

    // In etcd, under the tenant's prefix.
    let mut root = Client::connect(
        [etcd.endpoint.as_str()],
        Some(ConnectOptions::new().with_user("root", "root-pw")),
    )
    .await?;
    let keys: Vec<String> = root
        .get(
            "/t/",
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await?
        .kvs()
        .iter()
        .map(|kv| kv.key_str().unwrap_or_default().to_string())
        .collect();
    ensure!(keys == ["/t/k1", "/t/k2", "/t/k3", "/t/other"], "{keys:?}");

    let text = log_of(&log);
    ensure!(
        !text.contains(PASSWORD) && !text.contains(PASSWORD_ESCAPED),
        "the log shows the password:\n{text}"
    );

    // The migration source logs in with the same credentials: its plan counts the keys.
    let work = tempfile::tempdir()?;
    let output = tokio::task::spawn_blocking({
        let endpoint = endpoint.clone();
        let work = work.path().to_path_buf();
        move || {
            Command::new(kine_rs_binary())
                .arg("migrate")
                .args(["--from", &endpoint, "--tenant", "t"])
                .args(["--to", "sqlite://./unused.db", "--dry-run", "-o", "json"])
                .current_dir(work)
                .stdin(Stdio::null())
                .output()
        }
    })
    .await??;
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    ensure!(
        output.status.success() && stdout.contains("\"keys\":4"),
        "kine-rs migrate --dry-run: {stdout}{stderr}"
    );
    ensure!(
        !stdout.contains(PASSWORD_ESCAPED) && !stderr.contains(PASSWORD_ESCAPED),
        "kine-rs migrate shows the password: {stdout}{stderr}"
    );

    // A wrong password: kine-rs stops at once, with etcd's reason, without the password.
    let wrong = format!("etcd://kine:Wrong-5d2a@{}", etcd.address);
    let work = work.path().to_path_buf();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(kine_rs_binary())
            .args(["--endpoint", &wrong, "--tenant", "t"])
            .args(["--listen-address", &format!("127.0.0.1:{}", free_port())])
            .current_dir(work)
            .stdin(Stdio::null())
            .output()
    })
    .await??;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        !output.status.success()
            && text.contains("authentication failed")
            && !text.contains("Wrong-5d2a"),
        "{text}"
    );
    drop(events);
    Ok(())
}

/// A gateway on an etcd with authentication: tenant `a`, inside the user's role, works
/// across dropped tokens; tenant `b`, outside it, gets etcd's PermissionDenied (etcd's
/// role is a second fence behind kine-rs's prefixes, not a replacement).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_logs_in_to_etcd() -> Result<()> {
    let etcd = spawn_etcd_with(&["--max-txn-ops", "256"]);
    enable_auth(&etcd.endpoint, &["/a/", "/_kine-rs/"])?;
    let dir = tempfile::tempdir()?;
    let pki = Pki::write(dir.path(), &["a", "b"]);
    let endpoint = format!("etcd://kine:{PASSWORD_ESCAPED}@{}", etcd.address);
    let (kine, log) = spawn(
        &endpoint,
        &[
            "--gateway",
            "--gateway-create-tenants",
            "--server-cert-file",
            &pki.server_cert,
            "--server-key-file",
            &pki.server_key,
            "--trusted-ca-file",
            &pki.ca,
        ],
    )
    .await?;
    let options = |name: &str| {
        let (cert, key) = pki.client(name);
        let tls = TlsOptions::new()
            .domain_name("localhost")
            .ca_certificate(Certificate::from_pem(std::fs::read(&pki.ca).expect("ca")))
            .identity(Identity::from_pem(
                std::fs::read(cert).expect("cert"),
                std::fs::read(key).expect("key"),
            ));
        ConnectOptions::new()
            .with_tls(tls)
            .with_connect_timeout(Duration::from_secs(5))
    };
    let address = format!("https://{}", kine.address);
    let mut a = connect(&address, Some(options("a"))).await?;
    a.put("x", "1", None).await?;
    invalidate_tokens(&etcd.endpoint)?;
    let (mut events, _) = watch(&mut a, "x", None).await?;
    a.put("x", "2", None).await?;
    let event = next(&mut events).await?;
    ensure!(
        event.events().first().map(|e| e.event_type()) == Some(EventType::Put),
        "{event:?}"
    );
    invalidate_tokens(&etcd.endpoint)?;
    let got = a.get("x", None).await?;
    ensure!(
        got.kvs().first().map(|kv| kv.value()) == Some(&b"2"[..]),
        "{got:?}"
    );

    let mut b = Client::connect([address.as_str()], Some(options("b"))).await?;
    ensure!(
        code_of(b.put("x", "1", None).await) == Some(Code::PermissionDenied),
        "tenant b, outside the user's role"
    );
    let text = log_of(&log);
    ensure!(
        !text.contains(PASSWORD) && !text.contains(PASSWORD_ESCAPED),
        "the log shows the password:\n{text}"
    );
    Ok(())
}
