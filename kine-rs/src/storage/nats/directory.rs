//! The keyspace directory and the lease deadlines, two JetStream key-value buckets.
//!
//! * `<bucket>-keyspaces`: one entry per keyspace, keyed `t<hex of the tenant name>` (names
//!   never appear raw in NATS), holding the name. A keyspace's id is the bucket revision of the
//!   entry's creation: unique, never reused, allocated atomically by the server. Two processes
//!   that race to create the same tenant both call `create`; the loser gets "already exists"
//!   and reads the winner's entry.
//! * `<bucket>-leases`: the latest keep-alive deadline of a lease, keyed
//!   `k<keyspace>.l<hex lease id>` (see [`super`] on leases), or `expired` once an expiry
//!   claimed the lease. Keep-alives and expiries change an entry only by compare-and-set on
//!   its revision, so a keep-alive and an expiry racing in two processes cannot both win: a
//!   lease renewed in time is never revoked, and a keep-alive that lost gets "not found".

use async_nats::jetstream;
use async_nats::jetstream::kv::{CreateErrorKind, Operation, Store, UpdateErrorKind};
use async_nats::jetstream::stream::{self, DiscardPolicy, StorageType};
use bytes::Bytes;
use futures::StreamExt;

use super::errors::unavailable;
use crate::error::Result;
use crate::storage::KeyspaceId;

pub struct Directory {
    keyspaces: Store,
    leases: Store,
}

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

fn name_key(name: &str) -> String {
    format!("t{}", hex(name.as_bytes()))
}

/// What the leases bucket holds for a lease whose expiry was claimed.
const EXPIRED: &[u8] = b"expired";

/// Compare-and-set attempts before giving up on an entry that keeps changing.
const CAS_ATTEMPTS: usize = 16;

/// A stored deadline; `None` for the expiry marker.
fn parse_deadline(value: &[u8]) -> Option<i64> {
    std::str::from_utf8(value).ok()?.parse().ok()
}

fn lease_key(keyspace: KeyspaceId, lease: i64) -> String {
    format!("k{keyspace}.l{:016x}", lease as u64)
}

/// Opens (creating when missing) a key-value bucket. Its stream is created here as
/// async-nats' `create_key_value` would (its account check cannot read NATS 2.9's answer).
async fn bucket(js: &jetstream::Context, name: String, replicas: usize) -> Result<Store> {
    if let Ok(store) = js.get_key_value(name.clone()).await {
        return Ok(store);
    }
    let config = stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        storage: StorageType::File,
        num_replicas: replicas,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: DiscardPolicy::New,
        ..Default::default()
    };
    // Another process may create it meanwhile: the same configuration is accepted again.
    js.get_or_create_stream(config)
        .await
        .map_err(|e| unavailable("creating a NATS key-value bucket", e))?;
    js.get_key_value(name)
        .await
        .map_err(|e| unavailable("opening a NATS key-value bucket", e))
}

impl Directory {
    pub async fn open(js: &jetstream::Context, prefix: &str, replicas: usize) -> Result<Directory> {
        Ok(Directory {
            keyspaces: bucket(js, format!("{prefix}-keyspaces"), replicas).await?,
            leases: bucket(js, format!("{prefix}-leases"), replicas).await?,
        })
    }

    /// The id of keyspace `name`, if it exists.
    pub async fn find(&self, name: &str) -> Result<Option<KeyspaceId>> {
        let entry = self
            .keyspaces
            .entry(name_key(name))
            .await
            .map_err(|e| unavailable("reading the keyspace directory", e))?;
        Ok(entry
            .filter(|entry| entry.operation == Operation::Put)
            .map(|entry| entry.revision as KeyspaceId))
    }

    /// Creates keyspace `name` unless it exists; its id either way.
    pub async fn create(&self, name: &str) -> Result<KeyspaceId> {
        match self
            .keyspaces
            .create(name_key(name), Bytes::copy_from_slice(name.as_bytes()))
            .await
        {
            Ok(revision) => Ok(revision as KeyspaceId),
            Err(error) => match self.find(name).await? {
                Some(id) => Ok(id),
                None => Err(unavailable("creating a keyspace", error)),
            },
        }
    }

    /// Removes keyspace `name` from the directory.
    pub async fn remove(&self, name: &str) -> Result<()> {
        self.keyspaces
            .purge(name_key(name))
            .await
            .map_err(|e| unavailable("removing a keyspace from the directory", e))
    }

    /// Every keyspace, by name.
    pub async fn list(&self) -> Result<Vec<(String, KeyspaceId)>> {
        let mut keys = self
            .keyspaces
            .keys()
            .await
            .map_err(|e| unavailable("listing keyspaces", e))?;
        let mut names = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| unavailable("listing keyspaces", e))?;
            let Some(name) = key
                .strip_prefix('t')
                .and_then(unhex)
                .and_then(|name| String::from_utf8(name).ok())
            else {
                continue;
            };
            names.push(name);
        }
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            if let Some(id) = self.find(&name).await? {
                out.push((name, id));
            }
        }
        out.sort();
        Ok(out)
    }

    /// The latest keep-alive deadline stored for a lease.
    pub async fn lease_deadline(&self, keyspace: KeyspaceId, lease: i64) -> Result<Option<i64>> {
        let value = self
            .leases
            .get(lease_key(keyspace, lease))
            .await
            .map_err(|e| unavailable("reading a lease deadline", e))?;
        Ok(value.and_then(|v| parse_deadline(&v)))
    }

    /// Stores a lease's keep-alive deadline, unless an expiry claimed the lease first
    /// (`false`: the lease is gone). `granted_until` is the deadline of the lease's own
    /// record: a claim while that record is still running was left by an earlier lease of
    /// the same id (granted again since) and is overwritten.
    pub async fn renew(
        &self,
        keyspace: KeyspaceId,
        lease: i64,
        deadline: i64,
        granted_until: i64,
        now: i64,
    ) -> Result<bool> {
        let key = lease_key(keyspace, lease);
        let value = Bytes::from(deadline.to_string());
        for _ in 0..CAS_ATTEMPTS {
            let entry = self.live_entry(&key).await?;
            let stored = match entry {
                None => self.leases.create(&key, value.clone()).await.map_err(|e| {
                    (e.kind() == CreateErrorKind::AlreadyExists)
                        .then_some(())
                        .ok_or_else(|| unavailable("storing a lease deadline", e))
                }),
                Some((revision, current)) => {
                    if current.as_ref() == EXPIRED && granted_until <= now {
                        return Ok(false);
                    }
                    self.leases
                        .update(&key, value.clone(), revision)
                        .await
                        .map_err(|e| {
                            (e.kind() == UpdateErrorKind::WrongLastRevision)
                                .then_some(())
                                .ok_or_else(|| unavailable("storing a lease deadline", e))
                        })
                }
            };
            match stored {
                Ok(_) => return Ok(true),
                // Someone else changed the entry: look again.
                Err(Ok(())) => continue,
                Err(Err(error)) => return Err(error),
            }
        }
        Err(unavailable(
            "storing a lease deadline",
            "the entry kept changing under concurrent keep-alives",
        ))
    }

    /// Claims the expiry of a lease whose stored deadline (if any) is not after `now`: from
    /// then on no keep-alive of any process renews it. `false` when a keep-alive stored a
    /// later deadline first (the lease lives on).
    pub async fn claim_expiry(&self, keyspace: KeyspaceId, lease: i64, now: i64) -> Result<bool> {
        let key = lease_key(keyspace, lease);
        let marker = Bytes::from_static(EXPIRED);
        for _ in 0..CAS_ATTEMPTS {
            let claimed = match self.live_entry(&key).await? {
                None => self.leases.create(&key, marker.clone()).await.map_err(|e| {
                    (e.kind() == CreateErrorKind::AlreadyExists)
                        .then_some(())
                        .ok_or_else(|| unavailable("claiming a lease's expiry", e))
                }),
                Some((_, current)) if current.as_ref() == EXPIRED => return Ok(true),
                Some((revision, current)) => {
                    if parse_deadline(&current).is_some_and(|deadline| deadline > now) {
                        return Ok(false);
                    }
                    self.leases
                        .update(&key, marker.clone(), revision)
                        .await
                        .map_err(|e| {
                            (e.kind() == UpdateErrorKind::WrongLastRevision)
                                .then_some(())
                                .ok_or_else(|| unavailable("claiming a lease's expiry", e))
                        })
                }
            };
            match claimed {
                Ok(_) => return Ok(true),
                Err(Ok(())) => continue,
                Err(Err(error)) => return Err(error),
            }
        }
        Err(unavailable(
            "claiming a lease's expiry",
            "the entry kept changing under concurrent keep-alives",
        ))
    }

    /// The entry's revision and value, unless it is absent, deleted or purged.
    async fn live_entry(&self, key: &str) -> Result<Option<(u64, Bytes)>> {
        let entry = self
            .leases
            .entry(key)
            .await
            .map_err(|e| unavailable("reading a lease deadline", e))?;
        Ok(entry
            .filter(|e| e.operation == Operation::Put)
            .map(|e| (e.revision, e.value)))
    }

    /// Forgets a lease's keep-alive deadline, when it is revoked or granted anew (best
    /// effort).
    pub async fn forget(&self, keyspace: KeyspaceId, lease: i64) {
        let _ = self.leases.purge(lease_key(keyspace, lease)).await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A panic is how a test reports.
mod tests {
    use super::*;

    /// A real NATS (`KINE_TEST_NATS_URL`, else 127.0.0.1:4222, as the test command starts
    /// it); a bucket prefix of the test's own, removed afterwards.
    async fn directory() -> (jetstream::Context, String, Directory) {
        let url = std::env::var("KINE_TEST_NATS_URL")
            .unwrap_or_else(|_| "nats://127.0.0.1:4222".to_string());
        let server = url.split('?').next().unwrap().trim_start_matches("nats://");
        let client = async_nats::connect(server)
            .await
            .expect("a NATS with JetStream at KINE_TEST_NATS_URL (scripts/test.sh starts one)");
        let js = jetstream::new(client);
        let prefix = format!("kt{:016x}", rand_id());
        let directory = Directory::open(&js, &prefix, 1).await.unwrap();
        (js, prefix, directory)
    }

    fn rand_id() -> u64 {
        use std::hash::{BuildHasher, Hasher};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        // RandomState is seeded randomly per process; the time tells runs apart too.
        hasher.write_u128(std::time::UNIX_EPOCH.elapsed().map_or(0, |d| d.as_nanos()));
        hasher.finish()
    }

    async fn remove(js: &jetstream::Context, prefix: &str) {
        for suffix in ["keyspaces", "leases"] {
            let _ = js.delete_stream(format!("KV_{prefix}-{suffix}")).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_keep_alive_and_an_expiry_never_both_win() {
        let (js, prefix, directory) = directory().await;
        let now = 1_000_000;
        // A renewed deadline keeps the lease; once past, the expiry claims it and later
        // keep-alives of the same lease are refused.
        assert!(
            directory
                .renew(1, 7, now + 5_000, now - 1, now)
                .await
                .unwrap()
        );
        assert!(!directory.claim_expiry(1, 7, now).await.unwrap());
        assert!(directory.claim_expiry(1, 7, now + 6_000).await.unwrap());
        assert!(directory.claim_expiry(1, 7, now + 6_000).await.unwrap());
        assert!(
            !directory
                .renew(1, 7, now + 9_000, now - 1, now + 6_000)
                .await
                .unwrap()
        );
        assert_eq!(directory.lease_deadline(1, 7).await.unwrap(), None);
        // The id granted again (its record runs until later): the old claim is stale.
        assert!(
            directory
                .renew(1, 7, now + 9_000, now + 8_000, now + 6_000)
                .await
                .unwrap()
        );
        assert_eq!(
            directory.lease_deadline(1, 7).await.unwrap(),
            Some(now + 9_000)
        );
        // Never renewed: the expiry claims it outright.
        assert!(directory.claim_expiry(1, 8, now).await.unwrap());
        assert!(
            !directory
                .renew(1, 8, now + 5_000, now - 1, now)
                .await
                .unwrap()
        );

        // Races: a keep-alive and an expiry of the same just-expired lease, side by side,
        // as two processes would run them. Exactly one wins each time.
        let directory = std::sync::Arc::new(directory);
        let mut races = Vec::new();
        for lease in 100..164 {
            assert!(
                directory
                    .renew(2, lease, now, now - 1, now - 1)
                    .await
                    .unwrap()
            );
            let (a, b) = (directory.clone(), directory.clone());
            races.push(tokio::spawn(async move {
                let expiry = tokio::spawn(async move { a.claim_expiry(2, lease, now).await });
                let renewal =
                    tokio::spawn(
                        async move { b.renew(2, lease, now + 60_000, now - 1, now).await },
                    );
                (
                    lease,
                    expiry.await.unwrap().unwrap(),
                    renewal.await.unwrap().unwrap(),
                )
            }));
        }
        for race in races {
            let (lease, expired, renewed) = race.await.unwrap();
            assert!(
                expired != renewed,
                "lease {lease}: expiry claimed {expired}, keep-alive stored {renewed}"
            );
            let stored = directory.lease_deadline(2, lease).await.unwrap();
            assert_eq!(stored, renewed.then_some(now + 60_000), "lease {lease}");
        }
        remove(&js, &prefix).await;
    }
}
