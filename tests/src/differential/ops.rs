//! The random operation generator. Everything it draws comes from one seeded RNG and from
//! facts both servers must agree on (the current and the compacted revision, as the oracle
//! reported them), so a seed always gives the same sequence.

use kine_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use kine_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use kine_proto::etcdserverpb::request_op::Request;
use kine_proto::etcdserverpb::watch_create_request::FilterType;
use kine_proto::etcdserverpb::{
    CompactionRequest, Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseKeepAliveRequest,
    LeaseRevokeRequest, LeaseTimeToLiveRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
    WatchCreateRequest,
};
use prost::bytes::Bytes;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

/// The key space: few keys, sharing prefixes, so ranges overlap often. Includes a key with a
/// NUL byte and keys made of 0xff bytes (whose prefix end is `\0`, "all keys").
pub(crate) const KEYS: &[&[u8]] = &[
    b"a",
    b"a/",
    b"a/1",
    b"a/2",
    b"ab",
    b"b",
    b"b\x00",
    b"b/1",
    b"c",
    b"z",
    b"\xff",
    b"\xff\x00",
];

/// Extra range ends that are not keys.
const ENDS: &[&[u8]] = &[b"a0", b"b0", b"\xff\xff", b"\x01", b"a/1\x00"];

/// Small values (ties for VALUE sorts and VALUE compares are common on purpose).
const VALUES: &[&[u8]] = &[b"", b"v0", b"v1", b"v2", b"v3", b"x"];

/// Lease ids the generator uses; every lease is granted with an explicit id because ids that
/// a server picks itself differ between two servers.
pub(crate) const LEASES: &[i64] = &[1, 2, 3, 1000, 1 << 40];

/// A lease id never granted.
const UNKNOWN_LEASE: i64 = 424_242;

/// One top-level operation of a sequence.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    Range(RangeRequest),
    Put(PutRequest),
    Delete(DeleteRangeRequest),
    Txn(TxnRequest),
    Compact(CompactionRequest),
    LeaseGrant(LeaseGrantRequest),
    LeaseRevoke(LeaseRevokeRequest),
    LeaseTimeToLive(LeaseTimeToLiveRequest),
    LeaseLeases,
    LeaseKeepAlive(LeaseKeepAliveRequest),
    /// Open a watch on watch stream `stream` (1 or 2; stream 0 carries the all-keys log).
    WatchCreate {
        stream: usize,
        req: WatchCreateRequest,
    },
    /// Cancel the open watch with the harness's index `watch` (after comparing it).
    WatchCancel {
        watch: usize,
    },
    /// Cancel a watch id no server has handed out: nothing must come back.
    WatchCancelUnknown {
        stream: usize,
        watch_id: i64,
    },
    /// Compare every watch now.
    WatchSync,
    AlarmList,
    Defragment,
}

/// What the generator may know about the servers' state.
pub(crate) struct Ctx<'a> {
    pub cur_rev: i64,
    pub compact_rev: i64,
    /// Harness indexes of the watches that are open (excluding the all-keys log).
    pub open_watches: &'a [usize],
}

pub(crate) struct Gen {
    rng: StdRng,
}

/// Whether a txn (any branch, any depth) deletes with range end `\0` ("every key from here").
///
/// ORACLE CRASH AVOIDED: etcd 3.5.1's duplicate-key check of a txn misses the overlap of such
/// a delete with a later put of the same txn, and a put with ignore_value/ignore_lease on the
/// key the delete just removed then makes etcd panic while applying ("unexpected error during
/// txn: etcdserver: key not found") and exit. Such txns are generated without the ignore
/// flags; what kine-rs does with them cannot be compared to a crashed oracle.
fn has_from_key_delete(txn: &TxnRequest) -> bool {
    txn.success
        .iter()
        .chain(&txn.failure)
        .any(|op| match &op.request {
            Some(Request::RequestDeleteRange(d)) => d.range_end.as_ref() == b"\x00",
            Some(Request::RequestTxn(t)) => has_from_key_delete(t),
            _ => false,
        })
}

/// For the etcd proxy: a txn's deletes to the end of the keyspace (`\0`) end at `\xff\xff`,
/// above every key generated, so they delete the same keys.
///
/// PROXY DIFFERENCE AVOIDED, and kept: etcd's duplicate-key check of a txn (3.5.1, and
/// still 3.7) takes the range end `\0` as a plain (inverted) end, so a put of the same txn
/// under such a delete, at its level or nested, passes it (and etcd deletes, then puts);
/// through the proxy the end is the tenant's prefix end, and etcd refuses the same txn as
/// `duplicate key given in txn request`. The proxy cannot send anything else: an end of
/// `\0` would delete past the tenant's prefix, any other end is checked, and no other
/// shape of one etcd transaction deletes a key and then puts it (README, "The etcd proxy").
pub(crate) fn end_from_key_deletes(txn: &mut TxnRequest) {
    for op in txn.success.iter_mut().chain(txn.failure.iter_mut()) {
        match &mut op.request {
            Some(Request::RequestDeleteRange(d)) if d.range_end.as_ref() == b"\x00" => {
                d.range_end = Bytes::from_static(b"\xff\xff");
            }
            Some(Request::RequestTxn(t)) => end_from_key_deletes(t),
            _ => {}
        }
    }
}

fn clear_ignore_flags(txn: &mut TxnRequest) {
    for op in txn.success.iter_mut().chain(txn.failure.iter_mut()) {
        match &mut op.request {
            Some(Request::RequestPut(p)) => {
                p.ignore_value = false;
                p.ignore_lease = false;
            }
            Some(Request::RequestTxn(t)) => clear_ignore_flags(t),
            _ => {}
        }
    }
}

/// The end of the range of all keys starting with `key`, as etcd clients compute it.
pub(crate) fn prefix_end(key: &[u8]) -> Vec<u8> {
    let mut end = key.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Gen {
    pub fn new(seed: u64) -> Gen {
        Gen {
            rng: StdRng::seed_from_u64(seed),
        }
    }

    fn pct(&mut self, p: u32) -> bool {
        self.rng.random_range(0..100) < p
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        *items.choose(&mut self.rng).expect("non-empty choice list")
    }

    /// A key: mostly from the key space, sometimes `\0`, rarely empty (an error for KV ops).
    fn key(&mut self) -> Bytes {
        let roll = self.rng.random_range(0..100);
        if roll < 2 {
            Bytes::new()
        } else if roll < 5 {
            Bytes::from_static(b"\x00")
        } else {
            Bytes::from_static(self.pick(KEYS))
        }
    }

    /// A range end for `key`: none (single key), a prefix end, `\0` (every key >= key), a key
    /// (possibly <= key: an empty range), or another boundary.
    fn range_end(&mut self, key: &[u8]) -> Bytes {
        let roll = self.rng.random_range(0..100);
        if roll < 42 {
            Bytes::new()
        } else if roll < 58 {
            Bytes::from(prefix_end(key))
        } else if roll < 70 {
            Bytes::from_static(b"\x00")
        } else if roll < 92 {
            Bytes::from_static(self.pick(KEYS))
        } else {
            Bytes::from_static(self.pick(ENDS))
        }
    }

    fn value(&mut self) -> Bytes {
        if self.pct(3) {
            Bytes::from(format!(
                "value-{}",
                "#".repeat(self.rng.random_range(1..40))
            ))
        } else {
            Bytes::from_static(self.pick(VALUES))
        }
    }

    fn lease_id(&mut self) -> i64 {
        if self.pct(5) {
            UNKNOWN_LEASE
        } else {
            self.pick(LEASES)
        }
    }

    /// A revision to read at: current (0 or explicit), past, exactly the compacted one,
    /// compacted away (error), future (error), negative (current).
    fn read_revision(&mut self, ctx: &Ctx<'_>) -> i64 {
        let roll = self.rng.random_range(0..100);
        let floor = ctx.compact_rev.max(1);
        if roll < 55 {
            0
        } else if roll < 65 {
            ctx.cur_rev
        } else if roll < 80 {
            self.rng.random_range(floor..=ctx.cur_rev.max(floor))
        } else if roll < 87 && ctx.compact_rev > 1 {
            self.rng.random_range(1..ctx.compact_rev)
        } else if roll < 93 {
            ctx.cur_rev + self.rng.random_range(1..=3)
        } else if roll < 98 && ctx.compact_rev > 0 {
            ctx.compact_rev
        } else {
            -1
        }
    }

    /// A revision bound for min/max filters and compares: 0 sometimes, else around the history.
    fn any_revision(&mut self, ctx: &Ctx<'_>) -> i64 {
        if self.pct(15) {
            0
        } else {
            self.rng.random_range(1..=ctx.cur_rev + 1)
        }
    }

    pub fn range(&mut self, ctx: &Ctx<'_>) -> RangeRequest {
        let key = self.key();
        let range_end = self.range_end(&key);
        let limit = match self.rng.random_range(0..100) {
            0..50 => 0,
            50..97 => self.rng.random_range(1..=5),
            _ => -1,
        };
        let sort_order = match self.rng.random_range(0..100) {
            0..55 => SortOrder::None,
            55..78 => SortOrder::Ascend,
            _ => SortOrder::Descend,
        };
        let sort_target = if self.pct(45) {
            SortTarget::Key
        } else {
            self.pick(&[
                SortTarget::Version,
                SortTarget::Create,
                SortTarget::Mod,
                SortTarget::Value,
            ])
        };
        let filter = |g: &mut Gen| {
            if g.pct(12) { g.any_revision(ctx) } else { 0 }
        };
        RangeRequest {
            key,
            range_end,
            limit,
            revision: self.read_revision(ctx),
            sort_order: sort_order as i32,
            sort_target: sort_target as i32,
            serializable: self.pct(30),
            keys_only: self.pct(15),
            count_only: self.pct(12),
            min_mod_revision: filter(self),
            max_mod_revision: filter(self),
            min_create_revision: filter(self),
            max_create_revision: filter(self),
        }
    }

    pub fn put(&mut self) -> PutRequest {
        let key = self.key();
        let mut value = self.value();
        let mut lease = match self.rng.random_range(0..100) {
            0..65 => 0,
            _ => self.lease_id(),
        };
        let ignore_value = self.pct(10);
        let ignore_lease = self.pct(10);
        if ignore_value && self.pct(75) {
            value = Bytes::new();
        }
        if ignore_lease && self.pct(75) {
            lease = 0;
        }
        PutRequest {
            key,
            value,
            lease,
            prev_kv: self.pct(40),
            ignore_value,
            ignore_lease,
        }
    }

    pub fn delete(&mut self) -> DeleteRangeRequest {
        if self.pct(4) {
            // Everything: key "\0", range end "\0".
            return DeleteRangeRequest {
                key: Bytes::from_static(b"\x00"),
                range_end: Bytes::from_static(b"\x00"),
                prev_kv: self.pct(50),
            };
        }
        let key = self.key();
        let range_end = self.range_end(&key);
        DeleteRangeRequest {
            key,
            range_end,
            prev_kv: self.pct(50),
        }
    }

    fn compare(&mut self, ctx: &Ctx<'_>) -> Compare {
        let key = self.key();
        let range_end = if self.pct(25) {
            self.range_end(&key)
        } else {
            Bytes::new()
        };
        let target = self.pick(&[
            CompareTarget::Version,
            CompareTarget::Create,
            CompareTarget::Mod,
            CompareTarget::Value,
            CompareTarget::Lease,
        ]);
        let result = self.pick(&[
            CompareResult::Equal,
            CompareResult::NotEqual,
            CompareResult::Greater,
            CompareResult::Less,
        ]);
        let roll = self.rng.random_range(0..100);
        // Mostly the union member matching the target; sometimes another one or none at all
        // (etcd then compares against the zero value).
        let union_target = if roll < 92 {
            Some(target)
        } else if roll < 96 {
            Some(self.pick(&[
                CompareTarget::Version,
                CompareTarget::Create,
                CompareTarget::Mod,
                CompareTarget::Value,
                CompareTarget::Lease,
            ]))
        } else {
            None
        };
        let target_union = union_target.map(|t| match t {
            CompareTarget::Version => TargetUnion::Version(self.rng.random_range(0..=4)),
            CompareTarget::Create => TargetUnion::CreateRevision(self.any_revision(ctx)),
            CompareTarget::Mod => TargetUnion::ModRevision(self.any_revision(ctx)),
            CompareTarget::Value => TargetUnion::Value(self.value()),
            CompareTarget::Lease => {
                TargetUnion::Lease(if self.pct(40) { 0 } else { self.lease_id() })
            }
        });
        Compare {
            result: result as i32,
            target: target as i32,
            key,
            range_end,
            target_union,
        }
    }

    fn request_op(&mut self, ctx: &Ctx<'_>, depth: usize) -> RequestOp {
        let roll = self.rng.random_range(0..100);
        let request = if roll < 35 {
            Request::RequestPut(self.put())
        } else if roll < 65 {
            Request::RequestRange(self.range(ctx))
        } else if roll < 85 {
            Request::RequestDeleteRange(self.delete())
        } else if depth < 2 {
            Request::RequestTxn(self.txn(ctx, depth + 1))
        } else {
            Request::RequestPut(self.put())
        };
        RequestOp {
            request: Some(request),
        }
    }

    pub fn txn(&mut self, ctx: &Ctx<'_>, depth: usize) -> TxnRequest {
        if depth == 0 && self.pct(1) {
            // More operations than etcd's default --max-txn-ops (128): an error.
            let op = RequestOp {
                request: Some(Request::RequestRange(RangeRequest {
                    key: Bytes::from_static(b"a"),
                    ..Default::default()
                })),
            };
            return TxnRequest {
                compare: vec![],
                success: vec![op; 129],
                failure: vec![],
            };
        }
        let n_compare = self.rng.random_range(0..=3);
        let n_success = self.rng.random_range(0..=4);
        let n_failure = self.rng.random_range(0..=3);
        let mut txn = TxnRequest {
            compare: (0..n_compare).map(|_| self.compare(ctx)).collect(),
            success: (0..n_success)
                .map(|_| self.request_op(ctx, depth))
                .collect(),
            failure: (0..n_failure)
                .map(|_| self.request_op(ctx, depth))
                .collect(),
        };
        if depth == 0 && has_from_key_delete(&txn) {
            clear_ignore_flags(&mut txn);
        }
        txn
    }

    fn compaction(&mut self, ctx: &Ctx<'_>) -> CompactionRequest {
        let roll = self.rng.random_range(0..100);
        let revision = if roll < 65 && ctx.cur_rev > ctx.compact_rev {
            self.rng.random_range(ctx.compact_rev + 1..=ctx.cur_rev)
        } else if roll < 75 {
            // Already compacted: an error.
            ctx.compact_rev
        } else if roll < 82 && ctx.compact_rev > 1 {
            self.rng.random_range(1..ctx.compact_rev)
        } else if roll < 92 {
            // Future: an error.
            ctx.cur_rev + self.rng.random_range(1..=3)
        } else {
            ctx.cur_rev
        };
        CompactionRequest {
            revision,
            physical: self.pct(30),
        }
    }

    fn watch_create(&mut self, ctx: &Ctx<'_>) -> Op {
        let key = if self.pct(3) {
            Bytes::new()
        } else {
            self.key()
        };
        let range_end = self.range_end(&key);
        let floor = ctx.compact_rev.max(1);
        let start_revision = match self.rng.random_range(0..100) {
            0..35 => 0,
            35..62 => self.rng.random_range(floor..=ctx.cur_rev.max(floor)),
            // Exactly the compaction revision (see the named etcd exception in watch.rs).
            62..72 if ctx.compact_rev > 0 => ctx.compact_rev,
            72..80 if ctx.compact_rev > 1 => self.rng.random_range(1..ctx.compact_rev),
            80..92 => ctx.cur_rev + self.rng.random_range(1..=3),
            _ => ctx.cur_rev,
        };
        let filters = match self.rng.random_range(0..100) {
            0..70 => vec![],
            70..80 => vec![FilterType::Noput as i32],
            80..92 => vec![FilterType::Nodelete as i32],
            92..97 => vec![FilterType::Noput as i32, FilterType::Nodelete as i32],
            _ => vec![FilterType::Nodelete as i32, FilterType::Nodelete as i32],
        };
        let watch_id = if self.pct(8) {
            self.pick(&[1, 2, 50, 51])
        } else {
            0
        };
        Op::WatchCreate {
            stream: self.rng.random_range(1..=2),
            req: WatchCreateRequest {
                key,
                range_end,
                start_revision,
                progress_notify: self.pct(10),
                filters,
                prev_kv: self.pct(40),
                watch_id,
                fragment: false,
            },
        }
    }

    /// The next operation.
    pub fn next_op(&mut self, ctx: &Ctx<'_>) -> Op {
        let roll = self.rng.random_range(0..1000);
        match roll {
            0..345 => Op::Put(self.put()),
            345..585 => Op::Range(self.range(ctx)),
            585..665 => Op::Delete(self.delete()),
            665..835 => Op::Txn(self.txn(ctx, 0)),
            835..847 => Op::Compact(self.compaction(ctx)),
            847..872 => {
                let ttl = if self.pct(4) {
                    // Over etcd's maximum lease TTL: an error.
                    9_000_000_001
                } else {
                    self.rng.random_range(300..=3000)
                };
                Op::LeaseGrant(LeaseGrantRequest {
                    ttl,
                    id: self.pick(LEASES),
                })
            }
            872..884 => Op::LeaseRevoke(LeaseRevokeRequest {
                id: self.lease_id(),
            }),
            884..904 => Op::LeaseTimeToLive(LeaseTimeToLiveRequest {
                id: self.lease_id(),
                keys: self.pct(60),
            }),
            904..912 => Op::LeaseLeases,
            912..927 => Op::LeaseKeepAlive(LeaseKeepAliveRequest {
                id: self.lease_id(),
            }),
            927..972 => {
                if ctx.open_watches.len() >= 10 {
                    Op::WatchCancel {
                        watch: self.pick(ctx.open_watches),
                    }
                } else {
                    self.watch_create(ctx)
                }
            }
            972..987 => match ctx.open_watches.choose(&mut self.rng) {
                Some(&watch) if !self.pct(10) => Op::WatchCancel { watch },
                _ => Op::WatchCancelUnknown {
                    stream: self.rng.random_range(1..=2),
                    watch_id: 9_999,
                },
            },
            987..995 => Op::WatchSync,
            995..999 => Op::AlarmList,
            _ => Op::Defragment,
        }
    }
}
