"""Polling and recording helpers shared by tests (no sleeps standing in for readiness)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
from temporalio.client import WorkflowHandle

from stead.store.db import Pool
from tests.conftest import Tenant

HISTORIES = Path(__file__).parent / "histories"
T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T]], ok: Callable[[T], bool], *, within: float = 15
) -> T:
    """Call `probe` until `ok(result)`; fail with the last result after `within` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = await probe()
        if ok(result):
            return result
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {within}s; last: {result!r}")
        await asyncio.sleep(0.05)


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


_START_ATTEMPTS = 10


async def start_run(
    api: httpx.AsyncClient, tenant: Tenant, body: dict[str, Any], user: str = "requester"
) -> str:
    """Start a run over HTTP as `user`; the run id (a 201 is asserted). Like a well-behaved
    client, it waits out a 429 for `Retry-After` seconds (a few times): tests that start many
    runs at once meet the plan's rate limit by design (found by the kill drills)."""
    for _ in range(_START_ATTEMPTS):
        response = await api.post("/v1/runs", json=body, headers=tenant.auth(user), timeout=60)
        if response.status_code != 429:
            break
        await asyncio.sleep(float(response.headers["retry-after"]))
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


async def wait_json(
    http: httpx.AsyncClient,
    path: str,
    headers: dict[str, str],
    ok: Callable[[dict[str, Any]], bool],
    *,
    within: float = 15,
) -> dict[str, Any]:
    async def probe() -> httpx.Response:
        return await http.get(path, headers=headers)

    response = await eventually(
        probe, lambda r: r.status_code == 200 and ok(r.json()), within=within
    )
    return dict(response.json())


async def record_history(handle: WorkflowHandle[Any, Any], name: str) -> None:
    """With STEAD_RECORD_HISTORIES=1, save this run's history for the replay tests."""
    if os.environ.get("STEAD_RECORD_HISTORIES") != "1":
        return
    history = await handle.fetch_history()
    HISTORIES.mkdir(exist_ok=True)
    (HISTORIES / f"{name}.json").write_text(history.to_json())


async def decide_pending(
    api: httpx.AsyncClient,
    tenant: Tenant,
    run_id: str,
    decision: str = "approve",
    user: str = "approver",
) -> dict[str, Any]:
    """Wait for the run's own approval in `user`'s inbox and decide it over HTTP (a 200 is
    asserted); the decision's answer."""
    inbox = await wait_json(
        api,
        "/v1/approvals",
        tenant.auth(user),
        lambda b: any(a["run_id"] == run_id for a in b["items"]),
        within=30,
    )
    approval = next(a for a in inbox["items"] if a["run_id"] == run_id)
    decided = await api.post(
        f"/v1/approvals/{approval['approval_id']}/decision",
        json={"decision": decision, "comment": "checked"},
        headers=tenant.auth(user),
    )
    assert decided.status_code == 200, decided.text
    return dict(decided.json())
