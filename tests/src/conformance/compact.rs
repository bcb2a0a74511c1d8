//! The Compact RPC.

use anyhow::{Context, Result, ensure};
use etcd_client::{CompactionOptions, DeleteOptions, GetOptions, Txn, TxnOp};
use tonic::Code;

use super::{Server, Target, expect_status, header_revision, values};

/// Reads below the compaction revision fail, reads at or above it see the right values;
/// compacting again at the same or a lower revision fails, as does compacting the future.
pub async fn compact_rpc(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    let mut revs = Vec::new();
    for i in 0..6 {
        revs.push(header_revision(
            c.put("c", format!("v{i}"), None).await?.header(),
        )?);
    }
    c.put("other", "x", None).await?;
    let at = revs[3];
    let resp = c.compact(at, None).await?;
    ensure!(header_revision(resp.header())? >= revs[5], "{resp:?}");

    const COMPACTED: &str = "etcdserver: mvcc: required revision has been compacted";
    for rev in &revs[..3] {
        expect_status(
            c.get("c", Some(GetOptions::new().with_revision(*rev)))
                .await,
            Code::OutOfRange,
            COMPACTED,
        )?;
    }
    for (i, rev) in revs.iter().enumerate().skip(3) {
        let r = c
            .get("c", Some(GetOptions::new().with_revision(*rev)))
            .await?;
        ensure!(values(r.kvs()) == [format!("v{i}")], "at {rev}: {r:?}");
        ensure!(
            r.kvs()[0].version() == i as i64 + 1,
            "versions survive compaction: {r:?}"
        );
        ensure!(r.kvs()[0].create_revision() == revs[0], "{r:?}");
    }
    let latest = c.get("c", None).await?;
    ensure!(
        values(latest.kvs()) == ["v5"] && latest.kvs()[0].version() == 6,
        "{latest:?}"
    );

    expect_status(c.compact(revs[1], None).await, Code::OutOfRange, COMPACTED)?;
    expect_status(c.compact(at, None).await, Code::OutOfRange, COMPACTED)?;
    let current = header_revision(latest.header())?;
    expect_status(
        c.compact(current + 10, None).await,
        Code::OutOfRange,
        "etcdserver: mvcc: required revision is a future revision",
    )?;
    // Physical compaction and compaction up to the current revision work.
    c.compact(current, Some(CompactionOptions::new().with_physical()))
        .await?;
    let r = c.get("c", None).await?;
    ensure!(values(r.kvs()) == ["v5"], "{r:?}");
    expect_status(
        c.get("c", Some(GetOptions::new().with_revision(current - 1)))
            .await,
        Code::OutOfRange,
        COMPACTED,
    )?;
    Ok(())
}

/// A deleted key's history is gone after compaction, but its tombstone does not leak into
/// reads; a key re-created after compaction starts at version 1.
pub async fn compact_deleted_keys(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    c.put("gone", "1", None).await?;
    c.put("gone", "2", None).await?;
    let del = header_revision(c.delete("gone", None).await?.header())?;
    c.put("stay", "1", None).await?;
    let rev = header_revision(c.put("stay", "2", None).await?.header())?;
    c.compact(rev, None).await?;
    let r = c.get("", Some(GetOptions::new().with_all_keys())).await?;
    ensure!(values(r.kvs()) == ["2"] && r.count() == 1, "{r:?}");
    let r = c
        .get(
            "",
            Some(GetOptions::new().with_all_keys().with_revision(rev)),
        )
        .await?;
    ensure!(r.count() == 1, "{r:?}");
    ensure!(del < rev);
    c.put("gone", "again", None).await?;
    let r = c.get("gone", None).await?;
    ensure!(r.kvs()[0].version() == 1, "{r:?}");
    Ok(())
}

/// A key put and deleted again by one transaction (etcd 3.5 lets a nested transaction's put
/// stand beside a from-key delete after it): after a compaction past that revision, reads at
/// the compaction revision and watch history do not bring the put back.
pub async fn compact_put_and_deleted_in_one_revision(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    c.put("k", "old", None).await?;
    let both = Txn::new().and_then([
        TxnOp::txn(Txn::new().and_then([TxnOp::put("k", "new", None)])),
        TxnOp::delete("\0", Some(DeleteOptions::new().with_from_key())),
    ]);
    let answer = c.txn(both).await;
    if matches!(target, Target::EtcdProxy) {
        // The proxy's one documented difference here (README, "The etcd proxy"): the delete's
        // end becomes the tenant's prefix end, where etcd 3.5's check sees the overlap.
        let error = answer.err().context("the proxy ran the transaction")?;
        ensure!(
            error
                .to_string()
                .contains("duplicate key given in txn request"),
            "{error}"
        );
        return Ok(());
    }
    let rev = header_revision(answer?.header())?;
    let r = c.get("k", None).await?;
    ensure!(r.count() == 0, "after the transaction: {r:?}");
    let later = header_revision(c.put("other", "x", None).await?.header())?;
    c.compact(later, Some(CompactionOptions::new().with_physical()))
        .await?;
    // A revision after the compaction's, so reads at it are reads of history.
    c.put("other", "y", None).await?;
    for at in [rev, later] {
        let r = c.get("k", Some(GetOptions::new().with_revision(at))).await;
        match r {
            Ok(r) => ensure!(r.count() == 0 && r.kvs().is_empty(), "at {at}: {r:?}"),
            Err(error) => ensure!(at < later, "at {at}: {error}"),
        }
    }
    c.put("k", "again", None).await?;
    let r = c.get("k", None).await?;
    ensure!(
        r.kvs().len() == 1 && r.kvs()[0].version() == 1,
        "put after compaction: {r:?}"
    );
    Ok(())
}
