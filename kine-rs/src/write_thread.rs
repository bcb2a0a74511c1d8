//! The threads write batches run on, apart from the gRPC service's.
//!
//! A keyspace's writer is the one serial step of its writes: every batch waits for the one
//! before. On the service's runtime, each batch's answers woke a few dozen request tasks into
//! the writer's own worker queue, and the writer's next database reply waited behind them:
//! at 128 clients on MariaDB the batch's first statement took 0.6–0.7 ms from kine-rs against
//! 0.012 ms in the server's slow log. Here the writers have a runtime of their own, and so do
//! the connections of the server pools they use (a connection's socket is driven by the
//! runtime that opened it), while the answers they send wake request tasks on the service's.
//! Only where the backend says so ([`crate::storage::Backend::writes_on_write_thread`]: the
//! SQL backends); NATS's writers stay beside its client's connection.

use std::future::Future;
use std::sync::OnceLock;

use tokio::runtime::{Handle, Runtime};
use tokio::task::JoinHandle;

/// The name of the write threads.
pub const THREAD_NAME: &str = "kine-rs-writes";

/// The write threads' runtime, started on first use. One thread on machines of up to
/// seven cores (the writers of all keyspaces share it; each spends most of its time waiting
/// for its database), one per four cores beyond, at most four. `None` when the threads could
/// not be started: writes then run on the caller's runtime, as they did before.
fn runtime() -> Option<&'static Runtime> {
    static RUNTIME: OnceLock<Option<Runtime>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads((cores / 4).clamp(1, 4))
                .thread_name(THREAD_NAME)
                .enable_all()
                .build()
                .inspect_err(|error| {
                    tracing::warn!(%error, "cannot start the write threads; writes share the service's");
                })
                .ok()
        })
        .as_ref()
}

/// The write threads' runtime (the caller's, where they could not be started).
pub fn handle() -> Handle {
    runtime().map_or_else(Handle::current, |runtime| runtime.handle().clone())
}

/// Runs `task` on the write threads.
pub fn spawn<F>(task: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    handle().spawn(task)
}

/// Runs `task` on the write threads when `on_write_threads`, else on the caller's runtime.
pub fn spawn_on<F>(on_write_threads: bool, task: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    if on_write_threads {
        spawn(task)
    } else {
        tokio::spawn(task)
    }
}

/// Runs `work` on the write threads and waits for its result: what it opens (a pool's
/// connections) is driven by their runtime from then on.
pub async fn run<F>(work: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    match spawn(work).await {
        Ok(output) => output,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        // The runtime lives as long as the process and never cancels its tasks.
        Err(error) => panic!("a task on the write threads was cancelled: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thread_name() -> Option<String> {
        std::thread::current().name().map(String::from)
    }

    #[tokio::test]
    async fn tasks_run_on_the_write_threads_and_answer_the_caller() {
        assert_ne!(thread_name().as_deref(), Some(THREAD_NAME));
        let spawned = spawn(async { thread_name() }).await.expect("task");
        assert_eq!(spawned.as_deref(), Some(THREAD_NAME));
        assert_eq!(
            run(async { thread_name() }).await.as_deref(),
            Some(THREAD_NAME)
        );
        let on_write_threads = spawn_on(true, async { thread_name() });
        assert_eq!(
            on_write_threads.await.expect("task").as_deref(),
            Some(THREAD_NAME)
        );
        let here = spawn_on(false, async { thread_name() })
            .await
            .expect("task");
        assert_ne!(here.as_deref(), Some(THREAD_NAME));
    }

    #[tokio::test]
    async fn a_panic_on_the_write_threads_reaches_the_caller() {
        let caught = tokio::spawn(run(async { panic!("boom") })).await;
        let error = caught.expect_err("the panic comes back");
        assert!(error.is_panic());
    }
}
