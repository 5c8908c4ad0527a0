"""What each firing of a schedule did (see migrations/0011_schedule_starts.sql)."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from stead.store.db import Conn


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
    await conn.execute(
        "DELETE FROM schedule_starts WHERE tenant_id = $1 AND schedule_id = $2",
        tenant,
        schedule_id,
    )
