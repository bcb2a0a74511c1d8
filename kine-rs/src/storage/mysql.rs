//! MySQL 8 and MariaDB 10.11, shared by any number of kine-rs processes.
//!
//! A write takes the keyspace row's lock (`SELECT … FOR UPDATE`) in a READ COMMITTED
//! transaction (no gap locks between keyspaces), so revisions are assigned and committed in
//! order across processes; reads run in a REPEATABLE READ consistent snapshot. MySQL has no
//! notifications: each process's change feed polls the revisions of every keyspace it
//! watches, in one statement (primary-key lookups of their keyspace rows).

use std::str::FromStr;
use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlSslMode};
use sqlx::{ConnectOptions, Connection};
use tracing::{info, warn};

use super::feed::PollCadence;
use super::sql::{Dialect, SnapshotTable, SqlBackend, snapshot_pages};
use super::{BackendOptions, migration_error};
use crate::error::{KineError, Result};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/mysql");

/// The database kine uses when the endpoint names none.
pub const DEFAULT_DATABASE: &str = "kubernetes";
/// How often the change feed looks for commits of other processes: one statement for every
/// keyspace the process watches (nothing while it watches none). Watch delivery across
/// processes waits for it while it finds them: at 30 ms (one poll per watched keyspace) p99
/// was 33 ms. Once it finds none, every 30 ms: at 5 ms, one watched keyspace at rest cost
/// MariaDB and kine-rs 2.2–2.9% of a core each.
const POLL: PollCadence = PollCadence {
    busy: Duration::from_millis(5),
    quiet: Duration::from_millis(30),
};
/// The longest key the schema stores (`kv.key` is `VARBINARY(3000)`: InnoDB's 3072-byte
/// index limit, less the two BIGINTs beside it).
pub const MAX_KEY_BYTES: usize = 3000;

/// MySQL's dialect.
pub struct Mysql;

impl Dialect for Mysql {
    type DB = sqlx::MySql;
    const DRIVER: &'static str = "mysql";
    // READ COMMITTED is every connection's session level (`pool_options`), so the begin is
    // one statement, not `SET TRANSACTION …; START TRANSACTION` (README, "One client's write").
    const BEGIN_WRITE: &'static str = "START TRANSACTION";
    const BEGIN_READ: &'static str = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ; \
         START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY";
    const LOCK: &'static str = " FOR UPDATE";
    const INSERT_KEYSPACE: &'static str =
        "INSERT INTO keyspaces (name) VALUES (?) ON DUPLICATE KEY UPDATE name = name";
    // MySQL has no `RETURNING`.
    const INSERT_KEYSPACE_RETURNS_ID: bool = false;
    const EMPTY_BYTES: &'static str = "X''";
    const SIZE: &'static str = "SELECT \
         CAST(COALESCE(SUM(data_length + index_length + data_free), 0) AS SIGNED), \
         CAST(COALESCE(SUM(data_length + index_length), 0) AS SIGNED) \
         FROM information_schema.tables WHERE table_schema = DATABASE()";
    const DEFRAGMENT: &'static str = "OPTIMIZE TABLE kv, kv_head, kv_past, leases";
    const MAX_KEY_BYTES: Option<usize> = Some(MAX_KEY_BYTES);
    const ONE_STATEMENT_EVENTS: bool = true;
    // An autocommit SELECT reads one InnoDB snapshot, joins included: a get is one round
    // trip instead of four (begin, keyspace row, rows, commit; kube-apiserver's update reads
    // before its compare-and-swap).
    const ONE_STATEMENT_READS: bool = true;
    const READS_AT_REVISION_IN_TWO_STEPS: bool = true;
    // A batch's lookup of its keys took as long as its inserts, most of it MariaDB planning
    // the `IN` list (README, "MariaDB at 128 clients").
    const KEYS_JOINED: bool = true;
    // A key's current row is named by `kv_head` and each superseded row by `kv_past`
    // (migration 0007), which the batch writes itself: no trigger, and no view either
    // (README, "MariaDB's overwrites").
    const PAST_TABLE: bool = true;
    const WRITES_PAST_ROWS: bool = true;
    const UPSERT_HEAD: &'static str = " ON DUPLICATE KEY UPDATE \
         mod_revision = VALUES(mod_revision), sub = VALUES(sub), deleted = VALUES(deleted)";
    const CURRENT_VIEW: &'static str = "(SELECT h.keyspace AS keyspace, h.`key` AS `key`, \
         h.mod_revision AS mod_revision, h.sub AS sub, kv.create_revision AS create_revision, \
         kv.version AS version, kv.lease AS lease, kv.value AS value, h.deleted AS deleted, \
         9223372036854775807 AS superseded FROM kv_head h JOIN kv ON kv.keyspace = h.keyspace \
         AND kv.mod_revision = h.mod_revision AND kv.sub = h.sub) AS kv_current";
    const SUPERSEDED_VIEW: &'static str = "(SELECT p.keyspace AS keyspace, p.`key` AS `key`, \
         p.mod_revision AS mod_revision, p.sub AS sub, kv.create_revision AS create_revision, \
         kv.version AS version, kv.lease AS lease, kv.value AS value, p.deleted AS deleted, \
         p.superseded AS superseded FROM kv_past p JOIN kv ON kv.keyspace = p.keyspace \
         AND kv.mod_revision = p.mod_revision AND kv.sub = p.sub) AS kv_superseded";
    const PADDED_INSERT: Option<&'static str> = Some(" ON DUPLICATE KEY UPDATE deleted = deleted");
    const SNAPSHOT_TABLE: Option<SnapshotTable> = Some(snapshot_pages::MYSQL);

    const ROW_MD5: Option<&'static str> = Some(
        "MD5(CONCAT(UNHEX(LPAD(HEX(LENGTH(`key`)), 16, '0')), `key`, \
         UNHEX(LPAD(HEX(LENGTH(value)), 16, '0')), value, \
         UNHEX(LPAD(HEX(create_revision), 16, '0')), UNHEX(LPAD(HEX(mod_revision), 16, '0')), \
         UNHEX(LPAD(HEX(version), 16, '0')), UNHEX(LPAD(HEX(lease), 16, '0'))))",
    );
    const MD5_WORD: &'static str = "CAST(CONV(SUBSTRING({h}, 1, 16), 16, 10) AS UNSIGNED)";
    const SUM_AS_INT: &'static str = "CAST({sum} AS SIGNED)";
}

/// The MySQL backend.
pub type MysqlBackend = SqlBackend<Mysql>;

/// Connection options for `endpoint`, in either form kine accepts:
/// `mysql://user:pass@host:port/db` (a URL) or the Go driver's
/// `mysql://user:pass@tcp(host:port)/db` (also `unix(/path)`, or nothing for the local
/// server). `tls=` (Go) and `ssl-mode=` parameters choose TLS, and the TLS files of `options`
/// apply.
pub fn connect_options(endpoint: &str, options: &BackendOptions) -> Result<MySqlConnectOptions> {
    let rest = endpoint.strip_prefix("mysql://").unwrap_or(endpoint);
    let mut connect = if is_go_dsn(rest) {
        go_dsn(rest)?
    } else {
        MySqlConnectOptions::from_str(endpoint)?
    };
    if connect.get_database().is_none_or(str::is_empty) {
        connect = connect.database(DEFAULT_DATABASE);
    }
    let query = rest.rsplit_once('?').map(|(_, q)| q).unwrap_or("");
    let mut explicit_mode = false;
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let mode = match (name, value) {
            ("tls", "true" | "custom") => Some(MySqlSslMode::VerifyIdentity),
            ("tls", "skip-verify") => Some(MySqlSslMode::Required),
            ("tls", "preferred") => Some(MySqlSslMode::Preferred),
            ("tls", "false") => Some(MySqlSslMode::Disabled),
            ("ssl-mode" | "sslmode", _) => {
                explicit_mode = true;
                None
            }
            _ => None,
        };
        if let Some(mode) = mode {
            connect = connect.ssl_mode(mode);
            explicit_mode = true;
        }
    }
    let tls = &options.tls;
    if let Some(ca) = &tls.ca_file {
        connect = connect.ssl_ca(ca);
    }
    if let Some(cert) = &tls.cert_file {
        connect = connect.ssl_client_cert(cert);
    }
    if let Some(key) = &tls.key_file {
        connect = connect.ssl_client_key(key);
    }
    if tls.any() && !explicit_mode {
        connect = connect.ssl_mode(MySqlSslMode::VerifyIdentity);
    }
    Ok(connect)
}

/// Whether `dsn` (after `mysql://`) is in the Go driver's form.
fn is_go_dsn(dsn: &str) -> bool {
    let address = dsn.rsplit_once('@').map_or(dsn, |(_, a)| a);
    address.starts_with("tcp(") || address.starts_with("unix(") || address.starts_with('/')
}

/// Parses the Go driver's `[user[:password]@][net(address)]/dbname[?params]`.
fn go_dsn(dsn: &str) -> Result<MySqlConnectOptions> {
    let invalid = || {
        KineError::Storage(
            "invalid MySQL endpoint: expected mysql://user:pass@tcp(host:port)/db".into(),
        )
    };
    let (head, tail) = dsn.rsplit_once('/').ok_or_else(invalid)?;
    let database = tail.split('?').next().unwrap_or("");
    let (userinfo, address) = head.rsplit_once('@').unwrap_or(("", head));
    let mut connect = MySqlConnectOptions::new();
    if !userinfo.is_empty() {
        let (user, password) = match userinfo.split_once(':') {
            Some((user, password)) => (user, Some(password)),
            None => (userinfo, None),
        };
        connect = connect.username(user);
        if let Some(password) = password {
            connect = connect.password(password);
        }
    }
    if let Some(inner) = address
        .strip_prefix("tcp(")
        .and_then(|a| a.strip_suffix(')'))
    {
        // `host`, `host:port`, `[v6]` or `[v6]:port`.
        let (host, port) = match inner.strip_prefix('[') {
            Some(v6) => match v6.split_once(']') {
                Some((host, rest)) => (host, rest.strip_prefix(':')),
                None => return Err(invalid()),
            },
            None => match inner.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (inner, None),
            },
        };
        let port = port
            .map(|p| p.parse::<u16>().map_err(|_| invalid()))
            .transpose()?;
        connect = connect.host(if host.is_empty() { "127.0.0.1" } else { host });
        if let Some(port) = port {
            connect = connect.port(port);
        }
    } else if let Some(path) = address
        .strip_prefix("unix(")
        .and_then(|a| a.strip_suffix(')'))
    {
        connect = connect.socket(path);
    } else if address.is_empty() {
        connect = connect.host("127.0.0.1");
    } else {
        return Err(invalid());
    }
    if !database.is_empty() {
        connect = connect.database(database);
    }
    Ok(connect)
}

/// Opens the database `endpoint` names, creating it and its schema if missing.
pub async fn open(endpoint: &str, options: &BackendOptions) -> Result<MysqlBackend> {
    let connect = connect_options(endpoint, options)?;
    create_database(&connect).await?;
    let pool: MySqlPool =
        super::pool_on_write_threads(pool_options(options, connect.get_port()), connect.clone())
            .await?;
    require_json_table(&pool).await?;
    MIGRATOR
        .run(&pool)
        .await
        .map_err(|e| migration_error(e, &MIGRATOR))?;
    match BufferPoolFit::read(&pool).await {
        Ok(fit) => fit.warn_when_outgrown(),
        Err(error) => warn!(%error, "cannot read InnoDB's buffer pool size"),
    }
    // The watch hubs' own few connections (`SqlBackend::with_watch_readers`).
    let watch_readers: MySqlPool = options
        .pool
        .sqlx(connect.get_port())
        .max_connections(super::WATCH_CONNECTIONS)
        .min_connections(super::WATCH_CONNECTIONS)
        .connect_with(connect)
        .await?;
    Ok(SqlBackend::new(
        pool.clone(),
        pool,
        Some(POLL),
        super::feed::CommitFeed::new(),
        Box::new(()),
    )
    .with_watch_readers(watch_readers))
}

/// Refuses a server without `JSON_TABLE` (MariaDB before 10.6, MySQL before 8.0.4), which
/// write batches and gets need to name their keys ([`Dialect::KEYS_JOINED`]): said once at
/// start, not as a syntax error at the first write.
async fn require_json_table(pool: &MySqlPool) -> Result<()> {
    const PROBE: &str = "SELECT COUNT(*) FROM JSON_TABLE('[\"6b\"]', '$[*]' \
         COLUMNS (k VARCHAR(8) PATH '$')) AS n";
    match sqlx::query_scalar::<_, i64>(PROBE).fetch_one(pool).await {
        Ok(_) => return Ok(()),
        // 42000: the server does not know the syntax.
        Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("42000") => {}
        Err(error) => return Err(error.into()),
    }
    let version: String = sqlx::query_scalar("SELECT VERSION()")
        .fetch_one(pool)
        .await
        .unwrap_or_else(|_| "unknown".into());
    Err(KineError::Storage(format!(
        "the MySQL server ({version}) has no JSON_TABLE: kine-rs needs MariaDB 10.6 or later, \
         or MySQL 8.0.4 or later"
    )))
}

/// The pool's options: every connection's transactions are READ COMMITTED unless one says
/// otherwise, as reads do ([`Dialect::BEGIN_READ`]), so that a write transaction begins with
/// one statement ([`Dialect::BEGIN_WRITE`]) and reads the rows other writers committed.
fn pool_options(options: &BackendOptions, port: u16) -> sqlx::mysql::MySqlPoolOptions {
    options.pool.sqlx(port).after_connect(move |connection, _| {
        Box::pin(async move {
            super::nodelay::set_on_connections_to(port);
            sqlx::query("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                .execute(&mut *connection)
                .await?;
            Ok(())
        })
    })
}

/// InnoDB's buffer pool against the size of the database's tables. Past the pool, MariaDB
/// reads and rewrites `kv`'s pages from disk (`O_DIRECT`, no page cache behind it): with the
/// default 128 MiB, overwrites fell from 12,000/s to 80/s past ~1.1 million rows, and a
/// migration out of such a database read each page from disk (README, "Running on MySQL or
/// MariaDB"). An operator sees it at start-up instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BufferPoolFit {
    pool_bytes: i64,
    table_bytes: i64,
}

impl BufferPoolFit {
    async fn read(pool: &MySqlPool) -> Result<Self> {
        let (pool_bytes, table_bytes): (i64, i64) = sqlx::query_as(
            "SELECT CAST(@@innodb_buffer_pool_size AS SIGNED), \
             CAST(COALESCE(SUM(data_length + index_length), 0) AS SIGNED) \
             FROM information_schema.tables WHERE table_schema = DATABASE()",
        )
        .fetch_one(pool)
        .await?;
        Ok(Self {
            pool_bytes,
            table_bytes,
        })
    }

    /// Whether the tables no longer fit the pool.
    fn outgrown(&self) -> bool {
        self.table_bytes > self.pool_bytes
    }

    fn warn_when_outgrown(&self) {
        const MIB: i64 = 1 << 20;
        if self.outgrown() {
            warn!(
                buffer_pool_mib = self.pool_bytes / MIB,
                tables_mib = self.table_bytes / MIB,
                "InnoDB's buffer pool is smaller than this database's tables: reads and \
                 overwrites go to disk and slow down sharply as the tables grow; set \
                 innodb_buffer_pool_size above the tables' size"
            );
        } else {
            info!(
                buffer_pool_mib = self.pool_bytes / MIB,
                tables_mib = self.table_bytes / MIB,
                "InnoDB's buffer pool holds this database's tables"
            );
        }
    }
}

/// Creates the database `connect` names unless it exists, like kine, connecting to the
/// server's `information_schema` (which every user may use) to do so.
async fn create_database(connect: &MySqlConnectOptions) -> Result<()> {
    let name = connect
        .get_database()
        .unwrap_or(DEFAULT_DATABASE)
        .to_string();
    let mut conn = connect
        .clone()
        .database("information_schema")
        .connect()
        .await?;
    let sql = format!(
        "CREATE DATABASE IF NOT EXISTS `{}` CHARACTER SET utf8mb4",
        name.replace('`', "``")
    );
    match sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(&mut conn)
        .await
    {
        Ok(result) if result.rows_affected() > 0 => {
            info!(database = %name, "created the database");
        }
        Ok(_) => {}
        // Not allowed to create databases: fine if it exists, which connecting tells.
        Err(error) => warn!(database = %name, %error, "cannot create the database"),
    }
    let _ = conn.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(endpoint: &str) -> MySqlConnectOptions {
        connect_options(endpoint, &BackendOptions::default()).expect(endpoint)
    }

    #[test]
    fn tables_outgrow_the_pool_only_past_its_size() {
        let fit = |pool_bytes, table_bytes| BufferPoolFit {
            pool_bytes,
            table_bytes,
        };
        assert!(!fit(128 << 20, 0).outgrown());
        assert!(!fit(128 << 20, 128 << 20).outgrown());
        assert!(fit(128 << 20, (128 << 20) + 1).outgrown());
        assert!(fit(128 << 20, 1_100 << 20).outgrown());
    }

    /// Database `name` on the test server (`$KINE_TEST_MYSQL_URL`).
    fn test_database_endpoint(name: &str) -> String {
        let url = std::env::var("KINE_TEST_MYSQL_URL")
            .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/mysql".to_string());
        let base = url.rsplit_once('/').map_or(url.as_str(), |(base, _)| base);
        format!("{base}/{name}")
    }

    /// The figures come from a real server (`$KINE_TEST_MYSQL_URL`, which the test command
    /// starts; a missing server fails the test): the pool's size, and the tables the schema
    /// created, which grow with rows written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_the_pool_and_the_tables_from_the_server() {
        let endpoint = test_database_endpoint("kine_unit_buffer_pool");
        let backend = open(&endpoint, &BackendOptions::default())
            .await
            .expect("open");
        drop(backend);
        let connect = connect_options(&endpoint, &BackendOptions::default()).expect("options");
        let pool = MySqlPool::connect_with(connect).await.expect("connect");
        let fit = BufferPoolFit::read(&pool).await.expect("read");
        // MariaDB's and MySQL's smallest pool is 5 MiB; an empty InnoDB table takes 16 KiB
        // per index.
        assert!(fit.pool_bytes >= 5 << 20, "{fit:?}");
        assert!(fit.table_bytes >= 16 << 10, "{fit:?}");
        sqlx::query("DROP DATABASE kine_unit_buffer_pool")
            .execute(&pool)
            .await
            .expect("drop");
    }

    /// A write transaction begun as the writers begin theirs reads what another connection
    /// committed after its first read (READ COMMITTED, the pool's session level); a read
    /// transaction keeps its snapshot (REPEATABLE READ, set by its own begin).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn write_transactions_read_committed_rows_and_reads_keep_their_snapshot() {
        let endpoint = test_database_endpoint("kine_unit_isolation");
        let backend = open(&endpoint, &BackendOptions::default())
            .await
            .expect("open");
        let pool = backend.writer_pool().clone();
        sqlx::query("CREATE TABLE IF NOT EXISTS isolation_probe (id INT PRIMARY KEY, n INT)")
            .execute(&pool)
            .await
            .expect("create");
        sqlx::query("REPLACE INTO isolation_probe VALUES (1, 0)")
            .execute(&pool)
            .await
            .expect("row");
        let read_twice = |begin: &'static str| {
            let pool = pool.clone();
            async move {
                let mut tx = pool.acquire().await.expect("acquire");
                sqlx::raw_sql(begin).execute(&mut *tx).await.expect("begin");
                let probe = "SELECT n FROM isolation_probe WHERE id = 1";
                let first: i32 = sqlx::query_scalar(probe)
                    .fetch_one(&mut *tx)
                    .await
                    .expect("first read");
                sqlx::query("UPDATE isolation_probe SET n = n + 1 WHERE id = 1")
                    .execute(&pool)
                    .await
                    .expect("another connection's commit");
                let second: i32 = sqlx::query_scalar(probe)
                    .fetch_one(&mut *tx)
                    .await
                    .expect("second read");
                sqlx::raw_sql("COMMIT")
                    .execute(&mut *tx)
                    .await
                    .expect("commit");
                second - first
            }
        };
        assert_eq!(
            read_twice(Mysql::BEGIN_WRITE).await,
            1,
            "a write transaction"
        );
        assert_eq!(read_twice(Mysql::BEGIN_READ).await, 0, "a read transaction");
        drop(backend);
        sqlx::query("DROP DATABASE kine_unit_isolation")
            .execute(&pool)
            .await
            .expect("drop");
    }

    /// A write batch's lookup of more than a few keys names them in one JSON parameter, in
    /// hex (`Dialect::KEYS_JOINED`), gets of one key in an `IN` list: either way keys of every
    /// byte value are found as themselves, and a key longer than the table stores finds
    /// nothing, not even the stored key it begins with.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keys_of_any_bytes_are_looked_up_by_their_whole_value() {
        use crate::model::KeyRange;
        use crate::storage::test_support::{MysqlTestDatabase, put_keys, read};
        use crate::storage::{Backend, BatchKeys};
        use bytes::Bytes;

        let db = MysqlTestDatabase::new("kine_unit_key_lookups").await;
        let (backend, keyspace) = (&db.backend, db.keyspace);
        let mut written: Vec<Bytes> = (0..=255u8)
            .map(|byte| Bytes::from(vec![b'k', byte]))
            .collect();
        written.push(Bytes::from_static(b"quote'\"\\%_?"));
        written.push(Bytes::from(vec![b'x'; MAX_KEY_BYTES]));
        put_keys(backend, keyspace, &written, |index| {
            Bytes::from(format!("value {index}"))
        })
        .await;

        let longer = Bytes::from(vec![b'x'; MAX_KEY_BYTES + 1]);
        let never = Bytes::from_static(b"k");
        let mut looked_up = written.clone();
        looked_up.extend([longer.clone(), never.clone()]);
        let mut txn = backend
            .begin_group_write(
                keyspace,
                &BatchKeys {
                    all: looked_up,
                    created: Vec::new(),
                },
                false,
            )
            .await
            .expect("begin");
        for (sub, key) in written.iter().enumerate() {
            let kv = txn.get(key).await.expect("get").expect("written");
            assert_eq!(
                (&kv.key, kv.value.as_ref()),
                (key, format!("value {sub}").as_bytes())
            );
            assert_eq!(kv.version, 1);
        }
        assert_eq!(txn.get(&longer).await.expect("get"), None, "a longer key");
        assert_eq!(
            txn.get(&never).await.expect("get"),
            None,
            "a key never written"
        );
        drop(txn);

        for key in [&written[0], &written[255], &written[256], &longer] {
            let rows = read(backend, keyspace, &KeyRange::new(key.clone(), Bytes::new())).await;
            let expected = usize::from(key != &longer);
            assert_eq!(rows.kvs.len(), expected, "{key:?}");
            assert!(rows.kvs.iter().all(|kv| kv.key == *key), "{key:?}");
        }
        db.drop_database().await;
    }

    #[test]
    fn parses_go_and_url_forms() {
        let go = parse("mysql://kine:s3cr@t@tcp(db.example:3307)/tenant1");
        assert_eq!(go.get_host(), "db.example");
        assert_eq!(go.get_port(), 3307);
        assert_eq!(go.get_username(), "kine");
        assert_eq!(go.get_database(), Some("tenant1"));

        let url = parse("mysql://kine:pw@db.example:3308/tenant2");
        assert_eq!(url.get_host(), "db.example");
        assert_eq!(url.get_port(), 3308);
        assert_eq!(url.get_database(), Some("tenant2"));

        let local = parse("mysql://root@/");
        assert_eq!(local.get_host(), "127.0.0.1");
        assert_eq!(local.get_database(), Some(DEFAULT_DATABASE));

        let tls = parse("mysql://root@tcp(127.0.0.1)/k?tls=skip-verify");
        assert_eq!(tls.get_port(), 3306);
        assert!(matches!(tls.get_ssl_mode(), MySqlSslMode::Required));

        let socket = parse("mysql://root:pw@unix(/run/mysqld/mysqld.sock)/k");
        assert_eq!(
            socket
                .get_socket()
                .map(|p| p.to_string_lossy().into_owned()),
            Some("/run/mysqld/mysqld.sock".to_string())
        );
    }
}
