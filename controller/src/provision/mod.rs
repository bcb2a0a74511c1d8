//! Provisioning a tenant in a DataStore, per driver, idempotently.
//!
//! * PostgreSQL and MySQL: one database per tenant and a login that may use only that
//!   database, with a random password (see [`postgres`], [`mysql`]). The tenant's kine-rs
//!   creates its tables there on first start (it owns them).
//! * etcd: nothing up front either: the tenant's records (registration, quota, freeze) are
//!   written through kine-rs's etcd proxy ([`etcd`], [`crate::tenant`]).
//! * NATS: nothing up front: tenants share the DataStore's streams (kine-rs keeps one
//!   keyspace per tenant in them) and kine-rs logs in with the DataStore's credentials
//!   ([`nats`]).
//!
//! Names of databases and logins are derived from the tenant name (`kine_` and 16 hex digits
//! of its SHA-256, within every server's identifier limits), are checked against
//! `^[a-z0-9_]+$` before use and are quoted anyway; passwords are sent as escaped literals
//! (DDL takes no bind parameters) with statement logging off, so they never reach a log.

pub mod etcd;
pub mod mysql;
pub mod nats;
pub mod postgres;

use std::time::Duration;

use rand::Rng;
use sha2::{Digest, Sha256};

use crate::crd::Driver;
use crate::credentials::{AdminLogin, Sensitive, encode_userinfo};

/// How long connecting to a datastore may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The database and login of a tenant, and its password.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantLogin {
    pub database: String,
    pub user: String,
    pub password: Sensitive,
}

impl TenantLogin {
    /// The login for `tenant` with `password`.
    pub fn new(tenant: &str, password: Sensitive) -> TenantLogin {
        let name = object_name(tenant);
        TenantLogin {
            database: name.clone(),
            user: name,
            password,
        }
    }
}

/// `kine_` and the first 16 hex digits of SHA-256(tenant): a valid, short identifier on
/// PostgreSQL (63), MySQL (64 for databases, 32 for users) and MariaDB.
pub fn object_name(tenant: &str) -> String {
    let digest = Sha256::digest(tenant.as_bytes());
    format!("kine_{}", &hex::encode(digest)[..16])
}

/// A new random password: 32 letters and digits.
pub fn random_password() -> Sensitive {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    Sensitive(
        (0..32)
            .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
            .collect(),
    )
}

/// Checks an identifier the controller made before it goes into SQL text.
pub fn checked_identifier(name: &str) -> Result<&str, String> {
    if !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        Ok(name)
    } else {
        Err(format!("refusing identifier {name:?}"))
    }
}

/// Escapes a SQL string literal's content (quotes doubled, backslashes too for MySQL).
pub fn quote_literal(text: &str, backslash_escapes: bool) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('\'');
    for c in text.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' if backslash_escapes => out.push_str("\\\\"),
            '\0' => {}
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// Whether the datastore answers and takes the admin login.
pub async fn check(admin: &AdminLogin) -> Result<(), String> {
    match admin.driver {
        Driver::PostgreSQL => postgres::check(admin).await,
        Driver::MySQL => mysql::check(admin).await,
        Driver::NATS => nats::check(admin).await,
        Driver::Etcd => etcd::check(admin).await,
    }
}

/// Creates (or updates) the tenant's database and login.
pub async fn ensure(admin: &AdminLogin, login: &TenantLogin) -> Result<(), String> {
    match admin.driver {
        Driver::PostgreSQL => postgres::ensure(admin, login).await,
        Driver::MySQL => mysql::ensure(admin, login).await,
        Driver::NATS => Ok(()),
        Driver::Etcd => etcd::supported(admin),
    }
}

/// Drops the tenant's database and login (NATS, etcd: nothing; the keyspace is deleted by
/// the caller through kine-rs).
pub async fn drop_tenant(admin: &AdminLogin, login: &TenantLogin) -> Result<(), String> {
    match admin.driver {
        Driver::PostgreSQL => postgres::drop_tenant(admin, login).await,
        Driver::MySQL => mysql::drop_tenant(admin, login).await,
        Driver::NATS | Driver::Etcd => Ok(()),
    }
}

/// The kine-rs `--endpoint` of the tenant (with its credentials: goes into a Secret only).
pub fn tenant_endpoint(admin: &AdminLogin, login: &TenantLogin) -> Sensitive {
    let host = if admin.host.contains(':') {
        format!("[{}]", admin.host)
    } else {
        admin.host.clone()
    };
    let user = encode_userinfo(&login.user);
    let password = encode_userinfo(login.password.expose());
    Sensitive(match admin.driver {
        Driver::PostgreSQL => format!(
            "postgres://{user}:{password}@{host}:{}/{}",
            admin.port, login.database
        ),
        Driver::MySQL => format!(
            "mysql://{user}:{password}@tcp({host}:{})/{}",
            admin.port, login.database
        ),
        Driver::Etcd => etcd::endpoint(admin),
        Driver::NATS => {
            let userinfo = match (&admin.username, &admin.password) {
                (Some(u), Some(p)) => {
                    format!("{}:{}@", encode_userinfo(u), encode_userinfo(p.expose()))
                }
                (Some(u), None) => format!("{}@", encode_userinfo(u)),
                _ => String::new(),
            };
            format!("nats://{userinfo}{host}:{}", admin.port)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_stable_identifiers() {
        let a = object_name("t-4f1c6a7e-0000-4000-8000-000000000001");
        assert_eq!(a, object_name("t-4f1c6a7e-0000-4000-8000-000000000001"));
        assert_ne!(a, object_name("t-4f1c6a7e-0000-4000-8000-000000000002"));
        assert_eq!(a.len(), 21);
        assert!(checked_identifier(&a).is_ok());
        assert!(checked_identifier("x\"; DROP DATABASE y").is_err());
        assert!(checked_identifier("").is_err());
    }

    #[test]
    fn literals_are_escaped() {
        assert_eq!(quote_literal("a'b", false), "'a''b'");
        assert_eq!(quote_literal("a\\'b", true), "'a\\\\''b'");
        let p = random_password();
        assert_eq!(p.expose().len(), 32);
        assert!(p.expose().bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(p, random_password());
    }

    #[test]
    fn endpoints_carry_the_tenant_login() {
        let admin = AdminLogin {
            datastore: "pg".into(),
            driver: Driver::PostgreSQL,
            host: "db".into(),
            port: 5432,
            members: vec!["db:5432".into()],
            username: Some("postgres".into()),
            password: None,
            tls: None,
        };
        let login = TenantLogin {
            database: "kine_x".into(),
            user: "kine_x".into(),
            password: Sensitive("pw".into()),
        };
        assert_eq!(
            tenant_endpoint(&admin, &login).expose(),
            "postgres://kine_x:pw@db:5432/kine_x"
        );
        let mysql = AdminLogin {
            driver: Driver::MySQL,
            port: 3306,
            ..admin.clone()
        };
        assert_eq!(
            tenant_endpoint(&mysql, &login).expose(),
            "mysql://kine_x:pw@tcp(db:3306)/kine_x"
        );
        let nats = AdminLogin {
            driver: Driver::NATS,
            port: 4222,
            username: Some("u".into()),
            password: Some(Sensitive("p@ss".into())),
            ..admin
        };
        assert_eq!(
            tenant_endpoint(&nats, &login).expose(),
            "nats://u:p%40ss@db:4222"
        );
        let etcd = AdminLogin {
            driver: Driver::Etcd,
            members: vec!["e1:2379".into(), "[::1]:2380".into()],
            username: None,
            password: None,
            ..nats
        };
        assert_eq!(
            tenant_endpoint(&etcd, &login).expose(),
            "etcd://e1:2379,[::1]:2380"
        );
        assert!(etcd::supported(&etcd).is_ok());
        let with_login = AdminLogin {
            username: Some("root".into()),
            ..etcd
        };
        assert!(etcd::supported(&with_login).is_err());
    }
}
