//! kine-rs's admin API (`kine.admin.v1.TenantAdmin`): tenants of the datastore. Served on the
//! main listener to admin identities only (`--admin-identity`, matched against the names of
//! the client's verified certificate), and on `--admin-socket` to whoever can open it.

use std::sync::Arc;

use kine_proto::kine::admin::v1::tenant_admin_server::TenantAdmin;
use kine_proto::kine::admin::v1::{
    self as pb, CreateTenantRequest, DeleteTenantRequest, DeleteTenantResponse,
    FreezeTenantRequest, ListTenantsRequest, ListTenantsResponse, MigrateTenantRequest,
    MigrateTenantResponse, SetQuotaRequest, TenantStatusRequest, UnfreezeTenantRequest,
};
use tonic::{Request, Response, Status};
use tracing::info;

use super::certificate_names;
use crate::error::KineError;
use crate::routes::{MoveError, RoutedTenants};
use crate::run::redact_endpoint;
use crate::served::TenantDirectory;
use crate::storage::{KeyspaceState, Quota};
use crate::tenants::validate_name;

/// Serves the admin API.
pub struct AdminService {
    pub tenants: Arc<dyn TenantDirectory>,
    /// Certificate names allowed to call it.
    pub admin_identities: Vec<String>,
    /// Served on the local admin socket: every caller may.
    pub local: bool,
    /// A gateway on a database datastore moves tenants itself; elsewhere `None`.
    pub mover: Option<Arc<RoutedTenants>>,
}

impl AdminService {
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        if self.local {
            return Ok(());
        }
        let names = certificate_names(request);
        if names
            .iter()
            .any(|name| self.admin_identities.contains(name))
        {
            return Ok(());
        }
        Err(Status::permission_denied(
            "kine-rs: the admin API needs a client certificate of an --admin-identity \
             (or the --admin-socket)",
        ))
    }

    async fn status(&self, name: &str) -> Result<pb::TenantStatus, Status> {
        validate_name(name).map_err(KineError::InvalidTenant)?;
        let state = self
            .tenants
            .state(name)
            .await?
            .ok_or_else(|| KineError::UnknownTenant(name.to_string()))?;
        Ok(self.describe(name, &state))
    }

    fn describe(&self, name: &str, state: &KeyspaceState) -> pb::TenantStatus {
        pb::TenantStatus {
            name: name.to_string(),
            revision: state.revision,
            compact_revision: state.compact_revision,
            keys: state.keys,
            bytes: state.bytes,
            quota: Some(pb::Quota {
                keys: state.quota.keys,
                bytes: state.quota.bytes,
            }),
            frozen: state.frozen,
            frozen_since_unix_ms: state.frozen_at_ms,
            open_watches: self.tenants.watches(name),
        }
    }

    async fn set_frozen(&self, name: &str, frozen: bool) -> Result<pb::TenantStatus, Status> {
        validate_name(name).map_err(KineError::InvalidTenant)?;
        let keyspace = self
            .tenants
            .get(name, false)
            .await?
            .ok_or_else(|| KineError::UnknownTenant(name.to_string()))?;
        keyspace.set_frozen(frozen).await?;
        info!(tenant = name, frozen, "tenant freeze changed");
        self.status(name).await
    }
}

fn quota(quota: Option<pb::Quota>) -> Result<Option<Quota>, Status> {
    match quota {
        Some(q) if q.keys < 0 || q.bytes < 0 => Err(Status::invalid_argument(
            "kine-rs: a quota is 0 (no limit) or positive",
        )),
        Some(q) => Ok(Some(Quota {
            keys: q.keys,
            bytes: q.bytes,
        })),
        None => Ok(None),
    }
}

#[tonic::async_trait]
impl TenantAdmin for AdminService {
    async fn create_tenant(
        &self,
        request: Request<CreateTenantRequest>,
    ) -> Result<Response<pb::TenantStatus>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        let quota = quota(request.quota)?;
        if !self.tenants.create(&request.name, quota).await? {
            return Err(KineError::TenantExists(request.name).into());
        }
        Ok(Response::new(self.status(&request.name).await?))
    }

    async fn list_tenants(
        &self,
        request: Request<ListTenantsRequest>,
    ) -> Result<Response<ListTenantsResponse>, Status> {
        self.authorize(&request)?;
        let tenants = self
            .tenants
            .list()
            .await?
            .iter()
            .map(|(name, state)| self.describe(name, state))
            .collect();
        Ok(Response::new(ListTenantsResponse { tenants }))
    }

    async fn tenant_status(
        &self,
        request: Request<TenantStatusRequest>,
    ) -> Result<Response<pb::TenantStatus>, Status> {
        self.authorize(&request)?;
        Ok(Response::new(
            self.status(&request.into_inner().name).await?,
        ))
    }

    async fn freeze_tenant(
        &self,
        request: Request<FreezeTenantRequest>,
    ) -> Result<Response<pb::TenantStatus>, Status> {
        self.authorize(&request)?;
        let name = request.into_inner().name;
        Ok(Response::new(self.set_frozen(&name, true).await?))
    }

    async fn unfreeze_tenant(
        &self,
        request: Request<UnfreezeTenantRequest>,
    ) -> Result<Response<pb::TenantStatus>, Status> {
        self.authorize(&request)?;
        let name = request.into_inner().name;
        Ok(Response::new(self.set_frozen(&name, false).await?))
    }

    async fn set_quota(
        &self,
        request: Request<SetQuotaRequest>,
    ) -> Result<Response<pb::TenantStatus>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        let quota = quota(request.quota)?.unwrap_or_default();
        validate_name(&request.name).map_err(KineError::InvalidTenant)?;
        let keyspace = self
            .tenants
            .get(&request.name, false)
            .await?
            .ok_or_else(|| KineError::UnknownTenant(request.name.clone()))?;
        keyspace.set_quota(quota).await?;
        Ok(Response::new(self.status(&request.name).await?))
    }

    async fn migrate_tenant(
        &self,
        request: Request<MigrateTenantRequest>,
    ) -> Result<Response<MigrateTenantResponse>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        let Some(mover) = &self.mover else {
            return Err(KineError::Unsupported(
                "moving a tenant through the admin API of a process that is not a gateway on a \
                 database datastore (use `kine-rs migrate`)",
            )
            .into());
        };
        let summary = mover
            .move_tenant(&request.name, &request.to)
            .await
            .map_err(|error| match error {
                MoveError::Request(error) => Status::from(error),
                // The engine's messages name tenants, revisions and datastores without
                // credentials.
                MoveError::Migration(error) => Status::failed_precondition(format!(
                    "kine-rs: the migration of tenant {:?} stopped: {error}",
                    request.name
                )),
            })?;
        let millis = |d: std::time::Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        Ok(Response::new(MigrateTenantResponse {
            name: summary.tenant,
            target: redact_endpoint(&request.to),
            revision: summary.revision,
            keys: summary.keys as i64,
            events: summary.events as i64,
            leases: summary.leases as i64,
            freeze_window_ms: millis(summary.freeze_window),
            duration_ms: millis(summary.duration),
        }))
    }

    async fn delete_tenant(
        &self,
        request: Request<DeleteTenantRequest>,
    ) -> Result<Response<DeleteTenantResponse>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        let deleted = self.tenants.delete(&request.name, request.force).await?;
        if !deleted {
            return Err(KineError::UnknownTenant(request.name).into());
        }
        Ok(Response::new(DeleteTenantResponse { deleted }))
    }
}
