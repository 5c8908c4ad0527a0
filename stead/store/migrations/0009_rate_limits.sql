-- Request limits that hold across every API process: the state is here, not in a process.
--
-- One row per bucket: (tenant, action, scope, subject), scope `key` (subject: the API key id)
-- or `tenant` (subject ''). The algorithm is GCRA, the token bucket kept as one timestamp:
-- `tat`, the theoretical arrival time. A request at `now` against a bucket of `burst` requests
-- refilled every `interval` seconds is admitted when greatest(tat, now) + interval - now is at
-- most burst * interval, and then moves tat to greatest(tat, now) + interval. So at most
-- burst + elapsed / interval requests are ever admitted in any window, and the wait before a
-- refused request could pass is exact (the `Retry-After`).
--
-- UNLOGGED: a bucket changes on every limited request, and the start path's other statement
-- is a read. Logged, each start would wait for a WAL flush at commit. A crash or a failover
-- empties the table, which hands every bucket its full burst again: acceptable for a limit,
-- whose job is to bound sustained rates, not to be an exact ledger (budgets are that).
-- fillfactor leaves room on each page for HOT updates, so updates never touch the index.
CREATE UNLOGGED TABLE rate_limits (
    tenant_id text NOT NULL,
    action    text NOT NULL,
    scope     text NOT NULL CHECK (scope IN ('key', 'tenant')),
    subject   text NOT NULL,
    tat       timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, action, scope, subject)
) WITH (fillfactor = 50);

-- Runs waiting for a human, per tenant: what the cap on a tenant's approval backlog counts.
CREATE INDEX approvals_waiting_runs ON approvals (tenant_id, run_id) WHERE status = 'pending';

-- Admit one request or refuse it, in one statement (the caller's one round trip).
--
-- `p_limits` is the plan's limits for this action: `{"key": {"interval": s, "burst": n},
-- "tenant": {...}, "max_runs_awaiting_approval": n}`, every member optional. The cap is checked
-- first, so a refused start spends no allowance; then every bucket the request draws on is
-- locked (in scope order, the same in every transaction: no deadlock) and charged only if all
-- of them admit it. A refusal by the tenant's bucket thus costs the key nothing, and a key
-- refused by its own bucket cannot drain its tenant's. `p_now` is for tests; the server's
-- clock is the one every replica shares.
CREATE FUNCTION rate_limit_admit(
    p_tenant text,
    p_action text,
    p_key text,
    p_limits jsonb,
    p_now timestamptz DEFAULT NULL,
    OUT admitted boolean,
    OUT retry_after double precision,
    OUT refused_by text
) LANGUAGE plpgsql AS $$
DECLARE
    v_now timestamptz := coalesce(p_now, clock_timestamp());
    v_cap integer := (p_limits ->> 'max_runs_awaiting_approval')::integer;
    v_waiting integer;
    v_wait double precision;
    b record;
BEGIN
    admitted := true;
    retry_after := 0;
    IF v_cap IS NOT NULL THEN
        SELECT count(*) INTO v_waiting FROM (
            SELECT DISTINCT run_id FROM approvals
            WHERE tenant_id = p_tenant AND status = 'pending' LIMIT v_cap
        ) AS waiting;
        IF v_waiting >= v_cap THEN
            admitted := false;
            refused_by := 'awaiting_approval';
            RETURN;
        END IF;
    END IF;
    -- A bucket seen for the first time starts full.
    INSERT INTO rate_limits (tenant_id, action, scope, subject, tat)
    SELECT p_tenant, p_action, s.scope, s.subject, '-infinity'
    FROM (VALUES ('key', p_key), ('tenant', '')) AS s (scope, subject)
    WHERE p_limits ? s.scope
    ON CONFLICT DO NOTHING;
    FOR b IN
        SELECT r.scope, r.tat,
               (p_limits -> r.scope ->> 'interval')::double precision AS step,
               (p_limits -> r.scope ->> 'burst')::double precision AS burst
        FROM rate_limits r
        WHERE r.tenant_id = p_tenant AND r.action = p_action AND p_limits ? r.scope
          AND r.subject = CASE r.scope WHEN 'key' THEN p_key ELSE '' END
        ORDER BY r.scope
        FOR UPDATE
    LOOP
        v_wait := extract(epoch FROM greatest(b.tat, v_now) - v_now)::double precision
            + b.step * (1 - b.burst);
        -- A microsecond of slack: timestamps are whole microseconds, intervals are not.
        IF v_wait > 1e-6 AND v_wait > retry_after THEN
            admitted := false;
            retry_after := v_wait;
            refused_by := b.scope;
        END IF;
    END LOOP;
    IF NOT admitted THEN
        RETURN;
    END IF;
    UPDATE rate_limits r
    SET tat = greatest(r.tat, v_now)
        + make_interval(secs => (p_limits -> r.scope ->> 'interval')::double precision)
    WHERE r.tenant_id = p_tenant AND r.action = p_action AND p_limits ? r.scope
      AND r.subject = CASE r.scope WHEN 'key' THEN p_key ELSE '' END;
END
$$;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'stead_app') THEN
        GRANT SELECT, INSERT, UPDATE ON rate_limits TO stead_app;
        GRANT EXECUTE ON FUNCTION
            rate_limit_admit(text, text, text, jsonb, timestamptz) TO stead_app;
    END IF;
END
$$;
