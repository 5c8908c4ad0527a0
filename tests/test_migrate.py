"""Migrations are versioned and idempotent; the audit log refuses change even to its owner."""

from __future__ import annotations

import asyncpg
import pytest

from store.migrate import discover, migrate


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


async def test_app_role_cannot_rewrite_audit(pool: asyncpg.Pool, database_url: str) -> None:
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT current_user") == "stead_app"
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("UPDATE audit_log SET actor = 'x'")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("DELETE FROM audit_log")
    owner = await asyncpg.connect(database_url)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await owner.execute("TRUNCATE audit_log")
    finally:
        await owner.close()
