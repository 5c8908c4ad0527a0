"""Usage and cost from the ledger, for a tenant's admins: totals grouped one way, and day by
day per model or pipeline (what the usage page charts)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal

from pydantic import BaseModel

from stead.service.access import Services, require
from stead.service.errors import Invalid
from stead.store import usage
from stead.store.principals import Principal
from stead.store.usage import GroupBy

# The longest range one daily report covers: a bar per day stays readable, the query bounded.
MAX_DAYS = 366


class UsageRow(BaseModel):
    key: str
    calls: int
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    cost_usd: float
    cache_hits: int
    fallbacks: int


class UsageReport(BaseModel):
    group_by: GroupBy
    start: datetime
    end: datetime
    rows: list[UsageRow]
    total_cost_usd: float


class DailyUsage(BaseModel):
    day: str
    key: str
    calls: int
    tokens: int
    cost_usd: float


def _window(start: datetime | None, end: datetime | None) -> tuple[datetime, datetime]:
    """Defaults to the last 30 days. Times without a zone are UTC."""
    end = _utc(end) if end else datetime.now(UTC)
    start = _utc(start) if start else end - timedelta(days=30)
    if start >= end:
        raise Invalid("`from` must be before `to`")
    return start, end


async def usage_report(
    svc: Services,
    principal: Principal,
    group_by: GroupBy = "model",
    start: datetime | None = None,
    end: datetime | None = None,
) -> UsageReport:
    require(svc, principal, "usage:read")
    start, end = _window(start, end)
    async with svc.pool.acquire() as conn:
        rows = await usage.summary(conn, principal.tenant, group_by, start, end)
    out = [
        UsageRow(
            **{k: int(r[k] or 0) for k in UsageRow.model_fields if k not in {"key", "cost_usd"}},
            key=str(r["key"]),
            cost_usd=int(r["cost_nusd"] or 0) / 1e9,
        )
        for r in rows
    ]
    return UsageReport(
        group_by=group_by,
        start=start,
        end=end,
        rows=out,
        total_cost_usd=round(sum(r.cost_usd for r in out), 9),
    )


async def daily_usage(
    svc: Services,
    principal: Principal,
    by: Literal["model", "pipeline"],
    start: datetime | None = None,
    end: datetime | None = None,
) -> list[DailyUsage]:
    """Calls, tokens and cost per UTC day and `by`, oldest day first."""
    require(svc, principal, "usage:read")
    start, end = _window(start, end)
    if end - start > timedelta(days=MAX_DAYS):
        raise Invalid(f"a daily report covers at most {MAX_DAYS} days")
    async with svc.pool.acquire() as conn:
        rows = await usage.daily(conn, principal.tenant, by, start, end)
    return [
        DailyUsage(
            day=str(r["day"]),
            key=str(r["key"]),
            calls=int(r["calls"]),
            tokens=int(r["tokens"] or 0),
            cost_usd=int(r["cost_nusd"] or 0) / 1e9,
        )
        for r in rows
    ]


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)
