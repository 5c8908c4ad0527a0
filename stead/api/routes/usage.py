"""Usage and cost from the ledger: tokens by kind and USD, grouped for a tenant's admins."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from stead.api.deps import CurrentPrincipal, ServicesDep
from stead.service.access import require
from stead.service.errors import Invalid
from stead.service.schemas import DateTimeParam
from stead.store import usage
from stead.store.usage import GroupBy

router = APIRouter(prefix="/v1/usage", tags=["usage"])


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


@router.get("")
async def usage_report(
    svc: ServicesDep,
    principal: CurrentPrincipal,
    group_by: GroupBy = "model",
    start: Annotated[DateTimeParam | None, Query(alias="from")] = None,
    end: Annotated[DateTimeParam | None, Query(alias="to")] = None,
) -> UsageReport:
    """Defaults to the last 30 days. Times without a zone are UTC."""
    require(svc, principal, "usage:read")
    end = _utc(end) if end else datetime.now(UTC)
    start = _utc(start) if start else end - timedelta(days=30)
    if start >= end:
        raise Invalid("`from` must be before `to`")
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


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)
