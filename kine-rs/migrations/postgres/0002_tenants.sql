-- Tenants (see `kine::storage`): usage counters maintained by every write under the keyspace
-- row lock (live keys, and bytes of their keys and values), optional quotas (0: none), and
-- when the current freeze began (lease expiry resumes with the remaining TTLs).

ALTER TABLE keyspaces
    ADD COLUMN keys_count   BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN bytes_used   BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN quota_keys   BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN quota_bytes  BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN frozen_at_ms BIGINT NOT NULL DEFAULT 0;

UPDATE keyspaces SET
    keys_count = (SELECT COUNT(*) FROM kv WHERE kv.keyspace = keyspaces.id
                  AND kv.superseded = 9223372036854775807 AND kv.deleted = 0),
    bytes_used = (SELECT COALESCE(SUM(octet_length(kv.key) + octet_length(kv.value)), 0)
                  FROM kv WHERE kv.keyspace = keyspaces.id
                  AND kv.superseded = 9223372036854775807 AND kv.deleted = 0);

-- One lease-expiry query per process covers every keyspace.
CREATE INDEX leases_deadline ON leases (expires_at_ms);
