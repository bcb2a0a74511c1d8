//! Every error kine-rs can answer a request with, and its one mapping to `tonic::Status`.
//!
//! etcd clients (client-go, etcdctl, the `etcd-client` crate) recognise errors by their gRPC
//! code and exact message, so the `etcdserver: …` messages below are etcd's, word for word.

use tonic::{Code, Status};
use tracing::warn;

/// A failure of a request, as the client will see it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KineError {
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRevision,
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    #[error("etcdserver: key not found")]
    KeyNotFound,
    #[error("etcdserver: invalid sort option")]
    InvalidSortOption,
    #[error("etcdserver: value is provided")]
    ValueProvided,
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    #[error("etcdserver: lease already exists")]
    LeaseExists,
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    /// The tenant holds the most leases `--max-leases-per-tenant` allows (etcd has no such
    /// limit, so no etcd message fits; the code is the one of etcd's quota errors).
    #[error(
        "kine-rs: the tenant holds {max} leases, the most --max-leases-per-tenant allows; revoke leases or raise the limit"
    )]
    TooManyLeases { max: i64 },
    /// The datastore cannot index a key this long (etcd itself has no key limit).
    #[error(
        "kine-rs: a key of {len} bytes is longer than the {max} bytes the {driver} datastore can store"
    )]
    KeyTooLong {
        len: usize,
        max: usize,
        driver: &'static str,
    },
    /// The keyspace refuses writes while a maintenance (migration) holds it frozen.
    #[error(
        "kine-rs: tenant {tenant:?} is frozen for maintenance; writes are refused until it is unfrozen"
    )]
    Frozen { tenant: String },
    /// The tenant is the target of a migration that has not finished: not served yet.
    #[error(
        "kine-rs: tenant {tenant:?} is being imported by a migration and is served once it finishes"
    )]
    TenantImporting { tenant: String },
    /// The tenant was migrated to another datastore: this one keeps its data frozen.
    #[error(
        "kine-rs: tenant {tenant:?} has moved to another datastore; serve it from its new --endpoint"
    )]
    TenantMoved { tenant: String },
    /// A compaction past the revision a running migration still copies from.
    #[error("kine-rs: compaction is held at revision {pinned} while the tenant is being migrated")]
    CompactionPinned { pinned: i64 },
    /// A tenant name that is not a DNS label (the message says why).
    #[error("kine-rs: {0}")]
    InvalidTenant(String),
    /// A tenant the request names does not exist.
    #[error("kine-rs: tenant {0:?} does not exist")]
    UnknownTenant(String),
    /// The keyspace this process had open was deleted (by another process).
    #[error("kine-rs: this tenant was deleted")]
    KeyspaceDeleted,
    /// A tenant to be created exists already.
    #[error("kine-rs: tenant {0:?} already exists")]
    TenantExists(String),
    /// A tenant to be deleted still has open watches.
    #[error(
        "kine-rs: tenant {tenant:?} has {watches} open watches; delete it with force to end them"
    )]
    TenantBusy { tenant: String, watches: i64 },
    /// What etcd's RangeStream refuses, in etcd's words: an order other than the keys', and
    /// revision filters (the chunks follow the keys).
    #[error("RangeStream does not support {0}")]
    RangeStreamUnsupported(&'static str),
    /// A request option or RPC that kine-rs does not implement.
    #[error("kine-rs: {0} is not supported")]
    Unsupported(&'static str),
    /// The datastore cannot be reached; the request may be retried. The driver's text is
    /// logged, never sent to a client ([`KineError::client_message`]).
    #[error("kine-rs: datastore unavailable: {0}")]
    Unavailable(String),
    /// Another process committed to the keyspace between this write transaction's start and
    /// its commit (NATS); nothing was written, and the writer retries on a fresh transaction.
    /// Logged like [`KineError::Unavailable`].
    #[error("kine-rs: datastore write conflict: {0}")]
    Conflict(String),
    /// The datastore answered with an error that is not the client's fault; logged like
    /// [`KineError::Unavailable`].
    #[error("kine-rs: datastore error: {0}")]
    Storage(String),
    /// kine-rs is shutting down.
    #[error("etcdserver: server stopped")]
    Stopped,
    /// The answer of the etcd cluster behind the etcd proxy, passed on with etcd's own code
    /// and message (they are already the ones an etcd client expects).
    #[error("{message}")]
    Etcd { code: Code, message: String },
}

impl KineError {
    /// The gRPC code etcd uses for the same condition.
    pub fn code(&self) -> Code {
        match self {
            KineError::Compacted | KineError::FutureRevision | KineError::LeaseTtlTooLarge => {
                Code::OutOfRange
            }
            KineError::EmptyKey
            | KineError::KeyNotFound
            | KineError::InvalidSortOption
            | KineError::ValueProvided
            | KineError::LeaseProvided
            | KineError::TooManyOps
            | KineError::DuplicateKey
            | KineError::RequestTooLarge
            | KineError::KeyTooLong { .. }
            | KineError::InvalidTenant(_) => Code::InvalidArgument,
            KineError::UnknownTenant(_) | KineError::KeyspaceDeleted => Code::NotFound,
            KineError::TenantExists(_) => Code::AlreadyExists,
            KineError::TenantBusy { .. } => Code::FailedPrecondition,
            KineError::LeaseNotFound => Code::NotFound,
            KineError::LeaseExists
            | KineError::Frozen { .. }
            | KineError::CompactionPinned { .. } => Code::FailedPrecondition,
            KineError::TenantImporting { .. } | KineError::TenantMoved { .. } => Code::Unavailable,
            KineError::NoSpace | KineError::TooManyLeases { .. } => Code::ResourceExhausted,
            KineError::Unsupported(_) | KineError::RangeStreamUnsupported(_) => Code::Unimplemented,
            KineError::Unavailable(_) | KineError::Conflict(_) | KineError::Stopped => {
                Code::Unavailable
            }
            KineError::Storage(_) => Code::Internal,
            KineError::Etcd { code, .. } => *code,
        }
    }

    /// Whether the error comes from the datastore rather than from the request: such an error
    /// aborts the whole database transaction it happened in.
    pub fn is_datastore_failure(&self) -> bool {
        matches!(
            self,
            KineError::Unavailable(_)
                | KineError::Conflict(_)
                | KineError::Storage(_)
                | KineError::Stopped
        )
    }
}

impl KineError {
    /// The message a client gets. A datastore failure gets a fixed one: the driver's text
    /// may carry SQL, table, database or host names, so it goes to the log only.
    pub fn client_message(&self) -> String {
        match self {
            KineError::Unavailable(_) => "kine-rs: datastore unavailable".to_string(),
            KineError::Storage(_) => "kine-rs: datastore error".to_string(),
            KineError::Conflict(_) => "kine-rs: datastore write conflict".to_string(),
            other => other.to_string(),
        }
    }
}

impl From<KineError> for Status {
    fn from(error: KineError) -> Self {
        if let KineError::Unavailable(detail)
        | KineError::Storage(detail)
        | KineError::Conflict(detail) = &error
        {
            warn!(error = %detail, code = ?error.code(), "a request failed in the datastore");
        }
        Status::new(error.code(), error.client_message())
    }
}

impl From<sqlx::Error> for KineError {
    fn from(error: sqlx::Error) -> Self {
        // Classify by kind, never by message text; messages never carry credentials because
        // sqlx does not echo connection strings in its errors.
        match &error {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Tls(_) => KineError::Unavailable(error.to_string()),
            // Nothing was written: the batch is run again under the lock.
            sqlx::Error::Database(db)
                if matches!(
                    db.code().as_deref(),
                    Some(KEYSPACE_CHANGED | ABSENT_KEY_EXISTS | UNREAD_BATCH_REFUSED)
                ) =>
            {
                KineError::Conflict(error.to_string())
            }
            sqlx::Error::Database(db) if db.code().as_deref().is_some_and(is_transient) => {
                KineError::Unavailable(error.to_string())
            }
            _ => KineError::Storage(error.to_string()),
        }
    }
}

/// The SQLSTATE kine-rs's PostgreSQL function `kine_rs_commit` (migration 0007) raises when
/// the keyspace changed between a write batch's unlocked read and its commit.
pub const KEYSPACE_CHANGED: &str = "KR001";

/// The SQLSTATE `kine_rs_commit` (migration 0010) raises when a key the write batch took for
/// absent without reading it has a live row.
pub const ABSENT_KEY_EXISTS: &str = "KR002";

/// The SQLite result code (SQLITE_CONSTRAINT_CHECK) of the check that begins a write batch
/// started from what this process committed last (`UnreadBatch` of the SQL backend): another
/// connection committed since, or a key the batch took for absent is live. No table of
/// kine-rs's SQLite schema has a CHECK constraint that could raise it otherwise.
pub const UNREAD_BATCH_REFUSED: &str = "275";

/// Database error codes (SQLite result codes, SQLSTATEs of PostgreSQL and MySQL) of failures
/// that a retry may not meet: the server is going away or overloaded, or the transaction lost
/// a deadlock or serialization conflict.
fn is_transient(code: &str) -> bool {
    // SQLITE_BUSY: another writer holds the file longer than the busy timeout.
    code == "5"
        // Connection exceptions (MySQL's too many connections and server shutdown, too).
        || code.starts_with("08")
        // PostgreSQL: admin or crash shutdown, cannot connect now; too many connections.
        || matches!(code, "57P01" | "57P02" | "57P03" | "53300")
        // Serialization failure and deadlock (PostgreSQL; MySQL reports both as 40001).
        || matches!(code, "40001" | "40P01")
        // MySQL/MariaDB: the connection or its query was killed (`KILL`, a shutdown).
        || code == "70100"
}

/// Results of kine-rs operations.
pub type Result<T, E = KineError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    /// A database going away, killing a connection or losing a deadlock is worth a retry:
    /// the client sees Unavailable; anything else is an internal error.
    #[test]
    fn transient_database_codes() {
        for code in [
            "5", "08006", "08S01", "57P01", "57P02", "57P03", "53300", "40001",
        ] {
            assert!(is_transient(code), "{code}");
        }
        // MariaDB's "Connection was killed" and MySQL's "Query execution was interrupted".
        assert!(is_transient("70100"));
        for code in ["23505", "42P01", "42000", "HY000"] {
            assert!(!is_transient(code), "{code}");
        }
    }

    /// Walks every variant: each maps to etcd's code and message.
    #[test]
    fn every_variant_maps_to_etcds_code_and_message() {
        let cases: Vec<(KineError, Code, &str)> = vec![
            (
                KineError::RangeStreamUnsupported("custom sort orders"),
                Code::Unimplemented,
                "RangeStream does not support custom sort orders",
            ),
            (
                KineError::Compacted,
                Code::OutOfRange,
                "etcdserver: mvcc: required revision has been compacted",
            ),
            (
                KineError::FutureRevision,
                Code::OutOfRange,
                "etcdserver: mvcc: required revision is a future revision",
            ),
            (
                KineError::EmptyKey,
                Code::InvalidArgument,
                "etcdserver: key is not provided",
            ),
            (
                KineError::KeyNotFound,
                Code::InvalidArgument,
                "etcdserver: key not found",
            ),
            (
                KineError::InvalidSortOption,
                Code::InvalidArgument,
                "etcdserver: invalid sort option",
            ),
            (
                KineError::ValueProvided,
                Code::InvalidArgument,
                "etcdserver: value is provided",
            ),
            (
                KineError::LeaseProvided,
                Code::InvalidArgument,
                "etcdserver: lease is provided",
            ),
            (
                KineError::TooManyOps,
                Code::InvalidArgument,
                "etcdserver: too many operations in txn request",
            ),
            (
                KineError::DuplicateKey,
                Code::InvalidArgument,
                "etcdserver: duplicate key given in txn request",
            ),
            (
                KineError::RequestTooLarge,
                Code::InvalidArgument,
                "etcdserver: request is too large",
            ),
            (
                KineError::LeaseNotFound,
                Code::NotFound,
                "etcdserver: requested lease not found",
            ),
            (
                KineError::LeaseExists,
                Code::FailedPrecondition,
                "etcdserver: lease already exists",
            ),
            (
                KineError::LeaseTtlTooLarge,
                Code::OutOfRange,
                "etcdserver: too large lease TTL",
            ),
            (
                KineError::NoSpace,
                Code::ResourceExhausted,
                "etcdserver: mvcc: database space exceeded",
            ),
            (
                KineError::TooManyLeases { max: 5 },
                Code::ResourceExhausted,
                "kine-rs: the tenant holds 5 leases, the most --max-leases-per-tenant allows; revoke leases or raise the limit",
            ),
            (
                KineError::KeyTooLong {
                    len: 4000,
                    max: 3000,
                    driver: "mysql",
                },
                Code::InvalidArgument,
                "kine-rs: a key of 4000 bytes is longer than the 3000 bytes the mysql datastore can store",
            ),
            (
                KineError::Frozen {
                    tenant: "t1".into(),
                },
                Code::FailedPrecondition,
                "kine-rs: tenant \"t1\" is frozen for maintenance; writes are refused until it is unfrozen",
            ),
            (
                KineError::TenantImporting {
                    tenant: "t1".into(),
                },
                Code::Unavailable,
                "kine-rs: tenant \"t1\" is being imported by a migration and is served once it finishes",
            ),
            (
                KineError::TenantMoved {
                    tenant: "t1".into(),
                },
                Code::Unavailable,
                "kine-rs: tenant \"t1\" has moved to another datastore; serve it from its new --endpoint",
            ),
            (
                KineError::CompactionPinned { pinned: 7 },
                Code::FailedPrecondition,
                "kine-rs: compaction is held at revision 7 while the tenant is being migrated",
            ),
            (
                KineError::UnknownTenant("t2".into()),
                Code::NotFound,
                "kine-rs: tenant \"t2\" does not exist",
            ),
            (
                KineError::KeyspaceDeleted,
                Code::NotFound,
                "kine-rs: this tenant was deleted",
            ),
            (
                KineError::TenantExists("t2".into()),
                Code::AlreadyExists,
                "kine-rs: tenant \"t2\" already exists",
            ),
            (
                KineError::TenantBusy {
                    tenant: "t2".into(),
                    watches: 3,
                },
                Code::FailedPrecondition,
                "kine-rs: tenant \"t2\" has 3 open watches; delete it with force to end them",
            ),
            (
                KineError::Unsupported("auth"),
                Code::Unimplemented,
                "kine-rs: auth is not supported",
            ),
            (
                KineError::Unavailable("connection to db.internal refused".into()),
                Code::Unavailable,
                "kine-rs: datastore unavailable",
            ),
            (
                KineError::Conflict("wrong last sequence 12".into()),
                Code::Unavailable,
                "kine-rs: datastore write conflict",
            ),
            (
                KineError::Storage("relation \"kv\" does not exist".into()),
                Code::Internal,
                "kine-rs: datastore error",
            ),
            (
                KineError::Stopped,
                Code::Unavailable,
                "etcdserver: server stopped",
            ),
            (
                KineError::Etcd {
                    code: Code::InvalidArgument,
                    message: "etcdserver: duplicate key given in txn request".into(),
                },
                Code::InvalidArgument,
                "etcdserver: duplicate key given in txn request",
            ),
        ];
        for (error, code, message) in cases {
            let status = Status::from(error);
            assert_eq!(status.code(), code, "{message}");
            assert_eq!(status.message(), message);
        }
    }
}
