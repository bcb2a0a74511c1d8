//! The gRPC layer: etcd's services over a [`ServedTenant`], kept apart from the storage
//! layer and unaware of which kind of datastore serves the tenant. Each service resolves the
//! caller's tenant, calls it, and converts errors through the single `KineError` → `Status`
//! mapping.

pub mod admin;
pub mod cluster;
pub mod kv;
pub mod lease;
pub mod maintenance;
pub mod range_stream;
pub mod watch;

use std::future::Future;
use std::sync::Arc;

use tonic::Status;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::IdentitySource;
use crate::served::{ServedTenant, TenantDirectory};
use crate::tenants::validate_name;

/// Finds the keyspace a request is for: always the same one in sidecar mode; in gateway mode,
/// the tenant named by the client's verified certificate.
#[derive(Clone)]
pub struct Tenancy {
    mode: Arc<Mode>,
}

enum Mode {
    Single(Arc<dyn ServedTenant>),
    Gateway {
        tenants: Arc<dyn TenantDirectory>,
        source: IdentitySource,
        create: bool,
    },
}

impl Tenancy {
    /// Every request goes to `keyspace`.
    pub fn single(keyspace: Arc<dyn ServedTenant>) -> Self {
        Tenancy {
            mode: Arc::new(Mode::Single(keyspace)),
        }
    }

    /// Each request goes to the tenant its client certificate names (`source`); unknown
    /// tenants are refused, or created when `create`.
    pub fn gateway(
        tenants: Arc<dyn TenantDirectory>,
        source: IdentitySource,
        create: bool,
    ) -> Self {
        Tenancy {
            mode: Arc::new(Mode::Gateway {
                tenants,
                source,
                create,
            }),
        }
    }

    /// The tenant `request` is for. The identity is read from the request before the
    /// returned future runs, so the future does not borrow the request.
    pub fn keyspace<T>(
        &self,
        request: &tonic::Request<T>,
    ) -> impl Future<Output = Result<Arc<dyn ServedTenant>, Status>> + Send + 'static {
        let mode = self.mode.clone();
        let identity = match &*mode {
            Mode::Single(_) => Ok(String::new()),
            Mode::Gateway { source, .. } => tenant_identity(request, *source),
        };
        async move {
            match &*mode {
                Mode::Single(keyspace) => Ok(keyspace.clone()),
                Mode::Gateway {
                    tenants, create, ..
                } => {
                    let tenant = identity?;
                    if let Err(reason) = validate_name(&tenant) {
                        return Err(Status::permission_denied(format!(
                            "kine-rs: the client certificate names no valid tenant: {reason}"
                        )));
                    }
                    match tenants.get(&tenant, *create).await {
                        Ok(Some(keyspace)) => Ok(keyspace),
                        Ok(None) => Err(Status::permission_denied(format!(
                            "kine-rs: tenant {tenant:?} does not exist"
                        ))),
                        Err(error) => Err(error.into()),
                    }
                }
            }
        }
    }
}

/// The verified client certificate of a request (tonic verified it against
/// `--trusted-ca-file` during the TLS handshake), DER-encoded.
fn client_certificate<T>(request: &tonic::Request<T>) -> Option<Vec<u8>> {
    let certs = request.peer_certs()?;
    certs.first().map(|cert| cert.as_ref().to_vec())
}

/// The tenant named by the client certificate of `request`.
fn tenant_identity<T>(
    request: &tonic::Request<T>,
    source: IdentitySource,
) -> Result<String, Status> {
    let der = client_certificate(request).ok_or_else(|| {
        Status::permission_denied("kine-rs: a client certificate is required to name the tenant")
    })?;
    let (_, cert) = X509Certificate::from_der(&der)
        .map_err(|_| Status::permission_denied("kine-rs: unreadable client certificate"))?;
    let name = match source {
        IdentitySource::Cn => cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string),
        IdentitySource::Dns | IdentitySource::Uri | IdentitySource::Email => {
            alternative_names(&cert)
                .into_iter()
                .find_map(|(kind, name)| {
                    let wanted = matches!(
                        (source, kind),
                        (IdentitySource::Dns, NameKind::Dns)
                            | (IdentitySource::Uri, NameKind::Uri)
                            | (IdentitySource::Email, NameKind::Email)
                    );
                    wanted.then_some(name)
                })
        }
    };
    name.ok_or_else(|| {
        Status::permission_denied(format!(
            "kine-rs: the client certificate has no {} to name the tenant",
            match source {
                IdentitySource::Cn => "common name",
                IdentitySource::Dns => "DNS subject alternative name",
                IdentitySource::Uri => "URI subject alternative name",
                IdentitySource::Email => "email subject alternative name",
            }
        ))
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NameKind {
    Dns,
    Uri,
    Email,
}

fn alternative_names(cert: &X509Certificate<'_>) -> Vec<(NameKind, String)> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(n) => Some((NameKind::Dns, n.to_string())),
            GeneralName::URI(n) => Some((NameKind::Uri, n.to_string())),
            GeneralName::RFC822Name(n) => Some((NameKind::Email, n.to_string())),
            _ => None,
        })
        .collect()
}

/// Every name of the client certificate of `request` (common names and DNS, URI and email
/// alternative names); empty without a verified certificate.
pub fn certificate_names<T>(request: &tonic::Request<T>) -> Vec<String> {
    let Some(der) = client_certificate(request) else {
        return Vec::new();
    };
    let Ok((_, cert)) = X509Certificate::from_der(&der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_string))
        .collect();
    names.extend(alternative_names(&cert).into_iter().map(|(_, name)| name));
    names
}
