"""The model gateway on the real SDK, simulator and PostgreSQL: cache, memo, fallbacks,
retry-after, non-retryable refusals, budgets (exact under concurrency), usage."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.model import ModelActivities
from activities.types import ModelCall, ModelReply
from policies.models import TokenCounts, load_prices, load_routing
from stead import metrics
from stead.config import Settings
from store import budgets
from store.audit import audit_writer
from store.db import Pool
from tests.conftest import SimControl, Tenant
from worker import model_client
from workflows.state import RunContext

DRAFT = load_routing().route("draft", "standard").models  # (primary, fallback)


@pytest.fixture
async def gateway(pool: Pool, settings: Settings) -> AsyncIterator[ModelActivities]:
    client = model_client(settings)
    yield ModelActivities(
        pool, client, load_prices(), load_routing(), audit_writer(settings), heartbeat_every=0.2
    )
    await client.close()


def call_for(tenant: Tenant, text: str = "Summarize: the sky is blue.", **fields: Any) -> ModelCall:
    run_id = f"r_{uuid.uuid4().hex[:12]}"
    context = RunContext(
        tenant=tenant.id,
        run_id=run_id,
        pipeline="summarize",
        requested_by="requester",
        budget_usd=fields.pop("budget_usd", None),
    )
    return ModelCall(
        context=context,
        step="summarize",
        call_key=f"{tenant.id}:{run_id}:model:1",
        task="draft",
        messages=[{"role": "user", "content": text}],
        max_tokens=200,
        **fields,
    )


async def run(gateway: ModelActivities, call: ModelCall, attempt: int = 1) -> ModelReply:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, attempt=attempt)
    return await env.run(gateway.call_model, call)


async def refused(gateway: ModelActivities, call: ModelCall) -> ApplicationError:
    with pytest.raises(ApplicationError) as caught:
        await run(gateway, call)
    return caught.value


async def test_cache_is_per_tenant_and_free(
    gateway: ModelActivities, tenant: Tenant, make_tenant: Any, sim: SimControl
) -> None:
    before = (await sim.stats())["requests_total"]
    first = await run(gateway, call_for(tenant))
    again = await run(gateway, call_for(tenant))  # another run, same request
    assert (first.cache_hit, again.cache_hit) == (False, True)
    assert again.content == first.content
    assert again.usage.cost_nusd == 0
    assert first.usage.cost_nusd > 0
    assert (await sim.stats())["requests_total"] == before + 1

    other = await make_tenant()
    theirs = await run(gateway, call_for(other))
    assert theirs.cache_hit is False  # never shared across tenants
    opted_out = await run(gateway, call_for(tenant, cache=False))
    assert opted_out.cache_hit is False


async def test_expired_cache_entry_is_a_miss(
    gateway: ModelActivities, tenant: Tenant, pool: Pool
) -> None:
    await run(gateway, call_for(tenant))
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE response_cache SET expires_at = now() - interval '1 second'"
            " WHERE tenant_id = $1",
            tenant.id,
        )
    assert (await run(gateway, call_for(tenant))).cache_hit is False


async def test_a_retried_attempt_returns_the_finished_reply(
    gateway: ModelActivities, tenant: Tenant, pool: Pool, sim: SimControl
) -> None:
    call = call_for(tenant, cache=False)
    first = await run(gateway, call, attempt=1)
    before = (await sim.stats())["requests_total"]
    retried = await run(gateway, call, attempt=2)  # e.g. the worker died before reporting
    assert retried == first
    assert (await sim.stats())["requests_total"] == before
    async with pool.acquire() as conn:
        charges = await conn.fetchval(
            "SELECT count(*) FROM model_usage WHERE call_key = $1", call.call_key
        )
    assert charges == 1


async def test_overloaded_primary_falls_back(
    gateway: ModelActivities, tenant: Tenant, sim: SimControl, pool: Pool
) -> None:
    counted = metrics.MODEL_FALLBACKS.labels(DRAFT[0], DRAFT[1])._value.get()
    await sim.fault(529, model=DRAFT[0])
    reply = await run(gateway, call_for(tenant, cache=False))
    assert reply.model == DRAFT[1]
    assert reply.fallbacks == 1
    assert reply.usage.fallbacks == 1
    assert metrics.MODEL_FALLBACKS.labels(DRAFT[0], DRAFT[1])._value.get() == counted + 1
    async with pool.acquire() as conn:
        recorded = await conn.fetchval(
            "SELECT fallbacks FROM model_usage WHERE tenant_id = $1", tenant.id
        )
    assert recorded == 1


async def test_retry_after_becomes_the_next_retry_delay(
    gateway: ModelActivities, tenant: Tenant, sim: SimControl
) -> None:
    await sim.fault(429, count=2, retry_after=7)
    error = await refused(gateway, call_for(tenant, cache=False))
    assert error.type == "ProviderUnavailable"
    assert error.non_retryable is False
    assert error.next_retry_delay == timedelta(seconds=7)


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "BadRequest"),
        (401, "AuthenticationFailed"),
        (403, "AuthenticationFailed"),
        (404, "BadRequest"),
        (413, "BadRequest"),
        (422, "BadRequest"),
    ],
)
async def test_refusals_are_not_retried_or_rerouted(
    gateway: ModelActivities, tenant: Tenant, sim: SimControl, status: int, kind: str
) -> None:
    await sim.fault(status, count=2)
    before = (await sim.stats())["requests"]
    error = await refused(gateway, call_for(tenant, cache=False))
    assert (error.type, error.non_retryable) == (kind, True)
    after = (await sim.stats())["requests"]
    assert after.get(DRAFT[1], 0) == before.get(DRAFT[1], 0)  # no fallback either
    await sim.http.delete("/_sim/faults")


async def test_budget_refuses_before_the_call_and_settles_after(
    gateway: ModelActivities, tenant: Tenant, pool: Pool, sim: SimControl
) -> None:
    async with pool.acquire() as conn:
        await budgets.set_budget(conn, tenant.id, "customer", "", "day", 1.0)
    reply = await run(gateway, call_for(tenant, cache=False))
    async with pool.acquire() as conn:
        counter = await conn.fetchrow(
            "SELECT spent_nusd, reserved_nusd FROM budget_counters WHERE tenant_id = $1", tenant.id
        )
        await budgets.set_budget(conn, tenant.id, "customer", "", "day", 0.000001)
    assert counter is not None
    assert (counter["spent_nusd"], counter["reserved_nusd"]) == (reply.usage.cost_nusd, 0)

    before = (await sim.stats())["requests_total"]
    error = await refused(gateway, call_for(tenant, text="another question", cache=False))
    assert (error.type, error.non_retryable) == ("BudgetExhausted", True)
    assert (await sim.stats())["requests_total"] == before  # refused before any provider call
    async with pool.acquire() as conn:
        rejected = await conn.fetchval(
            "SELECT count(*) FROM audit_log WHERE tenant_id = $1 AND action = 'budget.rejected'",
            tenant.id,
        )
    assert rejected == 1


async def test_fifty_concurrent_calls_never_overspend(
    gateway: ModelActivities, tenant: Tenant, make_tenant: Any, pool: Pool
) -> None:
    """Spend may pass a limit by at most one in-flight reservation; with worst-case
    reservations it does not pass it at all."""
    probe = await run(gateway, call_for(await make_tenant(), text="probe", cache=False))
    worst = load_prices().worst_case_nusd(probe.model, probe.usage.input_tokens + 8, 200)
    limit_usd = worst * 10.5 / 1e9  # room for about ten calls' reservations
    async with pool.acquire() as conn:
        await budgets.set_budget(conn, tenant.id, "customer", "", "day", limit_usd)

    async def attempt(i: int) -> str:
        try:
            await run(gateway, call_for(tenant, text=f"probe {i:03d}", cache=False))
        except ApplicationError as exc:
            return str(exc.type)
        return "ok"

    results = await asyncio.gather(*(attempt(i) for i in range(50)))
    async with pool.acquire() as conn:
        counter = await conn.fetchrow(
            "SELECT spent_nusd, reserved_nusd, limit_nusd FROM budget_counters"
            " WHERE tenant_id = $1",
            tenant.id,
        )
    assert set(results) == {"ok", "BudgetExhausted"}
    assert counter is not None
    assert counter["reserved_nusd"] == 0
    assert counter["spent_nusd"] <= counter["limit_nusd"]


async def test_budget_periods_reset_at_the_boundary(tenant: Tenant, pool: Pool) -> None:
    context = RunContext(
        tenant=tenant.id, run_id="r_x", pipeline="summarize", requested_by="requester"
    )
    day1 = datetime(2026, 11, 27, 23, 59, tzinfo=UTC)
    async with pool.acquire() as conn:
        await budgets.set_budget(conn, tenant.id, "user", "requester", "day", 0.000010)
        await budgets.reserve(conn, context, "k1", 1, 10_000, now=day1)
        with pytest.raises(budgets.BudgetExhausted):
            await budgets.reserve(conn, context, "k2", 1, 1, now=day1)
        await budgets.reserve(conn, context, "k3", 1, 10_000, now=day1 + timedelta(minutes=2))
        # Reserving the same attempt twice is one reservation.
        await budgets.reserve(conn, context, "k3", 1, 10_000, now=day1 + timedelta(minutes=2))
        reserved = await conn.fetchval(
            "SELECT sum(reserved_nusd) FROM budget_counters WHERE tenant_id = $1", tenant.id
        )
    assert reserved == 20_000


def test_prices_are_exact_and_banded() -> None:
    prices = load_prices()
    sonnet = TokenCounts(input_tokens=1000, output_tokens=500, cache_read_tokens=2000)
    # $2/M in, $10/M out, $0.10/M cache read, in nano-USD.
    assert prices.cost_nusd("claude-sonnet-5-5", sonnet) == 2000 * 1000 + 10_000 * 500 + 100 * 2000
    short = TokenCounts(input_tokens=100_000, output_tokens=10)
    long = TokenCounts(input_tokens=100_001, output_tokens=10)
    assert prices.cost_nusd("claude-haiku-5-5", short) == 100 * 100_000 + 500 * 10
    assert prices.cost_nusd("claude-haiku-5-5", long) == 500 * 100_001 + 2500 * 10
    unknown = prices.cost_nusd("claude-unknown", sonnet)
    assert unknown == prices.cost_nusd(prices.unknown_model_rates, sonnet)  # never free
    assert Decimal(prices.cost_nusd("claude-opus-5-5", TokenCounts(output_tokens=1))) == 20_000


async def test_usage_report_for_admins(
    api: httpx.AsyncClient, gateway: ModelActivities, tenant: Tenant
) -> None:
    replies = [await run(gateway, call_for(tenant, text=f"q{i}", cache=False)) for i in range(3)]
    report = await api.get("/v1/usage?group_by=model", headers=tenant.auth("admin"))
    assert report.status_code == 200
    rows = report.json()["rows"]
    assert sum(r["calls"] for r in rows) == 3
    assert report.json()["total_cost_usd"] == pytest.approx(sum(r.usage.cost_usd for r in replies))
    by_user = (await api.get("/v1/usage?group_by=user", headers=tenant.auth("admin"))).json()
    assert [r["key"] for r in by_user["rows"]] == ["requester"]
    assert (await api.get("/v1/usage", headers=tenant.auth("requester"))).status_code == 403
    assert (
        await api.get("/v1/usage?group_by=colour", headers=tenant.auth("admin"))
    ).status_code == 422
    backwards = "/v1/usage?from=2026-02-01T00:00:00Z&to=2026-01-01T00:00:00Z"
    assert (await api.get(backwards, headers=tenant.auth("admin"))).status_code == 422
