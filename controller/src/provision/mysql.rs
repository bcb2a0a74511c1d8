//! MySQL / MariaDB: a database per tenant and a user `'kine_…'@'%'` with the rights kine-rs
//! needs on that database only: `SELECT, INSERT, UPDATE, DELETE` for its data, `CREATE,
//! ALTER, INDEX` for its schema migrations and `CREATE TEMPORARY TABLES` for a migration's
//! snapshot (no `DROP`, no global rights, no `GRANT OPTION`). Granted again at every
//! reconcile, so tenants provisioned before a right was added get it.

use sqlx::mysql::{MySqlConnectOptions, MySqlConnection};
use sqlx::{ConnectOptions, Connection};

use crate::credentials::AdminLogin;
use crate::provision::{CONNECT_TIMEOUT, TenantLogin, checked_identifier, quote_literal};

/// The privileges of a tenant's user on its database.
pub const PRIVILEGES: &str =
    "SELECT, INSERT, UPDATE, DELETE, CREATE, ALTER, INDEX, CREATE TEMPORARY TABLES";

async fn connect(admin: &AdminLogin) -> Result<MySqlConnection, String> {
    let mut options = MySqlConnectOptions::new()
        .host(&admin.host)
        .port(admin.port)
        .database("information_schema")
        .disable_statement_logging();
    if let Some(user) = &admin.username {
        options = options.username(user);
    }
    // An empty password means none (sqlx would send a scramble of "").
    if let Some(password) = admin.password.as_ref().filter(|p| !p.expose().is_empty()) {
        options = options.password(password.expose());
    }
    if let Some(tls) = &admin.tls {
        options = options
            .ssl_mode(sqlx::mysql::MySqlSslMode::VerifyIdentity)
            .ssl_ca_from_pem(tls.ca.as_bytes().to_vec());
        if let Some((cert, key)) = &tls.client {
            options = options
                .ssl_client_cert_from_pem(cert.as_bytes())
                .ssl_client_key_from_pem(key.expose().as_bytes());
        }
    }
    match tokio::time::timeout(CONNECT_TIMEOUT, options.connect()).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(sqlx::Error::Database(e))) if e.code().as_deref() == Some("28000") => {
            Err("access denied for the basicAuth user (wrong user or password?)".to_string())
        }
        Ok(Err(e)) => Err(format!(
            "cannot connect to {}:{}: {e}",
            admin.host, admin.port
        )),
        Err(_) => Err(format!(
            "no answer from {}:{} within {CONNECT_TIMEOUT:?}",
            admin.host, admin.port
        )),
    }
}

async fn exec(conn: &mut MySqlConnection, sql: String, what: &str) -> Result<(), String> {
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(&mut *conn)
        .await
        .map(|_| ())
        .map_err(|e| format!("{what}: {e}"))
}

/// Connects as the admin and runs `SELECT 1`.
pub async fn check(admin: &AdminLogin) -> Result<(), String> {
    let mut conn = connect(admin).await?;
    sqlx::query("SELECT 1")
        .execute(&mut conn)
        .await
        .map_err(|e| format!("SELECT 1: {e}"))?;
    let _ = conn.close().await;
    Ok(())
}

/// Creates the database and user (or resets its password) and grants, idempotently.
pub async fn ensure(admin: &AdminLogin, login: &TenantLogin) -> Result<(), String> {
    let database = checked_identifier(&login.database)?;
    let user = checked_identifier(&login.user)?;
    let password = quote_literal(login.password.expose(), true);
    let mut conn = connect(admin).await?;
    exec(
        &mut conn,
        format!("CREATE DATABASE IF NOT EXISTS `{database}` CHARACTER SET utf8mb4"),
        &format!("CREATE DATABASE {database}"),
    )
    .await?;
    exec(
        &mut conn,
        format!("CREATE USER IF NOT EXISTS '{user}'@'%' IDENTIFIED BY {password}"),
        &format!("CREATE USER {user}"),
    )
    .await?;
    exec(
        &mut conn,
        format!("ALTER USER '{user}'@'%' IDENTIFIED BY {password}"),
        &format!("ALTER USER {user}"),
    )
    .await?;
    exec(
        &mut conn,
        format!("GRANT {PRIVILEGES} ON `{database}`.* TO '{user}'@'%'"),
        &format!("GRANT ON {database} TO {user}"),
    )
    .await?;
    let _ = conn.close().await;
    Ok(())
}

/// Drops the database and the user.
pub async fn drop_tenant(admin: &AdminLogin, login: &TenantLogin) -> Result<(), String> {
    let database = checked_identifier(&login.database)?;
    let user = checked_identifier(&login.user)?;
    let mut conn = connect(admin).await?;
    exec(
        &mut conn,
        format!("DROP DATABASE IF EXISTS `{database}`"),
        &format!("DROP DATABASE {database}"),
    )
    .await?;
    exec(
        &mut conn,
        format!("DROP USER IF EXISTS '{user}'@'%'"),
        &format!("DROP USER {user}"),
    )
    .await?;
    let _ = conn.close().await;
    Ok(())
}
