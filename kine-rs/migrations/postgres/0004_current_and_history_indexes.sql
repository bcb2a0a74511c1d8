-- A key's current row (live or a tombstone) is found through an index of current rows only,
-- whatever the table's statistics say: with (keyspace, superseded, key), a planner without
-- fresh statistics filtered a batch's IN list over every current row of the keyspace. The
-- index is unique, so two current rows of one key cannot exist. Compaction finds superseded
-- rows through an index of history only; every row is in exactly one of the two.
DROP INDEX kv_superseded;
CREATE UNIQUE INDEX kv_current ON kv (keyspace, key) WHERE superseded = 9223372036854775807;
CREATE INDEX kv_history ON kv (keyspace, superseded) WHERE superseded <> 9223372036854775807;
