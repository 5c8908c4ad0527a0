"""A run's page (its state and ledger, live while it runs) and the run list with cancel and
re-drive, through stead.service.runs and stead.service.ledger like `/v1/runs`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Query, Request
from starlette.responses import RedirectResponse, Response

from stead.contract import RunStatus, Stage
from stead.service import ledger, runs
from stead.service.errors import Forbidden, Invalid, NotFound, ServiceError
from stead.service.ledger import LedgerOut
from stead.service.schemas import RunOut, RunSummary
from stead.web.auth import Viewer, ViewerDep, check_csrf, read_form
from stead.web.errors import WebRoute
from stead.web.render import page

router = APIRouter(route_class=WebRoute)
MODES: dict[str, Literal["resume", "restart"]] = {"resume": "resume", "restart": "restart"}
DONE = {"cancelled": "Cancellation requested.", "retried": "Re-driven.", "restarted": ""}


def temporal_link(viewer: Viewer, run_id: str) -> str | None:
    """The run in the Temporal Web UI, when its URL is known."""
    base = viewer.svc.settings.temporal_ui_base
    if base is None:
        return None
    ns = quote(viewer.svc.settings.temporal_namespace, safe="")
    workflow = quote(runs.workflow_id(viewer.principal.tenant, run_id), safe="")
    return f"{base}/namespaces/{ns}/workflows/{workflow}"


@dataclass(frozen=True)
class Timeline:
    """What `_timeline.html` shows: the run's state and its ledger (or why not)."""

    run: RunOut
    ledger: LedgerOut | None
    ledger_error: str

    def context(self) -> dict[str, Any]:
        return {"run": self.run, "ledger": self.ledger, "ledger_error": self.ledger_error}


async def timeline(viewer: Viewer, run_id: str) -> Timeline:
    """The run and its ledger as the viewer may see them; a viewer without the right to the
    ledger (`audit:read`) sees the run without it."""
    run = await runs.get_run(viewer.svc, viewer.principal, run_id)
    try:
        return Timeline(run, await ledger.run_ledger(viewer.svc, viewer.principal, run_id), "")
    except Forbidden as exc:
        return Timeline(run, None, exc.detail)


async def _run_page(
    request: Request, viewer: Viewer, run_id: str, *, status: int = 200, error: str = ""
) -> Response:
    shown = await timeline(viewer, run_id)
    done = request.query_params.get("done", "")
    return page(
        request,
        "run.html",
        status,
        **shown.context(),
        temporal_url=temporal_link(viewer, run_id),
        actions=_actions(viewer, shown.run),
        error=error,
        done=DONE.get(done, ""),
        refresh_ms=int(viewer.svc.settings.web_refresh_seconds * 1000),
    )


def _actions(viewer: Viewer, run: RunOut | RunSummary) -> dict[str, bool]:
    """Which buttons to offer; the service layer decides (owner or admin, the run's state)."""
    running = run.status == RunStatus.RUNNING
    ended = run.status in (RunStatus.FAILED, RunStatus.CANCELLED)
    return {
        "cancel": running and viewer.can("runs:cancel"),
        "resume": run.status == RunStatus.FAILED and viewer.can("runs:retry"),
        "restart": ended and viewer.can("runs:retry") and viewer.can("runs:start"),
    }


@router.get("/runs/{run_id}")
async def run_page(request: Request, run_id: str, viewer: ViewerDep) -> Response:
    return await _run_page(request, viewer, run_id)


@router.get("/runs/{run_id}/timeline")
async def run_timeline(request: Request, run_id: str, viewer: ViewerDep) -> Response:
    """The run's state and ledger alone, for a live page to refresh itself with."""
    return page(request, "_timeline.html", **(await timeline(viewer, run_id)).context())


@router.post("/runs/{run_id}/cancel")
async def cancel(request: Request, run_id: str, viewer: ViewerDep) -> Response:
    check_csrf(viewer, await read_form(request))
    try:
        await runs.cancel_run(viewer.svc, viewer.principal, run_id)
    except NotFound:
        raise
    except ServiceError as exc:
        return await _run_page(request, viewer, run_id, status=exc.status, error=exc.detail)
    return RedirectResponse(f"/ui/runs/{run_id}?done=cancelled", status_code=303)


@router.post("/runs/{run_id}/retry")
async def retry(request: Request, run_id: str, viewer: ViewerDep) -> Response:
    form = await read_form(request)
    check_csrf(viewer, form)
    mode = form.get("mode", "resume")
    try:
        if mode not in ("resume", "restart"):
            raise Invalid("re-drive mode is resume or restart")
        started = await runs.retry_run(
            viewer.svc,
            viewer.principal,
            viewer.session.limit_key,
            run_id,
            mode,  # type: ignore[arg-type]  # checked above
        )
    except NotFound:
        raise
    except ServiceError as exc:
        return await _run_page(request, viewer, run_id, status=exc.status, error=exc.detail)
    done = "retried" if started.run_id == run_id else "restarted"
    return RedirectResponse(f"/ui/runs/{started.run_id}?done={done}", status_code=303)


# --- the run list ----------------------------------------------------------------------------

Flag = Literal["", "true", "false"]


@router.get("/runs")
async def run_list(
    request: Request,
    viewer: ViewerDep,
    stage: Annotated[Stage | Literal[""], Query()] = "",
    pipeline: Annotated[str, Query(max_length=64)] = "",
    status: Annotated[RunStatus | Literal[""], Query()] = "",
    waiting: Annotated[Flag, Query()] = "",
    stuck: Annotated[Flag, Query()] = "",
    cursor: Annotated[str | None, Query(max_length=4096)] = None,
) -> Response:
    found = await runs.list_runs(
        viewer.svc,
        viewer.principal,
        stage=stage or None,
        pipeline=pipeline or None,
        run_status=status or None,
        pending_approval=None if not waiting else waiting == "true",
        stuck=None if not stuck else stuck == "true",
        cursor=cursor,
    )
    filters = {
        "stage": stage.value if stage else "",
        "pipeline": pipeline,
        "status": status.value if status else "",
        "waiting": waiting,
        "stuck": stuck,
    }
    more = None
    if found.next_cursor:
        more = urlencode({**{k: v for k, v in filters.items() if v}, "cursor": found.next_cursor})
    return page(
        request,
        "runs.html",
        page_of=found,
        filters=filters,
        more=more,
        stages=[s.value for s in Stage],
        statuses=[s.value for s in RunStatus],
        pipelines=sorted(viewer.svc.runtime.pipelines),
        actions={r.run_id: _actions(viewer, r) for r in found.items},
    )
