"""Failure and recovery: dead-letter view, re-drive, cancellation, fairness, worker loss."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.api.enums.v1 import PendingActivityState
from temporalio.client import Client, WorkflowHandle

from stead.config import Settings
from stead.service.runs import workflow_id
from stead.store import budgets
from stead.store.db import Pool
from stead.worker import build_workers, make_deps
from tests.conftest import SimControl, Tenant, TenantFactory, app_runtime, spawn_worker
from tests.helpers import audit_actions, eventually, record_history, start_run, wait_json

TEXT = {"pipeline": "summarize", "input": {"text": "Alpha beta gamma. Delta epsilon zeta."}}
PRIMARY = "claude-sonnet-5-5"  # the `draft` route's first model (policies/routing.yaml)


async def start(api: httpx.AsyncClient, tenant: Tenant, body: dict[str, Any] = TEXT) -> str:
    return await start_run(api, tenant, body)


async def run_state(api: httpx.AsyncClient, tenant: Tenant, run_id: str, ok: Any) -> dict[str, Any]:
    return await wait_json(api, f"/v1/runs/{run_id}", tenant.auth("requester"), ok)


@pytest.mark.usefixtures("worker")
async def test_refused_request_fails_then_resumes(
    api: httpx.AsyncClient, tenant: Tenant, sim: SimControl, pool: Pool, client: Client
) -> None:
    async with pool.acquire() as conn:  # a budget, so the calls are reserved and charged
        await budgets.set_budget(conn, tenant.id, "customer", "", "day", 10.0)
    await sim.fault(400, model=PRIMARY)
    run_id = await start(api, tenant)
    failed = await run_state(api, tenant, run_id, lambda b: b["status"] == "failed")
    assert failed["stage"] == "failed"
    assert failed["last_error"]["type"] == "BadRequest"
    assert failed["last_error"]["stage"] == "model_call"
    assert failed["last_error"]["retryable"] is False
    assert failed["attempts"] == {"summarize": 1}  # a 400 is never retried

    dead = await wait_json(
        api, "/v1/runs?status=failed", tenant.auth("requester"), lambda b: len(b["items"]) == 1
    )
    assert dead["items"][0]["run_id"] == run_id
    assert dead["items"][0]["error_type"] == "BadRequest"

    resumed = await api.post(f"/v1/runs/{run_id}/retry", headers=tenant.auth("requester"))
    assert resumed.status_code == 202, resumed.text
    assert resumed.json()["run_id"] == run_id
    review = await run_state(api, tenant, run_id, lambda b: b["stage"] == "review")
    assert review["status"] == "running"
    assert review["last_error"] is None
    actions = await audit_actions(pool, tenant, run_id)
    assert actions.count("model.failed") == 1
    assert actions.count("model.called") == 1
    assert actions.count("run.redriven") == 1
    assert actions.count("run.failed") == 1
    # What the run did after the reset is recorded, not mistaken for the failed attempt's.
    assert actions.count("approval.requested") == 1
    async with pool.acquire() as conn:
        charged = await conn.fetchval(
            "SELECT count(*) FROM model_usage WHERE tenant_id = $1 AND run_id = $2",
            tenant.id,
            run_id,
        )
        reservations = await conn.fetch(
            "SELECT status, charged_nusd FROM budget_reservations WHERE tenant_id = $1"
            " ORDER BY created_at",
            tenant.id,
        )
    assert charged == 1  # the re-driven call is billed as the new operation it is
    assert [r["status"] for r in reservations] == ["settled", "settled"]
    assert reservations[0]["charged_nusd"] == 0  # the refused attempt cost nothing
    assert reservations[1]["charged_nusd"] > 0
    await record_history(
        client.get_workflow_handle(workflow_id(tenant.id, run_id)), "summarize_redriven"
    )


@pytest.mark.usefixtures("worker")
async def test_exhausted_retries_then_restart(
    api: httpx.AsyncClient, tenant: Tenant, sim: SimControl
) -> None:
    # Every model of the route is overloaded for all five attempts; retry-after keeps the
    # back-off short, and the gateway honours it as the next retry delay.
    await sim.fault(529, count=10, retry_after=0.05)
    run_id = await start(api, tenant)
    failed = await run_state(api, tenant, run_id, lambda b: b["status"] == "failed")
    assert failed["last_error"]["type"] == "ProviderUnavailable"
    assert failed["attempts"] == {"summarize": 5}
    assert (await sim.stats())["faults_served"] >= 10

    not_yet = await api.post(f"/v1/runs/{run_id}/retry", headers=tenant.auth("approver"))
    assert not_yet.status_code == 403
    restarted = await api.post(
        f"/v1/runs/{run_id}/retry", json={"mode": "restart"}, headers=tenant.auth("requester")
    )
    assert restarted.status_code == 202
    new_id = restarted.json()["run_id"]
    assert new_id != run_id
    review = await wait_json(
        api, f"/v1/runs/{new_id}", tenant.auth("approver"), lambda b: b["stage"] == "review"
    )  # the approver reads the proposal in clear (others see it masked)
    assert review["pending_approvals"][0]["proposal"]["summary"].startswith("Summary: Alpha")


@pytest.mark.usefixtures("worker")
async def test_retry_refusals(api: httpx.AsyncClient, tenant: Tenant) -> None:
    run_id = await start(api, tenant)
    await run_state(api, tenant, run_id, lambda b: b["stage"] == "review")
    running = await api.post(f"/v1/runs/{run_id}/retry", headers=tenant.auth("requester"))
    assert running.status_code == 409
    await api.post(f"/v1/runs/{run_id}/cancel", headers=tenant.auth("requester"))
    await run_state(api, tenant, run_id, lambda b: b["status"] == "cancelled")
    resume = await api.post(f"/v1/runs/{run_id}/retry", headers=tenant.auth("requester"))
    assert resume.status_code == 409
    assert "restart" in resume.json()["detail"]


@pytest.mark.usefixtures("worker")
async def test_cancel_reaches_a_running_model_call(
    api: httpx.AsyncClient, tenant: Tenant, sim: SimControl, client: Client, pool: Pool
) -> None:
    async with pool.acquire() as conn:  # budgeted, so the call holds a reservation
        await budgets.set_budget(conn, tenant.id, "customer", "", "day", 1.0)
    await sim.fault(529, hang=True, model=PRIMARY)
    run_id = await start(api, tenant)
    handle = client.get_workflow_handle(workflow_id(tenant.id, run_id))

    async def started() -> bool:
        # A running activity is in the mutable state, not yet in the history.
        described = await handle.describe()
        return any(
            a.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
            for a in described.raw_description.pending_activities
        )

    await eventually(started, bool)
    cancelled = await api.post(f"/v1/runs/{run_id}/cancel", headers=tenant.auth("requester"))
    assert cancelled.status_code == 202
    run = await run_state(api, tenant, run_id, lambda b: b["status"] == "cancelled")
    assert run["stage"] == "cancelled"
    events = [e async for e in handle.fetch_history_events()]
    # The activity itself acknowledged the cancellation (it learned of it by heartbeat).
    assert any(e.HasField("activity_task_canceled_event_attributes") for e in events)
    # Its budget reservation was closed, not left dangling: charged in full (the provider may
    # bill what it generated) and marked abandoned, since no usage row stands behind it.
    async with pool.acquire() as conn:
        reservations = await conn.fetch(
            "SELECT status, amount_nusd, charged_nusd FROM budget_reservations"
            " WHERE tenant_id = $1",
            tenant.id,
        )
        usage_rows = await conn.fetchval(
            "SELECT count(*) FROM model_usage WHERE tenant_id = $1", tenant.id
        )
    assert [r["status"] for r in reservations] == ["expired"]
    assert reservations[0]["charged_nusd"] == reservations[0]["amount_nusd"] > 0
    assert usage_rows == 0
    await record_history(handle, "summarize_cancelled_in_model_call")


BACKLOG = 16


async def test_one_busy_tenant_does_not_starve_another(
    client: Client,
    test_settings: Settings,
    pool: Pool,
    make_tenant: TenantFactory,
    api_for: Callable[[Settings], httpx.AsyncClient],
) -> None:
    settings = test_settings.model_copy(update={"model_calls_per_second": 4.0})
    busy, quiet = await make_tenant(), await make_tenant()
    api = api_for(settings)
    no_review = {"pipeline": "summarize", "input": {"text": "Fairness matters.", "review": False}}
    # Queue the busy tenant's backlog before any worker polls, then the quiet tenant's runs.
    busy_runs = [await start(api, busy, no_review) for _ in range(BACKLOG)]
    quiet_runs = [await start(api, quiet, no_review) for _ in range(2)]
    handles = [
        client.get_workflow_handle(workflow_id(tenant.id, run_id))
        for tenant, runs in ((busy, busy_runs), (quiet, quiet_runs))
        for run_id in runs
    ]
    deps = make_deps(pool, settings)
    main, models = build_workers(client, settings, deps, app_runtime(settings))
    # Every model call is on the model queue before its worker polls: what the queue hands
    # out first then depends on fairness alone, not on how fast this machine started them.
    async with main:
        await eventually(lambda: scheduled_model_calls(handles), lambda n: n == len(handles))
        async with models:
            await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), timeout=60)
    await deps.close()
    # In the order Temporal closed them (when a client noticed is noise on a busy machine).
    closed = {h.id: (await h.describe()).close_time for h in handles}
    order = sorted(closed, key=lambda wid: closed[wid] or datetime.max.replace(tzinfo=UTC))
    last_quiet = max(order.index(workflow_id(quiet.id, r)) for r in quiet_runs)
    behind = len(order) - 1 - last_quiet
    # The model queue hands out 4 calls a second, by tenant in turn: the quiet tenant's two
    # go within the first four, so most of the backlog closes after them. FIFO (no fairness
    # key) hands them out last. Measured on 2 cores busy with other tests (2026-12-01): 14
    # behind with the key in 3 runs of 3, none without it in 3 of 3.
    assert behind >= BACKLOG // 2, f"only {behind} of the busy tenant's runs closed after"
    assert await model_queues(client, busy, busy_runs[0]) == {f"{settings.task_queue}-model"}


async def scheduled_model_calls(handles: list[WorkflowHandle[Any, Any]]) -> int:
    """How many of the runs have a model call waiting or running."""
    described = await asyncio.gather(*(h.describe() for h in handles))
    return sum(
        any(a.activity_type.name == "model.call" for a in d.raw_description.pending_activities)
        for d in described
    )


async def model_queues(client: Client, tenant: Tenant, run_id: str) -> set[str]:
    """The task queues the run's model calls were scheduled on."""
    history = await client.get_workflow_handle(workflow_id(tenant.id, run_id)).fetch_history()
    return {
        e.activity_task_scheduled_event_attributes.task_queue.name
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
        and e.activity_task_scheduled_event_attributes.activity_type.name == "model.call"
    }


@pytest.mark.usefixtures("worker")
async def test_without_a_rate_model_calls_stay_on_the_run_queue(
    api: httpx.AsyncClient, tenant: Tenant, client: Client, test_settings: Settings
) -> None:
    # No model-call rate (the default): the calls ride the workflow's own queue, where the
    # server can hand them to the polling worker eagerly.
    assert test_settings.model_calls_per_second is None
    no_review = {"pipeline": "summarize", "input": {"text": "Eager calls.", "review": False}}
    run_id = await start(api, tenant, no_review)
    await run_state(api, tenant, run_id, lambda b: b["status"] == "completed")
    assert await model_queues(client, tenant, run_id) == {test_settings.task_queue}


async def test_parked_runs_survive_a_killed_worker(
    client: Client, test_settings: Settings, api: httpx.AsyncClient, tenant: Tenant, tmp_path: Path
) -> None:
    def spawn() -> subprocess.Popen[bytes]:
        return spawn_worker(client, test_settings, tmp_path / "worker.log")

    first = spawn()
    try:
        run_ids = [await start(api, tenant) for _ in range(5)]
        for run_id in run_ids:
            await run_state(api, tenant, run_id, lambda b: b["stage"] == "review")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    second = spawn()
    try:
        inbox = await wait_json(
            api, "/v1/approvals", tenant.auth("approver"), lambda b: len(b["items"]) == 5
        )
        for item in inbox["items"]:
            decided = await api.post(
                f"/v1/approvals/{item['approval_id']}/decision",
                json={"decision": "approve"},
                headers=tenant.auth("approver"),
                timeout=30,
            )
            assert decided.status_code == 200, decided.text
        for run_id in run_ids:
            done = await run_state(api, tenant, run_id, lambda b: b["status"] == "completed")
            assert done["result"]["approval"] == "approved"
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
