//! Where a tenant's keys and kine-rs's own records live in the shared etcd.
//!
//! A tenant's keys live under `BEFORE<tenant>AFTER` (default `/<tenant>/`). `AFTER` starts
//! with `/`, which no tenant name (a DNS label) contains, so no tenant's prefix is a prefix of
//! another's. kine-rs's records live under `BEFORE_kine-rs/`, which no tenant prefix covers
//! either (`_` is not in a DNS label).

use bytes::{BufMut, Bytes, BytesMut};

use crate::tenants::validate_name;

/// The tenant prefix template of `--etcd-tenant-prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixTemplate {
    before: String,
    after: String,
}

const PLACEHOLDER: &str = "{tenant}";

impl PrefixTemplate {
    /// Parses `BEFORE{tenant}AFTER`, where `AFTER` starts with `/`.
    pub fn parse(template: &str) -> Result<Self, String> {
        let Some((before, after)) = template.split_once(PLACEHOLDER) else {
            return Err(format!(
                "--etcd-tenant-prefix {template:?} has no {PLACEHOLDER} to stand for the tenant"
            ));
        };
        if after.contains(PLACEHOLDER) {
            return Err(format!(
                "--etcd-tenant-prefix {template:?} names {PLACEHOLDER} more than once"
            ));
        }
        if !after.starts_with('/') {
            return Err(format!(
                "--etcd-tenant-prefix {template:?} must have a '/' right after {PLACEHOLDER}, so \
                 that tenant \"a\" never covers tenant \"ab\""
            ));
        }
        Ok(PrefixTemplate {
            before: before.to_string(),
            after: after.to_string(),
        })
    }

    /// The prefix of tenant `name` (a valid tenant name).
    pub fn tenant(&self, name: &str) -> Result<KeyPrefix, String> {
        validate_name(name)?;
        Ok(KeyPrefix::new(format!(
            "{}{name}{}",
            self.before, self.after
        )))
    }

    /// Where kine-rs keeps its records of tenants (registry, freeze, compaction, leases).
    pub fn control_root(&self) -> String {
        format!("{}_kine-rs/", self.before)
    }
}

/// The key prefix one tenant is confined to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPrefix {
    prefix: Bytes,
    /// The first key after every key with the prefix.
    end: Bytes,
}

impl KeyPrefix {
    /// The prefix `prefix` (non-empty, ending in `/`, so its end is simple).
    pub fn new(prefix: impl Into<Bytes>) -> Self {
        let prefix: Bytes = prefix.into();
        KeyPrefix {
            end: prefix_end(&prefix),
            prefix,
        }
    }

    /// The prefix itself.
    pub fn prefix(&self) -> &Bytes {
        &self.prefix
    }

    /// The first key after every key with the prefix.
    pub fn end(&self) -> &Bytes {
        &self.end
    }

    /// The tenant's key `key` in the shared etcd.
    pub fn key(&self, key: &[u8]) -> Bytes {
        let mut out = BytesMut::with_capacity(self.prefix.len() + key.len());
        out.put_slice(&self.prefix);
        out.put_slice(key);
        out.freeze()
    }

    /// The tenant's range `[key, range_end)` in the shared etcd, clamped to the prefix: an
    /// empty `range_end` is the key alone; `"\0"` is every key from `key` on (of the tenant);
    /// any other end is the tenant's own key.
    pub fn range(&self, key: &[u8], range_end: &[u8]) -> (Bytes, Bytes) {
        let start = self.key(key);
        let end = match range_end {
            [] => Bytes::new(),
            [0] => self.end.clone(),
            end => self.key(end),
        };
        (start, end)
    }

    /// A shared-etcd key of the tenant without its prefix; `None` for a key outside it
    /// (which a confined request never meets).
    pub fn strip(&self, key: &Bytes) -> Option<Bytes> {
        key.starts_with(&self.prefix)
            .then(|| key.slice(self.prefix.len()..))
    }
}

/// The smallest key greater than every key starting with `prefix` (etcd's prefix end);
/// `"\0"` (every key) when there is none.
pub fn prefix_end(prefix: &[u8]) -> Bytes {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Bytes::from(end);
        }
    }
    Bytes::from_static(b"\0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates() {
        let template = PrefixTemplate::parse("/{tenant}/").expect("default template");
        assert_eq!(
            template.tenant("a").expect("valid").prefix().as_ref(),
            b"/a/"
        );
        assert_eq!(template.control_root(), "/_kine-rs/");
        let nested = PrefixTemplate::parse("/kamaji/{tenant}/data/").expect("nested");
        assert_eq!(
            nested.tenant("t-1").expect("valid").prefix().as_ref(),
            b"/kamaji/t-1/data/"
        );
        assert_eq!(nested.control_root(), "/kamaji/_kine-rs/");
        for bad in [
            "/tenants/",
            "/{tenant}",
            "/{tenant}x/",
            "/{tenant}/{tenant}/",
        ] {
            assert!(PrefixTemplate::parse(bad).is_err(), "{bad}");
        }
        assert!(template.tenant("a/b").is_err());
        assert!(template.tenant("_kine-rs").is_err());
    }

    #[test]
    fn no_prefix_covers_another() {
        let template = PrefixTemplate::parse("/{tenant}/").expect("template");
        let names = ["a", "ab", "a-b", "b", "a0"];
        for x in names {
            let px = template.tenant(x).expect("valid");
            assert!(!template.control_root().as_bytes().starts_with(px.prefix()));
            assert!(!px.prefix().starts_with(template.control_root().as_bytes()));
            for y in names {
                let py = template.tenant(y).expect("valid");
                if x != y {
                    assert!(!py.prefix().starts_with(px.prefix()), "{x} covers {y}");
                }
            }
        }
    }

    #[test]
    fn ranges_are_clamped() {
        let p = KeyPrefix::new("/t/");
        assert_eq!(p.end().as_ref(), b"/t0");
        assert_eq!(p.range(b"k", b""), (Bytes::from("/t/k"), Bytes::new()));
        assert_eq!(
            p.range(b"k", b"\0"),
            (Bytes::from("/t/k"), Bytes::from("/t0"))
        );
        assert_eq!(
            p.range(b"\0", b"\0"),
            (Bytes::from("/t/\0"), Bytes::from("/t0"))
        );
        assert_eq!(
            p.range(b"a", b"b"),
            (Bytes::from("/t/a"), Bytes::from("/t/b"))
        );
        // An end past every key of the tenant stays the tenant's own key, below its end.
        let (_, end) = p.range(b"a", b"\xff\xff");
        assert!(end.as_ref() < p.end().as_ref());
        assert_eq!(p.strip(&Bytes::from("/t/x")), Some(Bytes::from("x")));
        assert_eq!(p.strip(&Bytes::from("/u/x")), None);
        assert_eq!(prefix_end(b"a\xff"), Bytes::from("b"));
        assert_eq!(prefix_end(b"\xff"), Bytes::from_static(b"\0"));
    }
}
