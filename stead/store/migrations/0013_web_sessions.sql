-- Sessions of the reviewers' web app (stead/web), and OIDC sign-ins in flight.
--
-- A browser holds a random token in an HttpOnly cookie; only its SHA-256 is kept here, so
-- reading this table signs nobody in. A session names the principal and, when it was opened
-- with an API key, that key: every request joins both, so revoking the key or disabling the
-- principal ends its sessions at once, and roles are read afresh each time. The CSRF token is
-- the session's synchronizer token: every state-changing form carries it.
CREATE TABLE web_sessions (
    token_hash   bytea PRIMARY KEY,
    tenant_id    text NOT NULL,
    principal_id text NOT NULL,
    api_key_id   text REFERENCES api_keys (id),
    method       text NOT NULL CHECK (method IN ('api_key', 'oidc')),
    csrf_token   text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    revoked_at   timestamptz,
    FOREIGN KEY (tenant_id, principal_id) REFERENCES principals (tenant_id, id),
    CHECK ((method = 'api_key') = (api_key_id IS NOT NULL))
);
CREATE INDEX web_sessions_principal ON web_sessions (tenant_id, principal_id);
CREATE INDEX web_sessions_expiry ON web_sessions (expires_at);

-- An OIDC sign-in between the redirect to the issuer and its callback: found by the state
-- (hashed), bound to the browser that started it by a cookie (hashed), used once.
CREATE TABLE web_oidc_logins (
    state_hash    bytea PRIMARY KEY,
    binding_hash  bytea NOT NULL,
    nonce         text NOT NULL,
    code_verifier text NOT NULL,
    return_to     text NOT NULL,
    expires_at    timestamptz NOT NULL
);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'stead_app') THEN
        GRANT SELECT, INSERT, UPDATE, DELETE ON web_sessions, web_oidc_logins TO stead_app;
    END IF;
END
$$;
