//! The request shapes kube-apiserver's etcd3 storage sends.

use anyhow::{Context, Result, bail, ensure};
use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, GetOptions, LeaseTimeToLiveOptions, PutOptions, Txn,
    TxnOp, TxnOpResponse, TxnResponse,
};

use super::{Server, Target, get_one, header_revision, keys};

fn get_of(t: &TxnResponse) -> Result<etcd_client::GetResponse> {
    match t.op_responses().into_iter().next() {
        Some(TxnOpResponse::Get(g)) => Ok(g),
        other => bail!("expected a range response, got {other:?}"),
    }
}

async fn create(c: &mut Client, key: &str, value: &str, lease: i64) -> Result<TxnResponse> {
    let put = if lease != 0 {
        Some(PutOptions::new().with_lease(lease))
    } else {
        None
    };
    Ok(c.txn(
        Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, put)])
            .or_else([TxnOp::get(key, None)]),
    )
    .await?)
}

/// Create: Txn(mod_revision(key) = 0, put, else get).
pub async fn kube_create(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    let t = create(&mut c, "/registry/pods/default/a", "pod-a", 0).await?;
    ensure!(t.succeeded(), "{t:?}");
    let rev = header_revision(t.header())?;
    ensure!(
        matches!(t.op_responses().first(), Some(TxnOpResponse::Put(_))),
        "{t:?}"
    );

    let again = create(&mut c, "/registry/pods/default/a", "other", 0).await?;
    ensure!(!again.succeeded(), "second create must fail: {again:?}");
    ensure!(
        header_revision(again.header())? == rev,
        "a failed create writes nothing"
    );
    let existing = get_of(&again)?;
    let kv = existing
        .kvs()
        .first()
        .context("else-branch get returns the object")?;
    ensure!(kv.value() == b"pod-a" && kv.mod_revision() == rev, "{kv:?}");
    Ok(())
}

/// Optimistic update and delete: compare mod_revision with the revision last seen.
pub async fn kube_optimistic_update_delete(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    let key = "/registry/configmaps/default/cm";
    let seen = header_revision(create(&mut c, key, "v1", 0).await?.header())?;
    let update = |rev: i64, value: &str| {
        Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, rev)])
            .and_then([TxnOp::put(key, value, None)])
            .or_else([TxnOp::get(key, None)])
    };
    let ok = c.txn(update(seen, "v2")).await?;
    ensure!(ok.succeeded(), "{ok:?}");
    let updated = header_revision(ok.header())?;

    let stale = c.txn(update(seen, "v3")).await?;
    ensure!(!stale.succeeded(), "stale update must fail: {stale:?}");
    let current = get_of(&stale)?;
    let kv = current.kvs().first().context("current object")?;
    ensure!(
        kv.value() == b"v2" && kv.mod_revision() == updated && kv.version() == 2,
        "{kv:?}"
    );

    let delete = |rev: i64| {
        Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, rev)])
            .and_then([TxnOp::delete(
                key,
                Some(DeleteOptions::new().with_prev_key()),
            )])
            .or_else([TxnOp::get(key, None)])
    };
    let stale = c.txn(delete(seen)).await?;
    ensure!(
        !stale.succeeded() && get_one(&mut c, key).await?.is_some(),
        "{stale:?}"
    );
    let gone = c.txn(delete(updated)).await?;
    ensure!(gone.succeeded(), "{gone:?}");
    match gone.op_responses().first() {
        Some(TxnOpResponse::Delete(d)) => {
            ensure!(d.deleted() == 1, "{d:?}");
            ensure!(
                d.prev_kvs().first().map(|kv| kv.value()) == Some(&b"v2"[..]),
                "{d:?}"
            );
        }
        other => bail!("expected a delete response, got {other:?}"),
    }
    ensure!(get_one(&mut c, key).await?.is_none());
    Ok(())
}

/// Paginated list: limit, then continue from the last key + "\0" at the first page's revision
/// while `more`; later writes are invisible, later deletes are not.
pub async fn kube_paginated_list(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    let prefix = "/registry/pods/";
    let expected: Vec<String> = (0..10).map(|i| format!("{prefix}ns/p{i:02}")).collect();
    for k in &expected {
        c.put(k.as_str(), "pod", None).await?;
    }
    c.put("/registry/podsecurity/x", "not in the list", None)
        .await?;

    let end = "/registry/pods0";
    let first = c
        .get(
            prefix,
            Some(GetOptions::new().with_range(end).with_limit(3)),
        )
        .await?;
    let rev = header_revision(first.header())?;
    ensure!(first.more() && first.count() == 10, "{first:?}");
    let mut listed = keys(first.kvs());

    // Concurrent changes after the list's revision (one more key in the range than before).
    c.put(format!("{prefix}ns/p99").as_str(), "late", None)
        .await?;
    c.put(format!("{prefix}ns/p98").as_str(), "late", None)
        .await?;
    c.delete(format!("{prefix}ns/p05").as_str(), None).await?;
    c.put(format!("{prefix}ns/p07").as_str(), "changed", None)
        .await?;

    let mut more = first.more();
    let mut pages = 1;
    while more {
        let mut from = listed.last().context("empty page")?.clone().into_bytes();
        from.push(0);
        let page = c
            .get(
                from,
                Some(
                    GetOptions::new()
                        .with_range(end)
                        .with_limit(3)
                        .with_revision(rev),
                ),
            )
            .await?;
        ensure!(page.kvs().len() <= 3, "{page:?}");
        // The count is of the rest of the range at the list's revision, page after page.
        let rest = (expected.len() - listed.len()) as i64;
        ensure!(
            page.count() == rest,
            "count {} at {rev}, {rest} expected",
            page.count()
        );
        ensure!(
            page.kvs()
                .iter()
                .all(|kv| kv.mod_revision() <= rev && kv.value() == b"pod"),
            "page at revision {rev} shows later writes: {page:?}"
        );
        listed.extend(keys(page.kvs()));
        more = page.more();
        pages += 1;
        ensure!(pages <= 10, "pagination does not end");
    }
    ensure!(
        pages == 4,
        "10 keys in pages of 3 take 4 pages, took {pages}"
    );
    ensure!(listed == expected, "{listed:?}");
    Ok(())
}

/// kube-apiserver's compactor: Txn(version(compact_rev_key) = seen, put, else get), then
/// Compact. Works only if versions are real.
pub async fn kube_compaction_txn(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    let key = "compact_rev_key";
    let compact_txn = |seen_version: i64, rev: i64| {
        Txn::new()
            .when([Compare::version(key, CompareOp::Equal, seen_version)])
            .and_then([TxnOp::put(key, rev.to_string(), None)])
            .or_else([TxnOp::get(key, None)])
    };
    for i in 0..5 {
        c.put("/registry/leases/x", format!("v{i}"), None).await?;
    }
    let rev = header_revision(c.put("/registry/leases/x", "last", None).await?.header())?;
    let t = c.txn(compact_txn(0, rev)).await?;
    ensure!(t.succeeded(), "first compaction txn: {t:?}");
    c.compact(rev, None).await?;

    // Another apiserver still thinks the version is 0: it loses and learns the version.
    let lost = c.txn(compact_txn(0, rev + 1)).await?;
    ensure!(!lost.succeeded(), "{lost:?}");
    let current = get_of(&lost)?;
    let kv = current.kvs().first().context("compact_rev_key")?;
    ensure!(
        kv.version() == 1 && kv.value() == rev.to_string().as_bytes(),
        "{kv:?}"
    );

    for i in 0..3 {
        c.put("/registry/leases/x", format!("w{i}"), None).await?;
    }
    let rev2 = header_revision(c.put("/registry/leases/x", "w", None).await?.header())?;
    let won = c.txn(compact_txn(1, rev2)).await?;
    ensure!(won.succeeded(), "{won:?}");
    c.compact(rev2, None).await?;
    let kv = get_one(&mut c, key).await?.context("compact_rev_key")?;
    ensure!(kv.version() == 2, "{kv:?}");
    let r = c
        .get(
            "/registry/leases/x",
            Some(GetOptions::new().with_revision(rev2)),
        )
        .await?;
    ensure!(
        r.kvs().first().map(|kv| kv.value()) == Some(&b"w"[..]),
        "{r:?}"
    );
    Ok(())
}

/// Events are created with a lease (kube-apiserver's --event-ttl) through the create Txn.
pub async fn kube_events_with_lease(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    let lease = c.lease_grant(3600, None).await?.id();
    let events = ["/registry/events/default/e1", "/registry/events/default/e2"];
    for e in events {
        let t = create(&mut c, e, "event", lease).await?;
        ensure!(t.succeeded(), "{t:?}");
    }
    let kv = get_one(&mut c, events[0]).await?.context("event")?;
    ensure!(kv.lease() == lease, "{kv:?}");
    let ttl = c
        .lease_time_to_live(lease, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await?;
    let mut attached: Vec<String> = ttl
        .keys()
        .iter()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    attached.sort();
    ensure!(attached == events, "{ttl:?}");
    ensure!(ttl.granted_ttl() == 3600 && ttl.ttl() > 3500, "{ttl:?}");
    c.lease_revoke(lease).await?;
    let left = c
        .get("/registry/events/", Some(GetOptions::new().with_prefix()))
        .await?;
    ensure!(
        left.kvs().is_empty(),
        "revoking the lease deletes the events: {left:?}"
    );
    Ok(())
}
