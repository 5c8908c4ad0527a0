"""Usage and cost from the ledger, for a tenant's admins: totals grouped one way, and day by
day per model or pipeline (what the usage page charts)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, Field

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
    input_tokens: int = Field(description="uncached prompt tokens")
    output_tokens: int = Field(description="thinking included")
    cache_read_tokens: int
    cache_write_tokens: int = Field(description="prompt-cache writes, both TTLs")
    cache_write_1h_tokens: int = Field(description="the part of the writes with a 1-hour TTL")
    thinking_tokens: int
    cost_usd: float
    cache_hits: int = Field(description="calls answered by Stead's exact-match response cache")
    fallbacks: int
    batch_calls: int = Field(description="calls answered through the Message Batches API")
    prompt_cache_hit_ratio: float = Field(
        description="prompt tokens read from the provider's cache, of every prompt token"
    )
    prompt_cache_saved_usd: float = Field(
        description="what the provider's prompt cache saved against no caching (negative:"
        " entries written and not yet read back)"
    )


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
    out = [_row(r) for r in rows]
    return UsageReport(
        group_by=group_by,
        start=start,
        end=end,
        rows=out,
        total_cost_usd=round(sum(r.cost_usd for r in out), 9),
    )


_COUNTS = ("calls", *usage.TOKEN_COLUMNS, "cache_hits", "fallbacks", "batch_calls")


def _row(row: Mapping[str, Any]) -> UsageRow:
    counts = {k: int(row[k] or 0) for k in _COUNTS}
    prompt = counts["input_tokens"] + counts["cache_read_tokens"] + counts["cache_write_tokens"]
    return UsageRow(
        **counts,
        key=str(row["key"]),
        cost_usd=int(row["cost_nusd"] or 0) / 1e9,
        prompt_cache_hit_ratio=round(counts["cache_read_tokens"] / prompt, 4) if prompt else 0.0,
        prompt_cache_saved_usd=int(row["cache_saved_nusd"] or 0) / 1e9,
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
