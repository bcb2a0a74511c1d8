//! The shared kine-rs gateway behind a `Gateway` DataStore (`kine-rs --gateway`, e.g. the
//! chart's): its addresses are the DataStore's `endpoints`, its CA is the DataStore's
//! `tlsConfig.certificateAuthority`. The controller manages tenants through the gateway's
//! tenant admin API (`kine.admin.v1.TenantAdmin`) over mTLS, as one of its
//! `--admin-identity` names: create with the quota, freeze/unfreeze, set the quota, delete.
//! Which database the gateway serves from is the gateway's business (its own `--endpoint`);
//! the controller never needs its credentials.

use std::time::Duration;

use kine_proto::kine::admin::v1::tenant_admin_client::TenantAdminClient;
use kine_proto::kine::admin::v1::{
    CreateTenantRequest, DeleteTenantRequest, FreezeTenantRequest, Quota as AdminQuota,
    SetQuotaRequest, TenantStatus, TenantStatusRequest, UnfreezeTenantRequest,
};
use kube::Client;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::certificates::{self, Authority};
use crate::crd::DataStore;
use crate::credentials::{self, Sensitive};

/// The admin identity the controller issues itself when the DataStore names none. Not a DNS
/// label (`:`), so no tenant, whose name is one, can be issued a certificate with it.
pub const DEFAULT_ADMIN_IDENTITY: &str = "system:kine-rs-controller";
/// The gateway's default port.
pub const DEFAULT_PORT: u16 = 2379;
/// How long the controller's own admin certificate lives (one is made per connection).
const ADMIN_CERTIFICATE_LIFETIME: Duration = Duration::from_secs(3600);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The tenant name the readiness check asks about (it need not exist).
const PROBE_TENANT: &str = "kine-rs-probe";

/// Why a gateway DataStore cannot be used: a condition reason and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub reason: &'static str,
    pub message: String,
}

impl Problem {
    fn new(reason: &'static str, message: impl Into<String>) -> Problem {
        Problem {
            reason,
            message: message.into(),
        }
    }
}

/// What the controller needs to reach a gateway and to issue its tenants' certificates.
#[derive(Debug)]
pub struct Gateway {
    pub datastore: String,
    pub authority: Authority,
    /// `host:port` of each gateway address.
    pub members: Vec<String>,
    /// How long tenants' client certificates live.
    pub lifetime: Duration,
    admin_certificate: String,
    admin_key: Sensitive,
}

async fn resolve_pair(
    client: &Client,
    what: &str,
    certificate: &crate::crd::ContentRef,
    key: Option<&crate::crd::ContentRef>,
) -> Result<(String, Sensitive), Problem> {
    let unavailable = |e: crate::Error| Problem::new("CredentialsUnavailable", e.to_string());
    let certificate = credentials::resolve(client, &format!("{what}.certificate"), certificate)
        .await
        .map_err(unavailable)?;
    let Some(key) = key else {
        return Err(Problem::new(
            "CertificateAuthorityInvalid",
            format!(
                "{what}.privateKey is required in Gateway mode (it signs tenants' certificates)"
            ),
        ));
    };
    let key = credentials::resolve(client, &format!("{what}.privateKey"), key)
        .await
        .map_err(unavailable)?;
    Ok((certificate.0, key))
}

impl Gateway {
    /// Reads a Gateway DataStore's CA, admin certificate and addresses.
    pub async fn of(client: &Client, store: &DataStore) -> Result<Gateway, Problem> {
        let datastore = kube::ResourceExt::name_any(store);
        let tls = store.spec.tls_config.clone().unwrap_or_default();
        let Some(ca) = &tls.certificate_authority else {
            return Err(Problem::new(
                "CertificateAuthorityInvalid",
                "Gateway mode needs tlsConfig.certificateAuthority (certificate and privateKey): \
                 the CA the gateway trusts, which signs tenants' client certificates",
            ));
        };
        let (ca_certificate, ca_key) = resolve_pair(
            client,
            "tlsConfig.certificateAuthority",
            &ca.certificate,
            ca.private_key.as_ref(),
        )
        .await?;
        let authority = Authority::load(&ca_certificate, &ca_key)
            .map_err(|e| Problem::new("CertificateAuthorityInvalid", e))?;
        let mut members = Vec::with_capacity(store.spec.endpoints.len());
        for endpoint in &store.spec.endpoints {
            let (host, port) = credentials::host_port(endpoint, DEFAULT_PORT)
                .map_err(|e| Problem::new("Unreachable", e.to_string()))?;
            members.push(credentials::join_host_port(&host, port));
        }
        if members.is_empty() {
            return Err(Problem::new("Unreachable", "spec.endpoints is empty"));
        }
        let settings = store.spec.gateway.clone().unwrap_or_default();
        let (admin_certificate, admin_key) = match &tls.client_certificate {
            Some(pair) => {
                resolve_pair(
                    client,
                    "tlsConfig.clientCertificate",
                    &pair.certificate,
                    Some(&pair.private_key),
                )
                .await?
            }
            None => {
                let identity = settings
                    .admin_identity
                    .clone()
                    .unwrap_or_else(|| DEFAULT_ADMIN_IDENTITY.to_string());
                let issued = authority
                    .issue(&identity, ADMIN_CERTIFICATE_LIFETIME)
                    .map_err(|e| Problem::new("CertificateAuthorityInvalid", e))?;
                (issued.certificate_pem, issued.key_pem)
            }
        };
        let lifetime = settings
            .certificate_lifetime_hours
            .map_or(certificates::DEFAULT_LIFETIME, |hours| {
                Duration::from_secs(u64::from(hours.max(1)) * 3600)
            });
        Ok(Gateway {
            datastore,
            authority,
            members,
            lifetime,
            admin_certificate,
            admin_key,
        })
    }

    /// kube-apiserver's `--etcd-servers`: every gateway address over https.
    pub fn etcd_servers(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("https://{m}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A client of the admin API on the first address that answers.
    async fn admin(&self) -> Result<TenantAdminClient<Channel>, String> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.authority.certificate_pem))
            .identity(Identity::from_pem(
                &self.admin_certificate,
                self.admin_key.expose(),
            ));
        let mut last = String::from("no address");
        for member in &self.members {
            let endpoint = Endpoint::from_shared(format!("https://{member}"))
                .map_err(|e| format!("{member}: {e}"))?
                .connect_timeout(CONNECT_TIMEOUT)
                .timeout(REQUEST_TIMEOUT)
                .tls_config(tls.clone())
                .map_err(|e| format!("TLS: {e}"))?;
            match endpoint.connect().await {
                Ok(channel) => return Ok(TenantAdminClient::new(channel)),
                Err(e) => last = format!("{member}: {e}"),
            }
        }
        Err(format!(
            "no gateway address of DataStore {} answers: {last}",
            self.datastore
        ))
    }

    /// Whether the gateway answers and lets the controller use its admin API.
    pub async fn check(&self) -> Result<(), Problem> {
        let mut admin = self
            .admin()
            .await
            .map_err(|e| Problem::new("Unreachable", e))?;
        match admin
            .tenant_status(TenantStatusRequest {
                name: PROBE_TENANT.to_string(),
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::NotFound => Ok(()),
            Err(status)
                if matches!(
                    status.code(),
                    Code::PermissionDenied | Code::Unauthenticated
                ) =>
            {
                Err(Problem::new(
                    "AdminAccessDenied",
                    format!(
                        "the gateway refuses the controller's admin certificate ({}); give the \
                         gateway --admin-identity {}",
                        status.message(),
                        self.admin_identity_hint()
                    ),
                ))
            }
            Err(status) => Err(Problem::new("Unreachable", describe(&status))),
        }
    }

    fn admin_identity_hint(&self) -> String {
        self.admin_identity()
            .unwrap_or_else(|| "<the certificate's CN>".to_string())
    }

    /// The common name of the controller's admin certificate.
    pub fn admin_identity(&self) -> Option<String> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(self.admin_certificate.as_bytes()).ok()?;
        let (_, cert) = x509_parser::parse_x509_certificate(&pem.contents).ok()?;
        let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
        Some(cn.to_string())
    }

    /// Creates the tenant if needed, and gives it `quota` and the freeze `frozen`; returns
    /// its status.
    pub async fn ensure_tenant(
        &self,
        tenant: &str,
        quota: kine::storage::Quota,
        frozen: bool,
    ) -> Result<TenantStatus, String> {
        let mut admin = self.admin().await?;
        let wanted = AdminQuota {
            keys: quota.keys,
            bytes: quota.bytes,
        };
        let status = match admin
            .create_tenant(CreateTenantRequest {
                name: tenant.to_string(),
                quota: Some(wanted),
            })
            .await
        {
            Ok(created) => created.into_inner(),
            Err(status) if status.code() == Code::AlreadyExists => admin
                .tenant_status(TenantStatusRequest {
                    name: tenant.to_string(),
                })
                .await
                .map_err(|s| format!("reading tenant {tenant}: {}", describe(&s)))?
                .into_inner(),
            Err(status) => {
                return Err(format!("creating tenant {tenant}: {}", describe(&status)));
            }
        };
        let mut status = status;
        if status.quota.unwrap_or_default() != wanted {
            status = admin
                .set_quota(SetQuotaRequest {
                    name: tenant.to_string(),
                    quota: Some(wanted),
                })
                .await
                .map_err(|s| format!("setting the quota of {tenant}: {}", describe(&s)))?
                .into_inner();
        }
        if status.frozen != frozen {
            let name = tenant.to_string();
            status = if frozen {
                admin.freeze_tenant(FreezeTenantRequest { name }).await
            } else {
                admin.unfreeze_tenant(UnfreezeTenantRequest { name }).await
            }
            .map_err(|s| format!("setting the freeze of {tenant}: {}", describe(&s)))?
            .into_inner();
        }
        Ok(status)
    }

    /// Deletes the tenant with its data (ending its open watches); whether it existed.
    pub async fn delete_tenant(&self, tenant: &str) -> Result<bool, String> {
        let mut admin = self.admin().await?;
        match admin
            .delete_tenant(DeleteTenantRequest {
                name: tenant.to_string(),
                force: true,
            })
            .await
        {
            Ok(response) => Ok(response.into_inner().deleted),
            Err(status) if status.code() == Code::NotFound => Ok(false),
            Err(status) => Err(format!("deleting tenant {tenant}: {}", describe(&status))),
        }
    }
}

/// A gRPC error as a message: its code and the server's message (no credentials: the
/// admin API's messages name tenants only).
fn describe(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}
