"""What a schedule's firings start, and what each did (see migrations/0012_schedules.sql)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from stead.store.db import Conn


async def insert_schedule(
    conn: Conn,
    tenant: str,
    schedule_id: str,
    owner: str,
    pipeline: str,
    run_input: dict[str, Any],
    budget_usd: float | None,
) -> None:
    await conn.execute(
        "INSERT INTO schedules (tenant_id, id, owner, pipeline, input, budget_usd)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        tenant,
        schedule_id,
        owner,
        pipeline,
        run_input,
        budget_usd,
    )


async def definition(conn: Conn, tenant: str, schedule_id: str) -> asyncpg.Record | None:
    """The pipeline, input and budget a firing starts with."""
    return await conn.fetchrow(
        "SELECT owner, pipeline, input, budget_usd, created_at FROM schedules"
        " WHERE tenant_id = $1 AND id = $2",
        tenant,
        schedule_id,
    )


async def record_start(
    conn: Conn,
    tenant: str,
    schedule_id: str,
    scheduled_at: datetime,
    *,
    run_id: str | None,
    refused: str | None,
) -> None:
    """The firing's outcome; a retried firing overwrites its own row (one per time)."""
    await conn.execute(
        "INSERT INTO schedule_starts (tenant_id, schedule_id, scheduled_at, run_id, refused)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant_id, schedule_id, scheduled_at)"
        " DO UPDATE SET run_id = EXCLUDED.run_id, refused = EXCLUDED.refused, at = now()",
        tenant,
        schedule_id,
        scheduled_at,
        run_id,
        refused,
    )


async def recent_starts(
    conn: Conn, tenant: str, schedule_id: str, limit: int = 10
) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT scheduled_at, run_id, refused, at FROM schedule_starts"
        " WHERE tenant_id = $1 AND schedule_id = $2 ORDER BY scheduled_at DESC LIMIT $3",
        tenant,
        schedule_id,
        limit,
    )


async def forget(conn: Conn, tenant: str, schedule_id: str) -> None:
    """The schedule's definition and its firings' record (the runs and the audit log stay)."""
    await conn.execute(
        "DELETE FROM schedule_starts WHERE tenant_id = $1 AND schedule_id = $2",
        tenant,
        schedule_id,
    )
    await conn.execute(
        "DELETE FROM schedules WHERE tenant_id = $1 AND id = $2", tenant, schedule_id
    )
