//! The storage operations through the library, on SQLite (`memory://`: a throwaway file
//! without fsync, so this measures kine-rs's own work and SQLite's, not the disk): a put, a
//! create transaction, 16 concurrent creates (group commit), a get, and a page of 500 keys of
//! a 10,000-key prefix.
//!
//! `cargo bench -p kine-bench --bench storage -- --quick`

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use kine::keyspace::{HeaderIdentity, Keyspace};
use kine::storage::BackendOptions;
use kine::txn::RequestLimits;
use kine_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use kine_proto::etcdserverpb::request_op::Request;
use kine_proto::etcdserverpb::{Compare, PutRequest, RangeRequest, RequestOp, TxnRequest};

fn create_txn(key: Bytes, value: Bytes) -> TxnRequest {
    TxnRequest {
        compare: vec![Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Mod as i32,
            key: key.clone(),
            range_end: Bytes::new(),
            target_union: Some(TargetUnion::ModRevision(0)),
        }],
        success: vec![RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: key.clone(),
                value,
                ..Default::default()
            })),
        }],
        failure: vec![RequestOp {
            request: Some(Request::RequestRange(RangeRequest {
                key,
                ..Default::default()
            })),
        }],
    }
}

fn storage(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let keyspace: Arc<Keyspace> = runtime.block_on(async {
        let backend = kine::storage::open("memory://", &BackendOptions::default())
            .await
            .expect("open memory://");
        Keyspace::open(
            backend,
            "default",
            true,
            RequestLimits::default(),
            HeaderIdentity::default(),
        )
        .await
        .expect("open keyspace")
        .expect("keyspace exists")
    });
    let value = Bytes::from(vec![b'v'; 1024]);
    // A prefix of 10,000 keys of 1 KiB to list, loaded in transactions of 100 puts.
    runtime.block_on(async {
        for chunk in 0..100 {
            let success = (0..100)
                .map(|i| RequestOp {
                    request: Some(Request::RequestPut(PutRequest {
                        key: Bytes::from(format!(
                            "/registry/configmaps/list/{:06}",
                            chunk * 100 + i
                        )),
                        value: value.clone(),
                        ..Default::default()
                    })),
                })
                .collect();
            keyspace
                .txn(TxnRequest {
                    compare: Vec::new(),
                    success,
                    failure: Vec::new(),
                })
                .await
                .expect("load");
        }
    });
    let seq = AtomicU64::new(0);
    let next_key = |what: &str| {
        Bytes::from(format!(
            "/registry/{what}/default/obj-{:010}",
            seq.fetch_add(1, Ordering::Relaxed)
        ))
    };

    let mut group = c.benchmark_group("storage-sqlite");
    group.bench_function("put", |b| {
        b.iter(|| {
            let request = PutRequest {
                key: next_key("puts"),
                value: value.clone(),
                ..Default::default()
            };
            runtime.block_on(keyspace.put(request)).expect("put")
        })
    });
    group.bench_function("txn-create", |b| {
        b.iter(|| {
            let request = create_txn(next_key("pods"), value.clone());
            let response = runtime.block_on(keyspace.txn(request)).expect("txn");
            assert!(response.succeeded);
        })
    });
    group.bench_function("txn-create-16-concurrent", |b| {
        b.iter(|| {
            let requests: Vec<_> = (0..16)
                .map(|_| create_txn(next_key("pods16"), value.clone()))
                .collect();
            runtime.block_on(async {
                let results =
                    futures::future::join_all(requests.into_iter().map(|r| keyspace.txn(r))).await;
                for result in results {
                    assert!(result.expect("txn").succeeded);
                }
            })
        })
    });
    group.bench_function("get", |b| {
        b.iter(|| {
            let request = RangeRequest {
                key: Bytes::from_static(b"/registry/configmaps/list/004242"),
                ..Default::default()
            };
            let response = runtime.block_on(keyspace.range(request)).expect("get");
            assert_eq!(response.kvs.len(), 1);
        })
    });
    group.bench_function("list-page-500-of-10000", |b| {
        b.iter(|| {
            let request = RangeRequest {
                key: Bytes::from_static(b"/registry/configmaps/list/"),
                range_end: Bytes::from_static(b"/registry/configmaps/list0"),
                limit: 500,
                ..Default::default()
            };
            let response = runtime
                .block_on(keyspace.range(black_box(request)))
                .expect("list");
            assert_eq!(response.kvs.len(), 500);
            assert_eq!(response.count, 10_000);
        })
    });
    group.finish();
}

criterion_group!(benches, storage);
criterion_main!(benches);
