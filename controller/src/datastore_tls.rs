//! TLS towards a Sidecar-mode DataStore's server (Kamaji's `tlsConfig`):
//! `certificateAuthority.certificate` verifies the server (required once `tlsConfig` is
//! set), `clientCertificate` authenticates to it (optional). Used three ways:
//! * the controller's own connections: inline PEM for its SQL connections, files (written
//!   once per content under the temporary directory, mode 0600) for the kine-rs library;
//! * the sidecar: the PEMs go into the binding's Secret ([`SECRET_KEYS`]), mounted at
//!   [`MOUNT_DIR`], and kine-rs gets `--ca-file`/`--cert-file`/`--key-file`: PostgreSQL and
//!   MySQL then verify the server's name (verify-full) unless the endpoint sets its own
//!   sslmode; NATS and etcd use TLS.

use std::collections::BTreeMap;
use std::path::PathBuf;

use kine::storage::TlsFiles;
use kube::Client;
use sha2::{Digest, Sha256};

use crate::crd::DataStore;
use crate::credentials::{self, Sensitive};
use crate::error::{Error, Result};

/// Where the sidecar finds the files.
pub const MOUNT_DIR: &str = "/etc/kine-rs/datastore-tls";
/// The Secret keys (and file names) of the CA, the client certificate and its key.
pub const CA_KEY: &str = "datastore-ca.crt";
pub const CERT_KEY: &str = "datastore-client.crt";
pub const KEY_KEY: &str = "datastore-client.key";
pub const SECRET_KEYS: [&str; 3] = [CA_KEY, CERT_KEY, KEY_KEY];

/// The PEMs of a DataStore's `tlsConfig`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatastoreTls {
    pub ca: String,
    pub client: Option<(String, Sensitive)>,
}

/// The DataStore's TLS settings (none: plain connections).
pub async fn resolve(client: &Client, store: &DataStore) -> Result<Option<DatastoreTls>> {
    let Some(tls) = &store.spec.tls_config else {
        return Ok(None);
    };
    let Some(ca) = &tls.certificate_authority else {
        return Err(Error::Invalid(
            "tlsConfig needs certificateAuthority.certificate (the CA that verifies the \
             datastore's server certificate)"
                .into(),
        ));
    };
    let ca = credentials::resolve(
        client,
        "tlsConfig.certificateAuthority.certificate",
        &ca.certificate,
    )
    .await?
    .0;
    let client_pair = match &tls.client_certificate {
        Some(pair) => Some((
            credentials::resolve(
                client,
                "tlsConfig.clientCertificate.certificate",
                &pair.certificate,
            )
            .await?
            .0,
            credentials::resolve(
                client,
                "tlsConfig.clientCertificate.privateKey",
                &pair.private_key,
            )
            .await?,
        )),
        None => None,
    };
    for (what, pem) in [
        ("certificateAuthority.certificate", Some(&ca)),
        (
            "clientCertificate.certificate",
            client_pair.as_ref().map(|(c, _)| c),
        ),
    ] {
        if let Some(pem) = pem
            && !pem.contains("-----BEGIN CERTIFICATE-----")
        {
            return Err(Error::Invalid(format!(
                "tlsConfig.{what} is not a PEM certificate"
            )));
        }
    }
    Ok(Some(DatastoreTls {
        ca,
        client: client_pair,
    }))
}

impl DatastoreTls {
    /// Files with the PEMs, for the kine-rs library (which takes paths): one private
    /// directory per content, written once.
    pub fn files(&self) -> Result<TlsFiles, String> {
        let mut hash = Sha256::new();
        hash.update(self.ca.as_bytes());
        if let Some((cert, key)) = &self.client {
            hash.update(cert.as_bytes());
            hash.update(key.expose().as_bytes());
        }
        let dir: PathBuf = std::env::temp_dir()
            .join("kine-rs-controller-tls")
            .join(&hex::encode(hash.finalize())[..16]);
        let write = |name: &str, text: &str| -> Result<String, String> {
            use std::io::Write;
            use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            let path = dir.join(name);
            if std::fs::read(&path).ok().as_deref() != Some(text.as_bytes()) {
                let partial = dir.join(format!(".{name}.partial"));
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&partial)
                    .map_err(|e| format!("cannot write {}: {e}", partial.display()))?;
                file.write_all(text.as_bytes())
                    .map_err(|e| format!("cannot write {}: {e}", partial.display()))?;
                std::fs::rename(&partial, &path)
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            }
            Ok(path.display().to_string())
        };
        let ca_file = Some(write(CA_KEY, &self.ca)?);
        let (cert_file, key_file) = match &self.client {
            Some((cert, key)) => (
                Some(write(CERT_KEY, cert)?),
                Some(write(KEY_KEY, key.expose())?),
            ),
            None => (None, None),
        };
        Ok(TlsFiles {
            ca_file,
            cert_file,
            key_file,
        })
    }

    /// What the binding's Secret holds for the sidecar.
    pub fn secret_data(&self) -> BTreeMap<String, Sensitive> {
        let mut data = BTreeMap::from([(CA_KEY.to_string(), Sensitive(self.ca.clone()))]);
        if let Some((cert, key)) = &self.client {
            data.insert(CERT_KEY.to_string(), Sensitive(cert.clone()));
            data.insert(KEY_KEY.to_string(), key.clone());
        }
        data
    }

    /// The sidecar's kine-rs flags (files under [`MOUNT_DIR`]).
    pub fn sidecar_args(&self) -> Vec<String> {
        let mut args = vec![format!("--ca-file={MOUNT_DIR}/{CA_KEY}")];
        if self.client.is_some() {
            args.push(format!("--cert-file={MOUNT_DIR}/{CERT_KEY}"));
            args.push(format!("--key-file={MOUNT_DIR}/{KEY_KEY}"));
        }
        args
    }

    /// The Secret keys the sidecar mounts.
    pub fn mounted_keys(&self) -> Vec<&'static str> {
        if self.client.is_some() {
            SECRET_KEYS.to_vec()
        } else {
            vec![CA_KEY]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_private_and_written_once() {
        let tls = DatastoreTls {
            ca: "-----BEGIN CERTIFICATE-----\nca\n".into(),
            client: Some((
                "-----BEGIN CERTIFICATE-----\nc\n".into(),
                Sensitive("k".into()),
            )),
        };
        let files = tls.files().expect("files");
        let key = files.key_file.clone().expect("key file");
        assert_eq!(std::fs::read_to_string(&key).ok().as_deref(), Some("k"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(tls.files().expect("again").ca_file, files.ca_file);
        assert_eq!(
            tls.sidecar_args(),
            [
                "--ca-file=/etc/kine-rs/datastore-tls/datastore-ca.crt",
                "--cert-file=/etc/kine-rs/datastore-tls/datastore-client.crt",
                "--key-file=/etc/kine-rs/datastore-tls/datastore-client.key",
            ]
        );
        assert!(!format!("{tls:?}").contains("\"k\""));
        let ca_only = DatastoreTls {
            client: None,
            ..tls
        };
        assert_eq!(ca_only.sidecar_args().len(), 1);
        assert_eq!(ca_only.secret_data().len(), 1);
    }
}
