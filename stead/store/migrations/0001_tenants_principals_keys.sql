-- Tenants, principals (users, agents, services) and hashed API keys.
-- Also the application role: Stead's processes SET ROLE to it after connecting, so what the
-- application may do to each table is decided here, by grants, not by code paths.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'stead_app') THEN
        CREATE ROLE stead_app NOLOGIN;
    END IF;
    -- The migrating user must be able to switch to the role (superusers always can).
    EXECUTE format('GRANT stead_app TO %I', current_user);
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'cannot create role stead_app; the application will run as %', current_user;
END
$$;

CREATE TABLE tenants (
    id          text PRIMARY KEY CHECK (id ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    name        text NOT NULL,
    plan        text NOT NULL DEFAULT 'standard',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE principals (
    tenant_id   text NOT NULL REFERENCES tenants (id),
    id          text NOT NULL CHECK (id ~ '^[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}$'),
    kind        text NOT NULL CHECK (kind IN ('user', 'agent', 'service')),
    display_name text NOT NULL DEFAULT '',
    roles       text[] NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    disabled_at timestamptz,
    PRIMARY KEY (tenant_id, id)
);

-- A key is shown once as `stead_<id>_<secret>`; only sha256(secret) is kept. Secrets are 32
-- random bytes, so a fast hash is enough (no dictionary to guess from).
CREATE TABLE api_keys (
    id           text PRIMARY KEY,
    secret_hash  bytea NOT NULL,
    tenant_id    text NOT NULL,
    principal_id text NOT NULL,
    label        text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz,
    FOREIGN KEY (tenant_id, principal_id) REFERENCES principals (tenant_id, id)
);
CREATE INDEX api_keys_principal ON api_keys (tenant_id, principal_id);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'stead_app') THEN
        GRANT USAGE ON SCHEMA public TO stead_app;
        GRANT SELECT, INSERT, UPDATE ON tenants, principals, api_keys TO stead_app;
    END IF;
END
$$;
