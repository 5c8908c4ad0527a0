"""Versioned, idempotent schema migrations.

Files in `store/migrations/` are named `NNNN_description.sql` and applied in order, each in its
own transaction, under an advisory lock so that several processes starting at once apply each
version exactly once. A version already recorded in `schema_migrations` is skipped.

Migrations run as the owner. Given the application's URL too, `migrate` then sets the password
it carries on the application role, so one secret (the app's URL) is the only copy of it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import asyncpg

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_LOCK_KEY = 0x57EAD  # any constant shared by every Stead process
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if match is None:
            raise ValueError(f"migration file name must be NNNN_name.sql: {path.name}")
        found.append(Migration(int(match[1]), match[2], path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ValueError("two migrations share a version number")
    return found


async def migrate(
    url: str,
    directory: Path = MIGRATIONS_DIR,
    *,
    app_url: str | None = None,
    app_role: str = "stead_app",
    application: tuple[str, Path] | None = None,
) -> list[int]:
    """Apply pending migrations as the connecting (owner) user; return the versions applied.
    With `application` (its name and migrations directory), then apply the application's own,
    tracked apart from Stead's (`app_migrations`): an application's tables grant what the
    `stead_app` login needs themselves. With `app_url`, set the password it carries (if any)
    on `app_role`."""
    conn = await asyncpg.connect(url)
    try:
        applied = await _apply(conn, directory)
        if application is not None:
            await _apply(conn, application[1], app=application[0])
        if app_url is not None:
            await set_app_password(conn, app_url, app_role)
        return applied
    finally:
        await conn.close()


async def _apply(conn: asyncpg.Connection, directory: Path, app: str | None = None) -> list[int]:
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS app_migrations ("
            " app text NOT NULL, version integer NOT NULL, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (app, version))"
        )
        if app is None:
            rows = await conn.fetch("SELECT version FROM schema_migrations")
        else:
            rows = await conn.fetch("SELECT version FROM app_migrations WHERE app = $1", app)
        done = {r["version"] for r in rows}
        applied: list[int] = []
        for migration in discover(directory):
            if migration.version in done:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                if app is None:
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        migration.version,
                        migration.name,
                    )
                else:
                    await conn.execute(
                        "INSERT INTO app_migrations (app, version, name) VALUES ($1, $2, $3)",
                        app,
                        migration.version,
                        migration.name,
                    )
            applied.append(migration.version)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)


def login_of(url: str) -> tuple[str | None, str | None]:
    """The user and password a postgresql:// URL logs in with (password in the authority or
    in `?password=`), decoded."""
    parts = urlsplit(url)
    password = parts.password
    if password is None:
        password = parse_qs(parts.query).get("password", [None])[-1]
    user = unquote(parts.username) if parts.username else None
    return user, unquote(password) if password is not None else None


async def set_app_password(conn: asyncpg.Connection, app_url: str, app_role: str) -> bool:
    """Make `app_role` log in with the password in `app_url`; False when the URL names another
    user or carries no password (trust or peer authentication, as in dev)."""
    user, password = login_of(app_url)
    if user != app_role or not password:
        return False
    if not password.isascii():
        # PostgreSQL normalizes non-ASCII passwords (SASLprep) before hashing; this does not.
        raise ValueError("the application's database password must be ASCII")
    statement = await conn.fetchval(
        "SELECT format('ALTER ROLE %I PASSWORD %L', $1::text, $2::text)",
        app_role,
        scram_verifier(password),
    )
    await conn.execute(statement)
    return True


def scram_verifier(password: str, *, salt: bytes | None = None, iterations: int = 4096) -> str:
    """PostgreSQL's SCRAM-SHA-256 verifier for `password` (RFC 5802 and 7677), as `ALTER ROLE
    ... PASSWORD` takes it: the server stores it as given, and the plaintext never reaches its
    logs (psql's `\\password` does the same)."""
    salt = os.urandom(16) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored_key = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    encoded = [base64.b64encode(b).decode() for b in (salt, stored_key, server_key)]
    return f"SCRAM-SHA-256${iterations}:{encoded[0]}${encoded[1]}:{encoded[2]}"
