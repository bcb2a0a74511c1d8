//! The gRPC layer: etcd's services over a [`Keyspace`], kept apart from the storage layer.
//! Each service resolves the caller's keyspace, calls it, and converts errors through the
//! single `KineError` → `Status` mapping.

pub mod cluster;
pub mod kv;
pub mod lease;
pub mod maintenance;
pub mod watch;

use std::sync::Arc;

use tonic::Status;

use crate::keyspace::Keyspace;

/// Finds the keyspace a request is for. With one tenant (sidecar mode) it is always the same.
#[derive(Clone)]
pub struct Tenancy {
    default: Arc<Keyspace>,
}

impl Tenancy {
    /// Every request goes to `keyspace`.
    pub fn single(keyspace: Arc<Keyspace>) -> Self {
        Tenancy { default: keyspace }
    }

    /// The keyspace `request` is for.
    pub fn keyspace<T>(&self, _request: &tonic::Request<T>) -> Result<Arc<Keyspace>, Status> {
        Ok(self.default.clone())
    }
}
