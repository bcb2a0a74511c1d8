//! End to end, against real parts: a management kube-apiserver (v1.36.3, on kine-rs on
//! SQLite), the controller (in process), real PostgreSQL and MariaDB/MySQL. A DataStore per
//! database, a tenant kube-apiserver Deployment and a TenantDatastore: the controller
//! provisions the tenant's database and login, writes its Secret and wires the Deployment.
//! With no kubelet, the test then runs the wired pod itself: the kine-rs sidecar and the
//! tenant kube-apiserver as local processes, from the Deployment's own container specs and
//! the Secret; kubectl against the tenant works. Then: `writable: false` freezes the tenant
//! (kube-apiserver's writes fail, reads go on), a change of `spec.dataStore` migrates it from
//! PostgreSQL to MySQL and the rewired pod serves the same objects with the same
//! resourceVersions; the DataStore in use refuses deletion and names its user; deleting the
//! binding (deletionPolicy Delete) drops the tenant's databases and logins, after which the
//! DataStore goes. The management apiserver authorizes with RBAC, and the controller runs as
//! the chart's ServiceAccount with the chart's ClusterRole (impersonated): the least verbs
//! the chart grants are enough. Bad input on the way: an unreachable DataStore gets a clear condition, a
//! binding to a missing DataStore waits with a reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{ApiServer, ChildGuard, Management, base64, free_port, service, spawn_kine};
use kine_controller::wiring::SidecarSettings;
use serde_json::Value;
use sqlx::{Connection, Row};

const NS: &str = "tenants";

/// Runs the controller in a thread of its own, as the binary does; returns the port of its
/// /metrics.
fn start_controller(kubeconfig: PathBuf) -> u16 {
    let http_port = free_port();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "kine_controller=info,warn".into()),
                )
                .with_test_writer()
                .try_init();
            let client = common::client_from(&kubeconfig).await;
            let sidecar = SidecarSettings {
                image: "kine-rs:e2e".into(),
                ..SidecarSettings::default()
            };
            let ctx = std::sync::Arc::new(kine_controller::Context::new(client, sidecar));
            let address = std::net::SocketAddr::from(([127, 0, 0, 1], http_port));
            tokio::spawn(kine_controller::controller::serve_http(
                address,
                ctx.clone(),
            ));
            kine_controller::controller::run(ctx).await;
        });
    });
    http_port
}

/// The controller's /metrics (a plain HTTP/1.0 GET).
fn metrics(port: u16) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics port");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    response
}

/// The notes of the events.k8s.io Events with `reason` about `object` in the namespace.
fn events(api: &ApiServer, reason: &str, object: &str) -> Vec<String> {
    let list: Value = serde_json::from_str(&api.kubectl(&[
        "-n",
        NS,
        "get",
        "events.v1.events.k8s.io",
        "-o",
        "json",
    ]))
    .expect("events json");
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["reason"] == reason && e["regarding"]["name"] == object)
        .map(|e| e["note"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Waits until `kubectl get … -o jsonpath=PATH` prints what `ok` accepts.
fn wait_for(api: &ApiServer, what: &[&str], path: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    let jsonpath = format!("jsonpath={path}");
    let mut args: Vec<&str> = vec!["get"];
    args.extend_from_slice(what);
    args.extend_from_slice(&["-o", &jsonpath]);
    loop {
        let out = api.try_kubectl(&args);
        if out.status.success() && ok(&out.stdout) {
            return out.stdout;
        }
        assert!(
            Instant::now() < deadline,
            "{what:?} {path}: still {:?} {:?} after 90s",
            out.stdout,
            out.stderr
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn condition(api: &ApiServer, what: &[&str], type_: &str) -> String {
    let mut args = vec!["get"];
    args.extend_from_slice(what);
    args.extend_from_slice(&["-o", "json"]);
    let object: Value = serde_json::from_str(&api.kubectl(&args)).expect("json");
    object["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == type_)
        .map(|c| {
            format!(
                "{} {}: {}",
                c["status"].as_str().unwrap_or(""),
                c["reason"].as_str().unwrap_or(""),
                c["message"].as_str().unwrap_or("")
            )
        })
        .unwrap_or_default()
}

fn wait_condition(api: &ApiServer, what: &[&str], type_: &str, expected: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let c = condition(api, what, type_);
        if c.starts_with(expected) {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "{what:?}: condition {type_} is {c:?}, expected {expected:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn secret_value(api: &ApiServer, name: &str, key: &str) -> String {
    api.kubectl(&[
        "-n",
        NS,
        "get",
        "secret",
        name,
        "-o",
        &format!("go-template={{{{index .data \"{key}\" | base64decode}}}}"),
    ])
}

fn deployment(api: &ApiServer, name: &str) -> Value {
    serde_json::from_str(&api.kubectl(&[
        "-n",
        NS,
        "get",
        "deployment",
        name,
        "-o",
        "json",
        "--show-managed-fields",
    ]))
    .expect("deployment json")
}

/// The wired pod, run locally: the kine-rs sidecar and the tenant kube-apiserver, from the
/// Deployment's container specs and the Secret its env refers to. `/run/kine-rs` (the
/// shared emptyDir) becomes `socket_dir`.
struct TenantPod {
    api: ApiServer,
    _sidecar: ChildGuard,
}

impl TenantPod {
    fn start(management: &ApiServer, dir: &Path, port: u16, name: &str) -> TenantPod {
        let deployment = deployment(management, name);
        let pod = &deployment["spec"]["template"]["spec"];
        let volume_dir = dir.join("run-kine-rs");
        let _ = std::fs::remove_dir_all(&volume_dir);
        std::fs::create_dir_all(&volume_dir).expect("socket dir");
        // The datastore's TLS files, when the sidecar mounts them.
        let tls_dir = dir.join("datastore-tls");
        let has_tls = pod["volumes"]
            .as_array()
            .is_some_and(|v| v.iter().any(|v| v["name"] == "kine-rs-datastore-tls"));
        if has_tls {
            mount_secret_volume(management, NS, pod, "kine-rs-datastore-tls", &tls_dir);
        }
        let mount = |text: &str| {
            text.replace("/etc/kine-rs/datastore-tls", &tls_dir.display().to_string())
                .replace("/run/kine-rs", &volume_dir.display().to_string())
        };
        let containers = pod["containers"].as_array().expect("containers");
        let find = |name: &str| {
            containers
                .iter()
                .find(|c| c["name"] == name)
                .unwrap_or_else(|| panic!("no container {name} in {pod}"))
        };
        let sidecar = find("kine-rs");
        let args: Vec<String> = sidecar["args"]
            .as_array()
            .expect("sidecar args")
            .iter()
            .map(|a| mount(a.as_str().expect("arg")))
            .collect();
        let mut env = Vec::new();
        for var in sidecar["env"].as_array().expect("sidecar env") {
            let name = var["name"].as_str().expect("env name").to_string();
            let value = match var["value"].as_str() {
                Some(value) => value.to_string(),
                None => {
                    let key_ref = &var["valueFrom"]["secretKeyRef"];
                    secret_value(
                        management,
                        key_ref["name"].as_str().expect("secret name"),
                        key_ref["key"].as_str().expect("secret key"),
                    )
                }
            };
            env.push((name, value));
        }
        let socket = args
            .iter()
            .find_map(|a| a.strip_prefix("--listen-address=unix://"))
            .expect("the sidecar listens on a unix socket")
            .to_string();
        let sidecar = spawn_kine(
            &args,
            &env,
            &dir.join(format!("sidecar-{port}.log")),
            &socket,
        );
        let apiserver_args: Vec<String> = find("kube-apiserver")["args"]
            .as_array()
            .expect("apiserver args")
            .iter()
            .map(|a| mount(a.as_str().expect("arg")))
            .collect();
        let api = ApiServer::start(&dir.join("tenant-api"), port, &apiserver_args);
        TenantPod {
            api,
            _sidecar: sidecar,
        }
    }
}

fn resource_version(api: &ApiServer, object: &str) -> String {
    api.kubectl(&["get", object, "-o", "jsonpath={.metadata.resourceVersion}"])
}

/// A management cluster with the CRDs, the chart's ServiceAccount and RBAC, and the
/// controller running as that ServiceAccount (impersonated), with only those rights.
fn setup() -> (Management, u16) {
    let management = Management::start_rbac();
    management.install_crds();
    let api = &management.api;
    // The controller runs with the chart's ServiceAccount and RBAC only (impersonated).
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/kine-rs");
    let rbac = common::run_bounded({
        let mut helm = std::process::Command::new(common::helm_binary());
        helm.args([
            "template",
            "kine-rs",
            chart,
            "--namespace",
            "kine-system",
            "--show-only",
            "templates/rbac.yaml",
            "--show-only",
            "templates/serviceaccount.yaml",
        ]);
        helm
    });
    assert!(rbac.status.success(), "helm template: {}", rbac.stderr);
    api.kubectl(&["create", "namespace", "kine-system"]);
    api.apply(&rbac.stdout);
    let controller_kubeconfig = common::impersonating_kubeconfig(api, "kine-system", "kine-rs");
    let can_i = |args: &[&str]| {
        let mut command = api.command(&["auth", "can-i"]);
        command.args(args).env("KUBECONFIG", &controller_kubeconfig);
        common::run_bounded(command).stdout.trim().to_string()
    };
    assert_eq!(can_i(&["patch", "deployments", "-n", NS]), "yes");
    assert_eq!(can_i(&["delete", "secrets", "-n", NS]), "no");
    assert_eq!(can_i(&["update", "deployments", "-n", NS]), "no");
    let metrics_port = start_controller(controller_kubeconfig);
    api.kubectl(&["create", "namespace", NS]);
    (management, metrics_port)
}

/// A Deployment of a tenant kube-apiserver, as a user would have it (its etcd flags are
/// replaced by the wiring), to run locally on `port` with the files in `dir`.
fn apiserver_deployment(name: &str, dir: &Path, port: u16) -> String {
    let files = common::ApiServerFiles::new(dir);
    let mut args = files.args(port, "https://etcd.example:2379");
    args.push("--etcd-cafile=/etc/etcd/ca.crt".into());
    let args_yaml: String = args
        .iter()
        .map(|a| format!("\n        - \"{a}\""))
        .collect();
    format!(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: {NS}}}
spec:
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      containers:
      - name: kube-apiserver
        image: registry.k8s.io/kube-apiserver:v1.36.3
        args:{args_yaml}
"#
    )
}

#[test]
fn postgres_and_mysql_end_to_end() {
    let started = Instant::now();
    let (management, metrics_port) = setup();
    let api = &management.api;

    let (pg_host, pg_port, pg_user, pg_password) = service(
        "KINE_TEST_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/postgres",
    );
    let (my_host, my_port, my_user, my_password) =
        service("KINE_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/mysql");
    let unreachable = free_port();
    api.apply(&format!(
        r#"
apiVersion: v1
kind: Secret
metadata: {{name: mysql-admin, namespace: {NS}}}
stringData: {{username: "{my_user}", password: "{my_password}"}}
---
apiVersion: kine-rs.io/v1alpha1
kind: DataStore
metadata: {{name: pg-a, labels: {{tier: sql}}}}
spec:
  driver: PostgreSQL
  endpoints: ["{pg_host}:{pg_port}"]
  basicAuth:
    username: {{content: "{}"}}
    password: {{content: "{}"}}
  capacity: {{maxTenants: 10}}
---
apiVersion: kine-rs.io/v1alpha1
kind: DataStore
metadata: {{name: my-a}}
spec:
  driver: MySQL
  endpoints: ["{my_host}:{my_port}"]
  basicAuth:
    username: {{secretReference: {{name: mysql-admin, namespace: {NS}, keyPath: username}}}}
    password: {{secretReference: {{name: mysql-admin, namespace: {NS}, keyPath: password}}}}
---
apiVersion: kine-rs.io/v1alpha1
kind: DataStore
metadata: {{name: down}}
spec:
  driver: PostgreSQL
  endpoints: ["127.0.0.1:{unreachable}"]
"#,
        base64(pg_user.as_bytes()),
        base64(pg_password.as_bytes()),
    ));
    // The driver cannot change (CEL transition rule).
    let out = api.try_kubectl(&[
        "patch",
        "datastore",
        "pg-a",
        "--type=merge",
        "-p",
        r#"{"spec":{"driver":"MySQL"}}"#,
    ]);
    assert!(
        !out.status.success() && out.stderr.contains("driver is immutable"),
        "{}{}",
        out.stdout,
        out.stderr
    );
    wait_condition(api, &["datastore", "pg-a"], "Ready", "True Reachable");
    wait_condition(api, &["datastore", "my-a"], "Ready", "True Reachable");
    let down = wait_condition(api, &["datastore", "down"], "Ready", "False Unreachable");
    assert!(down.contains(&format!("127.0.0.1:{unreachable}")), "{down}");
    eprintln!(
        "[{:.0?}] DataStores checked: down says {down:?}",
        started.elapsed()
    );

    // The tenant's kube-apiserver Deployment, as a user would have it (its etcd flags are
    // replaced by the wiring), and the binding.
    let tenant_dir = management.dir.path().join("tenant");
    let tenant_port = free_port();
    api.apply(&apiserver_deployment(
        "apiserver",
        &tenant_dir.join("files"),
        tenant_port,
    ));
    api.apply(&format!(
        r#"
apiVersion: kine-rs.io/v1alpha1
kind: TenantDatastore
metadata: {{name: tenant-a, namespace: {NS}}}
spec:
  apiServer: {{name: apiserver}}
  dataStore: pg-a
  deletionPolicy: Delete
  quota: {{keys: 100000}}
---
apiVersion: kine-rs.io/v1alpha1
kind: TenantDatastore
metadata: {{name: orphan, namespace: {NS}}}
spec:
  apiServer: {{name: nothing}}
  dataStore: missing
"#
    ));
    let orphan = wait_condition(
        api,
        &["-n", NS, "tds", "orphan"],
        "Ready",
        "False DataStoreNotFound",
    );
    assert!(
        orphan.contains("DataStore missing does not exist"),
        "{orphan}"
    );
    wait_for(
        api,
        &["-n", NS, "tds", "tenant-a"],
        "{.status.phase}",
        |p| p == "Ready",
    );
    eprintln!("[{:.0?}] tenant-a Ready on pg-a", started.elapsed());

    // What the controller made: the tenant name from the UID, a database owned by a login
    // role without any other right, the Secret, the wiring.
    let uid = api.kubectl(&[
        "-n",
        NS,
        "get",
        "tds",
        "tenant-a",
        "-o",
        "jsonpath={.metadata.uid}",
    ]);
    let tenant = api.kubectl(&[
        "-n",
        NS,
        "get",
        "tds",
        "tenant-a",
        "-o",
        "jsonpath={.status.tenant}",
    ]);
    assert_eq!(tenant, format!("t-{uid}"));
    let database = api.kubectl(&[
        "-n",
        NS,
        "get",
        "tds",
        "tenant-a",
        "-o",
        "jsonpath={.status.database}",
    ]);
    assert_eq!(database, kine_controller::provision::object_name(&tenant));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let pg_admin_url = std::env::var("KINE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    runtime.block_on(async {
        let mut conn = sqlx::PgConnection::connect(&pg_admin_url).await.expect("postgres");
        let row = sqlx::query(
            "SELECT rolsuper, rolcreatedb, rolcreaterole, rolcanlogin FROM pg_roles WHERE rolname = $1",
        )
        .bind(&database)
        .fetch_one(&mut conn)
        .await
        .expect("the tenant's role exists");
        let flags: (bool, bool, bool, bool) = (row.get(0), row.get(1), row.get(2), row.get(3));
        assert_eq!(flags, (false, false, false, true), "role {database}");
        let owner: String = sqlx::query(
            "SELECT pg_get_userbyid(datdba)::text FROM pg_database WHERE datname = $1",
        )
        .bind(&database)
        .fetch_one(&mut conn)
        .await
        .expect("the tenant's database exists")
        .get(0);
        assert_eq!(owner, database);
    });
    let endpoint = secret_value(api, "tenant-a-kine-rs", "endpoint");
    assert!(
        endpoint.starts_with(&format!("postgres://{database}:"))
            && endpoint.ends_with(&format!("@{pg_host}:{pg_port}/{database}")),
        "endpoint of the Secret: {}",
        kine::run::redact_endpoint(&endpoint)
    );
    assert_eq!(secret_value(api, "tenant-a-kine-rs", "tenant"), tenant);
    let wired = deployment(api, "apiserver");
    let pod = &wired["spec"]["template"]["spec"];
    let containers: HashMap<&str, &Value> = pod["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .map(|c| (c["name"].as_str().expect("name"), c))
        .collect();
    let apiserver_args: Vec<&str> = containers["kube-apiserver"]["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        apiserver_args.contains(&"--etcd-servers=unix:///run/kine-rs/kine.sock"),
        "{apiserver_args:?}"
    );
    assert!(
        !apiserver_args
            .iter()
            .any(|a| a.contains("etcd.example") || a.starts_with("--etcd-cafile")),
        "{apiserver_args:?}"
    );
    assert!(apiserver_args.contains(&format!("--secure-port={tenant_port}").as_str()));
    let sidecar = containers["kine-rs"];
    assert_eq!(sidecar["image"], "kine-rs:e2e");
    assert_eq!(
        sidecar["env"][0]["valueFrom"]["secretKeyRef"]["name"], "tenant-a-kine-rs",
        "{sidecar}"
    );
    assert_eq!(pod["volumes"][0]["emptyDir"]["medium"], "Memory", "{pod}");
    let checksum_pg =
        wired["spec"]["template"]["metadata"]["annotations"]["kine-rs.io/config-checksum"]
            .as_str()
            .expect("checksum annotation")
            .to_string();
    let managers: Vec<&str> = wired["metadata"]["managedFields"]
        .as_array()
        .expect("managedFields")
        .iter()
        .filter_map(|f| f["manager"].as_str())
        .collect();
    assert!(
        managers.contains(&"kine-rs-controller-wiring"),
        "{managers:?}"
    );

    // The wired pod, run here: kubectl against the tenant works.
    let pod = TenantPod::start(api, &tenant_dir, tenant_port, "apiserver");
    let tenant_api = &pod.api;
    tenant_api.kubectl(&["create", "configmap", "cm1", "--from-literal=a=1"]);
    tenant_api.kubectl(&["create", "configmap", "cm2", "--from-literal=a=2"]);
    let rv1 = resource_version(tenant_api, "configmap/cm1");
    let rv2 = resource_version(tenant_api, "configmap/cm2");
    eprintln!(
        "[{:.0?}] tenant kube-apiserver serves from pg-a",
        started.elapsed()
    );

    // Freeze: writes refused, reads go on; unfreeze.
    api.kubectl(&[
        "-n",
        NS,
        "patch",
        "tds",
        "tenant-a",
        "--type=merge",
        "-p",
        r#"{"spec":{"writable":false}}"#,
    ]);
    wait_for(
        api,
        &["-n", NS, "tds", "tenant-a"],
        "{.status.phase}",
        |p| p == "Frozen",
    );
    let out = tenant_api.try_kubectl(&["create", "configmap", "frozen", "--from-literal=a=x"]);
    assert!(
        !out.status.success(),
        "a write to a frozen tenant: {}",
        out.stdout
    );
    assert_eq!(
        tenant_api.kubectl(&["get", "configmap", "cm1", "-o", "jsonpath={.data.a}"]),
        "1"
    );
    api.kubectl(&[
        "-n",
        NS,
        "patch",
        "tds",
        "tenant-a",
        "--type=merge",
        "-p",
        r#"{"spec":{"writable":true}}"#,
    ]);
    wait_for(
        api,
        &["-n", NS, "tds", "tenant-a"],
        "{.status.phase}",
        |p| p == "Ready",
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !tenant_api
        .try_kubectl(&["create", "configmap", "cm3", "--from-literal=a=3"])
        .status
        .success()
    {
        assert!(
            Instant::now() < deadline,
            "writes did not come back after unfreezing"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let rv3 = resource_version(tenant_api, "configmap/cm3");
    eprintln!("[{:.0?}] freeze and unfreeze done", started.elapsed());

    // Migration to MySQL while the tenant runs.
    api.kubectl(&[
        "-n",
        NS,
        "patch",
        "tds",
        "tenant-a",
        "--type=merge",
        "-p",
        r#"{"spec":{"dataStore":"my-a"}}"#,
    ]);
    wait_for(
        api,
        &["-n", NS, "tds", "tenant-a"],
        "{.status.currentDataStore}/{.status.phase}/{.status.migration.phase}",
        |s| s == "my-a/Ready/done",
    );
    let migrated = condition(api, &["-n", NS, "tds", "tenant-a"], "Migrating");
    assert!(
        migrated.starts_with("False MigrationSucceeded"),
        "{migrated}"
    );
    let endpoint = secret_value(api, "tenant-a-kine-rs", "endpoint");
    assert!(
        endpoint.starts_with(&format!("mysql://{database}:")),
        "{}",
        kine::run::redact_endpoint(&endpoint)
    );
    let checksum_my = deployment(api, "apiserver")["spec"]["template"]["metadata"]["annotations"]
        ["kine-rs.io/config-checksum"]
        .as_str()
        .expect("checksum")
        .to_string();
    assert_ne!(checksum_pg, checksum_my, "the pod template must roll");
    let notes = events(api, "Migrated", "tenant-a");
    assert!(
        notes
            .iter()
            .any(|n| n.contains("from DataStore pg-a to my-a")),
        "{notes:?}"
    );
    assert!(!events(api, "Provisioned", "tenant-a").is_empty());
    let text = metrics(metrics_port);
    assert!(
        text.contains("kine_rs_controller_migrations_total{result=\"succeeded\"} 1"),
        "{text}"
    );
    assert!(text.contains("kine_rs_controller_reconciles_total{kind=\"TenantDatastore\"}"));
    eprintln!("[{:.0?}] migrated to my-a", started.elapsed());
    // The old pod's writes are refused now (its source keyspace was moved).
    drop(pod);

    // The rolled pod: same objects, same resourceVersions.
    let pod = TenantPod::start(api, &tenant_dir, tenant_port, "apiserver");
    let tenant_api = &pod.api;
    assert_eq!(resource_version(tenant_api, "configmap/cm1"), rv1);
    assert_eq!(resource_version(tenant_api, "configmap/cm2"), rv2);
    assert_eq!(resource_version(tenant_api, "configmap/cm3"), rv3);
    assert_eq!(
        tenant_api.kubectl(&["get", "configmap", "cm2", "-o", "jsonpath={.data.a}"]),
        "2"
    );
    tenant_api.kubectl(&["create", "configmap", "cm4", "--from-literal=a=4"]);
    let rv4: u64 = resource_version(tenant_api, "configmap/cm4")
        .parse()
        .expect("rv");
    assert!(rv4 > rv3.parse::<u64>().expect("rv"), "{rv4} after {rv3}");
    let mysql_url = std::env::var("KINE_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/mysql".into());
    runtime.block_on(async {
        let mut conn = sqlx::MySqlConnection::connect(&mysql_url)
            .await
            .expect("mysql");
        let grants: Vec<String> = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SHOW GRANTS FOR '{database}'@'%'"
        )))
        .fetch_all(&mut conn)
        .await
        .expect("grants")
        .iter()
        .map(|r| r.get::<String, _>(0))
        .collect();
        assert_eq!(grants.len(), 2, "{grants:?}");
        assert!(grants[0].starts_with("GRANT USAGE ON *.*"), "{grants:?}");
        assert!(
            grants[1].contains(&format!("ON `{database}`.*")) && !grants[1].contains("ALL"),
            "{grants:?}"
        );
    });
    drop(pod);

    // A DataStore in use is not deleted, and says by whom.
    api.kubectl(&["delete", "datastore", "my-a", "--wait=false"]);
    let blocked = wait_condition(api, &["datastore", "my-a"], "DeletionBlocked", "True InUse");
    assert!(blocked.contains(&format!("{NS}/tenant-a")), "{blocked}");

    // Deleting the binding (Delete) drops the tenant's databases; then the store goes.
    api.kubectl(&["-n", NS, "delete", "tds", "tenant-a", "--timeout=60s"]);
    api.kubectl(&["wait", "--for=delete", "datastore/my-a", "--timeout=60s"]);
    runtime.block_on(async {
        let mut conn = sqlx::MySqlConnection::connect(&mysql_url)
            .await
            .expect("mysql");
        let left: i64 =
            sqlx::query("SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?")
                .bind(&database)
                .fetch_one(&mut conn)
                .await
                .expect("schemata")
                .get(0);
        assert_eq!(left, 0, "database {database} was not dropped on MySQL");
        let mut pg = sqlx::PgConnection::connect(&pg_admin_url)
            .await
            .expect("postgres");
        let left: i64 = sqlx::query("SELECT COUNT(*) FROM pg_roles WHERE rolname = $1")
            .bind(&database)
            .fetch_one(&mut pg)
            .await
            .expect("roles")
            .get(0);
        assert_eq!(left, 0, "role {database} was not dropped on PostgreSQL");
    });
    eprintln!(
        "postgres_and_mysql_end_to_end passed in {:.1?}",
        started.elapsed()
    );
}

/// Whether NATS holds a keyspace named `tenant` (through the kine-rs library).
fn nats_keyspace(runtime: &tokio::runtime::Runtime, endpoint: &str, tenant: &str) -> bool {
    runtime.block_on(async {
        let backend = kine::storage::open(endpoint, &kine::storage::BackendOptions::default())
            .await
            .expect("open NATS");
        backend
            .keyspace(tenant, false)
            .await
            .expect("keyspace")
            .is_some()
    })
}

/// NATS, placed by the scheduler: two NATS DataStores with room for one tenant each and a
/// label; bindings with a label selector and no `dataStore` spread over them, a third waits
/// (`NoDataStoreAvailable`). The first tenant's wired pod serves kubectl from NATS, then
/// moves to PostgreSQL (cross-driver, same resourceVersions). Deletion: `Retain` keeps the
/// NATS keyspace, `Delete` drops it (and the PostgreSQL database).
#[test]
fn nats_scheduled_end_to_end() {
    let started = Instant::now();
    let (management, metrics_port) = setup();
    let api = &management.api;
    let (nats_host, nats_port, _, _) = service("KINE_TEST_NATS_URL", "nats://127.0.0.1:4222");
    let (pg_host, pg_port, pg_user, _) = service(
        "KINE_TEST_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/postgres",
    );
    api.apply(&format!(
        r#"
apiVersion: kine-rs.io/v1alpha1
kind: DataStore
metadata: {{name: nats-a, labels: {{tier: nats}}}}
spec:
  driver: NATS
  endpoints: ["{nats_host}:{nats_port}"]
  capacity: {{maxTenants: 1}}
---
apiVersion: kine-rs.io/v1alpha1
kind: DataStore
metadata: {{name: nats-b, labels: {{tier: nats}}}}
spec:
  driver: NATS
  endpoints: ["{nats_host}:{nats_port}"]
  capacity: {{maxTenants: 1}}
---
apiVersion: kine-rs.io/v1alpha1
kind: DataStore
metadata: {{name: pg-n}}
spec:
  driver: PostgreSQL
  endpoints: ["{pg_host}:{pg_port}"]
  basicAuth:
    username: {{content: "{}"}}
    password: {{content: ""}}
"#,
        base64(pg_user.as_bytes())
    ));
    for store in ["nats-a", "nats-b", "pg-n"] {
        wait_condition(api, &["datastore", store], "Ready", "True Reachable");
    }
    let tenant_dir = management.dir.path().join("tenant-n");
    let tenant_port = free_port();
    api.apply(&apiserver_deployment(
        "api-n1",
        &tenant_dir.join("files"),
        tenant_port,
    ));
    let binding = |name: &str, workload: &str, policy: &str| {
        format!(
            r#"
apiVersion: kine-rs.io/v1alpha1
kind: TenantDatastore
metadata: {{name: {name}, namespace: {NS}}}
spec:
  apiServer: {{name: {workload}}}
  dataStoreSelector: {{tier: nats}}
  deletionPolicy: {policy}
"#
        )
    };
    api.apply(&binding("n1", "api-n1", "Delete"));
    let first = wait_for(
        api,
        &["-n", NS, "tds", "n1"],
        "{.status.currentDataStore}/{.status.phase}",
        |s| s.ends_with("/Ready"),
    );
    let first = first.trim_end_matches("/Ready").to_string();
    wait_for(api, &["datastore", &first], "{.status.tenants}", |t| {
        t == "1"
    });
    // The second tenant goes to the other store (the first is full), the third waits.
    api.apply(&binding("n2", "api-n2", "Retain"));
    let second = wait_for(
        api,
        &["-n", NS, "tds", "n2"],
        "{.status.currentDataStore}",
        |s| !s.is_empty(),
    );
    assert_ne!(first, second, "the scheduler put both tenants on {first}");
    // (n2's workload does not exist: provisioned, not wired, with a reason.)
    let n2 = wait_condition(
        api,
        &["-n", NS, "tds", "n2"],
        "Ready",
        "False WorkloadNotFound",
    );
    assert!(n2.contains("api-n2 does not exist"), "{n2}");
    wait_for(api, &["datastore", &second], "{.status.tenants}", |t| {
        t == "1"
    });
    api.apply(&binding("n3", "api-n3", "Retain"));
    let n3 = wait_condition(
        api,
        &["-n", NS, "tds", "n3"],
        "Ready",
        "False NoDataStoreAvailable",
    );
    assert!(n3.contains("every matching DataStore is full"), "{n3}");
    eprintln!(
        "[{:.0?}] scheduled: n1 on {first}, n2 on {second}, n3 waits",
        started.elapsed()
    );

    let endpoint = secret_value(api, "n1-kine-rs", "endpoint");
    assert_eq!(endpoint, format!("nats://{nats_host}:{nats_port}"));
    let tenant1 = api.kubectl(&[
        "-n",
        NS,
        "get",
        "tds",
        "n1",
        "-o",
        "jsonpath={.status.tenant}",
    ]);
    let tenant2 = api.kubectl(&[
        "-n",
        NS,
        "get",
        "tds",
        "n2",
        "-o",
        "jsonpath={.status.tenant}",
    ]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    assert!(nats_keyspace(&runtime, &endpoint, &tenant1));
    assert!(nats_keyspace(&runtime, &endpoint, &tenant2));

    let pod = TenantPod::start(api, &tenant_dir, tenant_port, "api-n1");
    pod.api
        .kubectl(&["create", "configmap", "on-nats", "--from-literal=a=n"]);
    let rv = resource_version(&pod.api, "configmap/on-nats");
    eprintln!("[{:.0?}] tenant n1 serves from NATS", started.elapsed());

    // A migration that fails (the target database exists and belongs to someone else): the
    // tenant stays on NATS, writable, with the reason in its status and an Event.
    let pg_url = std::env::var("KINE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let blocker = kine_controller::provision::object_name(&tenant1);
    let sql = |statement: String| {
        runtime.block_on(async {
            let mut pg = sqlx::PgConnection::connect(&pg_url)
                .await
                .expect("postgres");
            sqlx::query(sqlx::AssertSqlSafe(statement))
                .execute(&mut pg)
                .await
                .expect("statement");
        })
    };
    sql(format!("CREATE DATABASE \"{blocker}\""));
    api.kubectl(&[
        "-n",
        NS,
        "patch",
        "tds",
        "n1",
        "--type=merge",
        "-p",
        r#"{"spec":{"dataStore":"pg-n"}}"#,
    ]);
    let failed = wait_for(
        api,
        &["-n", NS, "tds", "n1"],
        "{.status.currentDataStore}/{.status.phase}/{.status.migration.phase}",
        |s| s.ends_with("/failed"),
    );
    assert_eq!(failed, format!("{first}/Ready/failed"));
    let why = condition(api, &["-n", NS, "tds", "n1"], "Migrating");
    assert!(
        why.starts_with("False MigrationFailed") && why.contains("refusing to take it over"),
        "{why}"
    );
    let notes = events(api, "MigrationFailed", "n1");
    assert!(
        notes
            .iter()
            .any(|n| n.contains(&format!("stays on DataStore {first}"))),
        "{notes:?}"
    );
    pod.api
        .kubectl(&["create", "configmap", "after-failure", "--from-literal=a=f"]);
    sql(format!("DROP DATABASE \"{blocker}\""));
    // Not retried for the same generation; a new one (back, then forth) retries.
    api.kubectl(&[
        "-n",
        NS,
        "patch",
        "tds",
        "n1",
        "--type=merge",
        "-p",
        &format!(r#"{{"spec":{{"dataStore":"{first}"}}}}"#),
    ]);
    wait_for(
        api,
        &["-n", NS, "tds", "n1"],
        "{.status.observedGeneration}",
        |g| g == "3",
    );
    let text = metrics(metrics_port);
    assert!(
        text.contains("kine_rs_controller_migrations_total{result=\"failed\"} 1"),
        "{text}"
    );
    eprintln!(
        "[{:.0?}] a failed migration left n1 on {first}, writable",
        started.elapsed()
    );

    // NATS -> PostgreSQL.
    api.kubectl(&[
        "-n",
        NS,
        "patch",
        "tds",
        "n1",
        "--type=merge",
        "-p",
        r#"{"spec":{"dataStore":"pg-n"}}"#,
    ]);
    wait_for(
        api,
        &["-n", NS, "tds", "n1"],
        "{.status.currentDataStore}/{.status.phase}/{.status.migration.phase}",
        |s| s == "pg-n/Ready/done",
    );
    drop(pod);
    let pod = TenantPod::start(api, &tenant_dir, tenant_port, "api-n1");
    assert_eq!(resource_version(&pod.api, "configmap/on-nats"), rv);
    resource_version(&pod.api, "configmap/after-failure");
    pod.api
        .kubectl(&["create", "configmap", "on-postgres", "--from-literal=a=p"]);
    drop(pod);
    eprintln!("[{:.0?}] n1 moved to PostgreSQL", started.elapsed());

    // Retain keeps n2's keyspace; Delete drops n1's (moved) keyspace and its database.
    let database = api.kubectl(&[
        "-n",
        NS,
        "get",
        "tds",
        "n1",
        "-o",
        "jsonpath={.status.database}",
    ]);
    api.kubectl(&["-n", NS, "delete", "tds", "n2", "n1", "--timeout=60s"]);
    assert!(
        nats_keyspace(&runtime, &endpoint, &tenant2),
        "Retain dropped {tenant2}"
    );
    assert!(
        !nats_keyspace(&runtime, &endpoint, &tenant1),
        "Delete kept {tenant1}"
    );
    let pg_admin_url = std::env::var("KINE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    runtime.block_on(async {
        let mut pg = sqlx::PgConnection::connect(&pg_admin_url)
            .await
            .expect("postgres");
        let left: i64 = sqlx::query("SELECT COUNT(*) FROM pg_database WHERE datname = $1")
            .bind(&database)
            .fetch_one(&mut pg)
            .await
            .expect("databases")
            .get(0);
        assert_eq!(left, 0, "database {database} was not dropped");
        // The retained keyspace is the test's to remove.
        let backend = kine::storage::open(&endpoint, &kine::storage::BackendOptions::default())
            .await
            .expect("open NATS");
        kine_controller::tenant::delete(&*backend, &tenant2)
            .await
            .expect("delete the retained keyspace");
    });
    eprintln!(
        "nats_scheduled_end_to_end passed in {:.1?}",
        started.elapsed()
    );
}

/// The keys etcd holds under `prefix`.
fn etcd_keys(address: &str, prefix: &str) -> Vec<String> {
    common::etcdctl(address, &["get", prefix, "--prefix", "--keys-only"])
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// etcd (the oracle etcd 3.5, through kine-rs's tenant-prefixing proxy): a DataStore on it
/// is Ready (one with `basicAuth` is not: `AuthNotSupported`); a binding registers its tenant
/// in etcd (kine-rs's records under `/_kine-rs/`, with its quota), the wired pod's sidecar
/// serves the tenant kube-apiserver from the prefix `/<tenant>/`, kubectl works; a freeze is
/// a record in etcd that the sidecar obeys; `Delete` removes the tenant's keys and records.
#[test]
fn etcd_end_to_end() {
    let started = Instant::now();
    let (management, _metrics_port) = setup();
    let api = &management.api;
    let (_etcd, etcd) = common::spawn_etcd(&management.dir.path().join("etcd"));
    api.apply(&format!(
        r#"
apiVersion: kine-rs.io/v1alpha1
kind: DataStore
metadata: {{name: etcd-1}}
spec:
  driver: etcd
  endpoints: ["{etcd}"]
---
apiVersion: kine-rs.io/v1alpha1
kind: DataStore
metadata: {{name: etcd-login}}
spec:
  driver: etcd
  endpoints: ["{etcd}"]
  basicAuth:
    username: {{content: "{}"}}
    password: {{content: "{}"}}
"#,
        base64(b"root"),
        base64(b"secret")
    ));
    let ready = wait_condition(api, &["datastore", "etcd-1"], "Ready", "True Reachable");
    assert!(ready.contains(&etcd), "{ready}");
    let refused = wait_condition(
        api,
        &["datastore", "etcd-login"],
        "Ready",
        "False AuthNotSupported",
    );
    assert!(!refused.contains("secret"), "{refused}");
    api.kubectl(&["delete", "datastore", "etcd-login"]);

    let tenant_dir = management.dir.path().join("tenant-e");
    let tenant_port = free_port();
    api.apply(&apiserver_deployment(
        "api-e",
        &tenant_dir.join("files"),
        tenant_port,
    ));
    api.apply(&format!(
        r#"
apiVersion: kine-rs.io/v1alpha1
kind: TenantDatastore
metadata: {{name: e1, namespace: {NS}}}
spec:
  apiServer: {{name: api-e}}
  dataStore: etcd-1
  quota: {{keys: 100000}}
  deletionPolicy: Delete
"#
    ));
    wait_for(api, &["-n", NS, "tds", "e1"], "{.status.phase}", |p| {
        p == "Ready"
    });
    let tenant = api.kubectl(&[
        "-n",
        NS,
        "get",
        "tds",
        "e1",
        "-o",
        "jsonpath={.status.tenant}",
    ]);
    assert_eq!(
        secret_value(api, "e1-kine-rs", "endpoint"),
        format!("etcd://{etcd}")
    );
    assert_eq!(secret_value(api, "e1-kine-rs", "tenant"), tenant);
    // The tenant's records in etcd: registered, with its quota.
    let records = etcd_keys(&etcd, "/_kine-rs/");
    for record in [
        format!("/_kine-rs/tenants/{tenant}"),
        format!("/_kine-rs/quota/{tenant}"),
    ] {
        assert!(records.contains(&record), "{record} not in {records:?}");
    }
    let wired = deployment(api, "api-e");
    let args = wired["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(
        args.contains("--etcd-servers=unix:///run/kine-rs/kine.sock"),
        "{args}"
    );
    eprintln!(
        "[{:.0?}] tenant on etcd provisioned and wired",
        started.elapsed()
    );

    let pod = TenantPod::start(api, &tenant_dir, tenant_port, "api-e");
    pod.api
        .kubectl(&["create", "configmap", "on-etcd", "--from-literal=a=e"]);
    assert_eq!(
        pod.api
            .kubectl(&["get", "configmap", "on-etcd", "-o", "jsonpath={.data.a}"]),
        "e"
    );
    let keys = etcd_keys(&etcd, &format!("/{tenant}/"));
    assert!(
        // kube-apiserver's `/registry/…` keys, under the tenant's prefix `/<tenant>/`.
        keys.contains(&format!("/{tenant}//registry/configmaps/default/on-etcd")),
        "the tenant's keys are not under its prefix: {keys:?}"
    );
    assert!(
        etcd_keys(&etcd, "/registry/").is_empty(),
        "keys outside the tenant's prefix"
    );
    eprintln!("[{:.0?}] kubectl works on etcd", started.elapsed());

    // Freeze: a record in etcd that the sidecar obeys; unfreeze.
    api.kubectl(&[
        "-n",
        NS,
        "patch",
        "tds",
        "e1",
        "--type=merge",
        "-p",
        r#"{"spec":{"writable":false}}"#,
    ]);
    wait_for(api, &["-n", NS, "tds", "e1"], "{.status.phase}", |p| {
        p == "Frozen"
    });
    assert!(etcd_keys(&etcd, "/_kine-rs/frozen/").contains(&format!("/_kine-rs/frozen/{tenant}")));
    let out = pod
        .api
        .try_kubectl(&["create", "configmap", "frozen", "--from-literal=a=x"]);
    assert!(
        !out.status.success(),
        "a write to a frozen tenant: {}",
        out.stdout
    );
    pod.api.kubectl(&["get", "configmap", "on-etcd"]);
    api.kubectl(&[
        "-n",
        NS,
        "patch",
        "tds",
        "e1",
        "--type=merge",
        "-p",
        r#"{"spec":{"writable":true}}"#,
    ]);
    wait_for(api, &["-n", NS, "tds", "e1"], "{.status.phase}", |p| {
        p == "Ready"
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pod
        .api
        .try_kubectl(&["create", "configmap", "thawed", "--from-literal=a=t"])
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "writes did not come back");
        std::thread::sleep(Duration::from_millis(250));
    }
    drop(pod);
    eprintln!("[{:.0?}] freeze and unfreeze on etcd", started.elapsed());

    // Delete: the tenant's keys and records go.
    api.kubectl(&["-n", NS, "delete", "tds", "e1", "--timeout=60s"]);
    assert!(etcd_keys(&etcd, &format!("/{tenant}/")).is_empty());
    let left: Vec<String> = etcd_keys(&etcd, "/_kine-rs/")
        .into_iter()
        .filter(|k| k.ends_with(&format!("/{tenant}")))
        .collect();
    assert!(left.is_empty(), "records left: {left:?}");
    api.kubectl(&["delete", "datastore", "etcd-1", "--timeout=60s"]);
    eprintln!("etcd_end_to_end passed in {:.1?}", started.elapsed());
}

/// `kubectl get secret NAME -n NAMESPACE`'s data, decoded.
fn secret_data(api: &ApiServer, namespace: &str, name: &str) -> HashMap<String, String> {
    let secret: Value =
        serde_json::from_str(&api.kubectl(&["-n", namespace, "get", "secret", name, "-o", "json"]))
            .expect("secret json");
    secret["data"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            let text = common::base64_decode(v.as_str().expect("base64 value"));
            (
                k.clone(),
                String::from_utf8(text).expect("utf-8 secret value"),
            )
        })
        .collect()
}

/// Writes the items of the Secret volume `volume` of `pod` to `dir` (what the kubelet
/// would mount).
fn mount_secret_volume(api: &ApiServer, namespace: &str, pod: &Value, volume: &str, dir: &Path) {
    let volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == volume)
        .unwrap_or_else(|| panic!("no volume {volume} in {pod}"));
    let name = volume["secret"]["secretName"].as_str().expect("secretName");
    let data = secret_data(api, namespace, name);
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("volume dir");
    match volume["secret"]["items"].as_array() {
        Some(items) => {
            for item in items {
                let key = item["key"].as_str().expect("key");
                let path = item["path"].as_str().expect("path");
                std::fs::write(dir.join(path), &data[key]).expect("write item");
            }
        }
        None => {
            for (key, value) in &data {
                std::fs::write(dir.join(key), value).expect("write key");
            }
        }
    }
}

/// The chart's gateway, run locally from its rendered Deployment: args (the TLS volume
/// becomes a directory, `0.0.0.0` loopback) and env (from the endpoint Secret).
fn start_gateway(api: &ApiServer, dir: &Path, name: &str, port: u16) -> ChildGuard {
    let deployment: Value = serde_json::from_str(&api.kubectl(&[
        "-n",
        "kine-system",
        "get",
        "deployment",
        name,
        "-o",
        "json",
    ]))
    .expect("deployment json");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let tls_dir = dir.join("gateway-tls");
    mount_secret_volume(api, "kine-system", pod, "tls", &tls_dir);
    let args: Vec<String> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| {
            a.as_str()
                .expect("arg")
                .replace("/etc/kine-rs/tls", &tls_dir.display().to_string())
                .replace("0.0.0.0:", "127.0.0.1:")
        })
        .collect();
    let mut env = Vec::new();
    for var in container["env"].as_array().expect("env") {
        let key_ref = &var["valueFrom"]["secretKeyRef"];
        let data = secret_data(api, "kine-system", key_ref["name"].as_str().expect("name"));
        env.push((
            var["name"].as_str().expect("env name").to_string(),
            data[key_ref["key"].as_str().expect("key")].clone(),
        ));
    }
    spawn_kine(
        &args,
        &env,
        &dir.join("gateway.log"),
        &format!("127.0.0.1:{port}"),
    )
}

/// A tenant kube-apiserver wired to a gateway, run locally from the Deployment's container
/// spec; the Secret volume `kine-rs-tls` becomes a directory.
fn start_gateway_tenant(management: &ApiServer, dir: &Path, port: u16, name: &str) -> ApiServer {
    let deployment = deployment(management, name);
    let pod = &deployment["spec"]["template"]["spec"];
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1, "no sidecar in gateway mode: {pod}");
    let tls_dir = dir.join("kine-rs-tls");
    mount_secret_volume(management, NS, pod, "kine-rs-tls", &tls_dir);
    let args: Vec<String> = containers[0]["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| {
            a.as_str()
                .expect("arg")
                .replace("/etc/kine-rs/tls", &tls_dir.display().to_string())
        })
        .collect();
    ApiServer::start(&dir.join("tenant-api"), port, &args)
}

/// The common name of a PEM certificate.
fn common_name(pem: &str) -> String {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("pem");
    let (_, cert) = x509_parser::parse_x509_certificate(&pem.contents).expect("x509");
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .expect("CN")
        .to_string()
}

/// Gateway mode, with the chart's gateway: `helm template` renders the gateway (Deployment,
/// generated CA and server certificate, its `mode: Gateway` DataStore); the test applies them
/// and runs the gateway locally from the rendered Deployment (on PostgreSQL). The controller
/// creates two tenants through the gateway's admin API, issues each a client certificate
/// signed by the chart's CA (CN = tenant), and wires two tenant kube-apiservers with
/// `--etcd-servers=https://gateway` and the Secret's files, no sidecar; both serve kubectl
/// and neither sees the other's objects. A wrong admin identity gets `AdminAccessDenied`; a
/// certificate that no longer fits is re-issued (Event `CertificateRotated`); a freeze goes
/// through the admin API; `Delete` deletes the tenant in the gateway.
#[test]
fn gateway_end_to_end() {
    let started = Instant::now();
    let (management, _metrics_port) = setup();
    let api = &management.api;
    let dir = management.dir.path().join("gateway");
    std::fs::create_dir_all(&dir).expect("dir");
    let gw_port = free_port();
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/kine-rs");
    let rendered = common::run_bounded({
        let mut helm = std::process::Command::new(common::helm_binary());
        helm.args([
            "template",
            "kine-rs",
            chart,
            "--namespace",
            "kine-system",
            "--set",
            "gateway.enabled=true",
            "--set",
            "gateway.endpointSecret.name=gateway-datastore",
            "--set",
            &format!("gateway.port={gw_port}"),
            "--set",
            &format!("gateway.metricsPort={}", free_port()),
            "--set",
            "gateway.generatedTls.extraIpAddresses={127.0.0.1}",
            "--set",
            &format!("gateway.dataStore.endpoints={{127.0.0.1:{gw_port}}}"),
            "--set",
            "gateway.dataStore.certificateLifetimeHours=24",
            "--show-only",
            "templates/gateway/tls.yaml",
            "--show-only",
            "templates/gateway/datastore.yaml",
            "--show-only",
            "templates/gateway/deployment.yaml",
        ]);
        helm
    });
    assert!(
        rendered.status.success(),
        "helm template: {}",
        rendered.stderr
    );
    // The gateway's database: a PostgreSQL database of its own (kine-rs creates it).
    let pg_url = std::env::var("KINE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let gw_database = format!("kine_gw_e2e_{}", std::process::id());
    let gw_endpoint = format!(
        "{}/{gw_database}",
        pg_url
            .rsplit_once('/')
            .map_or(pg_url.as_str(), |(base, _)| base)
    );
    api.kubectl(&[
        "-n",
        "kine-system",
        "create",
        "secret",
        "generic",
        "gateway-datastore",
        &format!("--from-literal=endpoint={gw_endpoint}"),
    ]);
    api.apply(&rendered.stdout);
    let _gateway = start_gateway(api, &dir, "kine-rs-gateway", gw_port);
    let ready = wait_condition(
        api,
        &["datastore", "kine-rs-gateway"],
        "Ready",
        "True Reachable",
    );
    assert!(ready.contains("gateway"), "{ready}");
    eprintln!(
        "[{:.0?}] the chart's gateway runs and its DataStore is Ready",
        started.elapsed()
    );

    // An admin identity the gateway does not know: a clear condition.
    let denied: Value = {
        let mut store: Value = serde_json::from_str(&api.kubectl(&[
            "get",
            "datastore",
            "kine-rs-gateway",
            "-o",
            "json",
        ]))
        .expect("datastore json");
        serde_json::json!({
            "apiVersion": "kine-rs.io/v1alpha1",
            "kind": "DataStore",
            "metadata": {"name": "gw-denied"},
            "spec": {
                "driver": "PostgreSQL",
                "mode": "Gateway",
                "endpoints": store["spec"]["endpoints"].take(),
                "tlsConfig": store["spec"]["tlsConfig"].take(),
                "gateway": {"adminIdentity": "not-an-admin"},
            }
        })
    };
    api.apply(&denied.to_string());
    let why = wait_condition(
        api,
        &["datastore", "gw-denied"],
        "Ready",
        "False AdminAccessDenied",
    );
    assert!(why.contains("--admin-identity not-an-admin"), "{why}");
    api.kubectl(&["delete", "datastore", "gw-denied"]);

    // Two tenants on the gateway.
    let mut pods = Vec::new();
    for name in ["g1", "g2"] {
        let tenant_dir = dir.join(name);
        let port = free_port();
        api.apply(&apiserver_deployment(
            &format!("api-{name}"),
            &tenant_dir.join("files"),
            port,
        ));
        api.apply(&format!(
            r#"
apiVersion: kine-rs.io/v1alpha1
kind: TenantDatastore
metadata: {{name: {name}, namespace: {NS}}}
spec:
  apiServer: {{name: api-{name}}}
  dataStore: kine-rs-gateway
  quota: {{keys: 50000}}
  deletionPolicy: Delete
"#
        ));
        pods.push((name, tenant_dir, port));
    }
    let mut tenants = Vec::new();
    for (name, _, _) in &pods {
        wait_for(api, &["-n", NS, "tds", name], "{.status.phase}", |p| {
            p == "Ready"
        });
        let tenant = api.kubectl(&[
            "-n",
            NS,
            "get",
            "tds",
            name,
            "-o",
            "jsonpath={.status.tenant}",
        ]);
        let data = secret_data(api, NS, &format!("{name}-kine-rs"));
        assert_eq!(common_name(&data["tls.crt"]), tenant);
        assert_eq!(
            data["ca.crt"],
            secret_data(api, "kine-system", "kine-rs-gateway-ca")["tls.crt"]
        );
        assert_eq!(data["endpoint"], format!("https://127.0.0.1:{gw_port}"));
        assert!(!data.contains_key("password"), "{:?}", data.keys());
        let not_after = api.kubectl(&[
            "-n",
            NS,
            "get",
            "tds",
            name,
            "-o",
            "jsonpath={.status.certificateNotAfter}",
        ]);
        assert!(!not_after.is_empty());
        let wired = deployment(api, &format!("api-{name}"));
        let args = wired["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
        for expected in [
            format!("--etcd-servers=https://127.0.0.1:{gw_port}"),
            "--etcd-certfile=/etc/kine-rs/tls/tls.crt".to_string(),
        ] {
            assert!(args.contains(&expected), "{expected} not in {args}");
        }
        tenants.push(tenant);
    }
    eprintln!(
        "[{:.0?}] two tenants on the gateway, certificates issued",
        started.elapsed()
    );

    let g1 = start_gateway_tenant(api, &pods[0].1, pods[0].2, "api-g1");
    let g2 = start_gateway_tenant(api, &pods[1].1, pods[1].2, "api-g2");
    g1.kubectl(&["create", "configmap", "only-g1", "--from-literal=a=1"]);
    g2.kubectl(&["create", "configmap", "only-g2", "--from-literal=a=2"]);
    assert!(
        !g1.try_kubectl(&["get", "configmap", "only-g2"])
            .status
            .success()
    );
    assert!(
        !g2.try_kubectl(&["get", "configmap", "only-g1"])
            .status
            .success()
    );
    assert_eq!(
        g1.kubectl(&["get", "configmap", "only-g1", "-o", "jsonpath={.data.a}"]),
        "1"
    );
    eprintln!(
        "[{:.0?}] both tenants serve kubectl, isolated",
        started.elapsed()
    );

    // Freeze g1 through the gateway's admin API.
    api.kubectl(&[
        "-n",
        NS,
        "patch",
        "tds",
        "g1",
        "--type=merge",
        "-p",
        r#"{"spec":{"writable":false}}"#,
    ]);
    wait_for(api, &["-n", NS, "tds", "g1"], "{.status.phase}", |p| {
        p == "Frozen"
    });
    let out = g1.try_kubectl(&["create", "configmap", "frozen", "--from-literal=a=x"]);
    assert!(
        !out.status.success(),
        "a write to a frozen tenant: {}",
        out.stdout
    );
    g2.kubectl(&[
        "create",
        "configmap",
        "g2-still-writes",
        "--from-literal=a=2",
    ]);
    api.kubectl(&[
        "-n",
        NS,
        "patch",
        "tds",
        "g1",
        "--type=merge",
        "-p",
        r#"{"spec":{"writable":true}}"#,
    ]);
    wait_for(api, &["-n", NS, "tds", "g1"], "{.status.phase}", |p| {
        p == "Ready"
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !g1
        .try_kubectl(&["create", "configmap", "thawed", "--from-literal=a=t"])
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "writes did not come back");
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!("[{:.0?}] freeze through the gateway", started.elapsed());

    // A certificate that no longer fits (g2's in g1's Secret) is re-issued.
    let g2_cert = secret_data(api, NS, "g2-kine-rs")["tls.crt"].clone();
    let patch = serde_json::json!({"data": {"tls.crt": base64(g2_cert.as_bytes())}});
    api.kubectl(&[
        "-n",
        NS,
        "patch",
        "secret",
        "g1-kine-rs",
        "--type=merge",
        "-p",
        &patch.to_string(),
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while common_name(&secret_data(api, NS, "g1-kine-rs")["tls.crt"]) != tenants[0] {
        assert!(
            Instant::now() < deadline,
            "g1's certificate was not re-issued"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let notes = events(api, "CertificateRotated", "g1");
    assert!(notes.iter().any(|n| n.contains("is not for")), "{notes:?}");
    drop(g1);
    // The tenant apiserver starts again with the new files.
    let g1 = start_gateway_tenant(api, &pods[0].1, pods[0].2, "api-g1");
    g1.kubectl(&["get", "configmap", "only-g1"]);
    drop(g1);
    eprintln!("[{:.0?}] certificate re-issued", started.elapsed());

    // Delete: the tenant is deleted in the gateway (g2's apiserver loses it).
    drop(g2);
    api.kubectl(&["-n", NS, "delete", "tds", "g2", "--timeout=60s"]);
    let ca = secret_data(api, "kine-system", "kine-rs-gateway-ca");
    let authority = kine_controller::certificates::Authority::load(
        &ca["tls.crt"],
        &kine_controller::credentials::Sensitive(ca["tls.key"].clone()),
    )
    .expect("the chart's CA");
    let admin = authority
        .issue("system:kine-rs-controller", Duration::from_secs(600))
        .expect("admin certificate");
    std::fs::write(dir.join("admin.crt"), &admin.certificate_pem).expect("write");
    std::fs::write(dir.join("admin.key"), admin.key_pem.expose()).expect("write");
    std::fs::write(dir.join("ca.crt"), &ca["tls.crt"]).expect("write");
    let tenant_cli = |args: &[&str]| {
        let mut command = std::process::Command::new(common::kine_rs_binary());
        command.args([
            "tenant",
            "--endpoint",
            &format!("https://127.0.0.1:{gw_port}"),
            "--cacert",
            &dir.join("ca.crt").display().to_string(),
            "--cert",
            &dir.join("admin.crt").display().to_string(),
            "--key",
            &dir.join("admin.key").display().to_string(),
        ]);
        command.args(args);
        common::run_bounded(command)
    };
    let listed = tenant_cli(&["list"]);
    assert!(listed.status.success(), "{}", listed.stderr);
    assert!(listed.stdout.contains(&tenants[0]), "{}", listed.stdout);
    assert!(!listed.stdout.contains(&tenants[1]), "{}", listed.stdout);
    api.kubectl(&["-n", NS, "delete", "tds", "g1", "--timeout=60s"]);
    let listed = tenant_cli(&["list"]);
    assert!(!listed.stdout.contains(&tenants[0]), "{}", listed.stdout);
    drop(_gateway);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            let mut pg = sqlx::PgConnection::connect(&pg_url)
                .await
                .expect("postgres");
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS \"{gw_database}\" WITH (FORCE)"
            )))
            .execute(&mut pg)
            .await
            .expect("drop the gateway's database");
        });
    eprintln!("gateway_end_to_end passed in {:.1?}", started.elapsed());
}

/// An etcd DataStore over mutual TLS, as Kamaji's etcd DataStores are: etcd requires client
/// certificates; the DataStore's `tlsConfig` gives the CA (inline) and the client
/// certificate (from a Secret). The controller reaches etcd with them, the binding's Secret
/// carries them to the sidecar (mounted, `--ca-file/--cert-file/--key-file`), and the tenant
/// kube-apiserver serves kubectl through it. Without `tlsConfig` the same etcd is
/// `Unreachable`.
#[test]
fn etcd_over_mutual_tls_end_to_end() {
    let started = Instant::now();
    let (management, _metrics_port) = setup();
    let api = &management.api;
    let pki = common::Pki::new("kine-rs");
    let (_etcd, etcd) =
        common::spawn_etcd_with(&management.dir.path().join("etcd-tls"), Some(&pki));
    api.kubectl(&[
        "-n",
        "kine-system",
        "create",
        "secret",
        "generic",
        "etcd-client",
        &format!("--from-literal=tls.crt={}", pki.client.0),
        &format!("--from-literal=tls.key={}", pki.client.1),
    ]);
    api.apply(&format!(
        r#"
apiVersion: kine-rs.io/v1alpha1
kind: DataStore
metadata: {{name: etcd-tls}}
spec:
  driver: etcd
  endpoints: ["{etcd}"]
  tlsConfig:
    certificateAuthority:
      certificate: {{content: "{}"}}
    clientCertificate:
      certificate: {{secretReference: {{name: etcd-client, namespace: kine-system, keyPath: tls.crt}}}}
      privateKey: {{secretReference: {{name: etcd-client, namespace: kine-system, keyPath: tls.key}}}}
---
apiVersion: kine-rs.io/v1alpha1
kind: DataStore
metadata: {{name: etcd-plain}}
spec:
  driver: etcd
  endpoints: ["{etcd}"]
"#,
        base64(pki.ca.as_bytes())
    ));
    wait_condition(api, &["datastore", "etcd-tls"], "Ready", "True Reachable");
    wait_condition(
        api,
        &["datastore", "etcd-plain"],
        "Ready",
        "False Unreachable",
    );
    api.kubectl(&["delete", "datastore", "etcd-plain"]);

    let tenant_dir = management.dir.path().join("tenant-t");
    let tenant_port = free_port();
    api.apply(&apiserver_deployment(
        "api-t",
        &tenant_dir.join("files"),
        tenant_port,
    ));
    api.apply(&format!(
        r#"
apiVersion: kine-rs.io/v1alpha1
kind: TenantDatastore
metadata: {{name: t1, namespace: {NS}}}
spec:
  apiServer: {{name: api-t}}
  dataStore: etcd-tls
  deletionPolicy: Delete
"#
    ));
    wait_for(api, &["-n", NS, "tds", "t1"], "{.status.phase}", |p| {
        p == "Ready"
    });
    let data = secret_data(api, NS, "t1-kine-rs");
    assert_eq!(data["datastore-ca.crt"], pki.ca);
    assert_eq!(data["datastore-client.crt"], pki.client.0);
    let wired = deployment(api, "api-t");
    let sidecar = wired["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == "kine-rs")
        .expect("sidecar")
        .clone();
    let args = sidecar["args"].to_string();
    assert!(
        args.contains("--cert-file=/etc/kine-rs/datastore-tls/datastore-client.crt"),
        "{args}"
    );
    let pod = TenantPod::start(api, &tenant_dir, tenant_port, "api-t");
    pod.api
        .kubectl(&["create", "configmap", "over-tls", "--from-literal=a=s"]);
    assert_eq!(
        pod.api
            .kubectl(&["get", "configmap", "over-tls", "-o", "jsonpath={.data.a}"]),
        "s"
    );
    drop(pod);
    api.kubectl(&["-n", NS, "delete", "tds", "t1", "--timeout=60s"]);
    api.kubectl(&["delete", "datastore", "etcd-tls", "--timeout=60s"]);
    eprintln!(
        "etcd_over_mutual_tls_end_to_end passed in {:.1?}",
        started.elapsed()
    );
}

/// A PostgreSQL DataStore over TLS: the server (the test's own) refuses connections without
/// TLS; the DataStore's `tlsConfig.certificateAuthority` makes the controller and the sidecar
/// connect with TLS, verifying the server's certificate and name (verify-full): with another
/// CA the same server is `Unreachable`. The tenant's database and login are made over TLS and its
/// kube-apiserver serves kubectl through the sidecar.
#[test]
fn postgres_over_tls_end_to_end() {
    let started = Instant::now();
    let (management, _metrics_port) = setup();
    let api = &management.api;
    let pki = common::Pki::new("unused");
    let pg = common::TlsPostgres::start(&pki);
    let port = pg.port;
    api.apply(&format!(
        r#"
apiVersion: kine-rs.io/v1alpha1
kind: DataStore
metadata: {{name: pg-tls}}
spec:
  driver: PostgreSQL
  endpoints: ["127.0.0.1:{port}"]
  basicAuth:
    username: {{content: "{user}"}}
    password: {{content: ""}}
  tlsConfig:
    certificateAuthority:
      certificate: {{content: "{ca}"}}
---
apiVersion: kine-rs.io/v1alpha1
kind: DataStore
metadata: {{name: pg-other-ca}}
spec:
  driver: PostgreSQL
  endpoints: ["127.0.0.1:{port}"]
  basicAuth:
    username: {{content: "{user}"}}
    password: {{content: ""}}
  tlsConfig:
    certificateAuthority:
      certificate: {{content: "{other}"}}
"#,
        user = base64(b"postgres"),
        ca = base64(pki.ca.as_bytes()),
        other = base64(common::Pki::new("other").ca.as_bytes())
    ));
    wait_condition(api, &["datastore", "pg-tls"], "Ready", "True Reachable");
    let refused = wait_condition(
        api,
        &["datastore", "pg-other-ca"],
        "Ready",
        "False Unreachable",
    );
    assert!(refused.to_lowercase().contains("certificate"), "{refused}");
    api.kubectl(&["delete", "datastore", "pg-other-ca"]);

    let tenant_dir = management.dir.path().join("tenant-p");
    let tenant_port = free_port();
    api.apply(&apiserver_deployment(
        "api-p",
        &tenant_dir.join("files"),
        tenant_port,
    ));
    api.apply(&format!(
        r#"
apiVersion: kine-rs.io/v1alpha1
kind: TenantDatastore
metadata: {{name: p1, namespace: {NS}}}
spec:
  apiServer: {{name: api-p}}
  dataStore: pg-tls
  deletionPolicy: Delete
"#
    ));
    wait_for(api, &["-n", NS, "tds", "p1"], "{.status.phase}", |p| {
        p == "Ready"
    });
    let data = secret_data(api, NS, "p1-kine-rs");
    assert_eq!(data["datastore-ca.crt"], pki.ca);
    assert!(!data.contains_key("datastore-client.key"));
    let pod = TenantPod::start(api, &tenant_dir, tenant_port, "api-p");
    pod.api
        .kubectl(&["create", "configmap", "over-tls", "--from-literal=a=p"]);
    assert_eq!(
        pod.api
            .kubectl(&["get", "configmap", "over-tls", "-o", "jsonpath={.data.a}"]),
        "p"
    );
    drop(pod);
    // Delete drops the database and login, over TLS too.
    api.kubectl(&["-n", NS, "delete", "tds", "p1", "--timeout=60s"]);
    api.kubectl(&["delete", "datastore", "pg-tls", "--timeout=60s"]);
    drop(pg);
    eprintln!(
        "postgres_over_tls_end_to_end passed in {:.1?}",
        started.elapsed()
    );
}
