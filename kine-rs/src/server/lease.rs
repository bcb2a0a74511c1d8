//! etcd's Lease service.

use kine_proto::etcdserverpb::lease_server::Lease;
use kine_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::Tenancy;
use crate::model::now_ms;

/// Serves LeaseGrant, LeaseRevoke, LeaseKeepAlive, LeaseTimeToLive and LeaseLeases.
pub struct LeaseService {
    pub tenancy: Tenancy,
}

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(
        &self,
        request: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let keyspace = self.tenancy.keyspace(&request).await?;
        let lease = keyspace.lease_grant(request.into_inner()).await?;
        let revision = keyspace.state().await?.revision;
        Ok(Response::new(LeaseGrantResponse {
            header: Some(keyspace.header(revision)),
            id: lease.id,
            ttl: lease.ttl,
            error: String::new(),
        }))
    }

    async fn lease_revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let keyspace = self.tenancy.keyspace(&request).await?;
        let header = keyspace.lease_revoke(request.into_inner().id).await?;
        Ok(Response::new(LeaseRevokeResponse {
            header: Some(header),
        }))
    }

    type LeaseKeepAliveStream = ReceiverStream<Result<LeaseKeepAliveResponse, Status>>;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let keyspace = self.tenancy.keyspace(&request).await?;
        let mut requests = request.into_inner();
        let (sender, receiver) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Ok(Some(request)) = requests.message().await {
                let response = match keyspace.lease_keep_alive(request.id).await {
                    // An unknown or expired lease answers TTL 0, as etcd does.
                    Ok(lease) => Ok(LeaseKeepAliveResponse {
                        header: Some(keyspace.header(keyspace.hub().known_revision())),
                        id: request.id,
                        ttl: lease.map_or(0, |lease| lease.ttl),
                    }),
                    Err(error) => Err(Status::from(error)),
                };
                if sender.send(response).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let keyspace = self.tenancy.keyspace(&request).await?;
        let request = request.into_inner();
        let found = keyspace
            .lease_time_to_live(request.id, request.keys)
            .await?;
        let revision = keyspace.hub().known_revision();
        let response = match found {
            Some((lease, keys)) => LeaseTimeToLiveResponse {
                header: Some(keyspace.header(revision)),
                id: lease.id,
                ttl: lease.remaining_seconds(now_ms()),
                granted_ttl: lease.ttl,
                keys: keys.into_iter().collect(),
            },
            // etcd answers an unknown lease with TTL -1 rather than an error.
            None => LeaseTimeToLiveResponse {
                header: Some(keyspace.header(revision)),
                id: request.id,
                ttl: -1,
                granted_ttl: 0,
                keys: Vec::new(),
            },
        };
        Ok(Response::new(response))
    }

    async fn lease_leases(
        &self,
        request: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        let keyspace = self.tenancy.keyspace(&request).await?;
        let leases = keyspace.leases().await?;
        Ok(Response::new(LeaseLeasesResponse {
            header: Some(keyspace.header(keyspace.hub().known_revision())),
            leases: leases
                .into_iter()
                .map(|lease| LeaseStatus { id: lease.id })
                .collect(),
        }))
    }
}
