//! NATS JetStream: nothing to create up front. The tenants of one NATS DataStore share
//! kine-rs's streams (its default bucket prefix); kine-rs keeps each tenant in a keyspace of
//! its own, created when the controller first opens it. kine-rs logs in with the DataStore's
//! own credentials (per-tenant NATS accounts are not made).

use crate::credentials::{AdminLogin, Sensitive};
use crate::provision::{CONNECT_TIMEOUT, TenantLogin, tenant_endpoint};

/// Opens the NATS datastore through kine-rs (connects, finds or creates its streams).
pub async fn check(admin: &AdminLogin) -> Result<(), String> {
    let login = TenantLogin {
        database: String::new(),
        user: String::new(),
        password: Sensitive(String::new()),
    };
    let endpoint = tenant_endpoint(admin, &login);
    let mut options = kine::storage::BackendOptions::default();
    if let Some(tls) = &admin.tls {
        options.tls = tls.files()?;
    }
    match tokio::time::timeout(
        CONNECT_TIMEOUT,
        kine::storage::open(endpoint.expose(), &options),
    )
    .await
    {
        Ok(Ok(backend)) => backend
            .keyspaces()
            .await
            .map(|_| ())
            .map_err(|e| format!("cannot list keyspaces: {e}")),
        Ok(Err(e)) => Err(format!("cannot open: {e}")),
        Err(_) => Err(format!(
            "no answer from {}:{} within {CONNECT_TIMEOUT:?}",
            admin.host, admin.port
        )),
    }
}
