//! Revisions of a target that does not number them as the oracle does: the etcd proxy.
//!
//! Behind the proxy, revisions are the shared etcd's, and kine-rs's own records take some
//! (registering the tenant, each compaction, each lease grant, the ownership record a
//! revoke deletes): the tenant's writes land at increasing revisions with gaps, where the
//! oracle's are 2, 3, 4... The comparison stays exact by mapping, not by ignoring: every
//! write that advanced the oracle's revision advanced the target's too, in the same order,
//! so the harness records the pair (oracle revision, target revision) of each write, and
//! - a revision sent to the target (read revision, min/max filters, compares, compaction,
//!   watch start) is the target revision of the same write; 0 and negative values keep
//!   their meaning; a revision past the oracle's current one is as far past the target's
//!   current one (both are "future"); that is exact for reads, compares and compactions
//!   (any future revision answers alike), not for a watch's start, which the next writes
//!   decide: kine-rs's records may take target revisions among them, so the start sent can
//!   fall before the write it stands for, and the harness leaves out of the comparison the
//!   events the target then delivers from at or after the start sent but below the oracle's
//!   (`SideWatches::expect_future_start`);
//! - a revision the target answers (headers, create/mod revisions, events, compact
//!   revisions) is the oracle revision of the last write at or before it: the tenant's keys
//!   are the same at every revision from one write up to the next, whatever kine-rs's
//!   records did in between.
//!
//! A target answering a revision that is not one of the recorded writes' where a write's is
//! expected (a create or mod revision) maps to the previous write and then differs from the
//! oracle's answer, so wrong revisions are still caught.

use kine_proto::etcdserverpb::compare::TargetUnion;
use kine_proto::etcdserverpb::request_op::Request;
use kine_proto::etcdserverpb::response_op::Response;
use kine_proto::etcdserverpb::{
    CompactionRequest, Compare, DeleteRangeResponse, LeaseGrantResponse, LeaseKeepAliveResponse,
    LeaseLeasesResponse, LeaseRevokeResponse, LeaseTimeToLiveResponse, PutResponse, RangeRequest,
    RangeResponse, ResponseHeader, TxnRequest, TxnResponse, WatchCreateRequest, WatchResponse,
};
use kine_proto::mvccpb::KeyValue;

/// The pairs (oracle revision, target revision) of the writes so far.
#[derive(Debug, Clone)]
pub(crate) struct RevisionMap {
    /// Increasing in both; the first is the empty store (oracle revision 1).
    pairs: Vec<(i64, i64)>,
    /// The target's current revision, as last asked (for "future" revisions).
    target_now: i64,
}

impl RevisionMap {
    /// The empty store: oracle revision 1 is the target's `start`.
    pub fn new(start: i64) -> Self {
        RevisionMap {
            pairs: vec![(1, start)],
            target_now: start,
        }
    }

    /// Records a write seen by both: the oracle at `oracle`, the target at `target`. Only
    /// writes that advanced the oracle's revision count.
    pub fn record(&mut self, oracle: i64, target: i64) {
        let (last_o, last_t) = *self.pairs.last().expect("never empty");
        if oracle > last_o && target > last_t {
            self.pairs.push((oracle, target));
        }
        self.target_now = self.target_now.max(target);
    }

    /// The target's current revision (asked of it just before a request that may name a
    /// future revision).
    pub fn set_target_now(&mut self, revision: i64) {
        self.target_now = self.target_now.max(revision);
    }

    fn last_oracle(&self) -> i64 {
        self.pairs.last().map_or(1, |p| p.0)
    }

    /// Whether `revision` (the oracle's) lies past every recorded write.
    pub fn is_future(&self, revision: i64) -> bool {
        revision > self.last_oracle()
    }

    /// The target revision standing for oracle revision `revision`.
    pub fn to_target(&self, revision: i64) -> i64 {
        if revision <= 0 {
            return revision;
        }
        let last_o = self.last_oracle();
        if revision > last_o {
            return self.target_now + (revision - last_o);
        }
        match self.pairs.binary_search_by_key(&revision, |p| p.0) {
            Ok(i) => self.pairs[i].1,
            // Between writes (cannot happen: every oracle revision is a recorded write).
            Err(i) => self.pairs[i.saturating_sub(1)].1,
        }
    }

    /// The oracle revision standing for target revision `revision`: the last write at or
    /// before it.
    pub fn to_oracle(&self, revision: i64) -> i64 {
        if revision <= 0 {
            return revision;
        }
        let i = self.pairs.partition_point(|p| p.1 <= revision);
        if i == 0 {
            // Before the tenant existed.
            return 0;
        }
        self.pairs[i - 1].0
    }

    // Requests, towards the target.

    pub fn range_request(&self, request: &mut RangeRequest) {
        request.revision = self.to_target(request.revision);
        request.min_mod_revision = self.to_target(request.min_mod_revision);
        request.max_mod_revision = self.to_target(request.max_mod_revision);
        request.min_create_revision = self.to_target(request.min_create_revision);
        request.max_create_revision = self.to_target(request.max_create_revision);
    }

    fn compare(&self, compare: &mut Compare) {
        match &mut compare.target_union {
            Some(TargetUnion::CreateRevision(r)) | Some(TargetUnion::ModRevision(r)) => {
                *r = self.to_target(*r);
            }
            _ => {}
        }
    }

    pub fn txn_request(&self, request: &mut TxnRequest) {
        for compare in &mut request.compare {
            self.compare(compare);
        }
        for op in request.success.iter_mut().chain(request.failure.iter_mut()) {
            match &mut op.request {
                Some(Request::RequestRange(range)) => self.range_request(range),
                Some(Request::RequestTxn(txn)) => self.txn_request(txn),
                _ => {}
            }
        }
    }

    pub fn compaction_request(&self, request: &mut CompactionRequest) {
        request.revision = self.to_target(request.revision);
    }

    pub fn watch_create(&self, request: &mut WatchCreateRequest) {
        request.start_revision = self.to_target(request.start_revision);
    }

    /// The largest revision a request names (to know whether it needs the target's current
    /// revision first).
    pub fn txn_revisions(request: &TxnRequest) -> i64 {
        let compares = request.compare.iter().map(|c| match c.target_union {
            Some(TargetUnion::CreateRevision(r)) | Some(TargetUnion::ModRevision(r)) => r,
            _ => 0,
        });
        let ops = request
            .success
            .iter()
            .chain(request.failure.iter())
            .map(|op| match &op.request {
                Some(Request::RequestRange(range)) => Self::range_revisions(range),
                Some(Request::RequestTxn(txn)) => Self::txn_revisions(txn),
                _ => 0,
            });
        compares.chain(ops).max().unwrap_or(0)
    }

    pub fn range_revisions(request: &RangeRequest) -> i64 {
        [
            request.revision,
            request.min_mod_revision,
            request.max_mod_revision,
            request.min_create_revision,
            request.max_create_revision,
        ]
        .into_iter()
        .max()
        .unwrap_or(0)
    }

    // Responses, back to the oracle's revisions.

    pub fn header(&self, header: &mut Option<ResponseHeader>) {
        if let Some(header) = header {
            header.revision = self.to_oracle(header.revision);
        }
    }

    pub fn kv(&self, kv: &mut KeyValue) {
        kv.create_revision = self.to_oracle(kv.create_revision);
        kv.mod_revision = self.to_oracle(kv.mod_revision);
    }

    pub fn range_response(&self, response: &mut RangeResponse) {
        self.header(&mut response.header);
        response.kvs.iter_mut().for_each(|kv| self.kv(kv));
    }

    pub fn put_response(&self, response: &mut PutResponse) {
        self.header(&mut response.header);
        if let Some(kv) = &mut response.prev_kv {
            self.kv(kv);
        }
    }

    pub fn delete_response(&self, response: &mut DeleteRangeResponse) {
        self.header(&mut response.header);
        response.prev_kvs.iter_mut().for_each(|kv| self.kv(kv));
    }

    pub fn txn_response(&self, response: &mut TxnResponse) {
        self.header(&mut response.header);
        for op in &mut response.responses {
            match &mut op.response {
                Some(Response::ResponseRange(r)) => self.range_response(r),
                Some(Response::ResponsePut(r)) => self.put_response(r),
                Some(Response::ResponseDeleteRange(r)) => self.delete_response(r),
                Some(Response::ResponseTxn(r)) => self.txn_response(r),
                None => {}
            }
        }
    }

    pub fn grant_response(&self, response: &mut LeaseGrantResponse) {
        self.header(&mut response.header);
    }

    pub fn revoke_response(&self, response: &mut LeaseRevokeResponse) {
        self.header(&mut response.header);
    }

    pub fn ttl_response(&self, response: &mut LeaseTimeToLiveResponse) {
        self.header(&mut response.header);
    }

    pub fn leases_response(&self, response: &mut LeaseLeasesResponse) {
        self.header(&mut response.header);
    }

    pub fn keep_alive_response(&self, response: &mut LeaseKeepAliveResponse) {
        self.header(&mut response.header);
    }

    pub fn watch_response(&self, response: &mut WatchResponse) {
        self.header(&mut response.header);
        response.compact_revision = self.to_oracle(response.compact_revision);
        for event in &mut response.events {
            if let Some(kv) = &mut event.kv {
                self.kv(kv);
            }
            if let Some(kv) = &mut event.prev_kv {
                self.kv(kv);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RevisionMap;

    #[test]
    fn maps_writes_both_ways_and_floors_between() {
        // Registered at 2; writes at 3, 5 (4: a lease record), 6.
        let mut map = RevisionMap::new(2);
        map.record(2, 3);
        map.record(3, 5);
        map.record(4, 6);
        map.set_target_now(8);
        assert_eq!(
            [1, 2, 3, 4].map(|r| map.to_target(r)),
            [2, 3, 5, 6],
            "writes"
        );
        assert_eq!([0, -1].map(|r| map.to_target(r)), [0, -1], "kept");
        assert_eq!(map.to_target(6), 10, "future: as far past the target's now");
        assert_eq!(
            [1, 2, 3, 4, 5, 6, 8].map(|r| map.to_oracle(r)),
            [0, 1, 2, 2, 3, 4, 4],
            "floors"
        );
        assert_eq!(map.to_oracle(10), 4, "past the last write");
    }
}
