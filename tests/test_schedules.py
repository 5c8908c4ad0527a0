"""Schedules on real Temporal Schedules: runs started as the owner at each firing, the overlap
policy, pause and resume, a revoked owner's schedule pausing itself and saying why, and
tenant isolation."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from temporalio.client import Client, ScheduleActionExecutionStartWorkflow, WorkflowHandle
from temporalio.testing import ActivityEnvironment
from temporalio.worker import Worker

from stead.config import Settings
from stead.gateway.schedules import (
    ScheduleActivities,
    ScheduledRun,
    StartScheduled,
    input_sealer,
)
from stead.service.runs import workflow_id
from stead.store import schedules as store
from stead.store.db import Pool
from tests.conftest import Tenant, TenantFactory, app_runtime, make_services
from tests.helpers import audit_actions, decide_pending, eventually, record_history, wait_json
from tests.hooks_support import create_schedule

pytest_plugins = ["tests.hooks_support"]

Made = list[tuple[str, str]]


def summarize(*, review: bool) -> dict[str, Any]:
    text = f"Daily digest {uuid.uuid4().hex}: revenue grew 12% in Q3, costs fell 3%."
    return {"pipeline": "summarize", "input": {"text": text, "review": review}}


def every(seconds: int, **more: Any) -> dict[str, Any]:
    return {**summarize(review=False), "every_seconds": seconds, **more}


async def schedule(api: httpx.AsyncClient, tenant: Tenant, schedule_id: str) -> dict[str, Any]:
    response = await api.get(f"/v1/schedules/{schedule_id}", headers=tenant.auth("requester"))
    assert response.status_code == 200, response.text
    return dict(response.json())


async def started_runs(
    api: httpx.AsyncClient, tenant: Tenant, schedule_id: str, count: int, *, within: float = 30
) -> list[str]:
    """The runs the schedule started, once there are at least `count`."""
    found = await wait_json(
        api,
        f"/v1/schedules/{schedule_id}",
        tenant.auth("requester"),
        lambda b: sum(s["run_id"] is not None for s in b["recent_starts"]) >= count,
        within=within,
    )
    return [s["run_id"] for s in found["recent_starts"] if s["run_id"]]


# --- creating ---------------------------------------------------------------------------


async def test_a_schedule_is_checked_when_created(
    hook_api: httpx.AsyncClient, make_tenant: TenantFactory, created_schedules: Made
) -> None:
    roles = {"requester": ["requester"], "colleague": ["requester"], "approver": ["approver"]}
    tenant = await make_tenant({**roles, "admin": ["admin"]})
    requester = tenant.auth("requester")

    async def create(body: dict[str, Any], user: str = "requester") -> httpx.Response:
        return await hook_api.post("/v1/schedules", json=body, headers=tenant.auth(user))

    refused = [
        ({**summarize(review=False)}, 422),  # neither cron nor interval
        ({**summarize(review=False), "cron": "0 9 * * *", "every_seconds": 60}, 422),
        ({**summarize(review=False), "cron": "not a cron"}, 422),
        ({**summarize(review=False), "every_seconds": 0}, 422),
        ({"pipeline": "nope", "input": {}, "every_seconds": 60}, 422),
        ({"pipeline": "ingest", "input": {}, "every_seconds": 60}, 422),
        ({"pipeline": "summarize", "input": {"text": ""}, "every_seconds": 60}, 422),
        ({**every(60), "overlap": "terminate_other"}, 422),
    ]
    for body, code in refused:
        response = await create(body)
        assert response.status_code == code, (body, response.text)
    bad_cron = await create({**summarize(review=False), "cron": "not a cron"})
    assert "CronString does not have 5-7 fields" in bad_cron.json()["detail"]
    # An approver may not schedule (no schedules:manage, no runs:start).
    assert (await create(every(60), user="approver")).status_code == 403

    cron = await create_schedule(
        hook_api,
        tenant,
        created_schedules,
        {**summarize(review=False), "cron": "30 9 * * 1-5", "timezone": "Europe/Berlin"},
    )
    assert cron["cron"] == "30 9 * * 1-5"
    assert cron["owner"] == "requester"
    assert cron["overlap"] == "skip"
    assert len(cron["next_runs"]) == 5
    nine_thirty = {datetime.fromisoformat(t).astimezone(UTC).hour for t in cron["next_runs"]}
    assert nine_thirty <= {7, 8}, "09:30 in Berlin is 07:30 or 08:30 UTC"
    assert all(datetime.fromisoformat(t).weekday() < 5 for t in cron["next_runs"])

    async def listing() -> list[dict[str, Any]]:
        return list((await hook_api.get("/v1/schedules", headers=requester)).json())

    listed = await eventually(listing, bool)  # visibility lags a moment
    assert [(s["schedule_id"], s["pipeline"]) for s in listed] == [
        (cron["schedule_id"], "summarize")
    ]

    # Another tenant sees nothing of it; its runs list shows no schedule either.
    other = await make_tenant()
    path = f"/v1/schedules/{cron['schedule_id']}"
    assert (await hook_api.get(path, headers=other.auth("admin"))).status_code == 404
    assert (await hook_api.delete(path, headers=other.auth("admin"))).status_code == 404
    assert (await hook_api.get("/v1/schedules", headers=other.auth("admin"))).json() == []
    runs = await hook_api.get("/v1/runs", headers=requester)
    assert runs.json()["items"] == []

    # Only its owner or an admin changes it; deleting it is audited.
    colleague = await hook_api.post(f"{path}/pause", headers=tenant.auth("colleague"))
    assert colleague.status_code == 403
    assert "owner" in colleague.json()["detail"]
    assert (await hook_api.delete(path, headers=tenant.auth("admin"))).status_code == 204
    assert (await hook_api.get(path, headers=requester)).status_code == 404


# --- firing -----------------------------------------------------------------------------


@pytest.mark.usefixtures("worker")
async def test_each_firing_starts_a_run_as_the_owner(
    hook_api: httpx.AsyncClient, tenant: Tenant, client: Client, pool: Pool, created_schedules: Made
) -> None:
    made = await create_schedule(hook_api, tenant, created_schedules, every(1, overlap="allow_all"))
    schedule_id = made["schedule_id"]
    # The input is kept for the firings sealed with the payload keys, and read back opened.
    async with pool.acquire() as conn:
        stored = await conn.fetchrow(
            "SELECT input, input_sealed FROM schedules WHERE tenant_id = $1 AND id = $2",
            tenant.id,
            schedule_id,
        )
    assert stored is not None
    assert stored["input"] is None
    assert made["input"]["text"].startswith("Daily digest ")
    assert made["input"]["text"].encode() not in stored["input_sealed"]
    run_ids = await started_runs(hook_api, tenant, schedule_id, 2)
    assert len(set(run_ids)) == len(run_ids)
    run = await wait_json(
        hook_api,
        f"/v1/runs/{run_ids[-1]}",
        tenant.auth("requester"),
        lambda b: b["status"] != "running",
    )
    assert run["status"] == "completed"
    assert run["requested_by"] == "requester", "started as the schedule's owner"
    assert "schedule.run_started" in await audit_actions(pool, tenant, run_ids[-1])

    paused = await hook_api.post(
        f"/v1/schedules/{schedule_id}/pause",
        json={"note": "quiet week"},
        headers=tenant.auth("requester"),
    )
    assert paused.json()["paused"] is True
    assert paused.json()["note"] == "quiet week"
    assert paused.json()["next_runs"] == []
    resumed = await hook_api.post(
        f"/v1/schedules/{schedule_id}/resume", headers=tenant.auth("requester")
    )
    assert resumed.json()["paused"] is False
    await record_history(await firing(client, tenant, schedule_id), "scheduledrun_started")


async def firing(client: Client, tenant: Tenant, schedule_id: str) -> WorkflowHandle[Any, Any]:
    """The workflow of the schedule's earliest firing still listed, once it has ended."""
    described = await client.get_schedule_handle(f"{tenant.id}:{schedule_id}").describe()
    first = described.info.recent_actions[0].action
    assert isinstance(first, ScheduleActionExecutionStartWorkflow)
    handle = client.get_workflow_handle(first.workflow_id)
    await eventually(handle.describe, lambda d: d.close_time is not None)
    return handle


@pytest.mark.usefixtures("worker")
async def test_overlap_skip_waits_for_the_run_to_end(
    hook_api: httpx.AsyncClient, tenant: Tenant, client: Client, created_schedules: Made
) -> None:
    body = {**summarize(review=True), "every_seconds": 1, "overlap": "skip"}
    made = await create_schedule(hook_api, tenant, created_schedules, body)
    schedule_id = made["schedule_id"]
    first = (await started_runs(hook_api, tenant, schedule_id, 1))[0]
    # While the first run waits for its review, every firing is skipped.
    skipped = await wait_json(
        hook_api,
        f"/v1/schedules/{schedule_id}",
        tenant.auth("requester"),
        lambda b: b["skipped_overlapping"] >= 2,
    )
    assert [s["run_id"] for s in skipped["recent_starts"]] == [first]
    await decide_pending(hook_api, tenant, first)
    runs = await started_runs(hook_api, tenant, schedule_id, 2)
    assert runs[-1] == first
    assert runs[0] != first
    await record_history(await firing(client, tenant, schedule_id), "scheduledrun_watched")


@pytest.mark.usefixtures("worker")
async def test_overlap_cancel_other_cancels_the_previous_run(
    hook_api: httpx.AsyncClient, tenant: Tenant, created_schedules: Made
) -> None:
    body = {**summarize(review=True), "every_seconds": 2, "overlap": "cancel_other"}
    made = await create_schedule(hook_api, tenant, created_schedules, body)
    runs = await started_runs(hook_api, tenant, made["schedule_id"], 2)
    oldest = runs[-1]
    cancelled = await wait_json(
        hook_api, f"/v1/runs/{oldest}", tenant.auth("requester"), lambda b: b["status"] != "running"
    )
    assert cancelled["status"] == "cancelled"


@pytest.mark.usefixtures("worker")
async def test_a_demoted_owner_s_schedule_pauses_and_says_why(
    hook_api: httpx.AsyncClient, tenant: Tenant, pool: Pool, created_schedules: Made
) -> None:
    made = await create_schedule(hook_api, tenant, created_schedules, every(1))
    schedule_id = made["schedule_id"]
    await started_runs(hook_api, tenant, schedule_id, 1)
    demoted = await hook_api.put(
        "/v1/admin/users/requester/roles",
        json={"roles": ["approver"]},
        headers=tenant.auth("admin"),
    )
    assert demoted.status_code == 200, demoted.text

    paused = await wait_json(
        hook_api, f"/v1/schedules/{schedule_id}", tenant.auth("admin"), lambda b: b["paused"]
    )
    assert paused["note"].startswith("paused by Stead: the run due at ")
    assert "not started as requester" in paused["note"]
    assert "'schedules:manage'" in paused["note"]
    refusal = paused["recent_starts"][0]
    assert refusal["run_id"] is None
    assert "schedules:manage" in refusal["refused"]
    async with pool.acquire() as conn:
        refusals = await conn.fetch(
            "SELECT data FROM audit_log WHERE tenant_id = $1 AND action = 'schedule.start_refused'",
            tenant.id,
        )
    assert len(refusals) == 1

    # Restored and resumed, it starts runs again, each checking the owner anew.
    await hook_api.put(
        "/v1/admin/users/requester/roles",
        json={"roles": ["requester"]},
        headers=tenant.auth("admin"),
    )
    before = len(await started_runs(hook_api, tenant, schedule_id, 1))
    resumed = await hook_api.post(
        f"/v1/schedules/{schedule_id}/resume", headers=tenant.auth("admin")
    )
    assert resumed.json()["paused"] is False
    await started_runs(hook_api, tenant, schedule_id, before + 1)

    # A disabled owner's schedule stops too.
    gone = await hook_api.delete("/v1/admin/users/requester", headers=tenant.auth("admin"))
    assert gone.status_code == 204
    stopped = await wait_json(
        hook_api, f"/v1/schedules/{schedule_id}", tenant.auth("admin"), lambda b: b["paused"]
    )
    assert "owner requester is disabled or no longer exists" in stopped["note"]


async def test_a_retried_firing_starts_one_run(
    client: Client, hook_settings: Settings, pool: Pool, tenant: Tenant, worker: list[Worker]
) -> None:
    """The run id derives from the schedule and the scheduled time: the same firing started
    twice (an activity retried after its worker died) is one run."""
    runtime = app_runtime(hook_settings)
    activities = ScheduleActivities(
        runtime, hook_settings, pool, make_services(hook_settings, client, pool).audit
    )
    schedule_id, body = "sch_" + "a" * 26, summarize(review=False)
    async with pool.acquire() as conn:
        await store.insert_schedule(
            conn,
            tenant.id,
            schedule_id,
            input_sealer(hook_settings),
            store.Definition("requester", body["pipeline"], body["input"], None),
        )
    job = StartScheduled(
        run=ScheduledRun(
            tenant=tenant.id, schedule_id=schedule_id, owner="requester", pipeline="summarize"
        ),
        scheduled_at=datetime(2026, 12, 1, 9, 30, tzinfo=UTC),
    )
    env = ActivityEnvironment(client=client)
    first = await env.run(activities.start_run, job)
    again = await env.run(activities.start_run, job)
    assert first.run_id is not None
    assert again.run_id == first.run_id
    handle = client.get_workflow_handle(workflow_id(tenant.id, first.run_id))
    await eventually(handle.describe, lambda d: d.close_time is not None)
    async with pool.acquire() as conn:
        starts = await conn.fetchval(
            "SELECT count(*) FROM audit_log WHERE tenant_id = $1 AND run_id = $2"
            " AND action = 'run.started'",
            tenant.id,
            first.run_id,
        )
    assert starts == 1
