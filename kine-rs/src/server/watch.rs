//! etcd's Watch service: each stream is served by its own task.

use std::time::Duration;

use kine_proto::etcdserverpb::watch_server::Watch;
use kine_proto::etcdserverpb::{WatchRequest, WatchResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::Tenancy;

/// Responses buffered per stream before its task waits for the client.
const STREAM_BUFFER: usize = 128;

/// Serves Watch.
pub struct WatchService {
    pub tenancy: Tenancy,
    pub progress_notify_interval: Duration,
}

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = ReceiverStream<Result<WatchResponse, Status>>;

    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let tenant = self.tenancy.keyspace(&request).await?;
        let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
        let requests = Box::pin(request.into_inner());
        tokio::spawn(tenant.watch(requests, sender, self.progress_notify_interval));
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}
