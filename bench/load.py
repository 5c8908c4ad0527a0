"""Driving load: Stead's HTTP API as a client sees it, bounded concurrency, and completion
read from Temporal visibility."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
from temporalio.client import Client, WorkflowExecution, WorkflowExecutionStatus

from bench.env import Tenant

T = TypeVar("T")


class BenchError(Exception):
    """The benchmark could not measure what it meant to (a run failed, a wait timed out)."""


@dataclass
class SteadApi:
    """Stead's public API over real HTTP with a real API key."""

    http: httpx.AsyncClient

    @staticmethod
    def client(base_url: str, connections: int = 64) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        return httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60)

    async def start(
        self,
        tenant: Tenant,
        pipeline: str,
        payload: dict[str, Any],
        user: str = "requester",
        **extra: Any,
    ) -> str:
        """Start a run; return its run id once the API has accepted it (201)."""
        body = {"pipeline": pipeline, "input": payload, **extra}
        response = await self.http.post("/v1/runs", json=body, headers=tenant.auth(user))
        if response.status_code != 201:
            raise BenchError(f"start refused: {response.status_code} {response.text[:300]}")
        return str(response.json()["run_id"])

    async def decide(
        self, tenant: Tenant, approval_id: str, decision: str = "approve", user: str = "approver"
    ) -> None:
        response = await self.http.post(
            f"/v1/approvals/{approval_id}/decision",
            json={"decision": decision},
            headers=tenant.auth(user),
        )
        if response.status_code != 200:
            raise BenchError(f"decision refused: {response.status_code} {response.text[:300]}")


async def bounded(count: int, concurrency: int, task: Callable[[int], Awaitable[T]]) -> list[T]:
    """Run `task(0..count-1)` with at most `concurrency` in flight; results in index order."""
    results: list[T | None] = [None] * count
    indices = iter(range(count))

    async def lane() -> None:
        for index in indices:
            results[index] = await task(index)

    await asyncio.gather(*(lane() for _ in range(min(concurrency, count))))
    return [r for r in results if r is not None]


def since(moment: datetime) -> str:
    """A visibility clause for executions started at or after `moment`."""
    return f"StartTime >= '{moment.astimezone(UTC).isoformat().replace('+00:00', 'Z')}'"


async def wait_closed(
    client: Client,
    query: str,
    expected: int,
    *,
    within: float,
    every: float = 0.25,
    allow_failed: bool = False,
) -> list[WorkflowExecution]:
    """Wait until `expected` executions match `query` and none is running; return them all.

    Polls visibility counts (cheap for the server), then lists the executions once for their
    exact close times. Raises if any did not complete, unless `allow_failed`."""
    deadline = time.monotonic() + within
    while True:
        total = (await client.count_workflows(query)).count
        running = (await client.count_workflows(f"{query} AND ExecutionStatus = 'Running'")).count
        if total >= expected and running == 0:
            break
        if time.monotonic() > deadline:
            raise BenchError(f"{total - running}/{expected} closed after {within:.0f}s: {query}")
        await asyncio.sleep(every)
    executions = [e async for e in client.list_workflows(query)]
    failed = [e for e in executions if e.status is not WorkflowExecutionStatus.COMPLETED]
    if failed and not allow_failed:
        raise BenchError(
            f"{len(failed)} of {len(executions)} did not complete, e.g. {failed[0].id}"
        )
    return executions


def last_close(executions: list[WorkflowExecution]) -> datetime:
    closes = [e.close_time for e in executions if e.close_time is not None]
    if not closes:
        raise BenchError("no close time recorded")
    return max(closes)
