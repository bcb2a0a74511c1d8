//! etcd's Maintenance service: Status, Alarm (no alarms are ever raised) and Defragment.

use kine_proto::etcdserverpb::alarm_request::AlarmAction;
use kine_proto::etcdserverpb::maintenance_server::Maintenance;
use kine_proto::etcdserverpb::{
    AlarmRequest, AlarmResponse, DefragmentRequest, DefragmentResponse, StatusRequest,
    StatusResponse,
};
use tonic::{Request, Response, Status};

use super::Tenancy;
use crate::error::KineError;

/// Serves Status, Alarm and Defragment.
pub struct MaintenanceService {
    pub tenancy: Tenancy,
    /// The etcd version reported to clients (kube-apiserver checks it).
    pub version: String,
    /// Whether tenants share the datastore (a gateway, or a sidecar of a named tenant): then
    /// Status reports the tenant's own size, never the shared database's, which would tell
    /// of other tenants' activity.
    pub shared: bool,
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(
        &self,
        request: Request<AlarmRequest>,
    ) -> Result<Response<AlarmResponse>, Status> {
        let keyspace = self.tenancy.keyspace(&request).await?;
        if request.get_ref().action == AlarmAction::Activate as i32 {
            return Err(KineError::Unsupported("raising alarms").into());
        }
        // kine-rs raises no alarms, so there is never one to list or deactivate.
        Ok(Response::new(AlarmResponse {
            header: Some(keyspace.header().await?),
            alarms: Vec::new(),
        }))
    }

    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let keyspace = self.tenancy.keyspace(&request).await?;
        let facts = keyspace.status(!self.shared).await?;
        let header = facts.header;
        Ok(Response::new(StatusResponse {
            version: self.version.clone(),
            db_size: facts.db_size,
            leader: header.member_id,
            raft_index: header.revision as u64,
            raft_term: header.raft_term,
            raft_applied_index: header.revision as u64,
            errors: Vec::new(),
            db_size_in_use: facts.db_size_in_use,
            is_learner: false,
            header: Some(header),
        }))
    }

    async fn defragment(
        &self,
        request: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        let keyspace = self.tenancy.keyspace(&request).await?;
        keyspace.defragment(!self.shared).await?;
        // etcd answers Defragment without a header.
        Ok(Response::new(DefragmentResponse { header: None }))
    }
}
