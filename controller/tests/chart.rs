//! The Helm chart `charts/kine-rs`: `helm lint` and `helm template` (helm v3.22.0 from
//! `scripts/peers.sh`, `$HELM_BIN`) with the default values and with `ci/full-values.yaml`,
//! and the rendered manifests (CRDs included) validated by a real kube-apiserver v1.36.3 with
//! a server-side dry run. Also: the gateway refuses to render without its datastore Secret,
//! generates its CA and server certificate when given no TLS Secret, and the
//! controller's ClusterRole grants no wildcard and no verb beyond what the controller uses.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Management, peer_binary, run_bounded};

const HELM_VERSION: &str = "v3.22.0";

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/kine-rs")
}

fn helm(args: &[&str]) -> common::Output {
    let mut command = Command::new(peer_binary("HELM_BIN", "helm", HELM_VERSION));
    command.args(args);
    run_bounded(command)
}

fn helm_ok(args: &[&str]) -> String {
    let out = helm(args);
    assert!(
        out.status.success(),
        "helm {args:?} failed ({}):\n{}\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    out.stdout
}

#[test]
fn chart_lints_renders_and_passes_a_server_side_dry_run() {
    let chart = chart();
    let chart = chart.to_str().expect("utf-8 path");
    let full = format!("{chart}/ci/full-values.yaml");
    let version = helm_ok(&["version", "--short"]);
    assert!(version.starts_with(HELM_VERSION), "{version}");

    for values in [None, Some(full.as_str())] {
        let mut args = vec!["lint", "--strict", chart];
        if let Some(values) = values {
            args.extend(["-f", values]);
        }
        let out = helm_ok(&args);
        assert!(out.contains("0 chart(s) failed"), "{out}");
    }

    let render = |values: Option<&str>| {
        let mut args = vec![
            "template",
            "kine-rs",
            chart,
            "--namespace",
            "kine-system",
            "--include-crds",
        ];
        if let Some(values) = values {
            args.extend(["-f", values]);
        }
        helm_ok(&args)
    };
    let default = render(None);
    let full_render = render(Some(&full));
    let kinds = |text: &str| -> Vec<String> {
        let mut kinds: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("kind: "))
            .map(str::to_string)
            .collect();
        kinds.sort();
        kinds
    };
    assert_eq!(
        kinds(&default),
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "Deployment",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount"
        ]
    );
    assert_eq!(
        kinds(&full_render),
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "DataStore",
            "Deployment",
            "Deployment",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            "Service",
            "Service",
            "ServiceAccount"
        ]
    );
    assert!(full_render.contains("--sidecar-image=registry.example/kine-rs:0.1.0-test"));
    assert!(full_render.contains("--gateway-create-tenants"));
    assert!(default.contains("--sidecar-image=ghcr.io/kine-rs/kine-rs:0.1.0"));

    assert!(full_render.contains("\"--admin-identity=system:kine-rs-controller\""));
    assert!(full_render.contains("name: gateway-ca, namespace: kine-system, keyPath: tls.key"));

    // Without a TLS Secret, the chart generates a CA and a server certificate for the
    // Service's names, and its DataStore signs with that CA.
    let generated = helm_ok(&[
        "template",
        "kine-rs",
        chart,
        "--namespace",
        "kine-system",
        "--set",
        "gateway.enabled=true",
        "--set",
        "gateway.endpointSecret.name=db",
    ]);
    assert_eq!(
        kinds(&generated).iter().filter(|k| *k == "Secret").count(),
        2,
        "{generated}"
    );
    assert!(
        generated.contains("name: kine-rs-gateway-ca\n"),
        "{generated}"
    );
    assert!(generated.contains("secretName: kine-rs-gateway-tls"));
    assert!(
        generated.contains("{name: kine-rs-gateway-ca, namespace: kine-system, keyPath: tls.crt}")
    );
    assert!(generated.contains("- \"kine-rs-gateway.kine-system.svc:2379\""));
    // Your own TLS Secret with a DataStore needs the CA's key.
    let out = helm(&[
        "template",
        "kine-rs",
        chart,
        "--set",
        "gateway.enabled=true",
        "--set",
        "gateway.endpointSecret.name=db",
        "--set",
        "gateway.tlsSecret=mine",
    ]);
    assert!(
        !out.status.success() && out.stderr.contains("gateway.caSecret"),
        "{}",
        out.stderr
    );

    // The gateway needs its datastore Secret.
    let out = helm(&[
        "template",
        "kine-rs",
        chart,
        "--set",
        "gateway.enabled=true",
    ]);
    assert!(
        !out.status.success()
            && out
                .stderr
                .contains("gateway.endpointSecret.name is required"),
        "{}",
        out.stderr
    );

    // Least verbs: no wildcard, nothing that deletes or updates whole objects; in the
    // release's namespace, its Lease only.
    let doc = |kind: &str| -> String {
        default
            .split("\n---")
            .filter(|doc| doc.contains(&format!("kind: {kind}\n")))
            .collect()
    };
    let verbs_of = |doc: &str| -> Vec<String> {
        doc.lines()
            .filter_map(|l| l.trim().strip_prefix("verbs: "))
            .map(str::to_string)
            .collect()
    };
    let role = doc("Role");
    assert!(role.contains("resources: [\"leases\"]"), "{role}");
    assert_eq!(
        verbs_of(&role),
        ["[\"get\", \"create\", \"update\"]"],
        "{role}"
    );
    let role = doc("ClusterRole");
    let verbs = verbs_of(&role);
    assert_eq!(verbs.len(), 5, "{role}");
    for forbidden in [
        "*",
        "delete",
        "update",
        "deletecollection",
        "escalate",
        "bind",
    ] {
        assert!(
            !verbs
                .iter()
                .any(|v| v.contains(&format!("\"{forbidden}\""))),
            "ClusterRole grants {forbidden}: {verbs:?}"
        );
    }

    // A real kube-apiserver validates every rendered object (server-side dry run).
    // (The CRDs are installed first: a DataStore cannot be dry-run before its CRD exists.)
    let management = Management::start();
    management.install_crds();
    management
        .api
        .kubectl(&["create", "namespace", "kine-system"]);
    for (name, text) in [
        ("default", &default),
        ("full", &full_render),
        ("generated", &generated),
    ] {
        let path = management.dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, text).expect("write manifests");
        let out = management.api.kubectl(&[
            "apply",
            "--dry-run=server",
            "-f",
            &path.display().to_string(),
        ]);
        let applied = out
            .lines()
            .filter(|l| l.ends_with("(server dry run)"))
            .count();
        assert_eq!(applied, kinds(text).len(), "{name}: {out}");
    }
}
