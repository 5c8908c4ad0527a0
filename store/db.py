"""The PostgreSQL connection pool every Stead process shares.

Connections switch to the application role (`STEAD_DB_APP_ROLE`, default `stead_app`) when the
connecting user may: that role may only insert into and read the audit log, so a bug or an
injected query in the application cannot rewrite history. JSON columns decode to Python.
"""

from __future__ import annotations

import json
from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from stead.config import Settings

Pool: TypeAlias = "asyncpg.Pool[asyncpg.Record]"
# What store functions take: a bare connection or one borrowed from the pool.
Conn: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"


async def _init_connection(conn: asyncpg.Connection, app_role: str | None) -> None:
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(
            typename, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )
    if app_role:
        may_switch = await conn.fetchval(
            "SELECT pg_has_role(current_user, $1, 'MEMBER') FROM pg_roles WHERE rolname = $1",
            app_role,
        )
        if may_switch:
            # The role name comes from settings, never from a request; quote it anyway.
            await conn.execute(f"SET ROLE {_quote_ident(app_role)}")


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def _keep_session(conn: Conn) -> None:
    """Released connections keep their session (the role set at connect). asyncpg still rolls
    back any open transaction first; its default reset would add four statements (advisory
    unlock, CLOSE ALL, UNLISTEN, RESET ALL) to every release, half of all statements Stead sent
    per run in the throughput benchmark. Stead holds no session state to clear: advisory
    locks are transaction-scoped and nothing LISTENs."""


async def create_pool(
    url: str, *, app_role: str | None = "stead_app", min_size: int = 1, max_size: int = 10
) -> Pool:
    async def init(conn: asyncpg.Connection) -> None:
        await _init_connection(conn, app_role)

    pool: Pool = await asyncpg.create_pool(
        url,
        min_size=min_size,
        max_size=max_size,
        init=init,
        reset=_keep_session,
        command_timeout=30,
    )
    return pool


def record_to_dict(record: asyncpg.Record | None) -> dict[str, Any] | None:
    return dict(record) if record is not None else None


async def pool_from_settings(settings: Settings, who: str) -> Pool:
    """The pool for a Stead process; `who` names it in the error when no URL is configured."""
    if settings.database_url is None:
        raise RuntimeError(f"STEAD_DATABASE_URL (or DATABASE_URL) must be set for the {who}")
    return await create_pool(
        settings.database_url.get_secret_value(),
        app_role=settings.db_app_role,
        max_size=settings.db_pool_max,
    )
