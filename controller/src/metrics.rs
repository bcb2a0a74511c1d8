//! Prometheus metrics of the controller: reconciles and their errors per kind, tenants per
//! DataStore, migrations by result.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: String,
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabels {
    pub datastore: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

/// The controller's metrics and their registry.
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Family<KindLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub tenants: Family<StoreLabels, Gauge>,
    pub migrations: Family<ResultLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kine_rs_controller");
        let reconciles = Family::<KindLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let tenants = Family::<StoreLabels, Gauge>::default();
        let migrations = Family::<ResultLabels, Counter>::default();
        registry.register("reconciles", "Reconciles, by kind", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by kind and error",
            errors.clone(),
        );
        registry.register("tenants", "Tenants placed on a DataStore", tenants.clone());
        registry.register(
            "migrations",
            "Tenant migrations, by result",
            migrations.clone(),
        );
        Metrics {
            registry,
            reconciles,
            errors,
            tenants,
            migrations,
        }
    }
}

impl Metrics {
    pub fn reconciled(&self, kind: &str) {
        self.reconciles
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }

    pub fn failed(&self, kind: &str, error: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                kind: kind.into(),
                error: error.into(),
            })
            .inc();
    }

    pub fn migration(&self, result: &str) {
        self.migrations
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .inc();
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
