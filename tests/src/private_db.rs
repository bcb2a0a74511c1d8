//! Database servers of a test's own: a PostgreSQL or MariaDB instance in a temporary
//! directory, on a free loopback port, that the test may stop, crash and start again.
//!
//! Tests that restart a database must never touch the machine's shared servers (5432, 3306):
//! other tests run against them at the same time. These instances are started from the
//! installed server binaries (Debian's `postgresql-15` and `mariadb-server` packages); when a
//! binary is missing the test fails saying what to install.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

/// How long a private server may take to start or stop.
const SERVER_WAIT: Duration = Duration::from_secs(60);

/// Runs `command`, panicking with `what` and its output when it fails.
fn run(command: &mut Command, what: &str) {
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Whether this process runs as root (PostgreSQL refuses to run as root).
fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Waits until `port` on 127.0.0.1 accepts connections, or fails naming `what` and `log`.
fn wait_listening(port: u16, what: &str, log: &Path) {
    let deadline = Instant::now() + SERVER_WAIT;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(log).unwrap_or_default();
    panic!("{what} did not listen on 127.0.0.1:{port} within {SERVER_WAIT:?}; its log:\n{log}");
}

/// Waits until `port` on 127.0.0.1 refuses connections.
fn wait_closed(port: u16, what: &str) {
    let deadline = Instant::now() + SERVER_WAIT;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} still listens on 127.0.0.1:{port} after {SERVER_WAIT:?}");
}

/// The directory of PostgreSQL's server binaries: `$KINE_TEST_PG_BINDIR`, else the newest
/// `/usr/lib/postgresql/<version>/bin` that has `initdb`.
fn postgres_bindir() -> PathBuf {
    if let Ok(dir) = std::env::var("KINE_TEST_PG_BINDIR") {
        return PathBuf::from(dir);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL's server binaries (initdb, pg_ctl) are not installed: install Debian's \
             `postgresql` package (e.g. apt-get install postgresql-15), or point \
             KINE_TEST_PG_BINDIR at their directory"
        ),
    }
}

/// A PostgreSQL server of the test's own (trust authentication, user `postgres`).
pub struct PrivatePostgres {
    dir: tempfile::TempDir,
    bindir: PathBuf,
    port: u16,
    as_postgres: bool,
    running: bool,
}

impl PrivatePostgres {
    /// Initialises a cluster in a temporary directory and starts it on a free port.
    pub fn start() -> PrivatePostgres {
        let bindir = postgres_bindir();
        let dir = tempfile::Builder::new()
            .prefix("kine-private-pg")
            .tempdir()
            .expect("tempdir");
        let as_postgres = is_root();
        if as_postgres {
            run(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(dir.path()),
                "chown of the private PostgreSQL directory",
            );
        }
        let mut server = PrivatePostgres {
            dir,
            bindir,
            port: free_port(),
            as_postgres,
            running: false,
        };
        let data = server.data();
        run(
            server
                .command("initdb")
                .args([
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--no-sync",
                    "-E",
                    "UTF8",
                    "-D",
                ])
                .arg(&data),
            "initdb of a private PostgreSQL",
        );
        server.resume();
        server
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// A command running one of PostgreSQL's binaries (as user `postgres` when we are root).
    fn command(&self, binary: &str) -> Command {
        let path = self.bindir.join(binary);
        if self.as_postgres {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            Command::new(path)
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A `postgres://` endpoint of database `name` on this server.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Starts the server (again), on the same port and data.
    pub fn resume(&mut self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=on",
            self.port,
            self.dir.path().display()
        );
        run(
            self.command("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .arg("-l")
                .arg(self.log())
                .args(["-o", &options, "-w", "-t", "60", "start"]),
            "starting a private PostgreSQL",
        );
        self.running = true;
        wait_listening(self.port, "the private PostgreSQL", &self.log());
    }

    /// Stops the server: `fast` (clients are disconnected, a clean shutdown) or `immediate`
    /// (a crash: recovery replays the log on the next start).
    pub fn stop(&mut self, mode: &str) {
        run(
            self.command("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .args(["-m", mode, "-w", "-t", "60", "stop"]),
            "stopping a private PostgreSQL",
        );
        self.running = false;
        wait_closed(self.port, "the private PostgreSQL");
    }

    /// Runs `sql` with `psql` on database `name`; returns its unaligned output.
    pub fn psql(&self, name: &str, sql: &str) -> String {
        let output = Command::new("psql")
            .arg(self.url(name))
            .args(["-X", "-q", "-A", "-t", "-c", sql])
            .stdin(Stdio::null())
            .output()
            .expect("run psql (install postgresql-client)");
        assert!(
            output.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if self.running {
            let _ = self
                .command("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .args(["-m", "immediate", "-w", "stop"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Path of a MariaDB binary: `$KINE_TEST_MARIADB_BINDIR/<name>`, else the first of
/// `candidates` that exists.
fn mariadb_binary(candidates: &[&str]) -> PathBuf {
    if let Ok(dir) = std::env::var("KINE_TEST_MARIADB_BINDIR") {
        let name = Path::new(candidates[0]).file_name().expect("a file name");
        return Path::new(&dir).join(name);
    }
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|path| path.exists())
        .unwrap_or_else(|| {
            panic!(
                "MariaDB's server binaries ({}) are not installed: install Debian's \
                 `mariadb-server` package (apt-get install mariadb-server), or point \
                 KINE_TEST_MARIADB_BINDIR at their directory",
                candidates.join(", ")
            )
        })
}

/// A MariaDB server of the test's own (user `root`, no password).
pub struct PrivateMariadb {
    dir: tempfile::TempDir,
    server: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl PrivateMariadb {
    /// Creates a data directory in a temporary directory and starts a server on a free port.
    pub fn start() -> PrivateMariadb {
        let install = mariadb_binary(&[
            "/usr/bin/mariadb-install-db",
            "/usr/bin/mysql_install_db",
            "/usr/local/bin/mariadb-install-db",
        ]);
        let server = mariadb_binary(&[
            "/usr/sbin/mariadbd",
            "/usr/sbin/mysqld",
            "/usr/local/bin/mariadbd",
        ]);
        let dir = tempfile::Builder::new()
            .prefix("kine-private-mariadb")
            .tempdir()
            .expect("tempdir");
        let data = dir.path().join("data");
        // A temporary directory of its own: a MariaDB starting up deletes the `#sql*` files it
        // finds in its tmpdir, which broke another server's install running beside it in /tmp.
        let tmp = dir.path().join("tmp");
        std::fs::create_dir_all(&tmp).expect("tmpdir");
        run(
            Command::new(install)
                .arg("--no-defaults")
                .arg(format!("--datadir={}", data.display()))
                .arg(format!("--tmpdir={}", tmp.display()))
                .args([
                    "--user=root",
                    "--auth-root-authentication-method=normal",
                    "--skip-test-db",
                ]),
            "mariadb-install-db of a private MariaDB",
        );
        let mut mariadb = PrivateMariadb {
            dir,
            server,
            port: free_port(),
            child: None,
        };
        mariadb.resume();
        mariadb
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A `mysql://` endpoint of database `name` on this server.
    pub fn url(&self, name: &str) -> String {
        format!("mysql://root@127.0.0.1:{}/{name}", self.port)
    }

    /// Starts the server (again), on the same port and data.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "the private MariaDB is running");
        let dir = self.dir.path();
        let log = std::fs::File::create(self.log()).expect("server log");
        let child = Command::new(&self.server)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.join("data").display()))
            .arg(format!("--socket={}", dir.join("mysqld.sock").display()))
            .arg(format!("--pid-file={}", dir.join("mysqld.pid").display()))
            .arg(format!("--tmpdir={}", dir.join("tmp").display()))
            .arg(format!("--port={}", self.port))
            .args([
                "--bind-address=127.0.0.1",
                "--user=root",
                "--skip-name-resolve",
                "--skip-log-bin",
                "--innodb-buffer-pool-size=32M",
                "--innodb-log-file-size=16M",
                "--max-connections=200",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start mariadbd");
        self.child = Some(child);
        wait_listening(self.port, "the private MariaDB", &self.log());
    }

    /// Stops the server: cleanly (SIGTERM, as `systemctl stop` does), or as a crash
    /// (SIGKILL: InnoDB recovers from its log on the next start).
    pub fn stop(&mut self, crash: bool) {
        let mut child = self
            .child
            .take()
            .expect("the private MariaDB is not running");
        if crash {
            let _ = child.kill();
        } else {
            run(
                Command::new("kill").args(["-TERM", &child.id().to_string()]),
                "stopping a private MariaDB",
            );
        }
        let deadline = Instant::now() + SERVER_WAIT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => panic!("the private MariaDB did not stop within {SERVER_WAIT:?}"),
            }
        }
        wait_closed(self.port, "the private MariaDB");
    }

    /// Runs `sql` with the `mysql` client; returns its tab-separated output without headers.
    pub fn mysql(&self, sql: &str) -> String {
        let output = Command::new("mysql")
            .args([
                "--protocol=tcp",
                "--host=127.0.0.1",
                "--user=root",
                "-N",
                "-B",
            ])
            .arg(format!("--port={}", self.port))
            .args(["-e", sql])
            .stdin(Stdio::null())
            .output()
            .expect("run mysql (install mariadb-client)");
        assert!(
            output.status.success(),
            "mysql {sql:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl Drop for PrivateMariadb {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A NATS server with JetStream of the test's own (`nats-server` from `$KINE_TEST_NATS_SERVER`,
/// else `/usr/sbin/nats-server` or the first on PATH), its store in a temporary directory.
pub struct PrivateNats {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    args: Vec<String>,
}

impl PrivateNats {
    /// Starts a server on a free port.
    pub fn start() -> PrivateNats {
        PrivateNats::start_with(&[])
    }

    /// Starts a server on a free port with extra command-line arguments (TLS, say).
    pub fn start_with(args: &[&str]) -> PrivateNats {
        let dir = tempfile::Builder::new()
            .prefix("kine-private-nats")
            .tempdir()
            .expect("tempdir");
        let mut nats = PrivateNats {
            dir,
            port: free_port(),
            child: None,
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        nats.resume();
        nats
    }

    fn binary() -> PathBuf {
        if let Ok(path) = std::env::var("KINE_TEST_NATS_SERVER") {
            return PathBuf::from(path);
        }
        let installed = PathBuf::from("/usr/sbin/nats-server");
        if installed.exists() {
            return installed;
        }
        PathBuf::from("nats-server")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// A `nats://` endpoint of bucket `name` on this server.
    pub fn url(&self, name: &str) -> String {
        format!("nats://127.0.0.1:{}?bucket={name}", self.port)
    }

    /// Starts the server (again), on the same port and store.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "the private NATS is running");
        let log = std::fs::File::create(self.log()).expect("server log");
        let child = Command::new(Self::binary())
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.dir.path().join("store"))
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server (install Debian's nats-server package)");
        self.child = Some(child);
        wait_listening(self.port, "the private NATS", &self.log());
    }

    /// Stops the server: cleanly (SIGTERM), or as a crash (SIGKILL).
    pub fn stop(&mut self, crash: bool) {
        let mut child = self.child.take().expect("the private NATS is not running");
        if crash {
            let _ = child.kill();
        } else {
            run(
                Command::new("kill").args(["-TERM", &child.id().to_string()]),
                "stopping a private NATS",
            );
        }
        let deadline = Instant::now() + SERVER_WAIT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => panic!("the private NATS did not stop within {SERVER_WAIT:?}"),
            }
        }
        wait_closed(self.port, "the private NATS");
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
