-- Results of uptime and API polls, one row per accepted update.
CREATE TABLE poll_results (
    project_id       bigint      NOT NULL,
    polled_at        timestamptz NOT NULL,
    success          boolean     NOT NULL,
    status_code      smallint,
    response_time_ms integer,
    error_message    text,
    attributes       jsonb,
    received_at      timestamptz NOT NULL
);

-- One project's history in time order.
CREATE INDEX poll_results_project_polled_idx ON poll_results (project_id, polled_at);
