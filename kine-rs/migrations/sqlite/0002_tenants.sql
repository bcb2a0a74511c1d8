-- Tenants (see `kine::storage`): usage counters maintained by every write under the keyspace
-- row lock (live keys, and bytes of their keys and values), optional quotas (0: none), and
-- when the current freeze began (lease expiry resumes with the remaining TTLs).

ALTER TABLE keyspaces ADD COLUMN keys_count   INTEGER NOT NULL DEFAULT 0;
ALTER TABLE keyspaces ADD COLUMN bytes_used   INTEGER NOT NULL DEFAULT 0;
ALTER TABLE keyspaces ADD COLUMN quota_keys   INTEGER NOT NULL DEFAULT 0;
ALTER TABLE keyspaces ADD COLUMN quota_bytes  INTEGER NOT NULL DEFAULT 0;
ALTER TABLE keyspaces ADD COLUMN frozen_at_ms INTEGER NOT NULL DEFAULT 0;

UPDATE keyspaces SET
    keys_count = (SELECT COUNT(*) FROM kv WHERE kv.keyspace = keyspaces.id
                  AND kv.superseded = 9223372036854775807 AND kv.deleted = 0),
    bytes_used = (SELECT COALESCE(SUM(LENGTH(kv.key) + LENGTH(kv.value)), 0) FROM kv
                  WHERE kv.keyspace = keyspaces.id
                  AND kv.superseded = 9223372036854775807 AND kv.deleted = 0);

-- One lease-expiry query per process covers every keyspace.
CREATE INDEX leases_deadline ON leases (expires_at_ms);
