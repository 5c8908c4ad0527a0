"""Request limits: per key and per tenant, per plan, held in PostgreSQL across API processes.

The store-level tests pin the algorithm with a fixed clock (`now=`); the HTTP tests run the
real routes against tight policies of their own, so they neither wait for buckets to refill
nor depend on the shipped numbers (intervals of 100 s: nothing refills during a test).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from temporalio.client import Client

from stead.api.app import create_app
from stead.config import Settings
from stead.policy.limits import LimitPolicy, load_limits
from stead.service.runs import workflow_id
from stead.store import ratelimits
from stead.store.db import Pool, create_pool
from tests.conftest import Tenant, TenantFactory, make_services
from tests.helpers import wait_json
from tests.servers import serve_app

SUMMARIZE = {"pipeline": "summarize", "input": {"text": "Alpha beta gamma. Delta epsilon."}}
SLOW = 0.01  # per second: a bucket that does not refill while a test runs
USERS = {
    "requester": ["requester"],
    "requester2": ["requester"],
    "approver": ["approver"],
    "finance": ["approver", "finance"],
    "admin": ["admin"],
}

ApiFactory = Callable[[LimitPolicy], httpx.AsyncClient]


def policy(default: dict[str, Any], **plans: dict[str, Any]) -> LimitPolicy:
    return LimitPolicy.model_validate({"plans": {"default": default, **plans}})


def bucket(burst: int, per_second: float = SLOW) -> dict[str, float]:
    return {"burst": burst, "per_second": per_second}


@pytest.fixture
async def api_with(
    client: Client, test_settings: Settings, pool: Pool
) -> AsyncIterator[ApiFactory]:
    """An API client whose app enforces the given limits."""
    opened: list[httpx.AsyncClient] = []

    def make(limits: LimitPolicy) -> httpx.AsyncClient:
        services = make_services(test_settings, client, pool, limits)
        transport = httpx.ASGITransport(app=create_app(test_settings, services))
        http = httpx.AsyncClient(transport=transport, base_url="http://stead.test", timeout=60)
        opened.append(http)
        return http

    yield make
    for http in opened:
        await http.aclose()


@pytest.fixture
async def team(make_tenant: TenantFactory) -> Tenant:
    return await make_tenant(USERS)


def key_id(tenant: Tenant, user: str) -> str:
    return tenant.keys[user].split("_")[1]


# --- the algorithm, on a fixed clock ------------------------------------------------------


T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


async def admit(
    pool: Pool, tenant: Tenant, limits: LimitPolicy, key: str, at: float
) -> ratelimits.Verdict:
    async with pool.acquire() as conn:
        return await ratelimits.admit(
            conn,
            tenant.id,
            "admin.write",
            key,
            limits.for_store("admin.write"),
            now=T0 + timedelta(seconds=at),
        )


async def test_a_burst_then_the_rate(pool: Pool, tenant: Tenant) -> None:
    limits = policy({"admin.write": {"per_key": bucket(3, per_second=2)}})
    first = [await admit(pool, tenant, limits, "k", at=0) for _ in range(4)]
    assert [v.admitted for v in first] == [True, True, True, False]
    assert first[3].refused_by == "key"
    assert first[3].retry_after == pytest.approx(0.5, abs=1e-5)
    assert not (await admit(pool, tenant, limits, "k", at=0.49)).admitted
    assert (await admit(pool, tenant, limits, "k", at=0.5)).admitted
    assert not (await admit(pool, tenant, limits, "k", at=0.5)).admitted
    # Idle for long: the bucket is full again, never fuller than its burst.
    later = [(await admit(pool, tenant, limits, "k", at=60)).admitted for _ in range(4)]
    assert later == [True, True, True, False]


async def test_a_refusal_charges_no_bucket(pool: Pool, tenant: Tenant) -> None:
    limits = policy(
        {"admin.write": {"per_key": bucket(2, per_second=0.1), "per_tenant": bucket(2, 1)}}
    )
    assert (await admit(pool, tenant, limits, "a", at=0)).admitted
    assert (await admit(pool, tenant, limits, "a", at=0)).admitted
    # The tenant's bucket is empty: key b is refused, five times, by the tenant's bucket.
    refused = [await admit(pool, tenant, limits, "b", at=0) for _ in range(5)]
    assert {(v.admitted, v.refused_by) for v in refused} == {(False, "tenant")}
    # Had those refusals been charged to key b, its burst of 2 would be spent by now.
    assert (await admit(pool, tenant, limits, "b", at=2)).admitted
    assert (await admit(pool, tenant, limits, "b", at=2)).admitted
    # Key a, refused by its own bucket, spends none of the tenant's: key c still gets in.
    assert not (await admit(pool, tenant, limits, "a", at=4)).admitted
    assert not (await admit(pool, tenant, limits, "a", at=4)).admitted
    assert (await admit(pool, tenant, limits, "c", at=4)).admitted


async def test_the_shipped_defaults_cut_one_keys_burst(pool: Pool, tenant: Tenant) -> None:
    """The report's case: one key, 150 starts at once. Concurrent, on one clock reading, the
    default plan admits exactly its burst."""
    shipped = load_limits()
    rate = shipped.plan("standard").runs_start.per_key
    assert rate is not None

    async def start() -> ratelimits.Verdict:
        async with pool.acquire() as conn:
            verdict, _ = await ratelimits.admit_start(
                conn, tenant.id, "summarize", "k", shipped.for_store("runs.start"), now=T0
            )
        return verdict

    verdicts = await asyncio.gather(*(start() for _ in range(150)))
    assert sum(v.admitted for v in verdicts) == rate.burst
    assert {v.refused_by for v in verdicts if not v.admitted} == {"key"}


# --- run starts over HTTP -----------------------------------------------------------------


async def test_starts_over_the_key_limit_are_429(api_with: ApiFactory, team: Tenant) -> None:
    api = api_with(policy({"runs.start": {"per_key": bucket(3)}}))
    answers = [
        await api.post("/v1/runs", json=SUMMARIZE, headers=team.auth("requester")) for _ in range(5)
    ]
    assert [r.status_code for r in answers] == [201, 201, 201, 429, 429]
    refused = answers[3]
    assert refused.json()["code"] == "rate_limited"
    assert "this API key" in refused.json()["detail"]
    assert 1 <= int(refused.headers["retry-after"]) <= 100
    # Per key: the tenant's other key has its own allowance.
    other = await api.post("/v1/runs", json=SUMMARIZE, headers=team.auth("requester2"))
    assert other.status_code == 201


async def test_two_api_processes_share_one_allowance(
    client: Client, test_settings: Settings, app_database_url: str, team: Tenant
) -> None:
    """Two API apps, each with its own connection pool and HTTP server, share the database
    only. 60 concurrent starts from two keys, spread over both: no more are admitted than the
    key's burst for either key, nor than the tenant's for both."""
    limits = policy({"runs.start": {"per_key": bucket(8), "per_tenant": bucket(12)}})
    pools = [await create_pool(app_database_url, app_role="stead_app", max_size=10) for _ in "ab"]
    try:
        apps = [
            create_app(
                test_settings,
                make_services(test_settings, client, p, limits),
            )
            for p in pools
        ]
        async with serve_app(apps[0]) as url_a, serve_app(apps[1]) as url_b:
            http_limits = httpx.Limits(max_connections=60)
            async with httpx.AsyncClient(limits=http_limits, timeout=60) as http:
                requests = [
                    (url, user)
                    for _ in range(15)
                    for url in (url_a, url_b)
                    for user in ("requester", "requester2")
                ]
                answers = await asyncio.gather(
                    *(
                        http.post(f"{url}/v1/runs", json=SUMMARIZE, headers=team.auth(user))
                        for url, user in requests
                    )
                )
    finally:
        for p in pools:
            await p.close()
    admitted = Counter(
        user for (_, user), r in zip(requests, answers, strict=True) if r.status_code == 201
    )
    statuses = Counter(r.status_code for r in answers)
    assert set(statuses) == {201, 429}, statuses
    assert sum(admitted.values()) == 12, admitted
    assert max(admitted.values()) <= 8, admitted
    run_ids = {r.json()["run_id"] for r in answers if r.status_code == 201}
    for run_id in run_ids:  # every 201 is a run Temporal knows
        await client.get_workflow_handle(workflow_id(team.id, run_id)).describe()


async def test_limits_follow_the_tenants_plan(
    api_with: ApiFactory, make_tenant: TenantFactory, pool: Pool
) -> None:
    api = api_with(
        policy(
            {"runs.start": {"per_key": bucket(1)}},
            enterprise={"runs.start": {"per_key": bucket(3)}},
        )
    )

    async def starts(tenant: Tenant, count: int) -> list[int]:
        return [
            (
                await api.post("/v1/runs", json=SUMMARIZE, headers=tenant.auth("requester"))
            ).status_code
            for _ in range(count)
        ]

    standard, enterprise = await make_tenant(), await make_tenant(plan="enterprise")
    assert await starts(standard, 2) == [201, 429]
    assert await starts(enterprise, 4) == [201, 201, 201, 429]
    # A new plan applies from the next request: it is read with the bucket, not cached.
    async with pool.acquire() as conn:
        await conn.execute("UPDATE tenants SET plan = 'enterprise' WHERE id = $1", standard.id)
    assert await starts(standard, 3) == [201, 201, 429]


async def test_a_restart_is_a_start(api_with: ApiFactory, team: Tenant, client: Client) -> None:
    api = api_with(policy({"runs.start": {"per_key": bucket(1)}}))
    started = await api.post("/v1/runs", json=SUMMARIZE, headers=team.auth("requester"))
    assert started.status_code == 201
    run_id = started.json()["run_id"]
    await client.get_workflow_handle(workflow_id(team.id, run_id)).terminate("test")
    restart = await api.post(
        f"/v1/runs/{run_id}/retry", json={"mode": "restart"}, headers=team.auth("requester")
    )
    assert restart.status_code == 429, restart.text
    assert restart.json()["code"] == "rate_limited"


async def test_document_uploads_start_runs_and_count(api_with: ApiFactory, team: Tenant) -> None:
    api = api_with(policy({"runs.start": {"per_key": bucket(1)}}))
    document = {"title": "Handbook", "text": "Chapter one."}
    first = await api.post("/v1/documents", json=document, headers=team.auth("requester"))
    second = await api.post("/v1/documents", json=document, headers=team.auth("requester"))
    assert (first.status_code, second.status_code) == (201, 429)
    listed = await api.get("/v1/documents", headers=team.auth("requester"))
    assert len(listed.json()["items"]) == 1  # the refused upload stored nothing


# --- the cap on runs waiting for approval -------------------------------------------------


async def pending_approval(api: httpx.AsyncClient, tenant: Tenant, run_id: str) -> str:
    run = await wait_json(
        api, f"/v1/runs/{run_id}", tenant.auth("requester"), lambda b: bool(b["pending_approvals"])
    )
    approval_id = str(run["pending_approvals"][0]["approval_id"])
    await wait_json(  # the inbox projection, which the cap counts
        api,
        f"/v1/approvals/{approval_id}",
        tenant.auth("approver"),
        lambda b: b["status"] == "pending",
    )
    return approval_id


@pytest.mark.usefixtures("worker")
async def test_runs_waiting_for_approval_are_capped(api_with: ApiFactory, team: Tenant) -> None:
    api = api_with(policy({"runs.start": {"max_runs_awaiting_approval": 2}}))
    waiting = []
    for _ in range(2):
        started = await api.post("/v1/runs", json=SUMMARIZE, headers=team.auth("requester"))
        assert started.status_code == 201, started.text
        waiting.append(await pending_approval(api, team, started.json()["run_id"]))

    refused = await api.post("/v1/runs", json=SUMMARIZE, headers=team.auth("requester2"))
    assert refused.status_code == 409, refused.text
    assert refused.json()["code"] == "approval_backlog"
    assert "retry-after" not in refused.headers
    # Ingestion never waits for a person: uploads go on.
    upload = {"title": "Notes", "text": "Some notes."}
    assert (await api.post("/v1/documents", json=upload, headers=team.auth("requester"))).is_success

    decided = await api.post(
        f"/v1/approvals/{waiting[0]}/decision",
        json={"decision": "approve"},
        headers=team.auth("approver"),
    )
    assert decided.status_code == 200, decided.text
    again = await api.post("/v1/runs", json=SUMMARIZE, headers=team.auth("requester2"))
    assert again.status_code == 201, again.text


# --- decisions and admin writes -----------------------------------------------------------


@pytest.mark.usefixtures("worker")
async def test_decisions_are_limited_per_key_and_per_tenant(
    api_with: ApiFactory, team: Tenant
) -> None:
    api = api_with(policy({"approvals.decide": {"per_key": bucket(1), "per_tenant": bucket(2)}}))
    approvals = []
    for _ in range(3):
        started = await api.post("/v1/runs", json=SUMMARIZE, headers=team.auth("requester"))
        approvals.append(await pending_approval(api, team, started.json()["run_id"]))

    def decide(approval_id: str, user: str) -> Any:
        return api.post(
            f"/v1/approvals/{approval_id}/decision",
            json={"decision": "approve"},
            headers=team.auth(user),
        )

    # Refused for want of the right: 403, and nobody's allowance is spent by it.
    assert [(await decide(approvals[0], "requester")).status_code for _ in range(3)] == [403] * 3
    assert (await decide(approvals[0], "approver")).status_code == 200
    by_key = await decide(approvals[1], "approver")
    assert by_key.status_code == 429
    assert "this API key" in by_key.json()["detail"]
    assert (await decide(approvals[1], "finance")).status_code == 200
    by_tenant = await decide(approvals[2], "admin")
    assert by_tenant.status_code == 429
    assert "this tenant" in by_tenant.json()["detail"]
    assert int(by_tenant.headers["retry-after"]) >= 1


async def test_admin_writes_are_limited_and_reads_are_not(
    api_with: ApiFactory, team: Tenant
) -> None:
    api = api_with(policy({"admin.write": {"per_key": bucket(2)}}))

    def create_user(user: str) -> Any:
        body = {"id": f"u-{uuid.uuid4().hex[:8]}", "roles": ["requester"]}
        return api.post("/v1/admin/users", json=body, headers=team.auth(user))

    assert [(await create_user("requester")).status_code for _ in range(3)] == [403] * 3
    assert [(await create_user("admin")).status_code for _ in range(3)] == [201, 201, 429]
    # Every admin write draws on the same bucket, the redaction fields' included.
    redaction = await api.put(
        "/v1/admin/redaction", json={"drop": [], "mask": ["notes"]}, headers=team.auth("admin")
    )
    assert redaction.status_code == 429
    assert (await api.get("/v1/admin/users", headers=team.auth("admin"))).status_code == 200


def test_the_429_is_in_the_openapi_schema() -> None:
    paths = create_app().openapi()["paths"]
    limited = [
        ("post", "/v1/runs"),
        ("post", "/v1/runs/{run_id}/retry"),
        ("post", "/v1/documents"),
        ("post", "/v1/approvals/{approval_id}/decision"),
        ("post", "/v1/admin/users"),
        ("put", "/v1/admin/budgets"),
        ("put", "/v1/admin/redaction"),
    ]
    for method, path in limited:
        declared = paths[path][method]["responses"]["429"]
        assert "Retry-After" in declared["headers"], (method, path)
    assert "429" not in paths["/v1/runs"]["get"]["responses"]
    assert "429" not in paths["/v1/approvals"]["get"]["responses"]
