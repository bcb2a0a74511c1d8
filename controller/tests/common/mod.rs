//! What the controller's end-to-end tests share: real kube-apiservers (v1.36.3, from
//! `scripts/peers.sh`) on real kine-rs processes, kubectl, and the database services.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The Kubernetes version `scripts/peers.sh` builds.
pub const KUBE_VERSION: &str = "v1.36.3";
/// The bearer token of the `system:masters` user.
pub const TOKEN: &str = "kine-rs-controller-test-token";
const READY_TIMEOUT: Duration = Duration::from_secs(120);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// A program from `$VAR`, else from `scripts/peers.sh`'s cache; panics when missing.
pub fn peer_binary(var: &str, name: &str, version: &str) -> PathBuf {
    let path = match std::env::var_os(var) {
        Some(path) => PathBuf::from(path),
        None => {
            let home = std::env::var_os("HOME").expect("HOME is not set");
            let cache = std::env::var_os("KINE_PEERS_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(&home).join(".cache/kine-rs-peers"));
            cache.join(format!("{name}-{version}")).join(name)
        }
    };
    assert!(
        path.is_file(),
        "{name} is missing at {} (${var}): run scripts/peers.sh (scripts/test.sh does)",
        path.display()
    );
    path
}

pub fn kubectl_binary() -> PathBuf {
    peer_binary("KUBECTL_BIN", "kubectl", KUBE_VERSION)
}

/// The `kine-rs` binary next to the test executable (`cargo build -p kine-rs` builds it;
/// the README's test command builds every binary first), or `$KINE_RS_BIN`.
pub fn kine_rs_binary() -> PathBuf {
    if let Ok(path) = std::env::var("KINE_RS_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary lives in target/<profile>/deps")
        .join("kine-rs");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p kine-rs --bin kine-rs` first",
        bin.display()
    );
    bin
}

/// Ports outside the kernel's ephemeral range (one rule for every test of the workspace).
pub use kine_tests::free_port;

/// A child process killed when dropped.
pub struct ChildGuard(pub Child, pub String);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a finished command printed.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `command` with its output captured, killing it after a minute.
pub fn run_bounded(mut command: Command) -> Output {
    let what = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let read = |mut from: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = from.read_to_string(&mut text);
            text
        })
    };
    let stdout = read(Box::new(child.stdout.take().expect("stdout")));
    let stderr = read(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {COMMAND_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// The last lines of a log file.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Starts kine-rs with `args` and `env`, logging to `log`; waits for `wait_for` (a TCP
/// address or a unix socket path) to accept connections.
pub fn spawn_kine(
    args: &[String],
    env: &[(String, String)],
    log: &Path,
    wait_for: &str,
) -> ChildGuard {
    let file = std::fs::File::create(log).expect("log file");
    let mut child = Command::new(kine_rs_binary())
        .args(args)
        .envs(env.iter().cloned())
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log"))
        .stderr(file)
        .spawn()
        .expect("start kine-rs");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let up = if wait_for.starts_with('/') {
            std::os::unix::net::UnixStream::connect(wait_for).is_ok()
        } else {
            std::net::TcpStream::connect(wait_for).is_ok()
        };
        if up {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "kine-rs exited before serving ({status}):\n{}",
                log_tail(log, 30)
            );
        }
        assert!(
            Instant::now() < deadline,
            "kine-rs did not serve {wait_for} within 30s:\n{}",
            log_tail(log, 30)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    ChildGuard(child, log.display().to_string())
}

/// Files a kube-apiserver needs: a service-account key pair and a token file.
pub struct ApiServerFiles {
    pub dir: PathBuf,
}

impl ApiServerFiles {
    pub fn new(dir: &Path) -> ApiServerFiles {
        std::fs::create_dir_all(dir).expect("dir");
        let key_pair = rcgen::KeyPair::generate().expect("service-account key");
        std::fs::write(dir.join("sa.key"), key_pair.serialize_pem()).expect("write key");
        std::fs::write(dir.join("sa.pub"), key_pair.public_key_pem()).expect("write key");
        std::fs::write(
            dir.join("tokens.csv"),
            format!("{TOKEN},admin,admin,system:masters\n"),
        )
        .expect("token file");
        ApiServerFiles {
            dir: dir.to_path_buf(),
        }
    }

    /// kube-apiserver's arguments, with `etcd_servers`.
    pub fn args(&self, port: u16, etcd_servers: &str) -> Vec<String> {
        let d = self.dir.display();
        vec![
            format!("--etcd-servers={etcd_servers}"),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={port}"),
            format!("--cert-dir={d}/certs"),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={d}/sa.pub"),
            format!("--service-account-signing-key-file={d}/sa.key"),
            format!("--token-auth-file={d}/tokens.csv"),
            "--authorization-mode=AlwaysAllow".into(),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
        ]
    }
}

/// A running kube-apiserver and kubectl pointed at it.
pub struct ApiServer {
    child: Child,
    pub kubeconfig: PathBuf,
    pub log: PathBuf,
    cache_dir: PathBuf,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- kube-apiserver log ({}):\n{}",
                self.log.display(),
                log_tail(&self.log, 40)
            );
        }
    }
}

impl ApiServer {
    /// Starts kube-apiserver with `args` (which set `--secure-port=port`), its files in `dir`.
    pub fn start(dir: &Path, port: u16, args: &[String]) -> ApiServer {
        let bin = peer_binary("KUBE_APISERVER_BIN", "kube-apiserver", KUBE_VERSION);
        std::fs::create_dir_all(dir).expect("dir");
        let log = dir.join(format!("kube-apiserver-{port}.log"));
        let file = std::fs::File::create(&log).expect("log");
        let child = Command::new(&bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let kubeconfig = dir.join(format!("kubeconfig-{port}"));
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\n\
                 clusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:{port}\n    \
                 insecure-skip-tls-verify: true\n\
                 users:\n- name: admin\n  user:\n    token: {TOKEN}\n\
                 contexts:\n- name: c\n  context:\n    cluster: c\n    user: admin\n    \
                 namespace: default\n\
                 current-context: c\n"
            ),
        )
        .expect("kubeconfig");
        let mut server = ApiServer {
            child,
            kubeconfig,
            log,
            cache_dir: dir.join(format!("kubectl-cache-{port}")),
        };
        server.wait_ready();
        server
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(kubectl_binary());
        command
            .env("KUBECONFIG", &self.kubeconfig)
            .arg(format!("--cache-dir={}", self.cache_dir.display()))
            .args(args);
        command
    }

    pub fn try_kubectl(&self, args: &[&str]) -> Output {
        run_bounded(self.command(args))
    }

    /// Runs kubectl; panics when it fails.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = self.try_kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed ({}):\n{}\n{}",
            out.status,
            out.stdout,
            out.stderr
        );
        out.stdout
    }

    /// `kubectl apply -f -` of `yaml`.
    pub fn apply(&self, yaml: &str) -> String {
        let path = self
            .cache_dir
            .with_file_name(format!("apply-{}.yaml", rand_suffix()));
        std::fs::write(&path, yaml).expect("write manifest");
        self.kubectl(&["apply", "-f", &path.display().to_string()])
    }

    fn wait_ready(&mut self) {
        let started = Instant::now();
        loop {
            let out = run_bounded(self.command(&["get", "--raw=/readyz", "--request-timeout=5s"]));
            if out.status.success() && out.stdout.trim() == "ok" {
                eprintln!(
                    "kube-apiserver ready after {:.1}s",
                    started.elapsed().as_secs_f64()
                );
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "kube-apiserver exited ({status}):\n{}",
                    log_tail(&self.log, 40)
                );
            }
            assert!(
                started.elapsed() < READY_TIMEOUT,
                "kube-apiserver was not ready within {READY_TIMEOUT:?}: {}{}",
                out.stdout,
                out.stderr
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// A kube client for this apiserver.
    pub async fn client(&self) -> kube::Client {
        client_from(&self.kubeconfig).await
    }
}

/// A kube client from a kubeconfig file.
pub async fn client_from(path: &Path) -> kube::Client {
    {
        let kubeconfig = kube::config::Kubeconfig::read_from(path).expect("kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .expect("kube config");
        kube::Client::try_from(config).expect("kube client")
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A management cluster: kine-rs on SQLite and a kube-apiserver on it, with the CRDs.
pub struct Management {
    pub api: ApiServer,
    _kine: ChildGuard,
    pub dir: tempfile::TempDir,
}

impl Management {
    /// With `--authorization-mode=AlwaysAllow`.
    pub fn start() -> Management {
        Management::start_with("AlwaysAllow")
    }

    /// With `--authorization-mode=RBAC` (the test's token is in `system:masters`).
    pub fn start_rbac() -> Management {
        Management::start_with("RBAC")
    }

    fn start_with(authorization: &str) -> Management {
        let dir = tempfile::tempdir().expect("tempdir");
        let kine_port = free_port();
        let kine = spawn_kine(
            &[
                format!(
                    "--endpoint=sqlite://{}",
                    dir.path().join("management.db").display()
                ),
                format!("--listen-address=127.0.0.1:{kine_port}"),
            ],
            &[],
            &dir.path().join("management-kine.log"),
            &format!("127.0.0.1:{kine_port}"),
        );
        let files = ApiServerFiles::new(&dir.path().join("management"));
        let port = free_port();
        let args: Vec<String> = files
            .args(port, &format!("http://127.0.0.1:{kine_port}"))
            .into_iter()
            .map(|a| {
                if a.starts_with("--authorization-mode=") {
                    format!("--authorization-mode={authorization}")
                } else {
                    a
                }
            })
            .collect();
        let api = ApiServer::start(&dir.path().join("management"), port, &args);
        Management {
            api,
            _kine: kine,
            dir,
        }
    }

    /// Applies the chart's CRDs and waits until they are served.
    pub fn install_crds(&self) {
        let crds = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../charts/kine-rs/crds/kine-rs.io.yaml"
        );
        self.api.kubectl(&["apply", "--server-side", "-f", crds]);
        self.api.kubectl(&[
            "wait",
            "--for=condition=established",
            "--timeout=60s",
            "crd/datastores.kine-rs.io",
            "crd/tenantdatastores.kine-rs.io",
        ]);
    }
}

/// helm v3.22.0 (`$HELM_BIN`, else `scripts/peers.sh`'s cache).
pub fn helm_binary() -> PathBuf {
    peer_binary("HELM_BIN", "helm", "v3.22.0")
}

/// A kubeconfig like `api`'s whose user is impersonated as the ServiceAccount
/// `namespace/name` (so requests get only the rights RBAC gives that ServiceAccount).
pub fn impersonating_kubeconfig(api: &ApiServer, namespace: &str, name: &str) -> PathBuf {
    let text = std::fs::read_to_string(&api.kubeconfig).expect("kubeconfig");
    let text = text.replace(
        &format!("    token: {TOKEN}\n"),
        &format!(
            "    token: {TOKEN}\n    as: system:serviceaccount:{namespace}:{name}\n    \
             as-groups: [system:serviceaccounts, \"system:serviceaccounts:{namespace}\", \
             system:authenticated]\n"
        ),
    );
    let path = api.kubeconfig.with_extension("impersonated");
    std::fs::write(&path, text).expect("write kubeconfig");
    path
}

/// Host, port, user and password of a service URL from `$var` (else `default`).
pub fn service(var: &str, default: &str) -> (String, u16, String, String) {
    let url = std::env::var(var).unwrap_or_else(|_| default.to_string());
    let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
    let rest = rest.split(['/', '?']).next().unwrap_or_default();
    let (userinfo, hostport) = match rest.rsplit_once('@') {
        Some((u, h)) => (u, h),
        None => ("", rest),
    };
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let (host, port) = hostport
        .rsplit_once(':')
        .expect("host:port in the service URL");
    (
        host.to_string(),
        port.parse().expect("port"),
        user.to_string(),
        password.to_string(),
    )
}

/// Base64 (standard, padded), for ContentRef contents in test manifests.
pub fn base64(data: &[u8]) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A program named by `$var`; panics when it is not set or missing (tests never skip).
pub fn required_binary(var: &str, what: &str) -> PathBuf {
    let path = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        panic!("${var} is not set: the path of {what} (scripts/test.sh sets it)")
    });
    assert!(
        path.is_file(),
        "{what} is missing at {} (${var})",
        path.display()
    );
    path
}

/// A single-member etcd 3.5 (the oracle, `$ETCD_BIN`) on free loopback ports, data in
/// `dir`, with `--max-txn-ops 256` (the kine-rs proxy nests a client's transaction of up to
/// 128 operations in one of its own); returns it and its `host:port`.
pub fn spawn_etcd(dir: &Path) -> (ChildGuard, String) {
    spawn_etcd_with(dir, None)
}

/// PEMs of a test PKI: a CA, a server certificate for 127.0.0.1/localhost, a client one.
pub struct Pki {
    pub ca: String,
    pub server: (String, String),
    pub client: (String, String),
}

impl Pki {
    pub fn new(client_name: &str) -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair,
        };
        let ca_key = KeyPair::generate().expect("key");
        let mut ca_params = CertificateParams::default();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "e2e CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("CA");
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |name: &str, sans: Vec<String>, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(sans).expect("params");
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &issuer).expect("leaf");
            (cert.pem(), key.serialize_pem())
        };
        Pki {
            ca: ca.pem(),
            server: leaf(
                "server",
                vec!["127.0.0.1".into(), "localhost".into()],
                ExtendedKeyUsagePurpose::ServerAuth,
            ),
            client: leaf(client_name, vec![], ExtendedKeyUsagePurpose::ClientAuth),
        }
    }
}

/// Like [`spawn_etcd`]; with `pki`, etcd serves TLS with its server certificate and requires
/// client certificates signed by its CA (`--client-cert-auth`).
pub fn spawn_etcd_with(dir: &Path, pki: Option<&Pki>) -> (ChildGuard, String) {
    let bin = required_binary("ETCD_BIN", "etcd 3.5");
    std::fs::create_dir_all(dir).expect("etcd dir");
    let address = format!("127.0.0.1:{}", free_port());
    let scheme = if pki.is_some() { "https" } else { "http" };
    let mut tls_args: Vec<String> = Vec::new();
    if let Some(pki) = pki {
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("write pki");
            path.display().to_string()
        };
        tls_args = vec![
            format!("--trusted-ca-file={}", write("ca.crt", &pki.ca)),
            format!("--cert-file={}", write("server.crt", &pki.server.0)),
            format!("--key-file={}", write("server.key", &pki.server.1)),
            "--client-cert-auth".into(),
        ];
    }
    let peer = format!("http://127.0.0.1:{}", free_port());
    let log = dir.join("etcd.log");
    let file = std::fs::File::create(&log).expect("etcd log");
    let mut child = Command::new(bin)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args([
            "--name",
            "e2e",
            "--max-txn-ops",
            "256",
            "--log-level",
            "warn",
        ])
        .arg(format!("--listen-client-urls={scheme}://{address}"))
        .arg(format!("--advertise-client-urls={scheme}://{address}"))
        .args(&tls_args)
        .arg(format!("--listen-peer-urls={peer}"))
        .arg(format!("--initial-advertise-peer-urls={peer}"))
        .arg(format!("--initial-cluster=e2e={peer}"))
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log"))
        .stderr(file)
        .spawn()
        .expect("start etcd");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(&address).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("etcd exited ({status}):\n{}", log_tail(&log, 30));
        }
        assert!(Instant::now() < deadline, "etcd did not listen within 30s");
        std::thread::sleep(Duration::from_millis(20));
    }
    (ChildGuard(child, log.display().to_string()), address)
}

/// Runs etcdctl (`$ETCDCTL_BIN`) against `address`; panics when it fails.
pub fn etcdctl(address: &str, args: &[&str]) -> String {
    let mut command = Command::new(required_binary("ETCDCTL_BIN", "etcdctl 3.5"));
    command
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints=http://{address}"))
        .args(args);
    let out = run_bounded(command);
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}{}",
        out.stdout,
        out.stderr
    );
    out.stdout
}

/// Decodes standard base64 (what Secrets' data holds).
pub fn base64_decode(text: &str) -> Vec<u8> {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in text
        .bytes()
        .filter(|c| *c != b'=' && !c.is_ascii_whitespace())
    {
        let v = T.iter().position(|t| *t == c).expect("base64") as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// A PostgreSQL server of the test's own that accepts only TLS connections (`hostnossl`
/// rejected), with `pki`'s server certificate; `postgres` logs in without a password, other
/// roles with theirs. From Debian's `postgresql-15` binaries, run as user `postgres` (when the
/// test runs as root). Stopped when dropped.
pub struct TlsPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}

impl TlsPostgres {
    fn command(&self, binary: &str) -> Command {
        let path = self.bin.join(binary);
        let is_root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        if is_root {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            Command::new(path)
        }
    }

    pub fn start(pki: &Pki) -> TlsPostgres {
        let bin = std::env::var_os("KINE_TEST_PG_BINDIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"));
        assert!(
            bin.join("initdb").is_file(),
            "PostgreSQL's server binaries are missing at {} (apt-get install postgresql-15, or \
             set KINE_TEST_PG_BINDIR)",
            bin.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("kine-ctrl-pg-tls")
            .tempdir()
            .expect("tempdir");
        let server = TlsPostgres {
            dir,
            bin,
            port: free_port(),
        };
        let root = server.dir.path();
        std::fs::write(root.join("server.crt"), &pki.server.0).expect("write cert");
        std::fs::write(root.join("server.key"), &pki.server.1).expect("write key");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            root.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .expect("chmod key");
        let _ = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(root)
            .status();
        let data = root.join("data");
        let out = run_bounded({
            let mut c = server.command("initdb");
            c.args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "-D",
            ])
            .arg(&data);
            c
        });
        assert!(out.status.success(), "initdb: {}{}", out.stdout, out.stderr);
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all postgres 127.0.0.1/32 trust\n\
             hostssl all all 127.0.0.1/32 scram-sha-256\n\
             hostnossl all all 0.0.0.0/0 reject\n",
        )
        .expect("pg_hba.conf");
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c ssl=on -c ssl_cert_file={} -c \
             ssl_key_file={} -c fsync=off",
            server.port,
            root.display(),
            root.join("server.crt").display(),
            root.join("server.key").display()
        );
        let out = run_bounded({
            let mut c = server.command("pg_ctl");
            c.arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(root.join("server.log"))
                .args(["-o", &options, "-w", "-t", "60", "start"]);
            c
        });
        assert!(
            out.status.success(),
            "pg_ctl start: {}{}\n{}",
            out.stdout,
            out.stderr,
            std::fs::read_to_string(root.join("server.log")).unwrap_or_default()
        );
        server
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let _ = run_bounded({
            let mut c = self.command("pg_ctl");
            c.arg("-D").arg(self.dir.path().join("data")).args([
                "-m",
                "immediate",
                "-w",
                "-t",
                "60",
                "stop",
            ]);
            c
        });
    }
}
