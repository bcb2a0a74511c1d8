//! A transaction over a huge range does not stall the writers (issue 14): its wide reads
//! (compares and range ops over 100,000 keys) are made before the keyspace's write lock is
//! taken, so other writers keep committing while it reads. On SQLite, where one writer serves
//! every tenant of the database, another tenant's puts keep completing; on PostgreSQL, puts of
//! the same tenant do, and they land inside the huge range, which the transaction must still
//! read exactly as of its own revision.
//!
//! No timings are asserted: every put of the other client that starts after a huge
//! transaction was sent and completes before its answer came counts as progress made during
//! it (an ordering fact, taken from one shared counter). Without the change the writer holds
//! the lock for the whole read, and no more than about one put per transaction can complete
//! inside it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::{Context, Result, ensure};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, SortOrder,
    SortTarget, TlsOptions, Txn, TxnOp, TxnOpResponse,
};
use kine_tests::pki::Pki;
use kine_tests::{Backend, spawn_kine_with};

/// Keys in the huge range.
const KEYS: usize = 100_000;
/// Huge transactions per test.
const ROUNDS: usize = 4;
/// Puts of the other client that must complete inside each huge transaction, on average.
/// Without the change, at most about one can.
const PUTS_PER_ROUND: usize = 4;

/// Writes `KEYS` keys under `big/` with four clients, 128 keys per transaction.
async fn load(client: &Client) -> Result<()> {
    let mut tasks = Vec::new();
    for loader in 0..4usize {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut next = loader * 128;
            while next < KEYS {
                let ops: Vec<TxnOp> = (next..(next + 128).min(KEYS))
                    .map(|i| TxnOp::put(format!("big/{i:07}"), "v".repeat(32), None))
                    .collect();
                client.txn(Txn::new().and_then(ops)).await?;
                next += 4 * 128;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// One client (`a`, holding the keys under `big/`) runs transactions that compare and read
/// all of them and write a key, while another (`b`) puts keys in a loop: into the huge range
/// itself when `b_in_range` (same tenant), elsewhere otherwise. Checks that `b` made
/// progress during `a`'s transactions, and that each transaction read exactly the state at
/// its revision.
async fn puts_progress_during_huge_txns(a: Client, b: Client, b_in_range: bool) -> Result<()> {
    load(&a).await?;
    let tick = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // b's puts: (tick before, tick after, revision).
    let puts = {
        let (tick, stop, mut b) = (tick.clone(), stop.clone(), b.clone());
        tokio::spawn(async move {
            let mut puts = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let key = if b_in_range {
                    format!("big/~b{i:09}")
                } else {
                    format!("b/{i:09}")
                };
                let before = tick.fetch_add(1, Ordering::SeqCst);
                let response = b.put(key, "b", None).await?;
                let after = tick.fetch_add(1, Ordering::SeqCst);
                let revision = response.header().context("header")?.revision();
                puts.push((before, after, revision));
                i += 1;
            }
            anyhow::Ok(puts)
        })
    };
    let mut a = a;
    let mut rounds = Vec::new();
    for round in 0..ROUNDS {
        let txn = Txn::new()
            .when([Compare::version("big/", CompareOp::Greater, 0).with_prefix()])
            .and_then([
                // Sorted by mod revision: every key is read, ten are returned.
                TxnOp::get(
                    "big/",
                    Some(
                        GetOptions::new()
                            .with_prefix()
                            .with_sort(SortTarget::Mod, SortOrder::Descend)
                            .with_limit(10),
                    ),
                ),
                TxnOp::put(format!("a/{round}"), "a", None),
            ]);
        let before = tick.fetch_add(1, Ordering::SeqCst);
        let response = a.txn(txn).await?;
        let after = tick.fetch_add(1, Ordering::SeqCst);
        ensure!(response.succeeded(), "the compare over the range failed");
        let revision = response.header().context("header")?.revision();
        let Some(TxnOpResponse::Get(get)) = response.op_responses().into_iter().next() else {
            anyhow::bail!("no range response");
        };
        rounds.push((before, after, revision, get.count(), get.kvs().len(), {
            get.kvs().first().map(|kv| kv.mod_revision())
        }));
    }
    stop.store(true, Ordering::SeqCst);
    let puts = puts.await??;
    for (_, _, revision, count, returned, newest) in &rounds {
        ensure!(
            *returned == 10,
            "the range returned {returned} keys, not 10"
        );
        if b_in_range {
            // b's puts create keys in the range: the transaction sees exactly those committed
            // before it (its own revision is its put's).
            let earlier: Vec<i64> = puts
                .iter()
                .map(|(_, _, r)| *r)
                .filter(|r| r < revision)
                .collect();
            ensure!(
                *count == (KEYS + earlier.len()) as i64,
                "count {count} at revision {revision}, expected {} + {}",
                KEYS,
                earlier.len()
            );
            if let Some(last) = earlier.iter().max() {
                ensure!(
                    *newest == Some(*last),
                    "the newest key read has revision {newest:?}, expected {last}"
                );
            }
        } else {
            ensure!(*count == KEYS as i64, "count {count}, expected {KEYS}");
        }
    }
    let inside = puts
        .iter()
        .filter(|(start, end, _)| {
            rounds
                .iter()
                .any(|(before, after, ..)| before < start && end < after)
        })
        .count();
    println!(
        "{inside} of {} puts completed inside {ROUNDS} huge transactions",
        puts.len()
    );
    ensure!(
        inside >= ROUNDS * PUTS_PER_ROUND,
        "only {inside} puts completed inside {ROUNDS} huge transactions ({} puts in all): \
         the transactions stall the writer",
        puts.len()
    );
    Ok(())
}

/// SQLite has one writer for every tenant of the database: in a gateway, tenant B's puts
/// keep completing while tenant A's transactions read 100,000 keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_sqlite_another_tenant_writes_during_huge_transactions() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::write(dir.path(), &["tenant-a", "tenant-b"]);
    let args = [
        "--gateway",
        "--gateway-create-tenants",
        "--server-cert-file",
        &pki.server_cert,
        "--server-key-file",
        &pki.server_key,
        "--trusted-ca-file",
        &pki.ca,
    ];
    let kine = spawn_kine_with(Backend::Sqlite, &args);
    let connect = |name: &str| {
        let (cert, key) = pki.client(name);
        let tls = TlsOptions::new()
            .domain_name("localhost")
            .ca_certificate(Certificate::from_pem(std::fs::read(&pki.ca).expect("ca")))
            .identity(Identity::from_pem(
                std::fs::read(cert).expect("cert"),
                std::fs::read(key).expect("key"),
            ));
        let options = ConnectOptions::new().with_tls(tls);
        let endpoint = format!("https://{}", kine.address);
        async move { Client::connect([endpoint.as_str()], Some(options)).await }
    };
    let a = connect("tenant-a").await?;
    let b = connect("tenant-b").await?;
    puts_progress_during_huge_txns(a, b, false).await
}

/// On PostgreSQL, puts of the same tenant keep completing while its huge transactions read,
/// and the transactions still see exactly the puts committed before them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_postgres_the_same_tenant_writes_into_the_range_during_huge_transactions() -> Result<()>
{
    let kine = spawn_kine_with(Backend::Postgres, &[]);
    let a = Client::connect([kine.endpoint.as_str()], None).await?;
    let b = Client::connect([kine.endpoint.as_str()], None).await?;
    puts_progress_during_huge_txns(a, b, true).await
}

/// The same on SQLite, in one tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_sqlite_the_same_tenant_writes_into_the_range_during_huge_transactions() -> Result<()> {
    let kine = spawn_kine_with(Backend::Sqlite, &[]);
    let a = Client::connect([kine.endpoint.as_str()], None).await?;
    let b = Client::connect([kine.endpoint.as_str()], None).await?;
    puts_progress_during_huge_txns(a, b, true).await
}
