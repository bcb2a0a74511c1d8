//! Tenants: the keyspaces a process serves, opened lazily and kept cheap, and the loops that
//! run once per process for all of them (lease expiry, periodic compaction).
//!
//! A tenant's name is validated ([`validate_name`]) before anything is looked up, and reaches
//! the datastore only as a bound parameter.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kine_proto::etcdserverpb::CompactionRequest;
use tracing::{info, warn};

use crate::error::{KineError, Result};
use crate::gates::Gates;
use crate::keyspace::{HeaderIdentity, Keyspace};
use crate::model::now_ms;
use crate::served::{ServedTenant, TenantDirectory};
use crate::storage::{Backend, KeyspaceState, Quota};
use crate::txn::RequestLimits;

/// How often expired leases are looked for.
const LEASE_CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// Most expired leases one look handles.
const EXPIRY_BATCH: i64 = 1000;
/// Longest tenant name (a DNS label).
pub const MAX_NAME_LEN: usize = 63;

/// Checks a tenant name: a DNS label (lowercase letters, digits and `-`, starting and ending
/// with a letter or digit, at most 63 characters), so names are safe in logs, paths, metrics
/// and certificates alike.
pub fn validate_name(name: &str) -> std::result::Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "invalid tenant name {:?}: a tenant name is a DNS label (lowercase letters, digits \
             and '-', starting and ending with a letter or digit, at most {MAX_NAME_LEN} \
             characters)",
            name.chars().take(80).collect::<String>()
        ))
    }
}

/// When a cached tenant was last asked for, for closing idle ones.
#[derive(Debug)]
pub struct LastUse(AtomicI64);

impl Default for LastUse {
    fn default() -> Self {
        LastUse(AtomicI64::new(now_ms()))
    }
}

impl LastUse {
    /// Records a use now.
    pub fn touch(&self) {
        self.0.fetch_max(now_ms(), Ordering::AcqRel);
    }

    /// Milliseconds since the last use.
    pub fn idle_ms(&self) -> i64 {
        now_ms().saturating_sub(self.0.load(Ordering::Acquire))
    }
}

/// A tenant held in a process's cache of open tenants.
pub trait Cached {
    fn last_use(&self) -> &LastUse;
}

/// Removes from `open` the tenants unused for `idle` that nothing else holds: no watch or
/// keep-alive stream (each holds the tenant) and no request in flight. Decided under the
/// cache's lock, which every lookup takes to clone a tenant, so none is handed out while
/// it goes; a later request opens it afresh. Returns how many remain open.
pub fn evict_idle<T: Cached>(open: &Mutex<HashMap<String, Arc<T>>>, idle: Duration) -> usize {
    let idle_ms = i64::try_from(idle.as_millis()).unwrap_or(i64::MAX);
    let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
    open.retain(|name, tenant| {
        let evict = Arc::strong_count(tenant) == 1 && tenant.last_use().idle_ms() >= idle_ms;
        if evict {
            tracing::debug!(tenant = %name, "closing an idle tenant");
        }
        !evict
    });
    crate::metrics::open_tenants(open.len());
    open.len()
}

/// Closes idle tenants of `directory` every so often (`--tenant-idle-timeout`).
pub async fn close_idle_tenants(directory: Arc<dyn TenantDirectory>, idle: Duration) {
    let period = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        directory.evict_idle(idle);
    }
}

/// Which keyspaces a process's lease-expiry loop looks after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpiryScope {
    /// Only keyspaces this process has open (a sidecar: its own tenant).
    Open,
    /// Every keyspace of the datastore (a gateway serves them all).
    All,
}

/// The keyspaces of one datastore that this process serves.
pub struct Tenants {
    backend: Arc<dyn Backend>,
    limits: RequestLimits,
    identity: HeaderIdentity,
    open: Mutex<HashMap<String, Arc<Keyspace>>>,
    /// One gate per tenant being opened or deleted, so a keyspace gets one writer task per
    /// process while different tenants open side by side.
    opening: Gates<String>,
    /// The quota of tenants created by this process without one of their own.
    pub default_quota: Quota,
}

impl Tenants {
    pub fn new(
        backend: Arc<dyn Backend>,
        limits: RequestLimits,
        identity: HeaderIdentity,
        default_quota: Quota,
    ) -> Arc<Self> {
        Arc::new(Tenants {
            backend,
            limits,
            identity,
            open: Mutex::new(HashMap::new()),
            opening: Gates::default(),
            default_quota,
        })
    }

    /// The datastore.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    fn cached(&self, name: &str) -> Option<Arc<Keyspace>> {
        let keyspace = self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned();
        if let Some(keyspace) = &keyspace {
            keyspace.last_use().touch();
        }
        keyspace
    }

    /// Stops serving tenant `name` from this datastore in this process (it moved): its open
    /// keyspace, if any, for the caller to hand on.
    pub fn forget(&self, name: &str) -> Option<Arc<Keyspace>> {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
    }

    /// Every keyspace open in this process.
    pub fn open_keyspaces(&self) -> Vec<Arc<Keyspace>> {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The keyspace of tenant `name`, opened on first use; with `create`, created when it
    /// does not exist (with the default quota). `None` when it does not exist.
    pub async fn get(&self, name: &str, create: bool) -> Result<Option<Arc<Keyspace>>> {
        if let Some(keyspace) = self.cached(name)
            && !keyspace.is_closed()
        {
            return Ok(Some(keyspace));
        }
        validate_name(name).map_err(KineError::InvalidTenant)?;
        self.opening
            .run(&name.to_string(), self.open_gated(name, create))
            .await
    }

    /// [`Self::get`] once tenant `name`'s gate is held.
    async fn open_gated(&self, name: &str, create: bool) -> Result<Option<Arc<Keyspace>>> {
        if let Some(keyspace) = self.cached(name) {
            if !keyspace.is_closed() {
                return Ok(Some(keyspace));
            }
            // Deleted by another process: forget it and look the tenant up again.
            self.open
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(name);
        }
        let (id, existed) = match self.backend.keyspace(name, false).await? {
            Some(id) => (id, true),
            None if create => (self.backend.create_keyspace(name).await?, false),
            None => return Ok(None),
        };
        let keyspace =
            Keyspace::start(self.backend.clone(), name, id, self.limits, self.identity).await?;
        if !existed {
            info!(tenant = name, "created tenant");
            if self.default_quota != Quota::default() {
                keyspace.set_quota(self.default_quota).await?;
            }
        }
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.insert(name.to_string(), keyspace.clone());
        crate::metrics::open_tenants(open.len());
        Ok(Some(keyspace))
    }

    /// Creates tenant `name`; `false` when it already existed.
    pub async fn create(&self, name: &str, quota: Option<Quota>) -> Result<bool> {
        validate_name(name).map_err(KineError::InvalidTenant)?;
        if self.backend.keyspace(name, false).await?.is_some() {
            return Ok(false);
        }
        let keyspace = self
            .get(name, true)
            .await?
            .ok_or_else(|| KineError::Storage(format!("tenant {name:?} was not created")))?;
        if let Some(quota) = quota {
            keyspace.set_quota(quota).await?;
        }
        Ok(true)
    }

    /// Every tenant of the datastore with its counters.
    pub async fn list(&self) -> Result<Vec<(String, KeyspaceState)>> {
        self.backend.keyspaces().await
    }

    /// Watchers open on tenant `name` in this process.
    pub fn watches(&self, name: &str) -> i64 {
        self.cached(name).map_or(0, |k| k.watches())
    }

    /// Deletes tenant `name` with all its data. Refused while it has open watches unless
    /// `force`, which ends them. `false` when it did not exist.
    pub async fn delete(&self, name: &str, force: bool) -> Result<bool> {
        validate_name(name).map_err(KineError::InvalidTenant)?;
        self.opening
            .run(&name.to_string(), self.delete_gated(name, force))
            .await
    }

    /// [`Self::delete`] once tenant `name`'s gate is held.
    async fn delete_gated(&self, name: &str, force: bool) -> Result<bool> {
        let open = self.cached(name);
        if let Some(keyspace) = &open
            && keyspace.watches() > 0
            && !force
        {
            return Err(KineError::TenantBusy {
                tenant: name.to_string(),
                watches: keyspace.watches(),
            });
        }
        let Some(id) = self.backend.keyspace(name, false).await? else {
            return Ok(false);
        };
        let deleted = self.backend.delete_keyspace(id).await?;
        if let Some(keyspace) = self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
        {
            keyspace.close();
        }
        if deleted {
            info!(tenant = name, "deleted tenant");
        }
        Ok(deleted)
    }
}

/// Revokes expired leases, once per [`LEASE_CHECK_INTERVAL`], with one query for every
/// keyspace in scope (not one loop per keyspace). Several processes may race; the writer
/// re-checks under the keyspace lock, so each lease expires once. Frozen keyspaces are skipped:
/// their expiry is paused.
pub async fn expire_leases(tenants: Arc<Tenants>, scope: ExpiryScope) {
    let mut ticker = tokio::time::interval(LEASE_CHECK_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let now = now_ms();
        let expired: Vec<(String, i64)> = match scope {
            ExpiryScope::All => match tenants.backend.expired_leases_all(now, EXPIRY_BATCH).await {
                Ok(rows) => rows.into_iter().map(|(name, _, id)| (name, id)).collect(),
                Err(error) => {
                    warn!(%error, "cannot look for expired leases");
                    continue;
                }
            },
            ExpiryScope::Open => {
                let mut rows = Vec::new();
                for keyspace in tenants.open_keyspaces() {
                    match tenants.backend.expired_leases(keyspace.id(), now).await {
                        Ok(ids) => {
                            rows.extend(ids.into_iter().map(|id| (keyspace.name().to_string(), id)))
                        }
                        Err(error) => warn!(%error, "cannot look for expired leases"),
                    }
                }
                rows
            }
        };
        for (name, id) in expired {
            // A keyspace's leases expire through its own writer, which this opens if needed.
            let keyspace = match tenants.get(&name, false).await {
                Ok(Some(keyspace)) => keyspace,
                Ok(None) => continue,
                Err(error) => {
                    warn!(%error, tenant = %name, "cannot open the tenant to expire its leases");
                    continue;
                }
            };
            if let Err(error) = keyspace.expire_lease(id).await {
                warn!(%error, tenant = %name, lease = id, "lease expiry failed; retrying");
            }
        }
    }
}

/// Compacts every open keyspace to `retain` revisions behind its current one, every
/// `interval`.
pub async fn compact_periodically(tenants: Arc<Tenants>, interval: Duration, retain: i64) {
    let mut ticker = tokio::time::interval(interval);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        for keyspace in tenants.open_keyspaces() {
            let state = match keyspace.state().await {
                Ok(state) => state,
                Err(error) => {
                    warn!(%error, tenant = keyspace.name(), "cannot read the revision to compact");
                    continue;
                }
            };
            if state.frozen {
                continue;
            }
            let target = state.revision - retain.max(0);
            if target > state.compact_revision {
                let request = CompactionRequest {
                    revision: target,
                    physical: false,
                };
                match keyspace.compact(request).await {
                    Ok(_) => info!(tenant = keyspace.name(), revision = target, "compacted"),
                    Err(error) => warn!(
                        %error,
                        tenant = keyspace.name(),
                        revision = target,
                        "periodic compaction failed"
                    ),
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl TenantDirectory for Tenants {
    async fn get(&self, name: &str, create: bool) -> Result<Option<Arc<dyn ServedTenant>>> {
        Ok(Tenants::get(self, name, create)
            .await?
            .map(|keyspace| keyspace as Arc<dyn ServedTenant>))
    }

    async fn create(&self, name: &str, quota: Option<Quota>) -> Result<bool> {
        Tenants::create(self, name, quota).await
    }

    async fn state(&self, name: &str) -> Result<Option<KeyspaceState>> {
        validate_name(name).map_err(KineError::InvalidTenant)?;
        match self.backend.keyspace(name, false).await? {
            Some(id) => Ok(Some(self.backend.state(id).await?)),
            None => Ok(None),
        }
    }

    async fn list(&self) -> Result<Vec<(String, KeyspaceState)>> {
        Tenants::list(self).await
    }

    fn watches(&self, name: &str) -> i64 {
        Tenants::watches(self, name)
    }

    fn evict_idle(&self, idle: Duration) -> usize {
        evict_idle(&self.open, idle)
    }

    async fn delete(&self, name: &str, force: bool) -> Result<bool> {
        Tenants::delete(self, name, force).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_names_are_dns_labels() {
        for good in ["default", "a", "tenant-1", "0abc", &"x".repeat(63)] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a.b",
            "../etc",
            "a/b",
            "x'; DROP TABLE kv; --",
            "a b",
            "ä",
            &"x".repeat(64),
        ] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
