//! The custom resources, generated into CRDs from these types (`kine-rs-controller crds`).
//!
//! * [`DataStore`] (cluster-scoped): a database server kine-rs tenants live in. Its
//!   `driver`, `endpoints`, `basicAuth` and `tlsConfig` use Kamaji's field names and its
//!   `ContentRef`, so a Kamaji DataStore's spec reads the same here.
//! * [`TenantDatastore`] (namespaced): binds one tenant kube-apiserver workload to a
//!   DataStore: the controller provisions the tenant there, writes its connection Secret and
//!   wires a kine-rs sidecar into the workload.

// Several `printcolumn(type_ = "string", …)` in one `#[kube]` attribute read as duplicates.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of the custom resources.
pub const GROUP: &str = "kine-rs.io";

/// The database behind a DataStore. Immutable once set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Driver {
    PostgreSQL,
    MySQL,
    NATS,
    #[serde(rename = "etcd")]
    Etcd,
}

impl Driver {
    pub fn as_str(self) -> &'static str {
        match self {
            Driver::PostgreSQL => "PostgreSQL",
            Driver::MySQL => "MySQL",
            Driver::NATS => "NATS",
            Driver::Etcd => "etcd",
        }
    }
}

/// How tenant apiservers reach a DataStore.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Mode {
    /// A kine-rs sidecar in every tenant apiserver pod, talking to the database directly.
    #[default]
    Sidecar,
    /// A shared kine-rs gateway (`kine-rs --gateway`); tenants are told apart by client
    /// certificates the controller issues with the DataStore's CA.
    Gateway,
}

/// Gateway mode: how the controller talks to the gateway and what it issues.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySettings {
    /// The common name of the certificate the controller calls the gateway's admin API with
    /// (one of the gateway's `--admin-identity`); default `system:kine-rs-controller`. Not
    /// used when `tlsConfig.clientCertificate` is given. Choose one that is not a DNS label
    /// (tenant names are): a tenant of that name is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_identity: Option<String>,
    /// Lifetime of the tenants' client certificates, in hours (default 2160, 90 days); each
    /// is re-issued after two thirds of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub certificate_lifetime_hours: Option<u32>,
}

/// Kamaji's `ContentRef`: a value given inline (`content`, base64 in YAML, as Kamaji's
/// `[]byte`) or read from a Secret's key.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContentRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub content: Option<ByteString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_reference: Option<SecretReference>,
}

/// A key of a Secret (Kamaji's `SecretReference`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretReference {
    pub name: String,
    pub namespace: String,
    pub key_path: String,
}

/// The datastore's administrator login (Kamaji's `BasicAuth`), used by the controller to
/// create tenants' databases and users (and, for NATS, by the tenants' kine-rs).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BasicAuth {
    pub username: ContentRef,
    pub password: ContentRef,
}

/// A certificate and its key (Kamaji's `CertKeyPair`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CertKeyPair {
    pub certificate: ContentRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<ContentRef>,
}

/// A client certificate (Kamaji's `ClientCertificate`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientCertificate {
    pub certificate: ContentRef,
    pub private_key: ContentRef,
}

/// TLS towards the datastore (Kamaji's `TLSConfig`).
///
/// In `Gateway` mode: `certificateAuthority` (certificate and private key) is the CA the
/// gateway trusts (its `--trusted-ca-file`) and that verifies the gateway's server
/// certificate; the controller signs tenants' client certificates with it.
/// `clientCertificate`, if given, is the controller's own admin certificate for the gateway
/// (otherwise the controller issues itself one, CN = `gateway.adminIdentity`).
///
/// In `Sidecar` mode: TLS to the database server. `certificateAuthority.certificate`
/// verifies the server (PostgreSQL and MySQL: verify-full, the name in `endpoints`);
/// `clientCertificate`, if given, authenticates the controller and the sidecars to it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_authority: Option<CertKeyPair>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<ClientCertificate>,
}

/// What a DataStore may hold; the scheduler skips a full one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Capacity {
    /// Most tenants placed on this store (none: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tenants: Option<u32>,
    /// Most bytes (live keys and values, summed over its tenants; none: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<i64>,
}

/// A condition, as Kubernetes' `metav1.Condition`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: String,
    pub message: String,
    pub last_transition_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A database server (or NATS / etcd cluster) that holds kine-rs tenants.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "kine-rs.io",
    version = "v1alpha1",
    kind = "DataStore",
    plural = "datastores",
    shortname = "kds",
    status = "DataStoreStatus",
    printcolumn(name = "Driver", type_ = "string", json_path = ".spec.driver"),
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(name = "Ready", type_ = "boolean", json_path = ".status.ready"),
    printcolumn(name = "Tenants", type_ = "integer", json_path = ".status.tenants"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DataStoreSpec {
    /// `PostgreSQL`, `MySQL`, `NATS` or `etcd`; cannot change.
    #[x_kube(validation = Rule::new("self == oldSelf").message("driver is immutable"))]
    pub driver: Driver,
    /// `host:port` of the server(s). The first one is used.
    #[x_kube(validation = Rule::new("size(self) > 0").message("at least one endpoint"))]
    pub endpoints: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic_auth: Option<BasicAuth>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_config: Option<TlsConfig>,
    /// `Sidecar` (default): a kine-rs sidecar per tenant pod, talking to the database at
    /// `endpoints`. `Gateway`: `endpoints` are the shared kine-rs gateway's addresses (as
    /// tenant apiservers dial them), `driver` the database behind it, and tenants get client
    /// certificates signed by `tlsConfig.certificateAuthority`.
    #[serde(default)]
    pub mode: Mode,
    /// Gateway mode settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewaySettings>,
    /// Limits the scheduler keeps to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Capacity>,
}

/// What the controller last saw of a DataStore.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataStoreStatus {
    #[serde(default)]
    pub ready: bool,
    /// The TenantDatastores (`namespace/name`) whose tenant lives here.
    #[serde(default)]
    pub used_by: Vec<String>,
    #[serde(default)]
    pub tenants: u32,
    /// Bytes of live keys and values of its tenants, as they last reported.
    #[serde(default)]
    pub bytes: i64,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The kind of workload that runs the tenant kube-apiserver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum WorkloadKind {
    #[default]
    Deployment,
    StatefulSet,
}

/// Which kube-apiserver the binding wires.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiServerTarget {
    #[serde(default)]
    pub kind: WorkloadKind,
    /// The workload's name, in the binding's namespace.
    pub name: String,
    /// The kube-apiserver container (default: the one named `kube-apiserver`, else the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

/// Limits of the tenant's keyspace (0 or none: no limit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantQuota {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<i64>,
}

/// What happens to the tenant's data when the binding is deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum DeletionPolicy {
    /// Drop the tenant's data, database and user.
    Delete,
    /// Keep them (default).
    #[default]
    Retain,
}

fn writable_default() -> bool {
    true
}

/// Binds a tenant kube-apiserver to a DataStore.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "kine-rs.io",
    version = "v1alpha1",
    kind = "TenantDatastore",
    plural = "tenantdatastores",
    shortname = "tds",
    namespaced,
    status = "TenantDatastoreStatus",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "DataStore",
        type_ = "string",
        json_path = ".status.currentDataStore"
    ),
    printcolumn(
        name = "Tenant",
        type_ = "string",
        json_path = ".status.tenant",
        priority = 1
    ),
    printcolumn(name = "Writable", type_ = "boolean", json_path = ".spec.writable"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TenantDatastoreSpec {
    pub api_server: ApiServerTarget,
    /// The DataStore to use; empty: the controller picks one (labels, free capacity). Changing
    /// it migrates the tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_store: Option<String>,
    /// With no `dataStore`: only DataStores with these labels are candidates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_store_selector: Option<BTreeMap<String, String>>,
    /// The tenant (keyspace) name, a DNS label; default `t-<uid of this object>`. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("tenant is immutable"))]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<TenantQuota>,
    /// `false` freezes the tenant: reads and watches go on, every write is refused.
    #[serde(default = "writable_default")]
    #[schemars(default = "writable_default")]
    pub writable: bool,
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// The phase of a binding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    #[default]
    Provisioning,
    Ready,
    Migrating,
    Frozen,
    Failed,
}

/// Progress of the last migration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStatus {
    pub from: String,
    pub to: String,
    /// `snapshot`, `tail`, `freeze`, `verify`, `switch`, `done` or `failed`.
    pub phase: String,
    #[serde(default)]
    pub keys: u64,
    #[serde(default)]
    pub keys_total: u64,
    #[serde(default)]
    pub events: u64,
    #[serde(default)]
    pub applied_revision: i64,
    #[serde(default)]
    pub source_revision: i64,
    /// How long writes were refused at the cut-over, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_window_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The generation whose migration failed: not retried until the spec changes again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_generation: Option<i64>,
}

/// What the controller last did for a binding.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantDatastoreStatus {
    #[serde(default)]
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_data_store: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The database and login (PostgreSQL, MySQL) made for the tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The Secret holding the tenant's connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// Gateway mode: when the tenant's client certificate expires (RFC 3339), and when the
    /// controller re-issues it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_not_after: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_renewal: Option<String>,
    #[serde(default)]
    pub keys: i64,
    #[serde(default)]
    pub bytes: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationStatus>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Sets (or replaces) the condition of `type_`, keeping its transition time when its status
/// did not change.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) {
    let status = if status { "True" } else { "False" }.to_string();
    let now = k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default();
    let message = message.into();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = now;
            }
            c.status = status;
            c.reason = reason.to_string();
            c.message = message;
            c.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: type_.to_string(),
            status,
            reason: reason.to_string(),
            message,
            last_transition_time: now,
            observed_generation: generation,
        }),
    }
}

/// The CRDs as one YAML stream (what `kine-rs-controller crds` prints and the chart ships).
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    let mut out = String::from(
        "# Generated by `kine-rs-controller crds` from controller/src/crd.rs: do not edit.\n",
    );
    for crd in [DataStore::crd(), TenantDatastore::crd()] {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    /// The chart's CRDs are the ones the types generate (run `kine-rs-controller crds >
    /// charts/kine-rs/crds/kine-rs.io.yaml` after changing the types).
    #[test]
    fn committed_crds_are_up_to_date() {
        let committed = include_str!("../../charts/kine-rs/crds/kine-rs.io.yaml");
        let generated = super::crds_yaml().unwrap_or_else(|e| format!("cannot generate: {e}"));
        assert!(
            committed == generated,
            "charts/kine-rs/crds/kine-rs.io.yaml is out of date: run `cargo run -p \
             kine-rs-controller -- crds > charts/kine-rs/crds/kine-rs.io.yaml`"
        );
    }
}
