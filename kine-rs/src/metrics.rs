//! Prometheus metrics, served on `--metrics-bind-address`, and the slow-query log.
//!
//! One registry per process ([`Metrics::global`]): the gRPC layer, the SQL core
//! ([`sql_query`]) and the writer ([`write_batch`]) record into it without being handed it.
//! SQL metrics are labelled by the driver and a fixed name of the query kind (`range`,
//! `events`, `insert_kv`, `commit`, …), never by a statement's text or values.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing::warn;

use crate::error::KineError;

/// Labels of a gRPC request metric: a method of [`KNOWN_METHODS`] (or `unknown`) and a gRPC
/// status code of [`STATUS_CODES`] (or `unknown`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub method: &'static str,
    pub code: &'static str,
}

/// Labels of a gRPC latency metric.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: &'static str,
}

/// Every gRPC method kine-rs serves. Request metrics are labelled by these paths only: any
/// other path a client sends is counted as `unknown`, so clients cannot grow the registry
/// (one series per path sent) without bound.
pub const KNOWN_METHODS: &[&str] = &[
    "/etcdserverpb.KV/Range",
    "/etcdserverpb.KV/Put",
    "/etcdserverpb.KV/DeleteRange",
    "/etcdserverpb.KV/Txn",
    "/etcdserverpb.KV/Compact",
    "/etcdserverpb.Watch/Watch",
    "/etcdserverpb.Lease/LeaseGrant",
    "/etcdserverpb.Lease/LeaseRevoke",
    "/etcdserverpb.Lease/LeaseKeepAlive",
    "/etcdserverpb.Lease/LeaseTimeToLive",
    "/etcdserverpb.Lease/LeaseLeases",
    "/etcdserverpb.Cluster/MemberList",
    "/etcdserverpb.Maintenance/Alarm",
    "/etcdserverpb.Maintenance/Status",
    "/etcdserverpb.Maintenance/Defragment",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/kine.admin.v1.TenantAdmin/CreateTenant",
    "/kine.admin.v1.TenantAdmin/ListTenants",
    "/kine.admin.v1.TenantAdmin/TenantStatus",
    "/kine.admin.v1.TenantAdmin/FreezeTenant",
    "/kine.admin.v1.TenantAdmin/UnfreezeTenant",
    "/kine.admin.v1.TenantAdmin/SetQuota",
    "/kine.admin.v1.TenantAdmin/DeleteTenant",
];

/// The gRPC status codes, 0 (OK) to 16 (Unauthenticated), as they appear in `grpc-status`.
pub const STATUS_CODES: &[&str] = &[
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
];

/// The metric label of a request path: the path when kine-rs serves it, else `unknown`.
pub fn method_label(path: &str) -> &'static str {
    KNOWN_METHODS
        .iter()
        .copied()
        .find(|known| *known == path)
        .unwrap_or("unknown")
}

/// The metric label of a `grpc-status` value: the code when it is one, else `unknown`.
pub fn code_label(status: &str) -> &'static str {
    STATUS_CODES
        .iter()
        .copied()
        .find(|code| *code == status)
        .unwrap_or("unknown")
}

/// Labels of an SQL query metric: the driver and the kind of query.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueryLabels {
    pub driver: &'static str,
    pub query: &'static str,
}

/// Labels of a failed SQL query: the driver, the kind of query and of failure.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueryErrorLabels {
    pub driver: &'static str,
    pub query: &'static str,
    /// `unavailable` (the datastore is unreachable, or a retry may succeed) or `storage`.
    pub kind: &'static str,
}

/// The process's metrics.
pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<RpcLabels, Counter>,
    pub latency: Family<MethodLabels, Histogram>,
    pub sql_duration: Family<QueryLabels, Histogram>,
    pub sql_errors: Family<QueryErrorLabels, Counter>,
    pub sql_slow: Family<QueryLabels, Counter>,
    pub write_batch_size: Histogram,
    pub open_tenants: Gauge,
}

static GLOBAL: OnceLock<Arc<Metrics>> = OnceLock::new();

/// `--slow-sql-threshold` in nanoseconds; 0 turns the slow-query log off.
static SLOW_SQL_NANOS: AtomicU64 = AtomicU64::new(1_000_000_000);

impl Metrics {
    /// The process's registry, created on first use.
    pub fn global() -> &'static Arc<Metrics> {
        GLOBAL.get_or_init(Metrics::new)
    }

    /// Registers every metric.
    fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("kine");
        let requests = Family::<RpcLabels, Counter>::default();
        registry.register(
            "grpc_requests",
            "gRPC requests handled, by method and status code",
            requests.clone(),
        );
        let latency = Family::<MethodLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 18))
        });
        registry.register(
            "grpc_request_duration_seconds",
            "Time to answer a unary gRPC request",
            latency.clone(),
        );
        let sql_duration = Family::<QueryLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.00005, 2.0, 18))
        });
        registry.register(
            "sql_query_duration_seconds",
            "Time of a datastore query (or transaction step), by driver and kind of query",
            sql_duration.clone(),
        );
        let sql_errors = Family::<QueryErrorLabels, Counter>::default();
        registry.register(
            "sql_errors",
            "Failed datastore queries, by driver, kind of query and kind of failure",
            sql_errors.clone(),
        );
        let sql_slow = Family::<QueryLabels, Counter>::default();
        registry.register(
            "sql_slow_queries",
            "Datastore queries slower than --slow-sql-threshold, by driver and kind of query",
            sql_slow.clone(),
        );
        let write_batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 9));
        registry.register(
            "write_batch_size",
            "Write requests committed together in one database transaction (group commit)",
            write_batch_size.clone(),
        );
        let open_tenants = Gauge::default();
        registry.register(
            "open_tenants",
            "Tenants this process holds open (idle ones are closed after --tenant-idle-timeout)",
            open_tenants.clone(),
        );
        Arc::new(Metrics {
            open_tenants,
            registry,
            requests,
            latency,
            sql_duration,
            sql_errors,
            sql_slow,
            write_batch_size,
        })
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Time spent in datastore queries so far, by driver and kind of query: (driver, query,
/// count, seconds), the slowest kind first. Read from the text exposition (the metric
/// families cannot be iterated), for a one-off report such as `kine-rs migrate`'s summary.
pub fn sql_totals() -> Vec<(String, String, u64, f64)> {
    let text = Metrics::global().render();
    let mut totals: Vec<(String, String, u64, f64)> = Vec::new();
    for line in text.lines() {
        let (is_sum, rest) =
            if let Some(rest) = line.strip_prefix("kine_sql_query_duration_seconds_sum{") {
                (true, rest)
            } else if let Some(rest) = line.strip_prefix("kine_sql_query_duration_seconds_count{") {
                (false, rest)
            } else {
                continue;
            };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|pair| {
                    pair.strip_prefix(name)?
                        .strip_prefix("=\"")?
                        .strip_suffix('"')
                })
                .unwrap_or_default()
                .to_string()
        };
        let (driver, query) = (label("driver"), label("query"));
        let index = match totals.iter().position(|t| t.0 == driver && t.1 == query) {
            Some(index) => index,
            None => {
                totals.push((driver, query, 0, 0.0));
                totals.len() - 1
            }
        };
        if is_sum {
            totals[index].3 = value.parse().unwrap_or(0.0);
        } else {
            totals[index].2 = value.parse().unwrap_or(0);
        }
    }
    totals.sort_by(|a, b| b.3.total_cmp(&a.3));
    totals
}

/// Sets `--slow-sql-threshold`: queries at least this slow are logged; zero logs none.
pub fn set_slow_sql_threshold(threshold: Duration) {
    let nanos = u64::try_from(threshold.as_nanos()).unwrap_or(u64::MAX);
    SLOW_SQL_NANOS.store(nanos, Ordering::Relaxed);
}

/// The current `--slow-sql-threshold`.
pub fn slow_sql_threshold() -> Duration {
    Duration::from_nanos(SLOW_SQL_NANOS.load(Ordering::Relaxed))
}

/// Records one datastore query: its duration, its failure, and a WARN line when it was slow.
/// The log line names the driver and the kind of query only, never a statement's values.
pub fn sql_query(
    driver: &'static str,
    query: &'static str,
    elapsed: Duration,
    error: Option<&KineError>,
) {
    let metrics = Metrics::global();
    let labels = QueryLabels { driver, query };
    metrics
        .sql_duration
        .get_or_create(&labels)
        .observe(elapsed.as_secs_f64());
    if let Some(error) = error {
        let kind = match error {
            KineError::Unavailable(_) => "unavailable",
            _ => "storage",
        };
        metrics
            .sql_errors
            .get_or_create(&QueryErrorLabels {
                driver,
                query,
                kind,
            })
            .inc();
    }
    let threshold = slow_sql_threshold();
    if !threshold.is_zero() && elapsed >= threshold {
        metrics.sql_slow.get_or_create(&labels).inc();
        warn!(
            driver,
            query,
            duration = ?elapsed,
            threshold = ?threshold,
            "slow SQL query"
        );
    }
}

/// Records how many tenants this process holds open.
pub fn open_tenants(count: usize) {
    Metrics::global()
        .open_tenants
        .set(i64::try_from(count).unwrap_or(i64::MAX));
}

/// Records how many write requests one group commit applied.
pub fn write_batch(size: usize) {
    Metrics::global().write_batch_size.observe(size as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_sql_and_batch_metrics() {
        sql_query("sqlite", "range", Duration::from_millis(2), None);
        sql_query(
            "sqlite",
            "commit",
            Duration::from_millis(1),
            Some(&KineError::Unavailable("down".into())),
        );
        write_batch(3);
        let text = Metrics::global().render();
        assert!(
            text.contains(
                "kine_sql_query_duration_seconds_count{driver=\"sqlite\",query=\"range\"}"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "kine_sql_errors_total{driver=\"sqlite\",query=\"commit\",kind=\"unavailable\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("kine_write_batch_size_bucket{le=\"4.0\"}"),
            "{text}"
        );
    }

    #[test]
    fn labels_only_known_methods_and_codes() {
        assert_eq!(
            method_label("/etcdserverpb.KV/Range"),
            "/etcdserverpb.KV/Range"
        );
        assert_eq!(method_label("/etcdserverpb.KV/Nope"), "unknown");
        assert_eq!(method_label("/x/../etcdserverpb.KV/Range"), "unknown");
        assert_eq!(code_label("14"), "14");
        assert_eq!(code_label("17"), "unknown");
    }
}
