-- Model gateway: usage ledger, budgets, response cache and the per-call memo.
-- Money is integer nano-USD (1e-9): exact sums for every listed price.

-- One row per model call attempt that reached a provider or the cache.
CREATE TABLE model_usage (
    call_key           text NOT NULL,
    attempt            integer NOT NULL,
    tenant_id          text NOT NULL,
    principal_id       text NOT NULL,
    pipeline           text NOT NULL,
    run_id             text NOT NULL,
    step               text NOT NULL,
    model              text NOT NULL,
    input_tokens       integer NOT NULL DEFAULT 0,
    output_tokens      integer NOT NULL DEFAULT 0,
    cache_read_tokens  integer NOT NULL DEFAULT 0,
    cache_write_tokens integer NOT NULL DEFAULT 0,
    cost_nusd          bigint NOT NULL DEFAULT 0,
    cache_hit          boolean NOT NULL DEFAULT false,
    fallbacks          integer NOT NULL DEFAULT 0,
    latency_ms         real NOT NULL DEFAULT 0,
    at                 timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (call_key, attempt)
);
CREATE INDEX model_usage_tenant_at ON model_usage (tenant_id, at);
CREATE INDEX model_usage_run ON model_usage (tenant_id, run_id);

-- The reply of a completed call, by the workflow's idempotency key: a retried activity whose
-- earlier attempt finished at the provider returns this instead of paying again.
CREATE TABLE model_calls (
    call_key   text PRIMARY KEY,
    tenant_id  text NOT NULL,
    reply      jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Exact-match response cache. Never shared across tenants: the tenant is in the key.
CREATE TABLE response_cache (
    tenant_id    text NOT NULL,
    model        text NOT NULL,
    request_hash bytea NOT NULL,
    reply        jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    hits         integer NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, model, request_hash)
);
CREATE INDEX response_cache_expiry ON response_cache (expires_at);

-- Configured limits: per customer (subject '') or per user, per day or month.
CREATE TABLE budgets (
    tenant_id  text NOT NULL REFERENCES tenants (id),
    scope      text NOT NULL CHECK (scope IN ('customer', 'user')),
    subject    text NOT NULL DEFAULT '',
    period     text NOT NULL CHECK (period IN ('day', 'month')),
    limit_nusd bigint NOT NULL CHECK (limit_nusd >= 0),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, scope, subject, period)
);

-- Live counters, one row per budget and period (a run budget has one period: the run).
-- Invariant kept by conditional updates under row locks: spent + reserved <= limit.
CREATE TABLE budget_counters (
    tenant_id     text NOT NULL,
    scope         text NOT NULL CHECK (scope IN ('customer', 'user', 'run')),
    subject       text NOT NULL,
    period        text NOT NULL,
    period_start  date NOT NULL,
    limit_nusd    bigint NOT NULL,
    spent_nusd    bigint NOT NULL DEFAULT 0,
    reserved_nusd bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, scope, subject, period, period_start)
);

-- A reservation per attempt. Settled from actual usage; a crashed attempt's reservation is
-- charged in full by the sweeper (a crash never loses a charge).
CREATE TABLE budget_reservations (
    call_key     text NOT NULL,
    attempt      integer NOT NULL,
    tenant_id    text NOT NULL,
    counters     jsonb NOT NULL,
    amount_nusd  bigint NOT NULL,
    charged_nusd bigint,
    status       text NOT NULL CHECK (status IN ('reserved', 'settled', 'expired')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    settled_at   timestamptz,
    PRIMARY KEY (call_key, attempt)
);
CREATE INDEX budget_reservations_open ON budget_reservations (created_at)
    WHERE status = 'reserved';

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'stead_app') THEN
        GRANT SELECT, INSERT, UPDATE ON model_usage, model_calls, budgets, budget_counters,
            budget_reservations TO stead_app;
        GRANT SELECT, INSERT, UPDATE, DELETE ON response_cache TO stead_app;
    END IF;
END
$$;
