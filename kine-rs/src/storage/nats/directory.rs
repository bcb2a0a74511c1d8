//! The keyspace directory and the lease deadlines, two JetStream key-value buckets.
//!
//! * `<bucket>-keyspaces`: one entry per keyspace, keyed `t<hex of the tenant name>` (names
//!   never appear raw in NATS), holding the name. A keyspace's id is the bucket revision of the
//!   entry's creation: unique, never reused, allocated atomically by the server. Two processes
//!   that race to create the same tenant both call `create`; the loser gets "already exists"
//!   and reads the winner's entry.
//! * `<bucket>-leases`: the latest keep-alive deadline of a lease, keyed
//!   `k<keyspace>.l<hex lease id>` (see [`super`] on leases).

use async_nats::jetstream;
use async_nats::jetstream::kv::{Operation, Store};
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
        Ok(value.and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok()))
    }

    /// Stores a lease's keep-alive deadline.
    pub async fn renew(&self, keyspace: KeyspaceId, lease: i64, deadline: i64) -> Result<()> {
        self.leases
            .put(
                lease_key(keyspace, lease),
                Bytes::from(deadline.to_string()),
            )
            .await
            .map(|_| ())
            .map_err(|e| unavailable("storing a lease deadline", e))
    }

    /// Forgets a lease's keep-alive deadline, when it is revoked or granted anew (best
    /// effort).
    pub async fn forget(&self, keyspace: KeyspaceId, lease: i64) {
        let _ = self.leases.purge(lease_key(keyspace, lease)).await;
    }
}
