//! kine-rs: the etcd v3 API over databases operators already run.
//!
//! Layers, from the wire down:
//! * [`server`]: the gRPC services (thin), and [`error`]: the one mapping of errors to gRPC;
//! * [`keyspace`]: a served keyspace (tenant) and its etcd operations, built from
//!   [`range`] and [`txn`] (etcd's semantics), [`writer`] (group commit) and [`watch`];
//! * [`storage`]: the storage model and the trait every backend implements (see its docs).

pub mod cli;
pub mod config;
pub mod error;
pub mod etcd_proxy;
pub mod gates;
pub mod health;
pub mod keyspace;
pub mod metrics;
pub mod migrate;
pub mod model;
pub mod range;
pub mod rate;
pub mod read_ahead;
pub mod renewals;
pub mod routes;
pub mod run;
pub mod served;
pub mod server;
pub mod storage;
pub mod tenants;
pub mod txn;
pub mod watch;
pub mod write_thread;
pub mod writer;
