"""Runs: start, list (from Temporal visibility), inspect (the workflow's state query), cancel,
re-drive. Every front (the HTTP API, the web pages, schedules) does these through here, so each
checks the same rights and limits.

A run's workflow id is `<tenant>:<run_id>`. Every route builds it from the caller's tenant, so
another tenant's run is simply not found: a 404, the same as a run that never existed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import ValidationError
from temporalio.api.common.v1 import WorkflowExecution as ExecutionRef
from temporalio.api.history.v1 import HistoryEvent
from temporalio.api.workflowservice.v1 import ResetWorkflowExecutionRequest
from temporalio.client import (
    WorkflowExecution,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from stead import metrics, search
from stead.builtin import STARTED_BY_ROUTE
from stead.config import Settings
from stead.contract import (
    WORKFLOW_REVISION,
    AuditEvent,
    CancelInput,
    ErrorInfo,
    RunContext,
    RunInput,
    RunStatus,
    RunView,
    Stage,
)
from stead.errors import ErrorType
from stead.pipeline.base import Pipeline
from stead.policy import approvals as approval_policies
from stead.service.access import Services, admit_start, attest, require
from stead.service.errors import Conflict, Forbidden, Invalid, NotFound, Unavailable
from stead.service.proposals import proposal_viewer
from stead.service.schemas import (
    ApprovalOut,
    Page,
    RunOut,
    RunStarted,
    RunSummary,
    StartRun,
    UsageOut,
)
from stead.store import approvals as approvals_store
from stead.store.principals import Principal

RUN_ID = re.compile(r"^r_[a-z2-7]{26}$")
# A workflow task that failed this many times in a row is not a passing fault: the run is stuck.
STUCK_ATTEMPTS = 3
STUCK_QUERY = f"{search.REPORTED_PROBLEMS} IS NOT NULL AND ExecutionStatus = 'Running'"
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


async def start_run(
    svc: Services,
    principal: Principal,
    key_id: str,
    body: StartRun,
    idempotency_key: str | None = None,
) -> RunStarted:
    """Start a run of a pipeline. With the same `idempotency_key` the same run comes back
    (`created` false) instead of another; the same key with a different body is a Conflict."""
    require(svc, principal, "runs:start")
    check_start(svc, body)
    run_id = new_run_id(principal.tenant, idempotency_key)
    digest = input_digest(body)
    context = await new_context(svc, principal, key_id, body.pipeline, run_id, body.budget_usd)
    deferred = {"defer": body.defer, "defer_deadline_seconds": body.defer_deadline_seconds}
    context = context.model_copy(update=deferred)
    try:
        await launch(svc, RunInput(context=context, input=body.input), digest)
    except WorkflowAlreadyStartedError:
        return await _existing_run(svc, principal, run_id, digest)
    metrics.RUNS_STARTED.labels(body.pipeline).inc()
    return RunStarted(run_id=run_id, pipeline=body.pipeline, status=RunStatus.RUNNING, created=True)


def check_start(svc: Services, body: StartRun) -> None:
    """Invalid unless `body` names a pipeline callers may start, with input its model takes
    (a schedule checks its run's body with this when it is created)."""
    pipelines = svc.runtime.pipelines
    workflow_cls = pipelines.get(body.pipeline)
    if workflow_cls is None:
        known = ", ".join(sorted(set(pipelines) - set(STARTED_BY_ROUTE)))
        raise Invalid(f"unknown pipeline {body.pipeline!r}; known: {known}")
    if body.pipeline in STARTED_BY_ROUTE:
        raise Invalid(f"pipeline {body.pipeline!r} is started by {STARTED_BY_ROUTE[body.pipeline]}")
    try:
        # Strictly, as the JSON it came as: what OpenAPI documents for the pipeline's input
        # (stead.service.catalog) is what is accepted; lax mode took `"review": 0` for false.
        workflow_cls.input_model.model_validate_json(json.dumps(body.input), strict=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "input"
        raise Invalid(f"input.{where}: {first['msg']}") from None


async def new_context(
    svc: Services,
    principal: Principal,
    key_id: str,
    pipeline: str,
    run_id: str,
    budget_usd: float | None,
) -> RunContext:
    """A new run's context, once the plan's limits admit it: the caller, and the tenant's plan
    and approval policies as they are now (a run keeps them to its end; a restart takes them
    afresh)."""
    try:
        plan, overrides = await admit_start(svc, principal, key_id, pipeline)
    except ValidationError as exc:
        # A stored override that today's bounds refuse (written before they existed).
        where = ".".join(str(p) for p in exc.errors()[0]["loc"])
        raise Conflict(
            f"the tenant's approval policy for {pipeline} is invalid ({where}): an admin must"
            " set it again"
        ) from None
    return RunContext(
        tenant=principal.tenant,
        run_id=run_id,
        pipeline=pipeline,
        requested_by=principal.id,
        plan=plan,
        budget_usd=budget_usd,
        approvals=approval_policies.resolve(pipeline, overrides, svc.runtime.policies.approvals),
    )


async def launch(svc: Services, run: RunInput, digest: str) -> None:
    """Start the run's workflow; its id makes a second start with the same id fail. Every start
    comes through here, so this is where the run learns where its model calls go."""
    limited = svc.settings.model_calls_per_second is not None
    update = {"limited_model_queue": limited, "revision": WORKFLOW_REVISION}
    ctx = run.context.model_copy(update=update)
    run = run.model_copy(update={"context": ctx})
    await svc.temporal.start_workflow(
        svc.runtime.pipelines[ctx.pipeline].run,
        run,
        id=workflow_id(ctx.tenant, ctx.run_id),
        task_queue=svc.settings.task_queue,
        id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
        search_attributes=TypedSearchAttributes(
            [
                SearchAttributePair(search.PIPELINE, ctx.pipeline),
                SearchAttributePair(search.CUSTOMER, ctx.tenant),
                SearchAttributePair(search.REQUESTED_BY, ctx.requested_by),
                SearchAttributePair(search.STAGE, Stage.INTAKE.value),
                SearchAttributePair(search.PENDING_APPROVAL, False),
            ]
        ),
        memo={"input_digest": digest},
        static_summary=f"{ctx.pipeline} for {ctx.tenant}/{ctx.requested_by}",
    )


async def _existing_run(
    svc: Services, principal: Principal, run_id: str, digest: str
) -> RunStarted:
    handle = svc.temporal.get_workflow_handle(workflow_id(principal.tenant, run_id))
    described = await handle.describe()
    memo = await described.memo()
    if memo.get("input_digest") != digest:
        raise Conflict("Idempotency-Key was already used with a different request")
    pipeline = described.typed_search_attributes.get(search.PIPELINE) or ""
    return RunStarted(
        run_id=run_id, pipeline=pipeline, status=run_status(described.status), created=False
    )


# Visibility page tokens go out with a MAC prefix over the token and the query it pages.
# Temporal answers a token it never issued with an opaque UNKNOWN error, after the client has
# retried it for seconds: a 500 (found by the schemathesis drill in tests/test_drills.py). The
# MAC refuses such a cursor, or one from another query or tenant, up front. Its key derives from
# the current payload key, so every API replica accepts every replica's cursors; a rotation
# retires the cursors in flight (a 400: list again).
_CURSOR_MAC_BYTES = 16


def _cursor_mac(settings: Settings, query: str, token: bytes) -> bytes:
    keys = settings.encryption_keys
    key = hashlib.sha256(b"stead-runs-cursor\0" + (keys[0][1] if keys else b"")).digest()
    message = query.encode() + b"\0" + token
    return hmac.new(key, message, hashlib.sha256).digest()[:_CURSOR_MAC_BYTES]


def _encode_cursor(settings: Settings, query: str, token: bytes | None) -> str | None:
    if not token:
        return None
    return base64.urlsafe_b64encode(_cursor_mac(settings, query, token) + token).decode()


def _decode_cursor(settings: Settings, query: str, cursor: str | None) -> bytes | None:
    if cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor.encode())
    except (binascii.Error, ValueError):
        raise Invalid("cursor is not one this API returned for this query") from None
    mac, token = raw[:_CURSOR_MAC_BYTES], raw[_CURSOR_MAC_BYTES:]
    if not token or not hmac.compare_digest(mac, _cursor_mac(settings, query, token)):
        raise Invalid("cursor is not one this API returned for this query")
    return token


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
        stuck=_reported_stuck(execution),
        error_type=attrs.get(search.ERROR_TYPE),
        started_at=execution.start_time,
        closed_at=execution.close_time,
    )


def _reported_stuck(execution: WorkflowExecution | WorkflowExecutionDescription) -> bool:
    """Temporal flags a run whose workflow tasks keep failing with `TemporalReportedProblems`
    (after `system.numConsecutiveWorkflowTaskProblemsToTriggerSearchAttribute` failures)."""
    if execution.status is not WorkflowExecutionStatus.RUNNING:
        return False
    fields = execution.raw_info.search_attributes.indexed_fields
    return search.REPORTED_PROBLEMS in fields


def _task_failing(described: WorkflowExecutionDescription) -> bool:
    """The run's current workflow task has failed before: the run is not moving."""
    if described.status is not WorkflowExecutionStatus.RUNNING:
        return False
    pending = described.raw_description.pending_workflow_task
    return _reported_stuck(described) or pending.attempt >= STUCK_ATTEMPTS


async def _task_failure(svc: Services, handle: WorkflowHandle[Any, Any]) -> ErrorInfo | None:
    """The latest workflow-task failure in the run's history, decoded (it is encrypted)."""
    last = None
    async for event in handle.fetch_history_events():
        if event.HasField("workflow_task_failed_event_attributes"):
            last = event.workflow_task_failed_event_attributes.failure
    if last is None:
        return None
    error = await svc.temporal.data_converter.decode_failure(last)
    return ErrorInfo(type="WorkflowTaskFailed", message=str(error)[:500], retryable=False)


async def list_runs(
    svc: Services,
    principal: Principal,
    *,
    stage: Stage | None = None,
    pipeline: str | None = None,
    run_status: RunStatus | None = None,
    pending_approval: bool | None = None,
    stuck: bool | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> Page[RunSummary]:
    """The caller's tenant's runs, newest first, from Temporal visibility.
    `status=failed` is the dead-letter view: runs that exhausted their retries."""
    require(svc, principal, "runs:read")
    clauses = [f"CustomerId = '{principal.tenant}'"]
    if stage is not None:
        clauses.append(f"Stage = '{stage.value}'")
    if pipeline is not None:
        if pipeline not in svc.runtime.pipelines:
            raise Invalid(f"unknown pipeline {pipeline!r}")
        clauses.append(f"Pipeline = '{pipeline}'")
    if run_status is not None:
        clauses.append(_STATUS_QUERY[run_status])
    if pending_approval is not None:
        clauses.append(f"PendingApproval = {'true' if pending_approval else 'false'}")
    if stuck is not None:
        clauses.append(STUCK_QUERY if stuck else f"{search.REPORTED_PROBLEMS} IS NULL")
    query = " AND ".join(clauses)
    token = _decode_cursor(svc.settings, query, cursor)
    executions = svc.temporal.list_workflows(query, page_size=limit, next_page_token=token)
    try:
        await executions.fetch_next_page()
    except RPCError as exc:
        # Without payload keys the MAC is unkeyed and a cursor can be forged: whatever Temporal
        # makes of a caller's token is the caller's error, never a 500.
        if exc.status is RPCStatusCode.INVALID_ARGUMENT or token is not None:
            raise Invalid("cursor is not valid for this query") from None
        raise
    page = executions.current_page or []
    next_cursor = _encode_cursor(svc.settings, query, executions.next_page_token)
    return Page(items=[_summary(e) for e in page], next_cursor=next_cursor)


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
        view: RunView = await handle.query(Pipeline.state, rpc_timeout=timedelta(seconds=5))
    except RPCError:
        return None
    return view


async def get_run(svc: Services, principal: Principal, run_id: str) -> RunOut:
    """The run's state from its workflow: stage history, approvals, attempts, usage, error."""
    require(svc, principal, "runs:read")
    handle, described = await describe_run(svc, principal, run_id)
    stuck = _task_failing(described)
    # A stuck run cannot answer a query (no workflow task completes): don't wait for one.
    view = None if stuck else await query_state(handle)
    summary = _summary(described)
    stuck_error = await _task_failure(svc, handle) if stuck else None
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
            stuck=stuck,
            stuck_error=stuck_error,
        )
    approvals = [ApprovalOut.of_state(run_id, view.pipeline, a) for a in view.approvals]
    if approvals:
        async with svc.pool.acquire() as conn:
            viewer = await proposal_viewer(svc, conn, principal)
        approvals = [viewer.show(a) for a in approvals]
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
        progress=view.progress,
    )


async def cancel_run(svc: Services, principal: Principal, run_id: str) -> RunSummary:
    """Request cancellation. Pending approvals are cancelled and running activities learn of
    it through their heartbeats; the run ends `cancelled`. A stuck run (its workflow task keeps
    failing, so it cannot act on a cancel) is terminated instead, and its approvals closed."""
    require(svc, principal, "runs:cancel")
    handle, described = await describe_run(svc, principal, run_id)
    _own_or_admin(svc, principal, described)
    if run_status(described.status) is not RunStatus.RUNNING:
        raise Conflict(f"the run is already {run_status(described.status).value}")
    if _task_failing(described):
        await _terminate_stuck(svc, principal, handle, run_id)
        return _summary(described)
    request = attest(
        svc, handle.id, CancelInput(principal=principal.id, attested_at=datetime.now(UTC))
    )
    try:
        await handle.execute_update(
            Pipeline.request_cancel, request, rpc_timeout=timedelta(seconds=10)
        )
    except WorkflowUpdateFailedError as exc:
        cause = exc.cause
        if isinstance(cause, ApplicationError) and cause.type == ErrorType.RUN_NOT_RUNNING:
            raise Conflict(cause.message) from None
        if isinstance(cause, ApplicationError) and cause.type == ErrorType.NOT_ATTESTED:
            raise Unavailable(f"the run's worker refused the cancel: {cause.message}") from None
        await _conflict_if_closed(handle)
        raise
    except WorkflowUpdateRPCTimeoutOrCancelledError:
        # No worker took it in time: cancel anyway (the run acts on it when a worker returns);
        # the API's own entry says who asked, as the run cannot record it now.
        await audit_run(svc, principal, run_id, "run.cancel_requested", {"worker": "absent"})
    except RPCError:
        await _conflict_if_closed(handle)
        raise
    try:
        await handle.cancel()
    except RPCError:
        await _conflict_if_closed(handle)
        raise
    return _summary(described)


async def _conflict_if_closed(handle: WorkflowHandle[Any, Any]) -> None:
    """The run ended between our look and our cancel (Temporal aborts the update, or refuses
    the cancel): that is the caller's race to lose, a 409 naming how it ended, never a 500."""
    described = await handle.describe()
    ended = run_status(described.status)
    if ended is not RunStatus.RUNNING:
        raise Conflict(f"the run ended {ended.value} before the cancel took effect")


async def _terminate_stuck(
    svc: Services, principal: Principal, handle: WorkflowHandle[Any, Any], run_id: str
) -> None:
    await handle.terminate(reason=f"stuck run cancelled by {principal.id} through Stead")
    async with svc.pool.acquire() as conn:
        closed = await approvals_store.close_for_run(conn, principal.tenant, run_id, "cancelled")
    await audit_run(
        svc, principal, run_id, "run.cancelled", {"terminated": True, "approvals_closed": closed}
    )


def _own_or_admin(
    svc: Services, principal: Principal, described: WorkflowExecutionDescription
) -> None:
    owner = described.typed_search_attributes.get(search.REQUESTED_BY)
    if owner != principal.id and not svc.permissions.has_right(principal.roles, "runs:manage"):
        raise Forbidden("only the run's requester or an admin may do this")


async def retry_run(
    svc: Services,
    principal: Principal,
    key_id: str,
    run_id: str,
    mode: Literal["resume", "restart"] = "resume",
) -> RunStarted:
    """Re-drive a failed run, the dead-letter view's action.

    `resume` (the default) resets the workflow to the point where it scheduled the step that
    failed: completed steps are not run again (no second model bill, no second payment) and
    the failed step runs afresh. It keeps the run id. `restart` starts a new run with the same
    input and returns its id; it is also the way to re-run a cancelled run.
    """
    require(svc, principal, "runs:retry")
    handle, described = await describe_run(svc, principal, run_id)
    _own_or_admin(svc, principal, described)
    state = run_status(described.status)
    if state in (RunStatus.RUNNING, RunStatus.COMPLETED):
        raise Conflict(f"the run is {state.value}; only failed or cancelled runs can be retried")
    events = [e async for e in handle.fetch_history_events()]
    if mode == "restart":
        # A restart is a new start: the caller needs the right to start, and the new run takes
        # today's plan and approval policies, not the frozen ones of the run it replaces.
        require(svc, principal, "runs:start")
        original = await _original_input(svc, events)
        context = await new_context(
            svc,
            principal,
            key_id,
            original.context.pipeline,
            new_run_id(principal.tenant, None),
            original.context.budget_usd,
        )
        kept = original.context.model_dump(include={"defer", "defer_deadline_seconds"})
        run = RunInput(context=context.model_copy(update=kept), input=original.input)
        await launch(svc, run, (await described.memo()).get("input_digest", ""))
        redriven = {"mode": "restart", "new_run_id": context.run_id}
        await audit_run(svc, principal, run_id, "run.redriven", redriven)
        metrics.RUNS_STARTED.labels(context.pipeline).inc()
        return RunStarted(
            run_id=context.run_id, pipeline=context.pipeline, status=RunStatus.RUNNING, created=True
        )
    if state is RunStatus.CANCELLED:
        raise Conflict("a cancelled run cannot resume; retry with mode=restart")
    reset_point = _failed_step_task(events)
    if reset_point is None:
        raise Conflict("the run did not fail in a step that can be resumed; use mode=restart")
    reset = await svc.temporal.workflow_service.reset_workflow_execution(
        ResetWorkflowExecutionRequest(
            namespace=svc.temporal.namespace,
            workflow_execution=ExecutionRef(workflow_id=handle.id, run_id=described.run_id),
            reason=f"re-driven by {principal.id}",
            workflow_task_finish_event_id=reset_point,
            request_id=str(uuid.uuid4()),
        )
    )
    await audit_run(
        svc, principal, run_id, "run.redriven", {"mode": "resume", "temporal_run_id": reset.run_id}
    )
    pipeline = described.typed_search_attributes.get(search.PIPELINE) or ""
    return RunStarted(run_id=run_id, pipeline=pipeline, status=RunStatus.RUNNING, created=False)


def _failed_step_task(events: list[HistoryEvent]) -> int | None:
    """The workflow task that scheduled the last failed activity: where `resume` resets to."""
    by_id = {e.event_id: e for e in events}
    for event in reversed(events):
        if event.HasField("activity_task_failed_event_attributes"):
            scheduled = event.activity_task_failed_event_attributes.scheduled_event_id
        elif event.HasField("activity_task_timed_out_event_attributes"):
            scheduled = event.activity_task_timed_out_event_attributes.scheduled_event_id
        else:
            continue
        attrs = by_id[scheduled].activity_task_scheduled_event_attributes
        return int(attrs.workflow_task_completed_event_id)
    return None


async def _original_input(svc: Services, events: list[HistoryEvent]) -> RunInput:
    started = events[0].workflow_execution_started_event_attributes
    decoded = await svc.temporal.data_converter.decode(started.input.payloads, [RunInput])
    run: RunInput = decoded[0]
    return run


async def audit_run(
    svc: Services, principal: Principal, run_id: str, action: str, data: dict[str, Any]
) -> None:
    """An entry the API writes itself: what it did to a run in the caller's name."""
    event = AuditEvent(
        key=f"{run_id}:{action}:{uuid.uuid4().hex}",
        tenant=principal.tenant,
        actor=principal.id,
        actor_kind="user",
        action=action,
        run_id=run_id,
        at=datetime.now(UTC),
        data=data,
    )
    await svc.audit.record(svc.pool, [event])
