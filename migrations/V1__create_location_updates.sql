-- GPS fixes from trucks and phones, one row per accepted update.
CREATE TABLE location_updates (
    device_id   text             NOT NULL,
    recorded_at timestamptz      NOT NULL,
    lat         double precision NOT NULL,
    lon         double precision NOT NULL,
    speed_kmh   double precision,
    heading_deg double precision,
    accuracy_m  double precision,
    attributes  jsonb,
    received_at timestamptz      NOT NULL
);

-- The usual question is "where was this device, and when": one device's track in time order.
CREATE INDEX location_updates_device_recorded_idx ON location_updates (device_id, recorded_at);
