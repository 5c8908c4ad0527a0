"""Usage and cost from the ledger: tokens by kind and USD, grouped for a tenant's admins."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from stead.api.deps import CurrentPrincipal, ServicesDep
from stead.service import usage
from stead.service.schemas import DateTimeParam
from stead.service.usage import UsageReport
from stead.store.usage import GroupBy

router = APIRouter(prefix="/v1/usage", tags=["usage"])


@router.get("")
async def usage_report(
    svc: ServicesDep,
    principal: CurrentPrincipal,
    group_by: GroupBy = "model",
    start: Annotated[DateTimeParam | None, Query(alias="from")] = None,
    end: Annotated[DateTimeParam | None, Query(alias="to")] = None,
) -> UsageReport:
    """Defaults to the last 30 days. Times without a zone are UTC."""
    return await usage.usage_report(svc, principal, group_by, start, end)
