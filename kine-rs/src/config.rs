//! Command-line flags, compatible with kine's so kine-rs can replace the kine container that
//! Kamaji and k3s run. Every flag can also be set as a `KINE_*` environment variable.

use std::time::Duration;

use clap::{Parser, ValueEnum};

/// Serve the etcd v3 API from SQLite (more datastores to come).
#[derive(Debug, Clone, Parser)]
#[command(name = "kine-rs", version, about)]
pub struct Config {
    /// Datastore: `sqlite://PATH`, `memory://` (a throwaway SQLite file),
    /// `postgres://USER:PASS@HOST:PORT/DB` or `mysql://USER:PASS@tcp(HOST:PORT)/DB` (also
    /// `mysql://USER:PASS@HOST:PORT/DB`), `nats://HOST:PORT`, or an etcd cluster behind the
    /// tenant-prefixing proxy: `etcd://HOST:PORT[,HOST:PORT...]` (`etcds://` or
    /// `--ca-file` for TLS), also `http(s)://HOST:PORT[,...]`. Empty means the embedded
    /// default, `sqlite://./db/state.db`.
    #[arg(long, env = "KINE_ENDPOINT", default_value = "")]
    pub endpoint: String,

    /// Where to serve: `host:port`, `http://host:port` or `unix://PATH`.
    #[arg(long, env = "KINE_LISTEN_ADDRESS", default_value = "127.0.0.1:2379")]
    pub listen_address: String,

    /// Serve TLS with this certificate (PEM).
    #[arg(long, env = "KINE_SERVER_CERT_FILE", requires = "server_key_file")]
    pub server_cert_file: Option<String>,

    /// The key of `--server-cert-file` (PEM).
    #[arg(long, env = "KINE_SERVER_KEY_FILE", requires = "server_cert_file")]
    pub server_key_file: Option<String>,

    /// Require client certificates signed by this CA (mTLS).
    #[arg(long, env = "KINE_TRUSTED_CA_FILE", requires = "server_cert_file")]
    pub trusted_ca_file: Option<String>,

    /// CA certificate for TLS to the datastore (PostgreSQL, MySQL).
    #[arg(long, env = "KINE_CA_FILE")]
    pub ca_file: Option<String>,

    /// Client certificate for TLS to the datastore.
    #[arg(long, env = "KINE_CERT_FILE")]
    pub cert_file: Option<String>,

    /// Client key for TLS to the datastore.
    #[arg(long, env = "KINE_KEY_FILE")]
    pub key_file: Option<String>,

    /// Serve Prometheus metrics at `http://ADDRESS/metrics` (e.g. `:8080`); off when empty.
    #[arg(long, env = "KINE_METRICS_BIND_ADDRESS", default_value = "")]
    pub metrics_bind_address: String,

    /// Compact history this often (Go duration: `5m`, `30s`); `0` disables.
    #[arg(long, env = "KINE_COMPACT_INTERVAL", default_value = "5m", value_parser = parse_duration)]
    pub compact_interval: Duration,

    /// Revisions of history compaction keeps.
    #[arg(long, env = "KINE_COMPACT_MIN_RETAIN", default_value_t = 1000)]
    pub compact_min_retain: i64,

    /// How often watchers that asked for progress notifications get one when idle.
    #[arg(long, env = "KINE_WATCH_PROGRESS_NOTIFY_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub watch_progress_notify_interval: Duration,

    /// The etcd version reported by Status (kube-apiserver checks it).
    #[arg(long, env = "KINE_EMULATED_ETCD_VERSION", default_value = "3.5.13")]
    pub emulated_etcd_version: String,

    /// Largest write request accepted, in bytes (etcd's `--max-request-bytes`).
    #[arg(long, env = "KINE_MAX_REQUEST_BYTES", default_value_t = 1536 * 1024)]
    pub max_request_bytes: usize,

    /// Most operations in one transaction level (etcd's `--max-txn-ops`).
    #[arg(long, env = "KINE_MAX_TXN_OPS", default_value_t = 128)]
    pub max_txn_ops: usize,

    /// Most watchers one Watch stream may hold; a create beyond it is refused (answered
    /// created and canceled, with a reason), as etcd answers creates it cannot serve. etcd
    /// has no such limit.
    #[arg(long, env = "KINE_MAX_WATCHES_PER_STREAM", default_value_t = 10_000)]
    pub max_watches_per_stream: usize,

    /// Most leases one tenant may hold at once (default 20,000 in a gateway, 100,000
    /// otherwise); a grant beyond it gets `ResourceExhausted` with a message naming this flag.
    /// etcd has no such limit.
    #[arg(long, env = "KINE_MAX_LEASES_PER_TENANT")]
    pub max_leases_per_tenant: Option<u64>,

    /// Lease keep-alives of one tenant answered per second (0: no limit; default 2,000 in a
    /// gateway, 10,000 otherwise: either keeps the most leases a tenant may hold alive at a
    /// third of a 30 s TTL). Beyond it the tenant's keep-alive streams are read more slowly,
    /// so a flood cannot take the CPU and datastore connections other tenants need; no
    /// keep-alive is refused. etcd answers as fast as it can.
    #[arg(long, env = "KINE_MAX_KEEPALIVES_PER_SECOND")]
    pub max_keepalives_per_second: Option<u32>,

    /// Of those, keep-alives that repeat one of the tenant's leases within a tenth of its TTL
    /// (at most 5 s) of its last renewal in this process, answered per second (0: no limit).
    /// Clients keep a lease alive at a third of its TTL and never repeat so soon; a flood does,
    /// and beyond this rate its stream is read more slowly (nothing is refused). Every answer
    /// is still the lease's true TTL. etcd has no such limit.
    #[arg(
        long,
        env = "KINE_MAX_REPEATED_KEEPALIVES_PER_SECOND",
        default_value_t = 100
    )]
    pub max_repeated_keepalives_per_second: u32,

    /// Rows one tenant's reads may make the datastore read per second (0: no limit; default
    /// 50,000 in a gateway, no limit otherwise). A range, a transaction's compares and
    /// ranges, and a delete cost the rows they read (a range's count when it returns fewer);
    /// each event sent to one of the tenant's watchers costs one. A tenant past it has its
    /// next requests wait until the rows are paid off; the request that went past still runs
    /// whole. Nothing is refused. etcd has no such limit.
    #[arg(long, env = "KINE_MAX_READ_ROWS_PER_SECOND")]
    pub max_read_rows_per_second: Option<u64>,

    /// Bytes of write requests (puts, deletes, transactions) of one tenant per second (0: no
    /// limit; default 8 MiB in a gateway, no limit otherwise). Past it the tenant's next
    /// writes wait; nothing is refused. etcd has no such limit.
    #[arg(long, env = "KINE_MAX_WRITE_BYTES_PER_SECOND")]
    pub max_write_bytes_per_second: Option<u64>,

    /// Bytes of responses one Watch stream holds for a client that reads slower than events
    /// come; past it, the stream waits for the client and reads what it missed from history
    /// when it goes on.
    #[arg(long, env = "KINE_WATCH_STREAM_BUFFER_BYTES", default_value_t = 4 << 20)]
    pub watch_stream_buffer_bytes: usize,

    /// Bytes of new events a tenant's watch hub holds for streams that have not read them yet;
    /// past it, the oldest go and those streams read them from history instead.
    #[arg(long, env = "KINE_WATCH_HUB_BUFFER_BYTES", default_value_t = 16 << 20)]
    pub watch_hub_buffer_bytes: usize,

    /// SQLite: size of the write-ahead log past which the background checkpoint restarts it
    /// (the next commit starts it over and cuts the file back to this size; a log nothing
    /// writes to is emptied). That checkpoint briefly holds off writers while it waits (a
    /// bounded time) for readers of older snapshots to finish; below this size only
    /// checkpoints that never block anyone run, and those cannot start the log over while
    /// readers or writes keep overlapping them.
    #[arg(long, env = "KINE_SQLITE_WAL_LIMIT_BYTES", default_value_t = 64 << 20)]
    pub sqlite_wal_limit_bytes: u64,

    /// Most concurrent HTTP/2 streams (requests and open watch or keep-alive streams) per
    /// client connection (etcd's `--max-concurrent-streams`, unlimited there by default);
    /// clients queue requests beyond it.
    #[arg(long, env = "KINE_MAX_CONCURRENT_STREAMS", default_value_t = 1000)]
    pub max_concurrent_streams: u32,

    /// How often the server pings an idle client connection (etcd's
    /// `--grpc-keepalive-interval`); `0` disables.
    #[arg(long, env = "KINE_GRPC_KEEPALIVE_INTERVAL", default_value = "2h", value_parser = parse_duration)]
    pub grpc_keepalive_interval: Duration,

    /// How long the server waits for a ping's answer before closing the connection (etcd's
    /// `--grpc-keepalive-timeout`).
    #[arg(long, env = "KINE_GRPC_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub grpc_keepalive_timeout: Duration,

    /// Close a tenant this process holds open (its writer, caches) after it went unused this
    /// long with no watch or keep-alive stream open (Go duration); it reopens on its next
    /// request. `0` keeps tenants open.
    #[arg(long, env = "KINE_TENANT_IDLE_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    pub tenant_idle_timeout: Duration,

    /// Connections to the datastore kept open while idle (PostgreSQL, MySQL); 0 or less
    /// keeps none.
    #[arg(
        long,
        env = "KINE_DATASTORE_MAX_IDLE_CONNECTIONS",
        default_value_t = 2,
        allow_negative_numbers = true
    )]
    pub datastore_max_idle_connections: i64,

    /// Most connections open to the datastore at once; 0 or less means kine-rs's default (16).
    #[arg(
        long,
        env = "KINE_DATASTORE_MAX_OPEN_CONNECTIONS",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub datastore_max_open_connections: i64,

    /// Close datastore connections after this long (Go duration); `0` keeps them.
    #[arg(long, env = "KINE_DATASTORE_CONNECTION_MAX_LIFETIME", default_value = "0", value_parser = parse_duration)]
    pub datastore_connection_max_lifetime: Duration,

    /// Close datastore connections idle this long, beyond the idle ones kept (Go duration);
    /// `0` keeps them.
    #[arg(long, env = "KINE_DATASTORE_CONNECTION_MAX_IDLE_TIME", default_value = "0", value_parser = parse_duration)]
    pub datastore_connection_max_idle_time: Duration,

    /// Log datastore queries that take at least this long, at WARN, by kind of query (Go
    /// duration: `1s`, `500ms`); `0` logs none. Statements' values are never logged.
    #[arg(long, env = "KINE_SLOW_SQL_THRESHOLD", default_value = "1s", value_parser = parse_duration)]
    pub slow_sql_threshold: Duration,

    /// Gateway mode: another datastore tenants may have been moved to (repeatable), written
    /// as for `--endpoint`. A tenant the gateway moved live (`kine-rs tenant migrate`) is
    /// served from its target after a restart only when the target is given here.
    #[arg(long = "extra-endpoint", env = "KINE_EXTRA_ENDPOINT")]
    pub extra_endpoint: Vec<String>,

    /// etcd datastore (`--endpoint etcd://HOST:PORT,...`): where each tenant's keys live in
    /// the shared etcd, `{tenant}` standing for the tenant's name. It must end in `/` right
    /// after `{tenant}` (so that tenant `a` never covers tenant `ab`).
    #[arg(long, env = "KINE_ETCD_TENANT_PREFIX", default_value = "/{tenant}/")]
    pub etcd_tenant_prefix: String,

    /// Sidecar mode: the tenant (keyspace) this process serves. Many sidecars may share one
    /// database, each with its own tenant. A DNS label; `default` is the keyspace of a
    /// kine-rs without tenants.
    #[arg(long, env = "KINE_TENANT", default_value = "default")]
    pub tenant: String,

    /// Gateway mode: serve many tenants, each client's tenant being the identity in its
    /// verified client certificate (needs `--trusted-ca-file`).
    #[arg(long, env = "KINE_GATEWAY", conflicts_with = "tenant")]
    pub gateway: bool,

    /// Which name of a client certificate is its tenant in gateway mode: the subject's common
    /// name, or the first DNS, URI or email subject alternative name.
    #[arg(long, env = "KINE_GATEWAY_IDENTITY", value_enum, default_value_t = IdentitySource::Cn)]
    pub gateway_identity: IdentitySource,

    /// Gateway mode: create a tenant on its first request instead of refusing a client whose
    /// tenant does not exist (`PermissionDenied`).
    #[arg(long, env = "KINE_GATEWAY_CREATE_TENANTS", requires = "gateway")]
    pub gateway_create_tenants: bool,

    /// A client certificate name (common name or subject alternative name) allowed to call
    /// the admin API on the main listener; repeatable (comma-separated in the variable).
    #[arg(long, env = "KINE_ADMIN_IDENTITY", value_delimiter = ',')]
    pub admin_identity: Vec<String>,

    /// Serve the admin API (only) on this local unix socket, to whoever may open it (it is
    /// created with mode 0600).
    #[arg(long, env = "KINE_ADMIN_SOCKET")]
    pub admin_socket: Option<String>,

    /// Quota of bytes (live keys and values) of the sidecar's tenant, or of each tenant a
    /// gateway creates on first use; 0 leaves quotas as they are. Over it, writes get etcd's
    /// "database space exceeded".
    #[arg(long, env = "KINE_QUOTA_BACKEND_BYTES", default_value_t = 0)]
    pub quota_backend_bytes: i64,

    /// Quota of live keys, like `--quota-backend-bytes`; 0 leaves quotas as they are.
    #[arg(long, env = "KINE_QUOTA_KEYS", default_value_t = 0)]
    pub quota_keys: i64,

    /// Log at debug level.
    #[arg(long, env = "KINE_DEBUG")]
    pub debug: bool,

    /// Log format.
    #[arg(long, env = "KINE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands; without one, kine-rs serves.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Administer tenants through a running kine-rs's admin API.
    Tenant(crate::cli::TenantArgs),
    /// Move a tenant to another datastore while it keeps serving, keeping its revisions.
    Migrate(crate::migrate::command::MigrateArgs),
}

/// Which certificate name identifies a gateway client's tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IdentitySource {
    /// The subject's common name (as kube-apiserver's `--etcd-certfile` usually carries).
    Cn,
    /// The first DNS subject alternative name.
    Dns,
    /// The first URI subject alternative name.
    Uri,
    /// The first email subject alternative name.
    Email,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Plain,
    Json,
}

impl Config {
    /// The datastore endpoint, with the embedded default filled in.
    pub fn endpoint(&self) -> String {
        if self.endpoint.is_empty() {
            "sqlite://./db/state.db".to_string()
        } else {
            self.endpoint.clone()
        }
    }
}

/// kine flags that kine-rs knows of but does not support yet; they are refused with a clear
/// message instead of clap's generic "unexpected argument".
pub const UNSUPPORTED_KINE_FLAGS: &[&str] = &[
    "--metrics-enable-profiling",
    "--table-name",
    "--skip-verify",
    "--watch-query-timeout",
    "--emulated-etcd-version-check",
];

/// Names the first unsupported kine flag in `args`, if any.
pub fn unsupported_flag(args: &[String]) -> Option<&'static str> {
    args.iter().find_map(|arg| {
        let name = arg.split('=').next().unwrap_or(arg);
        UNSUPPORTED_KINE_FLAGS.iter().copied().find(|f| *f == name)
    })
}

/// The longest duration a flag takes. Longer ones are mistakes (a unit left out of a
/// number of seconds), and timers that far out overflow the clock's arithmetic.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// The largest `--max-request-bytes`: gRPC frames a message with a 32-bit length, and grpc-go
/// peers refuse messages over `i32::MAX` bytes.
pub const MAX_REQUEST_BYTES: usize = i32::MAX as usize;

/// The smallest watch buffer: below a few KiB every response would wait for the client.
pub const MIN_BUFFER_BYTES: usize = 4096;

impl Config {
    /// Refuses flag values the server cannot run with, naming the flag, before anything
    /// starts: they would otherwise fail (or panic) later, at the first timer or request.
    pub fn validate(&self) -> Result<(), String> {
        if self.watch_progress_notify_interval.is_zero() {
            return Err("--watch-progress-notify-interval must be longer than 0".into());
        }
        if self.max_request_bytes == 0 {
            return Err("--max-request-bytes must be at least 1".into());
        }
        if self.max_request_bytes > MAX_REQUEST_BYTES {
            return Err(format!(
                "--max-request-bytes must be at most {MAX_REQUEST_BYTES} (gRPC's message limit)"
            ));
        }
        if self.max_txn_ops == 0 {
            return Err("--max-txn-ops must be at least 1".into());
        }
        if self.max_watches_per_stream == 0 {
            return Err("--max-watches-per-stream must be at least 1".into());
        }
        if self
            .max_leases_per_tenant
            .is_some_and(|max| max == 0 || max > i64::MAX as u64)
        {
            return Err(format!(
                "--max-leases-per-tenant must be between 1 and {}",
                i64::MAX
            ));
        }
        if self.watch_stream_buffer_bytes < MIN_BUFFER_BYTES {
            return Err(format!(
                "--watch-stream-buffer-bytes must be at least {MIN_BUFFER_BYTES}"
            ));
        }
        if self.watch_hub_buffer_bytes < MIN_BUFFER_BYTES {
            return Err(format!(
                "--watch-hub-buffer-bytes must be at least {MIN_BUFFER_BYTES}"
            ));
        }
        if self.sqlite_wal_limit_bytes == 0 {
            return Err("--sqlite-wal-limit-bytes must be at least 1".into());
        }
        if self.max_concurrent_streams == 0 {
            return Err("--max-concurrent-streams must be at least 1".into());
        }
        if !self.grpc_keepalive_interval.is_zero() && self.grpc_keepalive_timeout.is_zero() {
            return Err(
                "--grpc-keepalive-timeout must be longer than 0 while keepalive pings are on"
                    .into(),
            );
        }
        if self.compact_min_retain < 0 {
            return Err("--compact-min-retain must be 0 or more".into());
        }
        if self.quota_keys < 0 {
            return Err("--quota-keys must be 0 (no limit) or more".into());
        }
        if self.quota_backend_bytes < 0 {
            return Err("--quota-backend-bytes must be 0 (no limit) or more".into());
        }
        Ok(())
    }
}

/// Parses a Go-style duration: `0`, `500ms`, `10s`, `5m`, `1h30m`; at most [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    if rest.is_empty() {
        return Err("empty duration".into());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("{text:?}: missing unit (use ms, s, m or h)"))?;
        if digits == 0 {
            return Err(format!("{text:?}: expected a number"));
        }
        let number: f64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{text:?}: bad number"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => number / 1e9,
            "us" | "µs" => number / 1e6,
            "ms" => number / 1e3,
            "s" => number,
            "m" => number * 60.0,
            "h" => number * 3600.0,
            unit => return Err(format!("{text:?}: unknown unit {unit:?}")),
        };
        // Checked: a huge number would overflow a Duration (and panic unchecked).
        total = Duration::try_from_secs_f64(seconds)
            .ok()
            .and_then(|part| total.checked_add(part))
            .filter(|total| *total <= MAX_DURATION)
            .ok_or_else(|| format!("{text:?}: longer than a year (8760h)"))?;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations() {
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1ns"), Ok(Duration::from_nanos(1)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("").is_err());
        assert_eq!(parse_duration("8760h"), Ok(MAX_DURATION));
        assert!(parse_duration("8761h").is_err());
        assert!(parse_duration("99999999999999999999999999h").is_err());
        assert!(parse_duration("1e400s").is_err());
        assert!(parse_duration("-5s").is_err());
    }

    #[test]
    fn names_unsupported_kine_flags() {
        let args = vec!["kine-rs".into(), "--table-name=kine".into()];
        assert_eq!(unsupported_flag(&args), Some("--table-name"));
        assert_eq!(unsupported_flag(&["--endpoint".into()]), None);
    }

    #[test]
    fn every_flag_has_an_environment_variable() {
        let command = <Config as clap::CommandFactory>::command();
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            let expected = format!("KINE_{}", id.to_uppercase());
            assert_eq!(env.as_deref(), Some(expected.as_str()), "flag {id}");
        }
    }
}
