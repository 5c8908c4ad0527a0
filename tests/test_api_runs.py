"""Runs and approvals over HTTP: every refusal is a clear 4xx and changes nothing."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from typing import Any

import asyncpg
import httpx
import pytest
from temporalio.client import Client

from stead.service.runs import workflow_id
from stead.store import principals
from tests.conftest import Tenant, TenantFactory
from tests.helpers import record_history, start_run, wait_json

pytestmark = pytest.mark.usefixtures("worker")
SUMMARIZE = {"pipeline": "summarize", "input": {"text": "Alpha beta gamma. Delta epsilon."}}


async def start(
    api: httpx.AsyncClient, tenant: Tenant, user: str = "requester", **extra: Any
) -> str:
    return await start_run(api, tenant, {**SUMMARIZE, **extra}, user)


async def approval_of(api: httpx.AsyncClient, tenant: Tenant, run_id: str) -> str:
    run = await wait_json(
        api, f"/v1/runs/{run_id}", tenant.auth("requester"), lambda b: bool(b["pending_approvals"])
    )
    # The inbox projection is written right after the state changes; wait for it too.
    await wait_json(
        api,
        f"/v1/approvals/{run['pending_approvals'][0]['approval_id']}",
        tenant.auth("approver"),
        lambda b: b["status"] == "pending",
    )
    return str(run["pending_approvals"][0]["approval_id"])


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer stead_000000000000_" + "x" * 43},
    ],
)
async def test_bad_credentials_are_401(api: httpx.AsyncClient, headers: dict[str, str]) -> None:
    for method, path in (("POST", "/v1/runs"), ("GET", "/v1/runs"), ("GET", "/v1/approvals")):
        response = await api.request(method, path, json=SUMMARIZE, headers=headers)
        assert response.status_code == 401, (path, response.text)
        assert response.headers["www-authenticate"] == "Bearer"


async def test_revoked_key_is_401(
    api: httpx.AsyncClient, tenant: Tenant, database_url: str
) -> None:
    key = tenant.keys["requester"]
    assert (await api.get("/v1/runs", headers=tenant.auth("requester"))).status_code == 200
    conn = await asyncpg.connect(database_url)
    try:
        assert await principals.revoke_key(conn, tenant.id, key.split("_")[1])
    finally:
        await conn.close()
    assert (await api.get("/v1/runs", headers=tenant.auth("requester"))).status_code == 401


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"pipeline": "nope", "input": {}}, "unknown pipeline"),
        ({"pipeline": "summarize", "input": {"text": ""}}, "input.text"),
        ({"pipeline": "summarize", "input": {"text": "x", "colour": 1}}, "input.colour"),
        ({**SUMMARIZE, "tenant": "globex"}, "tenant"),
        ({**SUMMARIZE, "budget_usd": -1}, "budget_usd"),
        ({"input": {}}, "pipeline"),
    ],
)
async def test_invalid_start_is_422(
    api: httpx.AsyncClient, tenant: Tenant, body: dict[str, Any], reason: str
) -> None:
    response = await api.post("/v1/runs", json=body, headers=tenant.auth("requester"))
    assert response.status_code == 422
    assert reason in response.text


async def test_missing_right_is_403(api: httpx.AsyncClient, tenant: Tenant) -> None:
    response = await api.post("/v1/runs", json=SUMMARIZE, headers=tenant.auth("approver"))
    assert response.status_code == 403
    assert "runs:start" in response.json()["detail"]


async def test_other_tenants_run_is_404(
    api: httpx.AsyncClient, tenant: Tenant, make_tenant: TenantFactory
) -> None:
    other = await make_tenant()
    run_id = await start(api, tenant)
    mine = await api.get(f"/v1/runs/{run_id}", headers=tenant.auth("requester"))
    assert mine.status_code == 200
    theirs = await api.get(f"/v1/runs/{run_id}", headers=other.auth("admin"))
    missing = await api.get("/v1/runs/r_" + "a" * 26, headers=other.auth("admin"))
    malformed = await api.get("/v1/runs/acme:anything", headers=other.auth("admin"))
    assert theirs.status_code == missing.status_code == malformed.status_code == 404
    assert theirs.json() == missing.json()
    listed = await api.get("/v1/runs", headers=other.auth("admin"))
    assert listed.json()["items"] == []


async def test_idempotent_start(
    api: httpx.AsyncClient, tenant: Tenant, make_tenant: TenantFactory
) -> None:
    headers = {**tenant.auth("requester"), "Idempotency-Key": "order-42"}
    first = await api.post("/v1/runs", json=SUMMARIZE, headers=headers)
    again = await api.post("/v1/runs", json=SUMMARIZE, headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["run_id"] == again.json()["run_id"]
    assert again.json()["created"] is False

    changed = await api.post(
        "/v1/runs", json={**SUMMARIZE, "input": {"text": "other"}}, headers=headers
    )
    assert changed.status_code == 409

    other = await make_tenant()
    theirs = await api.post(
        "/v1/runs",
        json=SUMMARIZE,
        headers={**other.auth("requester"), "Idempotency-Key": "order-42"},
    )
    assert theirs.status_code == 201
    assert theirs.json()["run_id"] != first.json()["run_id"]


async def test_concurrent_idempotent_starts_make_one_run(
    api: httpx.AsyncClient, tenant: Tenant
) -> None:
    headers = {**tenant.auth("requester"), "Idempotency-Key": "burst"}
    responses = await asyncio.gather(
        *(api.post("/v1/runs", json=SUMMARIZE, headers=headers) for _ in range(20))
    )
    assert sorted(r.status_code for r in responses) == [200] * 19 + [201]
    assert len({r.json()["run_id"] for r in responses}) == 1


async def test_decision_refusals(api: httpx.AsyncClient, tenant: Tenant, client: Client) -> None:
    run_id = await start(api, tenant)
    approval_id = await approval_of(api, tenant, run_id)
    path = f"/v1/approvals/{approval_id}/decision"
    approve = {"decision": "approve"}

    no_right = await api.post(path, json=approve, headers=tenant.auth("requester"))
    assert no_right.status_code == 403
    bad_edit = await api.post(
        path, json={"decision": "approve", "edits": {"model": "x"}}, headers=tenant.auth("approver")
    )
    assert bad_edit.status_code == 422
    assert "not editable" in bad_edit.json()["detail"]
    forged_state = await api.post(
        path, json={**approve, "status": "approved"}, headers=tenant.auth("approver")
    )
    assert forged_state.status_code == 422
    history_before = len(
        (await client.get_workflow_handle(workflow_id(tenant.id, run_id)).fetch_history()).events
    )

    ok = await api.post(path, json=approve, headers=tenant.auth("approver"))
    assert ok.status_code == 200
    twice = await api.post(path, json=approve, headers=tenant.auth("finance"))
    assert twice.status_code == 409
    done = await wait_json(
        api, f"/v1/runs/{run_id}", tenant.auth("requester"), lambda b: b["status"] == "completed"
    )
    assert len(done["approvals"][0]["proposal"]) == 1
    history_after = (
        await client.get_workflow_handle(workflow_id(tenant.id, run_id)).fetch_history()
    ).events
    # Refused decisions left no trace: exactly one accepted update in the history.
    accepted = [
        e
        for e in history_after
        if e.HasField("workflow_execution_update_accepted_event_attributes")
    ]
    assert len(accepted) == 1
    assert len(history_after) > history_before


async def test_cannot_approve_own_request(
    api: httpx.AsyncClient, make_tenant: TenantFactory
) -> None:
    tenant = await make_tenant(
        {"both": ["requester", "approver"], "approver": ["approver"], "requester": ["requester"]}
    )
    run_id = await start(api, tenant, user="both")
    approval_id = await approval_of(api, tenant, run_id)
    own = await api.post(
        f"/v1/approvals/{approval_id}/decision",
        json={"decision": "approve"},
        headers=tenant.auth("both"),
    )
    assert own.status_code == 403
    assert "own request" in own.json()["detail"]
    inbox = (await api.get("/v1/approvals", headers=tenant.auth("both"))).json()
    assert all(a["approval_id"] != approval_id for a in inbox["items"])


async def test_other_tenants_approval_is_404(
    api: httpx.AsyncClient, tenant: Tenant, make_tenant: TenantFactory
) -> None:
    run_id = await start(api, tenant)
    approval_id = await approval_of(api, tenant, run_id)
    other = await make_tenant()
    for response in (
        await api.get(f"/v1/approvals/{approval_id}", headers=other.auth("admin")),
        await api.post(
            f"/v1/approvals/{approval_id}/decision",
            json={"decision": "approve"},
            headers=other.auth("admin"),
        ),
    ):
        assert response.status_code == 404


async def test_cancel(api: httpx.AsyncClient, tenant: Tenant, client: Client) -> None:
    run_id = await start(api, tenant)
    approval_id = await approval_of(api, tenant, run_id)
    not_owner = await api.post(f"/v1/runs/{run_id}/cancel", headers=tenant.auth("approver"))
    assert not_owner.status_code == 403
    cancelled = await api.post(f"/v1/runs/{run_id}/cancel", headers=tenant.auth("requester"))
    assert cancelled.status_code == 202
    run = await wait_json(
        api, f"/v1/runs/{run_id}", tenant.auth("requester"), lambda b: b["status"] == "cancelled"
    )
    assert run["stage"] == "cancelled"
    assert run["approvals"][0]["status"] == "cancelled"
    late = await api.post(
        f"/v1/approvals/{approval_id}/decision",
        json={"decision": "approve"},
        headers=tenant.auth("approver"),
    )
    assert late.status_code == 409
    again = await api.post(f"/v1/runs/{run_id}/cancel", headers=tenant.auth("requester"))
    assert again.status_code == 409
    await record_history(
        client.get_workflow_handle(workflow_id(tenant.id, run_id)), "summarize_cancelled"
    )


async def test_list_filters_and_pages(
    api: httpx.AsyncClient, tenant: Tenant, make_tenant: TenantFactory
) -> None:
    runs = [await start(api, tenant) for _ in range(3)]
    done = await start(api, tenant, input={"text": "x", "review": False})
    await wait_json(
        api,
        "/v1/runs?stage=review",
        tenant.auth("requester"),
        lambda b: {r["run_id"] for r in b["items"]} == set(runs),
    )
    completed = await wait_json(
        api, "/v1/runs?status=completed", tenant.auth("requester"), lambda b: len(b["items"]) == 1
    )
    assert completed["items"][0]["run_id"] == done
    seen: list[str] = []
    cursors: list[str] = []
    cursor = None
    while True:
        params = {"limit": "1", "pipeline": "summarize", **({"cursor": cursor} if cursor else {})}
        page = (await api.get("/v1/runs", params=params, headers=tenant.auth("requester"))).json()
        seen += [r["run_id"] for r in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
        cursors.append(cursor)
    assert sorted(seen) == sorted([*runs, done])

    # A cursor pages the query it came from, for the tenant it came from; anything else is the
    # caller's error (before the MAC, a forged token reached Temporal and came back a 500).
    token = base64.urlsafe_b64decode(cursors[0])[16:]
    old_style = hashlib.sha256(b"stead-runs-cursor\0" + token).digest()[:8] + token
    forged = [base64.urlsafe_b64encode(raw).decode() for raw in (old_style, bytes(16) + token)]
    other = await make_tenant()
    for params, headers in (
        ({"cursor": cursors[0], "stage": "review"}, tenant.auth("requester")),
        ({"cursor": cursors[0], "pipeline": "summarize"}, other.auth("requester")),
        ({"cursor": forged[0]}, tenant.auth("requester")),
        ({"cursor": forged[1]}, tenant.auth("requester")),
    ):
        refused = await api.get("/v1/runs", params=params, headers=headers)
        assert refused.status_code == 422, refused.text
        assert "cursor" in refused.json()["detail"]
    bad = await api.get("/v1/runs?stage=nowhere", headers=tenant.auth("requester"))
    assert bad.status_code == 422


async def test_healthz(api: httpx.AsyncClient) -> None:
    response = await api.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "temporal": "ok", "postgres": "ok"}
