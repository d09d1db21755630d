-- Exactly-once support: natural keys (a retried update is absorbed, not stored twice), a home for rows PostgreSQL
-- rejects for good, and each log slot's committed position.

-- Rows stored twice before the keys were unique: keep one of each.
DELETE FROM location_updates a USING location_updates b
 WHERE a.ctid < b.ctid AND a.device_id = b.device_id AND a.recorded_at = b.recorded_at;
DROP INDEX location_updates_device_recorded_idx;
CREATE UNIQUE INDEX location_updates_device_recorded_key ON location_updates (device_id, recorded_at);

DELETE FROM poll_results a USING poll_results b
 WHERE a.ctid < b.ctid AND a.project_id = b.project_id AND a.polled_at = b.polled_at;
DROP INDEX poll_results_project_polled_idx;
CREATE UNIQUE INDEX poll_results_project_polled_key ON poll_results (project_id, polled_at);

-- Updates that PostgreSQL refused for a reason retrying cannot fix (a constraint, a trigger, a value out of a
-- column's range), kept with the database's error so that nothing acknowledged disappears silently.
CREATE TABLE dead_letters (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream    text        NOT NULL,
    payload   jsonb       NOT NULL,
    error     text        NOT NULL,
    sqlstate  text,
    failed_at timestamptz NOT NULL DEFAULT now()
);

-- For each stream and log slot, the last write-ahead-log record whose updates are committed: `lsn`, and how many
-- of its updates (`updates_done`, NULL for all of them) when a large record spans several batches. Written in the
-- same transaction as the batch, so a replay after a crash resumes exactly after it.
CREATE TABLE ingest_wal_progress (
    stream       text    NOT NULL,
    slot         integer NOT NULL,
    lsn          bigint  NOT NULL,
    updates_done integer,
    PRIMARY KEY (stream, slot)
);
