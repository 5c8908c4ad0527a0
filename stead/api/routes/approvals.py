"""/v1/approvals: the caller's inbox, one approval, and deciding it (stead.service.approvals)."""

from __future__ import annotations

from fastapi import APIRouter, Query

from stead.api.deps import CurrentPrincipal, ServicesDep, limited
from stead.api.errors import RATE_LIMITED
from stead.service import approvals
from stead.service.schemas import ApprovalOut, DecisionIn, DecisionOut, Page

router = APIRouter(prefix="/v1/approvals", tags=["approvals"])


@router.get("")
async def inbox(
    svc: ServicesDep,
    principal: CurrentPrincipal,
    limit: int = Query(50, ge=1, le=500),
    cursor: str | None = Query(None, max_length=1000),
    pipeline: str | None = Query(None, max_length=64, description="only this pipeline's"),
    kind: str | None = Query(None, max_length=64, description="only this kind, e.g. tool_call"),
) -> Page[ApprovalOut]:
    """Pending approvals the caller may decide now, earliest deadline first."""
    return await approvals.inbox(
        svc, principal, limit=limit, cursor=cursor, pipeline=pipeline, kind=kind
    )


@router.get("/{approval_id}")
async def get_approval(
    approval_id: str, svc: ServicesDep, principal: CurrentPrincipal
) -> ApprovalOut:
    return await approvals.get_approval(svc, principal, approval_id)


@router.post(
    "/{approval_id}/decision",
    dependencies=[limited("approvals.decide", "approvals:decide")],
    responses=RATE_LIMITED,
)
async def decide(
    approval_id: str, body: DecisionIn, svc: ServicesDep, principal: CurrentPrincipal
) -> DecisionOut:
    """Approve, reject, or approve with edits. 409 when the approval is no longer pending or
    the caller already decided it; 403 without the right, for one's own request, or without
    an eligible role; 422 for edits outside the proposal's schema."""
    return await approvals.decide(svc, principal, approval_id, body)
