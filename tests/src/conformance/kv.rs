//! Range, Put and DeleteRange.

use anyhow::{Context, Result, ensure};
use etcd_client::{
    Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp,
};

use super::{Server, Target, current_revision, get_one, header_revision, keys, values};

/// Put, get, overwrite, delete, re-create: revisions and versions follow etcd.
pub async fn kv_put_get_delete(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    let r0 = current_revision(&mut c).await?;

    let put = c.put("k", "v1", None).await?;
    let r1 = header_revision(put.header())?;
    ensure!(
        r1 == r0 + 1,
        "put must create revision {} (got {r1})",
        r0 + 1
    );

    let got = c.get("k", None).await?;
    ensure!(header_revision(got.header())? == r1);
    ensure!(got.count() == 1 && !got.more(), "{got:?}");
    let kv = got.kvs().first().context("k missing")?;
    ensure!(kv.key() == b"k" && kv.value() == b"v1", "{kv:?}");
    ensure!(
        kv.create_revision() == r1 && kv.mod_revision() == r1,
        "{kv:?}"
    );
    ensure!(kv.version() == 1 && kv.lease() == 0, "{kv:?}");

    let r2 = header_revision(c.put("k", "v2", None).await?.header())?;
    ensure!(r2 == r1 + 1);
    let kv = get_one(&mut c, "k").await?.context("k missing")?;
    ensure!(kv.value() == b"v2" && kv.version() == 2, "{kv:?}");
    ensure!(
        kv.create_revision() == r1 && kv.mod_revision() == r2,
        "{kv:?}"
    );

    let missing = c.get("nope", None).await?;
    ensure!(
        missing.kvs().is_empty() && missing.count() == 0,
        "{missing:?}"
    );
    ensure!(header_revision(missing.header())? == r2);

    let del = c.delete("k", None).await?;
    ensure!(del.deleted() == 1, "{del:?}");
    ensure!(
        del.prev_kvs().is_empty(),
        "prev_kvs only when asked: {del:?}"
    );
    let r3 = header_revision(del.header())?;
    ensure!(r3 == r2 + 1);
    ensure!(get_one(&mut c, "k").await?.is_none());

    let r4 = header_revision(c.put("k", "v3", None).await?.header())?;
    let kv = get_one(&mut c, "k").await?.context("k missing")?;
    ensure!(
        kv.version() == 1 && kv.create_revision() == r4 && kv.mod_revision() == r4,
        "re-created key starts over: {kv:?}"
    );
    Ok(())
}

/// `version` counts puts since creation and starts over after a delete.
pub async fn kv_version_counting(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    for expected in 1..=5 {
        c.put("v", format!("x{expected}"), None).await?;
        let kv = get_one(&mut c, "v").await?.context("v missing")?;
        ensure!(kv.version() == expected, "after {expected} puts: {kv:?}");
    }
    c.delete("v", None).await?;
    c.put("v", "again", None).await?;
    let kv = get_one(&mut c, "v").await?.context("v missing")?;
    ensure!(kv.version() == 1, "version after delete+put: {kv:?}");
    // A put inside a txn counts like any other put.
    c.txn(Txn::new().and_then([TxnOp::put("v", "txn", None)]))
        .await?;
    let kv = get_one(&mut c, "v").await?.context("v missing")?;
    ensure!(kv.version() == 2, "{kv:?}");
    Ok(())
}

/// prev_kv on Put and DeleteRange.
pub async fn kv_prev_kv(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    let first = c
        .put("p", "one", Some(PutOptions::new().with_prev_key()))
        .await?;
    ensure!(
        first.prev_key().is_none(),
        "no prev_kv for a new key: {first:?}"
    );
    let r1 = header_revision(first.header())?;
    let second = c
        .put("p", "two", Some(PutOptions::new().with_prev_key()))
        .await?;
    let prev = second.prev_key().context("prev_kv missing")?;
    ensure!(prev.key() == b"p" && prev.value() == b"one", "{prev:?}");
    ensure!(
        prev.mod_revision() == r1 && prev.create_revision() == r1 && prev.version() == 1,
        "{prev:?}"
    );
    let no_prev = c.put("p", "three", None).await?;
    ensure!(no_prev.prev_key().is_none(), "prev_kv only when asked");

    c.put("p2", "x", None).await?;
    let del = c
        .delete(
            "p",
            Some(DeleteOptions::new().with_prefix().with_prev_key()),
        )
        .await?;
    ensure!(del.deleted() == 2, "{del:?}");
    ensure!(keys(del.prev_kvs()) == ["p", "p2"], "{del:?}");
    ensure!(values(del.prev_kvs()) == ["three", "x"], "{del:?}");
    ensure!(del.prev_kvs()[0].version() == 3, "{del:?}");
    Ok(())
}

/// ignore_value keeps the value, ignore_lease keeps the lease; a put without ignore_lease
/// detaches the key from its lease.
pub async fn kv_ignore_value_ignore_lease(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    let lease = c.lease_grant(600, None).await?.id();
    c.put("i", "v1", Some(PutOptions::new().with_lease(lease)))
        .await?;

    c.put("i", "v2", Some(PutOptions::new().with_ignore_lease()))
        .await?;
    let kv = get_one(&mut c, "i").await?.context("i missing")?;
    ensure!(
        kv.value() == b"v2" && kv.lease() == lease && kv.version() == 2,
        "ignore_lease keeps the lease: {kv:?}"
    );

    let resp = c
        .put(
            "i",
            "",
            Some(PutOptions::new().with_ignore_value().with_lease(lease)),
        )
        .await?;
    let kv = get_one(&mut c, "i").await?.context("i missing")?;
    ensure!(
        kv.value() == b"v2" && kv.lease() == lease && kv.version() == 3,
        "ignore_value keeps the value: {kv:?}"
    );
    ensure!(kv.mod_revision() == header_revision(resp.header())?);

    c.put("i", "", Some(PutOptions::new().with_ignore_value()))
        .await?;
    let kv = get_one(&mut c, "i").await?.context("i missing")?;
    ensure!(
        kv.value() == b"v2" && kv.lease() == 0 && kv.version() == 4,
        "ignore_value without lease detaches the lease: {kv:?}"
    );
    let ttl = c
        .lease_time_to_live(
            lease,
            Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys()),
        )
        .await?;
    ensure!(ttl.keys().is_empty(), "lease still lists the key: {ttl:?}");
    Ok(())
}

async fn put_all(c: &mut etcd_client::Client, keys: &[&str]) -> Result<()> {
    for k in keys {
        c.put(*k, format!("val-{k}"), None).await?;
    }
    Ok(())
}

/// Single keys, [key, range_end), prefixes, from-key (`\0`) and all keys.
pub async fn kv_ranges(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    put_all(&mut c, &["a", "a/1", "a/2", "a0", "b", "c", "c\u{7f}"]).await?;

    let r = c.get("a/", Some(GetOptions::new().with_prefix())).await?;
    ensure!(keys(r.kvs()) == ["a/1", "a/2"], "prefix: {r:?}");
    ensure!(r.count() == 2);

    let r = c.get("a", Some(GetOptions::new().with_range("b"))).await?;
    ensure!(keys(r.kvs()) == ["a", "a/1", "a/2", "a0"], "[a, b): {r:?}");

    let r = c
        .get("a/2", Some(GetOptions::new().with_range("a/2")))
        .await?;
    ensure!(r.kvs().is_empty(), "empty range [a/2, a/2): {r:?}");

    let r = c.get("b", Some(GetOptions::new().with_from_key())).await?;
    ensure!(keys(r.kvs()) == ["b", "c", "c\u{7f}"], "from key b: {r:?}");

    let r = c.get("", Some(GetOptions::new().with_all_keys())).await?;
    ensure!(r.kvs().len() == 7 && r.count() == 7, "all keys: {r:?}");
    ensure!(keys(r.kvs())[0] == "a", "sorted by key: {r:?}");

    let r = c.get("a/1", None).await?;
    ensure!(keys(r.kvs()) == ["a/1"], "single key: {r:?}");
    ensure!(values(r.kvs()) == ["val-a/1"]);

    let r = c.get("zzz", Some(GetOptions::new().with_prefix())).await?;
    ensure!(r.kvs().is_empty() && r.count() == 0);

    let r = c
        .get(
            "serial",
            Some(GetOptions::new().with_serializable().with_prefix()),
        )
        .await?;
    ensure!(r.kvs().is_empty());
    let r = c
        .get("a", Some(GetOptions::new().with_serializable()))
        .await?;
    ensure!(keys(r.kvs()) == ["a"], "serializable read: {r:?}");

    // DeleteRange with the same range forms.
    let d = c
        .delete("a/", Some(DeleteOptions::new().with_prefix()))
        .await?;
    ensure!(d.deleted() == 2, "{d:?}");
    let d = c
        .delete("c", Some(DeleteOptions::new().with_from_key()))
        .await?;
    ensure!(d.deleted() == 2, "{d:?}");
    let d = c
        .delete("a", Some(DeleteOptions::new().with_range("b")))
        .await?;
    ensure!(d.deleted() == 2, "{d:?}");
    let r = c.get("", Some(GetOptions::new().with_all_keys())).await?;
    ensure!(keys(r.kvs()) == ["b"], "{r:?}");
    Ok(())
}

/// limit, more and count (count is the whole range, whatever the limit).
pub async fn kv_limit_more_count(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    put_all(&mut c, &["l/1", "l/2", "l/3", "l/4", "l/5", "m"]).await?;
    let r = c
        .get("l/", Some(GetOptions::new().with_prefix().with_limit(2)))
        .await?;
    ensure!(keys(r.kvs()) == ["l/1", "l/2"], "{r:?}");
    ensure!(r.more() && r.count() == 5, "{r:?}");
    let r = c
        .get("l/", Some(GetOptions::new().with_prefix().with_limit(5)))
        .await?;
    ensure!(r.kvs().len() == 5 && !r.more() && r.count() == 5, "{r:?}");
    let r = c
        .get("l/", Some(GetOptions::new().with_prefix().with_limit(6)))
        .await?;
    ensure!(r.kvs().len() == 5 && !r.more() && r.count() == 5, "{r:?}");
    let r = c
        .get("l/", Some(GetOptions::new().with_prefix().with_limit(0)))
        .await?;
    ensure!(
        r.kvs().len() == 5 && !r.more(),
        "limit 0 is no limit: {r:?}"
    );
    let r = c
        .get("l/3", Some(GetOptions::new().with_from_key().with_limit(1)))
        .await?;
    ensure!(
        keys(r.kvs()) == ["l/3"] && r.more() && r.count() == 4,
        "{r:?}"
    );
    Ok(())
}

/// count_only and keys_only.
pub async fn kv_count_only_keys_only(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    put_all(&mut c, &["q/1", "q/2", "q/3"]).await?;
    c.put("q/2", "again", None).await?;
    let r = c
        .get(
            "q/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await?;
    ensure!(r.kvs().is_empty() && r.count() == 3 && !r.more(), "{r:?}");
    let r = c
        .get(
            "q/",
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_count_only()
                    .with_limit(1),
            ),
        )
        .await?;
    ensure!(r.kvs().is_empty() && r.count() == 3, "{r:?}");

    let r = c
        .get("q/", Some(GetOptions::new().with_prefix().with_keys_only()))
        .await?;
    ensure!(keys(r.kvs()) == ["q/1", "q/2", "q/3"], "{r:?}");
    ensure!(r.kvs().iter().all(|kv| kv.value().is_empty()), "{r:?}");
    let q2 = &r.kvs()[1];
    ensure!(
        q2.version() == 2 && q2.mod_revision() > q2.create_revision(),
        "{q2:?}"
    );
    Ok(())
}

/// Reads at past revisions see history, including deleted and overwritten keys.
pub async fn kv_revision_reads(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    let r1 = header_revision(c.put("h", "v1", None).await?.header())?;
    let r2 = header_revision(c.put("h", "v2", None).await?.header())?;
    let r3 = header_revision(c.put("h2", "other", None).await?.header())?;
    let r4 = header_revision(c.delete("h", None).await?.header())?;
    let r5 = header_revision(c.put("h", "v3", None).await?.header())?;

    let at = |rev| GetOptions::new().with_revision(rev);
    let g = c.get("h", Some(at(r1))).await?;
    ensure!(
        values(g.kvs()) == ["v1"] && g.kvs()[0].version() == 1,
        "{g:?}"
    );
    ensure!(
        header_revision(g.header())? == r5,
        "header carries the current revision {r5}, not the read revision {r1}: {g:?}"
    );
    let g = c.get("h", Some(at(r2))).await?;
    ensure!(
        values(g.kvs()) == ["v2"] && g.kvs()[0].version() == 2,
        "{g:?}"
    );
    ensure!(g.kvs()[0].create_revision() == r1 && g.kvs()[0].mod_revision() == r2);
    let g = c.get("h", Some(at(r4))).await?;
    ensure!(g.kvs().is_empty(), "deleted at r4: {g:?}");
    let g = c.get("h", Some(at(r5))).await?;
    ensure!(
        values(g.kvs()) == ["v3"] && g.kvs()[0].create_revision() == r5,
        "{g:?}"
    );

    let g = c.get("h", Some(at(r3).with_prefix())).await?;
    ensure!(keys(g.kvs()) == ["h", "h2"] && g.count() == 2, "{g:?}");
    let g = c.get("h", Some(at(r4).with_prefix())).await?;
    ensure!(keys(g.kvs()) == ["h2"] && g.count() == 1, "{g:?}");
    let g = c.get("h", Some(at(r1 - 1).with_prefix())).await?;
    ensure!(g.kvs().is_empty(), "before the first write: {g:?}");
    let g = c.get("h", Some(at(r3).with_prefix().with_limit(1))).await?;
    ensure!(
        keys(g.kvs()) == ["h"] && g.more() && g.count() == 2,
        "{g:?}"
    );
    Ok(())
}

/// Sort order × sort target, with and without limit.
pub async fn kv_sort(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    // s/a: created first, modified last, 3 versions, value "m".
    // s/b: created second, 1 version, value "z".
    // s/c: created third, 2 versions, value "a".
    c.put("s/a", "x", None).await?;
    c.put("s/b", "z", None).await?;
    c.put("s/c", "x", None).await?;
    c.put("s/a", "x", None).await?;
    c.put("s/c", "a", None).await?;
    c.put("s/a", "m", None).await?;

    let cases: [(SortTarget, SortOrder, [&str; 3]); 10] = [
        (SortTarget::Key, SortOrder::Ascend, ["s/a", "s/b", "s/c"]),
        (SortTarget::Key, SortOrder::Descend, ["s/c", "s/b", "s/a"]),
        (
            SortTarget::Version,
            SortOrder::Ascend,
            ["s/b", "s/c", "s/a"],
        ),
        (
            SortTarget::Version,
            SortOrder::Descend,
            ["s/a", "s/c", "s/b"],
        ),
        (SortTarget::Create, SortOrder::Ascend, ["s/a", "s/b", "s/c"]),
        (
            SortTarget::Create,
            SortOrder::Descend,
            ["s/c", "s/b", "s/a"],
        ),
        (SortTarget::Mod, SortOrder::Ascend, ["s/b", "s/c", "s/a"]),
        (SortTarget::Mod, SortOrder::Descend, ["s/a", "s/c", "s/b"]),
        (SortTarget::Value, SortOrder::Ascend, ["s/c", "s/a", "s/b"]),
        (SortTarget::Value, SortOrder::Descend, ["s/b", "s/a", "s/c"]),
    ];
    for (st, so, expected) in cases {
        let r = c
            .get(
                "s/",
                Some(GetOptions::new().with_prefix().with_sort(st, so)),
            )
            .await?;
        ensure!(
            keys(r.kvs()) == expected,
            "sort {st:?} {so:?}: {:?}",
            keys(r.kvs())
        );
        let r = c
            .get(
                "s/",
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_sort(st, so)
                        .with_limit(2),
                ),
            )
            .await?;
        ensure!(
            keys(r.kvs()) == expected[..2] && r.more() && r.count() == 3,
            "sort {st:?} {so:?} limit 2: {r:?}"
        );
    }
    Ok(())
}

/// min/max mod and create revision filters (count stays the whole range, as in etcd).
pub async fn kv_min_max_revisions(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    let ra = header_revision(c.put("f/a", "1", None).await?.header())?;
    let rb = header_revision(c.put("f/b", "1", None).await?.header())?;
    let rc = header_revision(c.put("f/c", "1", None).await?.header())?;
    let ra2 = header_revision(c.put("f/a", "2", None).await?.header())?;
    // create: a=ra b=rb c=rc; mod: a=ra2 b=rb c=rc

    let get = |o: GetOptions| o.with_prefix();
    let r = c
        .get("f/", Some(get(GetOptions::new().with_min_mod_revision(rc))))
        .await?;
    ensure!(keys(r.kvs()) == ["f/a", "f/c"], "min_mod {rc}: {r:?}");
    ensure!(r.count() == 3, "count ignores filters: {r:?}");
    let r = c
        .get("f/", Some(get(GetOptions::new().with_max_mod_revision(rc))))
        .await?;
    ensure!(keys(r.kvs()) == ["f/b", "f/c"], "max_mod {rc}: {r:?}");
    let r = c
        .get(
            "f/",
            Some(get(GetOptions::new().with_min_create_revision(rb))),
        )
        .await?;
    ensure!(keys(r.kvs()) == ["f/b", "f/c"], "min_create {rb}: {r:?}");
    let r = c
        .get(
            "f/",
            Some(get(GetOptions::new().with_max_create_revision(rb))),
        )
        .await?;
    ensure!(keys(r.kvs()) == ["f/a", "f/b"], "max_create {rb}: {r:?}");
    let r = c
        .get(
            "f/",
            Some(get(GetOptions::new()
                .with_min_create_revision(ra)
                .with_max_create_revision(ra)
                .with_min_mod_revision(ra2))),
        )
        .await?;
    ensure!(keys(r.kvs()) == ["f/a"], "combined: {r:?}");
    let r = c
        .get(
            "f/",
            Some(get(GetOptions::new().with_min_mod_revision(ra2 + 1))),
        )
        .await?;
    ensure!(r.kvs().is_empty(), "{r:?}");
    Ok(())
}

/// All keys written by one txn share one revision; reads and no-op deletes create none.
pub async fn kv_one_revision_per_txn(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    let r0 = current_revision(&mut c).await?;
    let t = c
        .txn(Txn::new().and_then([
            TxnOp::put("t/1", "a", None),
            TxnOp::put("t/2", "b", None),
            TxnOp::put("t/3", "c", None),
        ]))
        .await?;
    let rt = header_revision(t.header())?;
    ensure!(rt == r0 + 1, "one txn, one revision: {r0} -> {rt}");
    let r = c.get("t/", Some(GetOptions::new().with_prefix())).await?;
    ensure!(
        r.kvs()
            .iter()
            .all(|kv| kv.mod_revision() == rt && kv.create_revision() == rt),
        "{r:?}"
    );

    // A read-only txn and a delete of nothing create no revision.
    let t = c
        .txn(Txn::new().and_then([TxnOp::get("t/1", None)]))
        .await?;
    ensure!(header_revision(t.header())? == rt, "read-only txn: {t:?}");
    let d = c.delete("absent", None).await?;
    ensure!(
        d.deleted() == 0 && header_revision(d.header())? == rt,
        "{d:?}"
    );
    let d = c
        .delete("absent/", Some(DeleteOptions::new().with_prefix()))
        .await?;
    ensure!(header_revision(d.header())? == rt, "{d:?}");

    // A multi-key delete is one revision too.
    let d = c
        .delete("t/", Some(DeleteOptions::new().with_prefix()))
        .await?;
    ensure!(
        d.deleted() == 3 && header_revision(d.header())? == rt + 1,
        "{d:?}"
    );
    // A txn mixing puts and deletes is one revision.
    c.put("t/x", "1", None).await?;
    let t = c
        .txn(Txn::new().and_then([TxnOp::put("t/y", "1", None), TxnOp::delete("t/x", None)]))
        .await?;
    ensure!(header_revision(t.header())? == rt + 3, "{t:?}");
    Ok(())
}

/// DeleteRange: count and prev_kvs, in key order.
pub async fn kv_delete_range(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    put_all(&mut c, &["d/3", "d/1", "d/2", "e"]).await?;
    let d = c
        .delete(
            "d/1",
            Some(DeleteOptions::new().with_range("d/3").with_prev_key()),
        )
        .await?;
    ensure!(d.deleted() == 2, "{d:?}");
    ensure!(keys(d.prev_kvs()) == ["d/1", "d/2"], "{d:?}");
    ensure!(values(d.prev_kvs()) == ["val-d/1", "val-d/2"], "{d:?}");
    let rest = c.get("", Some(GetOptions::new().with_all_keys())).await?;
    ensure!(keys(rest.kvs()) == ["d/3", "e"], "{rest:?}");
    let d = c
        .delete(
            "",
            Some(DeleteOptions::new().with_all_keys().with_prev_key()),
        )
        .await?;
    ensure!(
        d.deleted() == 2 && keys(d.prev_kvs()) == ["d/3", "e"],
        "{d:?}"
    );
    let d = c
        .delete(
            "d/",
            Some(DeleteOptions::new().with_prefix().with_prev_key()),
        )
        .await?;
    ensure!(d.deleted() == 0 && d.prev_kvs().is_empty(), "{d:?}");
    Ok(())
}

/// Many clients at once, so writes share group-commit batches: compare-and-swap counters
/// (each success bumps value and version by one, whatever else shares its batch), and a key
/// deleted by a range and re-created in the same burst (its version restarts at 1). Ends
/// checked against what each client saw acknowledged.
pub async fn kv_concurrent_writes(target: Target) -> Result<()> {
    const CLIENTS: usize = 16;
    const ROUNDS: usize = 12;
    const COUNTERS: usize = 3;
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    for k in 0..COUNTERS {
        c.put(format!("cnt/{k}").as_str(), "0", None).await?;
    }
    let mut tasks = Vec::new();
    for t in 0..CLIENTS {
        let mut wc = server.client().await?;
        tasks.push(tokio::spawn(async move {
            let mut successes = [0i64; COUNTERS];
            for r in 0..ROUNDS {
                // A counter increment, retried until its compare holds.
                let k = (t + r) % COUNTERS;
                let key = format!("cnt/{k}");
                loop {
                    let seen = wc.get(key.as_str(), None).await?;
                    let kv = seen.kvs().first().context("counter missing")?;
                    let n: i64 = kv.value_str()?.parse()?;
                    let outcome = wc
                        .txn(
                            Txn::new()
                                .when([Compare::mod_revision(
                                    key.as_str(),
                                    CompareOp::Equal,
                                    kv.mod_revision(),
                                )])
                                .and_then([TxnOp::put(key.as_str(), (n + 1).to_string(), None)])
                                .or_else([TxnOp::get(key.as_str(), None)]),
                        )
                        .await?;
                    if outcome.succeeded() {
                        successes[k] += 1;
                        break;
                    }
                }
                // Two keys written, the prefix deleted, one key written again.
                let own = format!("own/{t}/");
                wc.txn(Txn::new().and_then([
                    TxnOp::put(format!("{own}a").as_str(), r.to_string(), None),
                    TxnOp::put(format!("{own}b").as_str(), r.to_string(), None),
                ]))
                .await?;
                let d = wc
                    .delete(own.as_str(), Some(DeleteOptions::new().with_prefix()))
                    .await?;
                ensure!(d.deleted() == 2, "client {t} round {r}: {d:?}");
                wc.put(format!("{own}a").as_str(), r.to_string(), None)
                    .await?;
            }
            anyhow::Ok(successes)
        }));
    }
    let mut successes = [0i64; COUNTERS];
    for task in tasks {
        for (k, n) in task.await??.iter().enumerate() {
            successes[k] += n;
        }
    }
    for (k, n) in successes.iter().enumerate() {
        let kv = get_one(&mut c, &format!("cnt/{k}"))
            .await?
            .context("counter gone")?;
        ensure!(
            kv.value_str()? == n.to_string() && kv.version() == n + 1,
            "counter {k}: {n} increments acknowledged, found {kv:?}"
        );
    }
    let own = c.get("own/", Some(GetOptions::new().with_prefix())).await?;
    ensure!(own.count() == CLIENTS as i64, "{own:?}");
    for kv in own.kvs() {
        ensure!(
            kv.key_str()?.ends_with("/a")
                && kv.value_str()? == (ROUNDS - 1).to_string()
                && kv.version() == 1
                && kv.create_revision() == kv.mod_revision(),
            "re-created after its delete: {kv:?}"
        );
    }
    Ok(())
}
