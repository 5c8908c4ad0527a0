"""Approvals: the caller's inbox, one approval, and deciding it, for every front alike.

A decision is a Temporal update to the run's workflow. Its validator is the authority on the
approval's state (not pending, already decided, self-approval, role, edits): a refused
decision changes nothing in the run and is never written to its history. The API adds what
only it knows: who the caller is and what rights they hold right now.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from temporalio.client import (
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from stead import metrics
from stead.contract import ApprovalStatus, DecideInput, DecideResult, Proposal
from stead.errors import ErrorType
from stead.pipeline.base import Pipeline
from stead.pipeline.proposals import InvalidEdits, apply_edits
from stead.policy.permissions import evaluate
from stead.service.access import Services, attest, require
from stead.service.errors import Conflict, Forbidden, Invalid, NotFound, ServiceError, Unavailable
from stead.service.proposals import proposal_viewer
from stead.service.schemas import ApprovalOut, DecisionIn, DecisionOut, Page
from stead.store import approvals as approvals_store
from stead.store import policy as policy_store
from stead.store.principals import Principal

_REFUSALS: dict[str, type[ServiceError]] = {
    ErrorType.APPROVAL_NOT_FOUND: NotFound,
    ErrorType.APPROVAL_NOT_PENDING: Conflict,
    ErrorType.ALREADY_DECIDED: Conflict,
    ErrorType.SELF_APPROVAL: Forbidden,
    ErrorType.NOT_ELIGIBLE: Forbidden,
    ErrorType.INVALID_EDITS: Invalid,
}
# Refusals that mean this deployment is misconfigured, not that the caller asked wrongly.
_MISCONFIGURED = {ErrorType.NOT_ATTESTED}
# An approval reaches the inbox (published by a local activity) before the workflow task that
# created it is in the run's history. If the worker dies in between, the next worker re-creates
# it under the same id (from the workflow's deterministic random), but it applies a decision
# waiting for the run before the rest of that task, so the validator answers "no such approval
# in this run". Found by the kill-during-approval-wait drill (tests/test_drills.py). When the
# store says the approval is pending, a refusal for that reason is retried a few times.
_NOT_YET_ATTEMPTS = 5
_NOT_YET_DELAY_SECONDS = 0.5


def _cursor(row: ApprovalOut) -> str:
    return base64.urlsafe_b64encode(
        f"{row.deadline_at.isoformat()}|{row.approval_id}".encode()
    ).decode()


def _after(cursor: str | None) -> tuple[datetime, str] | None:
    if cursor is None:
        return None
    try:
        when, approval_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        return datetime.fromisoformat(when), approval_id
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise Invalid("cursor is not one this API returned") from None


async def inbox(
    svc: Services,
    principal: Principal,
    *,
    limit: int = 50,
    cursor: str | None = None,
    pipeline: str | None = None,
    kind: str | None = None,
) -> Page[ApprovalOut]:
    """Pending approvals the caller may decide now, earliest deadline first; `pipeline` and
    `kind` narrow them."""
    require(svc, principal, "approvals:read")
    async with svc.pool.acquire() as conn:
        rows = await approvals_store.inbox(
            conn,
            principal.tenant,
            principal.id,
            principal.roles,
            limit=limit + 1,
            after=_after(cursor),
            pipeline=pipeline,
            kind=kind,
        )
        viewer = await proposal_viewer(svc, conn, principal)
    page = rows[:limit]
    ended = await _ended_runs(svc, principal.tenant, page)
    items = [viewer.show(ApprovalOut.of_row(r)) for r in page if r["workflow_id"] not in ended]
    more = len(rows) > limit
    return Page(items=items, next_cursor=_cursor(ApprovalOut.of_row(page[-1])) if more else None)


async def _ended_runs(svc: Services, tenant: str, rows: list[dict[str, Any]]) -> set[str]:
    """Workflow ids among `rows` whose runs ended without closing their approvals (terminated
    through Temporal, or by a stuck-run cancel): their approvals are closed here and never
    shown. One visibility query per inbox page; without Temporal the page is shown as is."""
    workflow_ids = sorted({r["workflow_id"] for r in rows})
    if not workflow_ids:
        return set()
    quoted = ", ".join("'" + w.replace("'", "") + "'" for w in workflow_ids)
    try:
        # Visibility is cheap but lags, and lists every run of an id (a re-driven run's failed
        # predecessor too): it only names candidates; describing the current run decides.
        candidates = {
            execution.id
            async for execution in svc.temporal.list_workflows(
                f"WorkflowId IN ({quoted}) AND ExecutionStatus != 'Running'"
            )
        }
        ended = set()
        for candidate in candidates:
            described = await svc.temporal.get_workflow_handle(candidate).describe()
            if described.status is not WorkflowExecutionStatus.RUNNING:
                ended.add(candidate)
    except RPCError:
        return set()
    if ended:
        async with svc.pool.acquire() as conn:
            for row in rows:
                if row["workflow_id"] in ended:
                    await approvals_store.close_for_run(conn, tenant, row["run_id"], "cancelled")
    return ended


async def get_approval(svc: Services, principal: Principal, approval_id: str) -> ApprovalOut:
    require(svc, principal, "approvals:read")
    async with svc.pool.acquire() as conn:
        row = await approvals_store.get(conn, principal.tenant, approval_id)
        viewer = await proposal_viewer(svc, conn, principal)
    if row is None:
        raise NotFound("no such approval")
    return viewer.show(ApprovalOut.of_row(row))


def may_decide(svc: Services, principal: Principal, approval: ApprovalOut) -> bool:
    """Whether to offer the caller a decision on `approval` (a page's buttons): pending, not
    their own request, not decided by them yet, their right and an eligible role or name.
    Only a hint: `decide` and the run's validator refuse what they must, whatever a page
    offered (a tool call's approver must also hold the right to make the call)."""
    return (
        approval.status == ApprovalStatus.PENDING
        and svc.permissions.has_right(principal.roles, "approvals:decide")
        and approval.requested_by != principal.id
        and principal.id not in approval.decided_by
        and (
            principal.id in approval.eligible_principals
            or principal.has_role(*approval.eligible_roles)
        )
    )


async def decide(
    svc: Services, principal: Principal, approval_id: str, body: DecisionIn
) -> DecisionOut:
    """Approve, reject, or approve with edits. 409 when the approval is no longer pending or
    the caller already decided it; 403 without the right, for one's own request, or without
    an eligible role; 422 for edits outside the proposal's schema."""
    require(svc, principal, "approvals:decide")
    async with svc.pool.acquire() as conn:
        row = await approvals_store.get(conn, principal.tenant, approval_id)
    if row is None:
        raise NotFound("no such approval")
    if not approvals_store.is_open(row):
        raise Conflict(f"approval is already {row['status']}")
    proposal = Proposal(
        kind=row["kind"],
        title=row["title"],
        schema_name=row["proposal"]["schema"],
        data=row["proposal"]["data"],
        editable=tuple(row["proposal"].get("editable", ())),
        context=row["proposal"].get("context", {}),
    )
    pipeline = svc.runtime.pipeline(row["pipeline"])
    schema = pipeline.proposal_schema(proposal.schema_name) if pipeline else None
    final = proposal.data
    if body.edits:
        try:
            final = apply_edits(schema, proposal, proposal.data, body.edits)
        except InvalidEdits as exc:
            raise Invalid(str(exc)) from None
    if proposal.kind == "tool_call" and body.decision == "approve":
        await _approver_holds_the_right(svc, principal, proposal, final)
    handle = svc.temporal.get_workflow_handle(row["workflow_id"])
    decision = attest(
        svc,
        row["workflow_id"],
        DecideInput(
            approval_id=approval_id,
            principal=principal.id,
            roles=principal.roles,
            decision=body.decision,
            comment=body.comment,
            edits=body.edits,
            attested_at=datetime.now(UTC),
        ),
    )
    result = await _send(svc, principal, row, handle, decision)
    async with svc.pool.acquire() as conn:
        await approvals_store.record_decision(conn, principal.tenant, approval_id, result)
    return DecisionOut(
        approval_id=approval_id,
        status=result.status,
        approvals=result.approvals,
        quorum=result.quorum,
    )


async def _send(
    svc: Services,
    principal: Principal,
    row: dict[str, Any],
    handle: WorkflowHandle[Any, Any],
    decision: DecideInput,
) -> DecideResult:
    """Deliver the decision to the run; map the run's refusals to API errors."""
    for attempt in range(1, _NOT_YET_ATTEMPTS + 1):
        try:
            return await handle.execute_update(
                Pipeline.decide, decision, rpc_timeout=timedelta(seconds=30)
            )
        except WorkflowUpdateFailedError as exc:
            cause = exc.cause
            if not isinstance(cause, ApplicationError):
                raise
            if cause.type == "AcceptedUpdateCompletedWorkflow":
                # The run ended (its deadline, a cancel) while the decision was in flight.
                await _close_ended_run(svc, principal, row)
            if cause.type in _MISCONFIGURED:
                # The API signs with keys the workers do not hold: an operator's problem.
                raise Unavailable(
                    f"the run's worker refused the decision: {cause.message}"
                ) from None
            if cause.type not in _REFUSALS:
                raise
            if cause.type == ErrorType.APPROVAL_NOT_FOUND and attempt < _NOT_YET_ATTEMPTS:
                # The store says pending: the run has not re-created it yet (see above).
                await asyncio.sleep(_NOT_YET_DELAY_SECONDS)
                continue
            raise _REFUSALS[cause.type](cause.message) from None
        except WorkflowUpdateRPCTimeoutOrCancelledError:
            raise Unavailable("the run did not answer in time; no worker may be running") from None
        except RPCError as exc:
            if exc.status in (RPCStatusCode.NOT_FOUND, RPCStatusCode.FAILED_PRECONDITION):
                # The run ended without closing the approval (terminated): close it now.
                await _close_ended_run(svc, principal, row)
            if "closing workflow" in exc.message:
                # The run ended before its worker took the decision.
                await _close_ended_run(svc, principal, row)
            raise
    raise Conflict("the approval is not in the run yet; try again shortly")


async def _close_ended_run(svc: Services, principal: Principal, row: dict[str, Any]) -> None:
    async with svc.pool.acquire() as conn:
        await approvals_store.close_for_run(conn, principal.tenant, row["run_id"], "cancelled")
    raise Conflict("the run is no longer running")


async def _approver_holds_the_right(
    svc: Services, principal: Principal, proposal: Proposal, arguments: dict[str, Any]
) -> None:
    """Approving a tool call needs the right to make that exact call yourself, now: e.g. only
    a user who may refund this amount may approve an agent's refund."""
    spec = svc.runtime.tools.get(proposal.schema_name.removeprefix("tool:"))
    if spec is None:
        raise Conflict("this approval names a tool that no longer exists")
    async with svc.pool.acquire() as conn:
        overrides = await policy_store.overrides(conn, principal.tenant)
    grants = svc.permissions.user_grants(principal.roles, principal.id, overrides)
    # A tenant's approval gate applies to the agent's call, not to the approver deciding it.
    verdict = evaluate(
        replace(grants, gates=()), spec.action, spec.resource, arguments, proposal.context
    )
    if not verdict.allowed:
        metrics.PERMISSION_DENIALS.labels("approval", spec.name).inc()
        raise Forbidden(
            f"approving needs the right to {spec.action} {spec.resource} yourself"
            f" ({verdict.reason or verdict.effect})"
        )
