"""Polling and recording helpers shared by tests (no sleeps standing in for readiness); the
polling ones are the testing kit's (`stead.testing`)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import httpx
from temporalio.client import WorkflowHandle

from stead import testing
from stead.store.db import Pool
from stead.testing import decide_pending, eventually, wait_json
from tests.conftest import Tenant

HISTORIES = Path(__file__).parent / "histories"

__all__ = [
    "HISTORIES",
    "audit_actions",
    "decide_pending",
    "eventually",
    "free_ports",
    "record_history",
    "start_run",
    "wait_json",
]


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 right now (held together, so they are distinct)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


async def start_run(
    api: httpx.AsyncClient, tenant: Tenant, body: dict[str, Any], user: str = "requester"
) -> str:
    """Start a run from a `POST /v1/runs` body (see `stead.testing.start_run`, which waits
    out a 429 as a client does)."""
    known = ("pipeline", "input", "budget_usd", "defer", "defer_deadline_seconds")
    rest = {k: v for k, v in body.items() if k not in known}
    assert not rest, f"start_run takes {', '.join(known)}, not {sorted(rest)}"
    return await testing.start_run(
        api,
        tenant,
        body["pipeline"],
        body["input"],
        user=user,
        budget_usd=body.get("budget_usd"),
        defer=body.get("defer", False),
        defer_deadline_seconds=body.get("defer_deadline_seconds"),
    )


async def audit_actions(pool: Pool, tenant: Tenant, run_id: str) -> list[str]:
    """The run's audit actions, in chain order."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT action FROM audit_log WHERE tenant_id = $1 AND run_id = $2 ORDER BY seq",
            tenant.id,
            run_id,
        )
    return [r["action"] for r in rows]


async def wait_finished(
    http: httpx.AsyncClient,
    tenant: Tenant,
    run_id: str,
    user: str = "requester",
    *,
    within: float = 60,
) -> dict[str, Any]:
    """The run's view once it is no longer running."""
    return await wait_json(
        http,
        f"/v1/runs/{run_id}",
        tenant.auth(user),
        lambda b: b["status"] != "running",
        within=within,
    )


async def record_history(handle: WorkflowHandle[Any, Any], name: str) -> None:
    """With STEAD_RECORD_HISTORIES=1, save this run's history for the replay tests."""
    await testing.record_history(handle, HISTORIES / f"{name}.json")
