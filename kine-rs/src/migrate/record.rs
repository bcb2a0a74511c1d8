//! The records a migration keeps on both keyspaces (`keyspaces.migration`, JSON): on the
//! source, where the tenant goes and whether the migration froze it; on the target, the
//! import's checkpoint, committed with every page and window it describes.

use bytes::Bytes;
use serde_json::{Value, json};

use crate::model::Revision;

/// The source's record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceRecord {
    /// The target datastore, without credentials.
    pub target: String,
    /// The migration froze the source (and must unfreeze it if it stops before the switch).
    pub froze: bool,
}

impl SourceRecord {
    pub fn encode(&self) -> String {
        json!({ "target": self.target, "froze": self.froze }).to_string()
    }

    pub fn decode(text: &str) -> Result<Self, String> {
        let value: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        Ok(SourceRecord {
            target: value["target"].as_str().unwrap_or_default().to_string(),
            froze: value["froze"].as_bool().unwrap_or(false),
        })
    }
}

/// Where an import is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetPhase {
    /// Copying the keys live at the snapshot revision.
    Snapshot,
    /// Copying the events after it.
    Tail,
}

/// The target's checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetCheckpoint {
    /// The source datastore, without credentials.
    pub source: String,
    pub phase: TargetPhase,
    /// The revision the snapshot is read at (the source's pin).
    pub snapshot_revision: Revision,
    /// The last key the snapshot copied.
    pub after_key: Option<Bytes>,
    /// The next row position for snapshot rows (unique among them).
    pub next_sub: i64,
    /// Every event up to this revision is copied.
    pub applied: Revision,
    pub keys: u64,
    pub bytes: u64,
    pub events: u64,
}

impl TargetCheckpoint {
    pub fn encode(&self) -> String {
        json!({
            "source": self.source,
            "phase": match self.phase {
                TargetPhase::Snapshot => "snapshot",
                TargetPhase::Tail => "tail",
            },
            "snapshot_revision": self.snapshot_revision,
            "after_key": self.after_key.as_ref().map(|key| hex(key)),
            "next_sub": self.next_sub,
            "applied": self.applied,
            "keys": self.keys,
            "bytes": self.bytes,
            "events": self.events,
        })
        .to_string()
    }

    pub fn decode(text: &str) -> Result<Self, String> {
        let value: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let int = |name: &str| {
            value[name]
                .as_i64()
                .ok_or_else(|| format!("the checkpoint has no {name}"))
        };
        let phase = match value["phase"].as_str() {
            Some("snapshot") => TargetPhase::Snapshot,
            Some("tail") => TargetPhase::Tail,
            other => return Err(format!("unknown import phase {other:?}")),
        };
        let after_key = match value["after_key"].as_str() {
            Some(text) => Some(Bytes::from(unhex(text)?)),
            None => None,
        };
        Ok(TargetCheckpoint {
            source: value["source"].as_str().unwrap_or_default().to_string(),
            phase,
            snapshot_revision: int("snapshot_revision")?,
            after_key,
            next_sub: int("next_sub")?,
            applied: int("applied")?,
            keys: int("keys")?.max(0) as u64,
            bytes: int("bytes")?.max(0) as u64,
            events: int("events")?.max(0) as u64,
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Result<Vec<u8>, String> {
    if !text.len().is_multiple_of(2) {
        return Err("a checkpoint key of odd length".into());
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                .ok_or_else(|| "a checkpoint key that is not hex".to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let checkpoint = TargetCheckpoint {
            source: "postgres://***@db/x".into(),
            phase: TargetPhase::Snapshot,
            snapshot_revision: 7,
            after_key: Some(Bytes::from_static(b"/registry/\x00\xff")),
            next_sub: 12,
            applied: 7,
            keys: 3,
            bytes: 99,
            events: 0,
        };
        assert_eq!(
            TargetCheckpoint::decode(&checkpoint.encode()),
            Ok(checkpoint)
        );
        let source = SourceRecord {
            target: "mysql://***@db".into(),
            froze: true,
        };
        assert_eq!(SourceRecord::decode(&source.encode()), Ok(source));
        assert!(TargetCheckpoint::decode("{\"phase\":\"nope\"}").is_err());
        assert!(TargetCheckpoint::decode("not json").is_err());
    }
}
