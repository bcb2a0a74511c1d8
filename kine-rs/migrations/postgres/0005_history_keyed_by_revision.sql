-- Fewer indexes ordered by key, the ones a batch of writes to scattered keys dirties a page
-- of per key: rows are identified by (keyspace, mod_revision, sub), which new rows append to;
-- a key's current row is found in kv_current (which carries `deleted`, so counts of live keys
-- read the index only), its superseded rows in kv_old. A new key now touches one key-ordered
-- index instead of three. Reads at an older revision take the current rows and the
-- superseded rows separately, each through its own index.
ALTER TABLE kv DROP CONSTRAINT kv_pkey;
DROP INDEX kv_live;
DROP INDEX kv_log;
ALTER TABLE kv ADD CONSTRAINT kv_pkey PRIMARY KEY (keyspace, mod_revision, sub);
DROP INDEX kv_current;
CREATE UNIQUE INDEX kv_current ON kv (keyspace, key) INCLUDE (deleted)
    WHERE superseded = 9223372036854775807;
CREATE INDEX kv_old ON kv (keyspace, key, mod_revision)
    WHERE superseded <> 9223372036854775807;
