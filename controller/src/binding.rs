//! The TenantDatastore reconciler: places the tenant (the binding's `dataStore`, or the
//! [`scheduler`](crate::scheduler)'s pick), then per the DataStore's mode:
//! * Sidecar: provisions its database and login ([`provision`]), creates its keyspace with
//!   its quota and freeze ([`tenant`]), writes the connection Secret `<binding>-kine-rs`
//!   (keys `endpoint`, `tenant`, `password`, `dataStore`) and wires a kine-rs sidecar;
//! * Gateway: creates the tenant with its quota and freeze through the gateway's admin API
//!   ([`gateway`](crate::gateway)), issues its client certificate with the DataStore's CA
//!   (CN = tenant; re-issued after two thirds of its lifetime, [`certificates`]), writes the
//!   Secret (keys `endpoint`, `tenant`, `dataStore`, `ca.crt`, `tls.crt`, `tls.key`) and wires
//!   kube-apiserver to the gateway with those files ([`wiring`]).
//!
//! A change of `spec.dataStore` migrates the tenant first ([`migration`]; sidecar stores
//! other than etcd only).
//!
//! Waiting is a status, not an error: a missing DataStore (`DataStoreNotFound`), one not
//! Ready (`DataStoreNotReady`), no store with room (`NoDataStoreAvailable`), a missing
//! workload (`WorkloadNotFound`) are conditions with a reason, retried every 15 seconds.
//!
//! Deletion (finalizer `kine-rs.io/tenant-cleanup`): with `deletionPolicy: Delete` the
//! tenant's keyspace, database and login are dropped (on its current store, and on the store
//! a finished migration moved it from); with `Retain` (default) nothing is dropped. The
//! workload's wiring is left as it is in both cases.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Container, PodSpec, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use tracing::{info, instrument, warn};

use crate::crd::{
    DataStore, DeletionPolicy, Driver, MigrationStatus, Mode, Phase, TenantDatastore,
    TenantDatastoreStatus, WorkloadKind, set_condition,
};
use crate::credentials::{self, Sensitive};
use crate::error::{Error, Result};
use crate::gateway::Gateway;
use crate::provision::{self, TenantLogin};
use crate::wiring::{self, SECRET_ENDPOINT_KEY, SECRET_TENANT_KEY, WIRING_MANAGER};
use crate::{Context, FIELD_MANAGER, certificates, migration, scheduler};

/// The finalizer that cleans up a tenant per its deletion policy.
pub const FINALIZER: &str = "kine-rs.io/tenant-cleanup";
const SECRET_PASSWORD_KEY: &str = "password";
const SECRET_DATASTORE_KEY: &str = "dataStore";
const SECRET_TARGET_PASSWORD_KEY: &str = "migrationPassword";
const SECRET_TARGET_DATASTORE_KEY: &str = "migrationDataStore";

const WAIT_REQUEUE: Duration = Duration::from_secs(15);
const READY_REQUEUE: Duration = Duration::from_secs(300);

/// The Secret of a binding.
pub fn secret_name(binding: &str) -> String {
    format!("{binding}-kine-rs")
}

/// The tenant name of a binding: `spec.tenant`, else the one already chosen, else
/// `t-<uid>` (the object's UID is unique, unlike `<namespace>_<name>`, which collides).
pub fn tenant_name(binding: &TenantDatastore) -> Result<String> {
    let status = binding.status.clone().unwrap_or_default();
    let name = match (&binding.spec.tenant, status.tenant) {
        (Some(name), _) => name.clone(),
        (None, Some(name)) => name,
        (None, None) => {
            let uid = binding
                .meta()
                .uid
                .clone()
                .ok_or_else(|| Error::Invalid("the binding has no UID yet".into()))?;
            format!("t-{}", uid.to_ascii_lowercase())
        }
    };
    kine::tenants::validate_name(&name).map_err(|e| Error::Invalid(format!("spec.tenant: {e}")))?;
    Ok(name)
}

/// Reconciles a TenantDatastore.
#[instrument(skip(binding, ctx), fields(binding = %binding.name_any(), namespace = binding.namespace().unwrap_or_default()))]
pub async fn reconcile(binding: Arc<TenantDatastore>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.reconciled("TenantDatastore");
    let namespace = binding
        .namespace()
        .ok_or_else(|| Error::Invalid("a TenantDatastore is namespaced".into()))?;
    let api: Api<TenantDatastore> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, FINALIZER, binding, |event| async {
        match event {
            Finalizer::Apply(binding) => apply(&binding, &ctx).await,
            Finalizer::Cleanup(binding) => cleanup(&binding, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    })
}

/// Logs, counts and retries a failed reconcile.
pub fn error_policy(binding: Arc<TenantDatastore>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(binding = %binding.name_any(), %error, "reconcile failed");
    ctx.metrics.failed("TenantDatastore", error.metric_label());
    Action::requeue(WAIT_REQUEUE)
}

/// One reconcile of one binding.
struct Run<'a> {
    ctx: &'a Context,
    binding: &'a TenantDatastore,
    namespace: String,
    name: String,
    generation: Option<i64>,
    status: TenantDatastoreStatus,
}

impl Run<'_> {
    async fn write_status(&self) -> Result<()> {
        migration::write_status(self.ctx, &self.namespace, &self.name, &self.status).await?;
        Ok(())
    }

    /// Records a condition `Ready=False` with `reason` and retries later.
    async fn wait(&mut self, phase: Phase, reason: &str, message: String) -> Result<Action> {
        info!(reason, %message, "waiting");
        self.status.phase = phase;
        set_condition(
            &mut self.status.conditions,
            "Ready",
            false,
            reason,
            message,
            self.generation,
        );
        self.status.observed_generation = self.generation;
        self.write_status().await?;
        Ok(Action::requeue(WAIT_REQUEUE))
    }

    async fn event(&self, type_: EventType, reason: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.to_string(),
            note: Some(note),
            action: "Reconcile".to_string(),
            secondary: None,
        };
        if let Err(e) = self
            .ctx
            .recorder
            .publish(&event, &self.binding.object_ref(&()))
            .await
        {
            warn!(error = %e, "cannot publish an event");
        }
    }
}

/// The binding (`namespace/name`) other than `binding` whose tenant is `tenant`, if any.
async fn claimed_by_another(
    ctx: &Context,
    binding: &TenantDatastore,
    tenant: &str,
) -> Result<Option<String>> {
    let all: Api<TenantDatastore> = Api::all(ctx.client.clone());
    let uid = binding.meta().uid.clone();
    for other in all.list(&ListParams::default()).await? {
        if other.meta().uid == uid {
            continue;
        }
        let claimed = other.spec.tenant.as_deref() == Some(tenant)
            || other.status.as_ref().and_then(|s| s.tenant.as_deref()) == Some(tenant);
        if claimed {
            return Ok(Some(format!(
                "{}/{}",
                other.namespace().unwrap_or_default(),
                other.name_any()
            )));
        }
    }
    Ok(None)
}

async fn get_store(ctx: &Context, name: &str) -> Result<Option<DataStore>> {
    let stores: Api<DataStore> = Api::all(ctx.client.clone());
    Ok(stores.get_opt(name).await?)
}

fn secret_value(secret: Option<&Secret>, key: &str) -> Option<String> {
    secret
        .and_then(|s| s.data.as_ref())
        .and_then(|d| d.get(key))
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
}

async fn apply(cached: &TenantDatastore, ctx: &Context) -> Result<Action> {
    // The watch cache may lag behind this controller's own status writes (a reconcile
    // queued before the last one finished sees the older object): read the binding afresh,
    // so a tenant is never scheduled twice nor a migration started from stale status.
    let api: Api<TenantDatastore> =
        Api::namespaced(ctx.client.clone(), &cached.namespace().unwrap_or_default());
    let Some(fresh) = api.get_opt(&cached.name_any()).await? else {
        return Ok(Action::await_change());
    };
    let binding = &fresh;
    let mut run = Run {
        ctx,
        binding,
        namespace: binding.namespace().unwrap_or_default(),
        name: binding.name_any(),
        generation: binding.meta().generation,
        status: binding.status.clone().unwrap_or_default(),
    };
    let tenant = match tenant_name(binding) {
        Ok(tenant) => tenant,
        Err(e) => {
            return run
                .wait(Phase::Failed, "InvalidTenant", e.to_string())
                .await;
        }
    };
    run.status.tenant = Some(tenant.clone());
    // A tenant name is one binding's: another binding naming the same tenant (`spec.tenant`
    // is free text) would take over its login, keyspace or client certificate.
    if let Some(other) = claimed_by_another(ctx, binding, &tenant).await? {
        return run
            .wait(
                Phase::Failed,
                "TenantInUse",
                format!("tenant {tenant} belongs to TenantDatastore {other}"),
            )
            .await;
    }
    let secret_name = secret_name(&run.name);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &run.namespace);
    let secret = secrets.get_opt(&secret_name).await?;

    // Which store the tenant should be on.
    let desired = match (&binding.spec.data_store, &run.status.current_data_store) {
        (Some(store), _) => store.clone(),
        (None, Some(current)) => current.clone(),
        (None, None) => {
            let stores: Api<DataStore> = Api::all(ctx.client.clone());
            let stores = stores.list(&ListParams::default()).await?.items;
            match scheduler::pick(&stores, binding.spec.data_store_selector.as_ref()) {
                Ok(store) => {
                    let seen: Vec<String> = stores
                        .iter()
                        .map(|s| {
                            let st = s.status.clone().unwrap_or_default();
                            format!(
                                "{} (ready {}, tenants {})",
                                s.name_any(),
                                st.ready,
                                st.tenants
                            )
                        })
                        .collect();
                    info!(datastore = %store.name_any(), candidates = ?seen, "scheduled");
                    store.name_any()
                }
                Err(scheduler::NoStore(why)) => {
                    return run
                        .wait(Phase::Provisioning, "NoDataStoreAvailable", why)
                        .await;
                }
            }
        }
    };
    let Some(desired_store) = get_store(ctx, &desired).await? else {
        let phase = run.status.phase;
        return run
            .wait(
                phase,
                "DataStoreNotFound",
                format!("DataStore {desired} does not exist"),
            )
            .await;
    };
    if !desired_store.status.as_ref().is_some_and(|s| s.ready) {
        let why = desired_store
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
            .map(|c| format!("{}: {}", c.reason, c.message))
            .unwrap_or_else(|| "not checked yet".into());
        let phase = run.status.phase;
        return run
            .wait(
                phase,
                "DataStoreNotReady",
                format!("DataStore {desired} is not Ready ({why})"),
            )
            .await;
    }

    // A move to another store first.
    let mut target_password: Option<(String, Sensitive)> = None;
    if let Some(current) = run.status.current_data_store.clone()
        && current != desired
    {
        let failed_before = run
            .status
            .migration
            .as_ref()
            .is_some_and(|m| m.to == desired && m.failed_generation == run.generation);
        if !failed_before {
            match migrate(&mut run, &tenant, &current, &desired_store, secret.as_ref()).await? {
                Ok(password) => {
                    run.status.current_data_store = Some(desired.clone());
                    target_password = Some((desired.clone(), password));
                }
                Err(action) => return Ok(action),
            }
        }
    }
    let store_name = run
        .status
        .current_data_store
        .clone()
        .unwrap_or(desired.clone());
    let store = if store_name == desired {
        desired_store
    } else {
        match get_store(ctx, &store_name).await? {
            Some(store) => store,
            None => {
                return run
                    .wait(
                        Phase::Failed,
                        "DataStoreNotFound",
                        format!("the current DataStore {store_name} does not exist"),
                    )
                    .await;
            }
        }
    };

    // Provision the tenant: what its Secret holds and how the workload is wired.
    let first_time = run.status.current_data_store.is_none();
    if first_time {
        run.status.phase = Phase::Provisioning;
    }
    let quota = binding.spec.quota.unwrap_or_default();
    let quota = kine::storage::Quota {
        keys: quota.keys.unwrap_or(0),
        bytes: quota.bytes.unwrap_or(0),
    };
    let prepared = if store.spec.mode == Mode::Gateway {
        prepare_gateway(&mut run, &store, &tenant, quota, secret.as_ref()).await?
    } else {
        prepare_sidecar(
            &mut run,
            &store,
            &tenant,
            quota,
            secret.as_ref(),
            target_password,
        )
        .await?
    };
    let prepared = match prepared {
        Ok(prepared) => prepared,
        Err(action) => return Ok(action),
    };
    run.status.current_data_store = Some(store_name.clone());

    // The Secret.
    if let Some(owner) = binding.controller_owner_ref(&()) {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(secret_name.clone()),
                namespace: Some(run.namespace.clone()),
                owner_references: Some(vec![owner]),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_string(),
                    FIELD_MANAGER.to_string(),
                )])),
                ..Default::default()
            },
            type_: Some("Opaque".into()),
            data: Some(
                prepared
                    .data
                    .iter()
                    .map(|(k, v)| (k.clone(), ByteString(v.expose().as_bytes().to_vec())))
                    .collect(),
            ),
            ..Default::default()
        };
        let mut body = serde_json::to_value(&secret)?;
        body["apiVersion"] = "v1".into();
        body["kind"] = "Secret".into();
        secrets
            .patch(
                &secret_name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await?;
    }
    run.status.secret_name = Some(secret_name.clone());
    if first_time {
        run.event(
            EventType::Normal,
            "Provisioned",
            format!("tenant {tenant} provisioned on DataStore {store_name}"),
        )
        .await;
    }

    // The workload.
    let target = &binding.spec.api_server;
    let pod: Option<PodSpec> = match target.kind {
        WorkloadKind::Deployment => {
            Api::<Deployment>::namespaced(ctx.client.clone(), &run.namespace)
                .get_opt(&target.name)
                .await?
                .and_then(|d| d.spec)
                .and_then(|s| s.template.spec)
        }
        WorkloadKind::StatefulSet => {
            Api::<StatefulSet>::namespaced(ctx.client.clone(), &run.namespace)
                .get_opt(&target.name)
                .await?
                .and_then(|d| d.spec)
                .and_then(|s| s.template.spec)
        }
    };
    let Some(pod) = pod else {
        return run
            .wait(
                Phase::Provisioning,
                "WorkloadNotFound",
                format!(
                    "{:?} {}/{} does not exist (the tenant is provisioned; it is wired once the \
                     workload exists)",
                    target.kind, run.namespace, target.name
                ),
            )
            .await;
    };
    let container = match wiring::apiserver_container(&pod, target.container.as_deref()) {
        Ok(container) => container,
        Err(e) => {
            return run
                .wait(
                    Phase::Failed,
                    "WorkloadInvalid",
                    format!("{:?} {}: {e}", target.kind, target.name),
                )
                .await;
        }
    };
    let existing = container.args.as_deref().unwrap_or_default();
    let workload = wiring::WorkloadRef {
        kind: target.kind,
        name: &target.name,
        namespace: &run.namespace,
        container: &container.name,
    };
    let patch = match &prepared.wiring {
        Wired::Sidecar {
            sidecar,
            tls_keys,
            checksum,
        } => wiring::workload_patch(
            workload,
            &wiring::apiserver_args(existing),
            sidecar,
            &secret_name,
            tls_keys,
            checksum,
        ),
        Wired::Gateway { servers, checksum } => wiring::gateway_patch(
            workload,
            &wiring::replace_etcd_args(existing, &wiring::gateway_etcd_args(servers)),
            &secret_name,
            checksum,
        ),
    };
    let params = PatchParams::apply(WIRING_MANAGER).force();
    match target.kind {
        WorkloadKind::Deployment => {
            Api::<Deployment>::namespaced(ctx.client.clone(), &run.namespace)
                .patch(&target.name, &params, &Patch::Apply(&patch))
                .await?;
        }
        WorkloadKind::StatefulSet => {
            Api::<StatefulSet>::namespaced(ctx.client.clone(), &run.namespace)
                .patch(&target.name, &params, &Patch::Apply(&patch))
                .await?;
        }
    }

    // Done.
    let frozen = !binding.spec.writable;
    run.status.phase = if frozen { Phase::Frozen } else { Phase::Ready };
    set_condition(
        &mut run.status.conditions,
        "Ready",
        true,
        if frozen { "Frozen" } else { "Wired" },
        format!(
            "tenant {tenant} on DataStore {store_name}, {:?} {} wired{}",
            target.kind,
            target.name,
            if frozen {
                "; writes refused (writable: false)"
            } else {
                ""
            }
        ),
        run.generation,
    );
    run.status.observed_generation = run.generation;
    run.write_status().await?;
    Ok(Action::requeue(prepared.requeue.min(READY_REQUEUE)))
}

/// How the workload is wired.
enum Wired {
    /// A kine-rs sidecar; the checksum of its configuration.
    Sidecar {
        sidecar: Box<Container>,
        /// The Secret keys of the datastore's TLS files the sidecar mounts.
        tls_keys: Vec<&'static str>,
        checksum: String,
    },
    /// The gateway's addresses (`--etcd-servers`) and the checksum of the connection.
    Gateway { servers: String, checksum: String },
}

/// A provisioned tenant: its Secret's data, its wiring, when to look again.
struct Prepared {
    data: BTreeMap<String, Sensitive>,
    wiring: Wired,
    requeue: Duration,
}

/// Sidecar mode: the tenant's database and login, its keyspace with quota and freeze (through
/// the kine-rs library), the sidecar. `Ok(Err(action))`: waiting (status written).
async fn prepare_sidecar(
    run: &mut Run<'_>,
    store: &DataStore,
    tenant: &str,
    quota: kine::storage::Quota,
    secret: Option<&Secret>,
    target_password: Option<(String, Sensitive)>,
) -> Result<Result<Prepared, Action>> {
    let ctx = run.ctx;
    let store_name = store.name_any();
    let admin = match credentials::admin_login(&ctx.client, store).await {
        Ok(admin) => admin,
        Err(e) => {
            return Ok(Err(run
                .wait(Phase::Failed, "CredentialsUnavailable", e.to_string())
                .await?));
        }
    };
    let password = match target_password {
        Some((store, password)) if store == store_name => password,
        _ => match (
            secret_value(secret, SECRET_DATASTORE_KEY),
            secret_value(secret, SECRET_PASSWORD_KEY),
        ) {
            (Some(store), Some(password)) if store == store_name => Sensitive(password),
            _ => provision::random_password(),
        },
    };
    let login = TenantLogin::new(tenant, password);
    if let Err(e) = provision::ensure(&admin, &login).await {
        return Ok(Err(run
            .wait(
                Phase::Failed,
                "ProvisioningFailed",
                format!("DataStore {store_name}: {e}"),
            )
            .await?));
    }
    let endpoint = provision::tenant_endpoint(&admin, &login);
    let frozen = !run.binding.spec.writable;
    let keyspace = async {
        let opened = ctx.backends.open(&endpoint, admin.tls.as_ref()).await?;
        opened.ensure(tenant, quota, frozen).await
    };
    let state = match keyspace.await {
        Ok(state) => state,
        Err(e) => {
            return Ok(Err(run
                .wait(
                    Phase::Failed,
                    "TenantFailed",
                    format!("DataStore {store_name}: {e}"),
                )
                .await?));
        }
    };
    run.status.keys = state.keys;
    run.status.bytes = state.bytes;
    if matches!(store.spec.driver, Driver::PostgreSQL | Driver::MySQL) {
        run.status.database = Some(login.database.clone());
        run.status.user = Some(login.user.clone());
    } else {
        run.status.database = None;
        run.status.user = None;
    }
    run.status.certificate_not_after = None;
    run.status.certificate_renewal = None;
    let sidecar =
        wiring::sidecar_container(&ctx.sidecar, &secret_name(&run.name), admin.tls.as_ref());
    let mut data = BTreeMap::from([
        (SECRET_ENDPOINT_KEY.to_string(), endpoint),
        (SECRET_TENANT_KEY.to_string(), Sensitive(tenant.to_string())),
        (SECRET_PASSWORD_KEY.to_string(), login.password.clone()),
        (SECRET_DATASTORE_KEY.to_string(), Sensitive(store_name)),
    ]);
    if let Some(tls) = &admin.tls {
        data.extend(tls.secret_data());
    }
    let checksum = wiring::checksum(&data, &sidecar);
    Ok(Ok(Prepared {
        data,
        wiring: Wired::Sidecar {
            sidecar: Box::new(sidecar),
            tls_keys: admin
                .tls
                .as_ref()
                .map(|tls| tls.mounted_keys())
                .unwrap_or_default(),
            checksum,
        },
        requeue: READY_REQUEUE,
    }))
}

/// Gateway mode: the tenant made (with quota and freeze) through the gateway's admin API,
/// its client certificate issued by the DataStore's CA (CN = tenant) or kept until two
/// thirds of its lifetime. `Ok(Err(action))`: waiting (status written).
async fn prepare_gateway(
    run: &mut Run<'_>,
    store: &DataStore,
    tenant: &str,
    quota: kine::storage::Quota,
    secret: Option<&Secret>,
) -> Result<Result<Prepared, Action>> {
    let ctx = run.ctx;
    let store_name = store.name_any();
    let gateway = match Gateway::of(&ctx.client, store).await {
        Ok(gateway) => gateway,
        Err(problem) => {
            return Ok(Err(run
                .wait(Phase::Failed, problem.reason, problem.message)
                .await?));
        }
    };
    // A tenant certificate whose CN is the controller's admin identity would be an admin
    // certificate of the gateway.
    if gateway.admin_identity().as_deref() == Some(tenant) {
        return Ok(Err(run
            .wait(
                Phase::Failed,
                "InvalidTenant",
                format!(
                    "tenant {tenant} is the admin identity of DataStore {store_name}'s gateway"
                ),
            )
            .await?));
    }
    let status = match gateway
        .ensure_tenant(tenant, quota, !run.binding.spec.writable)
        .await
    {
        Ok(status) => status,
        Err(e) => {
            return Ok(Err(run
                .wait(
                    Phase::Failed,
                    "TenantFailed",
                    format!("DataStore {store_name}: {e}"),
                )
                .await?));
        }
    };
    run.status.keys = status.keys;
    run.status.bytes = status.bytes;
    run.status.database = None;
    run.status.user = None;

    // The certificate: kept while valid for this tenant and CA, else issued.
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    let current_ca = secret_value(secret, wiring::SECRET_CA_KEY);
    let current_cert = secret_value(secret, wiring::SECRET_CERT_KEY);
    let current_key = secret_value(secret, wiring::SECRET_KEY_KEY);
    let decision = if current_ca.as_deref() != Some(gateway.authority.certificate_pem.as_str())
        || current_key.is_none()
    {
        certificates::Renewal::Issue("the Secret does not hold this CA's certificate".into())
    } else {
        certificates::renewal(&gateway.authority, current_cert.as_deref(), tenant, now)
    };
    let (certificate, key, not_after, renew_at) = match (decision, current_cert, current_key) {
        (
            certificates::Renewal::Keep {
                renew_at,
                not_after,
            },
            Some(cert),
            Some(key),
        ) => (cert, Sensitive(key), not_after, renew_at),
        (decision, _, _) => {
            let issued = match gateway.authority.issue(tenant, gateway.lifetime) {
                Ok(issued) => issued,
                Err(e) => {
                    return Ok(Err(run
                        .wait(Phase::Failed, "CertificateAuthorityInvalid", e)
                        .await?));
                }
            };
            let why = match decision {
                certificates::Renewal::Issue(why) => why,
                certificates::Renewal::Keep { .. } => "the Secret misses it".into(),
            };
            info!(%tenant, reason = %why, "client certificate issued");
            let not_after = issued.not_after.unix_timestamp();
            let lifetime = i64::try_from(gateway.lifetime.as_secs()).unwrap_or(i64::MAX);
            let renew_at = not_after - lifetime / 3;
            if !first_issue(secret) {
                run.event(
                    EventType::Normal,
                    "CertificateRotated",
                    format!("client certificate of tenant {tenant} re-issued: {why}"),
                )
                .await;
            }
            (issued.certificate_pem, issued.key_pem, not_after, renew_at)
        }
    };
    run.status.certificate_not_after = Some(certificates::rfc3339(not_after));
    run.status.certificate_renewal = Some(certificates::rfc3339(renew_at));
    let servers = gateway.etcd_servers();
    let checksum = wiring::gateway_checksum(&servers, tenant, &gateway.authority.certificate_pem);
    let data = BTreeMap::from([
        (SECRET_ENDPOINT_KEY.to_string(), Sensitive(servers.clone())),
        (SECRET_TENANT_KEY.to_string(), Sensitive(tenant.to_string())),
        (SECRET_DATASTORE_KEY.to_string(), Sensitive(store_name)),
        (
            wiring::SECRET_CA_KEY.to_string(),
            Sensitive(gateway.authority.certificate_pem.clone()),
        ),
        (wiring::SECRET_CERT_KEY.to_string(), Sensitive(certificate)),
        (wiring::SECRET_KEY_KEY.to_string(), key),
    ]);
    let until_renewal = u64::try_from(renew_at.saturating_sub(now)).unwrap_or(0);
    Ok(Ok(Prepared {
        data,
        wiring: Wired::Gateway { servers, checksum },
        requeue: Duration::from_secs(until_renewal.max(1)),
    }))
}

/// Whether the Secret never held a certificate (the first issue is not a rotation).
fn first_issue(secret: Option<&Secret>) -> bool {
    secret_value(secret, wiring::SECRET_CERT_KEY).is_none()
}

/// Moves the tenant from `current` to `to`. `Ok(Ok(password))`: moved, with the target
/// login's password; `Ok(Err(action))`: not moved (status written), the caller returns.
async fn migrate(
    run: &mut Run<'_>,
    tenant: &str,
    current: &str,
    to: &DataStore,
    secret: Option<&Secret>,
) -> Result<Result<Sensitive, Action>> {
    let ctx = run.ctx;
    let to_name = to.name_any();
    let Some(from) = get_store(ctx, current).await? else {
        return Ok(Err(run
            .wait(
                Phase::Failed,
                "DataStoreNotFound",
                format!("the current DataStore {current} does not exist: cannot migrate from it"),
            )
            .await?));
    };
    if from.spec.driver == Driver::Etcd || to.spec.driver == Driver::Etcd {
        return Ok(Err(run
            .wait(
                Phase::Failed,
                "MigrationNotSupported",
                "migrating to or from an etcd DataStore is not supported".into(),
            )
            .await?));
    }
    if from.spec.mode == Mode::Gateway || to.spec.mode == Mode::Gateway {
        return Ok(Err(run
            .wait(
                Phase::Failed,
                "MigrationNotSupported",
                "migrating to or from a Gateway DataStore is not supported by the controller \
                 (a gateway moves its own tenants: kine-rs tenant migrate)"
                    .into(),
            )
            .await?));
    }
    let (source_admin, target_admin) = match (
        credentials::admin_login(&ctx.client, &from).await,
        credentials::admin_login(&ctx.client, to).await,
    ) {
        (Ok(s), Ok(t)) => (s, t),
        (Err(e), _) | (_, Err(e)) => {
            return Ok(Err(run
                .wait(Phase::Failed, "CredentialsUnavailable", e.to_string())
                .await?));
        }
    };
    let Some(source_password) = secret_value(secret, SECRET_PASSWORD_KEY)
        .filter(|_| secret_value(secret, SECRET_DATASTORE_KEY).as_deref() == Some(current))
    else {
        return Ok(Err(run
            .wait(
                Phase::Failed,
                "SecretInvalid",
                format!(
                    "Secret {} does not hold the login for DataStore {current}",
                    secret_name(&run.name)
                ),
            )
            .await?));
    };
    let source_login = TenantLogin::new(tenant, Sensitive(source_password));
    // The target login's password survives a restart of the controller in the Secret.
    let target_password = match (
        secret_value(secret, SECRET_TARGET_DATASTORE_KEY),
        secret_value(secret, SECRET_TARGET_PASSWORD_KEY),
    ) {
        (Some(store), Some(password)) if store == to_name => Sensitive(password),
        _ => {
            let password = provision::random_password();
            let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &run.namespace);
            let body = serde_json::json!({
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": { "name": secret_name(&run.name), "namespace": run.namespace },
                "stringData": {
                    SECRET_TARGET_DATASTORE_KEY: to_name,
                    SECRET_TARGET_PASSWORD_KEY: password.expose(),
                },
            });
            secrets
                .patch(
                    &secret_name(&run.name),
                    &PatchParams::default(),
                    &Patch::Merge(&body),
                )
                .await?;
            password
        }
    };
    let target_login = TenantLogin::new(tenant, target_password.clone());
    run.status.phase = Phase::Migrating;
    run.status.migration = Some(MigrationStatus {
        from: current.to_string(),
        to: to_name.clone(),
        phase: "provisioning".into(),
        ..Default::default()
    });
    set_condition(
        &mut run.status.conditions,
        "Migrating",
        true,
        "MigrationRunning",
        format!("moving tenant {tenant} from DataStore {current} to {to_name}"),
        run.generation,
    );
    run.write_status().await?;
    run.event(
        EventType::Normal,
        "MigrationStarted",
        format!("moving tenant {tenant} from DataStore {current} to {to_name}"),
    )
    .await;

    let result = async {
        provision::ensure(&target_admin, &target_login)
            .await
            .map_err(|e| format!("provisioning on {to_name}: {e}"))?;
        let source = provision::tenant_endpoint(&source_admin, &source_login);
        let target = provision::tenant_endpoint(&target_admin, &target_login);
        let job = migration::Move {
            tenant,
            from: current,
            to: &to_name,
            source: &source,
            target: &target,
            source_tls: source_admin.tls.as_ref(),
            target_tls: target_admin.tls.as_ref(),
        };
        migration::run(ctx, &run.namespace, &run.name, &run.status, job).await
    }
    .await;
    ctx.metrics.migration(if result.is_ok() {
        "succeeded"
    } else {
        "failed"
    });
    let migration = run.status.migration.get_or_insert_with(Default::default);
    match result {
        Ok(summary) => {
            migration.phase = "done".into();
            migration.keys = summary.keys;
            migration.keys_total = summary.keys;
            migration.events = summary.events;
            migration.applied_revision = summary.revision;
            migration.source_revision = summary.revision;
            migration.freeze_window_ms = Some(summary.freeze_window.as_millis() as u64);
            migration.message = Some(format!(
                "moved at revision {}, writes refused for {} ms",
                summary.revision,
                summary.freeze_window.as_millis()
            ));
            migration.failed_generation = None;
            set_condition(
                &mut run.status.conditions,
                "Migrating",
                false,
                "MigrationSucceeded",
                format!("tenant {tenant} moved from DataStore {current} to {to_name}"),
                run.generation,
            );
            run.event(
                EventType::Normal,
                "Migrated",
                format!(
                    "tenant {tenant} moved from DataStore {current} to {to_name} at revision {}",
                    summary.revision
                ),
            )
            .await;
            Ok(Ok(target_password))
        }
        Err(message) => {
            migration.phase = "failed".into();
            migration.message = Some(message.clone());
            migration.failed_generation = run.generation;
            set_condition(
                &mut run.status.conditions,
                "Migrating",
                false,
                "MigrationFailed",
                format!("tenant {tenant} stays on DataStore {current}, writable: {message}"),
                run.generation,
            );
            run.event(
                EventType::Warning,
                "MigrationFailed",
                format!("tenant {tenant} stays on DataStore {current}: {message}"),
            )
            .await;
            run.status.phase = Phase::Ready;
            run.write_status().await?;
            // The caller goes on with the current store (rewired as before).
            Ok(Err(Action::requeue(Duration::from_millis(100))))
        }
    }
}

async fn cleanup(binding: &TenantDatastore, ctx: &Context) -> Result<Action> {
    if binding.spec.deletion_policy == DeletionPolicy::Retain {
        info!("deletionPolicy Retain: the tenant's data is kept");
        return Ok(Action::await_change());
    }
    let status = binding.status.clone().unwrap_or_default();
    let Some(tenant) = status.tenant.clone() else {
        return Ok(Action::await_change());
    };
    let secrets: Api<Secret> =
        Api::namespaced(ctx.client.clone(), &binding.namespace().unwrap_or_default());
    let secret = secrets.get_opt(&secret_name(&binding.name_any())).await?;
    let mut stores: Vec<(String, Option<String>)> = Vec::new();
    if let Some(current) = &status.current_data_store {
        stores.push((
            current.clone(),
            secret_value(secret.as_ref(), SECRET_PASSWORD_KEY),
        ));
    }
    if let Some(m) = &status.migration
        && m.phase == "done"
        && Some(&m.from) != status.current_data_store.as_ref()
    {
        stores.push((m.from.clone(), None));
    }
    for (store_name, password) in stores {
        let Some(store) = get_store(ctx, &store_name).await? else {
            warn!(datastore = %store_name, "DataStore gone: nothing to drop there");
            continue;
        };
        if store.spec.mode == Mode::Gateway {
            let gateway =
                Gateway::of(&ctx.client, &store)
                    .await
                    .map_err(|problem| Error::Datastore {
                        datastore: store_name.clone(),
                        reason: problem.message,
                    })?;
            gateway
                .delete_tenant(&tenant)
                .await
                .map_err(|reason| Error::Tenant {
                    tenant: tenant.clone(),
                    reason,
                })?;
            info!(datastore = %store_name, %tenant, "tenant dropped from the gateway (deletionPolicy Delete)");
            continue;
        }
        let admin = credentials::admin_login(&ctx.client, &store).await?;
        let login = TenantLogin::new(&tenant, Sensitive(password.unwrap_or_default()));
        if matches!(store.spec.driver, Driver::NATS | Driver::Etcd) {
            let endpoint = provision::tenant_endpoint(&admin, &login);
            let opened = ctx
                .backends
                .open(&endpoint, admin.tls.as_ref())
                .await
                .map_err(|reason| Error::Tenant {
                    tenant: tenant.clone(),
                    reason,
                })?;
            opened
                .delete(&tenant)
                .await
                .map_err(|reason| Error::Tenant {
                    tenant: tenant.clone(),
                    reason,
                })?;
        } else {
            ctx.backends
                .forget(
                    &provision::tenant_endpoint(&admin, &login),
                    admin.tls.as_ref(),
                )
                .await;
            provision::drop_tenant(&admin, &login)
                .await
                .map_err(|reason| Error::Provision {
                    datastore: store_name.clone(),
                    reason,
                })?;
        }
        info!(datastore = %store_name, %tenant, "tenant dropped (deletionPolicy Delete)");
    }
    Ok(Action::await_change())
}
