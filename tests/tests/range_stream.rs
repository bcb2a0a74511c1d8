//! etcd 3.7's `KV.RangeStream` (a range answered in chunks; kube-apiserver 1.37 lists with it),
//! compared answer by answer with etcd v3.7.3 (`scripts/peers.sh` builds it; etcd 3.5 and 3.6
//! do not have the RPC): the same writes on both, then the same requests — whole prefixes, limits
//! below and above a chunk, keys only, count only, an older revision, one key, an empty range,
//! from a key to the end, values large enough to take several chunks — must merge to the same
//! answer (keys, values and revisions, and the header revision, `more` and `count` the last
//! chunk alone carries), and give the same errors for what RangeStream refuses (orders other
//! than by key, orders and sort targets that are none of the API's, revision filters, no key,
//! compacted and future revisions). Where the chunks
//! break is not compared: kine-rs sizes them for its datastore reads, not as etcd does
//! (`kine-rs/src/server/range_stream.rs`). On every database backend, the chunks
//! come from the one gRPC layer over the served tenant; the etcd proxy, whose revisions are the
//! cluster's, is checked against its own `Range`.

use anyhow::{Context, Result, ensure};
use kine_proto::etcdserverpb as pb;
use kine_tests::{Backend, ChildGuard, etcd37_binary, spawn_etcd_binary, spawn_etcd_with};
use kine_tests::{spawn_kine_on, spawn_kine_with};
use pb::range_request::{SortOrder, SortTarget};
use tonic::transport::Channel;

type Kv = pb::kv_client::KvClient<Channel>;

/// One key as a chunk carries it: key, value, create and mod revisions, version.
type Key = (Vec<u8>, Vec<u8>, i64, i64, i64);

/// A whole answer: its chunks merged (they must be: keys in the first chunks, the header,
/// `more` and `count` on the last one only), or the error that ended it.
#[derive(Debug, PartialEq)]
enum Answer {
    Merged {
        kvs: Vec<Key>,
        /// The last chunk's header's revision.
        header_revision: i64,
        more: bool,
        count: i64,
    },
    Error(tonic::Code, String),
    /// Chunks that do not merge as etcd's do.
    Malformed(String),
}

/// An answer with how many chunks it came in.
struct Received {
    answer: Answer,
    chunks: usize,
}
async fn connect(endpoint: &str) -> Result<Kv> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match Channel::from_shared(endpoint.to_string())?.connect().await {
            Ok(channel) => return Ok(Kv::new(channel)),
            Err(error) if tokio::time::Instant::now() > deadline => {
                return Err(error).context(format!("connecting to {endpoint}"));
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
}

async fn answer(kv: &mut Kv, request: pb::RangeRequest) -> Received {
    let error = |status: tonic::Status| Received {
        answer: Answer::Error(status.code(), status.message().to_string()),
        chunks: 0,
    };
    let mut stream = match kv.range_stream(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => return error(status),
    };
    let mut chunks: Vec<pb::RangeResponse> = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(message)) => chunks.push(message.range_response.unwrap_or_default()),
            Ok(None) => break,
            Err(status) => return error(status),
        }
    }
    let count = chunks.len();
    let malformed = |why: String| Received {
        answer: Answer::Malformed(why),
        chunks: count,
    };
    let Some(last) = chunks.last() else {
        return malformed("no chunk".to_string());
    };
    let Some(header) = last.header else {
        return malformed("the last chunk has no header".to_string());
    };
    let (more, total) = (last.more, last.count);
    for (i, chunk) in chunks[..count - 1].iter().enumerate() {
        if chunk.header.is_some() || chunk.more || chunk.count != 0 || chunk.kvs.is_empty() {
            return malformed(format!("chunk {i} of {count}: {chunk:?}"));
        }
    }
    let kvs = chunks
        .into_iter()
        .flat_map(|chunk| chunk.kvs)
        .map(|kv| {
            (
                kv.key.to_vec(),
                kv.value.to_vec(),
                kv.create_revision,
                kv.mod_revision,
                kv.version,
            )
        })
        .collect();
    Received {
        answer: Answer::Merged {
            kvs,
            header_revision: header.revision,
            more,
            count: total,
        },
        chunks: count,
    }
}

fn range(key: &str, range_end: &str) -> pb::RangeRequest {
    pb::RangeRequest {
        key: key.as_bytes().to_vec().into(),
        range_end: range_end.as_bytes().to_vec().into(),
        ..Default::default()
    }
}

/// The same writes on every server: 300 keys of 1,500 bytes, 40 of 100 KiB, an overwrite and a
/// delete. Returns the revision after the first 150 writes.
async fn load(kv: &mut Kv) -> Result<i64> {
    let put = |key: String, value: Vec<u8>| pb::PutRequest {
        key: key.into_bytes().into(),
        value: value.into(),
        ..Default::default()
    };
    let mut middle = 0;
    for i in 0..300 {
        let value = vec![b'a' + (i % 26) as u8; 1500];
        let response = kv.put(put(format!("rs/{i:03}"), value)).await?.into_inner();
        if i == 149 {
            middle = response.header.context("header")?.revision;
        }
    }
    for i in 0..40 {
        kv.put(put(
            format!("big/{i:02}"),
            vec![b'0' + (i % 10) as u8; 100 << 10],
        ))
        .await?;
    }
    kv.put(put("rs/010".to_string(), b"again".to_vec())).await?;
    kv.delete_range(pb::DeleteRangeRequest {
        key: b"rs/020".to_vec().into(),
        ..Default::default()
    })
    .await?;
    Ok(middle)
}

/// The requests compared, by name, before any compaction.
fn requests(middle: i64) -> Vec<(&'static str, pb::RangeRequest)> {
    vec![
        ("a prefix", range("rs/", "rs0")),
        (
            "a limit inside the first chunks",
            pb::RangeRequest {
                limit: 25,
                ..range("rs/", "rs0")
            },
        ),
        (
            "a limit past several chunks",
            pb::RangeRequest {
                limit: 250,
                ..range("rs/", "rs0")
            },
        ),
        (
            "keys only",
            pb::RangeRequest {
                keys_only: true,
                ..range("rs/", "rs0")
            },
        ),
        (
            "count only",
            pb::RangeRequest {
                count_only: true,
                ..range("rs/", "rs0")
            },
        ),
        (
            "an older revision",
            pb::RangeRequest {
                revision: middle,
                ..range("rs/", "rs0")
            },
        ),
        ("one key", range("rs/005", "")),
        ("a deleted key", range("rs/020", "")),
        ("an empty range", range("zz", "zzz")),
        ("from a key to the end", range("rs/290", "\0")),
        ("large values", range("big/", "big0")),
        (
            "ascending by key",
            pb::RangeRequest {
                sort_target: SortTarget::Key as i32,
                sort_order: SortOrder::Ascend as i32,
                ..range("rs/", "rs0")
            },
        ),
        (
            "descending by key",
            pb::RangeRequest {
                sort_target: SortTarget::Key as i32,
                sort_order: SortOrder::Descend as i32,
                ..range("rs/", "rs0")
            },
        ),
        (
            "ascending by mod revision",
            pb::RangeRequest {
                sort_target: SortTarget::Mod as i32,
                sort_order: SortOrder::Ascend as i32,
                ..range("rs/", "rs0")
            },
        ),
        (
            "a revision filter",
            pb::RangeRequest {
                min_mod_revision: 5,
                ..range("rs/", "rs0")
            },
        ),
        ("no key", range("", "")),
        (
            "an order that is none",
            pb::RangeRequest {
                sort_order: 9,
                ..range("rs/", "rs0")
            },
        ),
        (
            "a sort target that is none",
            pb::RangeRequest {
                sort_order: 1,
                sort_target: 9,
                ..range("rs/", "rs0")
            },
        ),
        (
            "a future revision",
            pb::RangeRequest {
                revision: 1_000_000,
                ..range("rs/", "rs0")
            },
        ),
    ]
}

/// Every answer of `kv` after [`load`], then a compaction and a read below it.
async fn answers(kv: &mut Kv) -> Result<Vec<(&'static str, Received)>> {
    let middle = load(kv).await?;
    let mut answers = Vec::new();
    for (name, request) in requests(middle) {
        answers.push((name, answer(kv, request).await));
    }
    kv.compact(pb::CompactionRequest {
        revision: middle,
        physical: true,
    })
    .await?;
    let below = pb::RangeRequest {
        revision: middle - 1,
        ..range("rs/", "rs0")
    };
    answers.push(("a compacted revision", answer(kv, below).await));
    Ok(answers)
}

async fn etcd37_answers() -> Result<Vec<(&'static str, Received)>> {
    let etcd = tokio::task::spawn_blocking(|| spawn_etcd_binary(&etcd37_binary(), &[])).await?;
    let mut kv = connect(&etcd.endpoint).await?;
    answers(&mut kv).await
}

fn compare(
    label: &str,
    ours: &[(&'static str, Received)],
    etcd: &[(&'static str, Received)],
) -> Result<()> {
    ensure!(
        ours.len() == etcd.len(),
        "{label}: {} answers against {}",
        ours.len(),
        etcd.len()
    );
    for ((name, got), (_, want)) in ours.iter().zip(etcd) {
        ensure!(
            got.answer == want.answer,
            "{label}, {name}: kine-rs {:#?}\netcd 3.7 {:#?}",
            got.answer,
            want.answer
        );
    }
    // Not vacuous: both sent some answer in several chunks.
    for (who, answers) in [("kine-rs", ours), ("etcd 3.7", etcd)] {
        ensure!(
            answers.iter().any(|(_, received)| received.chunks >= 2),
            "{label}: {who} sent no answer in several chunks"
        );
    }
    Ok(())
}

async fn on_backend(backend: Backend) -> Result<()> {
    let etcd = etcd37_answers().await?;
    let kine =
        tokio::task::spawn_blocking(move || spawn_kine_with(backend, &["--compact-interval", "0"]))
            .await?;
    let mut kv = connect(&kine.endpoint).await?;
    let ours = answers(&mut kv).await?;
    compare(&format!("{backend:?}"), &ours, &etcd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_stream_as_etcd_3_7_on_sqlite() -> Result<()> {
    on_backend(Backend::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_stream_as_etcd_3_7_on_postgres() -> Result<()> {
    on_backend(Backend::Postgres).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_stream_as_etcd_3_7_on_mysql() -> Result<()> {
    on_backend(Backend::Mysql).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_stream_as_etcd_3_7_on_nats() -> Result<()> {
    on_backend(Backend::Nats).await
}

/// Through the etcd proxy (etcd 3.5.1, which has no RangeStream: the proxy serves it over its
/// `Range`), the merged chunks of each request are its `Range` answer at the same revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_stream_through_the_etcd_proxy_merges_to_its_range() -> Result<()> {
    let (_etcd, kine) = tokio::task::spawn_blocking(|| {
        let etcd = spawn_etcd_with(&["--max-txn-ops", "256"]);
        let kine: ChildGuard = spawn_kine_on(
            &format!("etcd://{}", etcd.address),
            tempfile::tempdir().expect("tempdir"),
            &["--tenant", "streamed"],
        );
        (etcd, kine)
    })
    .await?;
    let mut kv = connect(&kine.endpoint).await?;
    let middle = load(&mut kv).await?;
    let mut several = false;
    for (name, request) in requests(middle) {
        let streamed = answer(&mut kv, request.clone()).await;
        several |= streamed.chunks >= 2;
        let Answer::Merged {
            kvs,
            header_revision,
            more,
            count,
        } = streamed.answer
        else {
            continue;
        };
        let whole = kv
            .range(pb::RangeRequest {
                revision: if request.revision > 0 {
                    request.revision
                } else {
                    header_revision
                },
                ..request
            })
            .await?
            .into_inner();
        let merged: Vec<Vec<u8>> = kvs.into_iter().map(|kv| kv.0).collect();
        let keys: Vec<Vec<u8>> = whole.kvs.iter().map(|kv| kv.key.to_vec()).collect();
        ensure!(
            merged == keys && more == whole.more && count == whole.count,
            "{name}: chunks {merged:?} more {more} count {count}, Range {keys:?} more {} count {}",
            whole.more,
            whole.count
        );
    }
    ensure!(several, "no answer came in several chunks");
    Ok(())
}
