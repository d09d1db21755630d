-- Both streams become tables range-partitioned by their time column. The gateway makes the partitions (ahead of
-- the allowed clock skew, behind the allowed age; see src/db/partitions.rs) with their indexes: a unique key that
-- leads with the time, so that rows arriving in time order append at the right edge of the index, and, once a
-- partition's time is past, an index for one device's (one project's) history. Old partitions are dropped whole.
--
-- An existing table is neither copied nor rewritten: it becomes the partition of everything before the end of
-- the newest day it holds (or of today), keeping its own indexes. Attaching reads it once to check its rows
-- fit. An empty table is simply replaced.

ALTER TABLE location_updates RENAME TO location_updates_legacy;
ALTER INDEX location_updates_device_recorded_key RENAME TO location_updates_legacy_device_recorded_key;
CREATE TABLE location_updates (LIKE location_updates_legacy INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
    PARTITION BY RANGE (recorded_at);

ALTER TABLE poll_results RENAME TO poll_results_legacy;
ALTER INDEX poll_results_project_polled_key RENAME TO poll_results_legacy_project_polled_key;
CREATE TABLE poll_results (LIKE poll_results_legacy INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
    PARTITION BY RANGE (polled_at);

DO $$
DECLARE
    newest timestamptz;
BEGIN
    IF EXISTS (SELECT 1 FROM location_updates_legacy) THEN
        SELECT max(recorded_at) INTO newest FROM location_updates_legacy;
        EXECUTE format(
            'ALTER TABLE location_updates ATTACH PARTITION location_updates_legacy FOR VALUES FROM (MINVALUE) TO (%L)',
            date_trunc('day', greatest(newest, now()), 'UTC') + interval '1 day');
    ELSE
        DROP TABLE location_updates_legacy;
    END IF;
    IF EXISTS (SELECT 1 FROM poll_results_legacy) THEN
        SELECT max(polled_at) INTO newest FROM poll_results_legacy;
        EXECUTE format(
            'ALTER TABLE poll_results ATTACH PARTITION poll_results_legacy FOR VALUES FROM (MINVALUE) TO (%L)',
            date_trunc('day', greatest(newest, now()), 'UTC') + interval '1 day');
    ELSE
        DROP TABLE poll_results_legacy;
    END IF;
END
$$;

-- The newest result of every project, kept by the writers in each batch's transaction and never moved back by a
-- late result (INGEST_LATEST_POLL_RESULTS): "is every project up now" without scanning the history.
CREATE TABLE project_latest_results (
    project_id       bigint      PRIMARY KEY,
    polled_at        timestamptz NOT NULL,
    success          boolean     NOT NULL,
    status_code      smallint,
    response_time_ms integer,
    error_message    text,
    attributes       jsonb,
    received_at      timestamptz NOT NULL
) WITH (fillfactor = 30);

-- The "latest" tables are rewritten in place all day, one update per device per batch. Room on every page lets
-- PostgreSQL update a row without touching its index (a HOT update) and reclaim the old version on the spot;
-- device_positions is rewritten once (one row per device: small) so that its existing pages get that room too.
ALTER TABLE device_positions SET (fillfactor = 30);
CLUSTER device_positions USING device_positions_pkey;
