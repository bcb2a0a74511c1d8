//! Watch.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use etcd_client::{DeleteOptions, EventType, Txn, TxnOp, WatchFilterType, WatchOptions};

use super::{
    Options, Seen, Server, Target, add_watch, collect_events, current_revision, expect_quiet,
    header_revision, next_response, watch,
};

fn summary(events: &[Seen]) -> Vec<(i64, EventType, String, String)> {
    events
        .iter()
        .map(|e| (e.watch_id, e.kind, e.key.clone(), e.value.clone()))
        .collect()
}

/// One key: PUT and DELETE events with full key-values.
pub async fn watch_key(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    let (mut stream, id) = watch(&mut c, "w", None).await?;
    let r1 = header_revision(c.put("w", "1", None).await?.header())?;
    c.put("w2", "not watched", None).await?;
    c.put("other", "not watched", None).await?;
    let r2 = header_revision(c.put("w", "2", None).await?.header())?;
    let r3 = header_revision(c.delete("w", None).await?.header())?;
    let events = collect_events(&mut stream, 3).await?;
    let expected = [
        (EventType::Put, "1", r1, r1, 1),
        (EventType::Put, "2", r2, r1, 2),
        (EventType::Delete, "", r3, 0, 0),
    ];
    for (e, (kind, value, rev, create, version)) in events.iter().zip(expected) {
        ensure!(e.watch_id == id && e.key == "w", "{e:?}");
        ensure!(
            e.kind == kind
                && e.value == value
                && e.revision == rev
                && e.create_revision == create
                && e.version == version,
            "expected {kind:?} {value} rev {rev} create {create} version {version}, got {e:?}"
        );
        ensure!(e.prev_value.is_none(), "prev_kv only when asked: {e:?}");
    }
    expect_quiet(&mut stream, Duration::from_millis(300)).await?;
    Ok(())
}

/// Many watches on one stream: key, prefix, range and from-key; each sees only its keys.
pub async fn watch_many_on_one_stream(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    let (mut stream, key_id) = watch(&mut c, "m/a", None).await?;
    let prefix_id = add_watch(&mut stream, "m/", Some(WatchOptions::new().with_prefix())).await?;
    let range_id = add_watch(
        &mut stream,
        "m/b",
        Some(WatchOptions::new().with_range("m/d")),
    )
    .await?;
    let from_id = add_watch(
        &mut stream,
        "m/c",
        Some(WatchOptions::new().with_from_key()),
    )
    .await?;
    let mut ids = vec![key_id, prefix_id, range_id, from_id];
    ids.sort();
    ids.dedup();
    ensure!(ids.len() == 4, "watch ids must be distinct: {ids:?}");

    for k in ["m/a", "m/b", "m/c", "m/d", "n"] {
        c.put(k, k, None).await?;
    }
    // key: a; prefix: a b c d; range [b, d): b c; from c: c d n  => 10 events
    let events = collect_events(&mut stream, 10).await?;
    let of = |id: i64| -> Vec<String> {
        events
            .iter()
            .filter(|e| e.watch_id == id)
            .map(|e| e.key.clone())
            .collect()
    };
    ensure!(of(key_id) == ["m/a"], "{:?}", summary(&events));
    ensure!(
        of(prefix_id) == ["m/a", "m/b", "m/c", "m/d"],
        "{:?}",
        summary(&events)
    );
    ensure!(of(range_id) == ["m/b", "m/c"], "{:?}", summary(&events));
    ensure!(of(from_id) == ["m/c", "m/d", "n"], "{:?}", summary(&events));
    Ok(())
}

/// A start revision in the past replays history, then continues live.
pub async fn watch_start_revision_history(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    let r1 = header_revision(c.put("h/1", "a", None).await?.header())?;
    c.put("h/2", "b", None).await?;
    c.put("h/1", "c", None).await?;
    c.delete("h/2", None).await?;
    c.put("elsewhere", "x", None).await?;
    let (mut stream, _) = watch(
        &mut c,
        "h/",
        Some(
            WatchOptions::new()
                .with_prefix()
                .with_start_revision(r1 + 1),
        ),
    )
    .await?;
    let events = collect_events(&mut stream, 3).await?;
    let got: Vec<(EventType, &str, &str, i64)> = events
        .iter()
        .map(|e| (e.kind, e.key.as_str(), e.value.as_str(), e.revision))
        .collect();
    ensure!(
        got == [
            (EventType::Put, "h/2", "b", r1 + 1),
            (EventType::Put, "h/1", "c", r1 + 2),
            (EventType::Delete, "h/2", "", r1 + 3),
        ],
        "{got:?}"
    );
    let live = header_revision(c.put("h/3", "live", None).await?.header())?;
    let events = collect_events(&mut stream, 1).await?;
    ensure!(
        events[0].key == "h/3" && events[0].revision == live,
        "{events:?}"
    );
    Ok(())
}

/// prev_kv on watch events.
pub async fn watch_prev_kv(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    let (mut stream, _) = watch(&mut c, "pk", Some(WatchOptions::new().with_prev_key())).await?;
    c.put("pk", "1", None).await?;
    c.put("pk", "2", None).await?;
    c.delete("pk", None).await?;
    let events = collect_events(&mut stream, 3).await?;
    let prev: Vec<Option<&str>> = events.iter().map(|e| e.prev_value.as_deref()).collect();
    ensure!(prev == [None, Some("1"), Some("2")], "{events:?}");
    Ok(())
}

/// NOPUT and NODELETE filters.
pub async fn watch_filters(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    let (mut stream, no_put) = watch(
        &mut c,
        "f/",
        Some(
            WatchOptions::new()
                .with_prefix()
                .with_filters([WatchFilterType::NoPut]),
        ),
    )
    .await?;
    let no_delete = add_watch(
        &mut stream,
        "f/",
        Some(
            WatchOptions::new()
                .with_prefix()
                .with_filters([WatchFilterType::NoDelete]),
        ),
    )
    .await?;
    c.put("f/1", "a", None).await?;
    c.put("f/2", "b", None).await?;
    c.delete("f/1", None).await?;
    c.delete("f/", Some(DeleteOptions::new().with_prefix()))
        .await?;
    let events = collect_events(&mut stream, 4).await?;
    let deletes: Vec<(EventType, String)> = events
        .iter()
        .filter(|e| e.watch_id == no_put)
        .map(|e| (e.kind, e.key.clone()))
        .collect();
    ensure!(
        deletes
            == [
                (EventType::Delete, "f/1".into()),
                (EventType::Delete, "f/2".into())
            ],
        "NOPUT: {:?}",
        summary(&events)
    );
    let puts: Vec<(EventType, String)> = events
        .iter()
        .filter(|e| e.watch_id == no_delete)
        .map(|e| (e.kind, e.key.clone()))
        .collect();
    ensure!(
        puts == [
            (EventType::Put, "f/1".into()),
            (EventType::Put, "f/2".into())
        ],
        "NODELETE: {:?}",
        summary(&events)
    );
    expect_quiet(&mut stream, Duration::from_millis(300)).await?;
    Ok(())
}

/// Cancel: a `canceled` response for that id, no more events for it, others keep going.
pub async fn watch_cancel(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    let (mut stream, first) = watch(&mut c, "x", None).await?;
    let second = add_watch(&mut stream, "x", None).await?;
    c.put("x", "1", None).await?;
    let events = collect_events(&mut stream, 2).await?;
    ensure!(events.iter().any(|e| e.watch_id == first), "{events:?}");
    stream.cancel(first).await?;
    let resp = next_response(&mut stream).await?;
    ensure!(
        resp.canceled() && resp.watch_id() == first && resp.events().is_empty(),
        "cancel response: {resp:?}"
    );
    c.put("x", "2", None).await?;
    let events = collect_events(&mut stream, 1).await?;
    ensure!(
        events[0].watch_id == second && events[0].value == "2",
        "{events:?}"
    );
    expect_quiet(&mut stream, Duration::from_millis(300)).await?;
    Ok(())
}

/// Progress notifications (server flag: every second) carry the current revision and no
/// events, for watches that asked for them.
pub async fn watch_progress_notify(target: Target) -> Result<()> {
    let server = Server::start_with(
        target,
        Options {
            progress_notify_1s: true,
        },
    )
    .await?;
    let mut c = server.client().await?;
    let (mut stream, id) = watch(
        &mut c,
        "pn",
        Some(WatchOptions::new().with_progress_notify()),
    )
    .await?;
    c.put("unrelated", "1", None).await?;
    let rev = header_revision(c.put("unrelated", "2", None).await?.header())?;
    let resp = super::next_response_within(&mut stream, Duration::from_secs(6))
        .await?
        .context("no progress notification within 6s (interval 1s)")?;
    ensure!(
        resp.watch_id() == id && resp.events().is_empty() && !resp.canceled() && !resp.created(),
        "{resp:?}"
    );
    ensure!(
        header_revision(resp.header())? == rev,
        "progress at the current revision: {resp:?}"
    );
    Ok(())
}

/// WatchProgressRequest: an immediate response with the current revision, no events, watch
/// id -1.
pub async fn watch_progress_request(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    let (mut stream, _) = watch(&mut c, "pr", None).await?;
    c.put("elsewhere", "1", None).await?;
    let rev = header_revision(c.put("elsewhere", "2", None).await?.header())?;
    stream.request_progress().await?;
    let resp = next_response(&mut stream).await?;
    ensure!(
        resp.events().is_empty() && !resp.canceled() && !resp.created(),
        "{resp:?}"
    );
    ensure!(
        resp.watch_id() == -1,
        "progress response watch id: {resp:?}"
    );
    ensure!(
        header_revision(resp.header())? == rev,
        "progress response must carry the current revision {rev}: {resp:?}"
    );
    Ok(())
}

/// Watching from a compacted revision: the watch is canceled with compact_revision set.
pub async fn watch_compacted_revision(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    let r1 = header_revision(c.put("wc", "1", None).await?.header())?;
    c.put("wc", "2", None).await?;
    let r3 = header_revision(c.put("wc", "3", None).await?.header())?;
    c.compact(r3, None).await?;
    let mut stream = c
        .watch("wc", Some(WatchOptions::new().with_start_revision(r1)))
        .await?;
    let mut resp = next_response(&mut stream).await?;
    if resp.created() && !resp.canceled() {
        resp = next_response(&mut stream).await?;
    }
    ensure!(
        resp.canceled(),
        "watch below the compaction must be canceled: {resp:?}"
    );
    ensure!(
        resp.compact_revision() == r3,
        "compact_revision {r3}: {resp:?}"
    );
    ensure!(resp.events().is_empty(), "{resp:?}");

    // At the compaction revision itself, the watch works; the event's previous value was
    // at a compacted revision, so it has none even when asked for.
    let (mut ok, _) = watch(
        &mut c,
        "wc",
        Some(WatchOptions::new().with_start_revision(r3).with_prev_key()),
    )
    .await?;
    let events = collect_events(&mut ok, 1).await?;
    ensure!(
        events[0].value == "3" && events[0].revision == r3 && events[0].prev_value.is_none(),
        "{events:?}"
    );
    // Above it, the previous value is there.
    c.put("wc", "4", None).await?;
    let events = collect_events(&mut ok, 1).await?;
    ensure!(
        events[0].value == "4" && events[0].prev_value.as_deref() == Some("3"),
        "{events:?}"
    );
    Ok(())
}

/// Concurrent writers: a watch from the past sees every event exactly once, in revision
/// order, each revision in one response.
pub async fn watch_order_no_duplicates(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    let start = current_revision(&mut c).await? + 1;
    let mut writers = Vec::new();
    for w in 0..4 {
        let mut wc = server.client().await?;
        writers.push(tokio::spawn(async move {
            let mut written: Vec<(String, i64)> = Vec::new();
            for i in 0..15 {
                if i % 5 == 4 {
                    let keys = [format!("o/{w}/{i}/a"), format!("o/{w}/{i}/b")];
                    let t = wc
                        .txn(Txn::new().and_then([
                            TxnOp::put(keys[0].as_str(), "t", None),
                            TxnOp::put(keys[1].as_str(), "t", None),
                        ]))
                        .await?;
                    let rev = header_revision(t.header())?;
                    written.extend(keys.into_iter().map(|k| (k, rev)));
                } else {
                    let k = format!("o/{w}/{i}");
                    let rev = header_revision(wc.put(k.as_str(), "p", None).await?.header())?;
                    written.push((k, rev));
                }
            }
            anyhow::Ok(written)
        }));
    }
    // Watch while writes are in flight, from before the first of them.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (mut stream, _) = watch(
        &mut c,
        "o/",
        Some(WatchOptions::new().with_prefix().with_start_revision(start)),
    )
    .await?;
    let mut expected: Vec<(String, i64)> = Vec::new();
    for w in writers {
        expected.extend(w.await??);
    }
    let events = collect_events(&mut stream, expected.len()).await?;
    for pair in events.windows(2) {
        if pair[1].revision < pair[0].revision {
            bail!("out of order: {:?} then {:?}", pair[0], pair[1]);
        }
    }
    let mut got: Vec<(String, i64)> = events.iter().map(|e| (e.key.clone(), e.revision)).collect();
    got.sort();
    expected.sort();
    ensure!(got == expected, "every write exactly once");
    let revs: std::collections::BTreeSet<i64> = expected.iter().map(|(_, r)| *r).collect();
    ensure!(revs.len() == 60, "60 write requests, 60 revisions");
    ensure!(
        revs.iter()
            .zip(revs.iter().skip(1))
            .all(|(a, b)| b - a == 1),
        "revisions are gapless: {revs:?}"
    );
    expect_quiet(&mut stream, Duration::from_millis(300)).await?;
    Ok(())
}

/// A multi-key delete and a multi-key txn arrive as events of one revision in one response.
pub async fn watch_multi_key_revision(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    let (mut stream, _) = watch(&mut c, "mk/", Some(WatchOptions::new().with_prefix())).await?;
    let t = c
        .txn(Txn::new().and_then([
            TxnOp::put("mk/1", "a", None),
            TxnOp::put("mk/2", "b", None),
            TxnOp::put("mk/3", "c", None),
        ]))
        .await?;
    let tr = header_revision(t.header())?;
    let resp = next_response(&mut stream).await?;
    ensure!(
        resp.events().len() == 3,
        "one revision, one response: {resp:?}"
    );
    ensure!(
        resp.events()
            .iter()
            .all(|e| e.kv().map(|kv| kv.mod_revision()) == Some(tr)),
        "{resp:?}"
    );
    let d = c
        .delete("mk/", Some(DeleteOptions::new().with_prefix()))
        .await?;
    let dr = header_revision(d.header())?;
    let resp = next_response(&mut stream).await?;
    ensure!(resp.events().len() == 3, "{resp:?}");
    let got: Vec<(EventType, Vec<u8>, i64)> = resp
        .events()
        .iter()
        .filter_map(|e| {
            e.kv()
                .map(|kv| (e.event_type(), kv.key().to_vec(), kv.mod_revision()))
        })
        .collect();
    ensure!(
        got == [
            (EventType::Delete, b"mk/1".to_vec(), dr),
            (EventType::Delete, b"mk/2".to_vec(), dr),
            (EventType::Delete, b"mk/3".to_vec(), dr),
        ],
        "{got:?}"
    );
    Ok(())
}

/// With `fragment`, a revision whose events exceed the request size limit arrives in several
/// responses flagged `fragment`, the last one not flagged.
pub async fn watch_fragment(target: Target) -> Result<()> {
    let server = Server::start(target).await?;
    let mut c = server.client().await?;
    // Three 1 MB prev_kvs: over etcd's fragment limit (max request bytes + 512 KiB).
    c.put("fr/1", vec![b'a'; 1_000_000], None).await?;
    c.put("fr/2", vec![b'b'; 1_000_000], None).await?;
    c.put("fr/3", vec![b'c'; 1_000_000], None).await?;
    let (mut stream, _) = watch(
        &mut c,
        "fr/",
        Some(
            WatchOptions::new()
                .with_prefix()
                .with_prev_key()
                .with_fragment(),
        ),
    )
    .await?;
    c.delete("fr/", Some(DeleteOptions::new().with_prefix()))
        .await?;
    let mut events = 0;
    let mut responses = Vec::new();
    while events < 3 {
        let resp = next_response(&mut stream).await?;
        events += resp.events().len();
        responses.push(resp.0.fragment);
        ensure!(responses.len() <= 4, "too many responses: {responses:?}");
    }
    ensure!(
        responses.len() >= 2 && responses.last() == Some(&false),
        "fragments: {responses:?}"
    );
    ensure!(
        responses[..responses.len() - 1].iter().all(|f| *f),
        "all but the last response are fragments: {responses:?}"
    );
    Ok(())
}
