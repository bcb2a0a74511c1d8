//! The change feed: one per process per datastore, for every keyspace this process watches.
//!
//! Watch hubs subscribe here while they run (someone watches their keyspace); a hub with no
//! watchers is not subscribed and costs nothing. The feed learns of commits of other
//! processes from the datastore's announcements (PostgreSQL's LISTEN/NOTIFY, NATS's followers)
//! and from one poll per process, whatever the number of watched keyspaces: one statement
//! reading the revisions of all of them ([`Backend::revisions`]) at the backend's
//! [`PollCadence`] (MySQL's only source, often while it brings other processes' commits and
//! seldom once it stops; elsewhere a safety net, once a second).
//! It wakes only the hubs whose keyspace moved past what they already published, so a
//! commit this process made (its hub is woken by the writer, without a round trip) and
//! announced back by the database wakes nobody a second time.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tracing::warn;

use super::{Backend, KeyspaceId};
use crate::model::Revision;

/// How often the feed polls when the backend names no interval: the safety net for
/// announcements that never came (a write by another tool, a listener that was down).
pub const SAFETY_POLL: Duration = Duration::from_secs(1);

/// How long the feed keeps polling at [`PollCadence::busy`] after a hub last found news in
/// what it announced.
pub const BUSY_HOLD: Duration = Duration::from_secs(1);

/// How often the feed polls a datastore that announces nothing: every `busy` while it brings
/// news (commits of other processes, which a hub then reads), so that a watch sees them
/// within a few milliseconds, and every `quiet` once it brought none for [`BUSY_HOLD`]. A
/// process whose watched keyspaces rest, or that is their only writer (its hubs get its own
/// commits from its writer), costs the database a statement every `quiet`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollCadence {
    pub busy: Duration,
    pub quiet: Duration,
}

impl PollCadence {
    /// The same interval whether commits come or not.
    pub const fn every(interval: Duration) -> Self {
        PollCadence {
            busy: interval,
            quiet: interval,
        }
    }

    /// The wait before the next poll, `since_news` after a hub last found news.
    pub fn next_wait(&self, since_news: Duration) -> Duration {
        if since_news < BUSY_HOLD {
            self.busy
        } else {
            self.quiet
        }
    }
}

/// One process's feed of commits in one datastore.
#[derive(Default)]
pub struct CommitFeed {
    watched: Mutex<Watched>,
}

#[derive(Default)]
struct Watched {
    hubs: HashMap<KeyspaceId, Vec<Arc<Waker>>>,
    /// Whether the poll task runs (it ends when nothing is watched).
    polling: bool,
    /// When a hub last read commits it learned of here ([`Subscription::found_news`]).
    news: Option<Instant>,
}

/// What wakes one subscribed hub.
#[derive(Default)]
struct Waker {
    notify: Notify,
    /// The revision the hub has published: announcements up to it are not news.
    published: AtomicI64,
    /// The highest revision announced.
    announced: AtomicI64,
    /// An announcement without a revision came (NATS, an old commit function, a listener
    /// that reconnected): the hub must look.
    unknown: AtomicBool,
    /// The poll found the keyspace no longer there (deleted, by this process or another).
    missing: AtomicBool,
}

/// A hub's subscription; dropping it unsubscribes.
pub struct Subscription {
    feed: Arc<CommitFeed>,
    keyspace: KeyspaceId,
    waker: Arc<Waker>,
}

impl CommitFeed {
    pub fn new() -> Arc<Self> {
        Arc::new(CommitFeed::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Watched> {
        self.watched.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Subscribes the hub of `keyspace`, which has published `published`; starts the poll
    /// of `backend` when it is the first subscription.
    pub fn subscribe(
        self: &Arc<Self>,
        keyspace: KeyspaceId,
        published: Revision,
        backend: &Arc<dyn Backend>,
    ) -> Subscription {
        let waker = Arc::new(Waker::default());
        waker.published.store(published, Ordering::Release);
        let mut watched = self.lock();
        watched
            .hubs
            .entry(keyspace)
            .or_default()
            .push(waker.clone());
        if !watched.polling {
            watched.polling = true;
            let cadence = backend
                .poll_cadence()
                .unwrap_or(PollCadence::every(SAFETY_POLL));
            tokio::spawn(poll(Arc::downgrade(self), Arc::downgrade(backend), cadence));
        }
        Subscription {
            feed: self.clone(),
            keyspace,
            waker,
        }
    }

    /// A commit of `keyspace` at `revision` (`None`: at some revision not given). Wakes the
    /// keyspace's hubs that have not published it; nobody when nobody watches it.
    pub fn announce(&self, keyspace: KeyspaceId, revision: Option<Revision>) {
        let watched = self.lock();
        let Some(wakers) = watched.hubs.get(&keyspace) else {
            return;
        };
        for waker in wakers {
            match revision {
                Some(revision) => {
                    if revision <= waker.published.load(Ordering::Acquire) {
                        continue;
                    }
                    waker.announced.fetch_max(revision, Ordering::AcqRel);
                }
                None => waker.unknown.store(true, Ordering::Release),
            }
            waker.notify.notify_one();
        }
    }

    /// `keyspace` was missing from a poll: wakes its hubs to find out whether it was deleted.
    fn missing(&self, keyspace: KeyspaceId) {
        let watched = self.lock();
        for waker in watched.hubs.get(&keyspace).into_iter().flatten() {
            waker.missing.store(true, Ordering::Release);
            waker.notify.notify_one();
        }
    }

    /// Any keyspace may have changed (announcements may have been lost): wakes every hub.
    pub fn announce_all(&self) {
        let watched = self.lock();
        for waker in watched.hubs.values().flatten() {
            waker.unknown.store(true, Ordering::Release);
            waker.notify.notify_one();
        }
    }

    /// The keyspaces watched in this process.
    pub fn watched(&self) -> Vec<KeyspaceId> {
        self.lock().hubs.keys().copied().collect()
    }

    /// How long since a hub last found news here (`Duration::MAX`: never).
    fn since_news(&self) -> Duration {
        self.lock()
            .news
            .map_or(Duration::MAX, |news| news.elapsed())
    }

    /// The watched keyspaces, or `None` (and the poll counts as stopped) when there are none.
    fn poll_targets(&self) -> Option<Vec<KeyspaceId>> {
        let mut watched = self.lock();
        if watched.hubs.is_empty() {
            watched.polling = false;
            return None;
        }
        Some(watched.hubs.keys().copied().collect())
    }
}

impl Subscription {
    /// Waits for an announcement that may concern the hub.
    pub async fn changed(&self) {
        self.waker.notify.notified().await;
    }

    /// Whether an announcement without a revision came since the last call.
    pub fn take_unknown(&self) -> bool {
        self.waker.unknown.swap(false, Ordering::AcqRel)
    }

    /// Whether a poll since the last call found the keyspace missing.
    pub fn take_missing(&self) -> bool {
        self.waker.missing.swap(false, Ordering::AcqRel)
    }

    /// The highest revision announced.
    pub fn announced(&self) -> Revision {
        self.waker.announced.load(Ordering::Acquire)
    }

    /// The hub published up to `revision`.
    pub fn published(&self, revision: Revision) {
        self.waker.published.fetch_max(revision, Ordering::AcqRel);
    }

    /// An announcement brought the hub commits it had to read (another process's): the poll
    /// keeps its busy interval for [`BUSY_HOLD`].
    pub fn found_news(&self) {
        self.feed.lock().news = Some(Instant::now());
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut watched = self.feed.lock();
        if let Some(wakers) = watched.hubs.get_mut(&self.keyspace) {
            wakers.retain(|waker| !Arc::ptr_eq(waker, &self.waker));
            if wakers.is_empty() {
                watched.hubs.remove(&self.keyspace);
            }
        }
    }
}

/// Reads the revisions of every watched keyspace at `cadence`, in one statement per
/// [`POLL_CHUNK`] keyspaces, and announces them; ends when nothing is watched any more (the
/// next subscription starts it again) or the feed or backend is gone.
async fn poll(feed: Weak<CommitFeed>, backend: Weak<dyn Backend>, cadence: PollCadence) {
    let mut failing = false;
    loop {
        let Some(wait) = feed
            .upgrade()
            .map(|feed| cadence.next_wait(feed.since_news()))
        else {
            return;
        };
        tokio::time::sleep(wait).await;
        let Some(feed) = feed.upgrade() else { return };
        let Some(ids) = feed.poll_targets() else {
            return;
        };
        let Some(backend) = backend.upgrade() else {
            return;
        };
        match backend.revisions(&ids).await {
            Ok(revisions) => {
                failing = false;
                // Deleted keyspaces are left out of the answer: a tenant deleted through
                // another process ends the watches this one holds on it.
                if revisions.len() < ids.len() {
                    let found: HashSet<KeyspaceId> = revisions.iter().map(|(id, _)| *id).collect();
                    for id in ids.iter().filter(|id| !found.contains(id)) {
                        feed.missing(*id);
                    }
                }
                for (id, revision) in revisions {
                    feed.announce(id, Some(revision));
                }
            }
            Err(error) => {
                // Once per outage, not every interval.
                if !failing {
                    warn!(%error, "the change feed cannot read the keyspaces' revisions");
                }
                failing = true;
            }
        }
    }
}

/// Most keyspaces one poll statement reads.
pub const POLL_CHUNK: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_poll_waits_its_busy_interval_for_a_second_after_news_then_its_quiet_one() {
        let cadence = PollCadence {
            busy: Duration::from_millis(5),
            quiet: Duration::from_millis(30),
        };
        assert_eq!(cadence.next_wait(Duration::ZERO), cadence.busy);
        assert_eq!(
            cadence.next_wait(BUSY_HOLD - Duration::from_millis(1)),
            cadence.busy
        );
        assert_eq!(cadence.next_wait(BUSY_HOLD), cadence.quiet);
        assert_eq!(cadence.next_wait(Duration::MAX), cadence.quiet);
        let safety = PollCadence::every(SAFETY_POLL);
        assert_eq!(safety.next_wait(Duration::ZERO), SAFETY_POLL);
        assert_eq!(safety.next_wait(BUSY_HOLD), SAFETY_POLL);
    }
}
