//! kine-rs-controller: provisions kine-rs tenants in shared datastores (PostgreSQL, MySQL,
//! NATS, etcd) or in a shared kine-rs gateway, wires tenant kube-apiservers to them (a kine-rs
//! sidecar, or the gateway with a client certificate per tenant), freezes them, and
//! live-migrates them between datastores with the kine-rs migration engine, in process.
//!
//! One concept per module: [`crd`] (the resources), [`credentials`] (ContentRefs and the
//! admin login), [`provision`] (databases and logins per driver), [`tenant`] (the tenant's
//! keyspace through the kine-rs library), [`gateway`] (a gateway's admin API),
//! [`certificates`] (tenants' client certificates), [`scheduler`] (placing new tenants),
//! [`wiring`] (the sidecar or gateway workload patch), [`migration`], [`datastore`] and
//! [`binding`] (the two reconcilers), [`metrics`], [`leader`] (leader election),
//! [`controller`] (running them).

pub mod binding;
pub mod certificates;
pub mod controller;
pub mod crd;
pub mod credentials;
pub mod datastore;
pub mod datastore_tls;
pub mod error;
pub mod gateway;
pub mod leader;
pub mod metrics;
pub mod migration;
pub mod provision;
pub mod scheduler;
pub mod tenant;
pub mod wiring;

use std::sync::Arc;

use kube::Client;
use kube::runtime::events::{Recorder, Reporter};

pub use error::{Error, Result};

/// The field manager of everything the controller applies except workloads.
pub const FIELD_MANAGER: &str = "kine-rs-controller";

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub sidecar: wiring::SidecarSettings,
    pub metrics: Arc<metrics::Metrics>,
    pub backends: tenant::Backends,
    pub recorder: Recorder,
}

impl Context {
    pub fn new(client: Client, sidecar: wiring::SidecarSettings) -> Context {
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_string(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            sidecar,
            metrics: Arc::new(metrics::Metrics::default()),
            backends: tenant::Backends::default(),
        }
    }
}
