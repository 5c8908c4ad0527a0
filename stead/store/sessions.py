"""Web sessions and OIDC sign-ins in flight (see migrations/0013_web_sessions.sql).

Tokens are 32 random bytes; the table keeps their SHA-256 only, so a copy of it signs nobody
in. A session authenticates only while it is unexpired and unrevoked, its principal enabled,
and (if it was opened with one) its API key unrevoked.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from stead.store.db import Conn
from stead.store.principals import Principal

Method = Literal["api_key", "oidc"]


@dataclass(frozen=True)
class Session:
    principal: Principal
    method: Method
    csrf_token: str
    # What per-key request limits count against: the key it was opened with, else the person.
    limit_key: str


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


async def create(
    conn: Conn,
    principal: Principal,
    method: Method,
    lifetime: timedelta,
    api_key_id: str | None = None,
) -> tuple[str, Session]:
    """Open a session; return its token (for the cookie, never stored) and the session."""
    token, csrf = new_token(), new_token()
    await conn.execute(
        "INSERT INTO web_sessions (token_hash, tenant_id, principal_id, api_key_id, method,"
        " csrf_token, expires_at) VALUES ($1, $2, $3, $4, $5, $6, now() + $7::interval)",
        token_hash(token),
        principal.tenant,
        principal.id,
        api_key_id,
        method,
        csrf,
        lifetime,
    )
    # Expired sessions are dead already; deleting a few here keeps the table small.
    await conn.execute(
        "DELETE FROM web_sessions WHERE token_hash IN (SELECT token_hash FROM web_sessions"
        " WHERE expires_at < now() - interval '1 day' LIMIT 100)"
    )
    return token, Session(principal, method, csrf, _limit_key(principal, api_key_id))


async def lookup(conn: Conn, token: str) -> Session | None:
    row = await conn.fetchrow(
        "SELECT s.method, s.csrf_token, s.api_key_id, p.tenant_id, p.id, p.kind, p.roles"
        " FROM web_sessions s JOIN principals p"
        " ON p.tenant_id = s.tenant_id AND p.id = s.principal_id AND p.disabled_at IS NULL"
        " LEFT JOIN api_keys k ON k.id = s.api_key_id"
        " WHERE s.token_hash = $1 AND s.revoked_at IS NULL AND s.expires_at > now()"
        " AND (s.api_key_id IS NULL OR k.revoked_at IS NULL)",
        token_hash(token),
    )
    if row is None:
        return None
    principal = Principal(row["tenant_id"], row["id"], row["kind"], tuple(row["roles"]))
    return Session(
        principal, row["method"], row["csrf_token"], _limit_key(principal, row["api_key_id"])
    )


async def revoke(conn: Conn, token: str) -> bool:
    done = await conn.execute(
        "UPDATE web_sessions SET revoked_at = now() WHERE token_hash = $1 AND revoked_at IS NULL",
        token_hash(token),
    )
    return done.endswith(" 1")


def _limit_key(principal: Principal, api_key_id: str | None) -> str:
    return api_key_id or f"oidc:{principal.id}"


# --- OIDC sign-ins in flight -----------------------------------------------------------------


@dataclass(frozen=True)
class PendingLogin:
    nonce: str
    code_verifier: str
    return_to: str


async def begin_login(
    conn: Conn, state: str, binding: str, login: PendingLogin, lifetime: timedelta
) -> None:
    await conn.execute(
        "INSERT INTO web_oidc_logins (state_hash, binding_hash, nonce, code_verifier, return_to,"
        " expires_at) VALUES ($1, $2, $3, $4, $5, now() + $6::interval)",
        token_hash(state),
        token_hash(binding),
        login.nonce,
        login.code_verifier,
        login.return_to,
        lifetime,
    )
    await conn.execute("DELETE FROM web_oidc_logins WHERE expires_at < now()")


async def finish_login(conn: Conn, state: str, binding: str) -> PendingLogin | None:
    """The sign-in `state` names, once, if this browser began it and it has not expired."""
    row = await conn.fetchrow(
        "DELETE FROM web_oidc_logins WHERE state_hash = $1 RETURNING binding_hash, nonce,"
        " code_verifier, return_to, expires_at > now() AS fresh",
        token_hash(state),
    )
    if row is None or not row["fresh"]:
        return None
    if not secrets.compare_digest(bytes(row["binding_hash"]), token_hash(binding)):
        return None
    return PendingLogin(row["nonce"], row["code_verifier"], row["return_to"])
