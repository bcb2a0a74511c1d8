//! Watches in a differential run.
//!
//! Each server has three watch streams: stream 0 carries the all-keys log (watch #0: every key,
//! from the first write on, with prev_kv), streams 1 and 2 carry the random watches. Responses
//! are routed to the harness's watch index by watch id (created responses in request order).
//!
//! Operations run one at a time, so the events a watch must have received once the
//! store is at revision R are fixed: the oracle's all-keys log tells which revisions touch a
//! watch's range, and the harness waits for both servers' watches to reach the last of them
//! before comparing. Events are compared exactly (type, kv, prev_kv, order); the batching of
//! events into responses and the header revisions of event responses are not compared, but
//! on each server the harness checks that a revision is never split across responses
//! (fragment is off), that events come in revision order, that a response's header revision
//! is not below its events, and that header revisions never go backwards on a stream (a
//! response with header revision 0, as etcd sends when it cancels a watch whose start
//! revision is compacted, is exempt). On etcd (the oracle, a second etcd, the etcd behind
//! the proxy) only per watch: a watcher whose events do not fit the stream's buffer (its
//! reader is behind) becomes a "victim" that etcd sends its events later with their own,
//! older, header revision, after newer responses of other watchers of the stream.
//!
//! KNOWN, NAMED EXCEPTION (etcd-io/etcd#18089, fixed in etcd 3.5.15/3.4.34 and later; the
//! oracle here is 3.5.1): when compaction ran at revision C and C deleted keys, a watch
//! created with start revision exactly C misses those DELETE events, because compaction drops
//! the tombstones at C. Current etcd delivers them, and kine-rs must as well. In that case (and
//! only there) the oracle's events are completed with the DELETE events at C taken from the
//! all-keys log, and the target must deliver them. Their prev_kv is read at C-1, which is
//! compacted, so current etcd sends them without prev_kv; the harness accepts them with no
//! prev_kv or with the true one. When the target is a second etcd (harness validation) it
//! has the same bug and its events are completed the same way.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use kine_proto::etcdserverpb::watch_create_request::FilterType;
use kine_proto::etcdserverpb::watch_request::RequestUnion;
use kine_proto::etcdserverpb::{
    WatchCancelRequest, WatchCreateRequest, WatchRequest, WatchResponse,
};
use kine_proto::mvccpb::event::EventType;
use kine_proto::mvccpb::{Event, KeyValue};

use super::compare::header;
use super::server::{Clients, RawWatchStream};

/// How long to wait for a watch to deliver what it must.
pub(crate) const WATCH_WAIT: Duration = Duration::from_secs(5);

/// The number of watch streams per server (stream 0 is the all-keys log's).
pub(crate) const STREAMS: usize = 3;

/// What a watch delivered, as compared.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Item {
    Event(Event),
    /// A non-created response that cancels the watch or reports a compaction.
    Control {
        canceled: bool,
        compact_revision: i64,
        cancel_reason: String,
    },
}

/// A watch as the harness asked for it.
#[derive(Debug, Clone)]
pub(crate) struct WatchSpec {
    pub stream: usize,
    pub req: WatchCreateRequest,
    /// The op index that created it.
    pub op_index: usize,
    /// The store's revision when it was created.
    pub created_rev: i64,
    /// The compacted revision when it was created.
    pub compact_rev: i64,
    /// When it was created (only used to give servers time to catch it up).
    pub created_at: Instant,
    /// The oracle accepted it and it has not been canceled (by us or by the server).
    pub open: bool,
    /// The named exception applies (see the module comment).
    pub bug_case: bool,
}

impl WatchSpec {
    /// The first revision whose events it delivers.
    fn first_rev(&self) -> i64 {
        if self.req.start_revision > 0 {
            self.req.start_revision
        } else {
            self.created_rev + 1
        }
    }

    /// Whether the watch's range holds `key` (etcd: an empty key means `\0`; an empty range end
    /// means the key alone; a range end of `\0` means every key from the key on).
    fn covers(&self, key: &[u8]) -> bool {
        let start: &[u8] = if self.req.key.is_empty() {
            b"\x00"
        } else {
            &self.req.key
        };
        let end: &[u8] = &self.req.range_end;
        if end.is_empty() {
            key == start
        } else if end == b"\x00" {
            key >= start
        } else {
            key >= start && key < end
        }
    }

    fn passes_filters(&self, ev: &Event) -> bool {
        let filtered = if ev.r#type == EventType::Put as i32 {
            FilterType::Noput as i32
        } else {
            FilterType::Nodelete as i32
        };
        !self.req.filters.contains(&filtered)
    }

    fn wants(&self, ev: &Event) -> bool {
        ev.kv.as_ref().is_some_and(|kv| self.covers(&kv.key)) && self.passes_filters(ev)
    }

    /// Whether it started in the past: until a server has caught it up, a compaction above its
    /// start revision cancels it.
    pub fn starts_in_past(&self) -> bool {
        self.req.start_revision > 0 && self.req.start_revision <= self.created_rev
    }

    /// Whether it starts below the compacted revision (the server must cancel it).
    fn expects_compacted(&self) -> bool {
        self.req.start_revision > 0 && self.req.start_revision < self.compact_rev
    }

    pub fn describe(&self, idx: usize) -> String {
        format!(
            "watch #{idx} (stream {}, created by op #{} at revision {}, compacted revision then {}): {:?}",
            self.stream, self.op_index, self.created_rev, self.compact_rev, self.req
        )
    }
}

fn ev_rev(ev: &Event) -> i64 {
    ev.kv.as_ref().map_or(0, |kv| kv.mod_revision)
}

/// What one server's watch delivered.
#[derive(Debug, Default)]
pub(crate) struct SideWatch {
    /// The created response (header normalized).
    pub created: Option<WatchResponse>,
    pub items: Vec<Item>,
    pub last_event_rev: i64,
    pub canceled: bool,
}

struct StreamState {
    raw: RawWatchStream,
    pending_creates: VecDeque<usize>,
    ids: HashMap<i64, usize>,
    last_header_rev: i64,
    /// The last header revision of each watch id (etcd's guarantee, see the module comment).
    last_header_rev_of: HashMap<i64, i64>,
    closed: bool,
}

/// One server's watch streams and what they delivered.
pub(crate) struct SideWatches {
    pub name: &'static str,
    /// The target's revisions as the oracle's (the etcd proxy): applied to every response
    /// as it arrives, before the checks.
    revisions: Option<std::sync::Arc<std::sync::Mutex<super::revmap::RevisionMap>>>,
    streams: Vec<StreamState>,
    pub watches: Vec<SideWatch>,
    /// Broken invariants, in arrival order.
    pub violations: Vec<String>,
    /// The server is etcd: header revisions are checked per watch, not per stream.
    headers_per_watch: bool,
    /// Watches created with a future start revision on a target whose revisions are mapped:
    /// harness index -> (the target start revision sent, the oracle's start revision).
    future_starts: HashMap<usize, (i64, i64)>,
}

impl SideWatches {
    pub fn new(
        clients: &Clients,
        name: &'static str,
        revisions: Option<std::sync::Arc<std::sync::Mutex<super::revmap::RevisionMap>>>,
        headers_per_watch: bool,
    ) -> SideWatches {
        SideWatches {
            name,
            revisions,
            streams: (0..STREAMS)
                .map(|_| StreamState {
                    raw: clients.open_watch_stream(),
                    pending_creates: VecDeque::new(),
                    ids: HashMap::new(),
                    last_header_rev: 0,
                    last_header_rev_of: HashMap::new(),
                    closed: false,
                })
                .collect(),
            watches: Vec::new(),
            violations: Vec::new(),
            headers_per_watch,
            future_starts: HashMap::new(),
        }
    }

    /// Watch `idx` was sent with start revision `sent` (the target's), standing for the
    /// oracle's future revision `oracle_start`.
    ///
    /// A future revision cannot be mapped exactly: the writes up to it have not happened, and
    /// kine-rs's own records (a lease grant's ownership record, a compaction's) will take
    /// target revisions between them. The harness sends as far past the target's current
    /// revision as the oracle's start is past the oracle's, which is never beyond the target
    /// revision the oracle's start will turn out to stand for (the target takes at least
    /// one revision per oracle revision), so the target may also deliver the tenant's
    /// writes between the two: events at or after `sent` whose oracle revision is below
    /// `oracle_start` are what the request sent asked for, and are left out of the
    /// comparison. An event below `sent` is still a difference.
    pub fn expect_future_start(&mut self, idx: usize, sent: i64, oracle_start: i64) {
        self.future_starts.insert(idx, (sent, oracle_start));
    }

    pub fn send_create(&mut self, stream: usize, idx: usize, req: WatchCreateRequest) {
        while self.watches.len() <= idx {
            self.watches.push(SideWatch::default());
        }
        let st = &mut self.streams[stream];
        st.pending_creates.push_back(idx);
        let msg = WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(req)),
        };
        if st.raw.tx.send(msg).is_err() {
            self.violations.push(format!(
                "{}: watch stream {stream} is gone (create not sent)",
                self.name
            ));
        }
    }

    pub fn send_cancel(&mut self, stream: usize, watch_id: i64) {
        let msg = WatchRequest {
            request_union: Some(RequestUnion::CancelRequest(WatchCancelRequest { watch_id })),
        };
        if self.streams[stream].raw.tx.send(msg).is_err() {
            self.violations.push(format!(
                "{}: watch stream {stream} is gone (cancel not sent)",
                self.name
            ));
        }
    }

    /// The id the server gave watch `idx`.
    pub fn watch_id(&self, idx: usize) -> Option<i64> {
        self.watches
            .get(idx)
            .and_then(|w| w.created.as_ref())
            .filter(|c| !c.canceled)
            .map(|c| c.watch_id)
    }

    /// Routes everything that arrived so far.
    pub fn pump(&mut self) {
        for s in 0..self.streams.len() {
            loop {
                let next = self.streams[s].raw.rx.try_recv();
                match next {
                    Ok(Ok(resp)) => self.route(s, resp),
                    Ok(Err(status)) => {
                        if !self.streams[s].closed {
                            self.streams[s].closed = true;
                            self.violations.push(format!(
                                "{}: watch stream {s} failed: code {:?}, message {:?}",
                                self.name,
                                status.code(),
                                status.message()
                            ));
                        }
                    }
                    Err(_) => break,
                }
            }
        }
    }

    fn route(&mut self, s: usize, mut resp: WatchResponse) {
        // The events' revisions as the target sent them (for `future_starts`).
        let sent_revs: Vec<i64> = resp.events.iter().map(ev_rev).collect();
        if let Some(revisions) = &self.revisions {
            revisions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .watch_response(&mut resp);
        }
        let name = self.name;
        let st = &mut self.streams[s];
        let hrev = resp.header.as_ref().map_or(0, |h| h.revision);
        // etcd sends the "start revision compacted" cancel with no header revision (0):
        // such a response neither counts as going backwards nor moves the stream's mark.
        let last = if self.headers_per_watch {
            // A created response names the id etcd gives the watch (or -1).
            st.last_header_rev_of.entry(resp.watch_id).or_insert(0)
        } else {
            &mut st.last_header_rev
        };
        if hrev != 0 && hrev < *last {
            self.violations.push(format!(
                "{name}: stream {s}: header revision went backwards: {hrev} after {} in {resp:?}",
                *last
            ));
        }
        *last = (*last).max(hrev);
        if resp.fragment {
            self.violations.push(format!(
                "{name}: stream {s}: fragmented response without fragment=true: {resp:?}"
            ));
        }
        header(&mut resp.header);
        if resp.created {
            let Some(idx) = st.pending_creates.pop_front() else {
                self.violations.push(format!(
                    "{name}: stream {s}: created response nobody asked for: {resp:?}"
                ));
                return;
            };
            if resp.canceled {
                self.watches[idx].canceled = true;
            } else {
                st.ids.insert(resp.watch_id, idx);
            }
            if !resp.events.is_empty() {
                self.violations.push(format!(
                    "{name}: stream {s}: events in a created response: {resp:?}"
                ));
            }
            self.watches[idx].created = Some(resp);
            return;
        }
        let Some(&idx) = st.ids.get(&resp.watch_id) else {
            self.violations.push(format!(
                "{name}: stream {s}: response for watch id {} that is not open: {resp:?}",
                resp.watch_id
            ));
            return;
        };
        if let Some(&(sent, oracle_start)) = self.future_starts.get(&idx) {
            let mut sent_revs = sent_revs.iter();
            resp.events.retain(|ev| {
                let target_rev = sent_revs.next().copied().unwrap_or(0);
                !(target_rev >= sent && ev_rev(ev) < oracle_start)
            });
        }
        let w = &mut self.watches[idx];
        if let Some(first) = resp.events.first()
            && ev_rev(first) == w.last_event_rev
        {
            self.violations.push(format!(
                "{name}: stream {s}: revision {} split across responses of watch id {}",
                w.last_event_rev, resp.watch_id
            ));
        }
        for ev in &resp.events {
            let rev = ev_rev(ev);
            if rev < w.last_event_rev {
                self.violations.push(format!(
                    "{name}: stream {s}: event of revision {rev} after revision {} on watch id {}",
                    w.last_event_rev, resp.watch_id
                ));
            }
            if rev > hrev {
                self.violations.push(format!(
                    "{name}: stream {s}: event of revision {rev} in a response with header revision {hrev}"
                ));
            }
            w.last_event_rev = w.last_event_rev.max(rev);
            w.items.push(Item::Event(ev.clone()));
        }
        if resp.canceled || resp.compact_revision != 0 || !resp.cancel_reason.is_empty() {
            w.items.push(Item::Control {
                canceled: resp.canceled,
                compact_revision: resp.compact_revision,
                cancel_reason: resp.cancel_reason.clone(),
            });
        }
        if std::env::var_os("DIFF_TRACE").is_some() && (resp.canceled || resp.compact_revision != 0)
        {
            eprintln!(
                "  {name}: stream {s}: watch #{idx} (id {}) canceled={} compact={} reason={:?}",
                resp.watch_id, resp.canceled, resp.compact_revision, resp.cancel_reason
            );
        }
        if resp.canceled {
            w.canceled = true;
            st.ids.remove(&resp.watch_id);
        }
    }

    /// Pumps until `done` holds or the deadline passes; returns whether it held.
    pub async fn wait_until(
        &mut self,
        deadline: Instant,
        done: impl Fn(&SideWatches) -> bool,
    ) -> bool {
        loop {
            self.pump();
            if done(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// The oracle's all-keys log, indexed by revision.
#[derive(Default)]
pub(crate) struct GlobalLog {
    pub by_rev: BTreeMap<i64, Vec<Event>>,
    consumed: usize,
}

impl GlobalLog {
    /// Takes in what the oracle's watch #0 delivered since the last call.
    pub fn absorb(&mut self, log: &SideWatch) {
        for item in &log.items[self.consumed..] {
            if let Item::Event(ev) = item {
                self.by_rev.entry(ev_rev(ev)).or_default().push(ev.clone());
            }
        }
        self.consumed = log.items.len();
    }

    /// Events at revision `rev` that the named exception makes etcd < 3.5.15 drop for `spec`.
    fn dropped_by_bug(&self, spec: &WatchSpec) -> Vec<Event> {
        if !spec.bug_case {
            return Vec::new();
        }
        self.by_rev
            .get(&spec.req.start_revision)
            .map(|evs| {
                evs.iter()
                    .filter(|ev| ev.r#type == EventType::Delete as i32 && spec.wants(ev))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The last revision whose events `spec` must deliver, leaving out the events the
    /// named exception drops unless `with_bug_events`.
    pub fn last_expected_rev(&self, spec: &WatchSpec, with_bug_events: bool) -> Option<i64> {
        let first = spec.first_rev();
        self.by_rev
            .range(first..)
            .rev()
            .find(|(rev, evs)| {
                evs.iter().any(|ev| {
                    spec.wants(ev)
                        && (with_bug_events
                            || !(spec.bug_case
                                && **rev == spec.req.start_revision
                                && ev.r#type == EventType::Delete as i32))
                })
            })
            .map(|(rev, _)| *rev)
    }

    /// Whether the named exception drops some event of `spec`.
    pub fn bug_drops_events(&self, spec: &WatchSpec) -> bool {
        !self.dropped_by_bug(spec).is_empty()
    }
}

/// An item to compare against; `tolerant_prev` marks an event added by the named exception:
/// the other side may send it with no prev_kv or with this prev_kv.
#[derive(Debug, Clone)]
pub(crate) struct Expected {
    pub item: Item,
    pub tolerant_prev: Option<Option<KeyValue>>,
}

/// Completes a buggy etcd's items with the DELETE events the named exception dropped.
pub(crate) fn complete_bug_events(
    spec: &WatchSpec,
    items: &[Item],
    log: &GlobalLog,
) -> Vec<Expected> {
    let plain = |item: &Item| Expected {
        item: item.clone(),
        tolerant_prev: None,
    };
    let dropped = log.dropped_by_bug(spec);
    if dropped.is_empty() {
        return items.iter().map(plain).collect();
    }
    let c = spec.req.start_revision;
    let group_len = items
        .iter()
        .take_while(|i| matches!(i, Item::Event(ev) if ev_rev(ev) == c))
        .count();
    let group = &items[..group_len];
    let expected_group: Vec<&Event> = log
        .by_rev
        .get(&c)
        .map(|evs| evs.iter().filter(|ev| spec.wants(ev)).collect())
        .unwrap_or_default();
    let same_event = |a: &Event, b: &Event| {
        a.r#type == b.r#type && a.kv.as_ref().map(|k| &k.key) == b.kv.as_ref().map(|k| &k.key)
    };
    let mut out = Vec::new();
    let mut used = vec![false; group.len()];
    for want in expected_group {
        let found = group
            .iter()
            .enumerate()
            .find(|(i, item)| !used[*i] && matches!(item, Item::Event(ev) if same_event(ev, want)));
        match found {
            Some((i, item)) => {
                used[i] = true;
                out.push(plain(item));
            }
            None if want.r#type == EventType::Delete as i32 => {
                let mut ev = want.clone();
                let true_prev = if spec.req.prev_kv {
                    ev.prev_kv.take()
                } else {
                    None
                };
                ev.prev_kv = None;
                out.push(Expected {
                    item: Item::Event(ev),
                    tolerant_prev: Some(true_prev),
                });
            }
            None => {}
        }
    }
    for (i, item) in group.iter().enumerate() {
        if !used[i] {
            out.push(plain(item));
        }
    }
    out.extend(items[group_len..].iter().map(plain));
    out
}

fn matches_expected(want: &Expected, got: &Item) -> bool {
    if want.item == *got {
        return true;
    }
    match (&want.tolerant_prev, &want.item, got) {
        (Some(prev), Item::Event(w), Item::Event(g)) => {
            w.r#type == g.r#type && w.kv == g.kv && (g.prev_kv.is_none() || g.prev_kv == *prev)
        }
        _ => false,
    }
}

/// Compares item lists; on a difference, describes it with some context.
pub(crate) fn compare_items(oracle: &[Expected], target: &[Item]) -> Option<String> {
    let n = oracle.len().max(target.len());
    let first_diff = (0..n).find(|&i| match (oracle.get(i), target.get(i)) {
        (Some(o), Some(t)) => !matches_expected(o, t),
        _ => true,
    })?;
    let from = first_diff.saturating_sub(2);
    let to = (first_diff + 4).min(n);
    let mut s = format!(
        "the watch's deliveries differ at item {first_diff} (etcd delivered {} items, the target {}); items {from}..{to}:\n",
        oracle.len(),
        target.len()
    );
    for i in from..to {
        let mark = if i == first_diff { ">>" } else { "  " };
        match oracle.get(i) {
            Some(o) if o.tolerant_prev.is_some() => s.push_str(&format!(
                "{mark} [{i}] etcd:   {:?}   (added by the named exception etcd-io/etcd#18089; prev_kv may be absent or {:?})\n",
                o.item,
                o.tolerant_prev.as_ref().and_then(|p| p.as_ref())
            )),
            Some(o) => s.push_str(&format!("{mark} [{i}] etcd:   {:?}\n", o.item)),
            None => s.push_str(&format!("{mark} [{i}] etcd:   <nothing>\n")),
        }
        match target.get(i) {
            Some(t) => s.push_str(&format!("{mark} [{i}] target: {t:?}\n")),
            None => s.push_str(&format!("{mark} [{i}] target: <nothing>\n")),
        }
    }
    Some(s)
}

/// The condition a side's watch must reach before comparing.
pub(crate) fn delivered_enough(
    spec: &WatchSpec,
    w: &SideWatch,
    last_expected: Option<i64>,
) -> bool {
    if w.canceled || !spec.open && w.created.is_some() {
        return true;
    }
    if w.created.is_none() {
        return false;
    }
    if spec.expects_compacted() {
        return w.canceled;
    }
    match last_expected {
        Some(rev) => w.last_event_rev >= rev,
        None => true,
    }
}
