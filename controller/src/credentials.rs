//! Reading a DataStore's `ContentRef`s (inline content or a Secret's key) and its admin login.

use std::fmt;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use crate::crd::{ContentRef, DataStore, Driver};
use crate::error::{Error, Result};

/// A secret string whose `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Sensitive(pub String);

impl fmt::Debug for Sensitive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl Sensitive {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Resolves a `ContentRef` to its text.
pub async fn resolve(client: &Client, what: &str, content: &ContentRef) -> Result<Sensitive> {
    if let Some(bytes) = &content.content {
        return String::from_utf8(bytes.0.clone())
            .map(Sensitive)
            .map_err(|_| Error::Invalid(format!("{what}: content is not UTF-8")));
    }
    let Some(reference) = &content.secret_reference else {
        return Err(Error::Invalid(format!(
            "{what}: give content or secretReference"
        )));
    };
    let secret_error = |reason: String| Error::Secret {
        namespace: reference.namespace.clone(),
        name: reference.name.clone(),
        reason,
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &reference.namespace);
    let secret = secrets
        .get_opt(&reference.name)
        .await?
        .ok_or_else(|| secret_error("not found".into()))?;
    let value = secret
        .data
        .as_ref()
        .and_then(|data| data.get(&reference.key_path))
        .ok_or_else(|| secret_error(format!("has no key {:?}", reference.key_path)))?;
    String::from_utf8(value.0.clone())
        .map(Sensitive)
        .map_err(|_| secret_error(format!("key {:?} is not UTF-8", reference.key_path)))
}

/// How the controller logs in to a DataStore as its administrator.
#[derive(Clone, Debug)]
pub struct AdminLogin {
    pub datastore: String,
    pub driver: Driver,
    pub host: String,
    pub port: u16,
    /// Every endpoint as `host:port` (`[v6]:port`), the first one being `host`, `port`: etcd
    /// clients balance over all members; the databases use the first.
    pub members: Vec<String>,
    pub username: Option<String>,
    pub password: Option<Sensitive>,
    /// TLS to the server (`tlsConfig`), if set.
    pub tls: Option<crate::datastore_tls::DatastoreTls>,
}

/// Splits `host:port` (also `[v6]:port`, or a bare host), with the driver's default port.
pub fn host_port(endpoint: &str, default_port: u16) -> Result<(String, u16)> {
    let endpoint = endpoint.trim();
    let endpoint = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest)
        .trim_end_matches('/');
    let invalid = || {
        Error::Invalid(format!(
            "endpoint {endpoint:?}: expected host:port (no user, path or parameters)"
        ))
    };
    if endpoint.is_empty() || endpoint.contains(['@', '/', '?', ' ']) {
        return Err(invalid());
    }
    let (host, port) = if let Some(rest) = endpoint.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(invalid)?;
        match after.strip_prefix(':') {
            Some(port) => (host.to_string(), Some(port)),
            None if after.is_empty() => (host.to_string(), None),
            None => return Err(invalid()),
        }
    } else {
        match endpoint.rsplit_once(':') {
            Some((host, port)) => (host.to_string(), Some(port)),
            None => (endpoint.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(invalid());
    }
    let port = match port {
        Some(port) => port.parse().map_err(|_| invalid())?,
        None => default_port,
    };
    Ok((host, port))
}

/// The default port of a driver.
pub fn default_port(driver: Driver) -> u16 {
    match driver {
        Driver::PostgreSQL => 5432,
        Driver::MySQL => 3306,
        Driver::NATS => 4222,
        Driver::Etcd => 2379,
    }
}

/// The admin login of `store`, reading its Secrets.
pub async fn admin_login(client: &Client, store: &DataStore) -> Result<AdminLogin> {
    let name = kube::ResourceExt::name_any(store);
    let endpoint = store
        .spec
        .endpoints
        .first()
        .ok_or_else(|| Error::Invalid("spec.endpoints is empty".into()))?;
    let (host, port) = host_port(endpoint, default_port(store.spec.driver))?;
    let mut members = Vec::with_capacity(store.spec.endpoints.len());
    for endpoint in &store.spec.endpoints {
        let (host, port) = host_port(endpoint, default_port(store.spec.driver))?;
        members.push(join_host_port(&host, port));
    }
    let (username, password) = match &store.spec.basic_auth {
        Some(auth) => (
            Some(
                resolve(client, "basicAuth.username", &auth.username)
                    .await?
                    .0,
            ),
            Some(resolve(client, "basicAuth.password", &auth.password).await?),
        ),
        None => (None, None),
    };
    let tls = match store.spec.mode {
        crate::crd::Mode::Sidecar => crate::datastore_tls::resolve(client, store).await?,
        // A gateway's tlsConfig is its CA (see `gateway`), not TLS to a database.
        crate::crd::Mode::Gateway => None,
    };
    Ok(AdminLogin {
        datastore: name,
        driver: store.spec.driver,
        host,
        port,
        members,
        username,
        password,
        tls,
    })
}

/// `host:port`, with an IPv6 host in brackets.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Percent-encodes a URL's user-info part (user or password).
pub fn encode_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_endpoints() {
        assert_eq!(
            host_port("db:5433", 5432).ok(),
            Some(("db".to_string(), 5433))
        );
        assert_eq!(host_port("db", 5432).ok(), Some(("db".to_string(), 5432)));
        assert_eq!(
            host_port("[::1]:3306", 1).ok(),
            Some(("::1".to_string(), 3306))
        );
        assert_eq!(
            host_port("nats://127.0.0.1:4222", 1).ok(),
            Some(("127.0.0.1".to_string(), 4222))
        );
        assert!(host_port("user:pw@db:5432", 1).is_err());
        assert!(host_port("db:port", 1).is_err());
        assert!(host_port("", 1).is_err());
    }

    #[test]
    fn sensitive_values_do_not_print() {
        let s = Sensitive("hunter2".into());
        assert_eq!(format!("{s:?}"), "\"***\"");
        assert_eq!(encode_userinfo("a@b:c/d"), "a%40b%3Ac%2Fd");
    }
}
