"""What every Stead pipeline builds on: model calls, tool calls and the run's end.

A pipeline subclasses `PipelineWorkflow`, declares its `stages` and `input_model`, and writes
its steps with `enter`, `call_model`, `use_tool`, `request_approval` and `audit`. Under it are
`stead.pipeline.core` (run state, the `state` query, the audit outbox) and
`stead.pipeline.approvals` (the `decide` update, deadlines, escalation, quorum). It adds:

- `call_model`: the model gateway activity on the rate-limited model queue, with a budget
  that can park the run for an approval to raise it when the pipeline says so;
- `use_tool`: every agent tool call through the tool gateway, waiting for approval when the
  gateway asks for it and going through the gateway again after the wait;
- `drive`: a clean end, completed, failed (with its cause, for the dead-letter view) or
  cancelled (pending approvals cancelled), after all update handlers have finished.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from temporalio import workflow
from temporalio.common import Priority
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception
from temporalio.workflow import ActivityCancellationType

with workflow.unsafe.imports_passed_through():
    from policies.tools import TOOLS
    from stead import retries, search
    from stead.calls import (
        ApprovalGrant,
        ModelCall,
        ModelReply,
        RaiseBudget,
        ToolInvocation,
        ToolOutcome,
    )
    from stead.contract import (
        MAX_BUDGET_USD,
        ErrorInfo,
        Proposal,
        RunResult,
        RunStatus,
        Stage,
    )
    from stead.errors import ErrorType
    from stead.gateway.ledger import LedgerActivities
    from stead.gateway.model import ModelActivities
    from stead.gateway.tools import ToolActivities

from stead.pipeline.approvals import ApprovalSteps


class PipelineWorkflow(ApprovalSteps):
    """Base of every pipeline workflow. Subclasses define `@workflow.run` and call `drive`."""

    async def call_model(self, call: ModelCall) -> ModelReply:
        """Run one model step through the gateway activity (routing, budget, cache, usage)."""
        while True:
            try:
                return await self._call_model_once(call)
            except ActivityError as exc:
                if (
                    self.on_budget_exhausted != "approval"
                    or _error_type(exc) != ErrorType.BUDGET_EXHAUSTED
                ):
                    raise
                if not await self._raise_budget(exc):
                    raise

    async def _raise_budget(self, exc: ActivityError) -> bool:
        """Ask for a bigger budget; True when approved and applied."""
        detail = _error_detail(exc)
        scope, limit = str(detail.get("scope", "run")), int(detail.get("limit_nusd", 0))
        current = limit / 1e9
        outcome = await self.request_approval(
            Proposal(
                kind="budget",
                title=f"Raise the {scope} budget",
                schema_name="budget",
                data={
                    "scope": scope,
                    "current_usd": current,
                    "requested_usd": min(max(current * 2, 0.01), MAX_BUDGET_USD),
                },
                editable=("requested_usd",),
                context={"period": detail.get("period", "run")},
            ),
            self.approval_policy("budget"),
        )
        if not outcome.approved:
            return False
        new_limit = round(float(outcome.data["requested_usd"]) * 1e9)
        if scope == "run":
            self._run_budget_nusd = new_limit
        else:
            await workflow.execute_local_activity_method(
                LedgerActivities.raise_budget,
                RaiseBudget(
                    tenant=self._ctx.tenant,
                    scope=scope,
                    subject=self._ctx.requested_by if scope == "user" else "",
                    period=str(detail.get("period", "day")),
                    limit_nusd=new_limit,
                    approval_id=outcome.approval_id,
                    approved_by=outcome.decided_by,
                ),
                start_to_close_timeout=retries.LEDGER.start_to_close,
                retry_policy=retries.LEDGER.retry,
            )
        self.audit(
            "budget.raised",
            {"scope": scope, "limit_nusd": new_limit, "approval_id": outcome.approval_id},
        )
        return True

    async def use_tool(self, tool_use: dict[str, Any], facts: dict[str, Any]) -> dict[str, Any]:
        """One tool call through the gateway; returns the `tool_result` block for the model.

        A call that needs approval waits for it here (several may wait at once), then goes
        through the gateway again: permissions are re-checked after the wait.
        """
        self.enter(Stage.TOOL_EXECUTION)
        self._tool_calls += 1
        info = workflow.info()
        invocation = ToolInvocation(
            context=self._lean_ctx,
            agent=self.pipeline,
            call_id=str(tool_use.get("id", "")),
            tool=str(tool_use.get("name", "")),
            arguments=dict(tool_use.get("input") or {}),
            # The Temporal run id: stable across this run's retries and replays, new after a
            # re-drive (a reset starts a new run), so a re-driven step is a new operation.
            op_key=f"{info.workflow_id}:{info.run_id}:tool:{self._tool_calls}",
            facts=facts,
        )
        outcome = await self._invoke_tool(invocation)
        if outcome.status == "needs_approval":
            outcome = await self._approve_tool(invocation, outcome)
        self._actions.append(
            {
                "tool": invocation.tool,
                "status": outcome.status,
                "rule": outcome.rule,
                "arguments": outcome.arguments,
            }
        )
        return {
            "type": "tool_result",
            "tool_use_id": invocation.call_id,
            "content": outcome.content,
            "is_error": outcome.is_error,
        }

    async def _approve_tool(self, invocation: ToolInvocation, pending: ToolOutcome) -> ToolOutcome:
        spec = TOOLS[invocation.tool]
        step = self.approval_policy("tool_call")
        policy = step.model_copy(update={"roles": pending.approver_roles or step.roles})
        decision = await self.request_approval(
            Proposal(
                kind="tool_call",
                title=f"{invocation.tool} for {self._ctx.requested_by}",
                schema_name=f"tool:{invocation.tool}",
                data=pending.arguments,
                editable=spec.editable,
                context={**pending.facts, "rule": pending.rule},
            ),
            policy,
        )
        if not decision.approved:
            why = f"a reviewer {decision.status.value} this call" + (
                f": {decision.comment}" if decision.comment else ""
            )
            return pending.model_copy(update={"status": "denied", "content": why, "is_error": True})
        grant = ApprovalGrant(
            approval_id=decision.approval_id,
            decided_by=decision.decided_by,
            arguments=decision.data,
        )
        self.enter(Stage.TOOL_EXECUTION)
        return await self._invoke_tool(invocation.model_copy(update={"approval": grant}))

    async def _invoke_tool(self, invocation: ToolInvocation) -> ToolOutcome:
        events = self._take_outbox()
        policy = retries.TOOL
        try:
            return await workflow.execute_activity_method(
                ToolActivities.invoke,
                invocation.model_copy(update={"events": events}),
                start_to_close_timeout=policy.start_to_close,
                heartbeat_timeout=policy.heartbeat,
                retry_policy=policy.retry,
                priority=Priority(fairness_key=self._ctx.tenant[:64]),
                cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            )
        except ActivityError as exc:
            self._outbox = events + self._outbox
            # The tool is broken, not the run: tell the model and let it carry on.
            return ToolOutcome(
                status="failed", content=f"the tool failed: {_message(exc)}", is_error=True
            )

    async def _call_model_once(self, call: ModelCall) -> ModelReply:
        self.enter(Stage.MODEL_CALL)
        self._model_calls += 1
        info = workflow.info()
        # Stable across retries and replays of this run; new after a re-drive, so the re-driven
        # call is reserved, charged and recorded as the new attempt it is.
        call_key = f"{info.workflow_id}:{info.run_id}:model:{self._model_calls}"
        events = self._take_outbox()
        policy = retries.MODEL
        try:
            reply = await workflow.execute_activity_method(
                ModelActivities.call_model,
                call.model_copy(
                    update={
                        "context": self._lean_ctx,
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
        # The rate-limited `<workflow queue>-model` when the run was started with a model-call
        # rate; otherwise the workflow's own queue, where the server dispatches eagerly.
        queue = workflow.info().task_queue
        return f"{queue}-model" if self._ctx.limited_model_queue else queue

    # --- the run's lifecycle -------------------------------------------------------------

    async def drive(self, steps: Callable[[], Awaitable[tuple[str, dict[str, Any]]]]) -> RunResult:
        """Run the pipeline's steps and end the run in exactly one recorded way."""
        try:
            outcome, output = await steps()
            _check_outcome(outcome, output)
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
        request = self._cancel_request
        data: dict[str, Any] = {"approvals_cancelled": [a.approval_id for a in cancelled]}
        if request is None:
            # Cancelled through Temporal itself, not through Stead: nobody to attribute it to.
            self.audit("run.cancelled", {**data, "requested_through": "temporal"})
        else:
            self.audit(
                "run.cancelled",
                {**data, "requested_through": "api", "reason": request.reason},
                actor=request.principal,
            )
        for approval in cancelled:
            await self._publish(approval)
        await self.flush_audit()


OUTCOMES = frozenset({"completed", "rejected"})


def _check_outcome(outcome: object, output: object) -> None:
    """An outcome the platform does not know used to fail every workflow task of the run (it
    stayed `running` with no error anywhere): it fails the run, clearly, instead."""
    if outcome not in OUTCOMES:
        raise ApplicationError(
            f"the pipeline ended with an unknown outcome {outcome!r}"
            f" (known: {', '.join(sorted(OUTCOMES))})",
            type=ErrorType.UNKNOWN_OUTCOME,
            non_retryable=True,
        )
    if not isinstance(output, dict):
        raise ApplicationError(
            f"the pipeline's output must be an object, not {type(output).__name__}",
            type=ErrorType.UNKNOWN_OUTCOME,
            non_retryable=True,
        )


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


def _error_type(exc: ActivityError) -> str | None:
    return exc.cause.type if isinstance(exc.cause, ApplicationError) else None


def _error_detail(exc: ActivityError) -> dict[str, Any]:
    cause = exc.cause
    if isinstance(cause, ApplicationError) and cause.details and isinstance(cause.details[0], dict):
        return dict(cause.details[0])
    return {}


def _message(exc: ActivityError) -> str:
    return exc.cause.message if isinstance(exc.cause, ApplicationError) else str(exc)
