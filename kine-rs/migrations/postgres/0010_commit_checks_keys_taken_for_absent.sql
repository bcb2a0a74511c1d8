-- A write batch that starts from what this process committed last (no read at all) may take
-- keys it has never seen for absent: a plain put's key, or a key the request compares with
-- revision 0 (a create). `p_absent` names them, and the call refuses the batch with SQLSTATE
-- KR002 (nothing written) when one of them has a live current row. The check costs no lookup
-- of its own: the upsert of `kv_head` probes each key anyway, and leaves a live head of a key
-- in `p_absent` untouched, so fewer heads are written than the batch has keys.
--
-- The 13-argument function of migration 0009 stays for processes of the version before
-- during a rolling upgrade; they take no key for absent.
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
    p_deleted         SMALLINT[],
    p_absent          BYTEA[]
) RETURNS XID LANGUAGE plpgsql AS $$
DECLARE
    locked  XID;
    written XID;
    heads   BIGINT;
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
        sub = EXCLUDED.sub, deleted = EXCLUDED.deleted
        WHERE h.deleted <> 0 OR NOT (EXCLUDED.key = ANY(p_absent));
    IF cardinality(p_absent) > 0 THEN
        GET DIAGNOSTICS heads = ROW_COUNT;
        IF heads <> (SELECT count(DISTINCT k) FROM unnest(p_key) AS t(k)) THEN
            -- The exception undoes the inserts above.
            RAISE EXCEPTION 'kine-rs: a key of keyspace % the write batch took for absent exists',
                p_keyspace USING ERRCODE = 'KR002';
        END IF;
    END IF;
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
