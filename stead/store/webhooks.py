"""Webhook endpoints, their deliveries and attempts (see migrations/0011_webhooks.sql).

Events and first deliveries are written by a trigger on the audit log, never from here; this
module registers endpoints, re-delivers, claims deliveries for the dispatcher and records what
each attempt did.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from stead.store.db import Conn

# What readers see of an endpoint: everything but its sealed secrets.
_ENDPOINT = """
    SELECT id, url, description, event_types, enabled, disabled_reason, disabled_at,
           failing_since, last_success_at, previous_expires_at, created_by, created_at,
           updated_at
    FROM webhook_endpoints WHERE tenant_id = $1 AND ($2::text IS NULL OR id = $2)
    ORDER BY created_at
"""
# Deliveries with their event, newest first; every filter optional but the tenant.
_DELIVERIES = """
    SELECT d.id, d.endpoint_id, d.event_id, e.type AS event_type, e.run_id, d.redelivery_of,
           d.requested_by, d.status, d.attempts, d.last_status, d.last_error, d.created_at,
           d.first_attempt_at, d.last_attempt_at, d.finished_at
    FROM webhook_deliveries AS d
    JOIN webhook_events AS e ON e.tenant_id = d.tenant_id AND e.id = d.event_id
    WHERE d.tenant_id = $1
      AND ($2::text IS NULL OR d.endpoint_id = $2)
      AND ($3::text IS NULL OR d.id = $3)
      AND ($4::text IS NULL OR d.status = $4)
      AND ($5::timestamptz IS NULL OR (d.created_at, d.id) < ($5, $6))
    ORDER BY d.created_at DESC, d.id DESC LIMIT $7
"""


async def count_endpoints(conn: Conn, tenant: str) -> int:
    return int(
        await conn.fetchval("SELECT count(*) FROM webhook_endpoints WHERE tenant_id = $1", tenant)
    )


async def insert_endpoint(
    conn: Conn,
    tenant: str,
    endpoint_id: str,
    url: str,
    description: str,
    event_types: list[str],
    sealed_secret: bytes,
    created_by: str,
) -> asyncpg.Record:
    await conn.execute(
        "INSERT INTO webhook_endpoints (tenant_id, id, url, description, event_types, secret,"
        " created_by) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        tenant,
        endpoint_id,
        url,
        description,
        event_types,
        sealed_secret,
        created_by,
    )
    row = await get_endpoint(conn, tenant, endpoint_id)
    assert row is not None
    return row


async def list_endpoints(conn: Conn, tenant: str) -> list[asyncpg.Record]:
    return await conn.fetch(_ENDPOINT, tenant, None)


async def get_endpoint(conn: Conn, tenant: str, endpoint_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(_ENDPOINT, tenant, endpoint_id)


async def update_endpoint(
    conn: Conn, tenant: str, endpoint_id: str, changes: dict[str, Any]
) -> asyncpg.Record | None:
    """Set the given columns (url, description, event_types, enabled); enabling clears the
    reason it was disabled and its failure streak."""
    allowed = {"url", "description", "event_types", "enabled"}
    assert set(changes) <= allowed, set(changes) - allowed
    sets = [f"{name} = ${i}" for i, name in enumerate(changes, start=3)]
    if changes.get("enabled") is True:
        sets += ["disabled_reason = NULL", "disabled_at = NULL", "failing_since = NULL"]
    elif changes.get("enabled") is False:
        sets += ["disabled_at = now()", "disabled_reason = 'disabled by an admin'"]
    done = await conn.execute(
        f"UPDATE webhook_endpoints SET {', '.join([*sets, 'updated_at = now()'])}"  # noqa: S608  # column names from the fixed set above; values are parameters
        " WHERE tenant_id = $1 AND id = $2",
        tenant,
        endpoint_id,
        *changes.values(),
    )
    return await get_endpoint(conn, tenant, endpoint_id) if done.endswith(" 1") else None


async def rotate_secret(
    conn: Conn,
    tenant: str,
    endpoint_id: str,
    sealed_secret: bytes,
    previous_expires_at: datetime | None,
) -> asyncpg.Record | None:
    """Replace the signing secret; the old one keeps signing until `previous_expires_at`
    (None: it stops now)."""
    done = await conn.execute(
        "UPDATE webhook_endpoints SET"
        " previous_secret = CASE WHEN $4::timestamptz IS NULL THEN NULL ELSE secret END,"
        " previous_expires_at = $4, secret = $3, updated_at = now()"
        " WHERE tenant_id = $1 AND id = $2",
        tenant,
        endpoint_id,
        sealed_secret,
        previous_expires_at,
    )
    return await get_endpoint(conn, tenant, endpoint_id) if done.endswith(" 1") else None


async def delete_endpoint(conn: Conn, tenant: str, endpoint_id: str) -> bool:
    done = await conn.execute(
        "DELETE FROM webhook_endpoints WHERE tenant_id = $1 AND id = $2", tenant, endpoint_id
    )
    return done.endswith(" 1")


# --- deliveries -------------------------------------------------------------------------------


async def list_deliveries(
    conn: Conn,
    tenant: str,
    endpoint_id: str,
    *,
    status: str | None,
    before: tuple[datetime, str] | None,
    limit: int,
) -> list[asyncpg.Record]:
    """An endpoint's deliveries, newest first, from `before` (exclusive) on."""
    at, last_id = before if before else (None, "")
    return await conn.fetch(_DELIVERIES, tenant, endpoint_id, None, status, at, last_id, limit)


async def get_delivery(
    conn: Conn, tenant: str, delivery_id: str, endpoint_id: str | None = None
) -> asyncpg.Record | None:
    return await conn.fetchrow(_DELIVERIES, tenant, endpoint_id, delivery_id, None, None, "", 1)


async def attempts(conn: Conn, tenant: str, delivery_id: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT attempt, at, status_code, error, duration_ms, response FROM webhook_attempts"
        " WHERE tenant_id = $1 AND delivery_id = $2 ORDER BY attempt",
        tenant,
        delivery_id,
    )


async def redeliver(
    conn: Conn, tenant: str, delivery_id: str, new_id: str, requested_by: str
) -> None:
    """A new delivery of the same event to the same endpoint (the dispatcher starts it)."""
    await conn.execute(
        "INSERT INTO webhook_deliveries (tenant_id, id, endpoint_id, event_id, redelivery_of,"
        " requested_by) SELECT tenant_id, $3, endpoint_id, event_id, id, $4"
        " FROM webhook_deliveries WHERE tenant_id = $1 AND id = $2",
        tenant,
        delivery_id,
        new_id,
        requested_by,
    )


async def claim_undispatched(conn: Conn, limit: int) -> list[asyncpg.Record]:
    """Deliveries no dispatcher has started yet, locked for this transaction (others skip
    them). Oldest first."""
    return await conn.fetch(
        "SELECT tenant_id, id FROM webhook_deliveries WHERE dispatched_at IS NULL"
        " ORDER BY created_at LIMIT $1 FOR UPDATE SKIP LOCKED",
        limit,
    )


async def mark_dispatched(conn: Conn, keys: list[tuple[str, str]]) -> None:
    await conn.executemany(
        "UPDATE webhook_deliveries SET dispatched_at = now() WHERE tenant_id = $1 AND id = $2",
        keys,
    )


# --- what an attempt needs and records ---------------------------------------------------------


async def delivery_job(conn: Conn, tenant: str, delivery_id: str) -> asyncpg.Record | None:
    """Everything one attempt needs: the delivery, its endpoint (with sealed secrets), its
    event and the audit entry the event came from, with the run's pipeline."""
    return await conn.fetchrow(
        "SELECT d.status, d.endpoint_id, d.first_attempt_at, w.url, w.enabled, w.secret,"
        " w.previous_secret, w.previous_expires_at > now() AS previous_valid,"
        " e.id AS event_id, e.type, e.run_id, a.at, a.actor, a.data,"
        " (SELECT s.data FROM audit_log AS s WHERE s.tenant_id = e.tenant_id"
        "  AND s.run_id = e.run_id AND s.action = 'run.started' ORDER BY s.seq LIMIT 1)"
        "  AS started"
        " FROM webhook_deliveries AS d"
        " JOIN webhook_endpoints AS w ON w.tenant_id = d.tenant_id AND w.id = d.endpoint_id"
        " JOIN webhook_events AS e ON e.tenant_id = d.tenant_id AND e.id = d.event_id"
        " JOIN audit_log AS a ON a.tenant_id = e.tenant_id AND a.seq = e.audit_seq"
        " WHERE d.tenant_id = $1 AND d.id = $2",
        tenant,
        delivery_id,
    )


async def record_attempt(
    conn: Conn,
    tenant: str,
    delivery_id: str,
    attempt: int,
    *,
    at: datetime,
    status_code: int | None,
    error: str | None,
    duration_ms: int,
    response: str,
    succeeded: bool,
) -> None:
    """One attempt's result, on the attempt log, the delivery and the endpoint's streak; a
    repeat of the same attempt number changes nothing."""
    inserted = await conn.fetchval(
        "INSERT INTO webhook_attempts (tenant_id, delivery_id, attempt, at, status_code, error,"
        " duration_ms, response) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        " ON CONFLICT DO NOTHING RETURNING true",
        tenant,
        delivery_id,
        attempt,
        at,
        status_code,
        error,
        duration_ms,
        response,
    )
    if not inserted:
        return
    endpoint_id = await conn.fetchval(
        "UPDATE webhook_deliveries SET attempts = attempts + 1, last_status = $3,"
        " last_error = $4, last_attempt_at = $5,"
        " first_attempt_at = coalesce(first_attempt_at, $5),"
        " status = CASE WHEN $6 THEN 'succeeded' ELSE status END,"
        " finished_at = CASE WHEN $6 THEN $5 ELSE finished_at END"
        " WHERE tenant_id = $1 AND id = $2 RETURNING endpoint_id",
        tenant,
        delivery_id,
        status_code,
        error,
        at,
        succeeded,
    )
    await conn.execute(
        "UPDATE webhook_endpoints SET"
        " last_success_at = CASE WHEN $3 THEN $4 ELSE last_success_at END,"
        " failing_since = CASE WHEN $3 THEN NULL ELSE coalesce(failing_since, $4) END"
        " WHERE tenant_id = $1 AND id = $2",
        tenant,
        endpoint_id,
        succeeded,
        at,
    )


async def finish_delivery(
    conn: Conn, tenant: str, delivery_id: str, status: str, error: str | None
) -> asyncpg.Record | None:
    """End a pending delivery as `failed` or `skipped`; its row, or None if it had ended."""
    return await conn.fetchrow(
        "UPDATE webhook_deliveries SET status = $3, finished_at = now(),"
        " last_error = coalesce($4, last_error)"
        " WHERE tenant_id = $1 AND id = $2 AND status = 'pending'"
        " RETURNING endpoint_id, attempts, first_attempt_at, last_status, last_error",
        tenant,
        delivery_id,
        status,
        error,
    )


async def disable_if_failing(
    conn: Conn, tenant: str, endpoint_id: str, since: datetime, reason: str
) -> bool:
    """Disable the endpoint if it has failed since `since` with no success in between."""
    done = await conn.execute(
        "UPDATE webhook_endpoints SET enabled = false, disabled_at = now(), disabled_reason = $4,"
        " updated_at = now() WHERE tenant_id = $1 AND id = $2 AND enabled"
        " AND failing_since IS NOT NULL AND failing_since <= $3",
        tenant,
        endpoint_id,
        since,
        reason,
    )
    return done.endswith(" 1")
