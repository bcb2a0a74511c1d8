-- MySQL has no partial indexes, so its schema keeps the primary key by key and kv_live
-- (keyspace, superseded, `key`); the statements that changed with this version (reads at
-- older revisions in two branches) run on it unchanged. This keeps the dialects in step.
SELECT 1;
