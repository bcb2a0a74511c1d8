//! Wire compatibility of `kine-proto` with the etcd API as clients compile it.
//!
//! 1. Message level: representative messages with every field set (oneofs, nested txns,
//!    watch creates with filters, events) are encoded with our prost types, decoded with
//!    `etcd-client`'s own generated types (exposed by its `pub-response-field` and
//!    `build-server` features), re-encoded, and compared byte for byte and field by field —
//!    in both directions. prost drops unknown fields, so a field number or wire type that
//!    differs shows up as a byte difference; a type that differs shows up in the fields.
//! 2. Service level: `kine-proto`'s generated gRPC clients call a real etcd (service and
//!    method paths, streaming shapes), and everything etcd answers decodes.

use std::fmt::Debug;
use std::time::Duration;

use etcd_client::proto as theirs;
use kine_proto::etcdserverpb as ours;
use kine_proto::mvccpb as ours_mvcc;
use prost::Message;

/// Encodes `ours`, decodes it as `T`, re-encodes, and checks bytes and values survive both
/// ways. Returns their decoded message for field checks.
fn ours_to_theirs<O, T>(ours: &O) -> T
where
    O: Message + Default + PartialEq + Debug,
    T: Message + Default + Debug,
{
    let bytes = ours.encode_to_vec();
    let theirs = T::decode(bytes.as_slice()).expect("etcd-client decodes our bytes");
    let again = theirs.encode_to_vec();
    assert_eq!(
        bytes, again,
        "etcd-client re-encodes our message differently (a field number or wire type \
         differs):\nours:   {ours:?}\ntheirs: {theirs:?}"
    );
    let back = O::decode(again.as_slice()).expect("we decode etcd-client's bytes");
    assert_eq!(
        &back, ours,
        "round trip through etcd-client changed the message"
    );
    theirs
}

/// The same in the other direction: their message with every field set decodes into ours
/// and re-encodes to the same bytes.
fn theirs_to_ours<T, O>(theirs: &T) -> O
where
    T: Message + Default + Debug,
    O: Message + Default + Debug,
{
    let bytes = theirs.encode_to_vec();
    let ours = O::decode(bytes.as_slice()).expect("we decode etcd-client's bytes");
    let again = ours.encode_to_vec();
    assert_eq!(
        bytes, again,
        "we re-encode etcd-client's message differently (a field we lack or misnumber):\n\
         theirs: {theirs:?}\nours:   {ours:?}"
    );
    ours
}

/// For messages defined identically on both sides, the derived Debug output (field names,
/// enum variant names, oneof variant names, values) must be identical too. This catches what
/// a byte round trip cannot, e.g. `sint64` against `int64`. Our `bytes` fields are
/// `bytes::Bytes` (Debug `b"..."`), theirs `Vec<u8>` (Debug `[..]`), so byte strings are
/// normalized to the list form first.
fn same_debug<A: Debug, B: Debug>(a: &A, b: &B) {
    assert_eq!(
        byte_strings_as_lists(&format!("{a:?}")),
        byte_strings_as_lists(&format!("{b:?}"))
    );
}

/// Rewrites every `b"..."` in a Debug string into `[n, n, ...]`.
fn byte_strings_as_lists(debug: &str) -> String {
    let chars: Vec<char> = debug.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        let starts = chars[i] == 'b'
            && chars.get(i + 1) == Some(&'"')
            && (i == 0 || !(chars[i - 1].is_alphanumeric() || chars[i - 1] == '_'));
        if !starts {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        i += 2;
        let mut bytes: Vec<u8> = Vec::new();
        while i < chars.len() && chars[i] != '"' {
            if chars[i] == '\\' {
                match chars.get(i + 1) {
                    Some('x') => {
                        let hex: String = chars[i + 2..i + 4].iter().collect();
                        bytes.push(u8::from_str_radix(&hex, 16).expect("hex escape"));
                        i += 4;
                    }
                    Some('n') => {
                        bytes.push(b'\n');
                        i += 2;
                    }
                    Some('r') => {
                        bytes.push(b'\r');
                        i += 2;
                    }
                    Some('t') => {
                        bytes.push(b'\t');
                        i += 2;
                    }
                    Some('0') => {
                        bytes.push(0);
                        i += 2;
                    }
                    Some(&c) => {
                        bytes.push(c as u8);
                        i += 2;
                    }
                    None => panic!("dangling escape in {debug}"),
                }
            } else {
                bytes.push(chars[i] as u8);
                i += 1;
            }
        }
        i += 1; // closing quote
        out.push_str(&format!("{bytes:?}"));
    }
    out
}

fn header() -> ours::ResponseHeader {
    ours::ResponseHeader {
        cluster_id: u64::MAX - 1,
        member_id: 0x8e9e_05c5_2164_694d,
        revision: 1 << 40,
        raft_term: 7,
    }
}

fn kv(key: &str, rev: i64) -> ours_mvcc::KeyValue {
    ours_mvcc::KeyValue {
        key: key.as_bytes().to_vec().into(),
        create_revision: rev - 3,
        mod_revision: rev,
        version: 4,
        value: vec![0, 1, 2, 0xff, b'v'].into(),
        lease: 0x7fff_ffff_ffff_fff0,
    }
}

fn range_request() -> ours::RangeRequest {
    ours::RangeRequest {
        key: b"/registry/pods/".to_vec().into(),
        range_end: b"/registry/pods0".to_vec().into(),
        limit: 500,
        revision: 12345,
        sort_order: ours::range_request::SortOrder::Descend as i32,
        sort_target: ours::range_request::SortTarget::Value as i32,
        serializable: true,
        keys_only: true,
        count_only: true,
        min_mod_revision: 1,
        max_mod_revision: 2,
        min_create_revision: 3,
        max_create_revision: 4,
    }
}

fn put_request() -> ours::PutRequest {
    ours::PutRequest {
        key: b"k".to_vec().into(),
        value: vec![0xde, 0xad, 0xbe, 0xef].into(),
        lease: -1,
        prev_kv: true,
        ignore_value: true,
        ignore_lease: true,
    }
}

fn delete_request() -> ours::DeleteRangeRequest {
    ours::DeleteRangeRequest {
        key: b"\0".to_vec().into(),
        range_end: b"\0".to_vec().into(),
        prev_kv: true,
    }
}

fn compares() -> Vec<ours::Compare> {
    use ours::compare::{CompareResult as R, CompareTarget as T, TargetUnion as U};
    vec![
        ours::Compare {
            result: R::Equal as i32,
            target: T::Version as i32,
            key: b"a".to_vec().into(),
            range_end: b"b".to_vec().into(),
            target_union: Some(U::Version(3)),
        },
        ours::Compare {
            result: R::Greater as i32,
            target: T::Create as i32,
            key: b"a".to_vec().into(),
            range_end: Default::default(),
            target_union: Some(U::CreateRevision(4)),
        },
        ours::Compare {
            result: R::Less as i32,
            target: T::Mod as i32,
            key: b"a".to_vec().into(),
            range_end: b"\0".to_vec().into(),
            target_union: Some(U::ModRevision(5)),
        },
        ours::Compare {
            result: R::NotEqual as i32,
            target: T::Value as i32,
            key: b"a".to_vec().into(),
            range_end: Default::default(),
            target_union: Some(U::Value(b"v".to_vec().into())),
        },
        ours::Compare {
            result: R::Equal as i32,
            target: T::Lease as i32,
            key: b"a".to_vec().into(),
            range_end: Default::default(),
            target_union: Some(U::Lease(0x1234)),
        },
        // A zero in the oneof is still present on the wire.
        ours::Compare {
            result: R::Equal as i32,
            target: T::Mod as i32,
            key: b"create-if-absent".to_vec().into(),
            range_end: Default::default(),
            target_union: Some(U::ModRevision(0)),
        },
    ]
}

fn txn_request() -> ours::TxnRequest {
    use ours::request_op::Request;
    let nested = ours::TxnRequest {
        compare: compares()[..2].to_vec(),
        success: vec![ours::RequestOp {
            request: Some(Request::RequestPut(put_request())),
        }],
        failure: vec![ours::RequestOp {
            request: Some(Request::RequestRange(range_request())),
        }],
    };
    ours::TxnRequest {
        compare: compares(),
        success: vec![
            ours::RequestOp {
                request: Some(Request::RequestRange(range_request())),
            },
            ours::RequestOp {
                request: Some(Request::RequestPut(put_request())),
            },
            ours::RequestOp {
                request: Some(Request::RequestDeleteRange(delete_request())),
            },
            ours::RequestOp {
                request: Some(Request::RequestTxn(nested.clone())),
            },
        ],
        failure: vec![
            ours::RequestOp {
                request: Some(Request::RequestTxn(ours::TxnRequest {
                    compare: vec![],
                    success: vec![ours::RequestOp {
                        request: Some(Request::RequestTxn(nested)),
                    }],
                    failure: vec![],
                })),
            },
            ours::RequestOp {
                request: Some(Request::RequestDeleteRange(delete_request())),
            },
        ],
    }
}

fn range_response() -> ours::RangeResponse {
    ours::RangeResponse {
        header: Some(header()),
        kvs: vec![kv("a", 10), kv("b", 11)],
        more: true,
        count: 1_000_000,
    }
}

fn txn_response() -> ours::TxnResponse {
    use ours::response_op::Response;
    let nested = ours::TxnResponse {
        header: Some(header()),
        succeeded: false,
        responses: vec![ours::ResponseOp {
            response: Some(Response::ResponseRange(range_response())),
        }],
    };
    ours::TxnResponse {
        header: Some(header()),
        succeeded: true,
        responses: vec![
            ours::ResponseOp {
                response: Some(Response::ResponseRange(range_response())),
            },
            ours::ResponseOp {
                response: Some(Response::ResponsePut(ours::PutResponse {
                    header: Some(header()),
                    prev_kv: Some(kv("p", 9)),
                })),
            },
            ours::ResponseOp {
                response: Some(Response::ResponseDeleteRange(ours::DeleteRangeResponse {
                    header: Some(header()),
                    deleted: 2,
                    prev_kvs: vec![kv("d1", 5), kv("d2", 6)],
                })),
            },
            ours::ResponseOp {
                response: Some(Response::ResponseTxn(nested)),
            },
        ],
    }
}

fn events() -> Vec<ours_mvcc::Event> {
    vec![
        ours_mvcc::Event {
            r#type: ours_mvcc::event::EventType::Put as i32,
            kv: Some(kv("e", 20)),
            prev_kv: Some(kv("e", 19)),
        },
        ours_mvcc::Event {
            r#type: ours_mvcc::event::EventType::Delete as i32,
            kv: Some(ours_mvcc::KeyValue {
                key: b"e".to_vec().into(),
                mod_revision: 21,
                ..Default::default()
            }),
            prev_kv: Some(kv("e", 20)),
        },
    ]
}

#[test]
fn kv_requests() {
    let range = range_request();
    let t: theirs::PbRangeRequest = ours_to_theirs(&range);
    same_debug(&range, &t);
    assert_eq!(t.sort_order(), etcd_client::SortOrder::Descend);
    assert_eq!(t.sort_target(), etcd_client::SortTarget::Value);
    assert_eq!((t.min_mod_revision, t.max_create_revision), (1, 4));
    let _: ours::RangeRequest = theirs_to_ours(&t);

    let put = put_request();
    let t: theirs::PbPutRequest = ours_to_theirs(&put);
    same_debug(&put, &t);
    assert_eq!(t.lease, -1);
    assert!(t.prev_kv && t.ignore_value && t.ignore_lease);
    let _: ours::PutRequest = theirs_to_ours(&t);

    let del = delete_request();
    let t: theirs::PbDeleteRequest = ours_to_theirs(&del);
    same_debug(&del, &t);
    let _: ours::DeleteRangeRequest = theirs_to_ours(&t);

    let compact = ours::CompactionRequest {
        revision: 99,
        physical: true,
    };
    let t: theirs::PbCompactionRequest = ours_to_theirs(&compact);
    same_debug(&compact, &t);
}

#[test]
fn txn_request_with_every_compare_and_nested_txns() {
    let txn = txn_request();
    let t: theirs::PbTxnRequest = ours_to_theirs(&txn);
    same_debug(&txn, &t);
    assert_eq!(t.compare.len(), 6);
    let targets: Vec<theirs::PbCompareTarget> = t.compare.iter().map(|c| c.target()).collect();
    assert_eq!(
        targets,
        [
            theirs::PbCompareTarget::Version,
            theirs::PbCompareTarget::Create,
            theirs::PbCompareTarget::Mod,
            theirs::PbCompareTarget::Value,
            theirs::PbCompareTarget::Lease,
            theirs::PbCompareTarget::Mod,
        ]
    );
    assert_eq!(
        t.compare[3].target_union,
        Some(theirs::PbTargetUnion::Value(b"v".to_vec()))
    );
    assert_eq!(
        t.compare[5].target_union,
        Some(theirs::PbTargetUnion::ModRevision(0))
    );
    assert_eq!(t.compare[1].result(), etcd_client::CompareOp::Greater);
    match &t.success[3].request {
        Some(theirs::PbTxnOpRequest::RequestTxn(nested)) => {
            assert_eq!(nested.compare.len(), 2);
            assert!(matches!(
                nested.failure[0].request,
                Some(theirs::PbTxnOpRequest::RequestRange(_))
            ));
        }
        other => panic!("nested txn lost: {other:?}"),
    }
    let _: ours::TxnRequest = theirs_to_ours(&t);

    // What etcd-client itself builds (its Txn type) decodes into ours unchanged.
    let built: theirs::PbTxnRequest = etcd_client::Txn::new()
        .when([etcd_client::Compare::mod_revision(
            "k",
            etcd_client::CompareOp::Equal,
            0,
        )])
        .and_then([etcd_client::TxnOp::put(
            "k",
            "v",
            Some(etcd_client::PutOptions::new().with_lease(7).with_prev_key()),
        )])
        .or_else([etcd_client::TxnOp::get(
            "k",
            Some(etcd_client::GetOptions::new().with_prefix().with_limit(3)),
        )])
        .into();
    let ours: ours::TxnRequest = theirs_to_ours(&built);
    same_debug(&ours, &built);
}

#[test]
fn kv_responses() {
    let range = range_response();
    let t: theirs::PbRangeResponse = ours_to_theirs(&range);
    same_debug(&range, &t);
    assert_eq!(t.kvs[1].lease, 0x7fff_ffff_ffff_fff0);
    assert_eq!(t.header.as_ref().map(|h| h.cluster_id), Some(u64::MAX - 1));
    let _: ours::RangeResponse = theirs_to_ours(&t);

    let txn = txn_response();
    let t: theirs::PbTxnResponse = ours_to_theirs(&txn);
    same_debug(&txn, &t);
    assert!(matches!(
        t.responses[3].response,
        Some(theirs::PbTxnOpResponse::ResponseTxn(_))
    ));
    let _: ours::TxnResponse = theirs_to_ours(&t);

    let compact = ours::CompactionResponse {
        header: Some(header()),
    };
    let t: theirs::PbCompactionResponse = ours_to_theirs(&compact);
    same_debug(&compact, &t);
}

#[test]
fn watch_requests() {
    use ours::watch_create_request::FilterType;
    use ours::watch_request::RequestUnion;
    let create = ours::WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(ours::WatchCreateRequest {
            key: b"/registry/".to_vec().into(),
            range_end: b"/registry0".to_vec().into(),
            start_revision: 77,
            progress_notify: true,
            filters: vec![FilterType::Noput as i32, FilterType::Nodelete as i32],
            prev_kv: true,
            watch_id: 5,
            fragment: true,
        })),
    };
    // etcd-client generates `filters` with `packed = "false"` while we pack it (proto3's
    // default), so the bytes differ; protobuf parsers must accept both, so compare values:
    // their unpacked bytes decode into ours unchanged, and ours into theirs.
    let ours_bytes = create.encode_to_vec();
    let t = theirs::PbWatchRequest::decode(ours_bytes.as_slice()).expect("they decode ours");
    same_debug(&create, &t);
    let their_bytes = t.encode_to_vec();
    assert!(
        their_bytes.windows(4).any(|w| w == [40, 0, 40, 1]),
        "etcd-client sends filters unpacked (field 5 varint, twice): {their_bytes:?}"
    );
    let back = ours::WatchRequest::decode(their_bytes.as_slice()).expect("we decode theirs");
    assert_eq!(back, create, "unpacked filters decode into ours");
    // What etcd-client itself sends for a watch with both filters.
    let sent: theirs::PbWatchRequest = etcd_client::WatchOptions::new()
        .with_key("k")
        .with_filters([
            etcd_client::WatchFilterType::NoPut,
            etcd_client::WatchFilterType::NoDelete,
        ])
        .into();
    let decoded = ours::WatchRequest::decode(sent.encode_to_vec().as_slice()).expect("decode");
    match decoded.request_union {
        Some(RequestUnion::CreateRequest(c)) => assert_eq!(c.filters, [0, 1]),
        other => panic!("create request lost: {other:?}"),
    }
    match &t.request_union {
        Some(theirs::PbWatchRequestUnion::CreateRequest(c)) => {
            assert_eq!(c.filters, [0, 1]);
            assert_eq!((c.start_revision, c.watch_id), (77, 5));
            assert!(c.progress_notify && c.prev_kv && c.fragment);
        }
        other => panic!("create request lost: {other:?}"),
    }
    let cancel = ours::WatchRequest {
        request_union: Some(RequestUnion::CancelRequest(ours::WatchCancelRequest {
            watch_id: 5,
        })),
    };
    let t: theirs::PbWatchRequest = ours_to_theirs(&cancel);
    same_debug(&cancel, &t);

    // An empty progress request still sets the oneof (field 3, zero length).
    let progress = ours::WatchRequest {
        request_union: Some(RequestUnion::ProgressRequest(ours::WatchProgressRequest {})),
    };
    assert_eq!(progress.encode_to_vec(), [0x1a, 0x00]);
    let t: theirs::PbWatchRequest = ours_to_theirs(&progress);
    same_debug(&progress, &t);
}

#[test]
fn watch_responses_and_events() {
    let resp = ours::WatchResponse {
        header: Some(header()),
        watch_id: 3,
        created: true,
        canceled: true,
        compact_revision: 42,
        cancel_reason: "etcdserver: mvcc: required revision has been compacted".into(),
        fragment: true,
        events: events(),
    };
    let t: theirs::PbWatchResponse = ours_to_theirs(&resp);
    same_debug(&resp, &t);
    assert_eq!(t.events[1].r#type(), etcd_client::EventType::Delete);
    assert_eq!(
        t.events[0].prev_kv.as_ref().map(|kv| kv.mod_revision),
        Some(19)
    );
    let _: ours::WatchResponse = theirs_to_ours(&t);

    for event in events() {
        let t: theirs::PbEvent = ours_to_theirs(&event);
        same_debug(&event, &t);
    }
    let t: theirs::PbKeyValue = ours_to_theirs(&kv("x", 1 << 50));
    assert_eq!(t.mod_revision, 1 << 50);
}

#[test]
fn lease_messages() {
    let grant = ours::LeaseGrantRequest { ttl: 60, id: 0x42 };
    let t: theirs::PbLeaseGrantRequest = ours_to_theirs(&grant);
    assert_eq!((t.ttl, t.id), (60, 0x42));
    same_debug(&grant, &t);
    let granted = ours::LeaseGrantResponse {
        header: Some(header()),
        id: 0x42,
        ttl: 60,
        error: "e".into(),
    };
    let t: theirs::PbLeaseGrantResponse = ours_to_theirs(&granted);
    same_debug(&granted, &t);

    let revoke = ours::LeaseRevokeRequest { id: 9 };
    let t: theirs::PbLeaseRevokeRequest = ours_to_theirs(&revoke);
    same_debug(&revoke, &t);
    let revoked = ours::LeaseRevokeResponse {
        header: Some(header()),
    };
    let t: theirs::PbLeaseRevokeResponse = ours_to_theirs(&revoked);
    same_debug(&revoked, &t);

    let keep = ours::LeaseKeepAliveRequest { id: 9 };
    let t: theirs::PbLeaseKeepAliveRequest = ours_to_theirs(&keep);
    same_debug(&keep, &t);
    let kept = ours::LeaseKeepAliveResponse {
        header: Some(header()),
        id: 9,
        ttl: 0,
    };
    let t: theirs::PbLeaseKeepAliveResponse = ours_to_theirs(&kept);
    same_debug(&kept, &t);

    let ttl = ours::LeaseTimeToLiveRequest { id: 9, keys: true };
    let t: theirs::PbLeaseTimeToLiveRequest = ours_to_theirs(&ttl);
    same_debug(&ttl, &t);
    let ttl_resp = ours::LeaseTimeToLiveResponse {
        header: Some(header()),
        id: 9,
        ttl: -1,
        granted_ttl: 60,
        keys: vec![b"a".to_vec().into(), b"b".to_vec().into()],
    };
    let t: theirs::PbLeaseTimeToLiveResponse = ours_to_theirs(&ttl_resp);
    same_debug(&ttl_resp, &t);
    assert_eq!((t.ttl, t.granted_ttl), (-1, 60));

    let leases = ours::LeaseLeasesResponse {
        header: Some(header()),
        leases: vec![ours::LeaseStatus { id: 1 }, ours::LeaseStatus { id: 2 }],
    };
    let t: theirs::PbLeaseLeasesResponse = ours_to_theirs(&leases);
    same_debug(&leases, &t);
    let _: ours::LeaseLeasesRequest = theirs_to_ours(&theirs::PbLeaseLeasesRequest {});
}

#[test]
fn cluster_and_maintenance_messages() {
    let members = ours::MemberListResponse {
        header: Some(header()),
        members: vec![ours::Member {
            id: 0x8e9e_05c5_2164_694d,
            name: "kine-rs".into(),
            peer_ur_ls: vec!["http://127.0.0.1:2380".into()],
            client_ur_ls: vec!["http://127.0.0.1:2379".into(), "unix:///s".into()],
            is_learner: true,
        }],
    };
    let t: theirs::PbMemberListResponse = ours_to_theirs(&members);
    same_debug(&members, &t);
    let _: ours::MemberListResponse = theirs_to_ours(&t);
    let req = ours::MemberListRequest { linearizable: true };
    let t: theirs::PbMemberListRequest = ours_to_theirs(&req);
    same_debug(&req, &t);

    // etcd-client knows newer StatusResponse fields (storage version, quota, downgrade info)
    // that kine-rs does not send; every field we have must land in theirs.
    let status = ours::StatusResponse {
        header: Some(header()),
        version: "3.5.13".into(),
        db_size: 1 << 33,
        leader: 0x8e9e_05c5_2164_694d,
        raft_index: 10,
        raft_term: 11,
        raft_applied_index: 12,
        errors: vec!["NOSPACE".into()],
        db_size_in_use: 1 << 32,
        is_learner: true,
    };
    let t: theirs::PbStatusResponse = ours_to_theirs(&status);
    assert_eq!(t.version, "3.5.13");
    assert_eq!((t.db_size, t.db_size_in_use), (1 << 33, 1 << 32));
    assert_eq!(
        (t.leader, t.raft_index, t.raft_term, t.raft_applied_index),
        (0x8e9e_05c5_2164_694d, 10, 11, 12)
    );
    assert_eq!(t.errors, ["NOSPACE"]);
    assert!(t.is_learner);
    let _: ours::StatusRequest = theirs_to_ours(&theirs::PbStatusRequest {});

    let alarm = ours::AlarmResponse {
        header: Some(header()),
        alarms: vec![ours::AlarmMember {
            member_id: 3,
            alarm: ours::AlarmType::Nospace as i32,
        }],
    };
    let t: theirs::PbAlarmResponse = ours_to_theirs(&alarm);
    same_debug(&alarm, &t);
    let alarm_req = ours::AlarmRequest {
        action: ours::alarm_request::AlarmAction::Deactivate as i32,
        member_id: 3,
        alarm: ours::AlarmType::Corrupt as i32,
    };
    let t: theirs::PbAlarmRequest = ours_to_theirs(&alarm_req);
    same_debug(&alarm_req, &t);
    let defrag = ours::DefragmentResponse {
        header: Some(header()),
    };
    let t: theirs::PbDefragmentResponse = ours_to_theirs(&defrag);
    same_debug(&defrag, &t);
}

/// kine-proto's generated clients against a real etcd: every service path and streaming
/// shape kine-rs serves is the one etcd serves, and etcd's answers decode into our types.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kine_proto_clients_speak_to_real_etcd() {
    use ours::compare::{CompareResult, CompareTarget, TargetUnion};
    use ours::request_op::Request;
    use ours::response_op::Response;

    let etcd = tokio::task::spawn_blocking(kine_tests::spawn_etcd)
        .await
        .expect("spawn etcd");
    let mut channel = None;
    for _ in 0..200 {
        if let Ok(c) = tonic::transport::Channel::from_shared(etcd.endpoint.clone())
            .expect("endpoint")
            .connect()
            .await
        {
            channel = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let channel = channel.expect("connect to etcd");
    let mut kv = ours::kv_client::KvClient::new(channel.clone());
    let mut lease = ours::lease_client::LeaseClient::new(channel.clone());
    let mut watch = ours::watch_client::WatchClient::new(channel.clone());
    let mut maintenance = ours::maintenance_client::MaintenanceClient::new(channel.clone());
    let mut cluster = ours::cluster_client::ClusterClient::new(channel.clone());

    let granted = lease
        .lease_grant(ours::LeaseGrantRequest { ttl: 600, id: 0 })
        .await
        .expect("LeaseGrant")
        .into_inner();
    assert!(granted.id != 0 && granted.ttl == 600, "{granted:?}");

    // Watch first, so the events below arrive on it.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(ours::WatchRequest {
        request_union: Some(ours::watch_request::RequestUnion::CreateRequest(
            ours::WatchCreateRequest {
                key: b"w/".to_vec().into(),
                range_end: b"w0".to_vec().into(),
                prev_kv: true,
                ..Default::default()
            },
        )),
    })
    .await
    .expect("send create");
    let mut events = watch
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("Watch")
        .into_inner();
    let created = events.message().await.expect("watch").expect("created");
    assert!(created.created, "{created:?}");

    let put = kv
        .put(ours::PutRequest {
            key: b"w/a".to_vec().into(),
            value: b"1".to_vec().into(),
            lease: granted.id,
            ..Default::default()
        })
        .await
        .expect("Put")
        .into_inner();
    let rev = put.header.as_ref().map(|h| h.revision).unwrap_or_default();
    assert!(rev > 1, "{put:?}");

    let txn = kv
        .txn(ours::TxnRequest {
            compare: vec![ours::Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Lease as i32,
                key: b"w/a".to_vec().into(),
                range_end: Default::default(),
                target_union: Some(TargetUnion::Lease(granted.id)),
            }],
            success: vec![
                ours::RequestOp {
                    request: Some(Request::RequestPut(ours::PutRequest {
                        key: b"w/a".to_vec().into(),
                        value: b"2".to_vec().into(),
                        prev_kv: true,
                        ignore_lease: true,
                        ..Default::default()
                    })),
                },
                ours::RequestOp {
                    request: Some(Request::RequestRange(ours::RangeRequest {
                        key: b"w/".to_vec().into(),
                        range_end: b"w0".to_vec().into(),
                        ..Default::default()
                    })),
                },
            ],
            failure: vec![],
        })
        .await
        .expect("Txn")
        .into_inner();
    assert!(txn.succeeded, "{txn:?}");
    match &txn.responses[..] {
        [
            ours::ResponseOp {
                response: Some(Response::ResponsePut(p)),
            },
            ours::ResponseOp {
                response: Some(Response::ResponseRange(r)),
            },
        ] => {
            assert_eq!(
                p.prev_kv.as_ref().map(|kv| kv.value.clone()),
                Some(prost::bytes::Bytes::from_static(b"1"))
            );
            assert_eq!(r.kvs.len(), 1);
            assert_eq!(r.kvs[0].version, 2);
            assert_eq!(r.kvs[0].lease, granted.id);
        }
        other => panic!("unexpected txn responses: {other:?}"),
    }

    let mut seen = Vec::new();
    while seen.len() < 2 {
        let resp = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .expect("events in time")
            .expect("watch")
            .expect("open");
        seen.extend(resp.events);
    }
    assert_eq!(
        seen[1].prev_kv.as_ref().map(|kv| kv.value.clone()),
        Some(prost::bytes::Bytes::from_static(b"1"))
    );
    assert_eq!(seen[1].kv.as_ref().map(|kv| kv.mod_revision), Some(rev + 1));

    let ttl = lease
        .lease_time_to_live(ours::LeaseTimeToLiveRequest {
            id: granted.id,
            keys: true,
        })
        .await
        .expect("LeaseTimeToLive")
        .into_inner();
    assert_eq!(ttl.keys, [b"w/a".to_vec()]);
    let listed = lease
        .lease_leases(ours::LeaseLeasesRequest {})
        .await
        .expect("LeaseLeases")
        .into_inner();
    assert_eq!(listed.leases.len(), 1);
    let (ktx, krx) = tokio::sync::mpsc::channel(1);
    ktx.send(ours::LeaseKeepAliveRequest { id: granted.id })
        .await
        .expect("send keep-alive");
    let mut kept = lease
        .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(krx))
        .await
        .expect("LeaseKeepAlive")
        .into_inner();
    let k = kept.message().await.expect("keep-alive").expect("response");
    assert_eq!((k.id, k.ttl), (granted.id, 600));

    let del = kv
        .delete_range(ours::DeleteRangeRequest {
            key: b"w/".to_vec().into(),
            range_end: b"w0".to_vec().into(),
            prev_kv: true,
        })
        .await
        .expect("DeleteRange")
        .into_inner();
    assert_eq!(del.deleted, 1);
    kv.compact(ours::CompactionRequest {
        revision: rev,
        physical: false,
    })
    .await
    .expect("Compact");
    lease
        .lease_revoke(ours::LeaseRevokeRequest { id: granted.id })
        .await
        .expect("LeaseRevoke");

    let status = maintenance
        .status(ours::StatusRequest {})
        .await
        .expect("Status")
        .into_inner();
    assert!(status.version.starts_with("3."), "{status:?}");
    let members = cluster
        .member_list(ours::MemberListRequest::default())
        .await
        .expect("MemberList")
        .into_inner();
    assert_eq!(members.members.len(), 1);
    assert!(!members.members[0].client_ur_ls.is_empty(), "{members:?}");
}
