-- Live migration between datastores (see `kine::migrate`). A keyspace's role in a migration:
-- 0 none; 1 the source of a running migration (compaction may not pass `pinned_revision`,
-- the revision the copy still reads from); 2 the target of an unfinished import (not served);
-- 3 moved to another datastore (left frozen, not served). `migration` holds the migration's
-- own record: the peer endpoint (without credentials) and the import's checkpoint.
ALTER TABLE keyspaces ADD COLUMN migration_role INTEGER NOT NULL DEFAULT 0;
ALTER TABLE keyspaces ADD COLUMN pinned_revision INTEGER NOT NULL DEFAULT 0;
ALTER TABLE keyspaces ADD COLUMN migration TEXT NULL;
