//! Encode and decode of the messages kube-apiserver exchanges with its datastore most: the
//! create transaction, a page of a list (500 objects of 1 KiB), and a watch response.
//!
//! `cargo bench -p kine-bench --bench codec -- --quick`

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kine_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use kine_proto::etcdserverpb::request_op::Request;
use kine_proto::etcdserverpb::{
    Compare, PutRequest, RangeRequest, RangeResponse, RequestOp, ResponseHeader, TxnRequest,
    WatchResponse,
};
use kine_proto::mvccpb::{Event, KeyValue, event::EventType};
use prost::Message;

fn pod_key(i: usize) -> Bytes {
    Bytes::from(format!("/registry/pods/default/web-{i:08}"))
}

fn create_txn() -> TxnRequest {
    let key = pod_key(1);
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
                value: Bytes::from(vec![0x6b; 2048]),
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

fn kv(i: usize, size: usize) -> KeyValue {
    KeyValue {
        key: pod_key(i),
        create_revision: 1000 + i as i64,
        mod_revision: 2000 + i as i64,
        version: 3,
        value: Bytes::from(vec![0x6b; size]),
        lease: 0,
    }
}

fn header() -> Option<ResponseHeader> {
    Some(ResponseHeader {
        cluster_id: 1,
        member_id: 2,
        revision: 123_456,
        raft_term: 1,
    })
}

fn list_page() -> RangeResponse {
    RangeResponse {
        header: header(),
        kvs: (0..500).map(|i| kv(i, 1024)).collect(),
        more: true,
        count: 10_000,
    }
}

fn watch_response() -> WatchResponse {
    WatchResponse {
        header: header(),
        watch_id: 7,
        events: (0..10)
            .map(|i| Event {
                r#type: EventType::Put as i32,
                kv: Some(kv(i, 2048)),
                prev_kv: None,
            })
            .collect(),
        ..Default::default()
    }
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    let txn = create_txn();
    let txn_bytes = Bytes::from(txn.encode_to_vec());
    group.throughput(Throughput::Bytes(txn_bytes.len() as u64));
    group.bench_function("txn-create/encode", |b| {
        b.iter(|| black_box(&txn).encode_to_vec())
    });
    group.bench_function("txn-create/decode", |b| {
        b.iter(|| TxnRequest::decode(black_box(txn_bytes.clone())))
    });

    let page = list_page();
    let page_bytes = Bytes::from(page.encode_to_vec());
    group.throughput(Throughput::Bytes(page_bytes.len() as u64));
    group.bench_function("list-page-500x1KiB/encode", |b| {
        b.iter(|| black_box(&page).encode_to_vec())
    });
    group.bench_function("list-page-500x1KiB/decode", |b| {
        b.iter(|| RangeResponse::decode(black_box(page_bytes.clone())))
    });

    let watch = watch_response();
    let watch_bytes = Bytes::from(watch.encode_to_vec());
    group.throughput(Throughput::Bytes(watch_bytes.len() as u64));
    group.bench_function("watch-10-events/encode", |b| {
        b.iter(|| black_box(&watch).encode_to_vec())
    });
    group.bench_function("watch-10-events/decode", |b| {
        b.iter(|| WatchResponse::decode(black_box(watch_bytes.clone())))
    });
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
