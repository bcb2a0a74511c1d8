//! The controller's errors. None of them carries a password or a connection string with
//! credentials: messages name Secrets, databases and users, never their secret values.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),

    #[error("{0}")]
    Invalid(String),

    #[error("secret {namespace}/{name}: {reason}")]
    Secret {
        namespace: String,
        name: String,
        reason: String,
    },

    #[error("datastore {datastore}: {reason}")]
    Datastore { datastore: String, reason: String },

    #[error("provisioning on {datastore}: {reason}")]
    Provision { datastore: String, reason: String },

    #[error("tenant {tenant}: {reason}")]
    Tenant { tenant: String, reason: String },

    #[error("migration of tenant {tenant}: {reason}")]
    Migration { tenant: String, reason: String },

    #[error("{0} is waiting: {1}")]
    Waiting(String, String),

    #[error("DataStore {name} is used by {users}; delete or move those tenants first")]
    InUse { name: String, users: String },

    #[error("finalizer: {0}")]
    Finalizer(String),

    #[error("serializing: {0}")]
    Serialize(#[from] serde_json::Error),
}

impl Error {
    /// A short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Invalid(_) => "invalid",
            Error::Secret { .. } => "secret",
            Error::Datastore { .. } => "datastore",
            Error::Provision { .. } => "provision",
            Error::Tenant { .. } => "tenant",
            Error::Migration { .. } => "migration",
            Error::Waiting(..) => "waiting",
            Error::InUse { .. } => "in_use",
            Error::Finalizer(_) => "finalizer",
            Error::Serialize(_) => "serialize",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
