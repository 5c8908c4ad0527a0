"""Budgets at the boundary and under contention.

At store level: a reservation may land exactly on a limit and not one nano-USD past it, and a
call refused only because of reservations still in flight is told apart from one that settled
spend leaves no room for. Through real runs: concurrent runs under a small budget wait for
in-flight calls to settle instead of failing, so the budget ends spent.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import asyncpg
import httpx
import pytest

from stead.contract import RunContext
from stead.store import budgets
from stead.store.db import Pool
from tests.budget_kit import counter, reservation
from tests.conftest import SimControl, Tenant, TenantFactory
from tests.helpers import start_run, wait_json

LIMIT = 1_000_000  # nano-USD: $0.001


@pytest.fixture
def keys() -> dict[str, str]:
    """Call keys of this test's own (reservations are keyed by call and attempt only)."""
    run = uuid.uuid4().hex[:12]
    return {name: f"{run}:{name}" for name in ("k1", "k2", "k3", "in-flight", "waiting")}


def context(tenant: Tenant, user: str = "requester") -> RunContext:
    return RunContext(
        tenant=tenant.id,
        run_id=f"r_{uuid.uuid4().hex[:12]}",
        pipeline="summarize",
        requested_by=user,
    )


@pytest.fixture
async def limited(tenant: Tenant, pool: Pool) -> Tenant:
    async with pool.acquire() as conn:
        await budgets.set_budget(conn, tenant.id, "customer", "", "day", LIMIT / 1e9)
    return tenant


async def test_a_reservation_may_land_exactly_on_the_limit(
    limited: Tenant, pool: Pool, keys: dict[str, str]
) -> None:
    async with pool.acquire() as conn:
        await budgets.reserve(conn, context(limited), keys["k1"], 1, LIMIT)
    assert await counter(pool, limited) == {
        "spent_nusd": 0,
        "reserved_nusd": LIMIT,
        "limit_nusd": LIMIT,
    }


async def test_one_nano_usd_over_the_limit_is_exhausted(
    limited: Tenant, pool: Pool, keys: dict[str, str]
) -> None:
    async with pool.acquire() as conn:
        with pytest.raises(budgets.BudgetExhausted) as caught:
            await budgets.reserve(conn, context(limited), keys["k1"], 1, LIMIT + 1)
    assert (caught.value.spent_nusd, caught.value.requested_nusd) == (0, LIMIT + 1)
    async with pool.acquire() as conn:
        (state,) = await budgets.status(conn, limited.id)
    assert (state["spent_nusd"], state["reserved_nusd"]) == (0, 0)  # nothing was taken


async def test_the_boundary_counts_settled_spend(
    limited: Tenant, pool: Pool, keys: dict[str, str]
) -> None:
    spent = 400_000
    async with pool.acquire() as conn:
        await budgets.reserve(conn, context(limited), keys["k1"], 1, 500_000)
        await budgets.settle(conn, keys["k1"], 1, spent)
        with pytest.raises(budgets.BudgetExhausted):
            await budgets.reserve(conn, context(limited), keys["k2"], 1, LIMIT - spent + 1)
        await budgets.reserve(conn, context(limited), keys["k3"], 1, LIMIT - spent)
    assert await counter(pool, limited) == {
        "spent_nusd": spent,
        "reserved_nusd": LIMIT - spent,
        "limit_nusd": LIMIT,
    }


async def test_no_room_only_because_of_calls_in_flight_is_busy(
    limited: Tenant, pool: Pool, keys: dict[str, str]
) -> None:
    async with pool.acquire() as conn:
        await budgets.reserve(conn, context(limited), keys["in-flight"], 1, 700_000)
        with pytest.raises(budgets.BudgetBusy) as caught:
            await budgets.reserve(conn, context(limited), keys["waiting"], 1, 400_000)
        busy = caught.value
        assert (busy.spent_nusd, busy.reserved_nusd, busy.requested_nusd) == (0, 700_000, 400_000)
        # Once the call in flight settles below its worst case, the waiting call fits.
        await budgets.settle(conn, keys["in-flight"], 1, 600_000)
        await budgets.reserve(conn, context(limited), keys["waiting"], 1, 400_000)
    assert await counter(pool, limited) == {
        "spent_nusd": 600_000,
        "reserved_nusd": 400_000,
        "limit_nusd": LIMIT,
    }


async def test_busy_on_one_budget_and_exhausted_on_another_is_exhausted(
    limited: Tenant, pool: Pool, keys: dict[str, str]
) -> None:
    """Waiting cannot help when any budget is exhausted by what is already settled."""
    async with pool.acquire() as conn:
        await budgets.set_budget(conn, limited.id, "user", "requester", "day", 0.0005)
        await budgets.reserve(conn, context(limited, "someone-else"), keys["in-flight"], 1, 700_000)
        with pytest.raises(budgets.BudgetExhausted) as caught:
            await budgets.reserve(conn, context(limited), keys["waiting"], 1, 500_001)
    assert caught.value.scope == "user"


async def test_a_reservation_left_open_is_charged_in_full_by_the_sweep(
    limited: Tenant, pool: Pool, database_url: str, keys: dict[str, str]
) -> None:
    """An attempt whose worker died never settles: once stale, the sweep charges what it
    reserved (the provider may have billed it), and leaves fresh reservations alone."""
    async with pool.acquire() as conn:
        await budgets.reserve(conn, context(limited), keys["k1"], 1, 300_000)
        await budgets.reserve(conn, context(limited), keys["k2"], 1, 200_000)
    owner = await asyncpg.connect(database_url)  # created_at is not the app's to change
    try:
        await owner.execute(
            "UPDATE budget_reservations SET created_at = now() - interval '1 hour'"
            " WHERE call_key = $1",
            keys["k1"],
        )
    finally:
        await owner.close()
    async with pool.acquire() as conn:
        # Other tests' stale reservations may be swept too: the count is at least this one.
        assert await budgets.sweep_stale(conn, timedelta(minutes=10)) >= 1
        rows = await conn.fetch(
            "SELECT call_key, status, charged_nusd FROM budget_reservations"
            " WHERE tenant_id = $1 ORDER BY amount_nusd DESC",
            limited.id,
        )
        assert [tuple(r) for r in rows] == [
            (keys["k1"], "expired", 300_000),
            (keys["k2"], "reserved", None),
        ]
        assert await counter(pool, limited) == {
            "spent_nusd": 300_000,
            "reserved_nusd": 200_000,
            "limit_nusd": LIMIT,
        }
        # Swept once: a second sweep charges it no more.
        await budgets.sweep_stale(conn, timedelta(minutes=10))
        assert (await counter(pool, limited))["spent_nusd"] == 300_000


@pytest.mark.parametrize(
    ("settled", "in_flight", "asked", "refusal", "message"),
    [
        # Settled spend plus this call lands exactly on the limit: it fits once the call in
        # flight settles for nothing, so it must wait, not fail.
        pytest.param(
            600_000,
            100_000,
            400_000,
            budgets.BudgetBusy,
            "busy: customer budget (day): limit $0.001000, spent $0.000600,"
            " reserved by calls in flight $0.000100, this call needs up to $0.000400",
            id="busy-at-the-limit",
        ),
        pytest.param(
            900_000,
            0,
            100_001,
            budgets.BudgetExhausted,
            "exhausted: customer budget (day): limit $0.001000, spent $0.000900,"
            " reserved by calls in flight $0.000000, this call needs up to $0.000100",
            id="exhausted",
        ),
    ],
)
async def test_a_refusal_says_why_and_what_is_spent(
    limited: Tenant,
    pool: Pool,
    keys: dict[str, str],
    settled: int,
    in_flight: int,
    asked: int,
    refusal: type[budgets.BudgetRefused],
    message: str,
) -> None:
    async with pool.acquire() as conn:
        await budgets.reserve(conn, context(limited), keys["k1"], 1, settled)
        await budgets.settle(conn, keys["k1"], 1, settled)
        if in_flight:
            await budgets.reserve(conn, context(limited), keys["in-flight"], 1, in_flight)
        with pytest.raises(refusal) as caught:
            await budgets.reserve(conn, context(limited), keys["waiting"], 1, asked)
    assert str(caught.value) == message


async def test_a_run_budget_bounds_its_run_alone(
    limited: Tenant, pool: Pool, keys: dict[str, str]
) -> None:
    run = context(limited).model_copy(update={"budget_usd": 0.0005})  # 500,000 nano-USD
    async with pool.acquire() as conn:
        await budgets.reserve(conn, run, keys["k1"], 1, 400_000)
        await budgets.settle(conn, keys["k1"], 1, 400_000)
        with pytest.raises(budgets.BudgetExhausted) as caught:
            await budgets.reserve(conn, run, keys["k2"], 1, 100_001)
        assert (caught.value.scope, caught.value.limit_nusd) == ("run", 500_000)
        await budgets.reserve(conn, context(limited), keys["k3"], 1, 100_001)  # another run
        # A raised run budget (an approved increase) replaces the run's limit, and only it.
        await budgets.reserve(conn, run, keys["in-flight"], 1, 200_000, run_limit_nusd=600_000)
        rows = await conn.fetch(
            "SELECT scope, subject, period, period_start, limit_nusd, spent_nusd, reserved_nusd"
            " FROM budget_counters WHERE tenant_id = $1 ORDER BY scope",
            limited.id,
        )
    assert [tuple(r)[:3] + tuple(r)[4:] for r in rows] == [
        ("customer", "", "day", LIMIT, 400_000, 300_001),
        ("run", run.run_id, "run", 600_000, 400_000, 200_000),
    ]
    assert rows[1]["period_start"] == budgets.RUN_PERIOD_START


async def test_a_large_run_budget_is_exact_to_the_nano_usd(
    tenant: Tenant, pool: Pool, keys: dict[str, str]
) -> None:
    """Dollars to nano-USD and back without drift, where a rounding slip would show."""
    run = context(tenant).model_copy(update={"budget_usd": 3000.0})
    thousand = 1_000 * 10**9
    async with pool.acquire() as conn:
        await budgets.reserve(conn, run, keys["k1"], 1, thousand)
        await budgets.settle(conn, keys["k1"], 1, thousand)
        await budgets.reserve(conn, run, keys["in-flight"], 1, thousand)
        with pytest.raises(budgets.BudgetBusy) as caught:
            await budgets.reserve(conn, run, keys["waiting"], 1, thousand + thousand // 2)
        assert caught.value.limit_nusd == 3 * thousand
        assert str(caught.value) == (
            "busy: run budget (run): limit $3000.000000, spent $1000.000000,"
            " reserved by calls in flight $1000.000000, this call needs up to $1500.000000"
        )
        await budgets.settle(conn, keys["in-flight"], 1, thousand)
        await budgets.reserve(conn, run, keys["waiting"], 1, thousand)  # exactly at the limit


async def test_a_reservation_is_made_and_settled_once(
    limited: Tenant, pool: Pool, keys: dict[str, str]
) -> None:
    async with pool.acquire() as conn:
        for _ in range(2):  # a retried activity reserves the same attempt again
            await budgets.reserve(conn, context(limited), keys["k1"], 1, 300_000)
        assert await budgets.settle(conn, keys["k1"], 1, 100_000) is True
        assert await budgets.settle(conn, keys["k1"], 1, 100_000) is False
        assert await budgets.settle(conn, keys["k2"], 1, 100_000) is False  # never reserved
    assert await counter(pool, limited) == {
        "spent_nusd": 100_000,
        "reserved_nusd": 0,
        "limit_nusd": LIMIT,
    }


def test_periods_start_at_the_utc_day_and_month() -> None:
    # 01:00 on 1 March at UTC+5 is still 28 February in UTC.
    now = datetime(2026, 3, 1, 1, 0, tzinfo=timezone(timedelta(hours=5)))
    assert budgets.period_start("day", now) == date(2026, 2, 28)
    assert budgets.period_start("month", now) == date(2026, 2, 1)
    assert budgets.period_start("run", now) == budgets.RUN_PERIOD_START


async def test_status_shows_the_current_periods(
    limited: Tenant, pool: Pool, keys: dict[str, str]
) -> None:
    now = datetime(2026, 5, 31, 23, 0, tzinfo=UTC)
    async with pool.acquire() as conn:
        await budgets.set_budget(conn, limited.id, "user", "requester", "month", 5.0)
        await budgets.reserve(conn, context(limited), keys["k1"], 1, 250_000, now=now)
        await budgets.settle(conn, keys["k1"], 1, 200_000)
        await budgets.reserve(conn, context(limited), keys["k2"], 1, 50_000, now=now)
        today = await budgets.status(conn, limited.id, now)
        next_month = await budgets.status(conn, limited.id, now + timedelta(hours=2))
    assert [(r["scope"], r["subject"], r["period"]) for r in today] == [
        ("customer", "", "day"),
        ("user", "requester", "month"),
    ]
    assert [(r["limit_nusd"], r["spent_nusd"], r["reserved_nusd"]) for r in today] == [
        (LIMIT, 200_000, 50_000),
        (5_000_000_000, 200_000, 50_000),
    ]
    assert [(r["spent_nusd"], r["reserved_nusd"]) for r in next_month] == [(0, 0), (0, 0)]


# --- through real runs -----------------------------------------------------------------------

RUNS = 20
MAX_WORDS = 25  # max_tokens 100, while the simulator's summary is about 15 tokens


def text(tenant: Tenant, index: int) -> str:
    # Distinct and of one length: no cache hits, equal reservations.
    return f"Note {index:04d} for {tenant.id}: revenue grew in Q3."


async def summarize(api: httpx.AsyncClient, tenant: Tenant, index: int) -> dict[str, Any]:
    body = {"text": text(tenant, index), "review": False, "max_words": MAX_WORDS}
    run_id = await start_run(api, tenant, {"pipeline": "summarize", "input": body})
    return await wait_json(
        api,
        f"/v1/runs/{run_id}",
        tenant.auth("requester"),
        lambda b: b["status"] != "running",
        within=60,
    )


@pytest.fixture
async def slow_model(sim: SimControl) -> AsyncIterator[None]:
    """Calls that take a while, so concurrent runs' reservations are in flight together."""
    (await sim.http.post("/_sim/config", json={"latency_ms": 300})).raise_for_status()
    yield
    (await sim.http.post("/_sim/config", json={"latency_ms": 0})).raise_for_status()


@pytest.mark.usefixtures("worker", "slow_model")
async def test_concurrent_runs_wait_for_calls_in_flight_and_spend_the_budget(
    api: httpx.AsyncClient, make_tenant: TenantFactory, pool: Pool
) -> None:
    # One call's worst case and actual cost. Under a budget too large to bind, the gateway
    # reserves the worst case of a bound on the input tokens (no provider round trip to count
    # them); under one the bound does not fit, the exact worst case of the counted tokens,
    # which is what calls in flight near the limit hold.
    probe, exact_probe = await make_tenant(), await make_tenant()
    async with pool.acquire() as conn:
        await budgets.set_budget(conn, probe.id, "customer", "", "day", 1000.0)
    assert (await summarize(api, probe, 0))["status"] == "completed"
    bounded, _ = await reservation(pool, probe)
    async with pool.acquire() as conn:
        await budgets.set_budget(conn, exact_probe.id, "customer", "", "day", (bounded - 1) / 1e9)
    assert (await summarize(api, exact_probe, 0))["status"] == "completed"
    worst, actual = await reservation(pool, exact_probe)
    assert actual is not None
    assert worst < bounded
    assert actual * 3 < worst  # the slack that reservations in flight used to waste

    tenant = await make_tenant()
    limit = round(4.5 * worst)  # four calls' worst cases in flight at once, no more
    async with pool.acquire() as conn:
        await budgets.set_budget(conn, tenant.id, "customer", "", "day", limit / 1e9)
    ends = await asyncio.gather(*(summarize(api, tenant, i) for i in range(RUNS)))

    used = await counter(pool, tenant)
    assert used["reserved_nusd"] == 0
    assert used["spent_nusd"] <= limit
    # Most of the budget is spent: what is left cannot pay for one more call's worst case.
    assert used["spent_nusd"] + worst > limit
    failed = [e for e in ends if e["status"] != "completed"]
    assert {e["status"] for e in failed} <= {"failed"}
    assert {e["last_error"]["type"] for e in failed} <= {"BudgetExhausted"}
    async with pool.acquire() as conn:
        rejections = await conn.fetch(
            "SELECT data::jsonb AS data FROM audit_log"
            " WHERE tenant_id = $1 AND action = 'budget.rejected'",
            tenant.id,
        )
    assert len(rejections) == len(failed)
    for row in rejections:
        refused = row["data"]
        # Refused only when settled spend, not calls in flight, left no room.
        assert refused["spent_nusd"] + refused["requested_nusd"] > refused["limit_nusd"]
