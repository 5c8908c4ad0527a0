"""Usage over time by model and by pipeline (charts and tables), and the audit chain's verify
status: stead.service.usage and stead.service.audit, as `/v1/usage` and `/v1/audit/verify`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from stead.service import audit, usage
from stead.service.errors import Forbidden, Invalid
from stead.web.auth import ViewerDep
from stead.web.charts import METRICS, Metric, days_between, stacked_by_day
from stead.web.errors import WebRoute
from stead.web.render import page

router = APIRouter(route_class=WebRoute)
RANGES = (7, 30, 90)


@router.get("/usage")
async def usage_page(
    request: Request,
    viewer: ViewerDep,
    days: Annotated[int, Query()] = 30,
    metric: Annotated[Metric, Query()] = "cost_usd",
) -> Response:
    if days not in RANGES:
        raise Invalid(f"the range is one of {', '.join(map(str, RANGES))} days")
    end = datetime.now(UTC)
    start = (end - timedelta(days=days - 1)).replace(hour=0, minute=0, second=0, microsecond=0)
    span = days_between(start.date(), end.date())
    svc, who = viewer.svc, viewer.principal
    charts = [
        stacked_by_day(
            await usage.daily_usage(svc, who, by, start, end),
            span,
            metric,
            f"{METRICS[metric]} by {by}",
        )
        for by in ("model", "pipeline")
    ]
    totals = {
        by: await usage.usage_report(svc, who, by, start, end) for by in ("model", "pipeline")
    }
    try:
        chain, chain_error = await audit.verify_chain(svc, who), ""
    except Forbidden as exc:
        chain, chain_error = None, exc.detail
    return page(
        request,
        "usage.html",
        charts=charts,
        totals=totals,
        chain=chain,
        chain_error=chain_error,
        days=days,
        metric=metric,
        ranges=RANGES,
        metrics=METRICS,
        start=start,
        end=end,
    )
