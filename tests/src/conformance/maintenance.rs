//! Maintenance.Status, Cluster.MemberList and gRPC health.

use anyhow::{Context, Result, ensure};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use super::{Server, Target, header_revision};

/// Parses "3.5.13" (and "3.6.0-alpha.0") into (major, minor, patch).
fn parse_version(v: &str) -> Option<(u64, u64, u64)> {
    let core = v.split(['-', '+']).next()?;
    let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
    Some((parts.next()??, parts.next()??, parts.next()??))
}

/// Status: a version kube-apiserver accepts (>= 3.5) and the current revision in the header.
pub async fn maintenance_status(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    let rev = header_revision(c.put("st", "1", None).await?.header())?;
    let status = c.status().await?;
    let version = parse_version(status.version())
        .with_context(|| format!("unparseable version {:?}", status.version()))?;
    ensure!(version >= (3, 5, 0), "version {:?} < 3.5", status.version());
    ensure!(header_revision(status.header())? == rev, "{status:?}");
    ensure!(status.db_size() > 0, "{status:?}");
    ensure!(status.leader() != 0, "a leader is reported: {status:?}");
    ensure!(
        status.header().map(|h| h.member_id()) == Some(status.leader()),
        "the only member is the leader: {status:?}"
    );
    Ok(())
}

/// MemberList: one member with client URLs.
pub async fn cluster_member_list(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    let list = c.member_list().await?;
    ensure!(list.members().len() == 1, "{list:?}");
    let member = &list.members()[0];
    ensure!(member.id() != 0, "{list:?}");
    ensure!(!member.client_urls().is_empty(), "client URLs: {list:?}");
    ensure!(
        member.client_urls().iter().all(|u| u.starts_with("http")),
        "{list:?}"
    );
    ensure!(
        member
            .client_urls()
            .iter()
            .any(|u| u.trim_end_matches('/') == server.endpoint),
        "the member advertises {}: {list:?}",
        server.endpoint
    );
    Ok(())
}

/// grpc.health.v1.Health/Check for the whole server ("") answers SERVING.
pub async fn grpc_health(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let channel = tonic::transport::Channel::from_shared(server.endpoint.clone())?
        .connect()
        .await?;
    let mut health = HealthClient::new(channel);
    let resp = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner();
    ensure!(resp.status() == ServingStatus::Serving, "{resp:?}");
    Ok(())
}
