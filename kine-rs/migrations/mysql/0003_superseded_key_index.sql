-- kv_live (keyspace, superseded, `key`) already serves the per-key lookup of writes on MySQL;
-- this migration keeps the three dialects' schema versions in step.
SELECT 1;
