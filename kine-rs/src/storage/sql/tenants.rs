//! The keyspace-wide statements of the SQL core: listing and deleting keyspaces, and the one
//! lease-expiry query a process runs for every keyspace it serves.

use super::{
    Arg, Dialect, Driver, STATE_COLUMNS, SqlBackend, acquire, commit, execute, fetch_all,
    fetch_optional, state_from_row,
};
use crate::error::Result;
use crate::storage::{KeyspaceId, KeyspaceState};

pub(super) async fn keyspaces<D: Dialect>(
    backend: &SqlBackend<D>,
) -> Result<Vec<(String, KeyspaceState)>> {
    let mut conn = acquire::<D>(&backend.readers).await?;
    let sql = format!("SELECT {STATE_COLUMNS}, id, name FROM keyspaces ORDER BY name");
    let rows = fetch_all::<D>(&mut conn, "keyspaces", &sql, &[]).await?;
    rows.iter()
        .map(|row| {
            let id = D::DB::int(row, 10)?;
            let name = D::DB::text(row, 11)?;
            Ok((name, state_from_row::<D>(row, id)?))
        })
        .collect()
}

pub(super) async fn delete_keyspace<D: Dialect>(
    backend: &SqlBackend<D>,
    keyspace: KeyspaceId,
) -> Result<bool> {
    let mut tx = super::begin::<D>(&backend.writers, "begin_write", D::BEGIN_WRITE).await?;
    // Under the row lock: a writer of another process that got the lock first commits
    // before, and one waiting for it finds the keyspace gone.
    let id = [Arg::Int(keyspace)];
    let lock = format!("SELECT id FROM keyspaces WHERE id = ?{}", D::LOCK);
    if fetch_optional::<D>(&mut tx, "state_lock", &lock, &id)
        .await?
        .is_none()
    {
        return Ok(false);
    }
    execute::<D>(
        &mut tx,
        "delete_keyspace",
        "DELETE FROM kv WHERE keyspace = ?",
        &id,
    )
    .await?;
    if D::HEAD_TABLE || D::PAST_TABLE {
        execute::<D>(
            &mut tx,
            "delete_keyspace",
            "DELETE FROM kv_head WHERE keyspace = ?",
            &id,
        )
        .await?;
    }
    if D::PAST_TABLE {
        execute::<D>(
            &mut tx,
            "delete_keyspace",
            "DELETE FROM kv_past WHERE keyspace = ?",
            &id,
        )
        .await?;
    }
    execute::<D>(
        &mut tx,
        "delete_keyspace",
        "DELETE FROM leases WHERE keyspace = ?",
        &id,
    )
    .await?;
    let deleted = execute::<D>(
        &mut tx,
        "delete_keyspace",
        "DELETE FROM keyspaces WHERE id = ?",
        &id,
    )
    .await?;
    if let Some(notify) = D::NOTIFY {
        execute::<D>(&mut tx, "notify", notify, &id).await?;
    }
    commit::<D>(tx).await?;
    Ok(deleted > 0)
}

pub(super) async fn expired_leases_all<D: Dialect>(
    backend: &SqlBackend<D>,
    now_ms: i64,
    limit: i64,
) -> Result<Vec<(String, KeyspaceId, i64)>> {
    let mut conn = acquire::<D>(&backend.readers).await?;
    let rows = fetch_all::<D>(
        &mut conn,
        "expired_leases_all",
        "SELECT k.name, l.keyspace, l.id FROM leases l JOIN keyspaces k ON k.id = l.keyspace \
         WHERE l.expires_at_ms <= ? AND k.frozen = 0 AND k.migration_role IN (0, 1) ORDER BY l.expires_at_ms LIMIT ?",
        &[Arg::Int(now_ms), Arg::Int(limit)],
    )
    .await?;
    rows.iter()
        .map(|row| {
            let name = D::DB::text(row, 0)?;
            Ok((name, D::DB::int(row, 1)?, D::DB::int(row, 2)?))
        })
        .collect()
}
