-- MySQL has no partial indexes; kv_live (keyspace, superseded, `key`) already serves both the
-- current-row lookups (a multi-range IN) and compaction. This keeps the dialects in step.
SELECT 1;
