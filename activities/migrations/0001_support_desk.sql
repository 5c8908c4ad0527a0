-- The support desk's own tables: the CRM the `lookup_customer` tool reads and the replies
-- `draft_reply` stores. `restricted` records are visible only to roles whose read grant allows
-- them (and so only to agents acting for such users). IF NOT EXISTS: Stead's own migrations
-- created these before they moved to the application.
CREATE TABLE IF NOT EXISTS crm_customers (
    tenant_id  text NOT NULL REFERENCES tenants (id),
    id         text NOT NULL,
    name       text NOT NULL,
    email      text NOT NULL,
    plan       text NOT NULL DEFAULT 'standard',
    restricted boolean NOT NULL DEFAULT false,
    notes      text NOT NULL DEFAULT '',
    PRIMARY KEY (tenant_id, id)
);

-- Drafts are stored, never sent by drafting; the operation key makes a retried draft one row.
CREATE TABLE IF NOT EXISTS drafts (
    tenant_id  text NOT NULL,
    op_key     text NOT NULL,
    run_id     text NOT NULL,
    subject    text NOT NULL,
    body       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, op_key)
);

-- What the application's login (the `stead_app` role, which Stead's migrations create) may do.
GRANT SELECT, INSERT, UPDATE ON crm_customers, drafts TO stead_app;
