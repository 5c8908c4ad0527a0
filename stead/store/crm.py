"""The CRM records and reply drafts the support agent's tools read and write."""

from __future__ import annotations

from typing import Any

from stead.store.db import Conn


async def customer(conn: Conn, tenant: str, customer_id: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "SELECT id, name, email, plan, restricted, notes FROM crm_customers"
        " WHERE tenant_id = $1 AND id = $2",
        tenant,
        customer_id,
    )
    return dict(row) if row else None


async def upsert_customer(
    conn: Conn,
    tenant: str,
    customer_id: str,
    name: str,
    email: str,
    *,
    plan: str = "standard",
    restricted: bool = False,
    notes: str = "",
) -> None:
    await conn.execute(
        "INSERT INTO crm_customers (tenant_id, id, name, email, plan, restricted, notes)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (tenant_id, id) DO UPDATE SET"
        " name = EXCLUDED.name, email = EXCLUDED.email, plan = EXCLUDED.plan,"
        " restricted = EXCLUDED.restricted, notes = EXCLUDED.notes",
        tenant,
        customer_id,
        name,
        email,
        plan,
        restricted,
        notes,
    )


async def save_draft(
    conn: Conn, tenant: str, op_key: str, run_id: str, subject: str, body: str
) -> None:
    """Idempotent by the operation key: a retried draft is stored once."""
    await conn.execute(
        "INSERT INTO drafts (tenant_id, op_key, run_id, subject, body) VALUES ($1, $2, $3, $4, $5)"
        " ON CONFLICT (tenant_id, op_key) DO NOTHING",
        tenant,
        op_key,
        run_id,
        subject,
        body,
    )
