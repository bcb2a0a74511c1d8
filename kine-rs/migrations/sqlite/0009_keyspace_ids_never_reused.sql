-- Keyspace ids are never given out twice. A plain INTEGER PRIMARY KEY gives the highest id
-- again once its keyspace is deleted, so a process that still had the deleted tenant open
-- (a second gateway on the same file) found that id's keyspaces row present again and served
-- the new tenant's keys under the old tenant's name. AUTOINCREMENT keeps the highest id ever
-- used in `sqlite_sequence`. The columns keep their order.
CREATE TABLE keyspaces_never_reused (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    name             TEXT    NOT NULL UNIQUE,
    revision         INTEGER NOT NULL DEFAULT 1,
    compact_revision INTEGER NOT NULL DEFAULT -1,
    frozen           INTEGER NOT NULL DEFAULT 0,
    keys_count       INTEGER NOT NULL DEFAULT 0,
    bytes_used       INTEGER NOT NULL DEFAULT 0,
    quota_keys       INTEGER NOT NULL DEFAULT 0,
    quota_bytes      INTEGER NOT NULL DEFAULT 0,
    frozen_at_ms     INTEGER NOT NULL DEFAULT 0,
    migration_role   INTEGER NOT NULL DEFAULT 0,
    pinned_revision  INTEGER NOT NULL DEFAULT 0,
    migration        TEXT    NULL
);
INSERT INTO keyspaces_never_reused (id, name, revision, compact_revision, frozen, keys_count,
                                    bytes_used, quota_keys, quota_bytes, frozen_at_ms,
                                    migration_role, pinned_revision, migration)
    SELECT id, name, revision, compact_revision, frozen, keys_count, bytes_used, quota_keys,
           quota_bytes, frozen_at_ms, migration_role, pinned_revision, migration
    FROM keyspaces;
DROP TABLE keyspaces;
ALTER TABLE keyspaces_never_reused RENAME TO keyspaces;
