-- The storage model of kine-rs (see the crate docs of `kine::storage`).
-- 9223372036854775807 (i64::MAX) in `superseded` marks a key's current row.

CREATE TABLE keyspaces (
    id               INTEGER PRIMARY KEY,
    name             TEXT    NOT NULL UNIQUE,
    revision         INTEGER NOT NULL DEFAULT 1,
    compact_revision INTEGER NOT NULL DEFAULT -1,
    frozen           INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE kv (
    keyspace        INTEGER NOT NULL,
    key             BLOB    NOT NULL,
    mod_revision    INTEGER NOT NULL,
    sub             INTEGER NOT NULL,
    create_revision INTEGER NOT NULL,
    version         INTEGER NOT NULL,
    lease           INTEGER NOT NULL,
    value           BLOB    NOT NULL,
    deleted         INTEGER NOT NULL,
    superseded      INTEGER NOT NULL,
    PRIMARY KEY (keyspace, key, mod_revision, sub)
);

-- Reads at the current revision touch only live rows.
CREATE INDEX kv_live ON kv (keyspace, key)
    WHERE superseded = 9223372036854775807 AND deleted = 0;
-- Watches and history, in revision order.
CREATE INDEX kv_log ON kv (keyspace, mod_revision, sub);
-- Compaction finds superseded rows without scanning the table.
CREATE INDEX kv_superseded ON kv (keyspace, superseded);
-- Keys attached to a lease.
CREATE INDEX kv_lease ON kv (keyspace, lease)
    WHERE lease <> 0 AND superseded = 9223372036854775807 AND deleted = 0;

CREATE TABLE leases (
    keyspace      INTEGER NOT NULL,
    id            INTEGER NOT NULL,
    ttl           INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    PRIMARY KEY (keyspace, id)
);
CREATE INDEX leases_expiry ON leases (keyspace, expires_at_ms);
