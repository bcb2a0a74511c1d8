//! Moving a tenant to another DataStore when its binding's `spec.dataStore` changes: the
//! kine-rs migration engine ([`kine::migrate`]) runs in the controller's process (snapshot,
//! tail, a short freeze, verify, switch; revisions kept), with its progress written to the
//! binding's `status.migration` about once a second. The caller then rewires the workload to
//! the target. A failed migration is rolled back with the engine's abort (the source
//! unfrozen and unpinned, the target's partial import removed): the tenant stays on its old
//! store, writable.
//!
//! A migration runs inside the binding's reconcile (kube-runtime never reconciles one object
//! twice at once); a controller restarted mid-way runs it again, and the engine resumes from
//! its checkpoint.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kine::migrate::{Options, Progress, Summary};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tracing::{info, warn};

use crate::crd::{MigrationStatus, TenantDatastore, TenantDatastoreStatus};
use crate::credentials::Sensitive;
use crate::{Context, FIELD_MANAGER};

/// How often progress is written to the status.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// One migration to run.
pub struct Move<'a> {
    pub tenant: &'a str,
    pub from: &'a str,
    pub to: &'a str,
    pub source: &'a Sensitive,
    pub target: &'a Sensitive,
    pub source_tls: Option<&'a crate::datastore_tls::DatastoreTls>,
    pub target_tls: Option<&'a crate::datastore_tls::DatastoreTls>,
}

fn progress_status(base: &MigrationStatus, p: &Progress) -> MigrationStatus {
    MigrationStatus {
        phase: p.phase.name().to_string(),
        keys: p.keys,
        keys_total: p.keys_total,
        events: p.events,
        applied_revision: p.applied_revision,
        source_revision: p.source_revision,
        ..base.clone()
    }
}

/// Writes `status` (with `migration`) to the binding's status.
pub async fn write_status(
    ctx: &Context,
    namespace: &str,
    name: &str,
    status: &TenantDatastoreStatus,
) -> Result<(), kube::Error> {
    let api: Api<TenantDatastore> = Api::namespaced(ctx.client.clone(), namespace);
    let patch = json!({
        "apiVersion": "kine-rs.io/v1alpha1",
        "kind": "TenantDatastore",
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map(|_| ())
}

/// Runs the migration, reporting progress in the binding's status (`status` is the status
/// to show around it). Errors are messages without credentials.
pub async fn run(
    ctx: &Context,
    namespace: &str,
    name: &str,
    status: &TenantDatastoreStatus,
    job: Move<'_>,
) -> Result<Summary, String> {
    let source = ctx
        .backends
        .open(job.source, job.source_tls)
        .await?
        .database()?;
    let target = ctx
        .backends
        .open(job.target, job.target_tls)
        .await?
        .database()?;
    let mut options = Options::new(job.tenant);
    options.source_name = format!("DataStore {}", job.from);
    options.target_name = format!("DataStore {}", job.to);

    let base = status.migration.clone().unwrap_or_default();
    let latest: Arc<Mutex<Option<Progress>>> = Arc::default();
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let reporter = {
        let latest = latest.clone();
        let status = status.clone();
        let base = base.clone();
        let (namespace, name) = (namespace.to_string(), name.to_string());
        let client = ctx.client.clone();
        tokio::spawn(async move {
            let mut written: Option<(String, u64, u64, i64)> = None;
            loop {
                let stop = tokio::select! {
                    _ = tokio::time::sleep(PROGRESS_INTERVAL) => false,
                    _ = &mut stop_rx => true,
                };
                let progress = latest.lock().ok().and_then(|p| p.clone());
                if let Some(p) = progress {
                    let key = (
                        p.phase.name().to_string(),
                        p.keys,
                        p.events,
                        p.applied_revision,
                    );
                    if written.as_ref() != Some(&key) {
                        let mut status = status.clone();
                        status.migration = Some(progress_status(&base, &p));
                        let api: Api<TenantDatastore> = Api::namespaced(client.clone(), &namespace);
                        let patch = json!({
                            "apiVersion": "kine-rs.io/v1alpha1",
                            "kind": "TenantDatastore",
                            "status": status,
                        });
                        if let Err(e) = api
                            .patch_status(
                                &name,
                                &PatchParams::apply(FIELD_MANAGER).force(),
                                &Patch::Apply(&patch),
                            )
                            .await
                        {
                            warn!(error = %e, "cannot write migration progress");
                        }
                        written = Some(key);
                    }
                }
                if stop {
                    break;
                }
            }
        })
    };
    let mut report = {
        let latest = latest.clone();
        move |p: &Progress| {
            if let Ok(mut slot) = latest.lock() {
                *slot = Some(p.clone());
            }
        }
    };
    info!(
        tenant = job.tenant,
        from = job.from,
        to = job.to,
        "migration starts"
    );
    let result = kine::migrate::run(&*source, &*target, &options, &mut report).await;
    let _ = stop_tx.send(());
    let _ = reporter.await;
    match result {
        Ok(summary) => {
            info!(
                tenant = job.tenant,
                keys = summary.keys,
                events = summary.events,
                revision = summary.revision,
                freeze_ms = summary.freeze_window.as_millis() as u64,
                "migration done"
            );
            Ok(summary)
        }
        Err(error) => {
            let message = error.to_string();
            warn!(tenant = job.tenant, %message, "migration failed; rolling back");
            if let Err(abort) = kine::migrate::abort(&*source, &*target, job.tenant).await {
                warn!(tenant = job.tenant, error = %abort, "rolling the migration back failed");
                return Err(format!("{message}; rolling back also failed: {abort}"));
            }
            Err(message)
        }
    }
}
