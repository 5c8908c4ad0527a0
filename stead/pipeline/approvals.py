"""Approvals as first-class objects inside a run.

A step calls `request_approval(proposal, policy)`; the run then waits through deadlines
(escalate to the next role, remind, or expire) until decided. Decisions arrive as the
`decide` update, whose validator is the authority: a decision that is not pending, repeated,
self-approving, from an ineligible role, or with invalid edits is refused before anything is
written to history. Several approvals may be pending at once, each decided by its own id.
The inbox projection in PostgreSQL is written by the ledger activity at every change.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pydantic import BaseModel
from temporalio import workflow
from temporalio.common import SearchAttributeUpdate
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from stead import retries, search
    from stead.calls import (
        PublishApproval,
    )
    from stead.contract import (
        ApprovalOutcome,
        ApprovalPolicy,
        ApprovalState,
        ApprovalStatus,
        DecideInput,
        DecideResult,
        Decision,
        OnDeadline,
        Proposal,
        Stage,
    )
    from stead.errors import ErrorType
    from stead.gateway.ledger import LedgerActivities
    from stead.pipeline.proposals import InvalidEdits, apply_edits

from stead.pipeline.core import RunCore


class ApprovalSteps(RunCore):
    @workflow.update
    async def decide(self, decision: DecideInput) -> DecideResult:
        approval = self._approvals[decision.approval_id]
        if decision.decision == "approve" and decision.edits:
            current = approval.final_data or approval.proposal.data
            approval.final_data = apply_edits(
                self.proposal_schema(approval.proposal.schema_name),
                approval.proposal,
                current,
                decision.edits,
            )
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
                # Time to decision, for its metric: this event is stored exactly once, so it
                # is where decisions are counted (stead.metrics.observe_events).
                "waited_seconds": (workflow.now() - approval.created_at).total_seconds(),
            },
            actor=decision.principal,
        )
        return DecideResult(
            approval_id=approval.approval_id,
            status=approval.status,
            approvals=approval.approve_count,
            quorum=approval.policy.quorum,
            version=approval.version,
            decided_by=tuple(d.principal for d in approval.decisions),
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
                    self.proposal_schema(approval.proposal.schema_name),
                    approval.proposal,
                    approval.final_data or approval.proposal.data,
                    decision.edits,
                )
            except InvalidEdits as exc:
                raise ApplicationError(str(exc), type=ErrorType.INVALID_EDITS) from None

    def approval_policy(self, step: str) -> ApprovalPolicy:
        return self._ctx.approvals.get(step) or ApprovalPolicy()

    @classmethod
    def proposal_schema(cls, name: str) -> type[BaseModel] | None:
        """The model that validates a proposal named `name` (see `stead.pipeline.base`)."""
        return None

    async def _ask_approval(self, proposal: Proposal, policy: ApprovalPolicy) -> ApprovalOutcome:
        """Ask humans to decide; wait through deadlines (escalate, remind or expire)."""
        if self._ctx.revision < 2:
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
        if self._ctx.revision < 2:
            self._sync_approval_attributes()
        else:
            self._enter(Stage.REVIEW, self._approval_attributes())
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
        decided = approval.status in (ApprovalStatus.APPROVED, ApprovalStatus.REJECTED)
        if decided and self._since(1, "approval-projection-by-the-api"):
            # The API updated the inbox when the decision was accepted; waiting on a ledger
            # write here would only delay what the run does next.
            self._unpublished[approval.approval_id] = approval
        else:
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
        workflow.upsert_search_attributes(self._approval_attributes())

    def _approval_attributes(self) -> list[SearchAttributeUpdate[Any]]:
        pending = [a for a in self._approvals.values() if a.status is ApprovalStatus.PENDING]
        roles = sorted({r for a in pending for r in a.eligible_roles})
        return [
            search.PENDING_APPROVAL.value_set(bool(pending)),
            search.APPROVAL_ROLES.value_set(roles),
        ]

    async def _publish(self, approval: ApprovalState) -> None:
        with self.carried_outbox() as events:
            await workflow.execute_local_activity_method(
                LedgerActivities.publish_approval,
                PublishApproval(
                    context=self._lean_ctx,
                    workflow_id=workflow.info().workflow_id,
                    approval=approval.model_copy(deep=True),
                    events=events,
                ),
                start_to_close_timeout=retries.LEDGER.start_to_close,
                retry_policy=retries.LEDGER.retry,
            )

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
