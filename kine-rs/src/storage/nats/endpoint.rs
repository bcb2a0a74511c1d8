//! The `nats://` endpoint:
//! `nats://[user:pass@]host:port[,host2:port][?bucket=NAME&replicas=N&contextFile=PATH&noEmbed]`.
//!
//! kine's options for an embedded NATS server are refused by name: kine-rs never embeds one.

use crate::error::{KineError, Result};

/// The bucket when the endpoint names none (kine's default).
pub const DEFAULT_BUCKET: &str = "kine";

/// A parsed `nats://` endpoint.
#[derive(Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host:port` of every server (127.0.0.1:4222 when the endpoint names none).
    pub servers: Vec<String>,
    /// Whether the endpoint named the servers (else a context file's `url` may).
    pub servers_named: bool,
    pub user: Option<String>,
    pub password: Option<String>,
    /// The prefix of every stream and bucket kine-rs creates.
    pub bucket: String,
    /// Replicas of every stream (1 unless given).
    pub replicas: usize,
    /// A NATS context file with servers and credentials (`contextFile`, as kine takes it).
    pub context_file: Option<String>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("servers", &self.servers)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("bucket", &self.bucket)
            .field("replicas", &self.replicas)
            .field("context_file", &self.context_file)
            .finish()
    }
}

/// Options of kine's embedded NATS server, which kine-rs does not have.
const EMBEDDED_OPTIONS: &[&str] = &["serverConfig", "dontListen", "stdoutLogging"];

fn invalid(message: String) -> KineError {
    KineError::Storage(message)
}

/// Decodes `%XX` escapes of a user name or password.
fn percent_decode(text: &str) -> Result<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or_else(|| {
                    invalid("a malformed %-escape in the NATS endpoint's credentials".into())
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| invalid("the NATS endpoint's credentials are not UTF-8".into()))
}

/// Whether `name` may prefix NATS stream, subject and bucket names.
fn valid_bucket(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 48
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Endpoint {
    pub fn parse(endpoint: &str) -> Result<Endpoint> {
        let rest = endpoint
            .strip_prefix("nats://")
            .ok_or_else(|| invalid("a NATS endpoint starts with nats://".into()))?;
        let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
        let authority = authority.trim_end_matches('/');
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (Some(userinfo), hosts),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            None => (None, None),
            Some(userinfo) => match userinfo.split_once(':') {
                Some((user, password)) => {
                    (Some(percent_decode(user)?), Some(percent_decode(password)?))
                }
                None => (Some(percent_decode(userinfo)?), None),
            },
        };
        let mut servers = Vec::new();
        for host in hosts.split(',').map(str::trim).filter(|h| !h.is_empty()) {
            let host = host.strip_prefix("nats://").unwrap_or(host);
            if host.contains('/') || host.contains('@') {
                return Err(invalid(format!("a malformed NATS server address {host:?}")));
            }
            servers.push(if host.contains(':') {
                host.to_string()
            } else {
                format!("{host}:4222")
            });
        }
        let servers_named = !servers.is_empty();
        if servers.is_empty() {
            servers.push("127.0.0.1:4222".to_string());
        }
        let mut parsed = Endpoint {
            servers,
            servers_named,
            user,
            password,
            bucket: DEFAULT_BUCKET.to_string(),
            replicas: 1,
            context_file: None,
        };
        for option in query.split('&').filter(|o| !o.is_empty()) {
            let (name, value) = option.split_once('=').unwrap_or((option, ""));
            match name {
                "bucket" => {
                    if !valid_bucket(value) {
                        return Err(invalid(format!(
                            "bucket={value:?}: a NATS bucket name is 1 to 48 letters, digits, \
                             '-' or '_'"
                        )));
                    }
                    parsed.bucket = value.to_string();
                }
                "replicas" => {
                    parsed.replicas = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=5).contains(n))
                        .ok_or_else(|| invalid(format!("replicas={value:?}: expected 1 to 5")))?;
                }
                "contextFile" => {
                    if value.is_empty() {
                        return Err(invalid(
                            "contextFile= needs the path of a NATS context file".into(),
                        ));
                    }
                    parsed.context_file = Some(percent_decode(value)?);
                }
                // kine runs an embedded server unless told not to; kine-rs never does.
                "noEmbed" => {}
                name if EMBEDDED_OPTIONS.contains(&name) => {
                    return Err(invalid(format!(
                        "the NATS endpoint option {name:?} configures an embedded NATS server; \
                         kine-rs never embeds one: run nats-server with JetStream (-js) and \
                         point --endpoint at it"
                    )));
                }
                name => {
                    return Err(invalid(format!(
                        "unknown NATS endpoint option {name:?} (known: bucket, replicas, contextFile, \
                         noEmbed)"
                    )));
                }
            }
        }
        Ok(parsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kine_style_endpoints() {
        let e = Endpoint::parse("nats://u:p%40ss@h1:4222,h2?bucket=b-1&noEmbed").ok();
        let e = e.as_ref();
        assert_eq!(
            e.map(|e| e.servers.clone()),
            Some(vec!["h1:4222".into(), "h2:4222".into()])
        );
        assert_eq!(e.and_then(|e| e.password.clone()), Some("p@ss".into()));
        assert_eq!(e.map(|e| e.bucket.as_str()), Some("b-1"));
        assert!(!format!("{e:?}").contains("p@ss"));
        let default = Endpoint::parse("nats://?noEmbed").ok();
        assert_eq!(
            default.map(|e| (e.servers, e.bucket)),
            Some((vec!["127.0.0.1:4222".into()], "kine".into()))
        );
        let embedded = Endpoint::parse("nats://h?serverConfig=/x.conf").err();
        assert!(embedded.is_some_and(|e| e.to_string().contains("never embeds")));
        assert!(Endpoint::parse("nats://h?bucket=a.b").is_err());
        assert!(Endpoint::parse("nats://h?what=1").is_err());
    }
}
