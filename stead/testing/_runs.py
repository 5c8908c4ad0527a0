"""Driving runs over the API in a test: start, wait, decide; polling, never sleeping."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from stead.testing._parts import Tenant

T = TypeVar("T")
_ENDED = frozenset({"completed", "failed", "cancelled"})


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
    headers: Mapping[str, str],
    ok: Callable[[dict[str, Any]], bool],
    *,
    within: float = 15,
) -> dict[str, Any]:
    """GET `path` until it answers 200 with a body `ok` accepts; that body."""

    async def probe() -> httpx.Response:
        return await http.get(path, headers=dict(headers))

    response = await eventually(
        probe, lambda r: r.status_code == 200 and ok(r.json()), within=within
    )
    return dict(response.json())


_START_ATTEMPTS = 10


async def start_run(
    api: httpx.AsyncClient,
    tenant: Tenant,
    pipeline: str,
    input: BaseModel | Mapping[str, Any],
    *,
    user: str = "requester",
    budget_usd: float | None = None,
    defer: bool = False,
    defer_deadline_seconds: float | None = None,
) -> str:
    """Start a run of `pipeline` over HTTP as `user` (capped at `budget_usd`, if given; with
    `defer`, its model steps through the Message Batches API); its run id (a 201 is
    asserted). Like a well-behaved client, it waits out a 429 for `Retry-After` seconds (a
    few times): tests that start many runs at once meet the plan's rate limit by design."""
    data = input.model_dump(mode="json") if isinstance(input, BaseModel) else dict(input)
    body: dict[str, Any] = {"pipeline": pipeline, "input": data}
    if budget_usd is not None:
        body["budget_usd"] = budget_usd
    if defer:
        body["defer"] = True
    if defer_deadline_seconds is not None:
        body["defer_deadline_seconds"] = defer_deadline_seconds
    for _ in range(_START_ATTEMPTS):
        response = await api.post("/v1/runs", json=body, headers=tenant.auth(user), timeout=60)
        if response.status_code != 429:
            break
        await asyncio.sleep(float(response.headers["retry-after"]))
    assert response.status_code == 201, response.text
    return str(response.json()["run_id"])


async def wait_for_run(
    api: httpx.AsyncClient,
    tenant: Tenant,
    run_id: str,
    *,
    ok: Callable[[dict[str, Any]], bool] | None = None,
    user: str = "requester",
    within: float = 30,
) -> dict[str, Any]:
    """The run as `GET /v1/runs/{id}` shows it once `ok` accepts it (default: once it
    ended: completed, failed or cancelled)."""
    done = ok or (lambda run: run["status"] in _ENDED)
    return await wait_json(api, f"/v1/runs/{run_id}", tenant.auth(user), done, within=within)


async def decide_pending(
    api: httpx.AsyncClient,
    tenant: Tenant,
    run_id: str,
    decision: str = "approve",
    user: str = "approver",
    *,
    edits: Mapping[str, Any] | None = None,
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
    body: dict[str, Any] = {"decision": decision, "comment": "checked"}
    if edits is not None:
        body["edits"] = dict(edits)
    decided = await api.post(
        f"/v1/approvals/{approval['approval_id']}/decision", json=body, headers=tenant.auth(user)
    )
    assert decided.status_code == 200, decided.text
    return dict(decided.json())
