//! Reconciler branches against a mocked Kubernetes API (tower-test): every request the
//! reconciler sends is checked (method, path) and answered; what it writes is asserted.
//! These need no cluster and no database: the branches that stop before touching one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use kine_controller::Context;
use kine_controller::crd::{DataStore, TenantDatastore};
use kine_controller::wiring::SidecarSettings;
use kube::client::Body;
use kube::runtime::controller::Action;
use serde_json::{Value, json};
use tower_test::mock::{self, Handle};

type ApiHandle = Handle<Request<Body>, Response<Body>>;

fn context() -> (Arc<Context>, ApiHandle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    (
        Arc::new(Context::new(client, SidecarSettings::default())),
        handle,
    )
}

/// Answers the next request, which must be `method path`, with `code` and `body`; returns
/// the request's body.
async fn expect(handle: &mut ApiHandle, method: &str, path: &str, code: u16, body: Value) -> Value {
    let (request, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .unwrap_or_else(|_| panic!("no request came; expected {method} {path}"))
        .expect("the service is gone");
    assert_eq!(request.method().as_str(), method, "{}", request.uri());
    assert_eq!(request.uri().path(), path, "{method}");
    let sent = request.into_body().collect_bytes().await.expect("body");
    send.send_response(
        Response::builder()
            .status(code)
            .body(Body::from(serde_json::to_vec(&body).expect("json")))
            .expect("response"),
    );
    if sent.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&sent).expect("request json")
    }
}

fn not_found(what: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
           "code": 404, "message": format!("{what} not found")})
}

fn store(driver: &str, deleting: bool) -> DataStore {
    let mut value = json!({
        "apiVersion": "kine-rs.io/v1alpha1",
        "kind": "DataStore",
        "metadata": {"name": "s1", "uid": "u-s1", "generation": 1, "resourceVersion": "1",
                     "finalizers": ["kine-rs.io/datastore-protection"]},
        "spec": {"driver": driver, "endpoints": ["db:5432"]},
    });
    if deleting {
        value["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    }
    serde_json::from_value(value).expect("DataStore")
}

fn bindings_on(store: &str) -> Value {
    json!({
        "apiVersion": "kine-rs.io/v1alpha1", "kind": "TenantDatastoreList",
        "metadata": {"resourceVersion": "5"},
        "items": [{
            "apiVersion": "kine-rs.io/v1alpha1", "kind": "TenantDatastore",
            "metadata": {"name": "b1", "namespace": "ns1", "uid": "u-b1"},
            "spec": {"apiServer": {"name": "api"}},
            "status": {"phase": "Ready", "currentDataStore": store, "bytes": 42},
        }, {
            "apiVersion": "kine-rs.io/v1alpha1", "kind": "TenantDatastore",
            "metadata": {"name": "b2", "namespace": "ns1", "uid": "u-b2"},
            "spec": {"apiServer": {"name": "api"}},
            "status": {"phase": "Ready", "currentDataStore": "elsewhere", "bytes": 7},
        }]
    })
}

#[tokio::test]
async fn an_etcd_datastore_with_a_login_is_not_ready_with_a_reason_and_counts_its_users() {
    let (ctx, mut api) = context();
    let mut object = store("etcd", false);
    // etcd user authentication is not supported by kine-rs's etcd proxy: refused before
    // any connection is tried.
    object.spec.basic_auth = Some(
        serde_json::from_value(json!({
            "username": {"content": "cm9vdA=="},
            "password": {"content": "aHVudGVyMg=="},
        }))
        .expect("basicAuth"),
    );
    let reconcile = tokio::spawn(kine_controller::datastore::reconcile(
        Arc::new(object.clone()),
        ctx,
    ));
    expect(
        &mut api,
        "GET",
        "/apis/kine-rs.io/v1alpha1/tenantdatastores",
        200,
        bindings_on("s1"),
    )
    .await;
    let patch = expect(
        &mut api,
        "PATCH",
        "/apis/kine-rs.io/v1alpha1/datastores/s1/status",
        200,
        serde_json::to_value(&object).expect("json"),
    )
    .await;
    let status = &patch["status"];
    assert_eq!(status["ready"], false, "{patch}");
    assert_eq!(status["usedBy"], json!(["ns1/b1"]), "{patch}");
    assert_eq!(status["tenants"], 1);
    assert_eq!(status["bytes"], 42);
    let ready = &status["conditions"][0];
    assert_eq!(ready["type"], "Ready");
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "AuthNotSupported");
    assert!(!patch.to_string().contains("hunter2"), "{patch}");
    let action = reconcile.await.expect("task").expect("reconcile");
    assert_eq!(action, Action::requeue(Duration::from_secs(15)));
}

#[tokio::test]
async fn a_datastore_in_use_refuses_deletion_and_names_its_users() {
    let (ctx, mut api) = context();
    let object = store("PostgreSQL", true);
    let reconcile = tokio::spawn(kine_controller::datastore::reconcile(
        Arc::new(object.clone()),
        ctx,
    ));
    expect(
        &mut api,
        "GET",
        "/apis/kine-rs.io/v1alpha1/tenantdatastores",
        200,
        bindings_on("s1"),
    )
    .await;
    let patch = expect(
        &mut api,
        "PATCH",
        "/apis/kine-rs.io/v1alpha1/datastores/s1/status",
        200,
        serde_json::to_value(&object).expect("json"),
    )
    .await;
    let blocked = &patch["status"]["conditions"][0];
    assert_eq!(blocked["type"], "DeletionBlocked", "{patch}");
    assert_eq!(blocked["reason"], "InUse");
    assert!(
        blocked["message"]
            .as_str()
            .expect("message")
            .contains("ns1/b1")
    );
    let error = reconcile
        .await
        .expect("task")
        .expect_err("deletion must be refused");
    assert!(error.to_string().contains("used by ns1/b1"), "{error}");
}

#[tokio::test]
async fn an_unused_datastore_is_released() {
    let (ctx, mut api) = context();
    let object = store("PostgreSQL", true);
    let reconcile = tokio::spawn(kine_controller::datastore::reconcile(
        Arc::new(object.clone()),
        ctx,
    ));
    expect(
        &mut api,
        "GET",
        "/apis/kine-rs.io/v1alpha1/tenantdatastores",
        200,
        bindings_on("other"),
    )
    .await;
    // The finalizer is removed (a JSON patch on the object).
    let patch = expect(
        &mut api,
        "PATCH",
        "/apis/kine-rs.io/v1alpha1/datastores/s1",
        200,
        serde_json::to_value(&object).expect("json"),
    )
    .await;
    assert!(patch.to_string().contains("remove"), "{patch}");
    reconcile.await.expect("task").expect("reconcile");
}

fn binding(spec: Value) -> TenantDatastore {
    serde_json::from_value(json!({
        "apiVersion": "kine-rs.io/v1alpha1",
        "kind": "TenantDatastore",
        "metadata": {"name": "b1", "namespace": "ns1", "uid": "3F2504E0-4F89-11D3-9A0C-0305E82C3301",
                     "generation": 2, "resourceVersion": "9",
                     "finalizers": ["kine-rs.io/tenant-cleanup"]},
        "spec": spec,
    }))
    .expect("TenantDatastore")
}

#[tokio::test]
async fn a_binding_to_a_missing_datastore_waits_with_a_reason() {
    let (ctx, mut api) = context();
    let object = binding(json!({"apiServer": {"name": "api"}, "dataStore": "nope"}));
    let reconcile = tokio::spawn(kine_controller::binding::reconcile(
        Arc::new(object.clone()),
        ctx,
    ));
    let body = serde_json::to_value(&object).expect("json");
    expect(
        &mut api,
        "GET",
        "/apis/kine-rs.io/v1alpha1/namespaces/ns1/tenantdatastores/b1",
        200,
        body.clone(),
    )
    .await;
    // No other binding claims the tenant.
    expect(
        &mut api,
        "GET",
        "/apis/kine-rs.io/v1alpha1/tenantdatastores",
        200,
        bindings_on("elsewhere-too"),
    )
    .await;
    expect(
        &mut api,
        "GET",
        "/api/v1/namespaces/ns1/secrets/b1-kine-rs",
        404,
        not_found("secret"),
    )
    .await;
    expect(
        &mut api,
        "GET",
        "/apis/kine-rs.io/v1alpha1/datastores/nope",
        404,
        not_found("datastore"),
    )
    .await;
    let patch = expect(
        &mut api,
        "PATCH",
        "/apis/kine-rs.io/v1alpha1/namespaces/ns1/tenantdatastores/b1/status",
        200,
        body,
    )
    .await;
    let status = &patch["status"];
    // The tenant name comes from the UID, lowercased (a DNS label), never namespace_name.
    assert_eq!(
        status["tenant"], "t-3f2504e0-4f89-11d3-9a0c-0305e82c3301",
        "{patch}"
    );
    assert_eq!(status["phase"], "Provisioning");
    let ready = &status["conditions"][0];
    assert_eq!(ready["reason"], "DataStoreNotFound");
    assert_eq!(ready["message"], "DataStore nope does not exist");
    let action = reconcile.await.expect("task").expect("reconcile");
    assert_eq!(action, Action::requeue(Duration::from_secs(15)));
}

#[tokio::test]
async fn an_invalid_tenant_name_fails_with_a_reason() {
    let (ctx, mut api) = context();
    let object = binding(json!({"apiServer": {"name": "api"}, "tenant": "Not_A_Label"}));
    let reconcile = tokio::spawn(kine_controller::binding::reconcile(
        Arc::new(object.clone()),
        ctx,
    ));
    let body = serde_json::to_value(&object).expect("json");
    expect(
        &mut api,
        "GET",
        "/apis/kine-rs.io/v1alpha1/namespaces/ns1/tenantdatastores/b1",
        200,
        body.clone(),
    )
    .await;
    let patch = expect(
        &mut api,
        "PATCH",
        "/apis/kine-rs.io/v1alpha1/namespaces/ns1/tenantdatastores/b1/status",
        200,
        body,
    )
    .await;
    assert_eq!(patch["status"]["phase"], "Failed", "{patch}");
    let ready = &patch["status"]["conditions"][0];
    assert_eq!(ready["reason"], "InvalidTenant");
    assert!(
        ready["message"]
            .as_str()
            .expect("message")
            .contains("invalid tenant name")
    );
    reconcile.await.expect("task").expect("reconcile");
}

#[tokio::test]
async fn with_no_datastore_and_none_matching_the_binding_waits() {
    let (ctx, mut api) = context();
    let object =
        binding(json!({"apiServer": {"name": "api"}, "dataStoreSelector": {"tier": "gold"}}));
    let reconcile = tokio::spawn(kine_controller::binding::reconcile(
        Arc::new(object.clone()),
        ctx,
    ));
    let body = serde_json::to_value(&object).expect("json");
    expect(
        &mut api,
        "GET",
        "/apis/kine-rs.io/v1alpha1/namespaces/ns1/tenantdatastores/b1",
        200,
        body.clone(),
    )
    .await;
    // No other binding claims the tenant.
    expect(
        &mut api,
        "GET",
        "/apis/kine-rs.io/v1alpha1/tenantdatastores",
        200,
        bindings_on("elsewhere-too"),
    )
    .await;
    expect(
        &mut api,
        "GET",
        "/api/v1/namespaces/ns1/secrets/b1-kine-rs",
        404,
        not_found("secret"),
    )
    .await;
    let stores = json!({"apiVersion": "kine-rs.io/v1alpha1", "kind": "DataStoreList",
        "metadata": {"resourceVersion": "3"},
        "items": [serde_json::to_value(store("PostgreSQL", false)).expect("json")]});
    expect(
        &mut api,
        "GET",
        "/apis/kine-rs.io/v1alpha1/datastores",
        200,
        stores,
    )
    .await;
    let patch = expect(
        &mut api,
        "PATCH",
        "/apis/kine-rs.io/v1alpha1/namespaces/ns1/tenantdatastores/b1/status",
        200,
        body,
    )
    .await;
    let ready = &patch["status"]["conditions"][0];
    assert_eq!(ready["reason"], "NoDataStoreAvailable", "{patch}");
    assert!(ready["message"].as_str().expect("message").contains("tier"));
    reconcile.await.expect("task").expect("reconcile");
}

/// A self-signed CA certificate (PEM) and its key.
fn ca_pem() -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "mock CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).expect("CA");
    (cert.pem(), key.serialize_pem())
}

fn b64(text: &str) -> String {
    use std::fmt::Write;
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in text.as_bytes().chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                let _ = write!(out, "{}", T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Gateway mode without the CA's private key: not Ready, `CertificateAuthorityInvalid`,
/// before any connection; with a key of another CA: the same reason, saying so.
#[tokio::test]
async fn a_gateway_datastore_without_its_ca_key_is_not_ready_with_a_reason() {
    let (certificate, _) = ca_pem();
    let (_, other_key) = ca_pem();
    for (private_key, expected) in [
        (None, "privateKey is required"),
        (Some(other_key), "does not belong to its certificate"),
    ] {
        let (ctx, mut api) = context();
        let mut object = store("PostgreSQL", false);
        let mut ca = json!({"certificate": {"content": b64(&certificate)}});
        if let Some(key) = &private_key {
            ca["privateKey"] = json!({"content": b64(key)});
        }
        object.spec.mode = kine_controller::crd::Mode::Gateway;
        object.spec.tls_config =
            Some(serde_json::from_value(json!({"certificateAuthority": ca})).expect("tlsConfig"));
        let reconcile = tokio::spawn(kine_controller::datastore::reconcile(
            Arc::new(object.clone()),
            ctx,
        ));
        expect(
            &mut api,
            "GET",
            "/apis/kine-rs.io/v1alpha1/tenantdatastores",
            200,
            bindings_on("nothing"),
        )
        .await;
        let patch = expect(
            &mut api,
            "PATCH",
            "/apis/kine-rs.io/v1alpha1/datastores/s1/status",
            200,
            serde_json::to_value(&object).expect("json"),
        )
        .await;
        let ready = &patch["status"]["conditions"][0];
        assert_eq!(ready["reason"], "CertificateAuthorityInvalid", "{patch}");
        assert!(
            ready["message"]
                .as_str()
                .unwrap_or_default()
                .contains(expected),
            "{patch}"
        );
        assert!(!patch.to_string().contains("PRIVATE KEY"), "{patch}");
        let action = reconcile.await.expect("task").expect("reconcile");
        assert_eq!(action, Action::requeue(Duration::from_secs(15)));
    }
}

/// A move to a Gateway DataStore is refused with a reason (the controller's migration
/// engine does not move tenants into a gateway); the tenant stays where it is.
#[tokio::test]
async fn a_move_to_a_gateway_datastore_is_refused_with_a_reason() {
    let (ctx, mut api) = context();
    let mut object = binding(json!({"apiServer": {"name": "api"}, "dataStore": "gw"}));
    object.status = Some(
        serde_json::from_value(json!({"phase": "Ready", "currentDataStore": "pg",
                                      "tenant": "t-1"}))
        .expect("status"),
    );
    let reconcile = tokio::spawn(kine_controller::binding::reconcile(
        Arc::new(object.clone()),
        ctx,
    ));
    let body = serde_json::to_value(&object).expect("json");
    expect(
        &mut api,
        "GET",
        "/apis/kine-rs.io/v1alpha1/namespaces/ns1/tenantdatastores/b1",
        200,
        body.clone(),
    )
    .await;
    // No other binding claims the tenant.
    expect(
        &mut api,
        "GET",
        "/apis/kine-rs.io/v1alpha1/tenantdatastores",
        200,
        bindings_on("elsewhere-too"),
    )
    .await;
    expect(
        &mut api,
        "GET",
        "/api/v1/namespaces/ns1/secrets/b1-kine-rs",
        404,
        not_found("secret"),
    )
    .await;
    let mut gateway = serde_json::to_value(store("PostgreSQL", false)).expect("json");
    gateway["metadata"]["name"] = json!("gw");
    gateway["spec"]["mode"] = json!("Gateway");
    gateway["status"] = json!({"ready": true});
    expect(
        &mut api,
        "GET",
        "/apis/kine-rs.io/v1alpha1/datastores/gw",
        200,
        gateway,
    )
    .await;
    let mut pg = serde_json::to_value(store("PostgreSQL", false)).expect("json");
    pg["metadata"]["name"] = json!("pg");
    expect(
        &mut api,
        "GET",
        "/apis/kine-rs.io/v1alpha1/datastores/pg",
        200,
        pg,
    )
    .await;
    let patch = expect(
        &mut api,
        "PATCH",
        "/apis/kine-rs.io/v1alpha1/namespaces/ns1/tenantdatastores/b1/status",
        200,
        body,
    )
    .await;
    let status = &patch["status"];
    assert_eq!(status["currentDataStore"], "pg", "{patch}");
    let ready = &status["conditions"][0];
    assert_eq!(ready["reason"], "MigrationNotSupported", "{patch}");
    assert!(
        ready["message"]
            .as_str()
            .unwrap_or_default()
            .contains("Gateway DataStore"),
        "{patch}"
    );
    let action = reconcile.await.expect("task").expect("reconcile");
    assert_eq!(action, Action::requeue(Duration::from_secs(15)));
}

/// Sidecar mode with a `tlsConfig` that has no CA: not Ready with a reason, before any
/// connection (the server could not be verified).
#[tokio::test]
async fn a_tls_config_without_a_ca_is_not_ready_with_a_reason() {
    let (ctx, mut api) = context();
    let mut object = store("PostgreSQL", false);
    object.spec.tls_config = Some(
        serde_json::from_value(json!({"clientCertificate": {
            "certificate": {"content": b64("-----BEGIN CERTIFICATE-----\n")},
            "privateKey": {"content": b64("secret key")},
        }}))
        .expect("tlsConfig"),
    );
    let reconcile = tokio::spawn(kine_controller::datastore::reconcile(
        Arc::new(object.clone()),
        ctx,
    ));
    expect(
        &mut api,
        "GET",
        "/apis/kine-rs.io/v1alpha1/tenantdatastores",
        200,
        bindings_on("nothing"),
    )
    .await;
    let patch = expect(
        &mut api,
        "PATCH",
        "/apis/kine-rs.io/v1alpha1/datastores/s1/status",
        200,
        serde_json::to_value(&object).expect("json"),
    )
    .await;
    let ready = &patch["status"]["conditions"][0];
    assert_eq!(ready["reason"], "CredentialsUnavailable", "{patch}");
    assert!(
        ready["message"]
            .as_str()
            .unwrap_or_default()
            .contains("certificateAuthority"),
        "{patch}"
    );
    assert!(!patch.to_string().contains("secret key"), "{patch}");
    let action = reconcile.await.expect("task").expect("reconcile");
    assert_eq!(action, Action::requeue(Duration::from_secs(15)));
}

/// A tenant name another binding already has is refused (`TenantInUse`): it would take over
/// that tenant's login, keyspace or certificate.
#[tokio::test]
async fn a_tenant_name_another_binding_has_is_refused() {
    let (ctx, mut api) = context();
    let object = binding(json!({"apiServer": {"name": "api"}, "tenant": "shared"}));
    let reconcile = tokio::spawn(kine_controller::binding::reconcile(
        Arc::new(object.clone()),
        ctx,
    ));
    let body = serde_json::to_value(&object).expect("json");
    expect(
        &mut api,
        "GET",
        "/apis/kine-rs.io/v1alpha1/namespaces/ns1/tenantdatastores/b1",
        200,
        body.clone(),
    )
    .await;
    let mut others = bindings_on("s1");
    others["items"][0]["status"]["tenant"] = json!("shared");
    others["items"][0]["metadata"]["namespace"] = json!("victim");
    expect(
        &mut api,
        "GET",
        "/apis/kine-rs.io/v1alpha1/tenantdatastores",
        200,
        others,
    )
    .await;
    let patch = expect(
        &mut api,
        "PATCH",
        "/apis/kine-rs.io/v1alpha1/namespaces/ns1/tenantdatastores/b1/status",
        200,
        body,
    )
    .await;
    let ready = &patch["status"]["conditions"][0];
    assert_eq!(ready["reason"], "TenantInUse", "{patch}");
    assert_eq!(
        ready["message"],
        "tenant shared belongs to TenantDatastore victim/b1"
    );
    assert_eq!(patch["status"]["phase"], "Failed");
    let action = reconcile.await.expect("task").expect("reconcile");
    assert_eq!(action, Action::requeue(Duration::from_secs(15)));
}
