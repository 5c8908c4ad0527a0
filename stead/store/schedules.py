"""What a schedule's firings start, and what each did (see migrations/0012_schedules.sql)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from stead.crypto import Sealer, SealError
from stead.store.db import Conn


@dataclass(frozen=True)
class Definition:
    """What a firing starts."""

    owner: str
    pipeline: str
    input: dict[str, Any]
    budget_usd: float | None


def _associated(tenant: str, schedule_id: str) -> bytes:
    # Bound to its row: a sealed input copied to another tenant's or schedule's row does not open.
    return f"schedule-input\0{tenant}\0{schedule_id}".encode()


async def insert_schedule(
    conn: Conn,
    tenant: str,
    schedule_id: str,
    sealer: Sealer | None,
    definition: Definition,
) -> None:
    """`sealer` None: payload encryption is off, and the input is kept in clear like the
    run's input in Temporal then."""
    sealed = (
        sealer.seal(json.dumps(definition.input).encode(), _associated(tenant, schedule_id))
        if sealer is not None
        else None
    )
    await conn.execute(
        "INSERT INTO schedules"
        " (tenant_id, id, owner, pipeline, input, input_sealed, budget_usd)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7)",
        tenant,
        schedule_id,
        definition.owner,
        definition.pipeline,
        None if sealed is not None else definition.input,
        sealed,
        definition.budget_usd,
    )


async def definition(
    conn: Conn, tenant: str, schedule_id: str, sealer: Sealer | None
) -> Definition | None:
    """Raises SealError when the input is sealed with a key no longer configured."""
    row = await conn.fetchrow(
        "SELECT owner, pipeline, input, input_sealed, budget_usd FROM schedules"
        " WHERE tenant_id = $1 AND id = $2",
        tenant,
        schedule_id,
    )
    if row is None:
        return None
    run_input = row["input"]
    if row["input_sealed"] is not None:
        if sealer is None:
            raise SealError("the schedule's input is sealed and no payload keys are configured")
        opened = sealer.open(row["input_sealed"], _associated(tenant, schedule_id))
        run_input = json.loads(opened)
    return Definition(row["owner"], row["pipeline"], run_input, row["budget_usd"])


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
