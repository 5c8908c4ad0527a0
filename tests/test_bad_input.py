"""Bad input gets a clear 4xx with a reason: never a 500, never unrecorded spend.

Each case here was a 500, a crash-looping run or billed calls with no usage recorded before:
NUL characters in a run's input (every usage write failed after the provider was paid), a
lone surrogate in a document, NaN or 1e999 as a budget, an audit cursor past 2^63, deadlines
and budget edits past what a run's clock or counters hold.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from stead.api.routes.admin import BudgetIn
from stead.contract import Proposal
from stead.pipeline.proposals import BudgetProposal, InvalidEdits, apply_edits
from stead.service.webhooks import RotateIn
from stead.store.db import Pool
from tests.conftest import Tenant
from tests.helpers import wait_json
from worker import APP

# One valid input per pipeline started through POST /v1/runs, and a text field to poison.
INPUTS: dict[str, tuple[dict[str, Any], str]] = {
    "summarize": ({"text": "Revenue grew."}, "text"),
    "triage": ({"message": "My invoice is wrong."}, "message"),
    "support-agent": (
        {"ticket_id": "T-1", "customer_id": "cus_1", "subject": "Refund", "body": "Please."},
        "body",
    ),
    "doc-qa": ({"question": "What is the refund policy?"}, "question"),
}


async def send_raw(
    api: httpx.AsyncClient, method: str, path: str, body: str, auth: dict[str, str]
) -> httpx.Response:
    """A JSON body as written, e.g. with NaN, which no JSON encoder would produce."""
    headers = {"Content-Type": "application/json", **auth}
    return await api.request(method, path, content=body, headers=headers)


def test_every_startable_pipeline_is_covered() -> None:
    assert set(INPUTS) == {p.pipeline for p in APP.pipelines}


@pytest.mark.parametrize("pipeline", sorted(INPUTS))
@pytest.mark.parametrize("bad", ["\u0000", "\udc00"], ids=["nul", "lone-surrogate"])
async def test_unstorable_text_in_any_pipeline_input_is_a_422_naming_the_field(
    api: httpx.AsyncClient, tenant: Tenant, pool: Pool, pipeline: str, bad: str
) -> None:
    good, field = INPUTS[pipeline]
    body = {"pipeline": pipeline, "input": {**good, field: f"before{bad}after"}}
    response = await send_raw(api, "POST", "/v1/runs", json.dumps(body), tenant.auth("requester"))
    assert response.status_code == 422, response.text
    assert f"input.{field}" in response.text
    async with pool.acquire() as conn:
        calls = await conn.fetchval(
            "SELECT count(*) FROM model_usage WHERE tenant_id = $1", tenant.id
        )
    assert calls == 0  # refused before anything was started, let alone billed


async def test_a_lone_surrogate_in_a_document_is_a_422(
    api: httpx.AsyncClient, tenant: Tenant
) -> None:
    body = json.dumps({"title": "Policy", "text": "Refunds \udc00 within 30 days."})
    response = await send_raw(api, "POST", "/v1/documents", body, tenant.auth("requester"))
    assert response.status_code == 422, response.text
    assert "text" in response.text  # the field is named, whichever layer refused it


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
async def test_non_finite_numbers_are_422s(
    api: httpx.AsyncClient, tenant: Tenant, number: str
) -> None:
    start = f'{{"pipeline": "summarize", "input": {{"text": "x"}}, "budget_usd": {number}}}'
    response = await send_raw(api, "POST", "/v1/runs", start, tenant.auth("requester"))
    assert response.status_code == 422, response.text
    budget = f'{{"scope": "customer", "period": "day", "limit_usd": {number}}}'
    for user, allowed in (("requester", {403, 422}), ("admin", {422})):
        response = await send_raw(api, "PUT", "/v1/admin/budgets", budget, tenant.auth(user))
        assert response.status_code in allowed, (user, response.text)
    policy = f'{{"timeout_seconds": {number}}}'
    response = await send_raw(
        api, "PUT", "/v1/admin/approval-policies/summarize/review", policy, tenant.auth("admin")
    )
    assert response.status_code == 422, response.text


async def test_numbers_a_run_cannot_hold_are_refused(
    api: httpx.AsyncClient, tenant: Tenant
) -> None:
    for policy in ({"timeout_seconds": 10**15}, {"timeout_seconds": 0}, {"quorum": 10**6}):
        response = await api.put(
            "/v1/admin/approval-policies/summarize/review",
            json=policy,
            headers=tenant.auth("admin"),
        )
        assert response.status_code == 422, (policy, response.text)
    budget = Proposal(
        kind="budget",
        title="Raise the run budget",
        schema_name="budget",
        data={"scope": "run", "current_usd": 0.01, "requested_usd": 0.02},
        editable=("requested_usd",),
    )
    for edit in (1e300, float("nan"), float("inf"), -1.0):
        with pytest.raises(InvalidEdits):
            apply_edits(BudgetProposal, budget, budget.data, {"requested_usd": edit})
    edited = apply_edits(BudgetProposal, budget, budget.data, {"requested_usd": 5})
    assert edited["requested_usd"] == 5


async def test_an_audit_cursor_past_a_bigint_is_a_422(
    api: httpx.AsyncClient, tenant: Tenant
) -> None:
    cursor = base64.urlsafe_b64encode(f"seq:{2**63}".encode()).decode()
    response = await api.get(f"/v1/audit?cursor={cursor}", headers=tenant.auth("admin"))
    assert response.status_code == 422, response.text


@pytest.mark.usefixtures("worker")
async def test_a_retried_upload_stores_one_document(
    api: httpx.AsyncClient, tenant: Tenant, pool: Pool
) -> None:
    body = {"title": "Refunds", "text": "Refunds are paid within 30 days."}
    key = {"Idempotency-Key": "upload-1", **tenant.auth("requester")}
    first = await api.post("/v1/documents", json=body, headers=key)
    again = await api.post("/v1/documents", json=body, headers=key)
    assert (first.status_code, again.status_code) == (201, 200), (first.text, again.text)
    assert first.json()["document_id"] == again.json()["document_id"]
    assert first.json()["run_id"] == again.json()["run_id"]
    other = await api.post("/v1/documents", json={**body, "text": "Other."}, headers=key)
    assert other.status_code == 409
    async with pool.acquire() as conn:
        stored = await conn.fetchval(
            "SELECT count(*) FROM documents WHERE tenant_id = $1", tenant.id
        )
    assert stored == 1
    await wait_json(
        api,
        f"/v1/documents/{first.json()['document_id']}",
        tenant.auth("requester"),
        lambda b: b["status"] == "ready",
    )


@pytest.mark.usefixtures("worker")
async def test_a_restart_takes_todays_policies(api: httpx.AsyncClient, tenant: Tenant) -> None:
    """A restart is a new start: the tenant tightened review to admins after the first run
    was started, and the restarted run must follow the tightened policy."""
    started = await api.post(
        "/v1/runs",
        json={"pipeline": "summarize", "input": {"text": "Costs fell 3%."}},
        headers=tenant.auth("requester"),
    )
    run_id = started.json()["run_id"]
    first = await wait_json(
        api, f"/v1/runs/{run_id}", tenant.auth("requester"), lambda b: b["stage"] == "review"
    )
    assert first["pending_approvals"][0]["eligible_roles"] == ["approver"]
    tightened = await api.put(
        "/v1/admin/approval-policies/summarize/review",
        json={"roles": ["admin"]},
        headers=tenant.auth("admin"),
    )
    assert tightened.status_code == 200, tightened.text
    cancel = await api.post(f"/v1/runs/{run_id}/cancel", headers=tenant.auth("requester"))
    assert cancel.status_code == 202
    await wait_json(
        api, f"/v1/runs/{run_id}", tenant.auth("requester"), lambda b: b["status"] == "cancelled"
    )
    restarted = await api.post(
        f"/v1/runs/{run_id}/retry", json={"mode": "restart"}, headers=tenant.auth("requester")
    )
    assert restarted.status_code == 202, restarted.text
    second = await wait_json(
        api,
        f"/v1/runs/{restarted.json()['run_id']}",
        tenant.auth("requester"),
        lambda b: b["stage"] == "review",
    )
    assert second["pending_approvals"][0]["eligible_roles"] == ["admin"]


@pytest.mark.parametrize("value", [True, False])
def test_a_boolean_is_not_a_number_in_any_request_body(value: bool) -> None:
    """Lax validation read `false` as 0: a secret rotation kept no previous secret."""
    with pytest.raises(ValidationError, match="must be a number, not true or false"):
        RotateIn.model_validate({"keep_previous_seconds": value})
    with pytest.raises(ValidationError):
        BudgetIn.model_validate({"scope": "customer", "period": "day", "limit_usd": value})
    assert RotateIn.model_validate({"keep_previous_seconds": 60}).keep_previous_seconds == 60
