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
    """Start a run over HTTP as `user`; the run id (a 201 is asserted)."""
    response = await api.post("/v1/runs", json=body, headers=tenant.auth(user), timeout=60)
    assert response.status_code == 201, response.text
    return str(response.json()["run_id"])


async def audit_actions(pool: Pool, tenant: Tenant, run_id: str) -> list[str]:
    """The run's audit actions, in chain order."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT action FROM audit_log WHERE tenant_id = $1 AND run_id = $2 ORDER BY seq",
            tenant.id,
            run_id,
        )
    return [r["action"] for r in rows]


async def record_history(handle: WorkflowHandle[Any, Any], name: str) -> None:
    """With STEAD_RECORD_HISTORIES=1, save this run's history for the replay tests."""
    await testing.record_history(handle, HISTORIES / f"{name}.json")
