//! PostgreSQL: a database per tenant, owned by a login role of its own.
//!
//! The role gets `LOGIN` and nothing else (`NOSUPERUSER NOCREATEDB NOCREATEROLE
//! NOREPLICATION NOBYPASSRLS`); it owns its database (kine-rs creates its tables there), and
//! `PUBLIC` loses its default rights on that database, so no other tenant can connect to it.

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection, Row};

use crate::credentials::AdminLogin;
use crate::provision::{CONNECT_TIMEOUT, TenantLogin, checked_identifier, quote_literal};

fn quote_ident(name: &str) -> Result<String, String> {
    Ok(format!("\"{}\"", checked_identifier(name)?))
}

async fn connect(admin: &AdminLogin) -> Result<PgConnection, String> {
    let mut options = PgConnectOptions::new()
        .host(&admin.host)
        .port(admin.port)
        .database("postgres")
        .application_name("kine-rs-controller")
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
            .ssl_mode(sqlx::postgres::PgSslMode::VerifyFull)
            .ssl_root_cert_from_pem(tls.ca.as_bytes().to_vec());
        if let Some((cert, key)) = &tls.client {
            options = options
                .ssl_client_cert_from_pem(cert.as_bytes())
                .ssl_client_key_from_pem(key.expose().as_bytes());
        }
    }
    match tokio::time::timeout(CONNECT_TIMEOUT, options.connect()).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(sqlx::Error::Database(e))) if e.code().as_deref() == Some("28P01") => {
            Err("authentication failed for the basicAuth user (wrong password?)".to_string())
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

async fn exec(conn: &mut PgConnection, sql: String, what: &str) -> Result<(), String> {
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

/// Creates the role (or resets its password) and the database, idempotently.
pub async fn ensure(admin: &AdminLogin, login: &TenantLogin) -> Result<(), String> {
    let user = quote_ident(&login.user)?;
    let database = quote_ident(&login.database)?;
    let password = quote_literal(login.password.expose(), false);
    let mut conn = connect(admin).await?;
    let role_exists = sqlx::query("SELECT 1 FROM pg_roles WHERE rolname = $1")
        .bind(&login.user)
        .fetch_optional(&mut conn)
        .await
        .map_err(|e| format!("looking up role {}: {e}", login.user))?
        .is_some();
    let verb = if role_exists { "ALTER" } else { "CREATE" };
    exec(
        &mut conn,
        format!(
            "{verb} ROLE {user} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION \
             NOBYPASSRLS PASSWORD {password}"
        ),
        &format!("{verb} ROLE {}", login.user),
    )
    .await?;
    let owner: Option<String> = sqlx::query(
        "SELECT pg_get_userbyid(datdba)::text AS owner FROM pg_database WHERE datname = $1",
    )
    .bind(&login.database)
    .fetch_optional(&mut conn)
    .await
    .map_err(|e| format!("looking up database {}: {e}", login.database))?
    .map(|row| row.get("owner"));
    match owner {
        None => {
            // The admin must be a member of the role to give it a database (PostgreSQL 16+).
            if let Some(admin_user) = &admin.username {
                let _ = exec(
                    &mut conn,
                    format!("GRANT {user} TO {}", quote_admin(admin_user)),
                    "GRANT role TO admin",
                )
                .await;
            }
            match exec(
                &mut conn,
                format!("CREATE DATABASE {database} OWNER {user}"),
                &format!("CREATE DATABASE {}", login.database),
            )
            .await
            {
                Ok(()) => {}
                // Another reconcile created it meanwhile.
                Err(e) if e.contains("already exists") => {}
                Err(e) => return Err(e),
            }
        }
        Some(owner) if owner != login.user => {
            return Err(format!(
                "database {} exists and belongs to {owner:?}, not to the tenant's role {}; \
                 refusing to take it over",
                login.database, login.user
            ));
        }
        Some(_) => {}
    }
    exec(
        &mut conn,
        format!("REVOKE ALL ON DATABASE {database} FROM PUBLIC"),
        "REVOKE ALL ON DATABASE FROM PUBLIC",
    )
    .await?;
    let _ = conn.close().await;
    Ok(())
}

/// An admin user name as an identifier (it comes from the DataStore's Secret: quoted with
/// doubled quotes, never checked against our own pattern).
fn quote_admin(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Drops the database (closing its connections) and the role.
pub async fn drop_tenant(admin: &AdminLogin, login: &TenantLogin) -> Result<(), String> {
    let user = quote_ident(&login.user)?;
    let database = quote_ident(&login.database)?;
    let mut conn = connect(admin).await?;
    exec(
        &mut conn,
        format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"),
        &format!("DROP DATABASE {}", login.database),
    )
    .await?;
    exec(
        &mut conn,
        format!("DROP ROLE IF EXISTS {user}"),
        &format!("DROP ROLE {}", login.user),
    )
    .await?;
    let _ = conn.close().await;
    Ok(())
}
