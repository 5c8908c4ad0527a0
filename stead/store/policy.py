"""Per-tenant permission overrides (allow or deny on top of policies/permissions.yaml)."""

from __future__ import annotations

from typing import Any

from stead.policy.permissions import Override
from stead.store.db import Conn


async def overrides(conn: Conn, tenant: str) -> list[Override]:
    rows = await conn.fetch(
        "SELECT id, subject_kind, subject, effect, action, resource, constraints,"
        " requires_approval FROM policy_overrides WHERE tenant_id = $1 AND revoked_at IS NULL"
        " ORDER BY id",
        tenant,
    )
    return [
        Override.model_validate({**dict(r), "requires_approval": tuple(r["requires_approval"])})
        for r in rows
    ]


async def add_override(conn: Conn, tenant: str, override: dict[str, Any], by: str) -> int:
    """Store an override (validated by the caller as an `Override`); return its id."""
    new_id = await conn.fetchval(
        "INSERT INTO policy_overrides (tenant_id, subject_kind, subject, effect, action, resource,"
        " constraints, requires_approval, created_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
        " RETURNING id",
        tenant,
        override["subject_kind"],
        override["subject"],
        override["effect"],
        override["action"],
        override["resource"],
        override.get("constraints", []),
        list(override.get("requires_approval", [])),
        by,
    )
    return int(new_id)


async def revoke_override(conn: Conn, tenant: str, override_id: int) -> bool:
    done = await conn.execute(
        "UPDATE policy_overrides SET revoked_at = now() WHERE tenant_id = $1 AND id = $2"
        " AND revoked_at IS NULL",
        tenant,
        override_id,
    )
    return done.endswith(" 1")
