//! Leader election on a `coordination.k8s.io` Lease, so that several replicas of the
//! controller can run and only one reconciles.
//!
//! The holder renews the Lease every `renew` (a third of its duration); another replica takes
//! it over once `renewTime + leaseDurationSeconds` has passed. Every write names the Lease's
//! `resourceVersion`, so two replicas never both win the same round (the loser gets a
//! conflict). A leader that fails to renew before its Lease expires stops (the binary exits
//! and Kubernetes restarts it), so two leaders never act for longer than the clock skew.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, PostParams};
use tracing::{info, warn};

/// One replica's part in the election.
#[derive(Clone)]
pub struct LeaderElection {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

impl LeaderElection {
    /// Competes for the Lease `namespace/name` as `identity`.
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> LeaderElection {
        LeaderElection {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            duration,
        }
    }

    /// How often the leader renews.
    pub fn renew_interval(&self) -> Duration {
        self.duration / 3
    }

    fn spec(&self, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.duration.as_secs()).unwrap_or(15).max(1),
            ),
            acquire_time: Some(acquired.unwrap_or_else(now)),
            renew_time: Some(now()),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// Takes or renews the Lease; whether this replica holds it now.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(0, None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        if !mine {
            let seconds = i64::from(spec.lease_duration_seconds.unwrap_or(15));
            let expires = spec
                .renew_time
                .as_ref()
                .map(|t| t.0)
                .and_then(|t| t.checked_add(SignedDuration::from_secs(seconds)).ok());
            if spec.holder_identity.is_some() && expires.is_some_and(|e| e > Timestamp::now()) {
                return Ok(false);
            }
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
        let acquired = if mine { spec.acquire_time } else { None };
        lease.spec = Some(self.spec(transitions, acquired));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    info!(lease = %self.name, identity = %self.identity, "leader");
                    return;
                }
                Ok(false) => {}
                Err(error) => warn!(%error, "leader election"),
            }
            tokio::time::sleep(self.renew_interval()).await;
        }
    }

    /// Renews the Lease until a renewal fails for longer than the Lease lasts; returns then
    /// (leadership lost).
    pub async fn keep(&self) {
        let mut last = std::time::Instant::now();
        loop {
            tokio::time::sleep(self.renew_interval()).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last = std::time::Instant::now(),
                Ok(false) => {
                    warn!(lease = %self.name, "another replica holds the lease");
                    return;
                }
                Err(error) => warn!(%error, "renewing the lease"),
            }
            if last.elapsed() >= self.duration {
                warn!(lease = %self.name, "the lease could not be renewed in time");
                return;
            }
        }
    }
}
