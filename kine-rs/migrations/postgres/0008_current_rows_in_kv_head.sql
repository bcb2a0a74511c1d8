-- Overwrites no longer rewrite the row they supersede (issue 13). Until now a key's current
-- row was marked in `kv.superseded`; every overwrite updated the old row, and PostgreSQL
-- writes an update as a whole new copy of the row (value included) with new entries in every
-- index, since the partial indexes name `superseded`: an overwrite cost twice a create, and
-- puts over existing keys fell round after round. Now `kv` only ever gets rows appended, and
-- a narrow table `kv_head` says which row of each key is current. Its rows change in place:
-- no index names the columns that change, so PostgreSQL updates them on the same page without
-- touching an index (a "HOT" update), for which fillfactor leaves room.
--
-- A key's rows are found by `kv_key` (newest first): reads at an older revision take each
-- key's newest row at or before it; a watch event's previous value is the newest row before
-- it; compaction removes the rows older than one at or below the compaction revision.
CREATE TABLE kv_head (
    keyspace     BIGINT   NOT NULL,
    key          BYTEA    NOT NULL,
    mod_revision BIGINT   NOT NULL,
    sub          BIGINT   NOT NULL,
    deleted      SMALLINT NOT NULL,
    PRIMARY KEY (keyspace, key)
) WITH (fillfactor = 70);

INSERT INTO kv_head (keyspace, key, mod_revision, sub, deleted)
    SELECT keyspace, key, mod_revision, sub, deleted FROM kv
    WHERE superseded = 9223372036854775807;

CREATE INDEX kv_key ON kv (keyspace, key, mod_revision DESC, sub DESC);
DROP INDEX kv_current;
DROP INDEX kv_old;
DROP INDEX kv_history;
DROP INDEX kv_lease;
-- Every row naming a lease; the current ones are those `kv_head` points at.
CREATE INDEX kv_lease ON kv (keyspace, lease) WHERE lease <> 0;
DROP FUNCTION kine_rs_commit(BIGINT, TID, BIGINT, BIGINT, BIGINT, TID[], BIGINT[], BYTEA[],
    BIGINT[], BIGINT[], BIGINT[], BIGINT[], BIGINT[], BYTEA[], SMALLINT[], BIGINT[]);
ALTER TABLE kv DROP COLUMN superseded;

-- Compaction walks the rows written since its last pass, in revision order, and removes the
-- rows each of them superseded: `purged_revision` is how far it got.
ALTER TABLE keyspaces ADD COLUMN purged_revision BIGINT NOT NULL DEFAULT 0;

-- A write batch in one statement (as in 0007): lock the keyspace row, check it is still the
-- version the batch read (else SQLSTATE KR001, nothing written), append the batch's rows,
-- point each key's head at its newest one, store the counters, announce the commit and its
-- revision.
CREATE FUNCTION kine_rs_commit(
    p_keyspace        BIGINT,
    p_read            TID,
    p_revision        BIGINT,
    p_keys_count      BIGINT,
    p_bytes_used      BIGINT,
    p_key             BYTEA[],
    p_mod_revision    BIGINT[],
    p_sub             BIGINT[],
    p_create_revision BIGINT[],
    p_version         BIGINT[],
    p_lease           BIGINT[],
    p_value           BYTEA[],
    p_deleted         SMALLINT[]
) RETURNS VOID LANGUAGE plpgsql AS $$
DECLARE
    locked TID;
BEGIN
    SELECT ctid INTO locked FROM keyspaces WHERE id = p_keyspace FOR UPDATE;
    IF locked IS NULL OR locked <> p_read THEN
        RAISE EXCEPTION 'kine-rs: keyspace % changed since the write batch read it', p_keyspace
            USING ERRCODE = 'KR001';
    END IF;
    INSERT INTO kv (keyspace, key, mod_revision, sub, create_revision, version, lease, value,
                    deleted)
        SELECT p_keyspace, * FROM unnest(p_key, p_mod_revision, p_sub, p_create_revision,
                                         p_version, p_lease, p_value, p_deleted);
    INSERT INTO kv_head AS h (keyspace, key, mod_revision, sub, deleted)
        SELECT DISTINCT ON (k) p_keyspace, k, m, s, d
        FROM unnest(p_key, p_mod_revision, p_sub, p_deleted) AS t(k, m, s, d)
        ORDER BY k, m DESC, s DESC
    ON CONFLICT (keyspace, key) DO UPDATE SET mod_revision = EXCLUDED.mod_revision,
        sub = EXCLUDED.sub, deleted = EXCLUDED.deleted;
    UPDATE keyspaces SET revision = p_revision, keys_count = p_keys_count,
                         bytes_used = p_bytes_used
        WHERE id = p_keyspace;
    -- `keyspace:revision`: a process that reads its own commit's announcement knows it has
    -- already published that revision and wakes nobody.
    PERFORM pg_notify('kine_rs_commits', CAST(p_keyspace AS TEXT) || ':' || CAST(p_revision AS TEXT));
END
$$;
