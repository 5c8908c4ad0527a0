"""The tenant admin API: users, keys, grants, budgets, approval policies."""

from __future__ import annotations

import httpx
import pytest
from temporalio.client import Client
from temporalio.service import RetryConfig
from temporalio.testing import WorkflowEnvironment

from stead.api.app import create_app
from stead.config import Settings
from stead.store.db import Pool, create_pool
from stead.temporal import data_converter
from tests.conftest import TEMPORAL, Tenant, make_services
from tests.helpers import free_ports, wait_json


async def test_users_and_keys(api: httpx.AsyncClient, tenant: Tenant) -> None:
    admin = tenant.auth("admin")
    created = await api.post(
        "/v1/admin/users", json={"id": "carol", "roles": ["requester"]}, headers=admin
    )
    assert created.status_code == 201, created.text
    again = await api.post("/v1/admin/users", json={"id": "carol"}, headers=admin)
    assert again.status_code == 409
    unknown = await api.post(
        "/v1/admin/users", json={"id": "dave", "roles": ["wizard"]}, headers=admin
    )
    assert unknown.status_code == 422
    assert "wizard" in unknown.json()["detail"]

    key = await api.post("/v1/admin/users/carol/keys", json={"label": "laptop"}, headers=admin)
    assert key.status_code == 201
    carol = {"Authorization": f"Bearer {key.json()['key']}"}
    assert (await api.get("/v1/runs", headers=carol)).status_code == 200
    listed = (await api.get("/v1/admin/users", headers=admin)).json()
    carol_row = next(u for u in listed if u["id"] == "carol")
    assert carol_row["keys"] == [key.json()["key_id"]]
    assert key.json()["key"] not in str(listed)  # shown once, never again

    demoted = await api.put(
        "/v1/admin/users/carol/roles", json={"roles": ["approver"]}, headers=admin
    )
    assert demoted.json()["roles"] == ["approver"]
    assert (await api.post("/v1/runs", json={}, headers=carol)).status_code in (403, 422)

    revoked = await api.delete(f"/v1/admin/keys/{key.json()['key_id']}", headers=admin)
    assert revoked.status_code == 204
    assert (await api.get("/v1/runs", headers=carol)).status_code == 401


async def test_an_admin_cannot_lock_themselves_out(api: httpx.AsyncClient, tenant: Tenant) -> None:
    admin = tenant.auth("admin")
    demote = await api.put(
        "/v1/admin/users/admin/roles", json={"roles": ["requester"]}, headers=admin
    )
    assert demote.status_code == 409
    disable = await api.delete("/v1/admin/users/admin", headers=admin)
    assert disable.status_code == 409
    assert (await api.get("/v1/admin/users", headers=admin)).status_code == 200


async def test_grants_overrides(api: httpx.AsyncClient, tenant: Tenant) -> None:
    admin = tenant.auth("admin")
    gate = await api.post(
        "/v1/admin/grants",
        json={
            "subject_kind": "agent",
            "subject": "support-agent",
            "effect": "approve",
            "action": "execute",
            "resource": "email",
        },
        headers=admin,
    )
    assert gate.status_code == 422  # an approve gate names who approves
    added = await api.post(
        "/v1/admin/grants",
        json={
            "subject_kind": "role",
            "subject": "requester",
            "effect": "deny",
            "action": "read",
            "resource": "customer",
        },
        headers=admin,
    )
    assert added.status_code == 201, added.text
    grant_id = added.json()["id"]
    assert [g["id"] for g in (await api.get("/v1/admin/grants", headers=admin)).json()] == [
        grant_id
    ]
    assert (await api.delete(f"/v1/admin/grants/{grant_id}", headers=admin)).status_code == 204
    assert (await api.get("/v1/admin/grants", headers=admin)).json() == []


async def test_budgets(api: httpx.AsyncClient, tenant: Tenant) -> None:
    admin = tenant.auth("admin")
    bad = await api.put(
        "/v1/admin/budgets", json={"scope": "user", "period": "day", "limit_usd": 5}, headers=admin
    )
    assert bad.status_code == 422
    set_ = await api.put(
        "/v1/admin/budgets",
        json={"scope": "customer", "period": "month", "limit_usd": 12.5},
        headers=admin,
    )
    assert set_.status_code == 200
    assert set_.json() == [
        {
            "scope": "customer",
            "subject": "",
            "period": "month",
            "limit_usd": 12.5,
            "spent_usd": 0.0,
            "reserved_usd": 0.0,
        }
    ]


@pytest.mark.usefixtures("worker")
async def test_approval_policy_override_applies_to_new_runs(
    api: httpx.AsyncClient, tenant: Tenant
) -> None:
    admin = tenant.auth("admin")
    policy = await api.put(
        "/v1/admin/approval-policies/summarize/review",
        json={"roles": ["finance"], "quorum": 1, "timeout_seconds": 600},
        headers=admin,
    )
    assert policy.status_code == 200, policy.text
    started = await api.post(
        "/v1/runs",
        json={"pipeline": "summarize", "input": {"text": "Policy applies."}},
        headers=tenant.auth("requester"),
    )
    run = await wait_json(
        api,
        f"/v1/runs/{started.json()['run_id']}",
        tenant.auth("requester"),
        lambda b: bool(b["pending_approvals"]),
    )
    assert run["pending_approvals"][0]["eligible_roles"] == ["finance"]
    unknown = await api.put(
        "/v1/admin/approval-policies/nope/review", json={"roles": ["admin"]}, headers=admin
    )
    assert unknown.status_code == 422


async def test_temporal_unreachable_is_503(settings: Settings, pool: Pool, tenant: Tenant) -> None:
    """Temporal down is a retryable 503, never a 500: a connected client, then the server
    goes away."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(TEMPORAL), data_converter=data_converter(settings)
    )
    target = env.client.service_client.config.target_host
    down = await Client.connect(
        target, data_converter=data_converter(settings), retry_config=RetryConfig(max_retries=1)
    )
    await env.shutdown()
    services = make_services(settings, down, pool)
    transport = httpx.ASGITransport(app=create_app(settings, services))
    async with httpx.AsyncClient(transport=transport, base_url="http://stead.test") as http:
        response = await http.post(
            "/v1/runs",
            json={"pipeline": "summarize", "input": {"text": "x"}},
            headers=tenant.auth("requester"),
            timeout=60,
        )
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "5"


async def test_postgres_unreachable_is_503(settings: Settings, client: Client) -> None:
    """PostgreSQL down (refusing connections) is a retryable 503 too: the request committed
    nothing, so sending it again is safe."""
    [port] = free_ports(1)  # nothing listens on it
    down = await create_pool(f"postgresql://stead@127.0.0.1:{port}/stead", min_size=0)
    try:
        services = make_services(settings, client, down)
        transport = httpx.ASGITransport(app=create_app(settings, services))
        async with httpx.AsyncClient(transport=transport, base_url="http://stead.test") as http:
            response = await http.get(
                "/v1/runs", headers={"Authorization": "Bearer stead_x"}, timeout=60
            )
    finally:
        await down.close()
    assert response.status_code == 503, response.text
    assert response.json() == {
        "detail": "PostgreSQL did not answer; retry shortly",
        "code": "unavailable",
    }
    assert response.headers["retry-after"] == "5"
