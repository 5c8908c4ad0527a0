"""Deferred model calls waiting for, inside, or back from a Message Batch.

A row per call (`model_batch_requests`, by its `custom_id`): `queued` until the tenant's
batcher submits it, `submitted` with its batch, then what the batch said: `succeeded` (the
reply), `errored`, `expired` or `canceled`. `abandoned` marks a call its run gave up on
(cancelled, or past its deadline): a queued one is never submitted; a submitted one's result
is still recorded when it comes, as the provider bills it. Every transition is conditional on
the state it leaves, so retried activities change nothing twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stead.store.db import Conn

FINAL = ("succeeded", "errored", "expired", "canceled")


@dataclass(frozen=True)
class Deferred:
    custom_id: str
    tenant: str
    call_key: str
    workflow_id: str
    model: str
    call: dict[str, Any]
    status: str
    abandoned: bool
    batch_id: str | None
    reply: dict[str, Any] | None
    reason: str | None


_COLUMNS = (
    "custom_id, tenant_id, call_key, workflow_id, model, call, status, abandoned, batch_id,"
    " reply, reason"
)


def _deferred(row: Any) -> Deferred:
    return Deferred(
        custom_id=row["custom_id"],
        tenant=row["tenant_id"],
        call_key=row["call_key"],
        workflow_id=row["workflow_id"],
        model=row["model"],
        call=dict(row["call"]),
        status=row["status"],
        abandoned=row["abandoned"],
        batch_id=row["batch_id"],
        reply=dict(row["reply"]) if row["reply"] is not None else None,
        reason=row["reason"],
    )


async def queue(
    conn: Conn,
    *,
    custom_id: str,
    tenant: str,
    call_key: str,
    workflow_id: str,
    model: str,
    call: dict[str, Any],
    request: dict[str, Any],
) -> None:
    """Queue a call (a repeat of the same call is a no-op)."""
    await conn.execute(
        "INSERT INTO model_batch_requests (custom_id, tenant_id, call_key, workflow_id, model,"
        " call, request, status) VALUES ($1, $2, $3, $4, $5, $6, $7, 'queued')"
        " ON CONFLICT (custom_id) DO NOTHING",
        custom_id,
        tenant,
        call_key,
        workflow_id,
        model,
        call,
        request,
    )


async def find(conn: Conn, custom_id: str) -> Deferred | None:
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM model_batch_requests WHERE custom_id = $1",  # noqa: S608  # our columns
        custom_id,
    )
    return _deferred(row) if row is not None else None


async def in_batch(conn: Conn, batch_id: str) -> list[Deferred]:
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM model_batch_requests WHERE batch_id = $1",  # noqa: S608  # our columns
        batch_id,
    )
    return [_deferred(r) for r in rows]


async def batch_of_flush(conn: Conn, flush_key: str) -> str | None:
    found: str | None = await conn.fetchval(
        "SELECT batch_id FROM model_batches WHERE flush_key = $1", flush_key
    )
    return found


async def take_queued(conn: Conn, custom_ids: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """The still-queued calls among `custom_ids` with their requests, locked until the
    transaction ends: a run abandoning one meanwhile waits, then finds it submitted."""
    rows = await conn.fetch(
        "SELECT custom_id, request FROM model_batch_requests"
        " WHERE custom_id = ANY($1::text[]) AND status = 'queued' AND NOT abandoned"
        " ORDER BY custom_id FOR UPDATE",
        custom_ids,
    )
    return [(r["custom_id"], dict(r["request"])) for r in rows]


async def mark_submitted(
    conn: Conn, *, tenant: str, batch_id: str, flush_key: str, custom_ids: list[str]
) -> None:
    """The batch exists at the provider: record it; its requests' bodies are not kept."""
    await conn.execute(
        "INSERT INTO model_batches (batch_id, tenant_id, flush_key, requests)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT (batch_id) DO NOTHING",
        batch_id,
        tenant,
        flush_key,
        len(custom_ids),
    )
    await conn.execute(
        "UPDATE model_batch_requests SET status = 'submitted', batch_id = $2, request = NULL,"
        " updated_at = now() WHERE custom_id = ANY($1::text[]) AND status = 'queued'",
        custom_ids,
        batch_id,
    )


async def mark_result(
    conn: Conn,
    custom_id: str,
    status: str,
    *,
    reply: dict[str, Any] | None = None,
    reason: str | None = None,
    leaving: tuple[str, ...] = ("submitted",),
) -> bool:
    """Record what became of a call; False if it had already left `leaving`."""
    done = await conn.fetchval(
        "UPDATE model_batch_requests SET status = $2, reply = $3, reason = $4, request = NULL,"
        " updated_at = now() WHERE custom_id = $1 AND status = ANY($5::text[]) RETURNING 1",
        custom_id,
        status,
        reply,
        reason,
        list(leaving),
    )
    return done is not None


async def abandon(conn: Conn, custom_id: str) -> Deferred | None:
    """Mark the call given up; the row as it was before. A still-queued call is cancelled
    here (it is never submitted)."""
    async with conn.transaction():
        row = await conn.fetchrow(
            f"SELECT {_COLUMNS} FROM model_batch_requests WHERE custom_id = $1"  # noqa: S608  # our columns
            " FOR UPDATE",
            custom_id,
        )
        if row is None:
            return None
        await conn.execute(
            "UPDATE model_batch_requests SET abandoned = true, updated_at = now(),"
            " status = CASE status WHEN 'queued' THEN 'canceled' ELSE status END,"
            " reason = CASE status WHEN 'queued' THEN 'abandoned before submission'"
            " ELSE reason END, request = CASE status WHEN 'queued' THEN NULL ELSE request END"
            " WHERE custom_id = $1",
            custom_id,
        )
    return _deferred(row)


async def live_in_batch(conn: Conn, batch_id: str) -> int:
    """Requests of the batch that a run still waits for."""
    count: int = await conn.fetchval(
        "SELECT count(*) FROM model_batch_requests WHERE batch_id = $1 AND NOT abandoned"
        " AND status = 'submitted'",
        batch_id,
    )
    return count


async def end_batch(conn: Conn, batch_id: str) -> None:
    await conn.execute(
        "UPDATE model_batches SET status = 'ended', ended_at = now()"
        " WHERE batch_id = $1 AND status <> 'ended'",
        batch_id,
    )
