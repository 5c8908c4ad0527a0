"""/v1/runs: start, list, inspect, cancel, re-drive; what each does is in stead.service.runs.

A run's workflow id is `<tenant>:<run_id>`, built from the caller's tenant, so another tenant's
run is simply not found: a 404, the same as a run that never existed.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response, status

from stead.api.deps import ApiKeyId, CurrentPrincipal, ServicesDep
from stead.api.errors import RATE_LIMITED
from stead.contract import RunStatus, Stage
from stead.service import runs
from stead.service.schemas import Page, RetryIn, RunOut, RunStarted, RunSummary, StartRun

router = APIRouter(prefix="/v1/runs", tags=["runs"])

# Printable ASCII, no spaces: a client's own request id.
IdempotencyKey = Annotated[
    str | None, Header(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$")
]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={
        200: {"model": RunStarted, "description": "an existing run (same Idempotency-Key)"},
        **RATE_LIMITED,
    },
)
async def start_run(
    body: StartRun,
    response: Response,
    svc: ServicesDep,
    principal: CurrentPrincipal,
    key_id: ApiKeyId,
    idempotency_key: IdempotencyKey = None,
) -> RunStarted:
    """Start a run of a pipeline. Repeating the call with the same `Idempotency-Key` returns
    the same run (200) instead of starting another; the same key with a different body is a
    409."""
    started = await runs.start_run(svc, principal, key_id, body, idempotency_key)
    if not started.created:
        response.status_code = status.HTTP_200_OK
    return started


@router.get("")
async def list_runs(
    svc: ServicesDep,
    principal: CurrentPrincipal,
    stage: Stage | None = None,
    pipeline: str | None = Query(None, max_length=64),
    run_status: Annotated[RunStatus | None, Query(alias="status")] = None,
    pending_approval: bool | None = None,
    stuck: Annotated[
        bool | None, Query(description="runs whose workflow task keeps failing")
    ] = None,
    limit: int = Query(50, ge=1, le=500),
    cursor: str | None = Query(None, max_length=4096),
) -> Page[RunSummary]:
    """The caller's tenant's runs, newest first, from Temporal visibility.
    `status=failed` is the dead-letter view: runs that exhausted their retries."""
    return await runs.list_runs(
        svc,
        principal,
        stage=stage,
        pipeline=pipeline,
        run_status=run_status,
        pending_approval=pending_approval,
        stuck=stuck,
        limit=limit,
        cursor=cursor,
    )


@router.get("/{run_id}")
async def get_run(run_id: str, svc: ServicesDep, principal: CurrentPrincipal) -> RunOut:
    """The run's state from its workflow: stage history, approvals, attempts, usage, error."""
    return await runs.get_run(svc, principal, run_id)


@router.post("/{run_id}/cancel", status_code=status.HTTP_202_ACCEPTED)
async def cancel_run(run_id: str, svc: ServicesDep, principal: CurrentPrincipal) -> RunSummary:
    """Request cancellation. Pending approvals are cancelled and running activities learn of
    it through their heartbeats; the run ends `cancelled`. A stuck run (its workflow task keeps
    failing, so it cannot act on a cancel) is terminated instead, and its approvals closed."""
    return await runs.cancel_run(svc, principal, run_id)


@router.post("/{run_id}/retry", status_code=status.HTTP_202_ACCEPTED, responses=RATE_LIMITED)
async def retry_run(
    run_id: str,
    svc: ServicesDep,
    principal: CurrentPrincipal,
    key_id: ApiKeyId,
    body: RetryIn | None = None,
) -> RunStarted:
    """Re-drive a failed run, the dead-letter view's action.

    `resume` (the default) resets the workflow to the point where it scheduled the step that
    failed: completed steps are not run again (no second model bill, no second payment) and
    the failed step runs afresh. It keeps the run id. `restart` starts a new run with the same
    input and returns its id; it is also the way to re-run a cancelled run.
    """
    return await runs.retry_run(svc, principal, key_id, run_id, body.mode if body else "resume")
