-- A write batch that read without the lock names the version of the keyspace row it read,
-- and its commit is refused if the row changed since. Until now that version was the row's
-- `ctid`, its place on its page: but PostgreSQL reuses a page's line pointers once an update
-- prunes the old versions, so after a few commits by another process the row came back to the
-- place a batch had read it from, and a batch decided on a stale read passed the check (it
-- then failed on a duplicate revision instead of being run again under the lock). `xmin`, the
-- id of the transaction that wrote the row version, changes with every committed update and
-- is never taken again by another one. The function now answers that new version.
DROP FUNCTION kine_rs_commit(BIGINT, TID, BIGINT, BIGINT, BIGINT, BYTEA[], BIGINT[], BIGINT[],
    BIGINT[], BIGINT[], BIGINT[], BYTEA[], SMALLINT[]);

CREATE FUNCTION kine_rs_commit(
    p_keyspace        BIGINT,
    p_read            XID,
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
) RETURNS XID LANGUAGE plpgsql AS $$
DECLARE
    locked XID;
    written XID;
BEGIN
    SELECT xmin INTO locked FROM keyspaces WHERE id = p_keyspace FOR UPDATE;
    IF locked IS NULL OR NOT (locked = p_read) THEN
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
        WHERE id = p_keyspace
        RETURNING xmin INTO written;
    -- `keyspace:revision`: a process that reads its own commit's announcement knows it has
    -- already published that revision and wakes nobody.
    PERFORM pg_notify('kine_rs_commits', CAST(p_keyspace AS TEXT) || ':' || CAST(p_revision AS TEXT));
    -- The row's new version: a process that keeps what it committed starts its next batch
    -- from it, without reading.
    RETURN written;
END
$$;
