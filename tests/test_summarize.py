"""The summarize pipeline over the API: approve, approve with edits, reject, no review."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from temporalio.client import Client

from stead.service.runs import workflow_id
from tests.conftest import Tenant
from tests.helpers import record_history, wait_json

TEXT = "Revenue grew 12% in Q3 to $4.1M. Costs fell 3%. The board approved the 2027 plan."


async def start(api: httpx.AsyncClient, tenant: Tenant, **input_: Any) -> str:
    response = await api.post(
        "/v1/runs",
        json={"pipeline": "summarize", "input": {"text": TEXT, **input_}},
        headers=tenant.auth("requester"),
    )
    assert response.status_code == 201, response.text
    assert response.json()["created"] is True
    return str(response.json()["run_id"])


async def pending_approval(api: httpx.AsyncClient, tenant: Tenant, run_id: str) -> dict[str, Any]:
    inbox = await wait_json(
        api,
        "/v1/approvals",
        tenant.auth("approver"),
        lambda b: any(a["run_id"] == run_id for a in b["items"]),
    )
    return next(a for a in inbox["items"] if a["run_id"] == run_id)


async def finished(api: httpx.AsyncClient, tenant: Tenant, run_id: str) -> dict[str, Any]:
    return await wait_json(
        api, f"/v1/runs/{run_id}", tenant.auth("requester"), lambda b: b["status"] != "running"
    )


@pytest.mark.usefixtures("worker")
async def test_approve(api: httpx.AsyncClient, tenant: Tenant, client: Client) -> None:
    run_id = await start(api, tenant)
    # The approver reads the proposal in clear (others see it masked: tests/test_proposals.py).
    run = await wait_json(
        api, f"/v1/runs/{run_id}", tenant.auth("approver"), lambda b: b["stage"] == "review"
    )
    approval = run["pending_approvals"][0]
    # The simulator summarizes deterministically from the text it was given.
    assert approval["proposal"]["summary"].startswith("Summary: Revenue grew 12% in Q3")
    assert approval["eligible_roles"] == ["approver"]
    assert (await pending_approval(api, tenant, run_id))["approval_id"] == approval["approval_id"]

    decided = await api.post(
        f"/v1/approvals/{approval['approval_id']}/decision",
        json={"decision": "approve", "comment": "accurate"},
        headers=tenant.auth("approver"),
    )
    assert decided.status_code == 200, decided.text
    assert decided.json()["status"] == "approved"

    done = await finished(api, tenant, run_id)
    assert done["status"] == "completed"
    assert done["result"]["approval"] == "approved"
    assert done["result"]["summary"] == approval["proposal"]["summary"]
    assert [s["stage"] for s in done["stages"]] == ["intake", "model_call", "review", "completed"]
    assert done["usage"]["model_calls"] == 1
    assert done["usage"]["input_tokens"] > 0
    assert done["usage"]["cost_usd"] > 0
    # The inbox no longer offers it.
    inbox = (await api.get("/v1/approvals", headers=tenant.auth("approver"))).json()
    assert all(a["run_id"] != run_id for a in inbox["items"])
    await record_history(
        client.get_workflow_handle(workflow_id(tenant.id, run_id)), "summarize_approved"
    )


@pytest.mark.usefixtures("worker")
async def test_approve_with_edits(api: httpx.AsyncClient, tenant: Tenant, client: Client) -> None:
    run_id = await start(api, tenant)
    approval = await pending_approval(api, tenant, run_id)
    decided = await api.post(
        f"/v1/approvals/{approval['approval_id']}/decision",
        json={"decision": "approve", "edits": {"summary": "Q3: revenue +12%, costs -3%."}},
        headers=tenant.auth("approver"),
    )
    assert decided.status_code == 200, decided.text
    done = await finished(api, tenant, run_id)
    assert done["result"]["summary"] == "Q3: revenue +12%, costs -3%."
    await record_history(
        client.get_workflow_handle(workflow_id(tenant.id, run_id)), "summarize_edited"
    )


@pytest.mark.usefixtures("worker")
async def test_reject(api: httpx.AsyncClient, tenant: Tenant, client: Client) -> None:
    run_id = await start(api, tenant)
    approval = await pending_approval(api, tenant, run_id)
    decided = await api.post(
        f"/v1/approvals/{approval['approval_id']}/decision",
        json={"decision": "reject", "comment": "misses the board decision"},
        headers=tenant.auth("approver"),
    )
    assert decided.json()["status"] == "rejected"
    done = await finished(api, tenant, run_id)
    assert done["status"] == "completed"
    assert done["result"]["approval"] == "rejected"
    assert done["approvals"][0]["status"] == "rejected"
    await record_history(
        client.get_workflow_handle(workflow_id(tenant.id, run_id)), "summarize_rejected"
    )


@pytest.mark.usefixtures("worker")
async def test_without_review(api: httpx.AsyncClient, tenant: Tenant) -> None:
    run_id = await start(api, tenant, review=False)
    done = await finished(api, tenant, run_id)
    assert done["status"] == "completed"
    assert done["approvals"] == []
    assert "review" not in [s["stage"] for s in done["stages"]]
