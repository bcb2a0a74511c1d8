-- Writes look a key's current row up by (keyspace, key, superseded = current). With only
-- (keyspace, superseded), the planner could walk every current row of the keyspace per write;
-- with the key in the index it is a point lookup, and compaction still scans its prefix.
DROP INDEX kv_superseded;
CREATE INDEX kv_superseded ON kv (keyspace, superseded, key);
