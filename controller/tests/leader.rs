//! Leader election against a real kube-apiserver: one replica takes the Lease, another
//! cannot while it is renewed, and takes it over once the holder stops renewing and the Lease
//! expires.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use kine_controller::leader::LeaderElection;

#[test]
fn one_leader_at_a_time_and_a_takeover_after_expiry() {
    let management = common::Management::start();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let client = management.api.client().await;
        let duration = Duration::from_secs(2);
        let a = LeaderElection::new(client.clone(), "default", "ctl", "replica-a", duration);
        let b = LeaderElection::new(client.clone(), "default", "ctl", "replica-b", duration);
        assert!(
            a.try_acquire_or_renew().await.expect("a"),
            "a takes the free lease"
        );
        assert!(
            !b.try_acquire_or_renew().await.expect("b"),
            "b must not take a held lease"
        );
        assert!(a.try_acquire_or_renew().await.expect("a renews"));
        // a stops renewing: b takes over once the lease has expired, not before.
        let stopped = Instant::now();
        b.acquire().await;
        assert!(
            stopped.elapsed() >= Duration::from_millis(1500),
            "b took over after {:?}, before the lease expired",
            stopped.elapsed()
        );
        assert!(
            !a.try_acquire_or_renew().await.expect("a again"),
            "a lost it"
        );
        let lease: k8s_openapi::api::coordination::v1::Lease =
            kube::Api::namespaced(client, "default")
                .get("ctl")
                .await
                .expect("lease");
        let spec = lease.spec.expect("spec");
        assert_eq!(spec.holder_identity.as_deref(), Some("replica-b"));
        assert_eq!(spec.lease_transitions, Some(1));
    });
}
