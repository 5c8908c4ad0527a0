-- Provider prompt caching, thinking and Message Batches in the usage ledger; the batch queue.

-- The writes' 1-hour part (cache_write_tokens stays the total), thinking (a part of the
-- output), what caching saved (against every prompt token uncached; negative for a call that
-- only wrote) and whether the call went through a batch (billed at batch rates).
ALTER TABLE model_usage
    ADD COLUMN cache_write_1h_tokens integer NOT NULL DEFAULT 0,
    ADD COLUMN thinking_tokens       integer NOT NULL DEFAULT 0,
    ADD COLUMN cache_saved_nusd      bigint  NOT NULL DEFAULT 0,
    ADD COLUMN batch                 boolean NOT NULL DEFAULT false;

-- A reservation held on purpose past the sweeper's age: a deferred call's, for as long as
-- its batch may take. The sweeper leaves it until then.
ALTER TABLE budget_reservations ADD COLUMN held_until timestamptz;

-- One row per deferred model call, by its custom_id in the batch. `request` (the params as
-- sent) is kept only until the batch is submitted; `call` holds what recording needs (the
-- run's context, step, the TTL asked for), `reply` the result once the batch has ended.
CREATE TABLE model_batch_requests (
    custom_id   text PRIMARY KEY,
    tenant_id   text NOT NULL,
    call_key    text NOT NULL,
    workflow_id text NOT NULL,
    model       text NOT NULL,
    call        jsonb NOT NULL,
    request     jsonb,
    status      text NOT NULL CHECK (status IN
                    ('queued', 'submitted', 'succeeded', 'errored', 'expired', 'canceled')),
    abandoned   boolean NOT NULL DEFAULT false,
    batch_id    text,
    reply       jsonb,
    reason      text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX model_batch_requests_batch ON model_batch_requests (batch_id);

-- Batches submitted to the provider, by the batcher's flush that made them (a retried flush
-- finds its batch instead of making another).
CREATE TABLE model_batches (
    batch_id   text PRIMARY KEY,
    tenant_id  text NOT NULL,
    flush_key  text NOT NULL UNIQUE,
    requests   integer NOT NULL,
    status     text NOT NULL DEFAULT 'in_progress',
    created_at timestamptz NOT NULL DEFAULT now(),
    ended_at   timestamptz
);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'stead_app') THEN
        GRANT SELECT, INSERT, UPDATE ON model_batch_requests, model_batches TO stead_app;
    END IF;
END
$$;
