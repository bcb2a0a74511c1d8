//! The engine in process, between memory and SQLite datastores (the black-box tests in
//! `tests/tests/migrate.rs` run the `kine-rs migrate` command between every pair of servers).

#![allow(clippy::unwrap_used)] // A panic is how a test reports.

use std::sync::Arc;

use bytes::Bytes;
use kine_proto::etcdserverpb::{
    CompactionRequest, DeleteRangeRequest, LeaseGrantRequest, PutRequest, RangeRequest,
};

use super::*;
use crate::keyspace::{HeaderIdentity, Keyspace};
use crate::storage::sqlite;
use crate::txn::RequestLimits;

async fn memory() -> Arc<dyn Backend> {
    Arc::new(sqlite::open_memory().await.expect("memory datastore"))
}

async fn serve(backend: &Arc<dyn Backend>, tenant: &str) -> Arc<Keyspace> {
    Keyspace::open(
        backend.clone(),
        tenant,
        true,
        RequestLimits::default(),
        HeaderIdentity::default(),
    )
    .await
    .expect("open")
    .expect("keyspace")
}

async fn put(keyspace: &Keyspace, key: &str, value: &str, lease: i64) -> Revision {
    keyspace
        .put(PutRequest {
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Bytes::copy_from_slice(value.as_bytes()),
            lease,
            ..Default::default()
        })
        .await
        .expect("put")
        .header
        .expect("header")
        .revision
}

/// Writes a tenant with history, a compaction, deletes and a lease.
async fn populate(keyspace: &Keyspace) -> i64 {
    for round in 0..3 {
        for i in 0..150 {
            put(keyspace, &format!("/k/{i:04}"), &format!("v{round}-{i}"), 0).await;
        }
    }
    keyspace
        .compact(CompactionRequest {
            revision: 200,
            physical: true,
        })
        .await
        .expect("compact");
    let lease = keyspace
        .lease_grant(LeaseGrantRequest { ttl: 600, id: 0 })
        .await
        .expect("grant");
    put(keyspace, "/leased", "x", lease.id).await;
    keyspace
        .delete_range(DeleteRangeRequest {
            key: Bytes::from_static(b"/k/0010"),
            range_end: Bytes::from_static(b"/k/0020"),
            ..Default::default()
        })
        .await
        .expect("delete");
    lease.id
}

fn options(tenant: &str) -> Options {
    Options {
        page_keys: 7,
        window_revisions: 13,
        ..Options::new(tenant)
    }
}

async fn all(keyspace: &Keyspace, revision: Revision) -> Vec<kine_proto::mvccpb::KeyValue> {
    keyspace
        .range(RangeRequest {
            key: Bytes::from_static(b"\0"),
            range_end: Bytes::from_static(b"\0"),
            revision,
            ..Default::default()
        })
        .await
        .expect("range")
        .kvs
}

#[tokio::test]
async fn moves_keys_history_compaction_and_leases() {
    let (source, target) = (memory().await, memory().await);
    let served = serve(&source, "t1").await;
    let lease = populate(&served).await;
    let before = served.state().await.expect("state");
    let mut reports = 0;
    let summary = run(&*source, &*target, &options("t1"), &mut |_| reports += 1)
        .await
        .expect("migrate");
    assert!(reports > 3, "progress is reported per page and window");
    assert_eq!(summary.revision, before.revision);
    assert_eq!(summary.compact_revision, 200);
    assert_eq!(summary.leases, 1);

    let moved = serve(&target, "t1").await;
    let after = moved.state().await.expect("state");
    assert_eq!(after.revision, before.revision);
    assert_eq!(after.compact_revision, before.compact_revision);
    assert_eq!((after.keys, after.bytes), (before.keys, before.bytes));
    // Every revision the source could read, the target reads the same.
    for revision in [200, 250, 300, 451, before.revision] {
        assert_eq!(
            all(&served, revision).await,
            all(&moved, revision).await,
            "at {revision}"
        );
    }
    let events = target
        .events(moved.id(), 200, before.revision, None)
        .await
        .expect("events");
    let expected = source
        .events(served.id(), 200, before.revision, None)
        .await
        .expect("events");
    assert_eq!(events, expected);
    let (record, keys) = moved
        .lease_time_to_live(lease, true)
        .await
        .expect("ttl")
        .expect("lease moved");
    assert_eq!(record.ttl, 600);
    assert!(record.remaining_seconds(now_ms()) > 590);
    assert_eq!(keys, vec![Bytes::from_static(b"/leased")]);

    // The source is moved: frozen, not served, its data kept.
    let state = source.state(served.id()).await.expect("state");
    assert_eq!(state.migration, MigrationRole::Moved);
    assert!(state.frozen);
    assert!(matches!(
        served
            .put(PutRequest {
                key: Bytes::from_static(b"/late"),
                ..Default::default()
            })
            .await,
        Err(KineError::TenantMoved { .. })
    ));
    assert!(matches!(
        Keyspace::open(
            source.clone(),
            "t1",
            false,
            RequestLimits::default(),
            HeaderIdentity::default()
        )
        .await,
        Err(KineError::TenantMoved { .. })
    ));
    // A second run says so; abort refuses to undo a finished move.
    assert!(matches!(
        run(&*source, &*target, &options("t1"), &mut |_| ()).await,
        Err(MigrateError::AlreadyMoved(_))
    ));
    assert!(matches!(
        abort(&*source, &*target, "t1").await,
        Err(MigrateError::Finished(_))
    ));
}

#[tokio::test]
async fn resumes_from_the_checkpoint_and_aborts() {
    let (source, target) = (memory().await, memory().await);
    let served = serve(&source, "t2").await;
    populate(&served).await;
    // An interrupted run: pinned, a few pages copied, the source frozen by the migration.
    let opts = options("t2");
    let source_id = served.id();
    let src = BackendSource::open(&*source, "t2")
        .await
        .unwrap()
        .expect("source");
    let target_id = target.keyspace("t2", true).await.unwrap().unwrap();
    let mut checkpoint = start(&src, &*target, target_id, &opts)
        .await
        .expect("start");
    for _ in 0..3 {
        copy_page(&src, &*target, target_id, &opts, &mut checkpoint)
            .await
            .expect("page");
    }
    src.freeze(&opts.target_name).await.expect("freeze");
    // Compaction may not pass the pin while the migration is unfinished.
    assert!(matches!(
        served
            .compact(CompactionRequest {
                revision: 300,
                physical: false
            })
            .await,
        Err(KineError::Frozen { .. })
    ));
    // The import is not served.
    assert!(matches!(
        Keyspace::open(
            target.clone(),
            "t2",
            false,
            RequestLimits::default(),
            HeaderIdentity::default()
        )
        .await,
        Err(KineError::TenantImporting { .. })
    ));

    // Abort: writable, unpinned, the import gone.
    let aborted = abort(&*source, &*target, "t2").await.expect("abort");
    assert_eq!(
        aborted,
        Aborted {
            source_released: true,
            import_removed: true
        }
    );
    let state = source.state(source_id).await.unwrap();
    assert!(!state.frozen);
    assert_eq!(state.migration, MigrationRole::None);
    assert!(target.keyspace("t2", false).await.unwrap().is_none());
    put(&served, "/after-abort", "1", 0).await;

    // Interrupted again, then resumed: the rerun unfreezes first, continues from the pages
    // already copied, and ends equal.
    let target_id = target.keyspace("t2", true).await.unwrap().unwrap();
    let mut checkpoint = start(&src, &*target, target_id, &opts)
        .await
        .expect("start");
    for _ in 0..2 {
        copy_page(&src, &*target, target_id, &opts, &mut checkpoint)
            .await
            .expect("page");
    }
    assert!(matches!(
        served
            .compact(CompactionRequest {
                revision: 300,
                physical: false
            })
            .await,
        Err(KineError::CompactionPinned { pinned: 200 })
    ));
    src.freeze(&opts.target_name).await.expect("freeze");
    let summary = run(&*source, &*target, &opts, &mut |_| ())
        .await
        .expect("resume");
    assert!(summary.resumed);
    let moved = serve(&target, "t2").await;
    let revision = served.state().await.unwrap().revision;
    assert_eq!(all(&served, revision).await, all(&moved, revision).await);
}

#[tokio::test]
async fn follows_writes_made_during_the_copy() {
    let (source, target) = (memory().await, memory().await);
    let served = serve(&source, "t3").await;
    populate(&served).await;
    let writer = {
        let served = served.clone();
        tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for i in 0..400 {
                match served
                    .put(PutRequest {
                        key: Bytes::from(format!("/live/{i:04}")),
                        value: Bytes::from_static(b"v"),
                        ..Default::default()
                    })
                    .await
                {
                    Ok(response) => acknowledged.push((i, response.header.unwrap().revision)),
                    Err(KineError::Frozen { .. } | KineError::TenantMoved { .. }) => break,
                    Err(error) => panic!("unexpected write error: {error}"),
                }
                tokio::task::yield_now().await;
            }
            acknowledged
        })
    };
    let summary = run(&*source, &*target, &options("t3"), &mut |_| ())
        .await
        .expect("migrate");
    let acknowledged = writer.await.unwrap();
    let moved = serve(&target, "t3").await;
    // Every acknowledged write is on the target, none after the final revision.
    for (i, revision) in acknowledged {
        assert!(revision <= summary.revision);
        let got = moved
            .range(RangeRequest {
                key: Bytes::from(format!("/live/{i:04}")),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(got.kvs.len(), 1, "write {i} at {revision} is missing");
        assert_eq!(got.kvs[0].mod_revision, revision);
    }
}

#[tokio::test]
async fn refuses_a_target_with_data_and_an_unknown_tenant() {
    let (source, target) = (memory().await, memory().await);
    populate(&*serve(&source, "t4").await).await;
    put(&*serve(&target, "t4").await, "/other", "x", 0).await;
    assert!(matches!(
        run(&*source, &*target, &options("t4"), &mut |_| ()).await,
        Err(MigrateError::TargetNotEmpty(_))
    ));
    assert!(matches!(
        run(&*source, &*target, &options("nope"), &mut |_| ()).await,
        Err(MigrateError::UnknownTenant(_))
    ));
    // The refused run released nothing it had not taken: the source serves as before.
    let plan = plan(&*source, "t4").await.expect("plan");
    assert_eq!(plan.keys, 141);
    assert_eq!(plan.compact_revision, 200);
    assert_eq!(plan.leases, 1);
}

/// A copy that differs from the source is caught: here a row of the target is changed just
/// before the verification reads it. The source keeps serving and the import is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_that_differs_fails_verification() {
    let (source, target) = (memory().await, memory().await);
    let served = serve(&source, "t5").await;
    populate(&served).await;
    let tamper = |target: Arc<dyn Backend>| async move {
        let id = target.keyspace("t5", false).await.unwrap().unwrap();
        let mut txn = target.begin_write(id).await.unwrap();
        let mut kv = txn.get(b"/k/0100").await.unwrap().unwrap();
        kv.value = Bytes::from_static(b"tampered");
        txn.put(&kv, 99).await.unwrap();
        let revision = txn.state().revision;
        txn.commit(revision).await.unwrap();
    };
    let mut tampered = false;
    let result = run(&*source, &*target, &options("t5"), &mut |progress| {
        if progress.phase == Phase::Verify && !tampered {
            tampered = true;
            let target = target.clone();
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(tamper(target))
            });
        }
    })
    .await;
    assert!(
        matches!(result, Err(MigrateError::VerifyFailed { .. })),
        "{result:?}"
    );
    let state = served.state().await.unwrap();
    assert!(!state.frozen);
    assert_eq!(state.migration, MigrationRole::None);
    assert!(target.keyspace("t5", false).await.unwrap().is_none());
    put(&served, "/after", "1", 0).await;
}

#[tokio::test]
async fn history_is_events_without_previous_values() {
    let backend = memory().await;
    let served = serve(&backend, "t1").await;
    populate(&served).await;
    let head = served.state().await.expect("state").revision;
    // Windows that cut through the history, the deletes and the lease's put.
    for (after, up_to) in [(199, head), (250, 251), (440, head), (head - 1, head)] {
        let mut expected = backend
            .events(served.id(), after, up_to, None)
            .await
            .expect("events");
        assert!(
            expected.iter().any(|e| e.prev_kv.is_some()) || up_to - after < 5,
            "the window ({after}, {up_to}] has overwrites"
        );
        for event in &mut expected {
            event.prev_kv = None;
        }
        let history = backend
            .history(served.id(), after, up_to)
            .await
            .expect("history");
        assert_eq!(history, expected, "({after}, {up_to}]");
    }
    assert!(matches!(
        backend.history(served.id(), 10, head).await,
        Err(KineError::Compacted)
    ));
}

/// A source that records the windows of events read from it, and whether the freeze had
/// begun (a recorder around a real source, not a stand-in).
struct Recording<'a> {
    inner: BackendSource<'a>,
    frozen: std::sync::atomic::AtomicBool,
    reads: std::sync::Mutex<Vec<(bool, Revision, Revision)>>,
}

#[async_trait::async_trait]
impl Source for Recording<'_> {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    async fn state(&self) -> crate::error::Result<SourceState> {
        self.inner.state().await
    }
    async fn recover(&self) -> crate::error::Result<()> {
        self.inner.recover().await
    }
    async fn pin(&self, target: &str) -> crate::error::Result<Revision> {
        self.inner.pin(target).await
    }
    async fn can_resume(&self, snapshot: Revision) -> crate::error::Result<bool> {
        self.inner.can_resume(snapshot).await
    }
    async fn page(
        &self,
        revision: Revision,
        after: Option<&[u8]>,
        limit: i64,
    ) -> crate::error::Result<Vec<KeyValue>> {
        self.inner.page(revision, after, limit).await
    }
    async fn events(&self, after: Revision, up_to: Revision) -> crate::error::Result<Vec<Event>> {
        let frozen = self.frozen.load(std::sync::atomic::Ordering::SeqCst);
        self.reads.lock().unwrap().push((frozen, after, up_to));
        self.inner.events(after, up_to).await
    }
    async fn leases(&self) -> crate::error::Result<Vec<LeaseRecord>> {
        self.inner.leases().await
    }
    async fn freeze(&self, target: &str) -> crate::error::Result<SourceState> {
        self.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
        self.inner.freeze(target).await
    }
    async fn release(&self, keep_pin: bool) -> crate::error::Result<()> {
        self.inner.release(keep_pin).await
    }
    async fn mark_moved(&self, target: &str) -> crate::error::Result<()> {
        self.inner.mark_moved(target).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_freeze_reads_only_the_events_after_the_last_tail() {
    let (source, target) = (memory().await, memory().await);
    let served = serve(&source, "t6").await;
    populate(&served).await;
    let recording = Recording {
        inner: BackendSource::open(&*source, "t6").await.unwrap().unwrap(),
        frozen: false.into(),
        reads: Default::default(),
    };
    // Writes while the digest is taken: the tail after it copies them before the freeze
    // (with no lag allowed, whatever their number).
    let options = Options {
        freeze_lag: 0,
        ..options("t6")
    };
    let mut wrote = false;
    let summary = run_from(&recording, &*target, &options, &mut |progress| {
        if progress.phase == Phase::Verify && !wrote {
            wrote = true;
            let served = served.clone();
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(async move {
                    for i in 0..40 {
                        put(&served, &format!("/during/{i}"), "v", 0).await;
                    }
                })
            });
        }
    })
    .await
    .expect("migrate");
    let reads = recording.reads.lock().unwrap().clone();
    let copied_before = reads
        .iter()
        .filter(|(frozen, _, _)| !frozen)
        .map(|(_, _, up_to)| *up_to)
        .max()
        .unwrap();
    let first_frozen = reads
        .iter()
        .filter(|(frozen, _, _)| *frozen)
        .map(|(_, after, _)| *after)
        .min()
        .unwrap_or(summary.revision);
    assert!(
        first_frozen >= copied_before,
        "frozen, the copy read events after {first_frozen}, before {copied_before}: {reads:?}"
    );
    let moved = serve(&target, "t6").await;
    assert_eq!(all(&moved, 0).await, all(&served, 0).await);
}
