-- What each firing of a schedule did: the run it started as the schedule's owner, or why it
-- started none. Schedules themselves live in Temporal (spec, overlap policy, pause state);
-- this is what `GET /v1/schedules/{id}` shows as its recent starts. One row per scheduled
-- time: a retried firing updates its own row, never adds one.
CREATE TABLE schedule_starts (
    tenant_id    text NOT NULL,
    schedule_id  text NOT NULL,
    scheduled_at timestamptz NOT NULL,
    run_id       text,
    refused      text,
    at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, schedule_id, scheduled_at)
);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'stead_app') THEN
        GRANT SELECT, INSERT, UPDATE, DELETE ON schedule_starts TO stead_app;
    END IF;
END
$$;
