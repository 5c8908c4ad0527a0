"""Polling and recording helpers shared by tests (no sleeps standing in for readiness)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
from temporalio.client import WorkflowHandle

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
