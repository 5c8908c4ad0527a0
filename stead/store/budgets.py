"""Token budgets that hold under concurrency.

Before a call, `reserve` takes its worst-case cost from every budget that applies (customer per
day and per month, user, run). Each counter is changed by one conditional UPDATE
(`spent + reserved + amount <= limit`) under its row lock, all in one transaction: either every
budget accepts the reservation or none is touched. After the call, `settle` swaps the
reservation for the actual cost. So spend never passes a limit while calls are in flight; the
only way past it is an actual cost above its own worst case.

A refusal says which of two things it is. `BudgetExhausted`: what is already spent (settled)
leaves no room for this call's worst case; only a bigger budget helps. `BudgetBusy`: the call
would fit beside what is spent, but not beside the worst cases reserved by calls still in
flight; those settle at their actual cost, usually well below, so waiting is likely to help.
When one budget is busy and another exhausted, the call is exhausted.

Reservations are keyed by (call key, attempt): reserving twice for one attempt is a no-op, and
each attempt is charged once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from stead.contract import RunContext
from stead.store.db import Conn

RUN_PERIOD_START = date(1970, 1, 1)


@dataclass(frozen=True)
class CounterKey:
    scope: str
    subject: str
    period: str
    period_start: date

    def as_json(self) -> list[str]:
        return [self.scope, self.subject, self.period, self.period_start.isoformat()]

    @staticmethod
    def from_json(value: list[str]) -> CounterKey:
        return CounterKey(value[0], value[1], value[2], date.fromisoformat(value[3]))


class BudgetRefused(Exception):
    """A reservation one budget could not take; `spent` is settled, `reserved` in flight."""

    def __init__(
        self,
        scope: str,
        period: str,
        limit_nusd: int,
        spent_nusd: int,
        reserved_nusd: int,
        requested_nusd: int,
    ) -> None:
        self.scope, self.period = scope, period
        self.limit_nusd, self.spent_nusd = limit_nusd, spent_nusd
        self.reserved_nusd, self.requested_nusd = reserved_nusd, requested_nusd
        super().__init__(self.describe())

    def describe(self) -> str:
        return (
            f"{self.scope} budget ({self.period}): limit ${self.limit_nusd / 1e9:.6f}, spent"
            f" ${self.spent_nusd / 1e9:.6f}, reserved by calls in flight"
            f" ${self.reserved_nusd / 1e9:.6f}, this call needs up to"
            f" ${self.requested_nusd / 1e9:.6f}"
        )


class BudgetExhausted(BudgetRefused):
    """Settled spend leaves no room for the call: waiting cannot help."""

    def describe(self) -> str:
        return f"exhausted: {super().describe()}"


class BudgetBusy(BudgetRefused):
    """No room only because of reservations in flight: the call may fit once they settle."""

    def describe(self) -> str:
        return f"busy: {super().describe()}"


def period_start(period: str, now: datetime) -> date:
    today = now.astimezone(UTC).date()
    if period == "day":
        return today
    if period == "month":
        return today.replace(day=1)
    return RUN_PERIOD_START


async def _applicable(
    conn: Conn, context: RunContext, now: datetime
) -> list[tuple[CounterKey, int]]:
    rows = await conn.fetch(
        "SELECT scope, subject, period, limit_nusd FROM budgets WHERE tenant_id = $1"
        " AND ((scope = 'customer' AND subject = '') OR (scope = 'user' AND subject = $2))",
        context.tenant,
        context.requested_by,
    )
    found = [
        (
            CounterKey(r["scope"], r["subject"], r["period"], period_start(r["period"], now)),
            int(r["limit_nusd"]),
        )
        for r in rows
    ]
    if context.budget_usd is not None:
        found.append(
            (
                CounterKey("run", context.run_id, "run", RUN_PERIOD_START),
                round(context.budget_usd * 1e9),
            )
        )
    return sorted(found, key=lambda item: item[0].as_json())  # fixed lock order


async def reserve(
    conn: Conn,
    context: RunContext,
    call_key: str,
    attempt: int,
    amount_nusd: int,
    *,
    run_limit_nusd: int | None = None,
    now: datetime | None = None,
    held_until: datetime | None = None,
) -> None:
    """Reserve `amount_nusd` on every applicable budget, or raise BudgetExhausted (no room
    beside settled spend) or BudgetBusy (no room beside reservations in flight); a refused
    reservation takes nothing from any budget. `held_until` keeps the sweeper off a
    reservation meant to outlive an attempt (a deferred call waiting for its batch)."""
    now = now or datetime.now(UTC)
    async with conn.transaction():
        existing = await conn.fetchval(
            "SELECT 1 FROM budget_reservations WHERE call_key = $1 AND attempt = $2",
            call_key,
            attempt,
        )
        if existing:
            return
        counters = await _applicable(conn, context, now)
        if run_limit_nusd is not None:
            counters = [
                (key, run_limit_nusd if key.scope == "run" else limit) for key, limit in counters
            ]
        busy: BudgetBusy | None = None
        for key, limit in counters:
            await conn.execute(
                "INSERT INTO budget_counters (tenant_id, scope, subject, period, period_start,"
                " limit_nusd) VALUES ($1, $2, $3, $4, $5, $6)"
                " ON CONFLICT (tenant_id, scope, subject, period, period_start)"
                " DO UPDATE SET limit_nusd = EXCLUDED.limit_nusd"
                " WHERE budget_counters.limit_nusd <> EXCLUDED.limit_nusd",
                context.tenant,
                key.scope,
                key.subject,
                key.period,
                key.period_start,
                limit,
            )
            if not await _take(conn, context.tenant, key, amount_nusd):
                refused = await _refusal(conn, context.tenant, key, limit, amount_nusd)
                if isinstance(refused, BudgetExhausted):
                    raise refused
                # Keep looking: another budget may be exhausted, which waiting cannot mend.
                busy = busy or refused
        if busy is not None:
            raise busy
        await conn.execute(
            "INSERT INTO budget_reservations (call_key, attempt, tenant_id, counters, amount_nusd,"
            " status, held_until) VALUES ($1, $2, $3, $4, $5, 'reserved', $6)",
            call_key,
            attempt,
            context.tenant,
            [k.as_json() for k, _ in counters],
            amount_nusd,
            held_until,
        )


async def _take(conn: Conn, tenant: str, key: CounterKey, amount_nusd: int) -> bool:
    taken = await conn.fetchrow(
        "UPDATE budget_counters SET reserved_nusd = reserved_nusd + $6"
        " WHERE tenant_id = $1 AND scope = $2 AND subject = $3 AND period = $4"
        " AND period_start = $5 AND spent_nusd + reserved_nusd + $6 <= limit_nusd"
        " RETURNING 1",
        tenant,
        key.scope,
        key.subject,
        key.period,
        key.period_start,
        amount_nusd,
    )
    return taken is not None


async def _refusal(
    conn: Conn, tenant: str, key: CounterKey, limit: int, amount_nusd: int
) -> BudgetExhausted | BudgetBusy:
    """Why the counter refused `amount_nusd`. Read after the refusal, so calls may have
    settled or reserved since; the verdict still holds, as it rests on settled spend alone,
    which only grows: exhausted now stays so until the limit is raised, and busy is worth
    another try."""
    row = await conn.fetchrow(
        "SELECT spent_nusd, reserved_nusd FROM budget_counters WHERE tenant_id = $1"
        " AND scope = $2 AND subject = $3 AND period = $4 AND period_start = $5",
        tenant,
        key.scope,
        key.subject,
        key.period,
        key.period_start,
    )
    spent, reserved = (int(row["spent_nusd"]), int(row["reserved_nusd"])) if row else (0, 0)
    facts = (key.scope, key.period, limit, spent, reserved, amount_nusd)
    return BudgetExhausted(*facts) if spent + amount_nusd > limit else BudgetBusy(*facts)


async def settle(
    conn: Conn,
    call_key: str,
    attempt: int,
    charged_nusd: int,
    *,
    status: str = "settled",
) -> bool:
    """Replace the attempt's reservation with its actual cost. Idempotent; False if nothing
    was reserved or it was already settled."""
    row = await conn.fetchrow(
        "UPDATE budget_reservations SET status = $3, charged_nusd = $4, settled_at = now()"
        " WHERE call_key = $1 AND attempt = $2 AND status = 'reserved'"
        " RETURNING tenant_id, counters, amount_nusd",
        call_key,
        attempt,
        status,
        charged_nusd,
    )
    if row is None:
        return False
    for raw in row["counters"]:
        key = CounterKey.from_json(raw)
        await conn.execute(
            "UPDATE budget_counters SET reserved_nusd = reserved_nusd - $6,"
            " spent_nusd = spent_nusd + $7 WHERE tenant_id = $1 AND scope = $2 AND subject = $3"
            " AND period = $4 AND period_start = $5",
            row["tenant_id"],
            key.scope,
            key.subject,
            key.period,
            key.period_start,
            row["amount_nusd"],
            charged_nusd,
        )
    return True


async def sweep_stale(conn: Conn, older_than: timedelta) -> int:
    """Charge in full the reservations of attempts that never settled (the worker died):
    the provider may have billed them, so the budget must count them. A reservation held on
    purpose (`held_until`) is left alone until then."""
    stale = await conn.fetch(
        "SELECT call_key, attempt, amount_nusd FROM budget_reservations"
        " WHERE status = 'reserved' AND created_at < now() - $1::interval"
        " AND (held_until IS NULL OR held_until < now())",
        older_than,
    )
    done = 0
    for row in stale:
        async with conn.transaction():
            if await settle(
                conn, row["call_key"], row["attempt"], row["amount_nusd"], status="expired"
            ):
                done += 1
    return done


async def set_budget(
    conn: Conn, tenant: str, scope: str, subject: str, period: str, limit_usd: float
) -> None:
    await conn.execute(
        "INSERT INTO budgets (tenant_id, scope, subject, period, limit_nusd) VALUES"
        " ($1, $2, $3, $4, $5) ON CONFLICT (tenant_id, scope, subject, period)"
        " DO UPDATE SET limit_nusd = EXCLUDED.limit_nusd, updated_at = now()",
        tenant,
        scope,
        subject,
        period,
        round(limit_usd * 1e9),
    )


async def status(conn: Conn, tenant: str, now: datetime | None = None) -> list[dict[str, Any]]:
    now = now or datetime.now(UTC)
    rows = await conn.fetch(
        "SELECT b.scope, b.subject, b.period, b.limit_nusd,"
        " coalesce(c.spent_nusd, 0) AS spent_nusd, coalesce(c.reserved_nusd, 0) AS reserved_nusd"
        " FROM budgets b LEFT JOIN budget_counters c ON c.tenant_id = b.tenant_id"
        " AND c.scope = b.scope AND c.subject = b.subject AND c.period = b.period"
        " AND c.period_start = CASE b.period WHEN 'day' THEN $2::date"
        " ELSE date_trunc('month', $2::date)::date END"
        " WHERE b.tenant_id = $1 ORDER BY b.scope, b.subject, b.period",
        tenant,
        now.astimezone(UTC).date(),
    )
    return [dict(r) for r in rows]
