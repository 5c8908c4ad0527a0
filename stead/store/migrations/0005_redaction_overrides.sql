-- A tenant's additions to policies/redaction.yaml: more field names to drop or mask before
-- content reaches the audit log. Additions only: a tenant can make its log say less, never
-- more. The audit writer reads this row inside every append's transaction, so a change
-- applies to the very next entry on every worker.

CREATE TABLE redaction_overrides (
    tenant_id   text PRIMARY KEY REFERENCES tenants (id),
    drop_fields text[] NOT NULL DEFAULT '{}',
    mask_fields text[] NOT NULL DEFAULT '{}',
    updated_by  text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    -- A name is dropped or masked, not both: the API refuses the ambiguity up front.
    CONSTRAINT redaction_overrides_disjoint CHECK (NOT (drop_fields && mask_fields))
);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'stead_app') THEN
        -- No DELETE: clearing a tenant's additions is an update to empty lists, and is audited.
        GRANT SELECT, INSERT, UPDATE ON redaction_overrides TO stead_app;
    END IF;
END
$$;
