//! Client certificates for gateway mode: the DataStore's CA (`tlsConfig.certificateAuthority`,
//! certificate and private key) signs one client certificate per tenant, its common name the
//! tenant (what the kine-rs gateway reads as the tenant, `--gateway-identity cn`), and one for
//! the controller itself (CN = the gateway's `--admin-identity`), to call the admin API.
//!
//! A tenant's certificate is re-issued once two thirds of its lifetime have passed, when it
//! was not signed by the current CA, or names another tenant ([`renewal`]). Keys are ECDSA
//! P-256, generated here, and only ever written to the tenant's Secret.

use std::time::Duration;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use time::OffsetDateTime;

use crate::credentials::Sensitive;

/// Default lifetime of tenants' client certificates: 90 days.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
/// How far back `notBefore` is set, for clocks a little behind.
const BACKDATE: Duration = Duration::from_secs(300);

/// The CA of a gateway DataStore.
pub struct Authority {
    /// The CA certificate, PEM (what clients verify the gateway with, `ca.crt`).
    pub certificate_pem: String,
    issuer: Issuer<'static, KeyPair>,
    der: Vec<u8>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").finish_non_exhaustive()
    }
}

/// A certificate issued to a client, and its key.
#[derive(Clone, Debug)]
pub struct Issued {
    pub certificate_pem: String,
    pub key_pem: Sensitive,
    pub not_after: OffsetDateTime,
}

fn first_der(pem: &str) -> Result<Vec<u8>, String> {
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| format!("not a PEM certificate: {e}"))?;
    if parsed.label != "CERTIFICATE" {
        return Err(format!("a PEM {:?}, not a CERTIFICATE", parsed.label));
    }
    Ok(parsed.contents)
}

/// A private key from PEM: PKCS#8, or PKCS#1 RSA (wrapped into PKCS#8 here).
fn read_key(key_pem: &Sensitive) -> Result<KeyPair, String> {
    let unreadable = |why: String| format!("the CA's private key cannot be read: {why}");
    let (_, pem) = x509_parser::pem::parse_x509_pem(key_pem.expose().as_bytes())
        .map_err(|_| unreadable("not PEM".into()))?;
    let pkcs8 = match pem.label.as_str() {
        "PRIVATE KEY" => pem.contents,
        "RSA PRIVATE KEY" => rsa_pkcs1_to_pkcs8(&pem.contents),
        other => {
            return Err(unreadable(format!(
                "a PEM {other:?}; give a PKCS#8 \"PRIVATE KEY\" or an \"RSA PRIVATE KEY\""
            )));
        }
    };
    KeyPair::try_from(pkcs8.as_slice()).map_err(|e| unreadable(e.to_string()))
}

/// DER length octets.
fn der_length(len: usize, out: &mut Vec<u8>) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
}

/// PKCS#8 `PrivateKeyInfo` around a PKCS#1 `RSAPrivateKey`: version 0, rsaEncryption with
/// NULL parameters, the key as an OCTET STRING.
fn rsa_pkcs1_to_pkcs8(pkcs1: &[u8]) -> Vec<u8> {
    const VERSION: &[u8] = &[0x02, 0x01, 0x00];
    const RSA_ENCRYPTION: &[u8] = &[
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut octets = vec![0x04];
    der_length(pkcs1.len(), &mut octets);
    octets.extend_from_slice(pkcs1);
    let mut out = vec![0x30];
    der_length(
        VERSION.len() + RSA_ENCRYPTION.len() + octets.len(),
        &mut out,
    );
    out.extend_from_slice(VERSION);
    out.extend_from_slice(RSA_ENCRYPTION);
    out.extend(octets);
    out
}

impl Authority {
    /// The CA from its certificate and private key (PEM; the key PKCS#8 `PRIVATE KEY`, as
    /// openssl writes by default, or PKCS#1 `RSA PRIVATE KEY`, as Helm's `genCA` writes).
    pub fn load(certificate_pem: &str, key_pem: &Sensitive) -> Result<Authority, String> {
        let key = read_key(key_pem)?;
        let der = first_der(certificate_pem).map_err(|e| format!("the CA certificate: {e}"))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| format!("the CA certificate cannot be parsed: {e}"))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err("the CA's private key does not belong to its certificate".into());
        }
        if !parsed.is_ca() {
            return Err("the CA certificate is not a CA (basicConstraints CA:TRUE)".into());
        }
        let issuer = Issuer::from_ca_cert_der(&der.clone().into(), key)
            .map_err(|e| format!("the CA certificate cannot be used to sign: {e}"))?;
        Ok(Authority {
            certificate_pem: certificate_pem.to_string(),
            issuer,
            der,
        })
    }

    /// Issues a client certificate with common name `name`, valid for `lifetime` from now.
    pub fn issue(&self, name: &str, lifetime: Duration) -> Result<Issued, String> {
        let key = KeyPair::generate().map_err(|e| format!("generating a key: {e}"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let serial: [u8; 16] = rand::random();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + lifetime;
        let certificate = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| format!("signing a certificate for {name}: {e}"))?;
        Ok(Issued {
            certificate_pem: certificate.pem(),
            key_pem: Sensitive(key.serialize_pem()),
            not_after: params.not_after,
        })
    }
}

/// What to do with a tenant's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewal {
    /// Keep it; re-check at this time (two thirds of its lifetime).
    Keep { renew_at: i64, not_after: i64 },
    /// Issue a new one, for this reason.
    Issue(String),
}

/// Whether `certificate_pem` (a tenant's current certificate) may be kept: signed by
/// `authority`, common name `name`, and not past two thirds of its lifetime at `now` (Unix
/// seconds).
pub fn renewal(
    authority: &Authority,
    certificate_pem: Option<&str>,
    name: &str,
    now: i64,
) -> Renewal {
    let Some(pem) = certificate_pem else {
        return Renewal::Issue("no certificate yet".into());
    };
    let der = match first_der(pem) {
        Ok(der) => der,
        Err(e) => return Renewal::Issue(format!("the current certificate: {e}")),
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
        return Renewal::Issue("the current certificate cannot be parsed".into());
    };
    let Ok((_, ca)) = x509_parser::parse_x509_certificate(&authority.der) else {
        return Renewal::Issue("the CA certificate cannot be parsed".into());
    };
    if cert.verify_signature(Some(ca.public_key())).is_err() {
        return Renewal::Issue("the current certificate was not signed by the CA".into());
    }
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok());
    if common_name != Some(name) {
        return Renewal::Issue(format!("the current certificate is not for {name}"));
    }
    let not_before = cert.validity().not_before.timestamp();
    let not_after = cert.validity().not_after.timestamp();
    let renew_at = not_before + (not_after - not_before) * 2 / 3;
    if now >= renew_at {
        return Renewal::Issue("two thirds of its lifetime have passed".into());
    }
    Renewal::Keep {
        renew_at,
        not_after,
    }
}

/// RFC 3339 of a Unix time (seconds), for status.
pub fn rfc3339(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> (String, Sensitive) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "test CA");
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("CA");
        (cert.pem(), Sensitive(key.serialize_pem()))
    }

    #[test]
    fn issues_and_renews_at_two_thirds() {
        let (cert, key) = ca();
        let authority = Authority::load(&cert, &key).expect("authority");
        let issued = authority
            .issue("tenant-a", Duration::from_secs(3 * 3600))
            .expect("issue");
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let Renewal::Keep {
            renew_at,
            not_after,
        } = renewal(&authority, Some(&issued.certificate_pem), "tenant-a", now)
        else {
            panic!("a fresh certificate is kept");
        };
        assert_eq!(not_after, issued.not_after.unix_timestamp());
        // notBefore is 5 minutes back: two thirds of (3 h + 5 min) from there.
        assert_eq!(renew_at, not_after - (3 * 3600 + 300) / 3);
        assert!(matches!(
            renewal(
                &authority,
                Some(&issued.certificate_pem),
                "tenant-a",
                renew_at
            ),
            Renewal::Issue(_)
        ));
        assert!(matches!(
            renewal(&authority, Some(&issued.certificate_pem), "tenant-b", now),
            Renewal::Issue(_)
        ));
        assert!(matches!(
            renewal(&authority, None, "tenant-a", now),
            Renewal::Issue(_)
        ));
        // Another CA: re-issued.
        let (other_cert, other_key) = ca();
        let other = Authority::load(&other_cert, &other_key).expect("other");
        assert!(matches!(
            renewal(&other, Some(&issued.certificate_pem), "tenant-a", now),
            Renewal::Issue(why) if why.contains("not signed by the CA")
        ));
    }

    #[test]
    fn der_lengths() {
        let mut out = Vec::new();
        der_length(5, &mut out);
        der_length(200, &mut out);
        der_length(1200, &mut out);
        assert_eq!(out, [5, 0x81, 200, 0x82, 0x04, 0xb0]);
    }

    #[test]
    fn refuses_a_key_of_another_certificate_and_a_leaf() {
        let (cert, _) = ca();
        let (_, other_key) = ca();
        let err = Authority::load(&cert, &other_key).expect_err("mismatch");
        assert!(err.contains("does not belong"), "{err}");
        let (cert, key) = ca();
        let authority = Authority::load(&cert, &key).expect("authority");
        let leaf = authority.issue("x", DEFAULT_LIFETIME).expect("leaf");
        let err = Authority::load(&leaf.certificate_pem, &leaf.key_pem).expect_err("leaf");
        assert!(err.contains("not a CA"), "{err}");
        assert!(Authority::load("junk", &key).is_err());
        assert!(!format!("{leaf:?}").contains("PRIVATE KEY"));
    }
}
