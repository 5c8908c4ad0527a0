"""The model gateway on the real SDK, simulator and PostgreSQL: cache, memo, fallbacks,
retry-after, non-retryable refusals, budgets (exact under concurrency), usage."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from stead import metrics
from stead.calls import ModelCall
from stead.config import Settings
from stead.contract import RunContext
from stead.gateway.model import ModelActivities, input_token_bound
from stead.policy.models import TokenCounts, load_prices, load_routing
from stead.sim.messages import count_tokens
from stead.store import budgets
from stead.store.audit import audit_writer
from stead.store.db import Pool
from stead.store.text import storable
from stead.worker import model_client
from tests.budget_kit import counter, reservation
from tests.conftest import SimControl, Tenant, TenantFactory
from tests.gateway_kit import call_for, gateway_for, refused, run
from tests.helpers import eventually

DRAFT = load_routing().route("draft", "standard").models  # (primary, fallback)


@pytest.fixture
async def gateway(pool: Pool, settings: Settings) -> AsyncIterator[ModelActivities]:
    async with gateway_for(pool, settings) as made:
        yield made


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


async def test_a_calls_cost_its_reply_and_its_audit_entry_are_committed_together(
    gateway: ModelActivities, tenant: Tenant, pool: Pool
) -> None:
    """A worker killed between two commits would leave the cost recorded and the reply not,
    and its retry would buy the reply again (the kill drill charged two calls twice); and one
    commit (one WAL flush) is all the call's record needs. One transaction wrote the rows when
    they carry the same `xmin`."""
    await with_budget(pool, tenant)
    call = call_for(tenant, cache=False)
    await run(gateway, call, attempt=1)
    async with pool.acquire() as conn:
        written = await conn.fetchrow(
            "SELECT u.xmin::text AS usage, m.xmin::text AS memo, r.xmin::text AS settled,"
            " a.xmin::text AS audit"
            " FROM model_usage u JOIN model_calls m USING (call_key)"
            " JOIN budget_reservations r ON r.call_key = u.call_key AND r.attempt = u.attempt"
            " JOIN audit_log a ON a.tenant_id = u.tenant_id AND a.event_key = u.call_key || ':call'"
            " WHERE u.call_key = $1",
            call.call_key,
        )
    assert written is not None
    assert written["usage"] == written["memo"] == written["settled"] == written["audit"]


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
    reservations it does not pass it at all, and calls waiting for room spend it."""
    # A short max_tokens: fifty calls' actual cost is more than the budget.
    small = {"cache": False, "max_tokens": 16}
    probe = await run(gateway, call_for(await make_tenant(), text="probe", **small))
    worst = load_prices().worst_case_nusd(probe.model, probe.usage.input_tokens + 8, 16)
    assert probe.usage.cost_nusd * 2 < worst  # a reservation in flight holds room unused
    limit_usd = worst * 10.5 / 1e9  # room for about ten calls' reservations
    async with pool.acquire() as conn:
        await budgets.set_budget(conn, tenant.id, "customer", "", "day", limit_usd)

    async def attempt(i: int) -> str:
        try:
            await run(gateway, call_for(tenant, text=f"probe {i:03d}", **small))
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
        largest = await conn.fetchval(
            "SELECT max(amount_nusd) FROM budget_reservations WHERE tenant_id = $1", tenant.id
        )
    assert set(results) == {"ok", "BudgetExhausted"}
    assert counter is not None
    assert counter["reserved_nusd"] == 0
    assert counter["spent_nusd"] <= counter["limit_nusd"]
    assert counter["spent_nusd"] + largest > counter["limit_nusd"]  # no room left unspent


async def test_budget_periods_reset_at_the_boundary(tenant: Tenant, pool: Pool) -> None:
    context = RunContext(
        tenant=tenant.id, run_id="r_x", pipeline="summarize", requested_by="requester"
    )
    day1 = datetime(2026, 11, 27, 23, 59, tzinfo=UTC)
    k1, k2, k3 = (f"{tenant.id}:k{i}" for i in (1, 2, 3))
    async with pool.acquire() as conn:
        await budgets.set_budget(conn, tenant.id, "user", "requester", "day", 0.000010)
        await budgets.reserve(conn, context, k1, 1, 10_000, now=day1)
        await budgets.settle(conn, k1, 1, 10_000)
        with pytest.raises(budgets.BudgetExhausted):
            await budgets.reserve(conn, context, k2, 1, 1, now=day1)
        await budgets.reserve(conn, context, k3, 1, 10_000, now=day1 + timedelta(minutes=2))
        # Reserving the same attempt twice is one reservation.
        await budgets.reserve(conn, context, k3, 1, 10_000, now=day1 + timedelta(minutes=2))
        reserved = await conn.fetchval(
            "SELECT sum(reserved_nusd) FROM budget_counters WHERE tenant_id = $1", tenant.id
        )
    assert reserved == 10_000


def test_prices_are_exact_and_banded() -> None:
    prices = load_prices()
    sonnet = TokenCounts(input_tokens=1000, output_tokens=500, cache_read_tokens=2000)
    # $2/M in, $10/M out, $0.20/M cache read, in nano-USD.
    assert prices.cost_nusd("claude-sonnet-5-5", sonnet) == 2000 * 1000 + 10_000 * 500 + 200 * 2000
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


async def test_usage_report_shows_only_the_callers_tenant(
    api: httpx.AsyncClient, gateway: ModelActivities, make_tenant: TenantFactory
) -> None:
    """Two tenants' usage in the same window: each admin sees exactly their own runs, calls
    and cost, none of the other's."""
    tenants = [await make_tenant(), await make_tenant()]
    # Different numbers of calls, so that a report counting both tenants' is wrong for each.
    calls = {
        tenant.id: [call_for(tenant, text=f"{tenant.id} q{n}", cache=False) for n in range(count)]
        for tenant, count in zip(tenants, (1, 2), strict=True)
    }
    replies = {
        tenant_id: [await run(gateway, call) for call in own] for tenant_id, own in calls.items()
    }
    for tenant in tenants:
        by_run = await api.get("/v1/usage?group_by=run", headers=tenant.auth("admin"))
        assert by_run.status_code == 200, by_run.text
        rows = by_run.json()["rows"]
        assert sorted(r["key"] for r in rows) == sorted(c.context.run_id for c in calls[tenant.id])
        assert sum(r["calls"] for r in rows) == len(calls[tenant.id])
        cost = sum(r.usage.cost_usd for r in replies[tenant.id])
        assert by_run.json()["total_cost_usd"] == pytest.approx(cost)


# --- a billed call is always recorded ---------------------------------------------------------

NUL_REPLY = "Summary: before\x00after"


async def usage_rows(pool: Pool, call: ModelCall) -> list[dict[str, Any]]:
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT attempt, model, cost_nusd, cache_hit FROM model_usage WHERE call_key = $1"
            " ORDER BY attempt",
            call.call_key,
        )
    return [dict(r) for r in rows]


async def spend(pool: Pool, tenant: Tenant) -> tuple[int, int]:
    used = await counter(pool, tenant)
    return used["spent_nusd"], used["reserved_nusd"]


async def with_budget(pool: Pool, tenant: Tenant, limit_usd: float = 1.0) -> None:
    async with pool.acquire() as conn:
        await budgets.set_budget(conn, tenant.id, "customer", "", "day", limit_usd)


@asynccontextmanager
async def refusing_inserts(database_url: str, table: str, tenant: Tenant) -> AsyncIterator[None]:
    """PostgreSQL itself refuses the tenant's inserts into `table` (an outage of one write)."""
    name = f"refuse_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql"
            " AS $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$"
        )
        await conn.execute(
            f"CREATE TRIGGER {name} BEFORE INSERT ON {table} FOR EACH ROW"
            f" WHEN (NEW.tenant_id = '{tenant.id}') EXECUTE FUNCTION {name}()"
        )
        yield
    finally:
        await conn.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
        await conn.execute(f"DROP FUNCTION IF EXISTS {name}()")
        await conn.close()


async def fails_while_refused(
    gateway: ModelActivities, pool: Pool, database_url: str, table: str, tenant: Tenant
) -> ModelCall:
    """A budgeted call's first attempt, which fails while PostgreSQL refuses `table`."""
    await with_budget(pool, tenant)
    call = call_for(tenant, cache=False)
    async with refusing_inserts(database_url, table, tenant):
        with pytest.raises(asyncpg.PostgresError):
            await run(gateway, call, attempt=1)
    return call


async def test_a_reply_postgres_cannot_store_is_recorded_once_and_never_bought_twice(
    gateway: ModelActivities, tenant: Tenant, pool: Pool, sim: SimControl
) -> None:
    await with_budget(pool, tenant)
    call = call_for(tenant, text=f"Summarize this.\nsim_reply: {NUL_REPLY}")
    before = (await sim.stats())["requests_total"]
    first = await run(gateway, call, attempt=1)
    assert first.text == "Summary: before\ufffdafter"  # storable everywhere it goes next
    again = await run(gateway, call, attempt=2)  # as if the worker died before reporting
    assert again == first
    assert (await sim.stats())["requests_total"] == before + 1
    rows = await usage_rows(pool, call)
    assert [(r["attempt"], r["cost_nusd"]) for r in rows] == [(1, first.usage.cost_nusd)]
    assert first.usage.cost_nusd > 0
    assert await spend(pool, tenant) == (first.usage.cost_nusd, 0)
    cached = await run(gateway, call_for(tenant, text=f"Summarize this.\nsim_reply: {NUL_REPLY}"))
    assert (cached.cache_hit, cached.content) == (True, first.content)


async def test_the_cost_is_recorded_before_the_writes_that_can_fail(
    gateway: ModelActivities, tenant: Tenant, pool: Pool, database_url: str, sim: SimControl
) -> None:
    call = await fails_while_refused(gateway, pool, database_url, "model_calls", tenant)
    recorded = await usage_rows(pool, call)
    assert [r["attempt"] for r in recorded] == [1]
    assert recorded[0]["cost_nusd"] > 0
    # Settled at the actual cost, not charged the worst case as a lost attempt would be.
    assert await spend(pool, tenant) == (recorded[0]["cost_nusd"], 0)

    before = (await sim.stats())["requests_total"]
    retried = await run(gateway, call, attempt=2)  # no memo: this one pays again, recorded
    assert (await sim.stats())["requests_total"] == before + 1
    assert [r["attempt"] for r in await usage_rows(pool, call)] == [1, 2]
    assert await spend(pool, tenant) == (recorded[0]["cost_nusd"] + retried.usage.cost_nusd, 0)


async def test_an_audit_append_that_fails_leaves_the_cost_and_the_reply_recorded(
    gateway: ModelActivities, tenant: Tenant, pool: Pool, database_url: str, sim: SimControl
) -> None:
    call = await fails_while_refused(gateway, pool, database_url, "audit_log", tenant)
    recorded = await usage_rows(pool, call)
    assert [r["attempt"] for r in recorded] == [1]
    assert await spend(pool, tenant) == (recorded[0]["cost_nusd"], 0)  # settled, not expired
    before = (await sim.stats())["requests_total"]
    again = await run(gateway, call, attempt=2)  # the memo answers: nothing is bought twice
    assert (await sim.stats())["requests_total"] == before
    assert again.attempt == 1
    async with pool.acquire() as conn:
        entries = await conn.fetchval(
            "SELECT count(*) FROM audit_log WHERE tenant_id = $1 AND event_key = $2",
            tenant.id,
            f"{call.call_key}:call",
        )
    assert entries == 1


async def test_a_cost_that_cannot_be_recorded_fails_loudly_and_is_charged_in_full(
    gateway: ModelActivities,
    tenant: Tenant,
    pool: Pool,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    call = await fails_while_refused(gateway, pool, database_url, "model_usage", tenant)
    assert await usage_rows(pool, call) == []
    async with pool.acquire() as conn:
        reservation = await conn.fetchrow(
            "SELECT status, amount_nusd, charged_nusd FROM budget_reservations WHERE call_key = $1",
            call.call_key,
        )
    assert reservation is not None
    # Charged in full and marked abandoned: no usage row stands behind it.
    assert reservation["status"] == "expired"
    assert reservation["charged_nusd"] == reservation["amount_nusd"] > 0
    assert await spend(pool, tenant) == (reservation["amount_nusd"], 0)
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(call.call_key in r.getMessage() and "cost" in r.getMessage() for r in loud)


def test_storable_replaces_what_postgres_cannot_hold() -> None:
    value = {
        "text\x00key": ["a\x00b", {"lone": "x\udc00y", "ok": "caf\u00e9 \U0001f600"}],
        "n": 3,
        "none": None,
    }
    assert storable(value) == {
        "text\ufffdkey": ["a\ufffdb", {"lone": "x\ufffdy", "ok": "caf\u00e9 \U0001f600"}],
        "n": 3,
        "none": None,
    }
    clean = {"a": ["b", {"c": 1.5}]}
    assert storable(clean) == clean


# --- the cache answers only for the model asked for ---------------------------------------------


async def test_an_escalated_call_is_not_answered_by_a_weaker_models_entry(
    gateway: ModelActivities, tenant: Tenant, sim: SimControl
) -> None:
    stronger = load_routing().route("draft", "standard").escalate
    assert stronger is not None
    assert stronger not in DRAFT
    plain = await run(gateway, call_for(tenant))  # cached under the primary
    assert (plain.model, plain.cache_hit) == (DRAFT[0], False)
    before = (await sim.stats())["requests"].get(stronger, 0)
    escalated = await run(gateway, call_for(tenant, escalate=True))
    assert (escalated.model, escalated.cache_hit) == (stronger, False)
    assert (await sim.stats())["requests"].get(stronger, 0) == before + 1
    # Each model's own entry serves its own calls from now on.
    again = await run(gateway, call_for(tenant, escalate=True))
    assert (again.model, again.cache_hit, again.content) == (stronger, True, escalated.content)
    weaker = await run(gateway, call_for(tenant))
    assert (weaker.model, weaker.cache_hit) == (DRAFT[0], True)


async def test_a_fallbacks_entry_does_not_answer_for_the_primary(
    gateway: ModelActivities, tenant: Tenant, sim: SimControl
) -> None:
    await sim.fault(529, model=DRAFT[0])
    fell_back = await run(gateway, call_for(tenant))
    assert fell_back.model == DRAFT[1]
    before = (await sim.stats())["requests"].get(DRAFT[0], 0)
    primary = await run(gateway, call_for(tenant))
    assert (primary.model, primary.cache_hit) == (DRAFT[0], False)
    assert (await sim.stats())["requests"].get(DRAFT[0], 0) == before + 1


# --- a call with no room only because of calls in flight waits ----------------------------------


async def worst_case(gateway: ModelActivities, make_tenant: Any, text: str) -> int:
    """The reservation a call of `text` makes once the provider counted its tokens: the
    exact worst case, which a call falls back to when the bound's does not fit."""
    call = call_for(await make_tenant(), text=text, cache=False)
    return _worst_cases(gateway, call, _counted(gateway, call))


def _counted(gateway: ModelActivities, call: ModelCall) -> int:
    return count_tokens({k: v for k, v in gateway.plan(call).sent.items() if k != "max_tokens"})


def in_flight(tenant: Tenant) -> RunContext:
    return RunContext(
        tenant=tenant.id, run_id="r_other", pipeline="summarize", requested_by="requester"
    )


async def test_a_call_waits_for_reservations_in_flight_to_settle(
    gateway: ModelActivities, tenant: Tenant, make_tenant: Any, pool: Pool, sim: SimControl
) -> None:
    worst = await worst_case(gateway, make_tenant, "waiting")
    await with_budget(pool, tenant, 1.5 * worst / 1e9)
    async with pool.acquire() as conn:
        await budgets.reserve(conn, in_flight(tenant), f"{tenant.id}:other-call", 1, worst)
    beats: list[tuple[Any, ...]] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: beats.append(details)
    before = (await sim.stats())["requests_total"]
    waiting = asyncio.create_task(env.run(gateway.call_model, call_for(tenant, text="waiting")))

    async def beaten() -> int:
        if waiting.done():
            waiting.result()  # a call that did not wait fails the test with its own error
            raise AssertionError("the call finished while reservations were in flight")
        return len(beats)

    await eventually(beaten, lambda n: n >= 3)  # heartbeating while it waits, not failed
    assert (await sim.stats())["requests_total"] == before
    async with pool.acquire() as conn:
        await budgets.settle(conn, f"{tenant.id}:other-call", 1, worst // 4)
    reply = await waiting
    assert reply.usage.cost_nusd > 0
    assert (await sim.stats())["requests_total"] == before + 1
    assert await spend(pool, tenant) == (worst // 4 + reply.usage.cost_nusd, 0)


async def test_a_wait_that_outlasts_its_bound_is_retried_not_exhausted(
    pool: Pool, settings: Settings, tenant: Tenant, make_tenant: Any, sim: SimControl
) -> None:
    client = model_client(settings)
    impatient = ModelActivities(
        pool,
        client,
        load_prices(),
        load_routing(),
        audit_writer(settings),
        heartbeat_every=0.1,
        budget_wait=timedelta(milliseconds=300),
    )
    try:
        worst = await worst_case(impatient, make_tenant, "impatient")
        await with_budget(pool, tenant, 1.5 * worst / 1e9)
        async with pool.acquire() as conn:
            await budgets.reserve(conn, in_flight(tenant), f"{tenant.id}:stuck-call", 1, worst)
        before = (await sim.stats())["requests_total"]
        error = await refused(impatient, call_for(tenant, text="impatient"))
    finally:
        await client.close()
    assert (error.type, error.non_retryable) == ("BudgetBusy", False)  # the policy retries it
    assert (await sim.stats())["requests_total"] == before


def _worst_cases(gateway: ModelActivities, call: ModelCall, input_tokens: int) -> int:
    plan = gateway.plan(call)
    return max(
        load_prices().worst_case_nusd(m, input_tokens, plan.sent["max_tokens"], cache_ttl=plan.ttl)
        for m in plan.models
    )


async def test_a_budgeted_call_with_room_is_not_counted_by_the_provider_first(
    gateway: ModelActivities, tenant: Tenant, pool: Pool, sim: SimControl
) -> None:
    """Before: every budgeted call asked the provider to count its tokens, a request of its
    own before the call. With room for the bound taken from the request, it does not."""
    async with pool.acquire() as conn:
        await budgets.set_budget(conn, tenant.id, "customer", "", "day", 1.0)
    call = call_for(tenant, cache=False)
    before = (await sim.stats())["count_tokens_calls"]
    reply = await run(gateway, call)
    assert (await sim.stats())["count_tokens_calls"] == before
    amount, charged = await reservation(pool, tenant)
    # What was held is a worst case for what the provider then billed, and the call is
    # charged what it cost.
    assert amount >= _worst_cases(gateway, call, reply.usage.input_tokens)
    assert charged == reply.usage.cost_nusd


async def test_a_call_the_bound_does_not_fit_is_counted_and_reserved_exactly(
    gateway: ModelActivities, tenant: Tenant, pool: Pool, sim: SimControl
) -> None:
    call = call_for(tenant, cache=False)
    bound = input_token_bound(gateway.plan(call).sent)
    assert bound is not None
    exact = _counted(gateway, call)
    by_bound, by_count = _worst_cases(gateway, call, bound), _worst_cases(gateway, call, exact)
    assert by_count < by_bound
    async with pool.acquire() as conn:  # room for the exact worst case, not for the bound's
        await budgets.set_budget(conn, tenant.id, "customer", "", "day", (by_count + 1) / 1e9)
    before = (await sim.stats())["count_tokens_calls"]
    reply = await run(gateway, call)
    assert (await sim.stats())["count_tokens_calls"] == before + 1
    assert await reservation(pool, tenant) == (by_count, reply.usage.cost_nusd)


def test_the_token_bound_covers_every_byte_and_declines_images_and_documents() -> None:
    text = "日本語のテキスト, emoji 🙂 and ASCII. " * 40
    request = {"model": DRAFT[0], "max_tokens": 10, "messages": [{"role": "user", "content": text}]}
    bound = input_token_bound(request)
    assert bound is not None
    assert bound >= len(text.encode())
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA"}}
    pdf = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf"}}
    for block in (image, pdf):
        # Anywhere in the request, a tool result's content included.
        nested = {"type": "tool_result", "tool_use_id": "t1", "content": [block]}
        with_block = {**request, "messages": [{"role": "user", "content": [nested]}]}
        assert input_token_bound(with_block) is None
