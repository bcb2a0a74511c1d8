//! A throwaway PKI for mTLS tests: a CA, a server certificate for `localhost`/`127.0.0.1`,
//! and client certificates with the common names the test asks for.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};

/// PEM file paths of a CA, a server and clients.
pub struct Pki {
    pub ca: String,
    pub server_cert: String,
    pub server_key: String,
    /// (common name, certificate path, key path) per client.
    pub clients: Vec<(String, String, String)>,
}

impl Pki {
    /// kine-rs's flags for a gateway that creates tenants on first use, serving with this
    /// PKI's server certificate and trusting its CA (mTLS).
    pub fn gateway_args(&self) -> Vec<&str> {
        vec![
            "--gateway",
            "--gateway-create-tenants",
            "--server-cert-file",
            &self.server_cert,
            "--server-key-file",
            &self.server_key,
            "--trusted-ca-file",
            &self.ca,
        ]
    }

    /// Writes the PKI into `dir`, with one client certificate per common name.
    pub fn write(dir: &Path, client_names: &[&str]) -> Pki {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "kine-rs test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("ca key"))
            .expect("ca cert");
        let write = |name: &str, pem: String| {
            let path = dir.join(name);
            std::fs::write(&path, pem).expect("write pem");
            path.display().to_string()
        };
        let mut server =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("server params");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate().expect("server key");
        let server_cert = server.signed_by(&server_key, &ca).expect("server cert");
        let mut clients = Vec::new();
        for (i, name) in client_names.iter().enumerate() {
            let mut client = CertificateParams::new(Vec::<String>::new()).expect("client params");
            client.distinguished_name.push(DnType::CommonName, *name);
            client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            let key = KeyPair::generate().expect("client key");
            let cert = client.signed_by(&key, &ca).expect("client cert");
            clients.push((
                name.to_string(),
                write(&format!("client-{i}.pem"), cert.pem()),
                write(&format!("client-{i}-key.pem"), key.serialize_pem()),
            ));
        }
        Pki {
            ca: write("ca.pem", ca.pem()),
            server_cert: write("server.pem", server_cert.pem()),
            server_key: write("server-key.pem", server_key.serialize_pem()),
            clients,
        }
    }

    /// The certificate and key paths of client `name`.
    pub fn client(&self, name: &str) -> (&str, &str) {
        let (_, cert, key) = self
            .clients
            .iter()
            .find(|(n, _, _)| n == name)
            .unwrap_or_else(|| panic!("no client certificate for {name:?}"));
        (cert, key)
    }
}
