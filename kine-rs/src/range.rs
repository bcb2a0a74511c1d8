//! Range requests: what to fetch from a backend, then etcd's pruning, sorting and limiting.
//!
//! etcd fetches `limit + 1` keys when it can (to set `more`), and everything when the request
//! sorts or filters by revision; `count` is always the number of keys in the range at that
//! revision, before filters and limits. This module reproduces exactly that.

use kine_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use kine_proto::etcdserverpb::{RangeRequest, RangeResponse, ResponseHeader};

use crate::error::{KineError, Result};
use crate::model::{KeyRange, KeyValue};
use crate::storage::{RangeQuery, RangeRows};

/// Rejects what etcd's API layer rejects before a range runs: no key, then an order or sort
/// target that is none of the API's values.
pub fn check(request: &RangeRequest) -> Result<()> {
    if request.key.is_empty() {
        return Err(KineError::EmptyKey);
    }
    if SortOrder::try_from(request.sort_order).is_err()
        || SortTarget::try_from(request.sort_target).is_err()
    {
        return Err(KineError::InvalidSortOption);
    }
    Ok(())
}

fn needs_everything(request: &RangeRequest) -> bool {
    request.sort_order != SortOrder::None as i32
        || request.min_mod_revision != 0
        || request.max_mod_revision != 0
        || request.min_create_revision != 0
        || request.max_create_revision != 0
}

/// The backend query for `request` over `range`.
pub fn query<'a>(request: &RangeRequest, range: &'a KeyRange) -> RangeQuery<'a> {
    let limit = if request.limit > 0 && !needs_everything(request) {
        Some(request.limit.saturating_add(1))
    } else {
        None
    };
    // Values are dropped after sorting, so sorting by value needs them fetched.
    let sorts_by_value = request.sort_target == SortTarget::Value as i32;
    RangeQuery {
        range,
        revision: request.revision,
        limit,
        keys_only: request.keys_only && !sorts_by_value,
        count_only: request.count_only,
    }
}

/// Applies etcd's filters, sort and limit to the rows the backend returned.
pub fn finish(request: &RangeRequest, rows: RangeRows) -> RangeResponse {
    let RangeRows {
        revision,
        mut kvs,
        count,
    } = rows;
    if request.max_mod_revision != 0 {
        kvs.retain(|kv| kv.mod_revision <= request.max_mod_revision);
    }
    if request.min_mod_revision != 0 {
        kvs.retain(|kv| kv.mod_revision >= request.min_mod_revision);
    }
    if request.max_create_revision != 0 {
        kvs.retain(|kv| kv.create_revision <= request.max_create_revision);
    }
    if request.min_create_revision != 0 {
        kvs.retain(|kv| kv.create_revision >= request.min_create_revision);
    }
    let target = SortTarget::try_from(request.sort_target).unwrap_or(SortTarget::Key);
    let mut order = SortOrder::try_from(request.sort_order).unwrap_or(SortOrder::None);
    // Rows come in ascending key order already; etcd sorts ascending by default when the
    // target is not the key.
    if target != SortTarget::Key && order == SortOrder::None {
        order = SortOrder::Ascend;
    } else if target == SortTarget::Key && order == SortOrder::Ascend {
        order = SortOrder::None;
    }
    if order != SortOrder::None {
        let key_of = |kv: &KeyValue| -> SortKey {
            match target {
                SortTarget::Key => SortKey::Bytes(kv.key.clone()),
                SortTarget::Version => SortKey::Int(kv.version),
                SortTarget::Create => SortKey::Int(kv.create_revision),
                SortTarget::Mod => SortKey::Int(kv.mod_revision),
                SortTarget::Value => SortKey::Bytes(kv.value.clone()),
            }
        };
        // Stable, so ties keep key order (etcd's sort is unstable: any tie order is valid).
        kvs.sort_by_cached_key(key_of);
        if order == SortOrder::Descend {
            kvs.reverse();
        }
    }
    let mut more = false;
    if request.limit > 0 && kvs.len() as i64 > request.limit {
        kvs.truncate(request.limit as usize);
        more = true;
    }
    if request.keys_only {
        for kv in &mut kvs {
            kv.value = Default::default();
        }
    }
    RangeResponse {
        header: Some(ResponseHeader {
            revision,
            ..Default::default()
        }),
        kvs,
        more,
        count,
    }
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum SortKey {
    Int(i64),
    Bytes(bytes::Bytes),
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn kv(key: &'static [u8], version: i64) -> KeyValue {
        KeyValue {
            key: Bytes::from_static(key),
            version,
            value: Bytes::from_static(b"v"),
            ..Default::default()
        }
    }

    #[test]
    fn sorts_then_limits_and_counts_before_limits() {
        let request = RangeRequest {
            key: Bytes::from_static(b"a"),
            limit: 2,
            sort_order: SortOrder::Descend as i32,
            sort_target: SortTarget::Version as i32,
            keys_only: true,
            ..Default::default()
        };
        let rows = RangeRows {
            revision: 9,
            kvs: vec![kv(b"a", 1), kv(b"b", 3), kv(b"c", 2)],
            count: 3,
        };
        let response = finish(&request, rows);
        let keys: Vec<_> = response.kvs.iter().map(|kv| kv.key.clone()).collect();
        assert_eq!(
            keys,
            vec![Bytes::from_static(b"b"), Bytes::from_static(b"c")]
        );
        assert!(response.more);
        assert_eq!(response.count, 3);
        assert!(response.kvs.iter().all(|kv| kv.value.is_empty()));
    }
}
