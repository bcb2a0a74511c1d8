//! The DataStore reconciler: checks that the datastore answers and takes its admin login
//! (condition `Ready` with a reason: `Reachable`, `Unreachable`, `CredentialsUnavailable`,
//! `AuthNotSupported` (etcd with `basicAuth`); in Gateway mode
//! `CertificateAuthorityInvalid` and `AdminAccessDenied`), counts the tenants placed on
//! it (`usedBy`, `tenants`, `bytes`), and, with a finalizer, refuses its deletion while
//! tenants use it (condition `DeletionBlocked` names them). A store that does not answer is
//! retried every 15 seconds: a status, never a crash loop.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{info, instrument, warn};

use crate::crd::{DataStore, DataStoreStatus, Driver, Mode, TenantDatastore, set_condition};
use crate::error::{Error, Result};
use crate::gateway::Gateway;
use crate::metrics::StoreLabels;
use crate::{Context, FIELD_MANAGER, credentials, provision};

/// The finalizer that keeps a DataStore while tenants use it.
pub const FINALIZER: &str = "kine-rs.io/datastore-protection";

const READY_REQUEUE: Duration = Duration::from_secs(60);
const NOT_READY_REQUEUE: Duration = Duration::from_secs(15);

/// Reconciles a DataStore.
#[instrument(skip(store, ctx), fields(datastore = %store.name_any()))]
pub async fn reconcile(store: Arc<DataStore>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.reconciled("DataStore");
    let api: Api<DataStore> = Api::all(ctx.client.clone());
    finalizer(&api, FINALIZER, store, |event| async {
        match event {
            Finalizer::Apply(store) => apply(&store, &ctx).await,
            Finalizer::Cleanup(store) => cleanup(&store, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    })
}

/// What the controller does when a reconcile fails: log, count, retry later.
pub fn error_policy(store: Arc<DataStore>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(datastore = %store.name_any(), %error, "reconcile failed");
    ctx.metrics.failed("DataStore", error.metric_label());
    Action::requeue(NOT_READY_REQUEUE)
}

/// The bindings whose tenant lives on `name`, as `namespace/name`, and their bytes.
pub async fn users(ctx: &Context, name: &str) -> Result<(Vec<String>, i64)> {
    let bindings: Api<TenantDatastore> = Api::all(ctx.client.clone());
    let mut users = Vec::new();
    let mut bytes = 0;
    for binding in bindings.list(&ListParams::default()).await? {
        let status = binding.status.clone().unwrap_or_default();
        let on_it = status.current_data_store.as_deref() == Some(name)
            || status
                .migration
                .as_ref()
                .is_some_and(|m| m.to == name && m.phase != "done" && m.phase != "failed");
        if on_it {
            users.push(format!(
                "{}/{}",
                binding.namespace().unwrap_or_default(),
                binding.name_any()
            ));
            bytes += status.bytes;
        }
    }
    users.sort();
    Ok((users, bytes))
}

/// Why the store cannot be used, if it cannot: (reason, message).
async fn check(store: &DataStore, ctx: &Context) -> Option<(&'static str, String)> {
    if store.spec.mode == Mode::Gateway {
        let gateway = match Gateway::of(&ctx.client, store).await {
            Ok(gateway) => gateway,
            Err(problem) => return Some((problem.reason, problem.message)),
        };
        return gateway
            .check()
            .await
            .err()
            .map(|problem| (problem.reason, problem.message));
    }
    let admin = match credentials::admin_login(&ctx.client, store).await {
        Ok(admin) => admin,
        Err(e) => return Some(("CredentialsUnavailable", e.to_string())),
    };
    if store.spec.driver == Driver::Etcd
        && let Err(e) = provision::etcd::supported(&admin)
    {
        return Some(("AuthNotSupported", e));
    }
    match provision::check(&admin).await {
        Ok(()) => None,
        Err(e) => Some(("Unreachable", e)),
    }
}

async fn apply(store: &DataStore, ctx: &Context) -> Result<Action> {
    let name = store.name_any();
    let problem = check(store, ctx).await;
    let (used_by, bytes) = users(ctx, &name).await?;
    let mut status = store.status.clone().unwrap_or_default();
    let generation = store.meta().generation;
    let ready = problem.is_none();
    match &problem {
        None => set_condition(
            &mut status.conditions,
            "Ready",
            true,
            "Reachable",
            if store.spec.mode == Mode::Gateway {
                format!(
                    "the kine-rs gateway at {} answers and takes the controller's admin \
                     certificate",
                    store.spec.endpoints.join(", ")
                )
            } else {
                format!(
                    "{} at {} answers and takes the admin login",
                    store.spec.driver.as_str(),
                    store.spec.endpoints.first().cloned().unwrap_or_default()
                )
            },
            generation,
        ),
        Some((reason, message)) => {
            set_condition(
                &mut status.conditions,
                "Ready",
                false,
                reason,
                message.clone(),
                generation,
            );
        }
    }
    status.ready = ready;
    status.tenants = u32::try_from(used_by.len()).unwrap_or(u32::MAX);
    status.used_by = used_by;
    status.bytes = bytes;
    status.observed_generation = generation;
    ctx.metrics
        .tenants
        .get_or_create(&StoreLabels {
            datastore: name.clone(),
        })
        .set(i64::from(status.tenants));
    patch_status(ctx, &name, &status).await?;
    if let Some((reason, message)) = problem {
        info!(reason, %message, "datastore not ready");
        return Ok(Action::requeue(NOT_READY_REQUEUE));
    }
    Ok(Action::requeue(READY_REQUEUE))
}

async fn cleanup(store: &DataStore, ctx: &Context) -> Result<Action> {
    let name = store.name_any();
    let (used_by, _) = users(ctx, &name).await?;
    if used_by.is_empty() {
        info!("datastore no longer in use: deletion proceeds");
        return Ok(Action::await_change());
    }
    let mut status = store.status.clone().unwrap_or_default();
    let users = used_by.join(", ");
    set_condition(
        &mut status.conditions,
        "DeletionBlocked",
        true,
        "InUse",
        format!("used by {users}: delete or move those TenantDatastores first"),
        store.meta().generation,
    );
    status.used_by = used_by;
    patch_status(ctx, &name, &status).await?;
    Err(Error::InUse { name, users })
}

async fn patch_status(ctx: &Context, name: &str, status: &DataStoreStatus) -> Result<()> {
    let api: Api<DataStore> = Api::all(ctx.client.clone());
    let patch = json!({
        "apiVersion": "kine-rs.io/v1alpha1",
        "kind": "DataStore",
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}
