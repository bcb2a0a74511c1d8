//! A gateway's tenants across datastores: its home datastore (`--endpoint`) and the
//! datastores tenants were moved to, live, by the gateway itself (`MigrateTenant` on the admin
//! API) or before a restart (`--extra-endpoint`). A moved tenant's source keyspace says where
//! it went (the target's name without credentials); the gateway follows it to the extra
//! datastore of that name.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::error::{KineError, Result};
use crate::keyspace::HeaderIdentity;
use crate::migrate::{self, MigrateError, SourceRecord, Summary};
use crate::run::redact_endpoint;
use crate::served::{ServedTenant, TenantDirectory};
use crate::storage::{self, BackendOptions, KeyspaceState, MigrationRole, Quota};
use crate::tenants::{self, ExpiryScope, Tenants, validate_name};
use crate::txn::RequestLimits;

/// How the datastores a gateway opens are served.
#[derive(Debug, Clone)]
pub struct DatastoreSettings {
    pub limits: RequestLimits,
    pub identity: HeaderIdentity,
    pub default_quota: Quota,
    pub backend: BackendOptions,
    /// Periodic compaction (`--compact-interval`, `--compact-min-retain`); zero: off.
    pub compact_interval: Duration,
    pub compact_min_retain: i64,
}

/// Why a gateway could not move a tenant.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("{0}")]
    Request(#[from] KineError),
    #[error("{0}")]
    Migration(#[from] MigrateError),
}

/// The tenants of a gateway, wherever they are served from.
pub struct RoutedTenants {
    home: Arc<Tenants>,
    home_name: String,
    settings: DatastoreSettings,
    /// Other datastores, by name without credentials.
    others: Mutex<HashMap<String, Arc<Tenants>>>,
    /// Tenants served from another datastore than home.
    routes: Mutex<HashMap<String, Arc<Tenants>>>,
    /// One move at a time.
    moving: tokio::sync::Mutex<()>,
}

impl RoutedTenants {
    pub fn new(home: Arc<Tenants>, home_endpoint: &str, settings: DatastoreSettings) -> Arc<Self> {
        Arc::new(RoutedTenants {
            home,
            home_name: redact_endpoint(home_endpoint),
            settings,
            others: Mutex::new(HashMap::new()),
            routes: Mutex::new(HashMap::new()),
            moving: tokio::sync::Mutex::new(()),
        })
    }

    /// Opens another datastore tenants may live on (or returns it, when open already), and
    /// starts its lease expiry and compaction loops.
    pub async fn add_datastore(&self, endpoint: &str) -> Result<Arc<Tenants>> {
        let name = redact_endpoint(endpoint);
        if name == self.home_name {
            return Ok(self.home.clone());
        }
        if let Some(tenants) = self.others().get(&name) {
            return Ok(tenants.clone());
        }
        let backend = storage::open(endpoint, &self.settings.backend).await?;
        let tenants = Tenants::new(
            backend,
            self.settings.limits,
            self.settings.identity,
            self.settings.default_quota,
        );
        // Every tenant there, not only the open ones: a moved tenant's leases expire even
        // before its first request after a restart (expiry happens once, whoever runs it).
        tokio::spawn(tenants::expire_leases(tenants.clone(), ExpiryScope::All));
        if !self.settings.compact_interval.is_zero() {
            tokio::spawn(tenants::compact_periodically(
                tenants.clone(),
                self.settings.compact_interval,
                self.settings.compact_min_retain,
            ));
        }
        info!(datastore = %name, "serving moved tenants from another datastore");
        Ok(self.others().entry(name).or_insert(tenants).clone())
    }

    fn others(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Tenants>>> {
        self.others.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn routes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Tenants>>> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn route(&self, name: &str) -> Option<Arc<Tenants>> {
        self.routes().get(name).cloned()
    }

    /// Where a tenant the home datastore says has moved is served: the extra datastore its
    /// source record names, if this gateway has it.
    async fn follow(&self, name: &str) -> Result<Option<Arc<Tenants>>> {
        let backend = self.home.backend();
        let Some(id) = backend.keyspace(name, false).await? else {
            return Ok(None);
        };
        if backend.state(id).await?.migration != MigrationRole::Moved {
            return Ok(None);
        }
        let Some(text) = backend.migration_record(id).await? else {
            return Ok(None);
        };
        let record = SourceRecord::decode(&text).map_err(KineError::Storage)?;
        let Some(tenants) = self.others().get(&record.target).cloned() else {
            warn!(
                tenant = name,
                target = %record.target,
                "the tenant moved to a datastore this gateway does not have (--extra-endpoint)"
            );
            return Ok(None);
        };
        self.routes().insert(name.to_string(), tenants.clone());
        Ok(Some(tenants))
    }

    /// The datastore tenant `name` is served from.
    async fn home_of(&self, name: &str) -> Result<Arc<Tenants>> {
        if let Some(tenants) = self.route(name) {
            return Ok(tenants);
        }
        Ok(self
            .follow(name)
            .await?
            .unwrap_or_else(|| self.home.clone()))
    }

    /// Moves tenant `name` live to the datastore at `endpoint` and serves it from there:
    /// the migration engine runs here, then the tenant's open streams carry on on the
    /// target (same revisions), and new requests go there.
    pub async fn move_tenant(&self, name: &str, endpoint: &str) -> Result<Summary, MoveError> {
        validate_name(name).map_err(KineError::InvalidTenant)?;
        let _one = self.moving.lock().await;
        if self.route(name).is_some() {
            return Err(MigrateError::AlreadyMoved(name.to_string()).into());
        }
        let target_name = redact_endpoint(endpoint);
        if target_name == self.home_name {
            return Err(KineError::InvalidTenant(format!(
                "tenant {name:?} is already served from {target_name}"
            ))
            .into());
        }
        let target = self.add_datastore(endpoint).await?;
        let mut options = migrate::Options::new(name);
        options.source_name = self.home_name.clone();
        options.target_name = target_name.clone();
        let started = Instant::now();
        info!(tenant = name, target = %target_name, "moving tenant");
        let summary = migrate::run(
            &**self.home.backend(),
            &**target.backend(),
            &options,
            &mut |_| {},
        )
        .await?;
        // Cut over in this process: new requests go to the target, and the streams of the
        // source's keyspace follow it there.
        let next = target
            .get(name, false)
            .await?
            .ok_or_else(|| KineError::UnknownTenant(name.to_string()))?;
        self.routes().insert(name.to_string(), target.clone());
        if let Some(previous) = self.home.forget(name) {
            previous.move_to(next);
        }
        info!(
            tenant = name,
            target = %target_name,
            revision = summary.revision,
            freeze_ms = summary.freeze_window.as_millis() as u64,
            seconds = started.elapsed().as_secs_f64(),
            "moved tenant"
        );
        Ok(summary)
    }
}

#[async_trait::async_trait]
impl TenantDirectory for RoutedTenants {
    async fn get(&self, name: &str, create: bool) -> Result<Option<Arc<dyn ServedTenant>>> {
        if let Some(tenants) = self.route(name) {
            return TenantDirectory::get(&*tenants, name, false).await;
        }
        match TenantDirectory::get(&*self.home, name, create).await {
            Err(KineError::TenantMoved { tenant }) => match self.follow(name).await? {
                Some(tenants) => TenantDirectory::get(&*tenants, name, false).await,
                None => Err(KineError::TenantMoved { tenant }),
            },
            other => other,
        }
    }

    async fn create(&self, name: &str, quota: Option<Quota>) -> Result<bool> {
        if self.route(name).is_some() {
            return Ok(false);
        }
        self.home.create(name, quota).await
    }

    async fn state(&self, name: &str) -> Result<Option<KeyspaceState>> {
        let tenants = self.home_of(name).await?;
        TenantDirectory::state(&*tenants, name).await
    }

    async fn list(&self) -> Result<Vec<(String, KeyspaceState)>> {
        let mut tenants = self.home.list().await?;
        for (name, state) in &mut tenants {
            if state.migration == MigrationRole::Moved
                && let Some(there) = self
                    .home_of(name)
                    .await
                    .ok()
                    .filter(|t| !Arc::ptr_eq(t, &self.home))
                && let Some(moved) = TenantDirectory::state(&*there, name).await?
            {
                *state = moved;
            }
        }
        Ok(tenants)
    }

    fn watches(&self, name: &str) -> i64 {
        self.route(name)
            .map_or_else(|| self.home.watches(name), |tenants| tenants.watches(name))
    }

    fn evict_idle(&self, idle: Duration) -> usize {
        let others: Vec<Arc<Tenants>> = self
            .others
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let open = others
            .iter()
            .fold(self.home.evict_idle(idle), |open, tenants| {
                open + tenants.evict_idle(idle)
            });
        // Each datastore set the gauge to its own count; the process serves the sum.
        crate::metrics::open_tenants(open);
        open
    }

    async fn delete(&self, name: &str, force: bool) -> Result<bool> {
        let tenants = self.home_of(name).await?;
        let deleted = tenants.delete(name, force).await?;
        if deleted {
            self.routes().remove(name);
        }
        Ok(deleted)
    }
}
