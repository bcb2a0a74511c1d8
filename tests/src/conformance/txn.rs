//! Txn: compares on every target with every operator, range compares, nested txns, reads of
//! the txn's own writes.

use anyhow::{Context, Result, bail, ensure};
use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
    TxnResponse,
};

use super::{Server, Target, header_revision, keys, values};

async fn holds(c: &mut Client, cmp: Compare) -> Result<bool> {
    let resp = c.txn(Txn::new().when([cmp])).await?;
    Ok(resp.succeeded())
}

async fn check(c: &mut Client, what: &str, cmp: Compare, expected: bool) -> Result<()> {
    let got = holds(c, cmp.clone()).await?;
    ensure!(
        got == expected,
        "{what}: expected {expected}, got {got} ({cmp:?})"
    );
    Ok(())
}

/// Compares on value: =, !=, <, > (byte order); a value compare on a missing key fails.
pub async fn txn_compare_value(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    c.put("cv", "m", None).await?;
    use CompareOp::*;
    let v = |op, val: &str| Compare::value("cv", op, val);
    check(&mut c, "m = m", v(Equal, "m"), true).await?;
    check(&mut c, "m = n", v(Equal, "n"), false).await?;
    check(&mut c, "m != n", v(NotEqual, "n"), true).await?;
    check(&mut c, "m != m", v(NotEqual, "m"), false).await?;
    check(&mut c, "m < n", v(Less, "n"), true).await?;
    check(&mut c, "m < ma", v(Less, "ma"), true).await?;
    check(&mut c, "m < m", v(Less, "m"), false).await?;
    check(&mut c, "m > l", v(Greater, "l"), true).await?;
    check(&mut c, "m > \"\"", v(Greater, ""), true).await?;
    check(&mut c, "m > m", v(Greater, "m"), false).await?;
    let missing = |op, val: &str| Compare::value("absent", op, val);
    check(&mut c, "missing = \"\"", missing(Equal, ""), false).await?;
    check(&mut c, "missing != x", missing(NotEqual, "x"), false).await?;
    check(&mut c, "missing < x", missing(Less, "x"), false).await?;
    Ok(())
}

/// Compares on version, create revision, mod revision and lease, with every operator,
/// on present and missing keys (a missing key has 0 for all of them).
pub async fn txn_compare_revisions_and_lease(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    let lease = c.lease_grant(600, None).await?.id();
    let created = header_revision(c.put("cr", "1", None).await?.header())?;
    let modified = header_revision(
        c.put("cr", "2", Some(PutOptions::new().with_lease(lease)))
            .await?
            .header(),
    )?;
    use CompareOp::*;
    type Make = fn(&'static str, CompareOp, i64) -> Compare;
    let targets: [(&str, Make, i64); 4] = [
        ("version", |k, o, n| Compare::version(k, o, n), 2),
        (
            "create",
            |k, o, n| Compare::create_revision(k, o, n),
            created,
        ),
        ("mod", |k, o, n| Compare::mod_revision(k, o, n), modified),
        ("lease", |k, o, n| Compare::lease(k, o, n), lease),
    ];
    for (name, make, actual) in targets {
        check(
            &mut c,
            &format!("{name} = actual"),
            make("cr", Equal, actual),
            true,
        )
        .await?;
        check(
            &mut c,
            &format!("{name} = other"),
            make("cr", Equal, actual + 1),
            false,
        )
        .await?;
        check(
            &mut c,
            &format!("{name} != other"),
            make("cr", NotEqual, actual - 1),
            true,
        )
        .await?;
        check(
            &mut c,
            &format!("{name} != actual"),
            make("cr", NotEqual, actual),
            false,
        )
        .await?;
        check(
            &mut c,
            &format!("{name} < actual+1"),
            make("cr", Less, actual + 1),
            true,
        )
        .await?;
        check(
            &mut c,
            &format!("{name} < actual"),
            make("cr", Less, actual),
            false,
        )
        .await?;
        check(
            &mut c,
            &format!("{name} > actual-1"),
            make("cr", Greater, actual - 1),
            true,
        )
        .await?;
        check(
            &mut c,
            &format!("{name} > actual"),
            make("cr", Greater, actual),
            false,
        )
        .await?;
        check(
            &mut c,
            &format!("missing {name} = 0"),
            make("absent", Equal, 0),
            true,
        )
        .await?;
        check(
            &mut c,
            &format!("missing {name} > 0"),
            make("absent", Greater, 0),
            false,
        )
        .await?;
        check(
            &mut c,
            &format!("missing {name} < 1"),
            make("absent", Less, 1),
            true,
        )
        .await?;
    }
    // Several compares: all must hold.
    let both = Txn::new().when([
        Compare::version("cr", Equal, 2),
        Compare::value("cr", Equal, "2"),
    ]);
    ensure!(c.txn(both).await?.succeeded());
    let one_fails = Txn::new().when([
        Compare::version("cr", Equal, 2),
        Compare::value("cr", Equal, "1"),
    ]);
    ensure!(!c.txn(one_fails).await?.succeeded());
    Ok(())
}

/// Compares with a range_end hold only if they hold for every key in the range.
pub async fn txn_compare_range(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    c.put("r/a", "x", None).await?;
    c.put("r/b", "y", None).await?;
    c.put("r/b", "y", None).await?;
    c.put("s", "z", None).await?;
    use CompareOp::*;
    check(
        &mut c,
        "prefix version > 0",
        Compare::version("r/", Greater, 0).with_prefix(),
        true,
    )
    .await?;
    check(
        &mut c,
        "prefix version = 1",
        Compare::version("r/", Equal, 1).with_prefix(),
        false,
    )
    .await?;
    check(
        &mut c,
        "prefix version < 3",
        Compare::version("r/", Less, 3).with_prefix(),
        true,
    )
    .await?;
    check(
        &mut c,
        "prefix value > w",
        Compare::value("r/", Greater, "w").with_prefix(),
        true,
    )
    .await?;
    check(
        &mut c,
        "prefix value = x",
        Compare::value("r/", Equal, "x").with_prefix(),
        false,
    )
    .await?;
    check(
        &mut c,
        "[r/a, r/b) version = 1",
        Compare::version("r/a", Equal, 1).with_range("r/b"),
        true,
    )
    .await?;
    check(
        &mut c,
        "[r/, t) version > 0",
        Compare::version("r/", Greater, 0).with_range("t"),
        true,
    )
    .await?;
    check(
        &mut c,
        "[r/, t) value < z",
        Compare::value("r/", Less, "z").with_range("t"),
        false,
    )
    .await?;
    check(
        &mut c,
        "empty range version = 0",
        Compare::version("q/", Equal, 0).with_prefix(),
        true,
    )
    .await?;
    check(
        &mut c,
        "empty range create = 0",
        Compare::create_revision("q/", Equal, 0).with_prefix(),
        true,
    )
    .await?;
    Ok(())
}

fn range_of(resp: &TxnOpResponse) -> Result<&etcd_client::GetResponse> {
    match resp {
        TxnOpResponse::Get(g) => Ok(g),
        other => bail!("expected a range response, got {other:?}"),
    }
}

/// Success and failure branches, and the response kinds of every op.
pub async fn txn_branches(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    c.put("b/x", "1", None).await?;
    let txn = |ok: bool| {
        Txn::new()
            .when([Compare::value(
                "b/x",
                CompareOp::Equal,
                if ok { "1" } else { "0" },
            )])
            .and_then([
                TxnOp::put("b/then", "t", Some(PutOptions::new().with_prev_key())),
                TxnOp::get("b/x", None),
                TxnOp::delete("b/none", None),
            ])
            .or_else([
                TxnOp::put("b/else", "e", None),
                TxnOp::get("b/", Some(GetOptions::new().with_prefix())),
            ])
    };
    let t = c.txn(txn(true)).await?;
    ensure!(t.succeeded(), "{t:?}");
    let ops = t.op_responses();
    ensure!(ops.len() == 3, "{t:?}");
    ensure!(
        matches!(&ops[0], TxnOpResponse::Put(p) if p.prev_key().is_none()),
        "{t:?}"
    );
    ensure!(values(range_of(&ops[1])?.kvs()) == ["1"], "{t:?}");
    ensure!(
        matches!(&ops[2], TxnOpResponse::Delete(d) if d.deleted() == 0),
        "{t:?}"
    );

    let f = c.txn(txn(false)).await?;
    ensure!(!f.succeeded(), "{f:?}");
    let ops = f.op_responses();
    ensure!(
        ops.len() == 2 && matches!(ops[0], TxnOpResponse::Put(_)),
        "{f:?}"
    );
    ensure!(
        keys(range_of(&ops[1])?.kvs()) == ["b/else", "b/then", "b/x"],
        "{f:?}"
    );

    // An empty txn succeeds and changes nothing.
    let rev = header_revision(f.header())?;
    let e = c.txn(Txn::new()).await?;
    ensure!(e.succeeded() && e.op_responses().is_empty(), "{e:?}");
    ensure!(header_revision(e.header())? == rev);
    Ok(())
}

fn nested(resp: &TxnOpResponse) -> Result<&TxnResponse> {
    match resp {
        TxnOpResponse::Txn(t) => Ok(t),
        other => bail!("expected a txn response, got {other:?}"),
    }
}

/// Txns nested in txns: inner compares decide inner branches, all writes share one revision.
pub async fn txn_nested(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    c.put("n/flag", "on", None).await?;
    let inner_ok = Txn::new()
        .when([Compare::value("n/flag", CompareOp::Equal, "on")])
        .and_then([
            TxnOp::put("n/inner-then", "1", None),
            TxnOp::get("n/flag", None),
        ])
        .or_else([TxnOp::put("n/inner-else", "1", None)]);
    let inner_fail = Txn::new()
        .when([Compare::value("n/flag", CompareOp::Equal, "off")])
        .and_then([TxnOp::put("n/never", "1", None)])
        .or_else([
            TxnOp::put("n/fallback", "1", None),
            TxnOp::txn(Txn::new().and_then([TxnOp::put("n/deepest", "1", None)])),
        ]);
    let outer = Txn::new()
        .when([Compare::version("n/flag", CompareOp::Equal, 1)])
        .and_then([
            TxnOp::put("n/outer", "1", None),
            TxnOp::txn(inner_ok),
            TxnOp::txn(inner_fail),
        ]);
    let t = c.txn(outer).await?;
    ensure!(t.succeeded(), "{t:?}");
    let rev = header_revision(t.header())?;
    let ops = t.op_responses();
    ensure!(ops.len() == 3, "{t:?}");
    let first = nested(&ops[1])?;
    ensure!(first.succeeded(), "{first:?}");
    let first_ops = first.op_responses();
    ensure!(first_ops.len() == 2, "{first:?}");
    ensure!(
        values(range_of(&first_ops[1])?.kvs()) == ["on"],
        "{first:?}"
    );
    let second = nested(&ops[2])?;
    ensure!(!second.succeeded(), "{second:?}");
    let second_ops = second.op_responses();
    ensure!(second_ops.len() == 2, "{second:?}");
    ensure!(nested(&second_ops[1])?.succeeded(), "{second:?}");

    let all = c.get("n/", Some(GetOptions::new().with_prefix())).await?;
    ensure!(
        keys(all.kvs())
            == [
                "n/deepest",
                "n/fallback",
                "n/flag",
                "n/inner-then",
                "n/outer"
            ],
        "{all:?}"
    );
    ensure!(
        all.kvs()
            .iter()
            .filter(|kv| kv.key() != b"n/flag")
            .all(|kv| kv.mod_revision() == rev),
        "every write of the nested txn has revision {rev}: {all:?}"
    );
    Ok(())
}

/// Reads inside a txn see the txn's earlier writes (and deletes).
pub async fn txn_reads_own_writes(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    c.put("o/old", "gone-soon", None).await?;
    c.put("o/kept", "v1", None).await?;
    let t = c
        .txn(Txn::new().and_then([
            TxnOp::get("o/", Some(GetOptions::new().with_prefix())),
            TxnOp::put("o/new", "fresh", None),
            TxnOp::put("o/kept", "v2", None),
            TxnOp::delete("o/old", None),
            TxnOp::get("o/", Some(GetOptions::new().with_prefix())),
            TxnOp::get(
                "o/",
                Some(GetOptions::new().with_prefix().with_count_only()),
            ),
        ]))
        .await?;
    let rev = header_revision(t.header())?;
    let ops = t.op_responses();
    ensure!(ops.len() == 6, "{t:?}");
    let before = range_of(&ops[0])?;
    ensure!(keys(before.kvs()) == ["o/kept", "o/old"], "{before:?}");
    let after = range_of(&ops[4])?;
    ensure!(keys(after.kvs()) == ["o/kept", "o/new"], "{after:?}");
    ensure!(values(after.kvs()) == ["v2", "fresh"], "{after:?}");
    let kept = &after.kvs()[0];
    ensure!(
        kept.mod_revision() == rev && kept.version() == 2,
        "{kept:?}"
    );
    let new = &after.kvs()[1];
    ensure!(
        new.create_revision() == rev && new.version() == 1,
        "{new:?}"
    );
    let count = range_of(&ops[5])?;
    ensure!(count.count() == 2, "{count:?}");

    // Nested txns: their compares are decided on the state before the whole txn (as etcd
    // does), their ops see the outer txn's earlier writes.
    let t = c
        .txn(
            Txn::new().and_then([
                TxnOp::put("o/flag", "set", None),
                TxnOp::txn(
                    Txn::new()
                        .when([Compare::value("o/flag", CompareOp::Equal, "set")])
                        .and_then([TxnOp::put("o/never", "x", None)])
                        .or_else([TxnOp::get("o/flag", None)]),
                ),
            ]),
        )
        .await?;
    let ops = t.op_responses();
    let inner = nested(ops.get(1).context("missing nested response")?)?;
    ensure!(
        !inner.succeeded(),
        "nested compares see the state before the txn: {inner:?}"
    );
    let inner_ops = inner.op_responses();
    let flag = range_of(inner_ops.first().context("no op")?)?;
    ensure!(
        values(flag.kvs()) == ["set"],
        "nested reads see the outer put: {flag:?}"
    );

    // A delete range with prev_kv inside a txn.
    let t = c
        .txn(Txn::new().and_then([TxnOp::delete(
            "o/",
            Some(DeleteOptions::new().with_prefix().with_prev_key()),
        )]))
        .await?;
    match t.op_responses().first() {
        Some(TxnOpResponse::Delete(d)) => {
            ensure!(d.deleted() == 3, "{d:?}");
            ensure!(keys(d.prev_kvs()) == ["o/flag", "o/kept", "o/new"], "{d:?}");
        }
        other => bail!("expected a delete response, got {other:?}"),
    }
    Ok(())
}
