//! The wire format of a keyspace stream: one [`Batch`] per committed write transaction,
//! protobuf-encoded (prost), split into chunks when it exceeds the server's message size.
//!
//! A batch is self-contained: the rows in write order, lease changes in order, and the new
//! values of every keyspace setting the transaction changed. Applying the batches of a stream
//! in sequence order rebuilds the keyspace exactly (see [`super::image`]).
//!
//! A batch larger than one message is published as chunks at consecutive sequences, each
//! carrying the header `Kine-Chunk: <index>/<count>`; readers apply it when the last chunk
//! arrives. A writer that loses the race midway (or dies) leaves a partial batch behind,
//! which readers drop when the next batch's first chunk (or an unchunked batch) follows.
//!
//! A snapshot is a batch too (`snapshot_of` set): after a compaction the writer publishes
//! the keyspace's whole retained state and purges every message before it, so the stream
//! stops growing with history that compaction removed.

use bytes::Bytes;
use prost::Message;

use crate::error::{KineError, Result};

/// The header naming a chunk's place in its batch.
pub const CHUNK_HEADER: &str = "Kine-Chunk";

/// Everything one write transaction changed.
#[derive(Clone, PartialEq, Message)]
pub struct Batch {
    /// The keyspace counter after the batch.
    #[prost(int64, tag = "1")]
    pub revision: i64,
    /// New rows (puts and tombstones), in write order.
    #[prost(message, repeated, tag = "2")]
    pub rows: Vec<Row>,
    /// Lease inserts, updates and deletes, in order.
    #[prost(message, repeated, tag = "3")]
    pub leases: Vec<LeaseOp>,
    /// A new compaction revision.
    #[prost(int64, optional, tag = "4")]
    pub compact_revision: Option<i64>,
    /// A new freeze flag.
    #[prost(message, optional, tag = "5")]
    pub freeze: Option<Freeze>,
    /// A new quota.
    #[prost(message, optional, tag = "6")]
    pub quota: Option<QuotaSetting>,
    /// A new migration role, pin and record.
    #[prost(message, optional, tag = "7")]
    pub migration: Option<Migration>,
    /// Non-zero in a snapshot: the batch is the whole keyspace as of this stream sequence
    /// (every retained row, every lease, every setting), and replaces the image.
    #[prost(uint64, tag = "8")]
    pub snapshot_of: u64,
}

/// A row: a put or a tombstone of a key at a revision.
#[derive(Clone, PartialEq, Message)]
pub struct Row {
    #[prost(bytes = "bytes", tag = "1")]
    pub key: Bytes,
    #[prost(int64, tag = "2")]
    pub mod_revision: i64,
    #[prost(int64, tag = "3")]
    pub sub: i64,
    #[prost(int64, tag = "4")]
    pub create_revision: i64,
    #[prost(int64, tag = "5")]
    pub version: i64,
    #[prost(int64, tag = "6")]
    pub lease: i64,
    #[prost(bytes = "bytes", tag = "7")]
    pub value: Bytes,
    #[prost(bool, tag = "8")]
    pub deleted: bool,
}

/// A lease stored (inserted, or its deadline moved) or removed.
#[derive(Clone, PartialEq, Message)]
pub struct LeaseOp {
    #[prost(int64, tag = "1")]
    pub id: i64,
    #[prost(int64, tag = "2")]
    pub ttl: i64,
    #[prost(int64, tag = "3")]
    pub expires_at_ms: i64,
    #[prost(bool, tag = "4")]
    pub delete: bool,
}

#[derive(Clone, PartialEq, Message)]
pub struct Freeze {
    #[prost(bool, tag = "1")]
    pub frozen: bool,
    #[prost(int64, tag = "2")]
    pub frozen_at_ms: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct QuotaSetting {
    #[prost(int64, tag = "1")]
    pub keys: i64,
    #[prost(int64, tag = "2")]
    pub bytes: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct Migration {
    #[prost(int64, tag = "1")]
    pub role: i64,
    #[prost(int64, tag = "2")]
    pub pinned_revision: i64,
    #[prost(string, optional, tag = "3")]
    pub record: Option<String>,
}

impl Batch {
    pub fn encode_bytes(&self) -> Bytes {
        Bytes::from(self.encode_to_vec())
    }

    pub fn decode_bytes(data: &[u8]) -> Result<Batch> {
        Batch::decode(data).map_err(|error| {
            KineError::Storage(format!("undecodable batch in the stream: {error}"))
        })
    }
}

/// Splits an encoded batch into chunks of at most `max` bytes (at least one chunk).
pub fn chunks(data: &Bytes, max: usize) -> Vec<Bytes> {
    let max = max.max(1);
    if data.len() <= max {
        return vec![data.clone()];
    }
    (0..data.len())
        .step_by(max)
        .map(|start| data.slice(start..(start + max).min(data.len())))
        .collect()
}

/// Parses a `Kine-Chunk` header value: `(index, count)`.
pub fn parse_chunk(value: &str) -> Option<(u32, u32)> {
    let (index, count) = value.split_once('/')?;
    let (index, count) = (index.parse().ok()?, count.parse().ok()?);
    (index < count).then_some((index, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_chunks() {
        let batch = Batch {
            revision: 7,
            rows: vec![Row {
                key: Bytes::from_static(b"k"),
                mod_revision: 7,
                value: Bytes::from(vec![1u8; 1000]),
                ..Row::default()
            }],
            migration: Some(Migration {
                role: 1,
                pinned_revision: 3,
                record: Some("x".into()),
            }),
            ..Batch::default()
        };
        let data = batch.encode_bytes();
        let parts = chunks(&data, 300);
        assert_eq!(parts.len(), data.len().div_ceil(300));
        let joined: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        assert_eq!(Batch::decode_bytes(&joined).ok(), Some(batch));
        assert_eq!(parse_chunk("1/3"), Some((1, 3)));
        assert_eq!(parse_chunk("3/3"), None);
        assert_eq!(parse_chunk("x"), None);
    }
}
