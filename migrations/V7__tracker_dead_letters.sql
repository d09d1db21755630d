-- Tracker fixes that can never be stored (bad or 0,0 coordinates, flagged invalid, outside the time window) are
-- answered as success and kept in dead_letters too, written by the dead_letter stream: why (a reason from a small
-- fixed set), which protocol brought them, the device they name and when the gateway took them. Rows PostgreSQL
-- refused keep these NULL; their error and sqlstate say why.
ALTER TABLE dead_letters
    ADD COLUMN reason      text,
    ADD COLUMN protocol    text,
    ADD COLUMN device_id   text,
    ADD COLUMN received_at timestamptz;

-- "The recent refusals of one protocol (for one reason)". Partial: the rows PostgreSQL refused are not in it, so it
-- stays as small as the tracker letters and costs their writes only.
CREATE INDEX dead_letters_protocol_reason_failed_at_idx
    ON dead_letters (protocol, reason, failed_at)
    WHERE protocol IS NOT NULL;
