//! Leases.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use etcd_client::{
    Client, EventType, GetOptions, LeaseGrantOptions, LeaseTimeToLiveOptions, PutOptions,
    WatchOptions,
};

use super::{Server, Target, collect_events, current_revision, get_one, header_revision, watch};
use crate::spawn_kine_on;

/// Grant with a TTL (server-chosen id) and with an explicit id.
pub async fn lease_grant(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    let before = current_revision(&mut c).await?;
    let g = c.lease_grant(60, None).await?;
    ensure!(g.id() > 0 && g.ttl() == 60 && g.error().is_empty(), "{g:?}");
    let g2 = c.lease_grant(60, None).await?;
    ensure!(g2.id() != g.id(), "ids are unique");
    let explicit = c
        .lease_grant(120, Some(LeaseGrantOptions::new().with_id(0x1234_5678)))
        .await?;
    ensure!(
        explicit.id() == 0x1234_5678 && explicit.ttl() == 120,
        "{explicit:?}"
    );
    let ttl = c.lease_time_to_live(0x1234_5678, None).await?;
    ensure!(
        ttl.id() == 0x1234_5678 && ttl.granted_ttl() == 120,
        "{ttl:?}"
    );
    ensure!(ttl.ttl() > 110 && ttl.ttl() <= 120, "{ttl:?}");
    // The one exception: the etcd proxy records which tenant owns a lease in the shared
    // etcd (a key attached to the lease), which takes a revision of the cluster.
    ensure!(
        server.target == Target::EtcdProxy || current_revision(&mut c).await? == before,
        "granting leases creates no revision"
    );
    Ok(())
}

/// Revoke deletes every attached key in one revision; leases lists live leases.
pub async fn lease_revoke_and_list(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    let lease = c.lease_grant(600, None).await?.id();
    let other = c.lease_grant(600, None).await?.id();
    for k in ["lr/1", "lr/2", "lr/3"] {
        c.put(k, "v", Some(PutOptions::new().with_lease(lease)))
            .await?;
    }
    c.put("lr/other", "v", Some(PutOptions::new().with_lease(other)))
        .await?;
    c.put("lr/free", "v", None).await?;

    let listed: Vec<i64> = c.leases().await?.leases().iter().map(|l| l.id()).collect();
    ensure!(
        listed.contains(&lease) && listed.contains(&other) && listed.len() == 2,
        "{listed:?}"
    );

    let (mut stream, _) = watch(&mut c, "lr/", Some(WatchOptions::new().with_prefix())).await?;
    let before = current_revision(&mut c).await?;
    let revoke = c.lease_revoke(lease).await?;
    let after = header_revision(revoke.header())?;
    ensure!(
        after == before + 1,
        "revoke is one revision: {before} -> {after}"
    );
    let events = collect_events(&mut stream, 3).await?;
    ensure!(
        events
            .iter()
            .all(|e| e.kind == EventType::Delete && e.revision == after),
        "{events:?}"
    );
    let mut deleted: Vec<&str> = events.iter().map(|e| e.key.as_str()).collect();
    deleted.sort();
    ensure!(deleted == ["lr/1", "lr/2", "lr/3"], "{events:?}");

    let left = c.get("lr/", Some(GetOptions::new().with_prefix())).await?;
    let left: Vec<&[u8]> = left.kvs().iter().map(|kv| kv.key()).collect();
    ensure!(left == [&b"lr/free"[..], &b"lr/other"[..]], "{left:?}");
    let listed: Vec<i64> = c.leases().await?.leases().iter().map(|l| l.id()).collect();
    ensure!(listed == [other], "{listed:?}");
    let ttl = c.lease_time_to_live(lease, None).await?;
    ensure!(ttl.ttl() == -1, "a revoked lease has TTL -1: {ttl:?}");
    Ok(())
}

/// The keep-alive stream renews the TTL; a keep-alive of an unknown lease answers TTL 0
/// (which `etcd-client` reports as "lease not found").
pub async fn lease_keep_alive(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    let lease = c.lease_grant(10, None).await?.id();
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let aged = c.lease_time_to_live(lease, None).await?;
    ensure!(
        aged.ttl() <= 8 && aged.ttl() > 0,
        "TTL counts down: {aged:?}"
    );
    // etcd-client sends the first keep-alive itself and checks its TTL.
    let (mut keeper, mut responses) = c.lease_keep_alive(lease).await?;
    let renewed = c.lease_time_to_live(lease, None).await?;
    ensure!(renewed.ttl() >= 9, "keep-alive renews the TTL: {renewed:?}");
    for _ in 0..3 {
        keeper.keep_alive().await?;
        let resp = tokio::time::timeout(Duration::from_secs(5), responses.message())
            .await??
            .context("keep-alive stream ended")?;
        ensure!(resp.id() == lease && resp.ttl() == 10, "{resp:?}");
        ensure!(header_revision(resp.header())? > 0, "{resp:?}");
    }
    match c.lease_keep_alive(0x5151).await {
        Err(etcd_client::Error::LeaseKeepAliveError(msg)) if msg == "lease not found" => {}
        other => bail!("keep-alive of an unknown lease must answer TTL <= 0: {other:?}"),
    }
    // The raw answer: ID echoed, TTL exactly 0.
    let channel = tonic::transport::Channel::from_shared(server.endpoint.clone())?
        .connect()
        .await?;
    let mut raw = kine_proto::etcdserverpb::lease_client::LeaseClient::new(channel);
    let requests =
        futures::stream::iter([kine_proto::etcdserverpb::LeaseKeepAliveRequest { id: 0x5151 }]);
    let mut stream = raw.lease_keep_alive(requests).await?.into_inner();
    let resp = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await??
        .context("keep-alive stream ended")?;
    ensure!(
        resp.id == 0x5151 && resp.ttl == 0,
        "unknown lease: {resp:?}"
    );
    Ok(())
}

/// TimeToLive with and without keys; of an unknown lease: TTL -1.
pub async fn lease_time_to_live(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    let lease = c.lease_grant(300, None).await?.id();
    c.put("tk/b", "v", Some(PutOptions::new().with_lease(lease)))
        .await?;
    c.put("tk/a", "v", Some(PutOptions::new().with_lease(lease)))
        .await?;
    let with_keys = c
        .lease_time_to_live(lease, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await?;
    let mut keys: Vec<Vec<u8>> = with_keys.keys().to_vec();
    keys.sort();
    ensure!(
        keys == [b"tk/a".to_vec(), b"tk/b".to_vec()],
        "{with_keys:?}"
    );
    ensure!(
        with_keys.id() == lease && with_keys.granted_ttl() == 300,
        "{with_keys:?}"
    );
    ensure!(
        with_keys.ttl() > 290 && with_keys.ttl() <= 300,
        "{with_keys:?}"
    );
    let without = c.lease_time_to_live(lease, None).await?;
    ensure!(
        without.keys().is_empty(),
        "keys only when asked: {without:?}"
    );
    c.delete("tk/a", None).await?;
    let after = c
        .lease_time_to_live(lease, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await?;
    ensure!(
        after.keys() == [b"tk/b".to_vec()],
        "deleted keys leave the lease: {after:?}"
    );
    let unknown = c.lease_time_to_live(0x6262, None).await?;
    ensure!(unknown.ttl() == -1 && unknown.id() == 0x6262, "{unknown:?}");
    Ok(())
}

/// Keys really expire: a TTL 2 lease is revoked by the server, its key deleted, and watchers
/// see the DELETE.
pub async fn lease_expiry(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    let lease = c.lease_grant(2, None).await?.id();
    c.put("exp/k", "v", Some(PutOptions::new().with_lease(lease)))
        .await?;
    c.put("exp/stay", "v", None).await?;
    let (mut stream, _) = watch(&mut c, "exp/", Some(WatchOptions::new().with_prefix())).await?;
    let started = Instant::now();
    let events = collect_events(&mut stream, 1).await?;
    ensure!(
        events[0].kind == EventType::Delete && events[0].key == "exp/k",
        "{events:?}"
    );
    let took = started.elapsed();
    ensure!(
        took >= Duration::from_millis(1000),
        "expired too early: {took:?}"
    );
    ensure!(get_one(&mut c, "exp/k").await?.is_none(), "the key is gone");
    ensure!(get_one(&mut c, "exp/stay").await?.is_some());
    let ttl = c.lease_time_to_live(lease, None).await?;
    ensure!(ttl.ttl() == -1, "the lease is gone: {ttl:?}");
    Ok(())
}

/// kine-rs on SQLite: a lease and its key survive a restart with the remaining TTL.
pub async fn lease_survives_restart_sqlite() -> Result<()> {
    let keep = tempfile::tempdir()?;
    let endpoint = format!("sqlite://{}", keep.path().join("state.db").display());
    let start = |endpoint: String| {
        tokio::task::spawn_blocking(move || {
            let cwd = tempfile::tempdir().expect("tempdir");
            spawn_kine_on(&endpoint, cwd, &[])
        })
    };
    let connect = |ep: String| async move {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut c) = Client::connect([ep.as_str()], None).await
                && c.get("probe", None).await.is_ok()
            {
                return Ok(c);
            }
            if Instant::now() > deadline {
                bail!("kine-rs at {ep} never answered");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let mut first = start(endpoint.clone()).await?;
    let mut c = connect(first.endpoint.clone()).await?;
    let lease = c.lease_grant(30, None).await?.id();
    let rev = header_revision(
        c.put("rs/k", "v", Some(PutOptions::new().with_lease(lease)))
            .await?
            .header(),
    )?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    first.kill();
    drop(c);

    let second = start(endpoint.clone()).await?;
    let mut c = connect(second.endpoint.clone()).await?;
    let kv = get_one(&mut c, "rs/k")
        .await?
        .context("key lost across restart")?;
    ensure!(kv.lease() == lease && kv.mod_revision() == rev, "{kv:?}");
    let ttl = c
        .lease_time_to_live(lease, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await?;
    ensure!(ttl.granted_ttl() == 30, "{ttl:?}");
    ensure!(
        ttl.ttl() > 15 && ttl.ttl() <= 28,
        "remaining TTL (~27s), not a fresh one: {ttl:?}"
    );
    ensure!(ttl.keys() == [b"rs/k".to_vec()], "{ttl:?}");
    ensure!(
        current_revision(&mut c).await? == rev,
        "the revision survives the restart"
    );
    c.lease_revoke(lease).await?;
    ensure!(get_one(&mut c, "rs/k").await?.is_none());
    Ok(())
}
