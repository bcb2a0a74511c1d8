//! etcd's Watch service: each stream is served by its own task.

use std::time::Duration;

use kine_proto::etcdserverpb::watch_server::Watch;
use kine_proto::etcdserverpb::{WatchRequest, WatchResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::Tenancy;
use crate::watch::stream::WatchStream;

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
        let keyspace = self.tenancy.keyspace(&request).await?;
        let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
        let stream = WatchStream::new(keyspace, sender, self.progress_notify_interval);
        tokio::spawn(stream.run(request.into_inner()));
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}
