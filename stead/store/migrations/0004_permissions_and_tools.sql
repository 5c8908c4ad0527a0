-- Per-tenant permission overrides.

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

-- (The support desk's CRM and drafts tables, created here by earlier versions, belong to the
-- reference application: activities/migrations/0001_support_desk.sql creates them if absent.)

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'stead_app') THEN
        GRANT SELECT, INSERT, UPDATE ON policy_overrides TO stead_app;
        GRANT USAGE ON SEQUENCE policy_overrides_id_seq TO stead_app;
    END IF;
END
$$;
