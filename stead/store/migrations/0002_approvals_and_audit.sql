-- Approvals projection and the tamper-evident audit log.
--
-- The workflow is the source of truth for an approval; this table is its projection, written
-- by an activity whenever the approval changes, so the inbox is one indexed query instead of a
-- query to every parked run.

CREATE TABLE approvals (
    id                  text PRIMARY KEY,
    tenant_id           text NOT NULL REFERENCES tenants (id),
    run_id              text NOT NULL,
    workflow_id         text NOT NULL,
    pipeline            text NOT NULL,
    kind                text NOT NULL,
    title               text NOT NULL,
    proposal            jsonb NOT NULL,
    requested_by        text NOT NULL,
    eligible_roles      text[] NOT NULL DEFAULT '{}',
    eligible_principals text[] NOT NULL DEFAULT '{}',
    quorum              integer NOT NULL DEFAULT 1,
    approvals           integer NOT NULL DEFAULT 0,
    decided_by          text[] NOT NULL DEFAULT '{}',
    status              text NOT NULL CHECK
                        (status IN ('pending', 'approved', 'rejected', 'expired', 'cancelled')),
    deadline_at         timestamptz NOT NULL,
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL,
    -- Monotonic per approval: an older projection write never overwrites a newer one.
    version             integer NOT NULL
);
CREATE INDEX approvals_inbox ON approvals (tenant_id, status, deadline_at);
CREATE INDEX approvals_run ON approvals (tenant_id, run_id);

-- A tenant's approval policy for a pipeline step, replacing policies/approvals.yaml's.
CREATE TABLE approval_overrides (
    tenant_id  text NOT NULL REFERENCES tenants (id),
    pipeline   text NOT NULL,
    step       text NOT NULL,
    policy     jsonb NOT NULL,
    updated_by text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, pipeline, step)
);

-- Append-only, hash-chained per tenant. entry_hash = sha256(prev_hash || canonical content),
-- so altering, deleting, inserting or reordering any entry breaks every later link.
-- `event_key` makes writes idempotent: a retried activity inserts nothing new.
CREATE TABLE audit_log (
    tenant_id   text NOT NULL,
    seq         bigint NOT NULL,
    event_key   text NOT NULL,
    at          timestamptz NOT NULL,
    actor       text NOT NULL,
    actor_kind  text NOT NULL,
    action      text NOT NULL,
    run_id      text,
    -- Redacted content as canonical JSON text: hashed byte for byte, no jsonb normalization.
    data        text NOT NULL,
    -- Full content of masked fields, AES-GCM encrypted; shown only to viewers with the right.
    private     bytea,
    prev_hash   bytea NOT NULL,
    entry_hash  bytea NOT NULL,
    PRIMARY KEY (tenant_id, seq),
    UNIQUE (tenant_id, event_key)
);
CREATE INDEX audit_run ON audit_log (tenant_id, run_id, seq);
CREATE INDEX audit_action ON audit_log (tenant_id, action, at);
CREATE INDEX audit_actor ON audit_log (tenant_id, actor, at);

CREATE FUNCTION audit_log_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_refuse_change();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_refuse_change();

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'stead_app') THEN
        GRANT SELECT, INSERT, UPDATE ON approvals TO stead_app;
        GRANT SELECT, INSERT, UPDATE, DELETE ON approval_overrides TO stead_app;
        GRANT SELECT, INSERT ON audit_log TO stead_app;
        REVOKE UPDATE, DELETE, TRUNCATE ON audit_log FROM stead_app;
    END IF;
END
$$;
