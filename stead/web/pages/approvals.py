"""The inbox and one approval: what is proposed, the rule that asked for it, the run so far,
and the decision, all through stead.service (the same checks, refusals and limits as the API's
`/v1/approvals`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import ValidationError
from starlette.responses import RedirectResponse, Response

from stead.service import approvals
from stead.service.access import admit
from stead.service.errors import Forbidden, Invalid, NotFound, ServiceError
from stead.service.schemas import ApprovalOut, DecisionIn, Page
from stead.web.auth import Viewer, ViewerDep, check_csrf, read_form
from stead.web.errors import WebRoute
from stead.web.forms import FormField, edits_from_form, proposal_fields
from stead.web.pages.runs import timeline
from stead.web.render import page

router = APIRouter(route_class=WebRoute)
Text = Annotated[str | None, Query(max_length=64)]
Cursor = Annotated[str | None, Query(max_length=1000)]
ACTIONS: dict[str, Literal["approve", "reject"]] = {
    "approve": "approve",
    "approve_edits": "approve",
    "reject": "reject",
}
DONE = {"approved", "rejected", "pending"}


async def _inbox(
    viewer: Viewer, pipeline: str | None, kind: str | None, cursor: str | None
) -> Page[ApprovalOut]:
    return await approvals.inbox(
        viewer.svc,
        viewer.principal,
        cursor=cursor,
        pipeline=pipeline or None,
        kind=kind or None,
    )


def _filters(viewer: Viewer, pipeline: str | None, kind: str | None) -> dict[str, Any]:
    return {
        "pipeline": pipeline or "",
        "kind": kind or "",
        "pipelines": sorted(viewer.svc.runtime.pipelines),
        "kinds": ["tool_call", "summary", "answer", "budget"],
    }


@router.get("/inbox")
@router.get("/inbox/rows")
async def inbox(
    request: Request,
    viewer: ViewerDep,
    pipeline: Text = None,
    kind: Text = None,
    cursor: Cursor = None,
) -> Response:
    """The inbox; `/rows`, its rows alone, for a live page to refresh itself with."""
    found = await _inbox(viewer, pipeline, kind, cursor)
    if request.url.path.endswith("/rows"):
        return page(request, "_inbox_rows.html", page_of=found)
    return page(
        request,
        "inbox.html",
        page_of=found,
        refresh_ms=int(viewer.svc.settings.web_refresh_seconds * 1000),
        query=request.url.query,
        **_filters(viewer, pipeline, kind),
    )


def _fields(viewer: Viewer, approval: ApprovalOut) -> list[FormField]:
    pipeline = viewer.svc.runtime.pipeline(approval.pipeline)
    name = approval.proposal_schema or ""
    schema = pipeline.proposal_schema(name) if pipeline is not None and name else None
    return proposal_fields(schema, approval.proposal, approval.editable)


async def _approval_page(
    request: Request,
    viewer: Viewer,
    approval: ApprovalOut,
    *,
    status: int = 200,
    error: str = "",
    submitted: dict[str, str] | None = None,
) -> Response:
    try:
        shown = (await timeline(viewer, approval.run_id)).context()
    except (Forbidden, NotFound) as exc:
        # The run itself is out of reach (no `runs:read`, or gone): the approval still shows.
        shown = {"run": None, "ledger": None, "ledger_error": exc.detail}
    decided = request.query_params.get("decided", "")
    return page(
        request,
        "approval.html",
        status,
        approval=approval,
        fields=_fields(viewer, approval),
        can_decide=approvals.may_decide(viewer.svc, viewer.principal, approval),
        **shown,
        error=error,
        decided=decided if decided in DONE else "",
        submitted=submitted or {},
        refresh_ms=int(viewer.svc.settings.web_refresh_seconds * 1000),
    )


@router.get("/approvals/{approval_id}")
async def approval(request: Request, approval_id: str, viewer: ViewerDep) -> Response:
    found = await approvals.get_approval(viewer.svc, viewer.principal, approval_id)
    return await _approval_page(request, viewer, found)


@router.post("/approvals/{approval_id}/decision")
async def decide(request: Request, approval_id: str, viewer: ViewerDep) -> Response:
    form = await read_form(request)
    check_csrf(viewer, form)
    found = await approvals.get_approval(viewer.svc, viewer.principal, approval_id)
    try:
        body = _decision(viewer, found, form)
        await admit(
            viewer.svc,
            viewer.principal,
            viewer.session.limit_key,
            "approvals.decide",
            "approvals:decide",
        )
        result = await approvals.decide(viewer.svc, viewer.principal, approval_id, body)
    except NotFound:
        raise
    except ServiceError as exc:
        return await _approval_page(
            request, viewer, found, status=exc.status, error=exc.detail, submitted=form
        )
    return RedirectResponse(
        f"/ui/approvals/{approval_id}?decided={result.status.value}", status_code=303
    )


def _decision(viewer: Viewer, approval: ApprovalOut, form: dict[str, str]) -> DecisionIn:
    action = form.get("action", "")
    if action not in ACTIONS:
        raise Invalid("choose Approve, Approve with my edits or Reject")
    edits = None
    if action == "approve_edits":
        edits = edits_from_form(_fields(viewer, approval), form)
        if not edits:
            raise Invalid("you changed no field: change one, or choose Approve as proposed")
    try:
        return DecisionIn(
            decision=ACTIONS[action],
            comment=form.get("comment", "").replace("\r\n", "\n"),
            edits=edits,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "decision"
        raise Invalid(f"{where}: {first['msg']}") from None
