"""Tenants, principals and API keys.

A key is `stead_<id>_<secret>`: the id finds the row, the secret is compared against its
SHA-256 in constant time. The full key is returned once, at creation, and never stored.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Literal

from stead.store.db import Conn

PrincipalKind = Literal["user", "agent", "service"]
_KEY = re.compile(r"^stead_([a-z0-9]{12})_([A-Za-z0-9_-]{32,64})$")


@dataclass(frozen=True)
class Principal:
    tenant: str
    id: str
    kind: PrincipalKind
    roles: tuple[str, ...]

    def has_role(self, *roles: str) -> bool:
        return bool(set(roles) & set(self.roles))


def _hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


async def create_tenant(conn: Conn, tenant: str, name: str, plan: str = "standard") -> None:
    await conn.execute(
        "INSERT INTO tenants (id, name, plan) VALUES ($1, $2, $3)"
        " ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, plan = EXCLUDED.plan",
        tenant,
        name,
        plan,
    )


async def upsert_principal(
    conn: Conn,
    tenant: str,
    principal: str,
    roles: list[str],
    kind: PrincipalKind = "user",
    display_name: str = "",
) -> None:
    await conn.execute(
        "INSERT INTO principals (tenant_id, id, kind, roles, display_name)"
        " VALUES ($1, $2, $3, $4, $5)"
        " ON CONFLICT (tenant_id, id) DO UPDATE SET roles = EXCLUDED.roles, kind = EXCLUDED.kind,"
        " display_name = EXCLUDED.display_name, disabled_at = NULL",
        tenant,
        principal,
        kind,
        roles,
        display_name,
    )


async def set_roles(conn: Conn, tenant: str, principal: str, roles: list[str]) -> bool:
    done = await conn.execute(
        "UPDATE principals SET roles = $3 WHERE tenant_id = $1 AND id = $2",
        tenant,
        principal,
        roles,
    )
    return done.endswith(" 1")


async def disable_principal(conn: Conn, tenant: str, principal: str) -> bool:
    done = await conn.execute(
        "UPDATE principals SET disabled_at = now() WHERE tenant_id = $1 AND id = $2"
        " AND disabled_at IS NULL",
        tenant,
        principal,
    )
    return done.endswith(" 1")


async def create_key(conn: Conn, tenant: str, principal: str, label: str = "") -> str:
    """Create an API key for a principal; return the full key (shown once)."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    await conn.execute(
        "INSERT INTO api_keys (id, secret_hash, tenant_id, principal_id, label)"
        " VALUES ($1, $2, $3, $4, $5)",
        key_id,
        _hash(secret),
        tenant,
        principal,
        label,
    )
    return f"stead_{key_id}_{secret}"


async def revoke_key(conn: Conn, tenant: str, key_id: str) -> bool:
    done = await conn.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE tenant_id = $1 AND id = $2"
        " AND revoked_at IS NULL",
        tenant,
        key_id,
    )
    return done.endswith(" 1")


def key_id(key: str) -> str | None:
    """The id part of a well-formed key (not a check that it authenticates)."""
    match = _KEY.match(key)
    return match[1] if match else None


async def authenticate(conn: Conn, key: str) -> Principal | None:
    """The principal behind a key, or None for an unknown, revoked or malformed key, or a
    disabled principal. Never raises on bad input."""
    match = _KEY.match(key)
    if match is None:
        return None
    row = await conn.fetchrow(
        "SELECT k.secret_hash, p.tenant_id, p.id, p.kind, p.roles FROM api_keys k"
        " JOIN principals p ON p.tenant_id = k.tenant_id AND p.id = k.principal_id"
        " WHERE k.id = $1 AND k.revoked_at IS NULL AND p.disabled_at IS NULL",
        match[1],
    )
    if row is None or not hmac.compare_digest(bytes(row["secret_hash"]), _hash(match[2])):
        return None
    return Principal(row["tenant_id"], row["id"], row["kind"], tuple(row["roles"]))


async def get_principal(conn: Conn, tenant: str, principal: str) -> Principal | None:
    row = await conn.fetchrow(
        "SELECT tenant_id, id, kind, roles FROM principals WHERE tenant_id = $1 AND id = $2"
        " AND disabled_at IS NULL",
        tenant,
        principal,
    )
    return Principal(row["tenant_id"], row["id"], row["kind"], tuple(row["roles"])) if row else None


async def tenant_plan(conn: Conn, tenant: str) -> str | None:
    plan = await conn.fetchval("SELECT plan FROM tenants WHERE id = $1", tenant)
    return str(plan) if plan is not None else None


async def list_principals(conn: Conn, tenant: str) -> list[dict[str, object]]:
    rows = await conn.fetch(
        "SELECT p.id, p.kind, p.display_name, p.roles, p.created_at, p.disabled_at,"
        " coalesce(array_agg(k.id) FILTER (WHERE k.id IS NOT NULL AND k.revoked_at IS NULL),"
        " '{}') AS keys FROM principals p LEFT JOIN api_keys k ON k.tenant_id = p.tenant_id"
        " AND k.principal_id = p.id WHERE p.tenant_id = $1"
        " GROUP BY p.tenant_id, p.id ORDER BY p.id",
        tenant,
    )
    return [dict(r) for r in rows]
