-- Per-tenant permission overrides, and the data the support agent's tools touch.

-- A tenant's change to policies/permissions.yaml: `allow` adds a grant, `deny` removes a
-- capability (and always wins), `approve` keeps it but requires approval by
-- `requires_approval` roles (a tenant tightening the file policy, e.g. "all email is reviewed").
CREATE TABLE policy_overrides (
    id                bigserial PRIMARY KEY,
    tenant_id         text NOT NULL REFERENCES tenants (id),
    subject_kind      text NOT NULL CHECK (subject_kind IN ('role', 'agent', 'principal')),
    subject           text NOT NULL,
    effect            text NOT NULL CHECK (effect IN ('allow', 'deny', 'approve')),
    action            text NOT NULL CHECK (action IN ('read', 'draft', 'execute', '*')),
    resource          text NOT NULL,
    constraints       jsonb NOT NULL DEFAULT '[]',
    requires_approval text[] NOT NULL DEFAULT '{}',
    created_by        text NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    revoked_at        timestamptz
);
CREATE INDEX policy_overrides_live ON policy_overrides (tenant_id) WHERE revoked_at IS NULL;

-- The CRM the `lookup_customer` tool reads. `restricted` records are visible only to roles
-- whose read grant allows them (and so only to agents acting for such users).
CREATE TABLE crm_customers (
    tenant_id  text NOT NULL REFERENCES tenants (id),
    id         text NOT NULL,
    name       text NOT NULL,
    email      text NOT NULL,
    plan       text NOT NULL DEFAULT 'standard',
    restricted boolean NOT NULL DEFAULT false,
    notes      text NOT NULL DEFAULT '',
    PRIMARY KEY (tenant_id, id)
);

-- Replies drafted by agents (`draft_reply`): drafts are stored, never sent by drafting.
CREATE TABLE drafts (
    tenant_id  text NOT NULL,
    op_key     text NOT NULL,
    run_id     text NOT NULL,
    subject    text NOT NULL,
    body       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, op_key)
);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'stead_app') THEN
        GRANT SELECT, INSERT, UPDATE ON policy_overrides, crm_customers, drafts TO stead_app;
        GRANT USAGE ON SEQUENCE policy_overrides_id_seq TO stead_app;
    END IF;
END
$$;
