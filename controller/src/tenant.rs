//! The tenant's keyspace in its datastore, through the kine-rs library: created with its
//! quota, frozen and unfrozen (`spec.writable`), measured, deleted.
//!
//! In sidecar mode nothing else serves the tenant's admin API to the controller, so the
//! controller opens the tenant's datastore itself (with the tenant's own login) and changes
//! the keyspace's state there: a freeze is a fact in the datastore, which every kine-rs
//! process serving the tenant obeys atomically (the invariant kine-rs keeps). A database is
//! opened through kine-rs's storage trait ([`Store::Database`]); an etcd cluster through
//! kine-rs's tenant-prefixing proxy ([`Store::Etcd`]), whose records are the same facts for
//! every proxy serving the tenant.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kine::etcd_proxy::EtcdProxy;
use kine::served::TenantDirectory;
use kine::storage::{Backend, BackendOptions, KeyspaceState, MigrationRole, Quota, TlsFiles};
use sha2::{Digest, Sha256};

use crate::credentials::Sensitive;
use crate::datastore_tls::DatastoreTls;

/// The map key of an endpoint with its TLS files.
fn key(endpoint: &Sensitive, files: &TlsFiles) -> String {
    let mut hash = Sha256::new();
    hash.update(endpoint.expose().as_bytes());
    for file in [&files.ca_file, &files.cert_file, &files.key_file] {
        hash.update([0]);
        hash.update(file.as_deref().unwrap_or_default().as_bytes());
    }
    hex::encode(hash.finalize())
}

/// How long opening a datastore through kine-rs may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(15);

/// A datastore the controller opened: a database through kine-rs's storage trait, or an
/// etcd cluster through kine-rs's etcd proxy.
#[derive(Clone)]
pub enum Store {
    Database(Arc<dyn Backend>),
    Etcd(Arc<EtcdProxy>),
}

impl Store {
    /// Creates the tenant if needed and gives it `quota` and the freeze `frozen`.
    pub async fn ensure(
        &self,
        tenant: &str,
        quota: Quota,
        frozen: bool,
    ) -> Result<KeyspaceState, String> {
        match self {
            Store::Database(backend) => ensure(&**backend, tenant, quota, frozen).await,
            Store::Etcd(proxy) => ensure_etcd(proxy, tenant, quota, frozen).await,
        }
    }

    /// Deletes the tenant and its data; whether it existed.
    pub async fn delete(&self, tenant: &str) -> Result<bool, String> {
        match self {
            Store::Database(backend) => delete(&**backend, tenant).await,
            Store::Etcd(proxy) => proxy
                .delete(tenant, true)
                .await
                .map_err(|e| format!("deleting tenant {tenant}: {e}")),
        }
    }

    /// The database behind a [`Store::Database`]; an etcd cluster has none (the migration
    /// engine does not read or write etcd).
    pub fn database(&self) -> Result<Arc<dyn Backend>, String> {
        match self {
            Store::Database(backend) => Ok(backend.clone()),
            Store::Etcd(_) => {
                Err("the migration engine does not move tenants to or from etcd".into())
            }
        }
    }

    /// Whether the tenant exists.
    pub async fn exists(&self, tenant: &str) -> Result<bool, String> {
        match self {
            Store::Database(backend) => backend
                .keyspace(tenant, false)
                .await
                .map(|id| id.is_some())
                .map_err(|e| format!("finding keyspace {tenant}: {e}")),
            Store::Etcd(proxy) => proxy
                .state(tenant)
                .await
                .map(|state| state.is_some())
                .map_err(|e| format!("finding tenant {tenant}: {e}")),
        }
    }
}

/// Datastores opened by the controller, one per tenant endpoint, kept open (opening runs
/// kine-rs's schema migrations and, on PostgreSQL, starts a listener).
#[derive(Default)]
pub struct Backends {
    open: tokio::sync::Mutex<HashMap<String, Store>>,
}

impl Backends {
    /// The datastore of `endpoint`, with TLS `tls` (keyed by a hash: the map holds no
    /// credentials as keys).
    pub async fn open(
        &self,
        endpoint: &Sensitive,
        tls: Option<&DatastoreTls>,
    ) -> Result<Store, String> {
        let files = match tls {
            Some(tls) => tls.files()?,
            None => TlsFiles::default(),
        };
        let key = key(endpoint, &files);
        let mut open = self.open.lock().await;
        if let Some(store) = open.get(&key) {
            return Ok(store.clone());
        }
        if kine::etcd_proxy::is_etcd_endpoint(endpoint.expose()) {
            let store =
                Store::Etcd(crate::provision::etcd::connect(endpoint.expose(), files).await?);
            open.insert(key, store.clone());
            return Ok(store);
        }
        let options = BackendOptions {
            tls: files,
            ..BackendOptions::default()
        };
        let backend = match tokio::time::timeout(
            OPEN_TIMEOUT,
            kine::storage::open(endpoint.expose(), &options),
        )
        .await
        {
            Ok(Ok(backend)) => backend,
            Ok(Err(e)) => {
                return Err(format!(
                    "cannot open {}: {e}",
                    kine::run::redact_endpoint(endpoint.expose())
                ));
            }
            Err(_) => {
                return Err(format!(
                    "opening {} took longer than {OPEN_TIMEOUT:?}",
                    kine::run::redact_endpoint(endpoint.expose())
                ));
            }
        };
        let store = Store::Database(backend);
        open.insert(key, store.clone());
        Ok(store)
    }

    /// Forgets the backend of `endpoint` (after its database was dropped).
    pub async fn forget(&self, endpoint: &Sensitive, tls: Option<&DatastoreTls>) {
        let files = tls.and_then(|tls| tls.files().ok()).unwrap_or_default();
        self.open.lock().await.remove(&key(endpoint, &files));
    }
}

/// Creates the tenant's keyspace if needed and gives it `quota` and the freeze `frozen`.
pub async fn ensure(
    backend: &dyn Backend,
    tenant: &str,
    quota: Quota,
    frozen: bool,
) -> Result<KeyspaceState, String> {
    let id = backend
        .keyspace(tenant, true)
        .await
        .map_err(|e| format!("creating keyspace {tenant}: {e}"))?
        .ok_or_else(|| format!("keyspace {tenant} could not be created"))?;
    let state = backend
        .state(id)
        .await
        .map_err(|e| format!("reading keyspace {tenant}: {e}"))?;
    match state.migration {
        MigrationRole::Moved => {
            return Err(format!(
                "keyspace {tenant} was moved away from this datastore by a migration"
            ));
        }
        MigrationRole::Importing => {
            return Err(format!(
                "keyspace {tenant} is an unfinished migration import here"
            ));
        }
        MigrationRole::None | MigrationRole::Source => {}
    }
    if state.quota == quota && state.frozen == frozen {
        return Ok(state);
    }
    let mut txn = backend
        .begin_write(id)
        .await
        .map_err(|e| format!("writing keyspace {tenant}: {e}"))?;
    let current = txn.state();
    if current.frozen != frozen {
        txn.set_frozen(frozen)
            .await
            .map_err(|e| format!("setting the freeze of {tenant}: {e}"))?;
    }
    if current.quota != quota {
        txn.set_quota(quota)
            .await
            .map_err(|e| format!("setting the quota of {tenant}: {e}"))?;
    }
    txn.commit(current.revision)
        .await
        .map_err(|e| format!("committing keyspace {tenant}: {e}"))?;
    backend
        .state(id)
        .await
        .map_err(|e| format!("reading keyspace {tenant}: {e}"))
}

/// The etcd counterpart of [`ensure`]: registers the tenant (its records under
/// `/_kine-rs/`) with `quota`, and sets its quota and freeze records when they differ.
pub async fn ensure_etcd(
    proxy: &EtcdProxy,
    tenant: &str,
    quota: Quota,
    frozen: bool,
) -> Result<KeyspaceState, String> {
    proxy
        .create(tenant, Some(quota))
        .await
        .map_err(|e| format!("registering tenant {tenant}: {e}"))?;
    let read = || async {
        proxy
            .state(tenant)
            .await
            .map_err(|e| format!("reading tenant {tenant}: {e}"))?
            .ok_or_else(|| format!("tenant {tenant} could not be registered"))
    };
    let state = read().await?;
    if state.quota == quota && state.frozen == frozen {
        return Ok(state);
    }
    let served = proxy
        .get(tenant, false)
        .await
        .map_err(|e| format!("opening tenant {tenant}: {e}"))?
        .ok_or_else(|| format!("tenant {tenant} is not registered"))?;
    if state.frozen != frozen {
        served
            .set_frozen(frozen)
            .await
            .map_err(|e| format!("setting the freeze of {tenant}: {e}"))?;
    }
    if state.quota != quota {
        served
            .set_quota(quota)
            .await
            .map_err(|e| format!("setting the quota of {tenant}: {e}"))?;
    }
    read().await
}

/// Deletes the tenant's keyspace and its data; whether it existed.
pub async fn delete(backend: &dyn Backend, tenant: &str) -> Result<bool, String> {
    let Some(id) = backend
        .keyspace(tenant, false)
        .await
        .map_err(|e| format!("finding keyspace {tenant}: {e}"))?
    else {
        return Ok(false);
    };
    backend
        .delete_keyspace(id)
        .await
        .map_err(|e| format!("deleting keyspace {tenant}: {e}"))
}
