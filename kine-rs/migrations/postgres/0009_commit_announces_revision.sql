-- The commit function of 0007, announcing the committed revision with the keyspace
-- (`ID:REVISION` on channel kine_rs_commits): each process's change feed then wakes only the
-- watch hubs of that keyspace that have not published that revision yet, so the
-- announcement of a commit this process made (its hub already woken by its writer) costs
-- no read. Unchanged otherwise. Payloads of only an id (0007) are still understood.
CREATE OR REPLACE FUNCTION kine_rs_commit(
    p_keyspace        BIGINT,
    p_read            TID,
    p_revision        BIGINT,
    p_keys_count      BIGINT,
    p_bytes_used      BIGINT,
    p_superseded_rows TID[],
    p_superseded_at   BIGINT[],
    p_key             BYTEA[],
    p_mod_revision    BIGINT[],
    p_sub             BIGINT[],
    p_create_revision BIGINT[],
    p_version         BIGINT[],
    p_lease           BIGINT[],
    p_value           BYTEA[],
    p_deleted         SMALLINT[],
    p_superseded      BIGINT[]
) RETURNS VOID LANGUAGE plpgsql AS $$
DECLARE
    locked  TID;
    changed BIGINT;
BEGIN
    SELECT ctid INTO locked FROM keyspaces WHERE id = p_keyspace FOR UPDATE;
    IF locked IS NULL OR locked <> p_read THEN
        RAISE EXCEPTION 'kine-rs: keyspace % changed since the write batch read it', p_keyspace
            USING ERRCODE = 'KR001';
    END IF;
    IF cardinality(p_superseded_rows) > 0 THEN
        -- Only row ids in WHERE, so the plan is a TID scan whatever the statistics; a row id
        -- that no longer names a current row of the keyspace sets NULL, which fails.
        UPDATE kv SET superseded = CASE WHEN keyspace = p_keyspace
                AND superseded = 9223372036854775807
            THEN p_superseded_at[array_position(p_superseded_rows, ctid)] END
        WHERE ctid = ANY(p_superseded_rows);
        GET DIAGNOSTICS changed = ROW_COUNT;
        IF changed <> cardinality(p_superseded_rows) THEN
            -- A compaction purged a current tombstone the batch read.
            RAISE EXCEPTION 'kine-rs: rows of keyspace % changed since the write batch read them',
                p_keyspace USING ERRCODE = 'KR001';
        END IF;
    END IF;
    INSERT INTO kv (keyspace, key, mod_revision, sub, create_revision, version, lease, value,
                    deleted, superseded)
        SELECT p_keyspace, * FROM unnest(p_key, p_mod_revision, p_sub, p_create_revision,
                                         p_version, p_lease, p_value, p_deleted, p_superseded);
    UPDATE keyspaces SET revision = p_revision, keys_count = p_keys_count,
                         bytes_used = p_bytes_used
        WHERE id = p_keyspace;
    PERFORM pg_notify('kine_rs_commits', CAST(p_keyspace AS TEXT) || ':' || CAST(p_revision AS TEXT));
END
$$;
