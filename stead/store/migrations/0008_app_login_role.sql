-- The application logs in as stead_app itself. Until now it connected as a superuser (dev) or
-- the tables' owner (compose) and only SET ROLE to stead_app, so any SQL on its connections
-- could RESET ROLE and rewrite the audit log. stead_app is now a LOGIN role with no
-- attribute beyond that, a member of no role (it cannot SET ROLE to anyone), owner of
-- nothing, holding only the grants the migrations give it. Migrations run as the owner, on a
-- connection of their own (STEAD_MIGRATE_DATABASE_URL).
--
-- No password is written here. Where the server asks for one (compose, Kubernetes), `stead
-- migrate` sets it from DATABASE_URL, as a SCRAM verifier computed client-side, so the
-- plaintext never reaches the server's logs. In dev the embedded server trusts its Unix socket.

DO $$
DECLARE
    granted text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'stead_app') THEN
        CREATE ROLE stead_app LOGIN;
    END IF;
    IF EXISTS (
        SELECT 1 FROM pg_roles WHERE rolname = 'stead_app' AND (NOT rolcanlogin OR rolsuper
            OR rolcreatedb OR rolcreaterole OR rolreplication OR rolbypassrls)
    ) THEN
        ALTER ROLE stead_app LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
    END IF;
    FOR granted IN
        SELECT r.rolname FROM pg_auth_members AS m JOIN pg_roles AS r ON r.oid = m.roleid
        WHERE m.member = 'stead_app'::regrole
    LOOP
        EXECUTE format('REVOKE %I FROM stead_app', granted);
    END LOOP;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE EXCEPTION 'cannot make stead_app a plain login role: %', SQLERRM
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'Run stead migrate as a user with CREATEROLE, or have an administrator run'
                     ' CREATE ROLE stead_app LOGIN PASSWORD ... once.';
END
$$;

-- Exactly what it needs on the audit log: read and append. The trigger still refuses change
-- to everyone, the owner included.
REVOKE ALL ON audit_log FROM stead_app;
GRANT SELECT, INSERT ON audit_log TO stead_app;

-- Payloads are deleted only by `stead payloads gc`, run as the owner: an application bug, or
-- SQL injected into it, must not be able to make parked runs unreadable.
REVOKE DELETE ON payload_store FROM stead_app;

-- Storing a payload that is already stored refreshes its age (`ON CONFLICT ... DO UPDATE SET
-- created_at`): `stead payloads gc` reads that age as "last stored", and a payload stored
-- again today is referenced by a history of today.
GRANT UPDATE (created_at) ON payload_store TO stead_app;
