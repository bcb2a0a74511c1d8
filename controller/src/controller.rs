//! Running the two controllers, and the health and metrics server.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::controller::Controller;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use tracing::{info, warn};

use crate::Context;
use crate::crd::{DataStore, TenantDatastore};
use crate::{binding, datastore};

/// Runs the DataStore and TenantDatastore controllers until the process is told to stop.
pub async fn run(ctx: Arc<Context>) {
    let client = ctx.client.clone();
    let stores: Api<DataStore> = Api::all(client.clone());
    let bindings: Api<TenantDatastore> = Api::all(client.clone());
    let secrets: Api<Secret> = Api::all(client.clone());

    let store_controller = Controller::new(stores.clone(), watcher::Config::default())
        // A binding that moves on or off a store changes its usedBy.
        .watches(bindings.clone(), watcher::Config::default(), |binding| {
            let status = binding.status.unwrap_or_default();
            let mut refs: Vec<ObjectRef<DataStore>> = Vec::new();
            if let Some(current) = status.current_data_store {
                refs.push(ObjectRef::new(&current));
            }
            if let Some(m) = status.migration {
                refs.push(ObjectRef::new(&m.from));
                refs.push(ObjectRef::new(&m.to));
            }
            refs
        })
        .shutdown_on_signal()
        .run(datastore::reconcile, datastore::error_policy, ctx.clone())
        .for_each(|result| async move {
            if let Err(error) = result {
                warn!(%error, "DataStore reconcile");
            }
        });
    let binding_controller = Controller::new(bindings, watcher::Config::default())
        .owns(
            secrets,
            watcher::Config::default().labels("app.kubernetes.io/managed-by=kine-rs-controller"),
        )
        .shutdown_on_signal()
        .run(binding::reconcile, binding::error_policy, ctx.clone())
        .for_each(|result| async move {
            if let Err(error) = result {
                warn!(%error, "TenantDatastore reconcile");
            }
        });
    info!("controllers started");
    tokio::join!(store_controller, binding_controller);
    info!("controllers stopped");
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `address`.
pub async fn serve_http(address: SocketAddr, ctx: Arc<Context>) -> std::io::Result<()> {
    async fn metrics(State(ctx): State<Arc<Context>>) -> String {
        ctx.metrics.encode()
    }
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
        .with_state(ctx);
    let listener = tokio::net::TcpListener::bind(address).await?;
    info!(%address, "serving /metrics, /healthz, /readyz");
    axum::serve(listener, app).await
}
