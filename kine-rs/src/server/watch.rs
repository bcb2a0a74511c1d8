//! etcd's Watch service: each stream is served by its own task.

use std::time::Duration;

use kine_proto::etcdserverpb::WatchRequest;
use kine_proto::etcdserverpb::watch_server::Watch;
use tonic::{Request, Response, Status, Streaming};

use super::Tenancy;
use crate::watch::outbox::{self, ResponseReceiver};

/// Serves Watch.
pub struct WatchService {
    pub tenancy: Tenancy,
    pub progress_notify_interval: Duration,
    /// Bytes of responses buffered per stream before its task waits for the client
    /// (`--watch-stream-buffer-bytes`).
    pub stream_buffer_bytes: usize,
}

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = ResponseReceiver;

    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let tenant = self.tenancy.keyspace(&request).await?;
        let (sender, receiver) = outbox::channel(self.stream_buffer_bytes);
        let requests = Box::pin(request.into_inner());
        tokio::spawn(tenant.watch(requests, sender, self.progress_notify_interval));
        Ok(Response::new(receiver))
    }
}
