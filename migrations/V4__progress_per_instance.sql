-- Log positions per gateway: each gateway numbers its log records from its own counter, so a position is keyed by
-- the instance that wrote it (the identity kept in its data directory). Rows from before identities existed get
-- the empty instance; the gateway whose log they describe claims them at its next start.
ALTER TABLE ingest_wal_progress ADD COLUMN instance text NOT NULL DEFAULT '';
ALTER TABLE ingest_wal_progress ALTER COLUMN instance DROP DEFAULT;
ALTER TABLE ingest_wal_progress DROP CONSTRAINT ingest_wal_progress_pkey;
ALTER TABLE ingest_wal_progress ADD PRIMARY KEY (instance, stream, slot);
