-- The storage model of kine-rs (see the crate docs of `kine::storage`), on MySQL 8 and
-- MariaDB 10.11. 9223372036854775807 (i64::MAX) in `superseded` marks a key's current row.
--
-- Keys are VARBINARY: compared bytewise (binary strings have no collation and no padding),
-- like etcd. InnoDB limits an index to 3072 bytes (DYNAMIC row format), and the primary key
-- and `kv_live` below hold two BIGINTs beside the key, so a key is at most 3000 bytes here.
-- Values are LONGBLOB (the server's max_allowed_packet must exceed the request limit).
-- MySQL has no partial indexes: `superseded` leads the key in `kv_live` instead, so reads at
-- the current revision still scan only current rows.

CREATE TABLE keyspaces (
    id               BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    name             VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    revision         BIGINT       NOT NULL DEFAULT 1,
    compact_revision BIGINT       NOT NULL DEFAULT -1,
    frozen           TINYINT      NOT NULL DEFAULT 0,
    UNIQUE KEY keyspaces_name (name)
) ENGINE = InnoDB;

CREATE TABLE kv (
    keyspace        BIGINT          NOT NULL,
    `key`           VARBINARY(3000) NOT NULL,
    mod_revision    BIGINT          NOT NULL,
    sub             BIGINT          NOT NULL,
    create_revision BIGINT          NOT NULL,
    version         BIGINT          NOT NULL,
    lease           BIGINT          NOT NULL,
    value           LONGBLOB        NOT NULL,
    deleted         TINYINT         NOT NULL,
    superseded      BIGINT          NOT NULL,
    PRIMARY KEY (keyspace, `key`, mod_revision, sub),
    -- Reads at the current revision (and compaction: the prefix is kv_superseded).
    KEY kv_live (keyspace, superseded, `key`),
    -- Watches and history, in revision order.
    KEY kv_log (keyspace, mod_revision, sub),
    -- Keys attached to a lease.
    KEY kv_lease (keyspace, lease, superseded)
) ENGINE = InnoDB;

CREATE TABLE leases (
    keyspace      BIGINT NOT NULL,
    id            BIGINT NOT NULL,
    ttl           BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    PRIMARY KEY (keyspace, id),
    KEY leases_expiry (keyspace, expires_at_ms)
) ENGINE = InnoDB;
