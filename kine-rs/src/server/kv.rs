//! etcd's KV service.

use kine_proto::etcdserverpb::kv_server::Kv;
use kine_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, RangeStreamResponse, TxnRequest, TxnResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{Tenancy, range_stream};

/// Serves Range, RangeStream, Put, DeleteRange, Txn and Compact.
pub struct KvService {
    pub tenancy: Tenancy,
    /// `--max-request-bytes`: about what one chunk of a RangeStream holds, as in etcd.
    pub max_request_bytes: usize,
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

    type RangeStreamStream = ReceiverStream<Result<RangeStreamResponse, Status>>;

    async fn range_stream(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<Self::RangeStreamStream>, Status> {
        let keyspace = self.tenancy.keyspace(&request).await?;
        let request = request.into_inner();
        range_stream::check(&request)?;
        // Chunks are read while the client takes the previous one.
        let (chunks, receiver) = mpsc::channel(1);
        tokio::spawn(range_stream::serve(
            keyspace,
            request,
            self.max_request_bytes,
            chunks,
        ));
        Ok(Response::new(ReceiverStream::new(receiver)))
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
