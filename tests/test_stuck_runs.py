"""Runs that cannot move are visible and can be ended; none crash-loops unseen.

Before: a run whose workflow task failed on every attempt (a bug, a deadline of 1e15 seconds,
a budget raised to 1e300) stayed `running` with no error anywhere, cancel could not end it,
and a pipeline returning an outcome the platform did not know did the same. A terminated
run's approvals stayed in the inbox for ever.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from pydantic import BaseModel
from temporalio import workflow
from temporalio.client import Client, WorkflowHandle
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.worker import Worker
from temporalio.workflow import HandlerUnfinishedPolicy

from stead import metrics, search
from stead.api.app import refresh_gauges
from stead.attest import AttestationInterceptor
from stead.config import Settings
from stead.contract import RunContext, RunInput
from stead.gateway.ledger import LedgerActivities
from stead.pipeline.base import Completed, Outcome, Pipeline
from stead.service.runs import new_run_id, workflow_id
from stead.store.audit import audit_writer
from stead.store.db import Pool
from tests.conftest import Tenant
from tests.helpers import audit_actions, eventually, wait_json

TEXT = {"pipeline": "summarize", "input": {"text": "Revenue grew 12% in Q3. Costs fell 3%."}}


class Anything(BaseModel):
    ratio: int = 0


class BuggyPipeline(Pipeline[Anything, Anything], name="buggy-pipeline", sandboxed=False):
    """A pipeline with a bug: its workflow task fails on every attempt."""

    async def steps(self, params: Anything) -> Outcome[Anything]:
        return Completed(Anything(ratio=1 // params.ratio))  # the ratio is 0


class OddOutcomePipeline(Pipeline[Anything, Anything], name="odd-outcome", sandboxed=False):
    """A pipeline that ends in a way the platform does not know."""

    async def steps(self, params: Anything) -> Outcome[Anything]:
        return "escalated-to-legal"  # type: ignore[return-value]  # the mistake under test


async def start_test_run(
    client: Client, tenant: Tenant, queue: str, workflow_cls: type[Any], *, revision: int = 0
) -> tuple[str, WorkflowHandle[Any, Any]]:
    """Start a run of a test pipeline the way the API starts runs (id, search attributes)."""
    run_id = new_run_id(tenant.id, None)
    context = RunContext(
        tenant=tenant.id,
        run_id=run_id,
        pipeline="summarize",
        requested_by="requester",
        revision=revision,
    )
    handle = await client.start_workflow(
        workflow_cls.run,
        RunInput(context=context, input={}),
        id=workflow_id(tenant.id, run_id),
        task_queue=queue,
        search_attributes=TypedSearchAttributes(
            [
                SearchAttributePair(search.CUSTOMER, tenant.id),
                SearchAttributePair(search.PIPELINE, "summarize"),
                SearchAttributePair(search.REQUESTED_BY, "requester"),
            ]
        ),
    )
    return run_id, handle


async def test_a_crash_looping_run_is_visible_and_cancel_ends_it(
    api: httpx.AsyncClient,
    tenant: Tenant,
    client: Client,
    pool: Pool,
    test_settings: Settings,
) -> None:
    queue = f"{test_settings.task_queue}-buggy"
    async with Worker(
        client,
        task_queue=queue,
        workflows=[BuggyPipeline],
        interceptors=[AttestationInterceptor(test_settings.attestor)],
    ):
        run_id, handle = await start_test_run(client, tenant, queue, BuggyPipeline)
        run = await wait_json(
            api,
            f"/v1/runs/{run_id}",
            tenant.auth("requester"),
            lambda b: b["stuck"],
            within=30,
        )
        assert run["status"] == "running"
        assert "ZeroDivisionError" in run["stuck_error"]["message"]

        listed = await wait_json(
            api,
            "/v1/runs?stuck=true",
            tenant.auth("requester"),
            lambda b: any(r["run_id"] == run_id for r in b["items"]),
            within=30,
        )
        assert all(r["stuck"] for r in listed["items"])
        healthy = (await api.get("/v1/runs?stuck=false", headers=tenant.auth("requester"))).json()
        assert run_id not in {r["run_id"] for r in healthy["items"]}

        refresher = asyncio.create_task(refresh_gauges(pool, client, every=0.05))
        try:
            await eventually(
                lambda: asyncio.sleep(0, float(metrics.RUNS_STUCK._value.get())),
                lambda v: v >= 1,
            )
        finally:
            refresher.cancel()

        cancelled = await api.post(f"/v1/runs/{run_id}/cancel", headers=tenant.auth("requester"))
        assert cancelled.status_code == 202, cancelled.text
    described = await handle.describe()
    assert described.status is not None
    assert described.status.name == "TERMINATED"
    assert "run.cancelled" in await audit_actions(pool, tenant, run_id)


async def test_an_unknown_outcome_fails_the_run_clearly(
    api: httpx.AsyncClient, tenant: Tenant, client: Client, test_settings: Settings, pool: Pool
) -> None:
    queue = f"{test_settings.task_queue}-odd"
    ledger = LedgerActivities(pool, audit_writer(test_settings))
    async with Worker(
        client,
        task_queue=queue,
        workflows=[OddOutcomePipeline],
        activities=[ledger.flush, ledger.publish_approval],
    ):
        run_id, _ = await start_test_run(client, tenant, queue, OddOutcomePipeline)
        run = await wait_json(
            api,
            f"/v1/runs/{run_id}",
            tenant.auth("requester"),
            lambda b: b["status"] != "running" or b["stuck"],
            within=30,
        )
    assert run["status"] == "failed", run
    assert run["last_error"]["type"] == "UnknownOutcome"
    assert "escalated-to-legal" in run["last_error"]["message"]


@pytest.mark.usefixtures("worker")
async def test_a_terminated_runs_approvals_leave_the_inbox(
    api: httpx.AsyncClient, tenant: Tenant, client: Client, pool: Pool
) -> None:
    started = await api.post("/v1/runs", json=TEXT, headers=tenant.auth("requester"))
    run_id = started.json()["run_id"]
    inbox = await wait_json(
        api,
        "/v1/approvals",
        tenant.auth("approver"),
        lambda b: any(a["run_id"] == run_id for a in b["items"]),
    )
    approval_id = next(a["approval_id"] for a in inbox["items"] if a["run_id"] == run_id)
    # Terminated through Temporal: the run itself never gets to close its approval.
    await client.get_workflow_handle(workflow_id(tenant.id, run_id)).terminate(reason="ops")
    await wait_json(
        api,
        "/v1/approvals",
        tenant.auth("approver"),
        lambda b: all(a["run_id"] != run_id for a in b["items"]),
        within=30,
    )
    async with pool.acquire() as conn:
        status = await conn.fetchval(
            "SELECT status FROM approvals WHERE tenant_id = $1 AND id = $2",
            tenant.id,
            approval_id,
        )
    assert status == "cancelled"
    decided = await api.post(
        f"/v1/approvals/{approval_id}/decision",
        json={"decision": "approve"},
        headers=tenant.auth("approver"),
    )
    assert decided.status_code == 409


@workflow.defn(name="ends-on-cancel", sandboxed=False)
class EndsOnCancel:
    """A run that finishes the moment a cancel reaches it, before answering the update."""

    def __init__(self) -> None:
        self.asked = False

    @workflow.run
    async def run(self, _: RunInput) -> None:
        await workflow.wait_condition(lambda: self.asked)

    @workflow.update(name="request_cancel", unfinished_policy=HandlerUnfinishedPolicy.ABANDON)
    async def request_cancel(self, _: Any) -> None:
        self.asked = True
        await workflow.wait_condition(lambda: False)


async def test_a_run_ending_while_being_cancelled_is_a_conflict(
    api: httpx.AsyncClient, tenant: Tenant, client: Client, test_settings: Settings
) -> None:
    """Before: Temporal aborted the update ("aborted by closing workflow") and cancel was a 500
    (found by the OpenAPI fuzzing drill)."""
    queue = f"{test_settings.task_queue}-ends"
    async with Worker(client, task_queue=queue, workflows=[EndsOnCancel]):
        run_id, handle = await start_test_run(client, tenant, queue, EndsOnCancel)
        cancelled = await api.post(f"/v1/runs/{run_id}/cancel", headers=tenant.auth("requester"))
        assert cancelled.status_code == 409, cancelled.text
        assert "ended completed before the cancel" in cancelled.json()["detail"]
        await handle.result()
