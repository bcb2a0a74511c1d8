//! NATS context files (`?contextFile=PATH`, as kine takes them): the JSON the `nats` CLI
//! writes under `~/.config/nats/context/NAME.json`, holding the servers and the credentials,
//! so they stay out of the endpoint string and the process's arguments.
//!
//! Fields used: `url` (servers, comma-separated; only when the endpoint names none), `user`
//! and `password`, `token`, `creds` (a `.creds` file: user JWT and nkey seed), `nkey` (a
//! file holding an nkey seed), `cert`/`key`/`ca` (TLS files, when the `--cert-file`,
//! `--key-file`, `--ca-file` flags do not give them). Fields for features kine-rs does not
//! have (`jetstream_domain`, `jetstream_api_prefix`, `inbox_prefix`, `user_jwt`, `nsc`,
//! `socks_proxy`, `windows_cert_*`) are refused by name when set, rather than ignored.

use std::path::Path;

use serde_json::Value;

use crate::error::{KineError, Result};

/// What a context file says. `Debug` never shows the secrets.
#[derive(Default, Clone, PartialEq, Eq)]
pub struct NatsContext {
    /// `host:port` of each server of `url`.
    pub servers: Vec<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    pub creds_file: Option<String>,
    pub nkey_file: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    pub ca_file: Option<String>,
}

impl std::fmt::Debug for NatsContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |s: &Option<String>| s.as_ref().map(|_| "***");
        f.debug_struct("NatsContext")
            .field("servers", &self.servers)
            .field("user", &self.user)
            .field("password", &hidden(&self.password))
            .field("token", &hidden(&self.token))
            .field("creds_file", &self.creds_file)
            .field("nkey_file", &self.nkey_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// Context fields that would change what kine-rs talks to in ways it does not support.
const UNSUPPORTED: &[&str] = &[
    "jetstream_domain",
    "jetstream_api_prefix",
    "jetstream_event_prefix",
    "inbox_prefix",
    "user_jwt",
    "nsc",
    "socks_proxy",
    "windows_cert_store",
    "windows_cert_match",
    "windows_cert_match_by",
    "windows_ca_certs_match",
];

fn invalid(path: &str, what: &str) -> KineError {
    KineError::Storage(format!("the NATS context file {path:?}: {what}"))
}

impl NatsContext {
    /// Reads and checks the context file at `path`. Errors name the file and the field,
    /// never a value.
    pub fn read(path: &str) -> Result<NatsContext> {
        let text = std::fs::read_to_string(Path::new(path))
            .map_err(|e| invalid(path, &format!("cannot be read ({})", e.kind())))?;
        Self::parse(path, &text)
    }

    fn parse(path: &str, text: &str) -> Result<NatsContext> {
        let json: Value =
            serde_json::from_str(text).map_err(|_| invalid(path, "is not a JSON object"))?;
        let object = json
            .as_object()
            .ok_or_else(|| invalid(path, "is not a JSON object"))?;
        let field = |name: &str| -> Result<Option<String>> {
            match object.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if s.is_empty() => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(invalid(path, &format!("field {name:?} is not a string"))),
            }
        };
        for name in UNSUPPORTED {
            let set = match object.get(*name) {
                None | Some(Value::Null) | Some(Value::Bool(false)) => false,
                Some(Value::String(s)) => !s.is_empty(),
                Some(Value::Array(a)) => !a.is_empty(),
                Some(_) => true,
            };
            if set {
                return Err(invalid(
                    path,
                    &format!("field {name:?} is not supported by kine-rs"),
                ));
            }
        }
        let mut servers = Vec::new();
        if let Some(url) = field("url")? {
            for server in url.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let host = server
                    .strip_prefix("nats://")
                    .or_else(|| server.strip_prefix("tls://"))
                    .unwrap_or(server)
                    .trim_end_matches('/');
                // Credentials belong in their own fields; a URL carrying them is refused
                // so they cannot end up in a log line that names the servers.
                if host.is_empty() || host.contains('@') || host.contains('/') {
                    return Err(invalid(
                        path,
                        "field \"url\" must list servers as host:port (credentials go in \
                         user/password, token, creds or nkey)",
                    ));
                }
                servers.push(if host.contains(':') {
                    host.to_string()
                } else {
                    format!("{host}:4222")
                });
            }
        }
        let context = NatsContext {
            servers,
            user: field("user")?,
            password: field("password")?,
            token: field("token")?,
            creds_file: field("creds")?,
            nkey_file: field("nkey")?,
            cert_file: field("cert")?,
            key_file: field("key")?,
            ca_file: field("ca")?,
        };
        let ways = [
            context.user.is_some(),
            context.token.is_some(),
            context.creds_file.is_some(),
            context.nkey_file.is_some(),
        ]
        .into_iter()
        .filter(|set| *set)
        .count();
        if ways > 1 {
            return Err(invalid(
                path,
                "gives more than one of user/password, token, creds and nkey",
            ));
        }
        if context.password.is_some() && context.user.is_none() {
            return Err(invalid(path, "has a password without a user"));
        }
        if context.cert_file.is_some() != context.key_file.is_some() {
            return Err(invalid(path, "fields \"cert\" and \"key\" go together"));
        }
        Ok(context)
    }

    /// The nkey seed in `nkey_file`, trimmed. Errors never show the file's content.
    pub fn nkey_seed(path: &str) -> Result<String> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            KineError::Storage(format!(
                "the nkey seed file {path:?} cannot be read ({})",
                e.kind()
            ))
        })?;
        let seed = text
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("SU"))
            .ok_or_else(|| {
                KineError::Storage(format!(
                    "the nkey seed file {path:?} holds no user seed (a line starting with SU)"
                ))
            })?;
        Ok(seed.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_fields_it_uses_and_hides_secrets() {
        let context = NatsContext::parse(
            "ctx.json",
            r#"{"description":"d","url":"nats://a:4222, b","token":"s3cret","ca":"/ca.pem",
                "jetstream_domain":"","inbox_prefix":null}"#,
        );
        let context = context.ok();
        assert_eq!(
            context.as_ref().map(|c| c.servers.clone()),
            Some(vec!["a:4222".to_string(), "b:4222".to_string()])
        );
        assert_eq!(
            context.as_ref().and_then(|c| c.ca_file.clone()),
            Some("/ca.pem".into())
        );
        assert!(!format!("{context:?}").contains("s3cret"));
    }

    #[test]
    fn refuses_what_it_cannot_honour_without_echoing_values() {
        let cases = [
            (r#"{"jetstream_domain":"hub"}"#, "jetstream_domain"),
            (r#"{"url":"nats://u:pw@h"}"#, "host:port"),
            (r#"{"token":"pw1","user":"u"}"#, "more than one"),
            (r#"{"password":"pw1"}"#, "without a user"),
            (r#"{"cert":"/c.pem"}"#, "go together"),
            (r#"{"token":7}"#, "not a string"),
            ("[1]", "JSON object"),
            ("pw1 {", "JSON object"),
        ];
        for (text, expected) in cases {
            let message = NatsContext::parse("ctx.json", text)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(message.contains(expected), "{text}: {message}");
            assert!(!message.contains("pw1"), "{text}: {message}");
        }
    }
}
