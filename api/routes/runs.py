"""Runs: start, list (from Temporal visibility), inspect (the workflow's state query), cancel,
retry.

A run's workflow id is `<tenant>:<run_id>`. Every route builds it from the caller's tenant, so
another tenant's run is simply not found: a 404, the same as a run that never existed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Response, status
from pydantic import ValidationError
from temporalio.client import (
    WorkflowExecution,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
    WorkflowHandle,
)
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from api.deps import CurrentPrincipal, Services, ServicesDep, require
from api.errors import Conflict, Forbidden, Invalid, NotFound
from api.pipelines import PIPELINES
from api.schemas import (
    ApprovalOut,
    Page,
    RunOut,
    RunStarted,
    RunSummary,
    StartRun,
    UsageOut,
)
from policies import approvals as approval_policies
from stead import metrics
from store import approvals as approvals_store
from store import principals
from store.principals import Principal
from workflows import search
from workflows.base import PipelineWorkflow
from workflows.state import RunContext, RunInput, RunStatus, RunView, Stage

router = APIRouter(prefix="/v1/runs", tags=["runs"])

RUN_ID = re.compile(r"^r_[a-z2-7]{26}$")
_STATUS_QUERY = {
    RunStatus.RUNNING: "ExecutionStatus = 'Running'",
    RunStatus.COMPLETED: "ExecutionStatus = 'Completed'",
    RunStatus.FAILED: "ExecutionStatus IN ('Failed', 'TimedOut', 'Terminated')",
    RunStatus.CANCELLED: "ExecutionStatus = 'Canceled'",
}
_FROM_TEMPORAL = {
    WorkflowExecutionStatus.RUNNING: RunStatus.RUNNING,
    WorkflowExecutionStatus.CONTINUED_AS_NEW: RunStatus.RUNNING,
    WorkflowExecutionStatus.COMPLETED: RunStatus.COMPLETED,
    WorkflowExecutionStatus.FAILED: RunStatus.FAILED,
    WorkflowExecutionStatus.TIMED_OUT: RunStatus.FAILED,
    WorkflowExecutionStatus.TERMINATED: RunStatus.FAILED,
    WorkflowExecutionStatus.CANCELED: RunStatus.CANCELLED,
}


def workflow_id(tenant: str, run_id: str) -> str:
    return f"{tenant}:{run_id}"


def new_run_id(tenant: str, idempotency_key: str | None) -> str:
    raw = (
        hashlib.sha256(f"{tenant}\0{idempotency_key}".encode()).digest()
        if idempotency_key is not None
        else secrets.token_bytes(20)
    )
    return "r_" + base64.b32encode(raw).decode().lower()[:26]


def input_digest(body: StartRun) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def run_status(value: WorkflowExecutionStatus | None) -> RunStatus:
    return _FROM_TEMPORAL.get(value, RunStatus.RUNNING) if value else RunStatus.RUNNING


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={200: {"model": RunStarted, "description": "an existing run (same Idempotency-Key)"}},
)
async def start_run(
    body: StartRun,
    response: Response,
    svc: ServicesDep,
    principal: CurrentPrincipal,
    idempotency_key: Annotated[
        str | None, Header(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$")
    ] = None,
) -> RunStarted:
    """Start a run of a pipeline. Repeating the call with the same `Idempotency-Key` returns
    the same run (200) instead of starting another; the same key with a different body is a
    409."""
    require(svc, principal, "runs:start")
    workflow_cls = PIPELINES.get(body.pipeline)
    if workflow_cls is None:
        raise Invalid(f"unknown pipeline {body.pipeline!r}; known: {', '.join(sorted(PIPELINES))}")
    try:
        workflow_cls.input_model.model_validate(body.input)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "input"
        raise Invalid(f"input.{where}: {first['msg']}") from None

    run_id = new_run_id(principal.tenant, idempotency_key)
    digest = input_digest(body)
    async with svc.pool.acquire() as conn:
        plan = await principals.tenant_plan(conn, principal.tenant) or "standard"
        overrides = await approvals_store.overrides(conn, principal.tenant, body.pipeline)
    context = RunContext(
        tenant=principal.tenant,
        run_id=run_id,
        pipeline=body.pipeline,
        requested_by=principal.id,
        plan=plan,
        budget_usd=body.budget_usd,
        approvals=approval_policies.resolve(body.pipeline, overrides),
    )
    try:
        await svc.temporal.start_workflow(
            workflow_cls.run,  # type: ignore[attr-defined]  # every pipeline defines run
            RunInput(context=context, input=body.input),
            id=workflow_id(principal.tenant, run_id),
            task_queue=svc.settings.task_queue,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            search_attributes=TypedSearchAttributes(
                [
                    SearchAttributePair(search.PIPELINE, body.pipeline),
                    SearchAttributePair(search.CUSTOMER, principal.tenant),
                    SearchAttributePair(search.REQUESTED_BY, principal.id),
                    SearchAttributePair(search.STAGE, Stage.INTAKE.value),
                    SearchAttributePair(search.PENDING_APPROVAL, False),
                ]
            ),
            memo={"input_digest": digest},
            static_summary=f"{body.pipeline} for {principal.tenant}/{principal.id}",
        )
    except WorkflowAlreadyStartedError:
        return await _existing_run(svc, principal, run_id, digest, response)
    metrics.RUNS_STARTED.labels(body.pipeline).inc()
    return RunStarted(run_id=run_id, pipeline=body.pipeline, status=RunStatus.RUNNING, created=True)


async def _existing_run(
    svc: Services, principal: Principal, run_id: str, digest: str, response: Response
) -> RunStarted:
    handle = svc.temporal.get_workflow_handle(workflow_id(principal.tenant, run_id))
    described = await handle.describe()
    memo = await described.memo()
    if memo.get("input_digest") != digest:
        raise Conflict("Idempotency-Key was already used with a different request")
    response.status_code = status.HTTP_200_OK
    pipeline = described.typed_search_attributes.get(search.PIPELINE) or ""
    return RunStarted(
        run_id=run_id, pipeline=pipeline, status=run_status(described.status), created=False
    )


def _encode_cursor(token: bytes | None) -> str | None:
    return base64.urlsafe_b64encode(token).decode() if token else None


def _decode_cursor(cursor: str | None) -> bytes | None:
    if cursor is None:
        return None
    try:
        return base64.urlsafe_b64decode(cursor.encode())
    except (binascii.Error, ValueError):
        raise Invalid("cursor is not one this API returned") from None


def _summary(execution: WorkflowExecution | WorkflowExecutionDescription) -> RunSummary:
    attrs = execution.typed_search_attributes
    stage = attrs.get(search.STAGE)
    return RunSummary(
        run_id=execution.id.split(":", 1)[1],
        pipeline=attrs.get(search.PIPELINE) or execution.workflow_type,
        status=run_status(execution.status),
        stage=Stage(stage) if stage in set(Stage) else None,
        requested_by=attrs.get(search.REQUESTED_BY),
        pending_approval=bool(attrs.get(search.PENDING_APPROVAL)),
        error_type=attrs.get(search.ERROR_TYPE),
        started_at=execution.start_time,
        closed_at=execution.close_time,
    )


@router.get("")
async def list_runs(
    svc: ServicesDep,
    principal: CurrentPrincipal,
    stage: Stage | None = None,
    pipeline: str | None = Query(None, max_length=64),
    run_status: Annotated[RunStatus | None, Query(alias="status")] = None,
    pending_approval: bool | None = None,
    limit: int = Query(50, ge=1, le=500),
    cursor: str | None = Query(None, max_length=4096),
) -> Page[RunSummary]:
    """The caller's tenant's runs, newest first, from Temporal visibility.
    `status=failed` is the dead-letter view: runs that exhausted their retries."""
    require(svc, principal, "runs:read")
    clauses = [f"CustomerId = '{principal.tenant}'"]
    if stage is not None:
        clauses.append(f"Stage = '{stage.value}'")
    if pipeline is not None:
        if pipeline not in PIPELINES:
            raise Invalid(f"unknown pipeline {pipeline!r}")
        clauses.append(f"Pipeline = '{pipeline}'")
    if run_status is not None:
        clauses.append(_STATUS_QUERY[run_status])
    if pending_approval is not None:
        clauses.append(f"PendingApproval = {'true' if pending_approval else 'false'}")
    executions = svc.temporal.list_workflows(
        " AND ".join(clauses), page_size=limit, next_page_token=_decode_cursor(cursor)
    )
    try:
        await executions.fetch_next_page()
    except RPCError as exc:
        if exc.status is RPCStatusCode.INVALID_ARGUMENT:
            raise Invalid("cursor is not valid for this query") from None
        raise
    page = executions.current_page or []
    return Page(
        items=[_summary(e) for e in page], next_cursor=_encode_cursor(executions.next_page_token)
    )


async def describe_run(
    svc: Services, principal: Principal, run_id: str
) -> tuple[WorkflowHandle[Any, Any], WorkflowExecutionDescription]:
    if not RUN_ID.match(run_id):
        raise NotFound("no such run")
    handle = svc.temporal.get_workflow_handle(workflow_id(principal.tenant, run_id))
    try:
        described = await handle.describe()
    except RPCError as exc:
        if exc.status is RPCStatusCode.NOT_FOUND:
            raise NotFound("no such run") from None
        raise
    if described.typed_search_attributes.get(search.CUSTOMER) != principal.tenant:
        raise NotFound("no such run")
    return handle, described


async def query_state(handle: WorkflowHandle[Any, Any]) -> RunView | None:
    try:
        view: RunView = await handle.query(PipelineWorkflow.state, rpc_timeout=timedelta(seconds=5))
    except RPCError:
        return None
    return view


@router.get("/{run_id}")
async def get_run(run_id: str, svc: ServicesDep, principal: CurrentPrincipal) -> RunOut:
    """The run's state from its workflow: stage history, approvals, attempts, usage, error."""
    require(svc, principal, "runs:read")
    handle, described = await describe_run(svc, principal, run_id)
    view = await query_state(handle)
    summary = _summary(described)
    if view is None:
        return RunOut(
            run_id=run_id,
            pipeline=summary.pipeline,
            status=summary.status,
            stage=summary.stage or Stage.INTAKE,
            requested_by=summary.requested_by or "",
            started_at=summary.started_at,
            closed_at=summary.closed_at,
            state_available=False,
        )
    approvals = [ApprovalOut.of_state(run_id, view.pipeline, a) for a in view.approvals]
    return RunOut(
        run_id=run_id,
        pipeline=view.pipeline,
        status=summary.status,
        stage=view.stage,
        requested_by=view.requested_by,
        started_at=view.started_at,
        closed_at=summary.closed_at,
        stages=view.stages,
        approvals=approvals,
        pending_approvals=[a for a in approvals if a.status == "pending"],
        attempts=view.attempts,
        usage=UsageOut.of(view.usage),
        last_error=view.last_error,
        result=view.result,
    )


@router.post("/{run_id}/cancel", status_code=status.HTTP_202_ACCEPTED)
async def cancel_run(run_id: str, svc: ServicesDep, principal: CurrentPrincipal) -> RunSummary:
    """Request cancellation. Pending approvals are cancelled and running activities learn of
    it through their heartbeats; the run ends `cancelled`."""
    require(svc, principal, "runs:cancel")
    handle, described = await describe_run(svc, principal, run_id)
    _own_or_admin(svc, principal, described)
    if run_status(described.status) is not RunStatus.RUNNING:
        raise Conflict(f"the run is already {run_status(described.status).value}")
    await handle.cancel()
    return _summary(described)


def _own_or_admin(
    svc: Services, principal: Principal, described: WorkflowExecutionDescription
) -> None:
    owner = described.typed_search_attributes.get(search.REQUESTED_BY)
    if owner != principal.id and not svc.permissions.has_right(principal.roles, "runs:manage"):
        raise Forbidden("only the run's requester or an admin may do this")
