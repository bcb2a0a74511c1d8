//! Smoke test with the real `etcdctl`: the same scripted commands run against a real etcd
//! (the self-check of the expectations below) and against kine-rs, and their printed output
//! is compared with what etcd prints.
//!
//! Targets, each a module of its own so every run is reported separately:
//! - `etcd::*`                   etcd 3.5.1 driven by etcdctl 3.5.1;
//! - `etcd_etcdctl34::*`         etcd 3.5.1 driven by Debian's etcdctl 3.4;
//! - `kine_sqlite::*`            kine-rs on SQLite driven by etcdctl 3.5.1;
//! - `kine_sqlite_etcdctl34::*`  kine-rs on SQLite driven by Debian's etcdctl 3.4.
//!
//! etcdctl 3.5.1 comes from `$ETCDCTL_BIN` (else `etcdctl` on PATH), etcdctl 3.4 from
//! `$ETCDCTL34_BIN` (else `/usr/bin/etcdctl`); `scripts/test.sh` installs both. Without an
//! etcdctl 3.4 the 3.4 targets are skipped, except under CI (`CI` set), where they fail.
//!
//! Every case starts its own server, so revisions are counted from the revision the fresh
//! server reports before the case writes anything.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kine_tests::{
    Backend, ChildGuard, etcdctl_binary, spawn_etcd, spawn_etcd_with, spawn_kine, spawn_kine_on,
};

/// How long one etcdctl command may take before the test gives up on it.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// The server behind the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    Etcd,
    KineSqlite,
    KineNats,
    /// kine-rs's etcd proxy (sidecar, one tenant) in front of a real etcd.
    KineEtcdProxy,
}

/// Which etcdctl drives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctl {
    V35,
    V34,
}

fn etcdctl34_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("ETCDCTL34_BIN") {
        return Some(PathBuf::from(path));
    }
    let path = PathBuf::from("/usr/bin/etcdctl");
    path.exists().then_some(path)
}

/// What a finished etcdctl command printed.
struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Output {
    fn combined(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// A running server and the etcdctl that talks to it.
struct Target {
    server: Server,
    ctl: Ctl,
    bin: PathBuf,
    address: String,
    /// The processes behind `address`, stopped in this order.
    _guards: Vec<ChildGuard>,
}

impl Target {
    /// Starts the server with the etcdctl of this target (a missing etcdctl panics).
    fn start(server: Server, ctl: Ctl) -> Option<Target> {
        let bin = match ctl {
            Ctl::V35 => etcdctl_binary(),
            Ctl::V34 => match etcdctl34_binary() {
                Some(bin) => bin,
                // A missing tool is a failure, never a skip: scripts/test.sh installs it.
                None => panic!(
                    "etcdctl 3.4 is missing: install Debian's etcd-client (scripts/test.sh \
                     does) or set ETCDCTL34_BIN"
                ),
            },
        };
        let guard = match server {
            Server::Etcd => vec![spawn_etcd()],
            Server::KineSqlite => vec![spawn_kine(Backend::Sqlite)],
            Server::KineNats => vec![spawn_kine(Backend::Nats)],
            Server::KineEtcdProxy => {
                let etcd = spawn_etcd_with(&["--max-txn-ops", "256"]);
                let kine = spawn_kine_on(
                    &format!("etcd://{}", etcd.address),
                    tempfile::tempdir().expect("tempdir"),
                    &["--tenant", "etcdctl"],
                );
                vec![kine, etcd]
            }
        };
        let target = Target {
            server,
            ctl,
            bin,
            address: guard[0].address.clone(),
            _guards: guard,
        };
        target.check_etcdctl_version();
        target.wait_ready();
        Some(target)
    }

    fn check_etcdctl_version(&self) {
        let out = self.run(&["version"], None);
        let want = match self.ctl {
            Ctl::V35 => "etcdctl version: 3.5.",
            Ctl::V34 => "etcdctl version: 3.4.",
        };
        assert!(
            out.stdout.starts_with(want),
            "{} is not the etcdctl this target needs ({want}...): {:?}",
            self.bin.display(),
            out.combined()
        );
    }

    /// Waits until the server answers a read (a fresh etcd elects itself leader first).
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.run(&["get", "ready-probe"], None);
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{:?} at {} does not answer `etcdctl get`: {}",
                self.server,
                self.address,
                out.combined()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        // The caller's ETCDCTL_* settings (endpoints, certificates) must not leak in.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("ETCDCTL_") {
                cmd.env_remove(name);
            }
        }
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.address))
            .arg("--dial-timeout=5s")
            .args(args);
        cmd
    }

    /// Runs `etcdctl ARGS` (with STDIN if given) to completion.
    fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = self
            .command(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()));
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes())
                .expect("write etcdctl stdin");
        }
        let stdout = read_in_background(child.stdout.take());
        let stderr = read_in_background(child.stderr.take());
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for etcdctl") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "`etcdctl {}` did not finish within {COMMAND_TIMEOUT:?}",
                    args.join(" ")
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Output {
            status,
            stdout: stdout.join().expect("stdout reader"),
            stderr: stderr.join().expect("stderr reader"),
        }
    }

    fn ok_with(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.run(args, stdin);
        assert!(
            out.status.success(),
            "`etcdctl {}` failed ({}):\nstdout: {}\nstderr: {}",
            args.join(" "),
            out.status,
            out.stdout,
            out.stderr
        );
        out.stdout
    }

    /// Runs `etcdctl ARGS`, asserts it succeeded, returns its standard output.
    fn ok(&self, args: &[&str]) -> String {
        self.ok_with(args, None)
    }

    /// Runs `etcdctl txn --interactive=false` on SCRIPT, returns its standard output.
    fn txn(&self, script: &str, extra: &[&str]) -> String {
        let mut args = vec!["txn", "--interactive=false"];
        args.extend_from_slice(extra);
        self.ok_with(&args, Some(script))
    }

    /// Runs `etcdctl ARGS`, asserts it failed, returns everything it printed.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args, None);
        assert!(
            !out.status.success(),
            "`etcdctl {}` should have failed but printed {:?}",
            args.join(" "),
            out.combined()
        );
        out.combined()
    }

    /// Asserts `etcdctl ARGS` fails with an error message containing WANT.
    fn fails_with(&self, args: &[&str], want: &str) {
        let got = self.fails(args);
        assert!(
            got.contains(want),
            "`etcdctl {}` should fail with {want:?}, printed {got:?}",
            args.join(" ")
        );
    }

    /// Runs `etcdctl ARGS -w json` and parses what it printed.
    fn json(&self, args: &[&str]) -> Json {
        let mut all = args.to_vec();
        all.extend_from_slice(&["-w", "json"]);
        Json::parse(&self.ok(&all))
    }

    /// The keys `etcdctl ARGS --keys-only` prints.
    fn keys(&self, args: &[&str]) -> Vec<String> {
        let mut all = args.to_vec();
        all.push("--keys-only");
        self.ok(&all)
            .lines()
            .filter(|line| !line.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// The store's current revision, from the header of a read.
    fn rev(&self) -> i64 {
        self.json(&["get", "rev-probe"])
            .get("header")
            .get("revision")
            .i64()
    }

    /// Starts `etcdctl watch ARGS` in the background.
    fn watch(&self, args: &[&str]) -> Watcher {
        let mut all = vec!["watch"];
        all.extend_from_slice(args);
        let mut child = self
            .command(&all)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start etcdctl watch");
        let (tx, rx) = mpsc::channel();
        let mut stdout = child.stdout.take().expect("watch stdout");
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().expect("watch stderr");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            if let Ok(mut sink) = sink.lock() {
                sink.push_str(&text);
            }
        });
        Watcher {
            child,
            rx,
            out: Vec::new(),
            stderr,
            what: all.join(" "),
        }
    }

    fn is_etcd(&self) -> bool {
        self.server == Server::Etcd
    }
}

fn read_in_background<R: Read + Send + 'static>(
    pipe: Option<R>,
) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// An `etcdctl watch` running in the background; killed when dropped.
struct Watcher {
    child: Child,
    rx: mpsc::Receiver<Vec<u8>>,
    out: Vec<u8>,
    stderr: Arc<Mutex<String>>,
    what: String,
}

impl Watcher {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.out).into_owned()
    }

    /// Collects output until DONE holds for it, or panics after TIMEOUT.
    fn wait_until(&mut self, timeout: Duration, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.text();
            if done(&text) {
                return text;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let stderr = self.stderr.lock().map(|s| s.clone()).unwrap_or_default();
                panic!(
                    "`etcdctl {}` did not print what was expected within {timeout:?}\n\
                     stdout so far: {text:?}\nstderr: {stderr:?}",
                    self.what
                );
            }
            match self.rx.recv_timeout(left.min(Duration::from_millis(100))) {
                Ok(chunk) => self.out.extend_from_slice(&chunk),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    std::thread::sleep(Duration::from_millis(100));
                    let stderr = self.stderr.lock().map(|s| s.clone()).unwrap_or_default();
                    panic!(
                        "`etcdctl {}` exited ({status:?}) before printing what was expected\n\
                         stdout: {text:?}\nstderr: {stderr:?}",
                        self.what
                    );
                }
            }
        }
    }

    /// Keeps collecting for D (to catch anything extra) and returns everything printed.
    fn settle(&mut self, d: Duration) -> String {
        let deadline = Instant::now() + d;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.rx.recv_timeout(left) {
                Ok(chunk) => self.out.extend_from_slice(&chunk),
                Err(_) => break,
            }
        }
        self.text()
    }

    /// Waits for exactly EXPECTED (and nothing more within a short grace period).
    fn expect(&mut self, expected: &str) {
        self.wait_until(Duration::from_secs(15), |text| text.len() >= expected.len());
        let got = self.settle(Duration::from_millis(300));
        assert_eq!(got, expected, "output of `etcdctl {}`", self.what);
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// A small JSON reader for etcdctl's `-w json` output (Go's encoding/json: zero values omitted,
// so a missing field reads as 0 / "" / false / [] here, as it does for etcdctl's own decoding).
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    /// Kept as text: ids are 64-bit and must not go through f64.
    Num(String),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

static NULL: Json = Json::Null;

impl Json {
    fn parse(text: &str) -> Json {
        let mut parser = JsonParser {
            bytes: text.as_bytes(),
            pos: 0,
        };
        let value = parser.value();
        parser.skip_ws();
        assert_eq!(
            parser.pos,
            parser.bytes.len(),
            "trailing characters after JSON in {text:?}"
        );
        value
    }

    fn get(&self, key: &str) -> &Json {
        match self {
            Json::Obj(fields) => fields
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v)
                .unwrap_or(&NULL),
            _ => &NULL,
        }
    }

    fn has(&self, key: &str) -> bool {
        matches!(self, Json::Obj(fields) if fields.iter().any(|(k, _)| k == key))
    }

    fn at(&self, index: usize) -> &Json {
        self.arr().get(index).unwrap_or(&NULL)
    }

    fn arr(&self) -> &[Json] {
        match self {
            Json::Arr(items) => items,
            Json::Null => &[],
            other => panic!("not a JSON array: {other:?}"),
        }
    }

    fn int(&self) -> i128 {
        match self {
            Json::Num(n) => n.parse().unwrap_or_else(|_| panic!("not an integer: {n}")),
            Json::Null => 0,
            other => panic!("not a JSON number: {other:?}"),
        }
    }

    fn i64(&self) -> i64 {
        i64::try_from(self.int()).expect("integer out of i64 range")
    }

    fn bool(&self) -> bool {
        match self {
            Json::Bool(b) => *b,
            Json::Null => false,
            other => panic!("not a JSON bool: {other:?}"),
        }
    }

    fn str(&self) -> &str {
        match self {
            Json::Str(s) => s,
            Json::Null => "",
            other => panic!("not a JSON string: {other:?}"),
        }
    }

    /// A base64-encoded `bytes` field (keys and values), decoded as UTF-8 text.
    fn b64(&self) -> String {
        String::from_utf8(base64_decode(self.str())).expect("UTF-8 key or value")
    }
}

struct JsonParser<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl JsonParser<'_> {
    fn skip_ws(&mut self) {
        while self
            .bytes
            .get(self.pos)
            .is_some_and(|b| b.is_ascii_whitespace())
        {
            self.pos += 1;
        }
    }

    fn peek(&self) -> u8 {
        *self.bytes.get(self.pos).unwrap_or_else(|| {
            panic!(
                "unexpected end of JSON: {:?}",
                String::from_utf8_lossy(self.bytes)
            )
        })
    }

    fn eat(&mut self, want: u8) {
        self.skip_ws();
        let got = self.peek();
        assert_eq!(
            got as char,
            want as char,
            "bad JSON at byte {} of {:?}",
            self.pos,
            String::from_utf8_lossy(self.bytes)
        );
        self.pos += 1;
    }

    fn literal(&mut self, word: &str, value: Json) -> Json {
        assert!(
            self.bytes[self.pos..].starts_with(word.as_bytes()),
            "bad JSON literal at byte {}",
            self.pos
        );
        self.pos += word.len();
        value
    }

    fn value(&mut self) -> Json {
        self.skip_ws();
        match self.peek() {
            b'{' => {
                self.pos += 1;
                let mut fields = Vec::new();
                self.skip_ws();
                if self.peek() == b'}' {
                    self.pos += 1;
                    return Json::Obj(fields);
                }
                loop {
                    self.skip_ws();
                    let key = self.string();
                    self.eat(b':');
                    let value = self.value();
                    fields.push((key, value));
                    self.skip_ws();
                    match self.peek() {
                        b',' => self.pos += 1,
                        _ => {
                            self.eat(b'}');
                            return Json::Obj(fields);
                        }
                    }
                }
            }
            b'[' => {
                self.pos += 1;
                let mut items = Vec::new();
                self.skip_ws();
                if self.peek() == b']' {
                    self.pos += 1;
                    return Json::Arr(items);
                }
                loop {
                    items.push(self.value());
                    self.skip_ws();
                    match self.peek() {
                        b',' => self.pos += 1,
                        _ => {
                            self.eat(b']');
                            return Json::Arr(items);
                        }
                    }
                }
            }
            b'"' => Json::Str(self.string()),
            b't' => self.literal("true", Json::Bool(true)),
            b'f' => self.literal("false", Json::Bool(false)),
            b'n' => self.literal("null", Json::Null),
            _ => {
                let start = self.pos;
                while self
                    .bytes
                    .get(self.pos)
                    .is_some_and(|b| b.is_ascii_digit() || b"+-.eE".contains(b))
                {
                    self.pos += 1;
                }
                assert!(self.pos > start, "bad JSON value at byte {start}");
                Json::Num(String::from_utf8_lossy(&self.bytes[start..self.pos]).into_owned())
            }
        }
    }

    fn string(&mut self) -> String {
        self.eat(b'"');
        let mut out = Vec::new();
        loop {
            let b = self.peek();
            self.pos += 1;
            match b {
                b'"' => break,
                b'\\' => {
                    let esc = self.peek();
                    self.pos += 1;
                    match esc {
                        b'n' => out.push(b'\n'),
                        b't' => out.push(b'\t'),
                        b'r' => out.push(b'\r'),
                        b'b' => out.push(8),
                        b'f' => out.push(12),
                        b'u' => {
                            let mut code = self.hex4();
                            if (0xD800..0xDC00).contains(&code) {
                                self.eat(b'\\');
                                self.eat(b'u');
                                let low = self.hex4();
                                code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
                            }
                            let c = char::from_u32(code).unwrap_or('\u{FFFD}');
                            out.extend_from_slice(c.to_string().as_bytes());
                        }
                        other => out.push(other),
                    }
                }
                other => out.push(other),
            }
        }
        String::from_utf8(out).expect("UTF-8 JSON string")
    }

    fn hex4(&mut self) -> u32 {
        let digits = std::str::from_utf8(&self.bytes[self.pos..self.pos + 4]).expect("hex");
        self.pos += 4;
        u32::from_str_radix(digits, 16).expect("\\u escape")
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    fn sextet(c: u8) -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c:?}"),
        }
    }
    let clean: Vec<u8> = text.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::new();
    for chunk in clean.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= sextet(c) << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    out
}

/// Parses the first `X.Y.Z` of a version string.
fn semver(version: &str) -> (u64, u64, u64) {
    let mut parts = version
        .trim_start_matches('v')
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u64>().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

/// Parses "lease 694d7b2f8e0a1c05 granted with TTL(60s)" into the lease id.
fn granted_lease(out: &str, ttl: i64) -> (String, i64) {
    let id = out
        .strip_prefix("lease ")
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_else(|| panic!("unexpected `lease grant` output {out:?}"))
        .to_string();
    assert_eq!(out, format!("lease {id} granted with TTL({ttl}s)\n"));
    let num = u64::from_str_radix(&id, 16)
        .unwrap_or_else(|_| panic!("lease id {id:?} is not hexadecimal"));
    (id, num as i64)
}

// ---------------------------------------------------------------------------------------------
// The cases.
// ---------------------------------------------------------------------------------------------

mod cases {
    use super::*;

    pub fn put_get(t: &Target) {
        let base = t.rev();
        assert_eq!(t.ok(&["put", "foo", "bar"]), "OK\n");
        assert_eq!(t.ok(&["get", "foo"]), "foo\nbar\n");
        assert_eq!(t.ok(&["put", "foo", "baz", "--prev-kv"]), "OK\nfoo\nbar\n");
        assert_eq!(t.ok(&["get", "foo", "--print-value-only"]), "baz\n");
        assert_eq!(t.ok(&["put", "sp", "hello world"]), "OK\n");
        assert_eq!(t.ok(&["get", "sp"]), "sp\nhello world\n");
        assert_eq!(t.ok(&["get", "nosuch"]), "");
        // --ignore-value keeps the value and still makes a new version.
        assert_eq!(t.ok(&["put", "foo", "--ignore-value"]), "OK\n");

        let got = t.json(&["get", "foo"]);
        assert_eq!(got.get("header").get("revision").i64(), base + 4);
        assert_eq!(got.get("count").i64(), 1);
        assert!(!got.get("more").bool());
        let kv = got.get("kvs").at(0);
        assert_eq!(kv.get("key").b64(), "foo");
        assert_eq!(kv.get("value").b64(), "baz");
        assert_eq!(kv.get("create_revision").i64(), base + 1);
        assert_eq!(kv.get("mod_revision").i64(), base + 4);
        assert_eq!(kv.get("version").i64(), 3);
        assert_eq!(kv.get("lease").i64(), 0);
        assert_eq!(got.get("kvs").arr().len(), 1);

        let empty = t.json(&["get", "nosuch"]);
        assert!(empty.get("kvs").arr().is_empty());
        assert_eq!(empty.get("count").i64(), 0);
        assert_eq!(empty.get("header").get("revision").i64(), base + 4);

        t.fails_with(&["put", "", "x"], "Error: etcdserver: key is not provided");
        t.fails_with(
            &["put", "absent", "--ignore-value"],
            "Error: etcdserver: key not found",
        );
        // Failed writes make no revision.
        assert_eq!(t.rev(), base + 4);
    }

    pub fn get_ranges(t: &Target) {
        let base = t.rev();
        for (k, v) in [
            ("k1", "v1"),
            ("k2", "v2"),
            ("k3", "v3"),
            ("k4", "v4"),
            ("other", "o"),
        ] {
            assert_eq!(t.ok(&["put", k, v]), "OK\n");
        }
        assert_eq!(t.ok(&["put", "k1", "v1b"]), "OK\n"); // base + 6

        assert_eq!(
            t.ok(&["get", "k", "--prefix"]),
            "k1\nv1b\nk2\nv2\nk3\nv3\nk4\nv4\n"
        );
        // [k2, k4)
        assert_eq!(t.ok(&["get", "k2", "k4"]), "k2\nv2\nk3\nv3\n");
        assert_eq!(
            t.ok(&["get", "k3", "--from-key"]),
            "k3\nv3\nk4\nv4\nother\no\n"
        );
        // The whole keyspace: key "\0" with range end "\0".
        assert_eq!(
            t.keys(&["get", "", "--from-key"]),
            ["k1", "k2", "k3", "k4", "other"]
        );
        assert_eq!(
            t.keys(&["get", "", "--prefix"]),
            ["k1", "k2", "k3", "k4", "other"]
        );
        assert_eq!(
            t.ok(&["get", "k", "--prefix", "--keys-only"]),
            "k1\n\nk2\n\nk3\n\nk4\n\n"
        );
        assert_eq!(
            t.ok(&["get", "k", "--prefix", "--print-value-only"]),
            "v1b\nv2\nv3\nv4\n"
        );
        assert_eq!(
            t.ok(&["get", "k", "--prefix", "--limit", "2"]),
            "k1\nv1b\nk2\nv2\n"
        );

        let limited = t.json(&["get", "k", "--prefix", "--limit", "2"]);
        assert!(limited.get("more").bool(), "more: {limited:?}");
        assert_eq!(limited.get("count").i64(), 4);
        assert_eq!(limited.get("kvs").arr().len(), 2);
        let all = t.json(&["get", "k", "--prefix", "--limit", "4"]);
        assert!(!all.get("more").bool(), "more: {all:?}");
        assert_eq!(all.get("count").i64(), 4);

        let keys_only = t.json(&["get", "k", "--prefix", "--keys-only"]);
        for kv in keys_only.get("kvs").arr() {
            assert!(!kv.has("value"), "keys-only returned a value: {kv:?}");
            assert!(kv.get("mod_revision").i64() > base);
        }
        assert_eq!(keys_only.get("kvs").arr().len(), 4);

        // Reads at a past revision.
        assert_eq!(
            t.ok(&["get", "k1", &format!("--rev={}", base + 1)]),
            "k1\nv1\n"
        );
        assert_eq!(
            t.ok(&["get", "k", "--prefix", &format!("--rev={}", base + 2)]),
            "k1\nv1\nk2\nv2\n"
        );
        let past = t.json(&["get", "k", "--prefix", &format!("--rev={}", base + 3)]);
        assert_eq!(past.get("count").i64(), 3);
        // The header carries the current revision, not the requested one.
        assert_eq!(past.get("header").get("revision").i64(), base + 6);
        t.fails_with(
            &["get", "k1", &format!("--rev={}", base + 100)],
            "Error: etcdserver: mvcc: required revision is a future revision",
        );

        let k1 = t.json(&["get", "k1"]);
        let kv = k1.get("kvs").at(0);
        assert_eq!(kv.get("create_revision").i64(), base + 1);
        assert_eq!(kv.get("mod_revision").i64(), base + 6);
        assert_eq!(kv.get("version").i64(), 2);

        // --count-only exists from etcdctl 3.5 on, and needs `-w fields`.
        if t.ctl == Ctl::V35 {
            let fields = t.ok(&["get", "k", "--prefix", "--count-only", "-w", "fields"]);
            assert!(fields.contains("\"Count\" : 4\n"), "{fields}");
            assert!(!fields.contains("\"Key\""), "{fields}");
            assert!(fields.contains(&format!("\"Revision\" : {}\n", base + 6)));
        }
    }

    pub fn get_sort(t: &Target) {
        for (k, v) in [("s/b", "2"), ("s/a", "3"), ("s/c", "1")] {
            assert_eq!(t.ok(&["put", k, v]), "OK\n");
        }
        let sorted = |args: &[&str]| {
            let mut all = vec!["get", "s/", "--prefix"];
            all.extend_from_slice(args);
            t.keys(&all)
        };
        assert_eq!(sorted(&[]), ["s/a", "s/b", "s/c"]);
        assert_eq!(sorted(&["--order=DESCEND"]), ["s/c", "s/b", "s/a"]);
        assert_eq!(
            sorted(&["--sort-by=KEY", "--order=ASCEND"]),
            ["s/a", "s/b", "s/c"]
        );
        assert_eq!(
            sorted(&["--sort-by=KEY", "--order=DESCEND"]),
            ["s/c", "s/b", "s/a"]
        );
        assert_eq!(
            sorted(&["--sort-by=CREATE", "--order=ASCEND"]),
            ["s/b", "s/a", "s/c"]
        );
        assert_eq!(
            sorted(&["--sort-by=CREATE", "--order=DESCEND"]),
            ["s/c", "s/a", "s/b"]
        );
        assert_eq!(t.ok(&["put", "s/b", "4"]), "OK\n");
        assert_eq!(
            sorted(&["--sort-by=MODIFY", "--order=ASCEND"]),
            ["s/a", "s/c", "s/b"]
        );
        assert_eq!(
            sorted(&["--sort-by=MODIFY", "--order=DESCEND"]),
            ["s/b", "s/c", "s/a"]
        );
        assert_eq!(
            sorted(&["--sort-by=VALUE", "--order=ASCEND"]),
            ["s/c", "s/a", "s/b"]
        );
        assert_eq!(
            sorted(&["--sort-by=VALUE", "--order=DESCEND"]),
            ["s/b", "s/a", "s/c"]
        );
        assert_eq!(
            sorted(&["--sort-by=VERSION", "--order=DESCEND"])[0],
            "s/b",
            "the only key at version 2 comes first"
        );
        // The limit applies after sorting.
        assert_eq!(
            sorted(&["--sort-by=MODIFY", "--order=DESCEND", "--limit", "1"]),
            ["s/b"]
        );
        assert_eq!(
            sorted(&["--sort-by=VALUE", "--order=ASCEND", "--limit", "2"]),
            ["s/c", "s/a"]
        );
        assert_eq!(sorted(&["--order=DESCEND", "--limit", "1"]), ["s/c"]);
    }

    pub fn delete(t: &Target) {
        let base = t.rev();
        for (k, v) in [
            ("d/1", "v1"),
            ("d/2", "v2"),
            ("d/3", "v3"),
            ("d/4", "v4"),
            ("d/5", "v5"),
            ("x", "y"),
        ] {
            assert_eq!(t.ok(&["put", k, v]), "OK\n");
        }
        assert_eq!(t.ok(&["del", "d/1"]), "1\n");
        assert_eq!(t.ok(&["del", "nosuch"]), "0\n");
        // Deleting nothing makes no revision.
        assert_eq!(t.rev(), base + 7);
        assert_eq!(t.ok(&["del", "d/2", "--prev-kv"]), "1\nd/2\nv2\n");
        // [d/3, d/5)
        assert_eq!(t.ok(&["del", "d/3", "d/5"]), "2\n");
        assert_eq!(t.ok(&["put", "d/6", "v6"]), "OK\n");

        let deleted = t.json(&["del", "d/", "--prefix", "--prev-kv"]);
        assert_eq!(deleted.get("deleted").i64(), 2);
        let prev: Vec<(String, String, i64)> = deleted
            .get("prev_kvs")
            .arr()
            .iter()
            .map(|kv| {
                (
                    kv.get("key").b64(),
                    kv.get("value").b64(),
                    kv.get("mod_revision").i64(),
                )
            })
            .collect();
        assert_eq!(
            prev,
            [
                ("d/5".to_string(), "v5".to_string(), base + 5),
                ("d/6".to_string(), "v6".to_string(), base + 10),
            ]
        );
        assert_eq!(deleted.get("header").get("revision").i64(), base + 11);
        assert_eq!(t.ok(&["get", "d/", "--prefix"]), "");

        // Everything that is left: only x (no keys of the server's own are visible).
        assert_eq!(t.ok(&["del", "", "--from-key"]), "1\n");
        assert_eq!(t.ok(&["get", "", "--from-key"]), "");
        assert_eq!(t.rev(), base + 12);

        // A deleted key comes back at version 1 with a new create revision.
        assert_eq!(t.ok(&["put", "x", "again"]), "OK\n");
        let x = t.json(&["get", "x"]);
        let kv = x.get("kvs").at(0);
        assert_eq!(kv.get("version").i64(), 1);
        assert_eq!(kv.get("create_revision").i64(), base + 13);
    }

    pub fn txn(t: &Target) {
        let base = t.rev();
        assert_eq!(t.ok(&["put", "t1", "v1"]), "OK\n");
        assert_eq!(t.ok(&["put", "t2", "v2"]), "OK\n");

        let success =
            "value(\"t1\") = \"v1\"\nmod(\"t2\") > \"0\"\n\nput t1 yes\nget t2\n\nput t1 no\n\n";
        assert_eq!(t.txn(success, &[]), "SUCCESS\n\nOK\n\nt2\nv2\n");
        assert_eq!(t.ok(&["get", "t1", "--print-value-only"]), "yes\n");
        assert_eq!(t.rev(), base + 3);

        // The same compares fail now: the failure branch runs.
        assert_eq!(
            t.txn(success, &[]),
            "FAILURE\n\nOK\n",
            "failure branch output"
        );
        assert_eq!(t.ok(&["get", "t1", "--print-value-only"]), "no\n");
        assert_eq!(t.rev(), base + 4);

        // Every kind of compare etcdctl can send (its `lease(...)` compare is broken in 3.5.1).
        let compares = format!(
            "version(\"t1\") = \"3\"\ncreate(\"t1\") = \"{c}\"\nmod(\"t1\") = \"{m}\"\n\
             mod(\"t1\") > \"{c}\"\ncreate(\"t2\") < \"{m}\"\nvalue(\"t2\") != \"x\"\n\
             value(\"t1\") < \"z\"\nvalue(\"t1\") > \"a\"\nversion(\"absent\") = \"0\"\n\
             \nput t3 v3\ndel t2\n\nput wrong branch\n\n",
            c = base + 1,
            m = base + 4
        );
        assert_eq!(t.txn(&compares, &[]), "SUCCESS\n\nOK\n\n1\n");
        // Two writes, one revision.
        assert_eq!(t.rev(), base + 5);
        assert_eq!(t.keys(&["get", "t", "--prefix"]), ["t1", "t3"]);
        assert_eq!(t.ok(&["get", "wrong"]), "");
        let t3 = t.json(&["get", "t3"]);
        assert_eq!(t3.get("kvs").at(0).get("mod_revision").i64(), base + 5);

        // No compares: the success branch always runs; JSON output.
        let got = Json::parse(&t.txn("\nget t --prefix\nput t4 v4\n\n\n", &["-w", "json"]));
        assert!(got.get("succeeded").bool(), "{got:?}");
        assert_eq!(got.get("header").get("revision").i64(), base + 6);
        let responses = got.get("responses").arr();
        assert_eq!(responses.len(), 2, "{got:?}");
        // etcdctl 3.5 names the oneof fields response_range/response_put, 3.4 ResponseRange/..
        let op = |resp: &Json, snake: &str, camel: &str| {
            let inner = resp.get("Response");
            if inner.has(snake) {
                inner.get(snake).clone()
            } else {
                inner.get(camel).clone()
            }
        };
        let range = op(&responses[0], "response_range", "ResponseRange");
        assert_eq!(range.get("count").i64(), 2);
        let keys: Vec<String> = range
            .get("kvs")
            .arr()
            .iter()
            .map(|kv| kv.get("key").b64())
            .collect();
        assert_eq!(keys, ["t1", "t3"]);
        assert!(
            op(&responses[1], "response_put", "ResponsePut").has("header"),
            "{got:?}"
        );

        // A failing compare with no failure ops: nothing happens, no revision.
        let got = Json::parse(&t.txn(
            "value(\"t1\") = \"nope\"\n\nput t5 v5\n\n\n",
            &["-w", "json"],
        ));
        assert!(!got.get("succeeded").bool(), "{got:?}");
        assert!(got.get("responses").arr().is_empty(), "{got:?}");
        assert_eq!(got.get("header").get("revision").i64(), base + 6);
        assert_eq!(t.ok(&["get", "t5"]), "");
    }

    pub fn watch_history(t: &Target) {
        let base = t.rev();
        assert_eq!(t.ok(&["put", "w/a", "1"]), "OK\n");
        assert_eq!(t.ok(&["put", "w/a", "2"]), "OK\n");
        assert_eq!(t.ok(&["del", "w/a"]), "1\n");
        assert_eq!(t.ok(&["put", "w/b", "3"]), "OK\n");
        assert_eq!(t.ok(&["put", "x", "9"]), "OK\n");
        let from = format!("--rev={}", base + 1);

        t.watch(&["w/", "--prefix", &from])
            .expect("PUT\nw/a\n1\nPUT\nw/a\n2\nDELETE\nw/a\n\nPUT\nw/b\n3\n");
        t.watch(&["w/", "--prefix", &from, "--prev-kv"])
            .expect("PUT\nw/a\n1\nPUT\nw/a\n1\nw/a\n2\nDELETE\nw/a\n2\nw/a\n\nPUT\nw/b\n3\n");
        t.watch(&["w/a", &format!("--rev={}", base + 2)])
            .expect("PUT\nw/a\n2\nDELETE\nw/a\n\n");
        // [w/b, x]: x itself is outside the range.
        t.watch(&["w/b", "x", &from]).expect("PUT\nw/b\n3\n");
        t.watch(&["", "--prefix", &format!("--rev={}", base + 4)])
            .expect("PUT\nw/b\n3\nPUT\nx\n9\n");

        // Events that arrive while watching, after the history.
        let mut live = t.watch(&["w/", "--prefix", &format!("--rev={}", base + 4)]);
        live.wait_until(Duration::from_secs(15), |text| text == "PUT\nw/b\n3\n");
        assert_eq!(t.ok(&["put", "w/c", "4"]), "OK\n");
        assert_eq!(t.ok(&["put", "elsewhere", "5"]), "OK\n");
        assert_eq!(t.ok(&["del", "w/", "--prefix"]), "2\n");
        live.expect("PUT\nw/b\n3\nPUT\nw/c\n4\nDELETE\nw/b\n\nDELETE\nw/c\n\n");
    }

    pub fn watch_json(t: &Target) {
        let base = t.rev();
        assert_eq!(t.ok(&["put", "j/a", "1"]), "OK\n");
        assert_eq!(t.ok(&["put", "j/a", "2"]), "OK\n");
        assert_eq!(t.ok(&["del", "j/a"]), "1\n");
        // One revision, two events: a txn that writes two keys.
        assert_eq!(
            t.txn("\nput j/b 3\nput j/c 4\n\n\n", &[]),
            "SUCCESS\n\nOK\n\nOK\n"
        );
        let mut w = t.watch(&[
            "j/",
            "--prefix",
            "--prev-kv",
            "-w",
            "json",
            &format!("--rev={}", base + 1),
        ]);
        let count_events = |text: &str| -> usize {
            text.lines()
                .filter(|line| line.ends_with('}'))
                .map(|line| Json::parse(line).get("Events").arr().len())
                .sum()
        };
        w.wait_until(Duration::from_secs(15), |text| count_events(text) >= 5);
        let text = w.settle(Duration::from_millis(300));

        let mut events = Vec::new();
        let mut last_header = 0;
        for line in text.lines() {
            let resp = Json::parse(line);
            let header_rev = resp.get("Header").get("revision").i64();
            assert!(
                header_rev >= last_header,
                "header revision went back: {text}"
            );
            last_header = header_rev;
            assert!(!resp.get("Canceled").bool(), "{line}");
            for ev in resp.get("Events").arr() {
                let kv = ev.get("kv");
                assert!(kv.get("mod_revision").i64() <= header_rev, "{line}");
                events.push((
                    ev.get("type").i64(),
                    kv.get("key").b64(),
                    kv.get("value").b64(),
                    kv.get("mod_revision").i64(),
                    kv.get("version").i64(),
                    ev.get("prev_kv").get("value").b64(),
                ));
            }
        }
        let s = |x: &str| x.to_string();
        assert_eq!(
            events,
            [
                (0, s("j/a"), s("1"), base + 1, 1, s("")),
                (0, s("j/a"), s("2"), base + 2, 2, s("1")),
                (1, s("j/a"), s(""), base + 3, 0, s("2")),
                (0, s("j/b"), s("3"), base + 4, 1, s("")),
                (0, s("j/c"), s("4"), base + 4, 1, s("")),
            ],
            "events (type, key, value, mod_revision, version, prev value) in {text}"
        );
        // The two events of revision base+4 come in one response, never split.
        let per_line: Vec<usize> = text
            .lines()
            .map(|line| {
                Json::parse(line)
                    .get("Events")
                    .arr()
                    .iter()
                    .filter(|e| e.get("kv").get("mod_revision").i64() == base + 4)
                    .count()
            })
            .filter(|&n| n > 0)
            .collect();
        assert_eq!(
            per_line,
            [2],
            "revision {} split across responses: {text}",
            base + 4
        );
    }

    pub fn watch_live(t: &Target) {
        // No start revision: events from "now" on. Write until the watch shows one, so the
        // test does not depend on when the watch got registered.
        let mut w = t.watch(&["live/", "--prefix"]);
        let mut first = None;
        for i in 0..100 {
            assert_eq!(t.ok(&["put", "live/k", &format!("v{i}")]), "OK\n");
            let seen = w.settle(Duration::from_millis(200));
            if !seen.is_empty() {
                first = Some((seen, i));
                break;
            }
        }
        let (seen, last) = first.expect("the watch never showed an event");
        let start: usize = seen
            .strip_prefix("PUT\nlive/k\nv")
            .and_then(|rest| rest.split('\n').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first watch output {seen:?}"));
        assert_eq!(t.ok(&["put", "live/other", "x"]), "OK\n");
        assert_eq!(t.ok(&["put", "elsewhere", "y"]), "OK\n");
        assert_eq!(t.ok(&["del", "live/k"]), "1\n");
        let mut expected: String = (start..=last)
            .map(|i| format!("PUT\nlive/k\nv{i}\n"))
            .collect();
        expected.push_str("PUT\nlive/other\nx\nDELETE\nlive/k\n\n");
        w.expect(&expected);
    }

    pub fn watch_compacted(t: &Target) {
        let base = t.rev();
        for v in ["1", "2", "3"] {
            assert_eq!(t.ok(&["put", "c", v]), "OK\n");
        }
        assert_eq!(
            t.ok(&["compaction", &(base + 2).to_string()]),
            format!("compacted revision {}\n", base + 2)
        );
        // The server cancels the watch, and etcdctl exits.
        let out = t.run(&["watch", "c", &format!("--rev={}", base + 1)], None);
        assert!(!out.status.success(), "{}", out.combined());
        assert!(
            out.combined()
                .contains("etcdserver: mvcc: required revision has been compacted"),
            "{}",
            out.combined()
        );
        // From the compaction revision on, the history is there.
        t.watch(&["c", &format!("--rev={}", base + 2)])
            .expect("PUT\nc\n2\nPUT\nc\n3\n");
    }

    pub fn lease(t: &Target) {
        let (id, num) = granted_lease(&t.ok(&["lease", "grant", "60"]), 60);
        let with_lease = format!("--lease={id}");
        assert_eq!(t.ok(&["put", "lk1", "x", &with_lease]), "OK\n");
        assert_eq!(t.ok(&["put", "lk2", "y", &with_lease]), "OK\n");
        assert_eq!(t.ok(&["put", "plain", "z"]), "OK\n");
        assert_eq!(
            t.json(&["get", "lk1"]).get("kvs").at(0).get("lease").i64(),
            num
        );

        // "lease ID granted with TTL(60s), remaining(59s), attached keys([lk1 lk2])", the
        // attached keys in no particular order.
        let ttl = t.ok(&["lease", "timetolive", &id, "--keys"]);
        let (remaining, mut attached) = ttl
            .strip_prefix(&format!("lease {id} granted with TTL(60s), remaining("))
            .and_then(|rest| rest.strip_suffix("])\n"))
            .and_then(|rest| rest.split_once("s), attached keys(["))
            .and_then(|(n, keys)| {
                Some((n.parse::<i64>().ok()?, keys.split(' ').collect::<Vec<_>>()))
            })
            .unwrap_or_else(|| panic!("unexpected `lease timetolive --keys` output {ttl:?}"));
        attached.sort_unstable();
        assert!((50..=60).contains(&remaining), "{ttl}");
        assert_eq!(attached, ["lk1", "lk2"], "{ttl}");
        let ttl = t.ok(&["lease", "timetolive", &id]);
        assert!(
            ttl.starts_with(&format!("lease {id} granted with TTL(60s), remaining(")),
            "{ttl}"
        );
        assert!(!ttl.contains("attached keys"), "{ttl}");

        let ttl = t.json(&["lease", "timetolive", &id, "--keys"]);
        assert_eq!(ttl.get("id").i64(), num);
        assert_eq!(ttl.get("granted-ttl").i64(), 60);
        assert!((50..=60).contains(&ttl.get("ttl").i64()), "{ttl:?}");
        let mut keys: Vec<String> = ttl.get("keys").arr().iter().map(Json::b64).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["lk1", "lk2"]);

        assert_eq!(
            t.ok(&["lease", "keep-alive", "--once", &id]),
            format!("lease {id} keepalived with TTL(60)\n")
        );
        assert_eq!(t.ok(&["lease", "list"]), format!("found 1 leases\n{id}\n"));
        let list = t.json(&["lease", "list"]);
        assert_eq!(list.get("leases").arr().len(), 1);
        assert_eq!(list.get("leases").at(0).get("id").i64(), num);

        let before = t.rev();
        assert_eq!(
            t.ok(&["lease", "revoke", &id]),
            format!("lease {id} revoked\n")
        );
        // The attached keys are deleted, in one revision; other keys stay.
        assert_eq!(t.ok(&["get", "lk", "--prefix"]), "");
        assert_eq!(t.ok(&["get", "plain"]), "plain\nz\n");
        assert_eq!(t.rev(), before + 1);
        assert_eq!(
            t.ok(&["lease", "timetolive", &id]),
            format!("lease {id} already expired\n")
        );
        assert_eq!(t.ok(&["lease", "list"]), "found 0 leases\n");

        t.fails_with(
            &["lease", "revoke", &id],
            "etcdserver: requested lease not found",
        );
        t.fails_with(
            &["put", "k", "v", "--lease=1234abcd"],
            "Error: etcdserver: requested lease not found",
        );
        t.fails(&["lease", "keep-alive", "--once", &id]);
    }

    pub fn lease_expiry(t: &Target) {
        let (id, _) = granted_lease(&t.ok(&["lease", "grant", "2"]), 2);
        let granted = Instant::now();
        assert_eq!(t.ok(&["put", "ek", "v", &format!("--lease={id}")]), "OK\n");
        let put_rev = t.rev();
        assert_eq!(t.ok(&["get", "ek"]), "ek\nv\n");
        // Keys really expire: within a few seconds of the TTL, not before about the TTL.
        let deadline = granted + Duration::from_secs(20);
        loop {
            if t.ok(&["get", "ek"]).is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "key with a 2s lease still there after 20s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(
            granted.elapsed() >= Duration::from_millis(1500),
            "key with a 2s lease expired after {:?}",
            granted.elapsed()
        );
        assert_eq!(
            t.ok(&["lease", "timetolive", &id]),
            format!("lease {id} already expired\n")
        );
        // The expiry is a delete event like any other.
        t.watch(&["ek", &format!("--rev={put_rev}")])
            .expect("PUT\nek\nv\nDELETE\nek\n\n");
    }

    pub fn compaction(t: &Target) {
        let base = t.rev();
        for v in ["1", "2", "3"] {
            assert_eq!(t.ok(&["put", "c", v]), "OK\n");
        }
        let (r1, r2, r3) = (base + 1, base + 2, base + 3);
        assert_eq!(
            t.ok(&["compaction", &r2.to_string()]),
            format!("compacted revision {r2}\n")
        );
        t.fails_with(
            &["get", "c", &format!("--rev={r1}")],
            "Error: etcdserver: mvcc: required revision has been compacted",
        );
        assert_eq!(t.ok(&["get", "c", &format!("--rev={r2}")]), "c\n2\n");
        assert_eq!(t.ok(&["get", "c"]), "c\n3\n");
        t.fails_with(
            &["compaction", &r1.to_string()],
            "Error: etcdserver: mvcc: required revision has been compacted",
        );
        t.fails_with(
            &["compaction", &(base + 100).to_string()],
            "Error: etcdserver: mvcc: required revision is a future revision",
        );
        assert_eq!(
            t.ok(&["compaction", "--physical", &r3.to_string()]),
            format!("compacted revision {r3}\n")
        );
        t.fails_with(
            &["get", "c", &format!("--rev={r2}")],
            "Error: etcdserver: mvcc: required revision has been compacted",
        );
        // Compaction is not a write: no new revision; data at the head is intact. The one
        // exception is the etcd proxy, which records each compaction of the tenant in the
        // shared etcd, one revision of the cluster each (two compactions succeeded here).
        let head = if t.server == Server::KineEtcdProxy {
            r3 + 2
        } else {
            r3
        };
        assert_eq!(t.rev(), head);
        let c = t.json(&["get", "c"]);
        let kv = c.get("kvs").at(0);
        assert_eq!(kv.get("version").i64(), 3);
        assert_eq!(kv.get("create_revision").i64(), r1);
        assert_eq!(kv.get("mod_revision").i64(), r3);
        assert_eq!(t.ok(&["put", "c", "4"]), "OK\n");
        assert_eq!(t.rev(), head + 1);
    }

    pub fn endpoint_status(t: &Target) {
        assert_eq!(t.ok(&["put", "s", "1"]), "OK\n");
        let rev = t.rev();
        let got = t.json(&["endpoint", "status"]);
        assert_eq!(got.arr().len(), 1, "{got:?}");
        let entry = got.at(0);
        assert_eq!(entry.get("Endpoint").str(), t.address);
        let status = entry.get("Status");
        assert_eq!(status.get("header").get("revision").i64(), rev);
        let version = status.get("version").str();
        if t.is_etcd() {
            assert_eq!(version, "3.5.1");
        } else {
            // kube-apiserver wants 3.5.13+ (or 3.6).
            assert!(
                semver(version) >= (3, 5, 13),
                "version {version:?} is below 3.5.13"
            );
        }
        let member = status.get("header").get("member_id").int();
        assert_ne!(member, 0, "{status:?}");
        assert_eq!(
            status.get("leader").int(),
            member,
            "a single member leads: {status:?}"
        );

        let simple = t.ok(&["endpoint", "status"]);
        assert!(
            simple.starts_with(&format!("{}, {member:x}, {version}, ", t.address)),
            "{simple}"
        );
    }

    pub fn endpoint_health(t: &Target) {
        let out = t.run(&["endpoint", "health"], None);
        assert!(out.status.success(), "{}", out.combined());
        // etcdctl 3.5 prints to stdout, 3.4 to stderr.
        assert!(
            out.combined().contains(&format!(
                "{} is healthy: successfully committed proposal: took = ",
                t.address
            )),
            "{}",
            out.combined()
        );
        let got = t.json(&["endpoint", "health"]);
        assert_eq!(got.arr().len(), 1, "{got:?}");
        assert_eq!(got.at(0).get("endpoint").str(), t.address);
        assert!(got.at(0).get("health").bool(), "{got:?}");
        assert_eq!(got.at(0).get("error").str(), "");
    }

    pub fn member_list(t: &Target) {
        let got = t.json(&["member", "list"]);
        let members = got.get("members").arr();
        assert_eq!(members.len(), 1, "{got:?}");
        let m = &members[0];
        let id = m.get("ID").int();
        assert_ne!(id, 0, "{got:?}");
        assert_eq!(got.get("header").get("member_id").int(), id, "{got:?}");
        assert!(!m.get("name").str().is_empty(), "{got:?}");
        let client_urls: Vec<&str> = m.get("clientURLs").arr().iter().map(Json::str).collect();
        assert!(
            client_urls.contains(&format!("http://{}", t.address).as_str()),
            "clientURLs {client_urls:?} should contain http://{}",
            t.address
        );
        assert!(!m.get("isLearner").bool());

        let simple = t.ok(&["member", "list"]);
        assert_eq!(simple.lines().count(), 1, "{simple}");
        assert!(
            simple.starts_with(&format!("{id:x}, started, {}, ", m.get("name").str())),
            "{simple}"
        );
        assert!(
            simple.contains(&format!("http://{}", t.address)),
            "{simple}"
        );
        assert!(simple.ends_with(", false\n"), "{simple}");
    }
}

// ---------------------------------------------------------------------------------------------
// One module of tests per target.
// ---------------------------------------------------------------------------------------------

fn run_case(server: Server, ctl: Ctl, case: fn(&Target)) {
    if let Some(target) = Target::start(server, ctl) {
        case(&target);
    }
}

macro_rules! etcdctl_cases {
    ($server:expr, $ctl:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                run_case($server, $ctl, cases::$case);
            }
        )*
    };
}

macro_rules! etcdctl_target {
    ($target:ident, $server:expr, $ctl:expr) => {
        mod $target {
            use super::*;
            etcdctl_cases!(
                $server, $ctl;
                put_get,
                get_ranges,
                get_sort,
                delete,
                txn,
                watch_history,
                watch_json,
                watch_live,
                watch_compacted,
                lease,
                lease_expiry,
                compaction,
                endpoint_status,
                endpoint_health,
                member_list,
            );
        }
    };
}

etcdctl_target!(etcd, Server::Etcd, Ctl::V35);
etcdctl_target!(etcd_etcdctl34, Server::Etcd, Ctl::V34);
etcdctl_target!(kine_sqlite, Server::KineSqlite, Ctl::V35);
etcdctl_target!(kine_sqlite_etcdctl34, Server::KineSqlite, Ctl::V34);
etcdctl_target!(kine_nats, Server::KineNats, Ctl::V35);
etcdctl_target!(kine_etcd_proxy, Server::KineEtcdProxy, Ctl::V35);
