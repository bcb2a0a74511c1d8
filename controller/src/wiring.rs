//! Wiring a tenant kube-apiserver workload to kine-rs: a kine-rs sidecar container in its
//! pod, serving on a unix socket in a memory `emptyDir` shared with kube-apiserver, whose
//! `--etcd-servers` points at that socket; the sidecar's endpoint and tenant come from the
//! binding's Secret (env `KINE_ENDPOINT`, `KINE_TENANT`), and a checksum annotation on the
//! pod template rolls the pods when the connection or the sidecar changes.
//!
//! In gateway mode there is no sidecar: kube-apiserver's `--etcd-servers` are the gateway's
//! addresses (`https://…`), and `--etcd-cafile/--etcd-certfile/--etcd-keyfile` the CA and
//! the tenant's client certificate, from the binding's Secret mounted at [`TLS_DIR`]. A
//! re-issued certificate does not roll the pods: the kubelet refreshes the mounted Secret and
//! kube-apiserver's etcd client reads the key pair again at each new connection; the checksum
//! covers the addresses, the tenant and the CA.
//!
//! The workload is changed by server-side apply with the field manager
//! [`WIRING_MANAGER`], forced: the kube-apiserver container's `args` is an atomic list, so
//! the controller takes it over whole (it keeps every argument except the etcd connection
//! ones, `--etcd-servers`, `--etcd-cafile`, `--etcd-certfile`, `--etcd-keyfile`). Arguments
//! given in `command` rather than `args` are not rewritten.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, EnvVar, EnvVarSource, PodSpec, ResourceRequirements, SecretKeySelector,
    SecurityContext, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::crd::WorkloadKind;
use crate::credentials::Sensitive;
use crate::datastore_tls::{self, DatastoreTls};

/// Where the socket lives, in both containers.
pub const SOCKET_DIR: &str = "/run/kine-rs";
/// The socket's file name.
pub const SOCKET_FILE: &str = "kine.sock";
/// The shared memory volume.
pub const SOCKET_VOLUME: &str = "kine-rs-socket";
/// The sidecar container's name.
pub const SIDECAR_NAME: &str = "kine-rs";
/// The pod template annotation that changes with the configuration.
pub const CHECKSUM_ANNOTATION: &str = "kine-rs.io/config-checksum";
/// The field manager of the workload patch.
pub const WIRING_MANAGER: &str = "kine-rs-controller-wiring";
/// The Secret keys the sidecar reads.
pub const SECRET_ENDPOINT_KEY: &str = "endpoint";
pub const SECRET_TENANT_KEY: &str = "tenant";
/// Gateway mode: the Secret volume with the CA and the tenant's certificate.
pub const TLS_VOLUME: &str = "kine-rs-tls";
/// Where it is mounted in the kube-apiserver container.
pub const TLS_DIR: &str = "/etc/kine-rs/tls";
/// The Secret keys of the CA, the tenant's certificate and its key.
pub const SECRET_CA_KEY: &str = "ca.crt";
pub const SECRET_CERT_KEY: &str = "tls.crt";
pub const SECRET_KEY_KEY: &str = "tls.key";

/// The kube-apiserver flags the wiring replaces.
const ETCD_FLAGS: &[&str] = &[
    "--etcd-servers",
    "--etcd-cafile",
    "--etcd-certfile",
    "--etcd-keyfile",
];

/// The sidecar's image and resources (the controller's flags; the chart's values).
#[derive(Clone, Debug)]
pub struct SidecarSettings {
    pub image: String,
    pub image_pull_policy: String,
    pub cpu_request: String,
    pub memory_request: String,
    pub memory_limit: String,
    /// More kine-rs flags for every sidecar.
    pub extra_args: Vec<String>,
}

impl Default for SidecarSettings {
    fn default() -> Self {
        SidecarSettings {
            image: "ghcr.io/kine-rs/kine-rs:latest".into(),
            image_pull_policy: "IfNotPresent".into(),
            cpu_request: "50m".into(),
            memory_request: "64Mi".into(),
            memory_limit: "256Mi".into(),
            extra_args: Vec::new(),
        }
    }
}

/// `unix://` URL of the socket.
pub fn etcd_servers() -> String {
    format!("unix://{SOCKET_DIR}/{SOCKET_FILE}")
}

/// kube-apiserver's arguments with the etcd connection pointed at the sidecar.
pub fn apiserver_args(existing: &[String]) -> Vec<String> {
    replace_etcd_args(existing, &[format!("--etcd-servers={}", etcd_servers())])
}

/// kube-apiserver's etcd arguments in gateway mode: the gateway's addresses and the files of
/// the mounted Secret.
pub fn gateway_etcd_args(servers: &str) -> Vec<String> {
    vec![
        format!("--etcd-servers={servers}"),
        format!("--etcd-cafile={TLS_DIR}/{SECRET_CA_KEY}"),
        format!("--etcd-certfile={TLS_DIR}/{SECRET_CERT_KEY}"),
        format!("--etcd-keyfile={TLS_DIR}/{SECRET_KEY_KEY}"),
    ]
}

/// `existing` without its etcd connection arguments, then `etcd`.
pub fn replace_etcd_args(existing: &[String], etcd: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(existing.len() + 1);
    let mut skip_value = false;
    for arg in existing {
        if skip_value {
            skip_value = false;
            continue;
        }
        let name = arg.split('=').next().unwrap_or(arg);
        if ETCD_FLAGS.contains(&name) {
            // `--flag value` takes the next argument too.
            skip_value = !arg.contains('=');
            continue;
        }
        out.push(arg.clone());
    }
    out.extend(etcd.iter().cloned());
    out
}

fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.to_string(),
                key: key.to_string(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The sidecar's volume of the datastore's TLS files (from the binding's Secret).
pub const DATASTORE_TLS_VOLUME: &str = "kine-rs-datastore-tls";

/// The sidecar container (with `tls`: kine-rs's TLS flags and the files' volume).
pub fn sidecar_container(
    settings: &SidecarSettings,
    secret: &str,
    tls: Option<&DatastoreTls>,
) -> Container {
    let mut args = vec![format!("--listen-address={}", etcd_servers())];
    let mut mounts = vec![VolumeMount {
        name: SOCKET_VOLUME.to_string(),
        mount_path: SOCKET_DIR.to_string(),
        ..Default::default()
    }];
    let env = vec![
        secret_env("KINE_ENDPOINT", secret, SECRET_ENDPOINT_KEY),
        secret_env("KINE_TENANT", secret, SECRET_TENANT_KEY),
    ];
    if let Some(tls) = tls {
        args.extend(tls.sidecar_args());
        mounts.push(VolumeMount {
            name: DATASTORE_TLS_VOLUME.to_string(),
            mount_path: datastore_tls::MOUNT_DIR.to_string(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    args.extend(settings.extra_args.iter().cloned());
    let quantity = |q: &str| Quantity(q.to_string());
    Container {
        name: SIDECAR_NAME.to_string(),
        image: Some(settings.image.clone()),
        image_pull_policy: Some(settings.image_pull_policy.clone()),
        args: Some(args),
        env: Some(env),
        volume_mounts: Some(mounts),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), quantity(&settings.cpu_request)),
                ("memory".to_string(), quantity(&settings.memory_request)),
            ])),
            limits: Some(BTreeMap::from([(
                "memory".to_string(),
                quantity(&settings.memory_limit),
            )])),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A checksum of what the pod's kine-rs runs with (its Secret's data: endpoint, tenant,
/// TLS files; and its container).
pub fn checksum(data: &BTreeMap<String, Sensitive>, sidecar: &Container) -> String {
    let mut hash = Sha256::new();
    for (key, value) in data {
        hash.update(key.as_bytes());
        hash.update([0]);
        hash.update(value.expose().as_bytes());
        hash.update([0]);
    }
    hash.update(serde_json::to_vec(sidecar).unwrap_or_default());
    hex::encode(hash.finalize())
}

/// A checksum of what a gateway-wired pod connects with (addresses, tenant, CA).
pub fn gateway_checksum(servers: &str, tenant: &str, ca_pem: &str) -> String {
    let mut hash = Sha256::new();
    for part in [servers, tenant, ca_pem] {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    hex::encode(hash.finalize())
}

/// The workload being wired and its kube-apiserver container.
#[derive(Clone, Copy, Debug)]
pub struct WorkloadRef<'a> {
    pub kind: WorkloadKind,
    pub name: &'a str,
    pub namespace: &'a str,
    /// The kube-apiserver container's name.
    pub container: &'a str,
}

impl WorkloadRef<'_> {
    fn kind(&self) -> &'static str {
        match self.kind {
            WorkloadKind::Deployment => "Deployment",
            WorkloadKind::StatefulSet => "StatefulSet",
        }
    }
}

/// The server-side apply body for a workload wired to a gateway: kube-apiserver's
/// arguments and the Secret volume; no sidecar (one this field manager added before goes).
pub fn gateway_patch(
    workload: WorkloadRef<'_>,
    args: &[String],
    secret: &str,
    checksum: &str,
) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": workload.kind(),
        "metadata": { "name": workload.name, "namespace": workload.namespace },
        "spec": {
            "template": {
                "metadata": { "annotations": { CHECKSUM_ANNOTATION: checksum } },
                "spec": {
                    "containers": [
                        {
                            "name": workload.container,
                            "args": args,
                            "volumeMounts": [
                                { "name": TLS_VOLUME, "mountPath": TLS_DIR, "readOnly": true }
                            ]
                        }
                    ],
                    "volumes": [
                        {
                            "name": TLS_VOLUME,
                            "secret": {
                                "secretName": secret,
                                "defaultMode": 0o440,
                                "items": [
                                    { "key": SECRET_CA_KEY, "path": SECRET_CA_KEY },
                                    { "key": SECRET_CERT_KEY, "path": SECRET_CERT_KEY },
                                    { "key": SECRET_KEY_KEY, "path": SECRET_KEY_KEY }
                                ]
                            }
                        }
                    ]
                }
            }
        }
    })
}

/// The kube-apiserver container of a pod: `wanted`, else the one named `kube-apiserver`,
/// else the first (never the sidecar).
pub fn apiserver_container<'a>(
    pod: &'a PodSpec,
    wanted: Option<&str>,
) -> Result<&'a Container, String> {
    let containers = &pod.containers;
    let found = match wanted {
        Some(name) => containers.iter().find(|c| c.name == name),
        None => containers
            .iter()
            .find(|c| c.name == "kube-apiserver")
            .or_else(|| containers.iter().find(|c| c.name != SIDECAR_NAME)),
    };
    found.ok_or_else(|| match wanted {
        Some(name) => format!("has no container named {name:?}"),
        None => "has no container".to_string(),
    })
}

/// The server-side apply body for the workload.
pub fn workload_patch(
    workload: WorkloadRef<'_>,
    args: &[String],
    sidecar: &Container,
    secret: &str,
    tls_keys: &[&str],
    checksum: &str,
) -> Value {
    let mut volumes = vec![json!({ "name": SOCKET_VOLUME, "emptyDir": { "medium": "Memory" } })];
    if !tls_keys.is_empty() {
        let items: Vec<Value> = tls_keys
            .iter()
            .map(|k| json!({ "key": k, "path": k }))
            .collect();
        volumes.push(json!({
            "name": DATASTORE_TLS_VOLUME,
            "secret": { "secretName": secret, "defaultMode": 0o440, "items": items }
        }));
    }
    json!({
        "apiVersion": "apps/v1",
        "kind": workload.kind(),
        "metadata": { "name": workload.name, "namespace": workload.namespace },
        "spec": {
            "template": {
                "metadata": { "annotations": { CHECKSUM_ANNOTATION: checksum } },
                "spec": {
                    "containers": [
                        {
                            "name": workload.container,
                            "args": args,
                            "volumeMounts": [
                                { "name": SOCKET_VOLUME, "mountPath": SOCKET_DIR }
                            ]
                        },
                        sidecar
                    ],
                    "volumes": volumes
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apiserver_args_point_at_the_socket() {
        let args: Vec<String> = [
            "--secure-port=6443",
            "--etcd-servers=https://old:2379",
            "--etcd-cafile",
            "/ca.crt",
            "--etcd-prefix=/registry",
            "--etcd-certfile=/c",
            "--etcd-keyfile=/k",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            apiserver_args(&args),
            [
                "--secure-port=6443",
                "--etcd-prefix=/registry",
                "--etcd-servers=unix:///run/kine-rs/kine.sock"
            ]
        );
        // Idempotent.
        let once = apiserver_args(&args);
        assert_eq!(apiserver_args(&once), once);
    }

    #[test]
    fn gateway_args_name_the_gateway_and_the_mounted_files() {
        let sidecar_wired = apiserver_args(&["--secure-port=6443".to_string()]);
        let args = replace_etcd_args(&sidecar_wired, &gateway_etcd_args("https://gw:2379"));
        assert_eq!(
            args,
            [
                "--secure-port=6443",
                "--etcd-servers=https://gw:2379",
                "--etcd-cafile=/etc/kine-rs/tls/ca.crt",
                "--etcd-certfile=/etc/kine-rs/tls/tls.crt",
                "--etcd-keyfile=/etc/kine-rs/tls/tls.key",
            ]
        );
        assert_eq!(
            replace_etcd_args(&args, &gateway_etcd_args("https://gw:2379")),
            args
        );
        let workload = WorkloadRef {
            kind: WorkloadKind::Deployment,
            name: "api",
            namespace: "ns",
            container: "kube-apiserver",
        };
        let patch = gateway_patch(workload, &args, "b-kine-rs", "sum");
        let pod = &patch["spec"]["template"]["spec"];
        assert_eq!(pod["containers"].as_array().map(Vec::len), Some(1));
        assert_eq!(pod["volumes"][0]["secret"]["secretName"], "b-kine-rs");
        assert_ne!(
            gateway_checksum("https://gw:2379", "t", "ca1"),
            gateway_checksum("https://gw:2379", "t", "ca2")
        );
    }

    #[test]
    fn the_checksum_follows_the_configuration() {
        let settings = SidecarSettings::default();
        let sidecar = sidecar_container(&settings, "s", None);
        let data = |endpoint: &str| {
            BTreeMap::from([
                ("endpoint".to_string(), Sensitive(endpoint.into())),
                ("tenant".to_string(), Sensitive("t".into())),
            ])
        };
        let a = checksum(&data("postgres://a"), &sidecar);
        assert_eq!(a, checksum(&data("postgres://a"), &sidecar));
        assert_ne!(a, checksum(&data("postgres://b"), &sidecar));
        let other = sidecar_container(
            &SidecarSettings {
                image: "other".into(),
                ..settings.clone()
            },
            "s",
            None,
        );
        assert_ne!(a, checksum(&data("postgres://a"), &other));
        // TLS to the datastore: flags, a read-only mount, the Secret's keys as a volume.
        let tls = DatastoreTls {
            ca: "ca".into(),
            client: None,
        };
        let with_tls = sidecar_container(&settings, "s", Some(&tls));
        assert!(
            with_tls
                .args
                .iter()
                .flatten()
                .any(|a| a.starts_with("--ca-file="))
        );
        let workload = WorkloadRef {
            kind: WorkloadKind::Deployment,
            name: "api",
            namespace: "ns",
            container: "kube-apiserver",
        };
        let patch = workload_patch(workload, &[], &with_tls, "s", &tls.mounted_keys(), "sum");
        let volumes = &patch["spec"]["template"]["spec"]["volumes"];
        assert_eq!(volumes[1]["secret"]["items"][0]["key"], "datastore-ca.crt");
    }

    #[test]
    fn finds_the_apiserver_container() {
        let pod = PodSpec {
            containers: vec![
                Container {
                    name: SIDECAR_NAME.into(),
                    ..Default::default()
                },
                Container {
                    name: "api".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        assert_eq!(
            apiserver_container(&pod, None).map(|c| c.name.as_str()),
            Ok("api")
        );
        assert!(apiserver_container(&pod, Some("nope")).is_err());
    }
}
