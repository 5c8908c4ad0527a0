-- Large Temporal payloads, stored outside workflow histories (claim-check).
-- Content-addressed: the key is the SHA-256 of the stored bytes, which are the payload as
-- the codec left it (encrypted), so this table holds no plaintext and identical payloads
-- are stored once. Rows outlive the histories that reference them; `stead payloads gc`
-- removes those older than the namespace's retention.
CREATE TABLE payload_store (
    sha256     bytea PRIMARY KEY,
    data       bytea NOT NULL,
    size       integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX payload_store_age ON payload_store (created_at);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'stead_app') THEN
        GRANT SELECT, INSERT, DELETE ON payload_store TO stead_app;
    END IF;
END
$$;
