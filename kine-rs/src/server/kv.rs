//! etcd's KV service.

use kine_proto::etcdserverpb::kv_server::Kv;
use kine_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use tonic::{Request, Response, Status};

use super::Tenancy;

/// Serves Range, Put, DeleteRange, Txn and Compact.
pub struct KvService {
    pub tenancy: Tenancy,
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        let keyspace = self.tenancy.keyspace(&request).await?;
        Ok(Response::new(keyspace.range(request.into_inner()).await?))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let keyspace = self.tenancy.keyspace(&request).await?;
        Ok(Response::new(keyspace.put(request.into_inner()).await?))
    }

    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let keyspace = self.tenancy.keyspace(&request).await?;
        Ok(Response::new(
            keyspace.delete_range(request.into_inner()).await?,
        ))
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let keyspace = self.tenancy.keyspace(&request).await?;
        Ok(Response::new(keyspace.txn(request.into_inner()).await?))
    }

    async fn compact(
        &self,
        request: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let keyspace = self.tenancy.keyspace(&request).await?;
        Ok(Response::new(keyspace.compact(request.into_inner()).await?))
    }
}
