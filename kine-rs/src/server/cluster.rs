//! etcd's Cluster service: kine-rs is a one-member cluster.

use kine_proto::etcdserverpb::cluster_server::Cluster;
use kine_proto::etcdserverpb::{Member, MemberListRequest, MemberListResponse};
use tonic::{Request, Response, Status};

use super::Tenancy;

/// Serves MemberList.
pub struct ClusterService {
    pub tenancy: Tenancy,
    /// The member's name.
    pub name: String,
    /// The URL clients reach this process at.
    pub client_url: String,
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_list(
        &self,
        request: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        let keyspace = self.tenancy.keyspace(&request).await?;
        let header = keyspace.header().await?;
        Ok(Response::new(MemberListResponse {
            members: vec![Member {
                id: header.member_id,
                name: self.name.clone(),
                peer_ur_ls: vec![self.client_url.clone()],
                client_ur_ls: vec![self.client_url.clone()],
                is_learner: false,
            }],
            header: Some(header),
        }))
    }
}
