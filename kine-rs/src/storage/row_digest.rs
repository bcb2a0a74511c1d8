//! An order-independent digest of a keyspace's rows at a revision, which a database can
//! compute itself (one statement, no rows sent) and kine-rs can compute from rows it reads:
//! a migration compares the two sides' digests, whichever way each was computed.
//!
//! Each row is encoded as `len(key) key len(value) value create_revision mod_revision
//! version lease`, the lengths and numbers as 8 bytes big-endian; the first 8 bytes of its
//! MD5, read as a big-endian integer, are summed over the rows modulo 2^64, and the rows are
//! counted. MD5 because PostgreSQL and MySQL both have it built in (it detects a copy that
//! differs; it is not meant to resist a forger, who would need write access to both
//! datastores). 64 bits and not all 128: MySQL computes a derived column once for each place
//! a statement names it, and each word summed separately cost it one more MD5 of every row
//! (5.6 s instead of 1.4 s for 300,000 rows of 1 KiB with four words).

use md5::{Digest as _, Md5};

use crate::model::KeyValue;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RowDigest {
    /// Rows digested.
    pub rows: u64,
    /// The sum of the rows' words, modulo 2^64.
    pub sum: u64,
}

impl RowDigest {
    /// Adds one row.
    pub fn add(&mut self, kv: &KeyValue) {
        let mut md5 = Md5::new();
        md5.update((kv.key.len() as u64).to_be_bytes());
        md5.update(&kv.key);
        md5.update((kv.value.len() as u64).to_be_bytes());
        md5.update(&kv.value);
        for n in [kv.create_revision, kv.mod_revision, kv.version, kv.lease] {
            md5.update(n.to_be_bytes());
        }
        let hash = md5.finalize();
        let mut word = [0u8; 8];
        word.copy_from_slice(&hash[..8]);
        self.sum = self.sum.wrapping_add(u64::from_be_bytes(word));
        self.rows += 1;
    }

    /// Adds the rows of `other` (a digest of other rows).
    pub fn merge(&mut self, other: RowDigest) {
        self.rows += other.rows;
        self.sum = self.sum.wrapping_add(other.sum);
    }

    /// The digest a database computed: the row count, and the sum as a signed 64-bit
    /// integer (the same 64 bits).
    pub fn from_sum(rows: i64, sum: i64) -> Self {
        RowDigest {
            rows: rows as u64,
            sum: sum as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn kv(key: &str, value: &str, revision: i64) -> KeyValue {
        KeyValue {
            key: Bytes::copy_from_slice(key.as_bytes()),
            create_revision: revision,
            mod_revision: revision,
            version: 1,
            lease: 0,
            value: Bytes::copy_from_slice(value.as_bytes()),
        }
    }

    #[test]
    fn rows_in_any_order_give_the_same_digest() {
        let rows = [kv("a", "1", 2), kv("b", "2", 3), kv("c", "3", 4)];
        let mut forward = RowDigest::default();
        rows.iter().for_each(|row| forward.add(row));
        let mut backward = RowDigest::default();
        rows.iter().rev().for_each(|row| backward.add(row));
        assert_eq!(forward, backward);
        assert_eq!(forward.rows, 3);
    }

    #[test]
    fn every_field_and_boundary_counts() {
        let base = kv("ab", "c", 2);
        let digest = |kv: &KeyValue| {
            let mut digest = RowDigest::default();
            digest.add(kv);
            digest
        };
        let changed = [
            kv("a", "bc", 2),
            kv("ab", "d", 2),
            KeyValue {
                create_revision: 1,
                ..base.clone()
            },
            KeyValue {
                mod_revision: 3,
                ..base.clone()
            },
            KeyValue {
                version: 2,
                ..base.clone()
            },
            KeyValue {
                lease: 7,
                ..base.clone()
            },
        ];
        for other in &changed {
            assert_ne!(digest(&base), digest(other), "{other:?}");
        }
    }

    #[test]
    fn a_known_row_has_a_known_digest() {
        // The MD5 of the row's encoding, computed independently: `printf` of the bytes piped
        // through `md5sum`: 3488a99ae4d7dd13ca9d80c9eb033ca5.
        let mut digest = RowDigest::default();
        digest.add(&kv("k", "v", 5));
        assert_eq!(digest.sum, 0x3488_a99a_e4d7_dd13);
    }
}

#[cfg(test)]
mod database_tests;
