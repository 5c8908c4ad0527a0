"""What every Stead pipeline shares: explicit run state, approvals, the audit outbox.

A pipeline subclasses `PipelineWorkflow`, declares its `stages` and `input_model`, and writes
its steps with `enter`, `call_model`, `request_approval` and `audit`. The base class gives it:

- the `state` query (current stage, stage history, approvals, attempts, usage, last error);
- the `decide` update, whose validator refuses a bad decision before anything is written to
  history (not pending, already decided, self-approval, wrong role, invalid edits);
- search attributes kept in step with the state (`Stage`, `PendingApproval`, ...);
- an audit outbox: events are buffered in workflow state and written by the next ledger
  activity, keyed by run and sequence number, so replays and retries never duplicate them;
- a clean end: completed, failed (with its cause, for the dead-letter view) or cancelled
  (pending approvals cancelled), after all update handlers have finished.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, ClassVar

from pydantic import BaseModel, ValidationError
from temporalio import workflow
from temporalio.common import Priority
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception
from temporalio.workflow import ActivityCancellationType

with workflow.unsafe.imports_passed_through():
    from activities.ledger import LedgerActivities
    from activities.model import ModelActivities
    from activities.types import FlushAudit, ModelCall, ModelReply, PublishApproval
    from policies import retries
    from stead.errors import ErrorType
    from workflows import search
    from workflows.proposals import InvalidEdits, apply_edits
    from workflows.state import (
        ActorKind,
        ApprovalOutcome,
        ApprovalPolicy,
        ApprovalState,
        ApprovalStatus,
        AuditEvent,
        DecideInput,
        DecideResult,
        Decision,
        ErrorInfo,
        OnDeadline,
        Proposal,
        RunInput,
        RunResult,
        RunStatus,
        RunView,
        Stage,
        StageEntry,
        Usage,
    )


class PipelineWorkflow:
    """Base of every pipeline workflow. Subclasses define `@workflow.run` and call `drive`."""

    pipeline: ClassVar[str]
    input_model: ClassVar[type[BaseModel]]
    stages: ClassVar[tuple[Stage, ...]]

    def __init__(self, run: RunInput) -> None:
        self._ctx = run.context
        self._raw_input = run.input
        now = workflow.now()
        self._stage = Stage.INTAKE
        self._stages = [StageEntry(stage=Stage.INTAKE, entered_at=now)]
        self._approvals: dict[str, ApprovalState] = {}
        self._attempts: dict[str, int] = {}
        self._usage = Usage()
        self._error: ErrorInfo | None = None
        self._result: dict[str, Any] | None = None
        self._status = RunStatus.RUNNING
        self._outbox: list[AuditEvent] = []
        self._seq = 0
        self._model_calls = 0
        self._run_budget_nusd = (
            round(run.context.budget_usd * 1e9) if run.context.budget_usd is not None else None
        )
        self._started_at = now
        self._progress: dict[str, int] = {}
        self.audit(
            "run.started",
            {"pipeline": run.context.pipeline, "input_sha256": _digest(run.input)},
            actor=run.context.requested_by,
        )

    # --- queries and updates ---------------------------------------------------------------

    @workflow.query
    def state(self) -> RunView:
        return RunView(
            run_id=self._ctx.run_id,
            pipeline=self._ctx.pipeline,
            tenant=self._ctx.tenant,
            requested_by=self._ctx.requested_by,
            status=self._status,
            stage=self._stage,
            stages=list(self._stages),
            approvals=list(self._approvals.values()),
            attempts=dict(self._attempts),
            usage=self._usage.model_copy(),
            last_error=self._error,
            result=self._result,
            started_at=self._started_at,
            progress=dict(self._progress),
        )

    @workflow.update
    async def decide(self, decision: DecideInput) -> DecideResult:
        approval = self._approvals[decision.approval_id]
        if decision.decision == "approve" and decision.edits:
            current = approval.final_data or approval.proposal.data
            approval.final_data = apply_edits(approval.proposal, current, decision.edits)
        approval.decisions.append(
            Decision(
                principal=decision.principal,
                decision=decision.decision,
                comment=decision.comment,
                edits=decision.edits,
                decided_at=workflow.now(),
            )
        )
        if decision.decision == "reject":
            approval.status = ApprovalStatus.REJECTED
        elif approval.approve_count >= approval.policy.quorum:
            approval.status = ApprovalStatus.APPROVED
        approval.version += 1
        self.audit(
            "approval.decided",
            {
                "approval_id": approval.approval_id,
                "decision": decision.decision,
                "comment": decision.comment,
                "edits": decision.edits,
                "status": approval.status,
                "approvals": approval.approve_count,
                "quorum": approval.policy.quorum,
            },
            actor=decision.principal,
        )
        return DecideResult(
            approval_id=approval.approval_id,
            status=approval.status,
            approvals=approval.approve_count,
            quorum=approval.policy.quorum,
        )

    @decide.validator
    def _validate_decide(self, decision: DecideInput) -> None:
        approval = self._approvals.get(decision.approval_id)
        if approval is None:
            raise ApplicationError(
                "no such approval in this run", type=ErrorType.APPROVAL_NOT_FOUND
            )
        if approval.status is not ApprovalStatus.PENDING:
            raise ApplicationError(
                f"approval is already {approval.status.value}", type=ErrorType.APPROVAL_NOT_PENDING
            )
        if decision.principal == approval.requested_by and decision.decision == "approve":
            raise ApplicationError(
                "the requester cannot approve their own request", type=ErrorType.SELF_APPROVAL
            )
        if any(d.principal == decision.principal for d in approval.decisions):
            raise ApplicationError(
                "this principal has already decided this approval", type=ErrorType.ALREADY_DECIDED
            )
        named = decision.principal in approval.policy.principals
        if not named and not set(decision.roles) & set(approval.eligible_roles):
            raise ApplicationError(
                f"deciding needs one of the roles {', '.join(approval.eligible_roles)}",
                type=ErrorType.NOT_ELIGIBLE,
            )
        if decision.edits:
            if decision.decision != "approve":
                raise ApplicationError("edits come only with approve", type=ErrorType.INVALID_EDITS)
            try:
                apply_edits(
                    approval.proposal, approval.final_data or approval.proposal.data, decision.edits
                )
            except InvalidEdits as exc:
                raise ApplicationError(str(exc), type=ErrorType.INVALID_EDITS) from None

    # --- building blocks for pipelines ---------------------------------------------------

    def parse_input(self) -> Any:
        try:
            return self.input_model.model_validate(self._raw_input)
        except ValidationError as exc:
            raise ApplicationError(
                f"invalid input: {exc.errors()[0]['msg']}",
                type=ErrorType.INVALID_INPUT,
                non_retryable=True,
            ) from None

    def set_progress(self, **counters: int) -> None:
        self._progress.update(counters)

    def enter(self, stage: Stage) -> None:
        """Move the run to `stage`: stage history, search attribute, audit event."""
        if stage == self._stage:
            return
        now = workflow.now()
        self._stages[-1].left_at = now
        self._stages.append(StageEntry(stage=stage, entered_at=now))
        previous, self._stage = self._stage, stage
        workflow.upsert_search_attributes([search.STAGE.value_set(stage.value)])
        self.audit("stage.entered", {"stage": stage.value, "from": previous.value})

    def audit(
        self,
        action: str,
        data: dict[str, Any],
        *,
        actor: str | None = None,
        actor_kind: ActorKind | None = None,
    ) -> None:
        """Buffer an audit event; the next ledger write stores it (exactly once)."""
        self._seq += 1
        info = workflow.info()
        kind: ActorKind
        if actor is None:
            actor, kind = f"workflow:{self._ctx.pipeline}", "system"
        else:
            kind = actor_kind or "user"
        self._outbox.append(
            AuditEvent(
                key=f"{info.workflow_id}:{info.first_execution_run_id}:{self._seq}",
                tenant=self._ctx.tenant,
                actor=actor,
                actor_kind=kind,
                action=action,
                run_id=self._ctx.run_id,
                at=workflow.now(),
                data=data,
            )
        )

    def _take_outbox(self) -> list[AuditEvent]:
        events, self._outbox = self._outbox, []
        return events

    async def flush_audit(self) -> None:
        if not self._outbox:
            return
        events = self._take_outbox()
        try:
            await workflow.execute_local_activity_method(
                LedgerActivities.flush,
                FlushAudit(events=events),
                start_to_close_timeout=retries.LEDGER.start_to_close,
                retry_policy=retries.LEDGER.retry,
            )
        except BaseException:
            self._outbox = events + self._outbox
            raise

    async def call_model(self, call: ModelCall) -> ModelReply:
        """Run one model step through the gateway activity (routing, budget, cache, usage)."""
        self.enter(Stage.MODEL_CALL)
        self._model_calls += 1
        info = workflow.info()
        call_key = f"{info.workflow_id}:{info.first_execution_run_id}:model:{self._model_calls}"
        events = self._take_outbox()
        policy = retries.MODEL
        try:
            reply = await workflow.execute_activity_method(
                ModelActivities.call_model,
                call.model_copy(
                    update={
                        "events": events,
                        "call_key": call_key,
                        "run_budget_nusd": self._run_budget_nusd,
                    }
                ),
                task_queue=self.model_task_queue,
                start_to_close_timeout=policy.start_to_close,
                heartbeat_timeout=policy.heartbeat,
                retry_policy=policy.retry,
                priority=Priority(fairness_key=self._ctx.tenant[:64]),
                # A cancelled run waits for the call to stop and settle its budget reservation.
                cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            )
        except BaseException as exc:
            self._outbox = events + self._outbox
            self._attempts[call.step] = _attempt_of(exc)
            raise
        self._attempts[call.step] = reply.attempt
        self._usage.add(reply.usage)
        return reply

    @property
    def model_task_queue(self) -> str:
        # Model calls run on their own rate-limited queue: `<workflow queue>-model`.
        return f"{workflow.info().task_queue}-model"

    def approval_policy(self, step: str) -> ApprovalPolicy:
        return self._ctx.approvals.get(step) or ApprovalPolicy()

    async def request_approval(self, proposal: Proposal, policy: ApprovalPolicy) -> ApprovalOutcome:
        """Ask humans to decide; wait through deadlines (escalate, remind or expire)."""
        self.enter(Stage.REVIEW)
        now = workflow.now()
        approval = ApprovalState(
            approval_id=f"ap_{workflow.uuid4().hex[:24]}",
            proposal=proposal,
            policy=policy,
            requested_by=self._ctx.requested_by,
            created_at=now,
            deadline_at=now + timedelta(seconds=policy.timeout_seconds),
        )
        self._approvals[approval.approval_id] = approval
        self._sync_approval_attributes()
        self.audit(
            "approval.requested",
            {
                "approval_id": approval.approval_id,
                "kind": proposal.kind,
                "title": proposal.title,
                "proposal": proposal.data,
                "roles": list(approval.eligible_roles),
                "principals": list(policy.principals),
                "quorum": policy.quorum,
                "deadline_at": approval.deadline_at.isoformat(),
            },
        )
        await self._publish(approval)
        # No try/finally around workflow APIs here: on eviction the SDK destroys this
        # coroutine outside the workflow's event loop. Cancellation is handled in `drive`.
        await self._wait_for_decision(approval)
        self._sync_approval_attributes()
        await self._publish(approval)
        last = approval.decisions[-1] if approval.decisions else None
        return ApprovalOutcome(
            approval_id=approval.approval_id,
            status=approval.status,
            data=approval.final_data or proposal.data,
            decided_by=tuple(d.principal for d in approval.decisions),
            comment=last.comment if last else "",
        )

    async def _wait_for_decision(self, approval: ApprovalState) -> None:
        while approval.status is ApprovalStatus.PENDING:
            remaining = (approval.deadline_at - workflow.now()).total_seconds()
            try:
                await workflow.wait_condition(
                    lambda: approval.status is not ApprovalStatus.PENDING,
                    timeout=max(remaining, 0.001),
                    timeout_summary=f"approval {approval.approval_id} deadline",
                )
            except TimeoutError:
                self._on_deadline(approval)
                if approval.status is ApprovalStatus.PENDING:
                    await self._publish(approval)

    def _on_deadline(self, approval: ApprovalState) -> None:
        policy = approval.policy
        now = workflow.now()
        can_escalate = approval.level + 1 < len(policy.roles)
        can_remind = approval.reminders < policy.max_reminders
        data: dict[str, Any]
        if policy.on_deadline is OnDeadline.ESCALATE and can_escalate:
            approval.level += 1
            approval.deadline_at = now + timedelta(seconds=policy.timeout_seconds)
            action, data = "approval.escalated", {"roles": list(approval.eligible_roles)}
        elif policy.on_deadline is OnDeadline.REMIND and can_remind:
            approval.reminders += 1
            approval.deadline_at = now + timedelta(seconds=policy.timeout_seconds)
            action, data = "approval.reminded", {"reminder": approval.reminders}
        else:
            approval.status = ApprovalStatus.EXPIRED
            action, data = "approval.expired", {"policy": policy.on_deadline.value}
        approval.version += 1
        self._sync_approval_attributes()
        self.audit(action, {"approval_id": approval.approval_id, **data})

    def _sync_approval_attributes(self) -> None:
        pending = [a for a in self._approvals.values() if a.status is ApprovalStatus.PENDING]
        roles = sorted({r for a in pending for r in a.eligible_roles})
        workflow.upsert_search_attributes(
            [
                search.PENDING_APPROVAL.value_set(bool(pending)),
                search.APPROVAL_ROLES.value_set(roles),
            ]
        )

    async def _publish(self, approval: ApprovalState) -> None:
        events = self._take_outbox()
        try:
            await workflow.execute_local_activity_method(
                LedgerActivities.publish_approval,
                PublishApproval(
                    context=self._ctx,
                    workflow_id=workflow.info().workflow_id,
                    approval=approval.model_copy(deep=True),
                    events=events,
                ),
                start_to_close_timeout=retries.LEDGER.start_to_close,
                retry_policy=retries.LEDGER.retry,
            )
        except BaseException:
            self._outbox = events + self._outbox
            raise

    # --- the run's lifecycle -------------------------------------------------------------

    async def drive(self, steps: Callable[[], Awaitable[tuple[str, dict[str, Any]]]]) -> RunResult:
        """Run the pipeline's steps and end the run in exactly one recorded way."""
        try:
            outcome, output = await steps()
        except BaseException as exc:
            if is_cancelled_exception(exc):
                await self._end_cancelled()
                raise
            if not isinstance(exc, ActivityError | ApplicationError):
                raise  # a bug: fail the workflow task, fix the code, the run continues
            await self._end_failed(exc)
            raise _failure(exc) from None
        self._result = output
        self._finish(RunStatus.COMPLETED, Stage.COMPLETED)
        self.audit("run.completed", {"outcome": outcome, "output": output, **self._cost()})
        await self.flush_audit()
        await workflow.wait_condition(workflow.all_handlers_finished)
        return RunResult(outcome=outcome, output=output, usage=self._usage)

    def _cost(self) -> dict[str, Any]:
        return {"cost_nusd": self._usage.cost_nusd, "model_calls": self._usage.model_calls}

    def _finish(self, status: RunStatus, stage: Stage) -> None:
        self.enter(stage)
        self._status = status
        workflow.upsert_search_attributes([search.COST_USD.value_set(self._usage.cost_usd)])

    async def _end_failed(self, exc: ActivityError | ApplicationError) -> None:
        cause = exc.cause if isinstance(exc, ActivityError) else exc
        error_type = cause.type if isinstance(cause, ApplicationError) and cause.type else "Error"
        message = cause.message if isinstance(cause, ApplicationError) else str(cause or exc)
        retryable = not (isinstance(cause, ApplicationError) and cause.non_retryable)
        self._error = ErrorInfo(
            type=error_type, message=message, stage=self._stage, retryable=retryable
        )
        failed_in = self._stage
        self._cancel_pending_approvals()
        self._finish(RunStatus.FAILED, Stage.FAILED)
        workflow.upsert_search_attributes([search.ERROR_TYPE.value_set(error_type)])
        self.audit(
            "run.failed",
            {"error_type": error_type, "message": message, "stage": failed_in, **self._cost()},
        )
        await self.flush_audit()

    async def _end_cancelled(self) -> None:
        cancelled = self._cancel_pending_approvals()
        self._finish(RunStatus.CANCELLED, Stage.CANCELLED)
        self.audit("run.cancelled", {"approvals_cancelled": [a.approval_id for a in cancelled]})
        for approval in cancelled:
            await self._publish(approval)
        await self.flush_audit()

    def _cancel_pending_approvals(self) -> list[ApprovalState]:
        cancelled = []
        for approval in self._approvals.values():
            if approval.status is ApprovalStatus.PENDING:
                approval.status = ApprovalStatus.CANCELLED
                approval.version += 1
                cancelled.append(approval)
        if cancelled:
            self._sync_approval_attributes()
        return cancelled


def _failure(exc: ActivityError | ApplicationError) -> ApplicationError:
    """The workflow's own failure: the cause's type and message, never retried as a whole."""
    cause = exc.cause if isinstance(exc, ActivityError) else exc
    if isinstance(cause, ApplicationError):
        return ApplicationError(cause.message, type=cause.type, non_retryable=True)
    return ApplicationError(str(exc), type="Error", non_retryable=True)


def _attempt_of(exc: BaseException) -> int:
    """The attempt an activity failed on: gateway errors carry it in their details."""
    cause = exc.cause if isinstance(exc, ActivityError) else None
    if isinstance(cause, ApplicationError) and cause.details:
        detail = cause.details[0]
        if isinstance(detail, dict) and isinstance(detail.get("attempt"), int):
            return int(detail["attempt"])
    return 0


def _digest(value: Any) -> str:
    """Input fingerprint for the audit log: the input itself may be sensitive."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()
