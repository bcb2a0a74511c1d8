//! Normalization and comparison of unary responses.
//!
//! What is ignored, and why:
//! - `header.cluster_id`, `header.member_id`, `header.raft_term`: identities of the server.
//! - The order of keys inside a run of equal sort values when a Range sorts by something other
//!   than the key: etcd sorts with Go's unstable sort, so that order is unspecified. Runs are
//!   put in key order before comparing; when a limit cuts a run, which members of the run were
//!   returned is unspecified too, so that last run is compared by sort values and length, and
//!   every returned member is checked to really belong to the run (against an uncut "truth"
//!   read at the same revision when the request was top-level).
//! - Lease remaining TTLs (time passes): equal within [`TTL_SLACK`] seconds.
//! - The order of keys in LeaseTimeToLive and of leases in LeaseLeases (etcd iterates Go maps).
//!
//! Errors are compared by gRPC code and message, exactly: clients parse them.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;

use kine_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use kine_proto::etcdserverpb::request_op::Request;
use kine_proto::etcdserverpb::response_op::Response;
use kine_proto::etcdserverpb::{
    AlarmResponse, CompactionResponse, DefragmentResponse, DeleteRangeResponse, LeaseGrantResponse,
    LeaseKeepAliveResponse, LeaseLeasesResponse, LeaseRevokeResponse, LeaseTimeToLiveResponse,
    PutResponse, RangeRequest, RangeResponse, ResponseHeader, TxnRequest, TxnResponse,
};
use kine_proto::mvccpb::KeyValue;
use prost::bytes::Bytes;
use tonic::Status;

/// Lease remaining TTLs may differ by this many seconds.
pub(crate) const TTL_SLACK: i64 = 2;

/// An error as clients see it: gRPC code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Error {
    pub code: tonic::Code,
    pub message: String,
}

pub(crate) type Outcome<T> = Result<T, Error>;

pub(crate) fn outcome<T>(result: Result<T, Status>) -> Outcome<T> {
    result.map_err(|s| Error {
        code: s.code(),
        message: s.message().to_string(),
    })
}

/// Drops the fields of a header that name the server.
pub(crate) fn header(h: &mut Option<ResponseHeader>) {
    if let Some(h) = h {
        h.cluster_id = 0;
        h.member_id = 0;
        h.raft_term = 0;
    }
}

/// Compares two outcomes that need no more normalization than what was done.
pub(crate) fn same<T: PartialEq + Debug>(a: &Outcome<T>, b: &Outcome<T>) -> Option<String> {
    if a == b {
        None
    } else {
        match (a, b) {
            (Ok(_), Err(_)) | (Err(_), Ok(_)) => {
                Some("one server answered, the other returned an error".to_string())
            }
            (Err(_), Err(_)) => Some("the errors differ (code or message)".to_string()),
            (Ok(_), Ok(_)) => Some("the responses differ".to_string()),
        }
    }
}

pub(crate) fn norm_put(r: &mut PutResponse) {
    header(&mut r.header);
}

pub(crate) fn norm_delete(r: &mut DeleteRangeResponse) {
    header(&mut r.header);
}

pub(crate) fn norm_compact(r: &mut CompactionResponse) {
    header(&mut r.header);
}

pub(crate) fn norm_grant(r: &mut LeaseGrantResponse) {
    header(&mut r.header);
}

pub(crate) fn norm_revoke(r: &mut LeaseRevokeResponse) {
    header(&mut r.header);
}

pub(crate) fn norm_keep_alive(r: &mut LeaseKeepAliveResponse) {
    header(&mut r.header);
}

pub(crate) fn norm_alarm(r: &mut AlarmResponse) {
    header(&mut r.header);
    for alarm in &mut r.alarms {
        alarm.member_id = 0;
    }
}

pub(crate) fn norm_defrag(r: &mut DefragmentResponse) {
    header(&mut r.header);
}

pub(crate) fn norm_leases(r: &mut LeaseLeasesResponse) {
    header(&mut r.header);
    r.leases.sort_by_key(|l| l.id);
}

pub(crate) fn norm_ttl(r: &mut LeaseTimeToLiveResponse) {
    header(&mut r.header);
    r.keys.sort();
}

/// Makes the target's remaining TTL equal to the oracle's when they are within the slack
/// (both positive: -1 means "expired or unknown" and must match exactly).
pub(crate) fn align_ttl(
    oracle: &Outcome<LeaseTimeToLiveResponse>,
    target: &mut Outcome<LeaseTimeToLiveResponse>,
) {
    if let (Ok(o), Ok(t)) = (oracle, target)
        && o.ttl > 0
        && t.ttl > 0
        && (o.ttl - t.ttl).abs() <= TTL_SLACK
    {
        t.ttl = o.ttl;
    }
}

/// The value a Range sorts by.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum SortVal {
    Int(i64),
    Bytes(Bytes),
}

fn sort_val(target: SortTarget, kv: &KeyValue) -> SortVal {
    match target {
        SortTarget::Key => SortVal::Bytes(kv.key.clone()),
        SortTarget::Version => SortVal::Int(kv.version),
        SortTarget::Create => SortVal::Int(kv.create_revision),
        SortTarget::Mod => SortVal::Int(kv.mod_revision),
        SortTarget::Value => SortVal::Bytes(kv.value.clone()),
    }
}

/// The sort target whose ties make the order of a Range response unspecified, if any.
/// etcd sorts ascending when the order is NONE but the target is not KEY; keys never tie.
pub(crate) fn tie_target(req: &RangeRequest) -> Option<SortTarget> {
    if req.count_only {
        return None;
    }
    let target = SortTarget::try_from(req.sort_target).ok()?;
    // An unknown order is an error or a no-op; either way there is nothing to canonicalize.
    SortOrder::try_from(req.sort_order).ok()?;
    match target {
        SortTarget::Key => None,
        other => Some(other),
    }
}

/// Whether checking the order of `req`'s response needs an uncut read of the same data:
/// the limit cut the response, or the sort values are invisible (keys-only by VALUE).
pub(crate) fn needs_truth(req: &RangeRequest, resp: &RangeResponse) -> bool {
    match tie_target(req) {
        Some(target) => resp.more || (req.keys_only && target == SortTarget::Value),
        None => false,
    }
}

/// The uncut read used as the truth for a sorted Range: same filters and sort, no limit, with
/// values, at the revision the response was served at.
pub(crate) fn truth_request(req: &RangeRequest, served_at: i64) -> RangeRequest {
    RangeRequest {
        limit: 0,
        keys_only: false,
        count_only: false,
        revision: if req.revision > 0 {
            req.revision
        } else {
            served_at
        },
        ..req.clone()
    }
}

/// A kv standing for "some member of this tie run": only the sort value is kept.
fn placeholder(target: SortTarget, v: &SortVal) -> KeyValue {
    let mut kv = KeyValue {
        key: Bytes::from_static(b"<any member of the cut tie run>"),
        ..Default::default()
    };
    match (target, v) {
        (SortTarget::Version, SortVal::Int(i)) => kv.version = *i,
        (SortTarget::Create, SortVal::Int(i)) => kv.create_revision = *i,
        (SortTarget::Mod, SortVal::Int(i)) => kv.mod_revision = *i,
        (SortTarget::Value, SortVal::Bytes(b)) => kv.value = b.clone(),
        _ => {}
    }
    kv
}

/// Canonicalizes a Range response (see the module comment). Members of a cut tie run are
/// moved to `partial` for the caller to check against the truth.
///
/// `truth` maps key -> full kv (with value) of the uncut read, when the caller has one.
fn canon_range(
    resp: &mut RangeResponse,
    req: &RangeRequest,
    truth: Option<&HashMap<Bytes, KeyValue>>,
    partial: &mut Vec<(SortTarget, KeyValue, Option<SortVal>)>,
) {
    header(&mut resp.header);
    let Some(target) = tie_target(req) else {
        return;
    };
    let hidden = req.keys_only && target == SortTarget::Value;
    let kvs = std::mem::take(&mut resp.kvs);
    if hidden && truth.is_none() {
        // Inside a Txn: no truth read possible (the range saw the txn's intermediate state).
        // The order is by invisible values: compare as a set when uncut; when cut only the
        // length (the members of the cut are unspecified and cannot be verified here).
        let mut kvs = kvs;
        if resp.more {
            for kv in &kvs {
                partial.push((target, kv.clone(), None));
            }
            resp.kvs = kvs
                .iter()
                .map(|_| KeyValue {
                    key: Bytes::from_static(
                        b"<unverifiable: keys-only sort by VALUE, cut, in txn>",
                    ),
                    ..Default::default()
                })
                .collect();
        } else {
            kvs.sort_by(|a, b| a.key.cmp(&b.key));
            resp.kvs = kvs;
        }
        return;
    }
    let value_of = |kv: &KeyValue| -> SortVal {
        if hidden {
            match truth.and_then(|t| t.get(&kv.key)) {
                Some(full) => sort_val(target, full),
                None => {
                    // Not in the truth: cannot be a right answer. Keep something visible.
                    SortVal::Bytes(Bytes::from_static(b"<key missing from the uncut read>"))
                }
            }
        } else {
            sort_val(target, kv)
        }
    };
    // Split into runs of equal sort value, in response order.
    let mut runs: Vec<(SortVal, Vec<KeyValue>)> = Vec::new();
    for kv in kvs {
        let v = value_of(&kv);
        match runs.last_mut() {
            Some((last, members)) if *last == v => members.push(kv),
            _ => runs.push((v, vec![kv])),
        }
    }
    let run_count = runs.len();
    let mut out = Vec::new();
    for (i, (v, mut members)) in runs.into_iter().enumerate() {
        if resp.more && i + 1 == run_count {
            for kv in &members {
                partial.push((target, kv.clone(), Some(v.clone())));
                out.push(placeholder(target, &v));
            }
        } else {
            members.sort_by(|a, b| a.key.cmp(&b.key));
            out.extend(members);
        }
    }
    resp.kvs = out;
}

/// Checks the members of cut tie runs: distinct keys, and (with a truth) each one is exactly
/// the kv the uncut read has for that key, with the run's sort value.
fn check_partial(
    partial: &[(SortTarget, KeyValue, Option<SortVal>)],
    req_keys_only: bool,
    truth: Option<&HashMap<Bytes, KeyValue>>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for (target, kv, v) in partial {
        if !seen.insert(kv.key.clone()) {
            problems.push(format!("key {:?} returned twice in a cut tie run", kv.key));
        }
        let Some(truth) = truth else { continue };
        match truth.get(&kv.key) {
            None => problems.push(format!(
                "key {:?} of a cut tie run is not in the uncut read at the same revision",
                kv.key
            )),
            Some(full) => {
                let mut expected = full.clone();
                if req_keys_only {
                    expected.value = Bytes::new();
                }
                if *kv != expected {
                    problems.push(format!(
                        "kv of a cut tie run differs from the uncut read: got {kv:?}, uncut read has {expected:?}"
                    ));
                }
                if let Some(v) = v
                    && sort_val(*target, full) != *v
                {
                    problems.push(format!(
                        "kv {:?} of a cut tie run does not have the run's sort value {v:?}",
                        kv.key
                    ));
                }
            }
        }
    }
    problems
}

/// Builds the truth map of an uncut read.
pub(crate) fn truth_map(resp: &RangeResponse) -> HashMap<Bytes, KeyValue> {
    resp.kvs
        .iter()
        .map(|kv| (kv.key.clone(), kv.clone()))
        .collect()
}

/// Normalizes a top-level Range outcome; returns problems found in cut tie runs.
pub(crate) fn norm_range(
    out: &mut Outcome<RangeResponse>,
    req: &RangeRequest,
    truth: Option<&HashMap<Bytes, KeyValue>>,
) -> Vec<String> {
    let Ok(resp) = out else { return Vec::new() };
    let mut partial = Vec::new();
    canon_range(resp, req, truth, &mut partial);
    check_partial(&partial, req.keys_only, truth)
}

/// Normalizes a Txn outcome (recursively); returns problems found in cut tie runs.
pub(crate) fn norm_txn(out: &mut Outcome<TxnResponse>, req: &TxnRequest) -> Vec<String> {
    let Ok(resp) = out else { return Vec::new() };
    let mut problems = Vec::new();
    canon_txn(resp, req, &mut problems);
    problems
}

fn canon_txn(resp: &mut TxnResponse, req: &TxnRequest, problems: &mut Vec<String>) {
    header(&mut resp.header);
    let ops = if resp.succeeded {
        &req.success
    } else {
        &req.failure
    };
    for (i, r) in resp.responses.iter_mut().enumerate() {
        let op = ops.get(i).and_then(|o| o.request.as_ref());
        match (&mut r.response, op) {
            (Some(Response::ResponseRange(rr)), Some(Request::RequestRange(q))) => {
                let mut partial = Vec::new();
                canon_range(rr, q, None, &mut partial);
                problems.extend(check_partial(&partial, q.keys_only, None));
            }
            (Some(Response::ResponseTxn(tr)), Some(Request::RequestTxn(q))) => {
                canon_txn(tr, q, problems);
            }
            (Some(Response::ResponseRange(rr)), _) => header(&mut rr.header),
            (Some(Response::ResponseTxn(tr)), _) => header(&mut tr.header),
            (Some(Response::ResponsePut(p)), _) => header(&mut p.header),
            (Some(Response::ResponseDeleteRange(d)), _) => header(&mut d.header),
            (None, _) => {}
        }
    }
}
