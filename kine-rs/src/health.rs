//! Health that tells the truth about the datastore: gRPC health (what Kubernetes probes and
//! kube-apiserver's etcd health checks read) and `/readyz` on the metrics listener say
//! NOT_SERVING while the datastore does not answer or the process is shutting down, and
//! SERVING again once it answers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{info, warn};

use futures::future::BoxFuture;

use crate::storage::Backend;

/// Asks the datastore something cheap: `true` when it answered.
pub type Probe = Arc<dyn Fn() -> BoxFuture<'static, bool> + Send + Sync>;

/// The probe of a database-backed datastore: one indexed lookup of a keyspace row, the
/// cheapest statement that needs the datastore to answer.
pub fn backend_probe(backend: Arc<dyn Backend>) -> Probe {
    Arc::new(move || {
        let backend = backend.clone();
        Box::pin(async move {
            backend
                .keyspace(crate::run::DEFAULT_KEYSPACE, false)
                .await
                .is_ok()
        })
    })
}

/// How often the datastore is asked.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How long one probe may take before the datastore counts as unreachable.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether this process can serve: the datastore answers and no shutdown has begun.
#[derive(Clone)]
pub struct Readiness {
    ready: Arc<watch::Sender<bool>>,
    stopping: Arc<AtomicBool>,
    reporter: HealthReporter,
}

impl Readiness {
    /// Starts asking the datastore through `probe`; the gRPC health service of `reporter`
    /// follows.
    pub async fn start(probe: Probe, reporter: HealthReporter) -> Readiness {
        reporter
            .set_service_status("", ServingStatus::Serving)
            .await;
        let readiness = Readiness {
            ready: Arc::new(watch::Sender::new(true)),
            stopping: Arc::new(AtomicBool::new(false)),
            reporter,
        };
        let readiness_task = readiness.clone();
        tokio::spawn(async move { readiness_task.run(probe).await });
        readiness
    }

    async fn run(self, probe: Probe) {
        let mut interval = tokio::time::interval(PROBE_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let answered = matches!(tokio::time::timeout(PROBE_TIMEOUT, probe()).await, Ok(true));
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            if *self.ready.borrow() == answered {
                continue;
            }
            if answered {
                info!("the datastore answers again: serving");
            } else {
                warn!("the datastore does not answer: health is NOT_SERVING until it does");
            }
            self.set(answered).await;
        }
    }

    async fn set(&self, ready: bool) {
        self.ready.send_replace(ready);
        let status = if ready {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status("", status).await;
    }

    /// Whether the process serves now.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// A shutdown began: NOT_SERVING for good.
    pub async fn shutting_down(&self) {
        self.stopping.store(true, Ordering::Release);
        self.set(false).await;
    }
}
