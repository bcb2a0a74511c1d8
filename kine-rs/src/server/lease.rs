//! etcd's Lease service.

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use kine_proto::etcdserverpb::lease_server::Lease;
use kine_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::Tenancy;

/// Keep-alives of one stream being renewed at once; the stream reads no further meanwhile.
const MAX_RENEWING_PER_STREAM: usize = 64;

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
        let tenant = self.tenancy.keyspace(&request).await?;
        Ok(Response::new(
            tenant.lease_grant(request.into_inner()).await?,
        ))
    }

    async fn lease_revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let tenant = self.tenancy.keyspace(&request).await?;
        Ok(Response::new(
            tenant.lease_revoke(request.into_inner().id).await?,
        ))
    }

    type LeaseKeepAliveStream = ReceiverStream<Result<LeaseKeepAliveResponse, Status>>;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let mut tenant = self.tenancy.keyspace(&request).await?;
        let mut requests = request.into_inner();
        let (sender, receiver) = mpsc::channel(16);
        tokio::spawn(async move {
            // Several keep-alives of a stream are renewed at once (so a flood's renewals
            // batch in the datastore) and answered in the order they came, as etcd does.
            // But they are admitted to the tenant's keep-alive rates one at a time: each
            // admission reserves its turn, and a stream reserving for all it holds would put
            // every other stream of the tenant behind its whole backlog (a flood of 64 at 20
            // a second kept another client's keep-alive waiting 6.5 s). So a stream holds at
            // most one turn, and the rate is shared between the tenant's streams.
            let admission = Arc::new(tokio::sync::Mutex::new(()));
            let mut renewing = FuturesOrdered::new();
            let mut open = true;
            while open || !renewing.is_empty() {
                tokio::select! {
                    biased;
                    Some(response) = renewing.next(), if !renewing.is_empty() => {
                        if sender.send(response).await.is_err() {
                            return;
                        }
                    }
                    request = requests.message(), if open && renewing.len() < MAX_RENEWING_PER_STREAM => {
                        let Ok(Some(request)) = request else {
                            open = false;
                            continue;
                        };
                        // A tenant moved by this gateway keeps its leases on the new datastore.
                        while let Some(next) = tenant.successor() {
                            tenant = next;
                        }
                        let tenant = tenant.clone();
                        let admission = admission.clone();
                        renewing.push_back(async move {
                            {
                                let _turn = admission.lock().await;
                                tenant.admit_keep_alive(request.id).await;
                            }
                            tenant.lease_keep_alive(request.id).await.map_err(Status::from)
                        });
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let tenant = self.tenancy.keyspace(&request).await?;
        Ok(Response::new(
            tenant.lease_time_to_live(request.into_inner()).await?,
        ))
    }

    async fn lease_leases(
        &self,
        request: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        let tenant = self.tenancy.keyspace(&request).await?;
        Ok(Response::new(tenant.lease_leases().await?))
    }
}
