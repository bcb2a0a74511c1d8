//! The Compact RPC.

use anyhow::{Result, ensure};
use etcd_client::{CompactionOptions, GetOptions};
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
