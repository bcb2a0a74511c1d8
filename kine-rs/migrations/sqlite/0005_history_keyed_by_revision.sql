-- Fewer indexes ordered by key, the ones a batch of writes to scattered keys dirties a page
-- of per key: rows are identified by (keyspace, mod_revision, sub), which new rows append to;
-- a key's current row is found in kv_current, its superseded rows in kv_old. A new key now
-- touches one key-ordered index instead of three. Reads at the current revision use
-- kv_current; reads at an older revision take the current rows and the superseded rows
-- separately, each through its own index.
CREATE TABLE kv_by_revision (
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
    PRIMARY KEY (keyspace, mod_revision, sub)
);
INSERT INTO kv_by_revision (keyspace, key, mod_revision, sub, create_revision, version, lease,
                            value, deleted, superseded)
    SELECT keyspace, key, mod_revision, sub, create_revision, version, lease, value, deleted,
           superseded
    FROM kv ORDER BY keyspace, mod_revision, sub;
DROP TABLE kv;
ALTER TABLE kv_by_revision RENAME TO kv;

-- A key's current row (live or a tombstone): at most one per key.
CREATE UNIQUE INDEX kv_current ON kv (keyspace, key) WHERE superseded = 9223372036854775807;
-- Superseded rows by key: reads at older revisions, and an event's previous value.
CREATE INDEX kv_old ON kv (keyspace, key, mod_revision)
    WHERE superseded <> 9223372036854775807;
-- Compaction finds superseded rows in the order they were superseded.
CREATE INDEX kv_history ON kv (keyspace, superseded) WHERE superseded <> 9223372036854775807;
-- Keys attached to a lease.
CREATE INDEX kv_lease ON kv (keyspace, lease)
    WHERE lease <> 0 AND superseded = 9223372036854775807 AND deleted = 0;
