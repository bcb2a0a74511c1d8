//! The served tenant: what the gRPC layer calls for one tenant (range, txn, lease, watch,
//! status, freeze), whichever kind of datastore serves it. Two kinds implement it: the
//! database-backed [`crate::keyspace::Keyspace`] (kine-rs owns revisions and evaluates
//! transactions) and the etcd proxy's [`crate::etcd_proxy::ProxiedTenant`] (etcd owns
//! revisions and evaluates compares; watches are forwarded). `server/` never knows which.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use kine_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse,
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveResponse, LeaseLeasesResponse,
    LeaseRevokeResponse, LeaseTimeToLiveRequest, LeaseTimeToLiveResponse, PutRequest, PutResponse,
    RangeRequest, RangeResponse, ResponseHeader, TxnRequest, TxnResponse, WatchRequest,
};
use tonic::Status;

use crate::error::Result;
use crate::storage::{KeyspaceState, Quota};

/// The requests of one Watch stream, as the client sends them.
pub type WatchRequests =
    Pin<Box<dyn Stream<Item = std::result::Result<WatchRequest, Status>> + Send>>;
/// Where the responses of one Watch stream go (bounded in bytes, see
/// [`crate::watch::outbox`]).
pub type WatchResponses = crate::watch::outbox::ResponseSender;

/// What Maintenance.Status reports of a tenant.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusFacts {
    pub header: ResponseHeader,
    /// etcd's `dbSize` and `dbSizeInUse`.
    pub db_size: i64,
    pub db_size_in_use: i64,
}

/// One tenant as the gRPC services see it.
#[async_trait::async_trait]
pub trait ServedTenant: Send + Sync + 'static {
    /// The tenant's name.
    fn name(&self) -> &str;

    async fn range(&self, request: RangeRequest) -> Result<RangeResponse>;
    async fn put(&self, request: PutRequest) -> Result<PutResponse>;
    async fn delete_range(&self, request: DeleteRangeRequest) -> Result<DeleteRangeResponse>;
    async fn txn(&self, request: TxnRequest) -> Result<TxnResponse>;
    async fn compact(&self, request: CompactionRequest) -> Result<CompactionResponse>;

    async fn lease_grant(&self, request: LeaseGrantRequest) -> Result<LeaseGrantResponse>;
    async fn lease_revoke(&self, id: i64) -> Result<LeaseRevokeResponse>;
    /// Waits until the tenant's keep-alive rates (`--max-keepalives-per-second`, and
    /// `--max-repeated-keepalives-per-second` where a keep-alive of lease `id` repeats one
    /// answered within its coalescing window) admit one more keep-alive.
    async fn admit_keep_alive(&self, _id: i64) {}
    /// One keep-alive; an unknown or expired lease answers TTL 0, as etcd does.
    async fn lease_keep_alive(&self, id: i64) -> Result<LeaseKeepAliveResponse>;
    async fn lease_time_to_live(
        &self,
        request: LeaseTimeToLiveRequest,
    ) -> Result<LeaseTimeToLiveResponse>;
    async fn lease_leases(&self) -> Result<LeaseLeasesResponse>;

    /// Serves one Watch stream until the client closes it (or the tenant goes away).
    async fn watch(
        self: Arc<Self>,
        requests: WatchRequests,
        responses: WatchResponses,
        progress_interval: Duration,
    );

    /// A response header at the tenant's current revision.
    async fn header(&self) -> Result<ResponseHeader>;
    /// Status; with `whole_datastore`, the size of the datastore (which is the tenant's
    /// alone), otherwise the tenant's own size.
    async fn status(&self, whole_datastore: bool) -> Result<StatusFacts>;
    /// Defragments the datastore when it is the tenant's alone; otherwise does nothing.
    async fn defragment(&self, whole_datastore: bool) -> Result<()>;

    /// Freezes (or unfreezes): once this returns, no write of any process serving the tenant
    /// lands until it is unfrozen.
    async fn set_frozen(&self, frozen: bool) -> Result<()>;
    async fn set_quota(&self, quota: Quota) -> Result<()>;

    /// Whether a live migration moved the tenant to another datastore (this one keeps its
    /// data frozen). A datastore that is never a migration's source answers `false`.
    async fn moved(&self) -> Result<bool> {
        Ok(false)
    }

    /// The tenant as served after it moved to another datastore inside this process (a
    /// gateway's migration): streams opened before the move carry on there.
    fn successor(&self) -> Option<Arc<dyn ServedTenant>> {
        None
    }
}

/// The tenants of one datastore, for the gateway and the admin API.
#[async_trait::async_trait]
pub trait TenantDirectory: Send + Sync + 'static {
    /// Tenant `name`, opened on first use; with `create`, created when missing. `None` when
    /// it does not exist.
    async fn get(&self, name: &str, create: bool) -> Result<Option<Arc<dyn ServedTenant>>>;
    /// Creates tenant `name`; `false` when it already existed.
    async fn create(&self, name: &str, quota: Option<Quota>) -> Result<bool>;
    /// Tenant `name`'s counters; `None` when it does not exist.
    async fn state(&self, name: &str) -> Result<Option<KeyspaceState>>;
    /// Every tenant with its counters.
    async fn list(&self) -> Result<Vec<(String, KeyspaceState)>>;
    /// Watchers open on tenant `name` in this process.
    fn watches(&self, name: &str) -> i64;
    /// Closes the tenants unused for `idle` that have no stream or request open in this
    /// process (they reopen on their next request); returns how many stay open.
    fn evict_idle(&self, idle: Duration) -> usize;
    /// Deletes tenant `name` with its data; refused while it has open watches unless
    /// `force`. `false` when it did not exist.
    async fn delete(&self, name: &str, force: bool) -> Result<bool>;
}
