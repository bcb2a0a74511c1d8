//! Quotas on the etcd datastore: a tenant's usage (live keys, and bytes of keys and values)
//! kept in etcd by the same transactions that write the tenant's keys.
//!
//! While a tenant has a quota, every write reads the keys it may touch and the usage record
//! in one read, evaluates the transaction on that snapshot (compares first, as etcd does,
//! then the operations of the path they choose), and sends the write with a compare that the
//! usage record is unchanged and a put of the new usage. Any other write of the tenant
//! changes the usage record, so the snapshot is exactly the state etcd evaluates: the new
//! usage is exact, and a changed record means "read again".

use std::collections::BTreeMap;

use bytes::Bytes;
use kine_proto::etcdserverpb::compare::CompareTarget;
use kine_proto::etcdserverpb::request_op::Request;
use kine_proto::etcdserverpb::{RequestOp, TxnRequest};

use crate::error::{KineError, Result};
use crate::model::{KeyRange, KeyValue};
use crate::storage::Quota;
use crate::txn::{compare_kv, put_costs};

/// A tenant's live keys and their bytes (keys without the prefix, plus values).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub keys: i64,
    pub bytes: i64,
}

/// What the usage record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageRecord {
    Counted(Usage),
    /// A quota was just set and the usage is being counted (since this time, in ms): writes
    /// wait.
    Counting {
        since_ms: i64,
    },
}

impl UsageRecord {
    pub fn encode(&self) -> String {
        match self {
            UsageRecord::Counted(usage) => format!("{} {}", usage.keys, usage.bytes),
            UsageRecord::Counting { since_ms } => format!("counting {since_ms}"),
        }
    }

    pub fn decode(value: &[u8]) -> Option<UsageRecord> {
        let text = std::str::from_utf8(value).ok()?;
        let (first, second) = text.split_once(' ')?;
        if first == "counting" {
            return Some(UsageRecord::Counting {
                since_ms: second.parse().ok()?,
            });
        }
        Some(UsageRecord::Counted(Usage {
            keys: first.parse().ok()?,
            bytes: second.parse().ok()?,
        }))
    }
}

pub fn encode_quota(quota: Quota) -> String {
    format!("{} {}", quota.keys, quota.bytes)
}

pub fn decode_quota(value: &[u8]) -> Quota {
    let text = std::str::from_utf8(value).unwrap_or_default();
    let mut numbers = text.split(' ').map(|n| n.parse().unwrap_or(0));
    Quota {
        keys: numbers.next().unwrap_or(0),
        bytes: numbers.next().unwrap_or(0),
    }
}

/// The ranges (tenant keys, without prefix) a transaction's evaluation reads: its compares,
/// the keys it puts and the ranges it deletes, in both branches and nested transactions.
pub fn ranges_read(request: &TxnRequest, out: &mut Vec<(Bytes, Bytes)>) {
    for compare in &request.compare {
        out.push((compare.key.clone(), compare.range_end.clone()));
    }
    for op in request.success.iter().chain(&request.failure) {
        match &op.request {
            Some(Request::RequestPut(put)) => out.push((put.key.clone(), Bytes::new())),
            Some(Request::RequestDeleteRange(delete)) => {
                out.push((delete.key.clone(), delete.range_end.clone()))
            }
            Some(Request::RequestTxn(txn)) => ranges_read(txn, out),
            Some(Request::RequestRange(_)) | None => {}
        }
    }
}

/// The live keys a transaction may touch, as read at one revision.
#[derive(Debug, Default)]
pub struct Snapshot {
    kvs: BTreeMap<Bytes, KeyValue>,
}

impl Snapshot {
    pub fn insert(&mut self, kv: KeyValue) {
        self.kvs.insert(kv.key.clone(), kv);
    }

    fn in_range(&self, key: &Bytes, range_end: &Bytes) -> Vec<&KeyValue> {
        let range = KeyRange::new(key.clone(), range_end.clone());
        self.kvs
            .values()
            .filter(|kv| range.contains(&kv.key))
            .collect()
    }

    fn holds(&self, compare: &kine_proto::etcdserverpb::Compare) -> bool {
        let target = CompareTarget::try_from(compare.target).unwrap_or(CompareTarget::Version);
        let kvs = self.in_range(&compare.key, &compare.range_end);
        if kvs.is_empty() {
            // As etcd: a value compare on no key fails; others compare a zero key-value.
            return target != CompareTarget::Value
                && compare_kv(compare, target, &KeyValue::default());
        }
        kvs.iter().all(|kv| compare_kv(compare, target, kv))
    }

    /// Which branch each transaction takes, evaluated before any operation applies (as etcd
    /// evaluates the compares of nested transactions on the state before the transaction).
    fn path<'r>(&self, request: &'r TxnRequest, out: &mut Vec<&'r RequestOp>) {
        let ops = if request.compare.iter().all(|c| self.holds(c)) {
            &request.success
        } else {
            &request.failure
        };
        for op in ops {
            match &op.request {
                Some(Request::RequestTxn(txn)) => self.path(txn, out),
                _ => out.push(op),
            }
        }
    }

    /// The operations of the path `request` takes on this snapshot, in the order etcd checks
    /// them (nested transactions' operations in their place).
    pub fn path_ops<'r>(&self, request: &'r TxnRequest) -> Vec<&'r RequestOp> {
        let mut ops = Vec::new();
        self.path(request, &mut ops);
        ops
    }

    /// The leases the puts on `request`'s path attach keys to: the only ones etcd checks.
    pub fn path_leases(&self, request: &TxnRequest) -> Vec<i64> {
        self.path_ops(request)
            .into_iter()
            .filter_map(|op| match &op.request {
                Some(Request::RequestPut(put)) if put.lease != 0 && !put.ignore_lease => {
                    Some(put.lease)
                }
                _ => None,
            })
            .collect()
    }

    /// Whether `key` is live in the snapshot.
    pub fn contains(&self, key: &Bytes) -> bool {
        self.kvs.contains_key(key)
    }

    /// Applies `request` (a transaction of the tenant, keys without prefix) and returns how
    /// the usage changes.
    pub fn apply(&mut self, request: &TxnRequest) -> Usage {
        let mut ops = Vec::new();
        self.path(request, &mut ops);
        let mut delta = Usage::default();
        for op in ops {
            match &op.request {
                Some(Request::RequestPut(put)) => match self.kvs.get_mut(&put.key) {
                    Some(kv) => {
                        if !put.ignore_value {
                            delta.bytes += put.value.len() as i64 - kv.value.len() as i64;
                            kv.value = put.value.clone();
                        }
                    }
                    None => {
                        delta.keys += 1;
                        delta.bytes += (put.key.len() + put.value.len()) as i64;
                        self.insert(KeyValue {
                            key: put.key.clone(),
                            value: put.value.clone(),
                            version: 1,
                            ..Default::default()
                        });
                    }
                },
                Some(Request::RequestDeleteRange(delete)) => {
                    let doomed: Vec<Bytes> = self
                        .in_range(&delete.key, &delete.range_end)
                        .into_iter()
                        .map(|kv| kv.key.clone())
                        .collect();
                    for key in doomed {
                        if let Some(kv) = self.kvs.remove(&key) {
                            delta.keys -= 1;
                            delta.bytes -= (kv.key.len() + kv.value.len()) as i64;
                        }
                    }
                }
                _ => {}
            }
        }
        delta
    }

    /// Refuses a transaction that could take the tenant over `quota`, counting as the
    /// database-backed datastores do: the bytes of every put of both branches as added, and
    /// every put of a key that is not live as a new key. Deletes always pass.
    pub fn check(&self, quota: Quota, usage: Usage, request: &TxnRequest) -> Result<()> {
        let puts = put_costs(request);
        if puts.is_empty() {
            return Ok(());
        }
        if quota.bytes > 0 {
            let added: i64 = puts.iter().map(|(_, bytes)| *bytes).sum();
            if usage.bytes.saturating_add(added) > quota.bytes {
                return Err(KineError::NoSpace);
            }
        }
        if quota.keys > 0 {
            let mut new_keys = std::collections::HashSet::new();
            for (key, _) in &puts {
                if !self.kvs.contains_key(key) {
                    new_keys.insert(key.clone());
                }
            }
            if usage.keys.saturating_add(new_keys.len() as i64) > quota.keys {
                return Err(KineError::NoSpace);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kine_proto::etcdserverpb::compare::{CompareResult, TargetUnion};
    use kine_proto::etcdserverpb::{Compare, DeleteRangeRequest, PutRequest};

    fn put(key: &str, value: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: Bytes::from(key.to_string()),
                value: Bytes::from(value.to_string()),
                ..Default::default()
            })),
        }
    }

    fn kv(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: Bytes::from(key.to_string()),
            value: Bytes::from(value.to_string()),
            version: 1,
            create_revision: 2,
            mod_revision: 2,
            lease: 0,
        }
    }

    #[test]
    fn records_round_trip() {
        for record in [
            UsageRecord::Counted(Usage { keys: 3, bytes: 70 }),
            UsageRecord::Counting { since_ms: 12 },
        ] {
            assert_eq!(
                UsageRecord::decode(record.encode().as_bytes()),
                Some(record)
            );
        }
        assert_eq!(UsageRecord::decode(b"junk"), None);
        let quota = Quota { keys: 5, bytes: 9 };
        assert_eq!(decode_quota(encode_quota(quota).as_bytes()), quota);
    }

    #[test]
    fn the_path_the_compares_choose_is_applied() {
        let mut snapshot = Snapshot::default();
        snapshot.insert(kv("a", "12345"));
        snapshot.insert(kv("b", "x"));
        let request = TxnRequest {
            compare: vec![Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Version as i32,
                key: Bytes::from("a"),
                range_end: Bytes::new(),
                target_union: Some(TargetUnion::Version(1)),
            }],
            success: vec![
                put("a", "1"),
                put("c", "22"),
                RequestOp {
                    request: Some(Request::RequestTxn(TxnRequest {
                        // "c" does not exist before the transaction: this branch fails.
                        compare: vec![Compare {
                            result: CompareResult::Greater as i32,
                            target: CompareTarget::Version as i32,
                            key: Bytes::from("c"),
                            range_end: Bytes::new(),
                            target_union: Some(TargetUnion::Version(0)),
                        }],
                        success: vec![put("never", "v")],
                        failure: vec![RequestOp {
                            request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                                key: Bytes::from("b"),
                                range_end: Bytes::from_static(b"\0"),
                                ..Default::default()
                            })),
                        }],
                    })),
                },
            ],
            failure: vec![put("z", "never")],
        };
        let delta = snapshot.apply(&request);
        // a: 5 -> 1 byte; c: new key (1 + 2 bytes); b and c deleted (1 + 1, 1 + 2 bytes).
        assert_eq!(
            delta,
            Usage {
                keys: -1,
                bytes: -4 + 3 - 2 - 3
            }
        );
    }

    #[test]
    fn quota_checks_count_puts_as_the_database_datastores_do() {
        let mut snapshot = Snapshot::default();
        snapshot.insert(kv("a", "1"));
        let request = TxnRequest {
            compare: vec![],
            success: vec![put("a", "22"), put("b", "1")],
            failure: vec![],
        };
        let usage = Usage { keys: 1, bytes: 2 };
        assert!(
            snapshot
                .check(Quota { keys: 2, bytes: 0 }, usage, &request)
                .is_ok()
        );
        assert!(matches!(
            snapshot.check(Quota { keys: 1, bytes: 0 }, usage, &request),
            Err(KineError::NoSpace)
        ));
        assert!(matches!(
            snapshot.check(Quota { keys: 0, bytes: 6 }, usage, &request),
            Err(KineError::NoSpace)
        ));
        assert!(
            snapshot
                .check(Quota { keys: 0, bytes: 7 }, usage, &request)
                .is_ok()
        );
    }
}
