//! The etcd v3 gRPC API as kine-rs serves it.
//!
//! The `.proto` files under `proto/etcd` were written from etcd's public wire contract: the
//! same package names (`etcdserverpb`, `mvccpb`), message and field numbers, and service
//! paths (`/etcdserverpb.KV/Range`, …), so every etcd client talks to kine-rs unchanged.
//! Services kine-rs does not serve (Auth, cluster membership changes, snapshots) are left out,
//! and calls to them get gRPC's `Unimplemented`, as the README lists.

#![allow(clippy::all, missing_docs)]

pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}

pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

/// kine-rs's own administration API (`proto/kine/admin/v1/admin.proto`).
pub mod kine {
    pub mod admin {
        pub mod v1 {
            tonic::include_proto!("kine.admin.v1");
        }
    }
}
