"""Migrations are versioned and idempotent; the application logs in as a role it cannot
leave, which may only read and append to the audit log (refusing change even to its owner)."""

from __future__ import annotations

import base64
import uuid

import asyncpg
import pytest

from stead.store.db import Pool, UnsafeLogin, create_pool
from stead.store.embedded import EmbeddedPostgres
from stead.store.migrate import discover, migrate, scram_verifier, set_app_password


async def test_migrations_apply_once(database_url: str) -> None:
    assert await migrate(database_url) == []  # the session fixture applied them already
    conn = await asyncpg.connect(database_url)
    try:
        versions = [
            r["version"]
            for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY 1")
        ]
    finally:
        await conn.close()
    assert versions == [m.version for m in discover()]


async def test_the_app_login_cannot_leave_its_role(pool: Pool, database_url: str) -> None:
    """The pool logs in as stead_app itself: no RESET ROLE back to a more powerful user, no
    SET ROLE to the owner or any other role, and only the grants stead_app holds."""
    owner = await _owner(database_url)
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT session_user") == "stead_app"
        assert not await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = 'stead_app'")
        await conn.execute("RESET ROLE")
        assert await conn.fetchval("SELECT current_user") == "stead_app"
        for statement in (
            f'SET ROLE "{owner}"',
            f'SET SESSION AUTHORIZATION "{owner}"',
            "SET ROLE pg_write_all_data",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
            assert await conn.fetchval("SELECT current_user") == "stead_app"
        # Refused by the grants themselves, before the append-only trigger is reached.
        for statement in ("UPDATE audit_log SET actor = 'x'", "DELETE FROM audit_log"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
                await conn.execute(statement)
        for statement in (
            "TRUNCATE audit_log",
            "ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update",
            "DROP TRIGGER audit_log_no_update ON audit_log",
            "DELETE FROM payload_store WHERE false",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)


async def test_the_trigger_refuses_change_even_to_the_owner(database_url: str) -> None:
    owner = await asyncpg.connect(database_url)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await owner.execute("TRUNCATE audit_log")
    finally:
        await owner.close()


async def test_the_pool_refuses_a_login_that_could_leave_the_role(
    database_url: str, postgres: EmbeddedPostgres
) -> None:
    with pytest.raises(UnsafeLogin, match="'postgres' is a superuser"):
        await create_pool(database_url, app_role="stead_app", max_size=1)
    login = f"t_login_{uuid.uuid4().hex[:8]}"
    owner = await asyncpg.connect(database_url)
    try:
        await owner.execute(f"CREATE ROLE {login} LOGIN IN ROLE stead_app, pg_write_all_data")
        with pytest.raises(UnsafeLogin, match=f"'{login}' may switch to pg_write_all_data"):
            await create_pool(postgres.url(user=login), app_role="stead_app", max_size=1)
        await owner.execute(f"REVOKE pg_write_all_data FROM {login}")
        confined = await create_pool(postgres.url(user=login), app_role="stead_app", max_size=1)
        await confined.close()
    finally:
        await owner.execute(f"DROP ROLE {login}")
        await owner.close()


async def test_migration_makes_stead_app_a_plain_login_again(database_url: str) -> None:
    (sql,) = [m.sql for m in discover() if m.name == "app_login_role"]
    owner = await asyncpg.connect(database_url)
    try:
        await owner.execute(
            "ALTER ROLE stead_app NOLOGIN CREATEDB; GRANT pg_read_all_data TO stead_app"
        )
        await owner.execute(sql)  # what the migration does, applied to a role gone astray
        role = await owner.fetchrow("SELECT * FROM pg_roles WHERE rolname = 'stead_app'")
        member_of = await owner.fetchval(
            "SELECT count(*) FROM pg_auth_members WHERE member = 'stead_app'::regrole"
        )
    finally:
        await owner.execute("ALTER ROLE stead_app LOGIN NOCREATEDB")  # whatever happened above
        await owner.close()
    assert role is not None
    assert (role["rolcanlogin"], role["rolcreatedb"], role["rolsuper"]) == (True, False, False)
    assert member_of == 0


async def test_migrate_sets_the_app_password_as_a_scram_verifier(database_url: str) -> None:
    """The verifier computed here is the one PostgreSQL computes for the same salt, so the
    server accepts the password without ever being sent it."""
    role = f"t_app_{uuid.uuid4().hex[:8]}"
    owner = await asyncpg.connect(database_url)
    try:
        await owner.execute(f"SET password_encryption = 'scram-sha-256'; CREATE ROLE {role} LOGIN")
        await owner.execute(f"ALTER ROLE {role} PASSWORD 'pw-Zz9_sample'")
        server_made = await _verifier(owner, role)
        iterations, salt = server_made.removeprefix("SCRAM-SHA-256$").split("$")[0].split(":")
        assert (
            scram_verifier("pw-Zz9_sample", salt=base64.b64decode(salt), iterations=int(iterations))
            == server_made
        )

        assert not await set_app_password(owner, f"postgresql://{role}@/db?host=/x", role)
        assert not await set_app_password(owner, "postgresql://other:pw@db/stead", role)
        assert await set_app_password(owner, f"postgresql://{role}:n%40w-pw@db:5432/stead", role)
        changed = await _verifier(owner, role)
        iterations, salt = changed.removeprefix("SCRAM-SHA-256$").split("$")[0].split(":")
        assert changed != server_made
        assert changed == scram_verifier("n@w-pw", salt=base64.b64decode(salt), iterations=4096)
    finally:
        await owner.execute(f"DROP ROLE {role}")
        await owner.close()


async def _verifier(conn: asyncpg.Connection, role: str) -> str:
    found: str = await conn.fetchval("SELECT rolpassword FROM pg_authid WHERE rolname = $1", role)
    return found


async def _owner(database_url: str) -> str:
    conn = await asyncpg.connect(database_url)
    try:
        found: str = await conn.fetchval(
            "SELECT tableowner FROM pg_tables WHERE tablename = 'audit_log'"
        )
    finally:
        await conn.close()
    return found
