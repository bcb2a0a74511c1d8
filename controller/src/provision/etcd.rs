//! etcd: tenants are key prefixes of a shared etcd cluster, served through kine-rs's
//! tenant-prefixing proxy (`kine-rs --endpoint etcd://…`). Provisioning a tenant is writing
//! its records under `/_kine-rs/` (its registration, quota and freeze), which the controller
//! does through the proxy's own code in the kine-rs library ([`crate::tenant`]); the tenant's
//! keys live under `/<tenant>/` (kine-rs's default `--etcd-tenant-prefix`). There is no
//! per-tenant etcd login: kine-rs, not an etcd role, confines each tenant to its prefix, and
//! the sidecars reach etcd as the DataStore's endpoints say (etcd user/password
//! authentication is not supported by the proxy: a DataStore with `basicAuth` is reported
//! not Ready).

use std::sync::Arc;

use kine::etcd_proxy::{EtcdProxy, ProxyOptions};
use kine::storage::{Quota, TlsFiles};
use kine::txn::RequestLimits;

use crate::credentials::AdminLogin;
use crate::provision::CONNECT_TIMEOUT;

/// Where each tenant's keys live: kine-rs's default `--etcd-tenant-prefix`, which the
/// sidecars the controller adds keep.
pub const TENANT_PREFIX: &str = "/{tenant}/";

/// kine-rs's `--endpoint` for the cluster: every member, `etcd://a:2379,b:2379`.
pub fn endpoint(admin: &AdminLogin) -> String {
    format!("etcd://{}", admin.members.join(","))
}

/// Refuses what the proxy cannot do (etcd user authentication).
pub fn supported(admin: &AdminLogin) -> Result<(), String> {
    if admin.username.is_some() || admin.password.is_some() {
        return Err(
            "etcd user/password authentication (basicAuth) is not supported by the \
                    kine-rs etcd proxy; remove basicAuth (kine-rs confines each tenant to its \
                    prefix itself)"
                .into(),
        );
    }
    if admin.members.is_empty() {
        return Err("spec.endpoints is empty".into());
    }
    Ok(())
}

/// Connects to the cluster through the proxy (a quorum read answers), within
/// [`CONNECT_TIMEOUT`].
pub async fn connect(endpoint: &str, tls: TlsFiles) -> Result<Arc<EtcdProxy>, String> {
    let options = ProxyOptions {
        tls,
        limits: RequestLimits::default(),
        prefix: TENANT_PREFIX.to_string(),
        default_quota: Quota::default(),
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, EtcdProxy::connect(endpoint, options)).await {
        Ok(Ok(proxy)) => Ok(proxy),
        Ok(Err(e)) => Err(format!("cannot use the etcd cluster: {e}")),
        Err(_) => Err(format!(
            "no etcd member of {} answered within {CONNECT_TIMEOUT:?}",
            endpoint.trim_start_matches("etcd://")
        )),
    }
}

/// Whether the cluster answers a quorum read.
pub async fn check(admin: &AdminLogin) -> Result<(), String> {
    supported(admin)?;
    let tls = match &admin.tls {
        Some(tls) => tls.files()?,
        None => TlsFiles::default(),
    };
    connect(&endpoint(admin), tls).await.map(|_| ())
}
