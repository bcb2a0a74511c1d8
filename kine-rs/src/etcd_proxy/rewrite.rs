//! Confining requests to a tenant's prefix and stripping it from answers. Every key a
//! request names becomes the tenant's key in the shared etcd ([`KeyPrefix::range`] clamps
//! ranges); every key an answer carries loses the prefix.

use bytes::Bytes;
use kine_proto::etcdserverpb::request_op::Request;
use kine_proto::etcdserverpb::response_op::Response;
use kine_proto::etcdserverpb::{
    Compare, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, RangeRequest,
    RangeResponse, RequestOp, TxnRequest, TxnResponse,
};
use kine_proto::mvccpb::KeyValue;

use super::prefix::KeyPrefix;

pub fn range_request(prefix: &KeyPrefix, mut request: RangeRequest) -> RangeRequest {
    (request.key, request.range_end) = prefix.range(&request.key, &request.range_end);
    request
}

pub fn put_request(prefix: &KeyPrefix, mut request: PutRequest) -> PutRequest {
    request.key = prefix.key(&request.key);
    request
}

pub fn delete_request(prefix: &KeyPrefix, mut request: DeleteRangeRequest) -> DeleteRangeRequest {
    (request.key, request.range_end) = prefix.range(&request.key, &request.range_end);
    request
}

fn compare(prefix: &KeyPrefix, mut compare: Compare) -> Compare {
    (compare.key, compare.range_end) = prefix.range(&compare.key, &compare.range_end);
    compare
}

fn op(prefix: &KeyPrefix, op: RequestOp) -> RequestOp {
    let request = op.request.map(|request| match request {
        Request::RequestRange(r) => Request::RequestRange(range_request(prefix, r)),
        Request::RequestPut(r) => Request::RequestPut(put_request(prefix, r)),
        Request::RequestDeleteRange(r) => Request::RequestDeleteRange(delete_request(prefix, r)),
        Request::RequestTxn(r) => Request::RequestTxn(txn_request(prefix, r)),
    });
    RequestOp { request }
}

pub fn txn_request(prefix: &KeyPrefix, request: TxnRequest) -> TxnRequest {
    TxnRequest {
        compare: request
            .compare
            .into_iter()
            .map(|c| compare(prefix, c))
            .collect(),
        success: request.success.into_iter().map(|o| op(prefix, o)).collect(),
        failure: request.failure.into_iter().map(|o| op(prefix, o)).collect(),
    }
}

/// Whether a transaction writes anything (in either branch, at any depth).
pub fn txn_writes(request: &TxnRequest) -> bool {
    request
        .success
        .iter()
        .chain(&request.failure)
        .any(|op| match &op.request {
            Some(Request::RequestPut(_)) | Some(Request::RequestDeleteRange(_)) => true,
            Some(Request::RequestTxn(txn)) => txn_writes(txn),
            Some(Request::RequestRange(_)) | None => false,
        })
}

/// The leases the puts of a transaction attach keys to (either branch, any depth).
pub fn txn_leases(request: &TxnRequest, leases: &mut Vec<i64>) {
    ops_leases(&request.success, leases);
    ops_leases(&request.failure, leases);
}

/// The leases the puts of a branch attach keys to (nested transactions: either branch).
pub fn ops_leases(ops: &[RequestOp], leases: &mut Vec<i64>) {
    for op in ops {
        match &op.request {
            Some(Request::RequestPut(put)) if put.lease != 0 && !put.ignore_lease => {
                leases.push(put.lease)
            }
            Some(Request::RequestTxn(txn)) => txn_leases(txn, leases),
            _ => {}
        }
    }
}

/// Strips the prefix from a key of the tenant. A key outside it (which a confined request
/// never meets) becomes empty rather than showing another tenant's key.
pub fn strip_key(prefix: &KeyPrefix, key: &mut Bytes) {
    *key = prefix.strip(key).unwrap_or_default();
}

pub fn strip_kv(prefix: &KeyPrefix, kv: &mut KeyValue) {
    strip_key(prefix, &mut kv.key);
}

pub fn range_response(prefix: &KeyPrefix, response: &mut RangeResponse) {
    for kv in &mut response.kvs {
        strip_kv(prefix, kv);
    }
}

pub fn put_response(prefix: &KeyPrefix, response: &mut PutResponse) {
    if let Some(kv) = &mut response.prev_kv {
        strip_kv(prefix, kv);
    }
}

pub fn delete_response(prefix: &KeyPrefix, response: &mut DeleteRangeResponse) {
    for kv in &mut response.prev_kvs {
        strip_kv(prefix, kv);
    }
}

pub fn txn_response(prefix: &KeyPrefix, response: &mut TxnResponse) {
    for op in &mut response.responses {
        match &mut op.response {
            Some(Response::ResponseRange(r)) => range_response(prefix, r),
            Some(Response::ResponsePut(r)) => put_response(prefix, r),
            Some(Response::ResponseDeleteRange(r)) => delete_response(prefix, r),
            Some(Response::ResponseTxn(r)) => txn_response(prefix, r),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kine_proto::etcdserverpb::ResponseOp;

    fn put(key: &str, lease: i64) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: Bytes::from(key.to_string()),
                lease,
                ..Default::default()
            })),
        }
    }

    #[test]
    fn nested_transactions_are_confined() {
        let prefix = KeyPrefix::new("/t/");
        let inner = TxnRequest {
            compare: vec![Compare {
                key: Bytes::from("c"),
                range_end: Bytes::from_static(b"\0"),
                ..Default::default()
            }],
            success: vec![put("x", 7)],
            failure: vec![],
        };
        let request = TxnRequest {
            compare: vec![],
            success: vec![RequestOp {
                request: Some(Request::RequestTxn(inner)),
            }],
            failure: vec![put("y", 0)],
        };
        assert!(txn_writes(&request));
        let mut leases = Vec::new();
        txn_leases(&request, &mut leases);
        assert_eq!(leases, vec![7]);
        let rewritten = txn_request(&prefix, request);
        let Some(Request::RequestTxn(inner)) = &rewritten.success[0].request else {
            panic!("nested txn lost");
        };
        assert_eq!(inner.compare[0].key.as_ref(), b"/t/c");
        assert_eq!(inner.compare[0].range_end.as_ref(), b"/t0");
        let Some(Request::RequestPut(put)) = &inner.success[0].request else {
            panic!("nested put lost");
        };
        assert_eq!(put.key.as_ref(), b"/t/x");

        let mut response = TxnResponse {
            responses: vec![ResponseOp {
                response: Some(Response::ResponseTxn(TxnResponse {
                    responses: vec![ResponseOp {
                        response: Some(Response::ResponseRange(RangeResponse {
                            kvs: vec![
                                KeyValue {
                                    key: Bytes::from("/t/a"),
                                    ..Default::default()
                                },
                                KeyValue {
                                    key: Bytes::from("/other/a"),
                                    ..Default::default()
                                },
                            ],
                            ..Default::default()
                        })),
                    }],
                    ..Default::default()
                })),
            }],
            ..Default::default()
        };
        txn_response(&prefix, &mut response);
        let Some(Response::ResponseTxn(inner)) = &response.responses[0].response else {
            panic!("nested response lost");
        };
        let Some(Response::ResponseRange(range)) = &inner.responses[0].response else {
            panic!("range response lost");
        };
        assert_eq!(range.kvs[0].key.as_ref(), b"a");
        assert!(range.kvs[1].key.is_empty(), "a foreign key is never shown");
    }

    #[test]
    fn read_only_transactions_write_nothing() {
        let request = TxnRequest {
            compare: vec![],
            success: vec![RequestOp {
                request: Some(Request::RequestRange(RangeRequest::default())),
            }],
            failure: vec![],
        };
        assert!(!txn_writes(&request));
    }
}
