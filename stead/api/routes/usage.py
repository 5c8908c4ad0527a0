"""Usage and cost from the ledger: tokens by kind and USD, grouped for a tenant's admins."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel

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


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)
