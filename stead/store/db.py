"""The PostgreSQL connection pool every Stead process shares.

The application logs in as its own role (`STEAD_DB_APP_ROLE`, default `stead_app`, made by the
migrations): it may only insert into and read the audit log, so a bug or an injected query in
the application cannot rewrite history. That holds only if nothing on the connection can leave
the role, so each new connection checks its login first and the pool refuses one that is a
superuser, owns the schema, or may `SET ROLE` to any other role. (The app used to log in as
the owner and `SET ROLE` to stead_app: one `RESET ROLE` undid that.) Migrations and other
owner tasks connect separately (`STEAD_MIGRATE_DATABASE_URL`). JSON columns decode to Python.
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


class UnsafeLogin(RuntimeError):
    """The application's database login could leave the application role. One line, no URL."""


# What the login could do beyond the application role: be a superuser, own the audit log (or be
# a member of its owner), or switch to another role. Each is a way out of the boundary.
_LOGIN = """
    SELECT session_user::text AS login,
           r.rolsuper AS superuser,
           array(
               SELECT g.rolname::text FROM pg_roles AS g
               WHERE g.rolname NOT IN (session_user, $1)
                 AND pg_has_role(session_user, g.oid, 'MEMBER')
               ORDER BY 1
           ) AS can_become,
           coalesce(
               (SELECT pg_has_role(session_user, c.relowner, 'MEMBER') FROM pg_class AS c
                WHERE c.oid = to_regclass('audit_log')),
               false
           ) AS owns_schema,
           EXISTS (
               SELECT 1 FROM pg_roles AS a
               WHERE a.rolname = $1 AND pg_has_role(session_user, a.oid, 'USAGE')
           ) AS has_app_rights
    FROM pg_roles AS r WHERE r.rolname = session_user
"""


async def check_login(conn: asyncpg.Connection, app_role: str) -> None:
    """Raise UnsafeLogin unless the connection is confined to `app_role`."""
    row = await conn.fetchrow(_LOGIN, app_role)
    assert row is not None
    problems = []
    if row["superuser"]:
        problems.append("is a superuser")
    if row["owns_schema"]:
        problems.append("owns Stead's tables")
    if row["can_become"] and not row["superuser"]:
        problems.append(f"may switch to {', '.join(row['can_become'])}")
    if not row["has_app_rights"]:
        problems.append(f"does not hold {app_role} (run `stead migrate` first?)")
    if problems:
        raise UnsafeLogin(
            f"the database login {row['login']!r} {' and '.join(problems)}: set DATABASE_URL"
            f" to log in as {app_role}, and STEAD_MIGRATE_DATABASE_URL to the owner for"
            " `stead migrate`"
        )


async def _init_connection(conn: asyncpg.Connection, app_role: str | None) -> None:
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(
            typename, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )
    if app_role:
        await check_login(conn, app_role)


async def _keep_session(conn: Conn) -> None:
    """Released connections keep their session. asyncpg still rolls back any open transaction
    first; its default reset would add four statements (advisory
    unlock, CLOSE ALL, UNLISTEN, RESET ALL) to every release, half of all statements Stead sent
    per run in the throughput benchmark. Stead holds no session state to clear: advisory
    locks are transaction-scoped and nothing LISTENs."""


async def create_pool(
    url: str, *, app_role: str | None = "stead_app", min_size: int = 1, max_size: int = 10
) -> Pool:
    """A pool whose every connection is checked to be confined to `app_role` (None: not
    checked, for tools that connect as the owner on purpose, e.g. a benchmark's driver)."""

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
