//! Placing a new tenant: among the DataStores whose labels match the binding's selector, that
//! are Ready and not full (`capacity.maxTenants`, `capacity.maxBytes`),
//! the one with the most free room, as a fraction of its capacity (a store without limits
//! counts as 1,000 tenants); ties go to the fewest tenants, then to the name. So new tenants
//! spread over the stores and a full store is skipped.

use std::collections::BTreeMap;

use kube::{Resource, ResourceExt};

use crate::crd::DataStore;

/// The tenants a store without `maxTenants` is deemed to take, for spreading.
const UNLIMITED_TENANTS: f64 = 1000.0;

/// Why no store was picked, for the binding's condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoStore(pub String);

fn matches(store: &DataStore, selector: Option<&BTreeMap<String, String>>) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    let labels = store.labels();
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Whether `store` has room for one more tenant.
pub fn has_room(store: &DataStore) -> bool {
    let status = store.status.clone().unwrap_or_default();
    let capacity = store.spec.capacity.clone().unwrap_or_default();
    capacity.max_tenants.is_none_or(|max| status.tenants < max)
        && capacity.max_bytes.is_none_or(|max| status.bytes < max)
}

fn free_fraction(store: &DataStore) -> f64 {
    let status = store.status.clone().unwrap_or_default();
    let capacity = store.spec.capacity.clone().unwrap_or_default();
    let tenants = f64::from(status.tenants);
    let by_tenants = match capacity.max_tenants {
        Some(max) if max > 0 => 1.0 - tenants / f64::from(max),
        Some(_) => 0.0,
        None => 1.0 - tenants / UNLIMITED_TENANTS,
    };
    let by_bytes = match capacity.max_bytes {
        Some(max) if max > 0 => 1.0 - status.bytes as f64 / max as f64,
        Some(_) => 0.0,
        None => 1.0,
    };
    by_tenants.min(by_bytes)
}

/// Picks a store for a new tenant.
pub fn pick<'a>(
    stores: &'a [DataStore],
    selector: Option<&BTreeMap<String, String>>,
) -> Result<&'a DataStore, NoStore> {
    let selected: Vec<&DataStore> = stores.iter().filter(|s| matches(s, selector)).collect();
    if selected.is_empty() {
        return Err(NoStore(match selector {
            Some(selector) => format!("no DataStore has the labels {selector:?}"),
            None => "there is no DataStore".to_string(),
        }));
    }
    let usable: Vec<&DataStore> = selected
        .iter()
        .copied()
        .filter(|s| {
            s.status.as_ref().is_some_and(|st| st.ready) && s.meta().deletion_timestamp.is_none()
        })
        .collect();
    if usable.is_empty() {
        return Err(NoStore(format!(
            "none of the matching DataStores ({}) is Ready",
            names(&selected)
        )));
    }
    let with_room: Vec<&DataStore> = usable.iter().copied().filter(|s| has_room(s)).collect();
    with_room
        .into_iter()
        .max_by(|a, b| {
            let tenants = |s: &DataStore| s.status.as_ref().map_or(0, |st| st.tenants);
            free_fraction(a)
                .total_cmp(&free_fraction(b))
                .then_with(|| tenants(b).cmp(&tenants(a)))
                .then_with(|| b.name_any().cmp(&a.name_any()))
        })
        .ok_or_else(|| {
            NoStore(format!(
                "every matching DataStore is full ({})",
                names(&usable)
            ))
        })
}

fn names(stores: &[&DataStore]) -> String {
    stores
        .iter()
        .map(|s| s.name_any())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{Capacity, DataStoreSpec, DataStoreStatus, Driver, Mode};

    fn store(name: &str, tenants: u32, max: Option<u32>, labels: &[(&str, &str)]) -> DataStore {
        let mut s = DataStore::new(
            name,
            DataStoreSpec {
                driver: Driver::PostgreSQL,
                endpoints: vec!["db:5432".into()],
                basic_auth: None,
                tls_config: None,
                mode: Mode::Sidecar,
                gateway: None,
                capacity: Some(Capacity {
                    max_tenants: max,
                    max_bytes: None,
                }),
            },
        );
        s.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        s.status = Some(DataStoreStatus {
            ready: true,
            tenants,
            ..Default::default()
        });
        s
    }

    fn picked(stores: &[DataStore], selector: Option<&BTreeMap<String, String>>) -> String {
        match pick(stores, selector) {
            Ok(s) => s.name_any(),
            Err(NoStore(why)) => format!("none: {why}"),
        }
    }

    #[test]
    fn spreads_by_free_capacity() {
        let stores = [
            store("a", 5, Some(10), &[]),
            store("b", 2, Some(10), &[]),
            store("c", 3, Some(4), &[]),
        ];
        assert_eq!(picked(&stores, None), "b");
        // Ties: fewer tenants, then the name.
        let stores = [store("b", 1, Some(2), &[]), store("a", 1, Some(2), &[])];
        assert_eq!(picked(&stores, None), "a");
    }

    #[test]
    fn skips_full_stores() {
        let stores = [
            store("full", 4, Some(4), &[]),
            store("roomy", 9, Some(10), &[]),
        ];
        assert_eq!(picked(&stores, None), "roomy");
        let stores = [store("full", 4, Some(4), &[])];
        assert_eq!(
            picked(&stores, None),
            "none: every matching DataStore is full (full)"
        );
        let mut bytes_full = store("bytes", 0, None, &[]);
        bytes_full.spec.capacity = Some(Capacity {
            max_tenants: None,
            max_bytes: Some(100),
        });
        if let Some(status) = bytes_full.status.as_mut() {
            status.bytes = 100;
        }
        assert!(!has_room(&bytes_full));
    }

    #[test]
    fn labels_select() {
        let stores = [
            store("eu", 5, Some(10), &[("region", "eu")]),
            store("us", 0, Some(10), &[("region", "us")]),
        ];
        let eu: BTreeMap<String, String> = [("region".to_string(), "eu".to_string())].into();
        assert_eq!(picked(&stores, Some(&eu)), "eu");
        let mars: BTreeMap<String, String> = [("region".to_string(), "mars".to_string())].into();
        assert!(picked(&stores, Some(&mars)).starts_with("none: no DataStore has the labels"));
    }

    #[test]
    fn skips_stores_not_ready() {
        let mut down = store("down", 0, None, &[]);
        if let Some(status) = down.status.as_mut() {
            status.ready = false;
        }
        assert!(picked(&[down], None).starts_with("none: none of the matching"));
    }
}
