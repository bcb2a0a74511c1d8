//! Watches: a hub per keyspace that tails committed revisions from the backend, and a task per
//! gRPC Watch stream that serves that stream's watchers from the hub and from history.

pub mod hub;
pub mod outbox;
pub mod ring;
pub mod stream;
