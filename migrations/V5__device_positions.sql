-- The newest fix of every device, kept by the writers in each batch's transaction and never moved back by a late
-- update: "where is every truck now" without scanning the history.
CREATE TABLE device_positions (
    device_id   text             PRIMARY KEY,
    recorded_at timestamptz      NOT NULL,
    lat         double precision NOT NULL,
    lon         double precision NOT NULL,
    speed_kmh   double precision,
    heading_deg double precision,
    accuracy_m  double precision,
    attributes  jsonb,
    received_at timestamptz      NOT NULL
);
