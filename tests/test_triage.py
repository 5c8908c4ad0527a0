"""`triage`: three model steps, and the declared escalation when the check rejects the draft."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from temporalio.client import Client

from stead.policy.models import load_routing
from stead.service.runs import workflow_id
from stead.store.db import Pool
from tests.conftest import SimControl, Tenant
from tests.helpers import record_history, wait_json


async def run(api: httpx.AsyncClient, tenant: Tenant, message: str) -> tuple[str, dict[str, Any]]:
    started = await api.post(
        "/v1/runs",
        json={"pipeline": "triage", "input": {"message": message}},
        headers=tenant.auth("requester"),
    )
    assert started.status_code == 201, started.text
    run_id = str(started.json()["run_id"])
    done = await wait_json(
        api, f"/v1/runs/{run_id}", tenant.auth("requester"), lambda b: b["status"] == "completed"
    )
    return run_id, done


@pytest.mark.usefixtures("worker")
async def test_three_steps_when_the_check_passes(
    api: httpx.AsyncClient, tenant: Tenant, client: Client
) -> None:
    run_id, done = await run(api, tenant, "My invoice is wrong.\nsim_reply: ok")
    assert done["usage"]["model_calls"] == 3
    assert set(done["attempts"]) == {"classify", "draft", "check"}
    await record_history(client.get_workflow_handle(workflow_id(tenant.id, run_id)), "triage_ok")


@pytest.mark.usefixtures("worker")
async def test_a_rejected_draft_is_rewritten_by_the_stronger_model(
    api: httpx.AsyncClient, tenant: Tenant, client: Client, pool: Pool, sim: SimControl
) -> None:
    stronger = load_routing().route("draft", "standard").escalate
    assert stronger is not None
    before = (await sim.stats())["requests"].get(stronger, 0)
    run_id, done = await run(api, tenant, "The app crashes on start.")
    assert done["usage"]["model_calls"] == 4
    assert "redraft" in done["attempts"]
    async with pool.acquire() as conn:
        steps = await conn.fetch(
            "SELECT step, model, cache_hit FROM model_usage WHERE tenant_id = $1 AND run_id = $2",
            tenant.id,
            run_id,
        )
    by_step = {r["step"]: (r["model"], r["cache_hit"]) for r in steps}
    # Written by the stronger model at the provider, not the rejected draft served from cache.
    assert by_step["redraft"] == (stronger, False)
    assert by_step["draft"][0] != stronger
    assert (await sim.stats())["requests"].get(stronger, 0) == before + 1
    await record_history(
        client.get_workflow_handle(workflow_id(tenant.id, run_id)), "triage_escalated"
    )
