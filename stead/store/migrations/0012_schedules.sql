-- Schedules live in Temporal (spec, overlap policy, pause state); what each firing starts is
-- here: the pipeline's input and budget, read by every firing. Not in the schedule's action:
-- an input past the claim-check threshold would be stored once in payload_store and then
-- referenced by no history for as long as the schedule does not fire (a monthly schedule,
-- a week's retention), so `stead payloads gc` would delete it from under the schedule.
-- The input is customer data, as a run's input is in Temporal: sealed with the payload keys
-- (`input_sealed`), in clear (`input`) only where payload encryption is off.
CREATE TABLE schedules (
    tenant_id    text NOT NULL REFERENCES tenants (id),
    id           text NOT NULL,
    owner        text NOT NULL,
    pipeline     text NOT NULL,
    input        jsonb,
    input_sealed bytea,
    budget_usd   double precision,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    CHECK ((input IS NULL) <> (input_sealed IS NULL))
);

-- What each firing did: the run it started as the schedule's owner, or why it started none
-- (`GET /v1/schedules/{id}` shows the recent ones). One row per scheduled time: a retried
-- firing updates its own row, never adds one.
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
        GRANT SELECT, INSERT, DELETE ON schedules TO stead_app;
        GRANT SELECT, INSERT, UPDATE, DELETE ON schedule_starts TO stead_app;
    END IF;
END
$$;
