//! The conformance suite, once per target: `memory::txn_nested`, `sqlite::txn_nested`,
//! `postgres::txn_nested`, `mysql::txn_nested`, `nats::txn_nested`, `etcd::txn_nested`, ... The etcd target checks
//! that the suite's expectations are etcd's.
//!
//! The cases live in `kine_tests::conformance`; every case starts its own server process.
//! A new backend is one more line at the bottom: `mod postgres { suite!(...); }`.

use std::time::Duration;

/// Upper bound for one case, so a hanging server fails the case instead of the run.
const CASE_TIMEOUT: Duration = Duration::from_secs(90);

macro_rules! suite {
    ($target:expr) => {
        suite!(@cases $target;
            kv_put_get_delete,
            kv_version_counting,
            kv_prev_kv,
            kv_ignore_value_ignore_lease,
            kv_ranges,
            kv_limit_more_count,
            kv_count_only_keys_only,
            kv_revision_reads,
            kv_sort,
            kv_min_max_revisions,
            kv_one_revision_per_txn,
            kv_delete_range,
            kv_concurrent_writes,
            txn_compare_value,
            txn_compare_revisions_and_lease,
            txn_compare_range,
            txn_branches,
            txn_nested,
            txn_reads_own_writes,
            kube_create,
            kube_optimistic_update_delete,
            kube_paginated_list,
            kube_compaction_txn,
            kube_events_with_lease,
            err_compacted_and_future_revision,
            err_leases,
            err_txn_validation,
            err_key_not_provided,
            err_invalid_sort_option,
            err_put_flags,
            err_request_too_large,
            compact_rpc,
            compact_deleted_keys,
            compact_put_and_deleted_in_one_revision,
            watch_key,
            watch_many_on_one_stream,
            watch_start_revision_history,
            watch_prev_kv,
            watch_filters,
            watch_cancel,
            watch_progress_notify,
            watch_progress_request,
            watch_compacted_revision,
            watch_order_no_duplicates,
            watch_multi_key_revision,
            watch_fragment,
            lease_grant,
            lease_revoke_and_list,
            lease_keep_alive,
            lease_time_to_live,
            lease_expiry,
            maintenance_status,
            cluster_member_list,
            grpc_health,
        );
    };
    (@cases $target:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let outcome = tokio::time::timeout(
                    crate::CASE_TIMEOUT,
                    kine_tests::conformance::$case($target),
                )
                .await;
                match outcome {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => panic!("{:?}: {e:#}", $target),
                    Err(_) => panic!("{:?}: timed out after {:?}", $target, crate::CASE_TIMEOUT),
                }
            }
        )*
    };
}

mod memory {
    use kine_tests::Backend;
    use kine_tests::conformance::Target;
    suite!(Target::Kine(Backend::Memory));
}

mod sqlite {
    use kine_tests::Backend;
    use kine_tests::conformance::Target;
    suite!(Target::Kine(Backend::Sqlite));

    /// kine-rs/SQLite only: leases and their keys survive a restart with the remaining TTL.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lease_survives_restart() {
        let outcome = tokio::time::timeout(
            crate::CASE_TIMEOUT,
            kine_tests::conformance::lease_survives_restart_sqlite(),
        )
        .await;
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{e:#}"),
            Err(_) => panic!("timed out after {:?}", crate::CASE_TIMEOUT),
        }
    }
}

mod postgres {
    use kine_tests::Backend;
    use kine_tests::conformance::Target;
    suite!(Target::Kine(Backend::Postgres));
}

mod mysql {
    use kine_tests::Backend;
    use kine_tests::conformance::Target;
    suite!(Target::Kine(Backend::Mysql));
}

mod nats {
    use kine_tests::Backend;
    use kine_tests::conformance::Target;
    suite!(Target::Kine(Backend::Nats));
}

mod nats_newest {
    use kine_tests::Backend;
    use kine_tests::conformance::Target;
    suite!(Target::Kine(Backend::NatsNewest));
}

mod etcd {
    use kine_tests::conformance::Target;
    suite!(Target::Etcd);
}

mod etcd_proxy {
    use kine_tests::conformance::Target;
    suite!(Target::EtcdProxy);
}
