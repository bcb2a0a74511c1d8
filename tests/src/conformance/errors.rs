//! Errors with etcd's exact gRPC codes and messages (clients parse them).

use anyhow::Result;
use etcd_client::{
    Compare, CompareOp, DeleteOptions, GetOptions, LeaseGrantOptions, PutOptions, Txn, TxnOp,
};
use tonic::Code;

use super::{Server, Target, current_revision, expect_code, expect_status, header_revision};

/// `etcdserver: mvcc: required revision has been compacted` (OutOfRange) and
/// `etcdserver: mvcc: required revision is a future revision` (OutOfRange), on Range and
/// inside a Txn.
pub async fn err_compacted_and_future_revision(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    let r1 = header_revision(c.put("e", "1", None).await?.header())?;
    c.put("e", "2", None).await?;
    let r3 = header_revision(c.put("e", "3", None).await?.header())?;
    c.compact(r3 - 1, None).await?;
    // The etcd proxy records a tenant's compaction in etcd, which takes a revision of the
    // shared cluster; elsewhere the current revision is still r3.
    let r3 = header_revision(c.get("e", None).await?.header())?;
    const COMPACTED: &str = "etcdserver: mvcc: required revision has been compacted";
    const FUTURE: &str = "etcdserver: mvcc: required revision is a future revision";
    expect_status(
        c.get("e", Some(GetOptions::new().with_revision(r1))).await,
        Code::OutOfRange,
        COMPACTED,
    )?;
    expect_status(
        c.get("e", Some(GetOptions::new().with_revision(r3 + 1)))
            .await,
        Code::OutOfRange,
        FUTURE,
    )?;
    expect_status(
        c.get(
            "e",
            Some(GetOptions::new().with_revision(r3 + 1000).with_prefix()),
        )
        .await,
        Code::OutOfRange,
        FUTURE,
    )?;
    expect_status(
        c.txn(Txn::new().and_then([TxnOp::get("e", Some(GetOptions::new().with_revision(r1)))]))
            .await,
        Code::OutOfRange,
        COMPACTED,
    )?;
    expect_status(
        c.txn(Txn::new().and_then([TxnOp::get(
            "e",
            Some(GetOptions::new().with_revision(r3 + 5)),
        )]))
        .await,
        Code::OutOfRange,
        FUTURE,
    )?;
    // The compaction revision itself and the current revision stay readable.
    c.get("e", Some(GetOptions::new().with_revision(r3 - 1)))
        .await?;
    c.get("e", Some(GetOptions::new().with_revision(r3)))
        .await?;
    Ok(())
}

/// `etcdserver: requested lease not found` (NotFound) for put, revoke; grant of an existing
/// id: `etcdserver: lease already exists` (FailedPrecondition).
pub async fn err_leases(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    const NOT_FOUND: &str = "etcdserver: requested lease not found";
    expect_status(
        c.put("l", "v", Some(PutOptions::new().with_lease(0x7777)))
            .await,
        Code::NotFound,
        NOT_FOUND,
    )?;
    expect_status(c.lease_revoke(0x7777).await, Code::NotFound, NOT_FOUND)?;
    expect_status(
        c.txn(Txn::new().and_then([TxnOp::put(
            "l",
            "v",
            Some(PutOptions::new().with_lease(0x7777)),
        )]))
        .await,
        Code::NotFound,
        NOT_FOUND,
    )?;
    let id = c
        .lease_grant(60, Some(LeaseGrantOptions::new().with_id(0x4242)))
        .await?
        .id();
    expect_status(
        c.lease_grant(60, Some(LeaseGrantOptions::new().with_id(id)))
            .await,
        Code::FailedPrecondition,
        "etcdserver: lease already exists",
    )?;
    c.lease_revoke(id).await?;
    expect_status(c.lease_revoke(id).await, Code::NotFound, NOT_FOUND)?;
    expect_status(
        c.put("l", "v", Some(PutOptions::new().with_lease(id)))
            .await,
        Code::NotFound,
        NOT_FOUND,
    )?;
    // Nothing was written by the failed requests.
    let r = c.get("l", None).await?;
    anyhow::ensure!(r.kvs().is_empty(), "{r:?}");
    Ok(())
}

/// `etcdserver: duplicate key given in txn request` and
/// `etcdserver: too many operations in txn request` (InvalidArgument).
pub async fn err_txn_validation(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    const DUPLICATE: &str = "etcdserver: duplicate key given in txn request";
    let before = current_revision(&mut c).await?;
    expect_status(
        c.txn(Txn::new().and_then([TxnOp::put("d", "1", None), TxnOp::put("d", "2", None)]))
            .await,
        Code::InvalidArgument,
        DUPLICATE,
    )?;
    expect_status(
        c.txn(Txn::new().and_then([
            TxnOp::put("d/x", "1", None),
            TxnOp::delete("d/", Some(DeleteOptions::new().with_prefix())),
        ]))
        .await,
        Code::InvalidArgument,
        DUPLICATE,
    )?;
    expect_status(
        c.txn(Txn::new().and_then([
            TxnOp::put("d", "1", None),
            TxnOp::txn(Txn::new().and_then([TxnOp::put("d", "2", None)])),
        ]))
        .await,
        Code::InvalidArgument,
        DUPLICATE,
    )?;
    // Overlapping writes in the two branches are fine, and so are reads of written keys.
    c.txn(
        Txn::new()
            .when([Compare::version("d", CompareOp::Equal, 0)])
            .and_then([TxnOp::put("d", "then", None), TxnOp::get("d", None)])
            .or_else([TxnOp::put("d", "else", None)]),
    )
    .await?;

    const TOO_MANY: &str = "etcdserver: too many operations in txn request";
    let ops: Vec<TxnOp> = (0..129)
        .map(|i| TxnOp::put(format!("m/{i}"), "v", None))
        .collect();
    expect_status(
        c.txn(Txn::new().and_then(ops)).await,
        Code::InvalidArgument,
        TOO_MANY,
    )?;
    let ops: Vec<TxnOp> = (0..129)
        .map(|i| TxnOp::get(format!("m/{i}"), None))
        .collect();
    expect_status(
        c.txn(Txn::new().or_else(ops)).await,
        Code::InvalidArgument,
        TOO_MANY,
    )?;
    let compares: Vec<Compare> = (0..129)
        .map(|i| Compare::version(format!("m/{i}"), CompareOp::Equal, 0))
        .collect();
    expect_status(
        c.txn(Txn::new().when(compares)).await,
        Code::InvalidArgument,
        TOO_MANY,
    )?;
    let ops: Vec<TxnOp> = (0..128)
        .map(|i| TxnOp::put(format!("m/{i}"), "v", None))
        .collect();
    c.txn(Txn::new().and_then(ops)).await?;
    let after = current_revision(&mut c).await?;
    anyhow::ensure!(
        after == before + 2,
        "only the two valid txns wrote: {before} -> {after}"
    );
    Ok(())
}

/// `etcdserver: key is not provided` (InvalidArgument) for empty keys.
pub async fn err_key_not_provided(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    const MSG: &str = "etcdserver: key is not provided";
    expect_status(c.put("", "v", None).await, Code::InvalidArgument, MSG)?;
    expect_status(c.get("", None).await, Code::InvalidArgument, MSG)?;
    expect_status(c.delete("", None).await, Code::InvalidArgument, MSG)?;
    expect_status(
        c.txn(Txn::new().and_then([TxnOp::put("", "v", None)]))
            .await,
        Code::InvalidArgument,
        MSG,
    )?;
    expect_status(
        c.txn(Txn::new().and_then([TxnOp::get("", None)])).await,
        Code::InvalidArgument,
        MSG,
    )?;
    expect_status(
        c.txn(Txn::new().when([Compare::version("", CompareOp::Equal, 0)]))
            .await,
        Code::InvalidArgument,
        MSG,
    )?;
    Ok(())
}

/// ignore_value with a value: `etcdserver: value is provided`; ignore_value or ignore_lease on
/// a missing key: `etcdserver: key not found`; ignore_lease with a lease:
/// `etcdserver: lease is provided` (all InvalidArgument).
pub async fn err_put_flags(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    expect_status(
        c.put("p", "value", Some(PutOptions::new().with_ignore_value()))
            .await,
        Code::InvalidArgument,
        "etcdserver: value is provided",
    )?;
    expect_status(
        c.put("p", "", Some(PutOptions::new().with_ignore_value()))
            .await,
        Code::InvalidArgument,
        "etcdserver: key not found",
    )?;
    expect_status(
        c.put("p", "v", Some(PutOptions::new().with_ignore_lease()))
            .await,
        Code::InvalidArgument,
        "etcdserver: key not found",
    )?;
    expect_status(
        c.txn(Txn::new().and_then([TxnOp::put(
            "p",
            "",
            Some(PutOptions::new().with_ignore_value()),
        )]))
        .await,
        Code::InvalidArgument,
        "etcdserver: key not found",
    )?;
    let lease = c.lease_grant(60, None).await?.id();
    c.put("p", "v", None).await?;
    expect_status(
        c.put(
            "p",
            "v",
            Some(PutOptions::new().with_ignore_lease().with_lease(lease)),
        )
        .await,
        Code::InvalidArgument,
        "etcdserver: lease is provided",
    )?;
    Ok(())
}

/// A ~1.6 MB value is over etcd's default --max-request-bytes (1.5 MiB) but under its gRPC
/// receive limit: `etcdserver: request is too large` (InvalidArgument). A 3 MiB request is
/// over the gRPC receive limit (1.5 MiB + 512 KiB) and gRPC itself answers ResourceExhausted.
pub async fn err_request_too_large(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    let big = vec![b'x'; 1_600_000];
    expect_status(
        c.put("big", big.clone(), None).await,
        Code::InvalidArgument,
        "etcdserver: request is too large",
    )?;
    expect_status(
        c.txn(Txn::new().and_then([TxnOp::put("big", big, None)]))
            .await,
        Code::InvalidArgument,
        "etcdserver: request is too large",
    )?;
    let huge = vec![b'x'; 3 * 1024 * 1024];
    expect_code(c.put("huge", huge, None).await, Code::ResourceExhausted)?;
    // Just under the limit is fine.
    c.put("fits", vec![b'y'; 1_000_000], None).await?;
    let r = c.get("fits", None).await?;
    anyhow::ensure!(r.kvs().first().map(|kv| kv.value().len()) == Some(1_000_000));
    anyhow::ensure!(c.get("big", None).await?.kvs().is_empty());
    Ok(())
}

/// A sort order or target that is none of the API's values: `etcdserver: invalid sort option`
/// (InvalidArgument), in a Range and in a transaction's range, checked after the key, as etcd
/// 3.6 and later answer (`tests/tests/range_stream.rs` compares it with etcd 3.7). The one
/// exception: etcd 3.5.1, the oracle, has no such check: it answers an unknown order as if none
/// were asked, and an unknown sort target ends its connection (so that is not sent to it).
pub async fn err_invalid_sort_option(target: Target) -> Result<()> {
    use kine_proto::etcdserverpb as pb;
    let server = Server::start(target).await?;
    let channel = tonic::transport::Channel::from_shared(server.endpoint.clone())?
        .connect()
        .await?;
    let mut kv = pb::kv_client::KvClient::new(channel);
    const MSG: &str = "etcdserver: invalid sort option";
    fn check<T: std::fmt::Debug>(
        result: std::result::Result<T, tonic::Status>,
        code: Code,
        message: &str,
    ) -> Result<()> {
        match result {
            Ok(value) => anyhow::bail!("expected {code:?} {message:?}, got {value:?}"),
            Err(status) if status.code() == code && status.message() == message => Ok(()),
            Err(status) => anyhow::bail!(
                "expected {code:?} {message:?}, got {:?} {:?}",
                status.code(),
                status.message()
            ),
        }
    }
    let range = |sort_order: i32, sort_target: i32| pb::RangeRequest {
        key: "s".into(),
        sort_order,
        sort_target,
        ..Default::default()
    };
    if matches!(target, Target::Etcd) {
        kv.range(range(9, 0)).await?;
        return Ok(());
    }
    check(kv.range(range(9, 0)).await, Code::InvalidArgument, MSG)?;
    check(kv.range(range(1, 9)).await, Code::InvalidArgument, MSG)?;
    check(kv.range(range(-1, 0)).await, Code::InvalidArgument, MSG)?;
    // The key is checked first.
    check(
        kv.range(pb::RangeRequest {
            key: "".into(),
            ..range(9, 0)
        })
        .await,
        Code::InvalidArgument,
        "etcdserver: key is not provided",
    )?;
    let txn = pb::TxnRequest {
        success: vec![pb::RequestOp {
            request: Some(pb::request_op::Request::RequestRange(range(0, 9))),
        }],
        ..Default::default()
    };
    check(kv.txn(txn).await, Code::InvalidArgument, MSG)?;
    // The valid ones still answer.
    kv.range(range(2, 4)).await?;
    Ok(())
}
