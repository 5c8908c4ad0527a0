"""The run ledger: a run's audit entries folded into what a reader wants to see.

In time order: each step, each model call (model, tokens by kind: prompt-cache reads and
writes, thinking; cost, cache, batch, latency), each tool
call (arguments, result, the permission decisions) and each approval (who, when, comment),
with the run's total cost. Tool calls and approvals span several entries and become one item
each. Content is whatever the entries hold for this viewer: redacted unless revealed.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError
from temporalio.client import WorkflowExecutionDescription
from temporalio.service import RPCError

from stead import search
from stead.service.access import Services, require
from stead.service.errors import NotFound
from stead.service.runs import RUN_ID, describe_run, run_status
from stead.store import audit
from stead.store.audit import AuditEntry
from stead.store.principals import Principal

_TERMINAL = {"run.completed": "completed", "run.failed": "failed", "run.cancelled": "cancelled"}


class _Item(BaseModel):
    seq: int = Field(description="the audit entry this item starts at")
    at: datetime


class LedgerStep(_Item):
    kind: Literal["step"] = "step"
    stage: str
    previous: str | None


class LedgerModelCall(_Item):
    kind: Literal["model_call"] = "model_call"
    step: str
    model: str
    attempt: int
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    cost_nusd: int
    cost_usd: float
    cache_hit: bool
    latency_ms: float
    fallbacks: int
    # Recorded since provider prompt caching, thinking and batches (0 or false before).
    cache_write_1h_tokens: int = Field(0, description="the part of the writes with a 1h TTL")
    thinking_tokens: int = Field(0, description="the part of the output spent thinking")
    cache_saved_nusd: int = Field(0, description="what the provider's prompt cache saved")
    batch: bool = Field(False, description="answered through the Message Batches API")


class ToolDecisionOut(BaseModel):
    at: datetime
    effect: str = Field(description="allowed, denied or approval_required")
    rule: str
    reason: str
    approval_id: str | None = None
    approved_by: list[str] = []


class LedgerToolCall(_Item):
    kind: Literal["tool_call"] = "tool_call"
    call_id: str
    tool: str
    actor: str
    arguments: Any
    effect: str = Field(description="the last permission decision")
    decisions: list[ToolDecisionOut]
    status: str | None = Field(None, description="ok or error once executed; null if never run")
    result: Any = None
    executed_at: datetime | None = None


class ApprovalDecisionOut(BaseModel):
    by: str
    at: datetime
    decision: str
    comment: Any
    edits: Any = None


class ApprovalChangeOut(BaseModel):
    action: str = Field(description="approval.escalated, approval.reminded or approval.expired")
    at: datetime
    detail: dict[str, Any]


class LedgerApproval(_Item):
    kind: Literal["approval"] = "approval"
    approval_id: str
    title: str
    approval_kind: str
    proposal: Any
    roles: list[str]
    quorum: int
    deadline_at: str | None
    status: str
    decisions: list[ApprovalDecisionOut] = []
    changes: list[ApprovalChangeOut] = []


class LedgerEvent(_Item):
    kind: Literal["event"] = "event"
    action: str
    actor: str
    data: dict[str, Any]


LedgerItem = Annotated[
    LedgerStep | LedgerModelCall | LedgerToolCall | LedgerApproval | LedgerEvent,
    Field(discriminator="kind"),
]


class LedgerOut(BaseModel):
    run_id: str
    pipeline: str | None
    status: str
    requested_by: str | None
    items: list[LedgerItem] = Field(description="in time order, by the entry each starts at")
    model_calls: int
    total_cost_nusd: int = Field(description="sum of the run's model calls, in nano-USD")
    total_cost_usd: float
    redacted: bool = Field(
        description="some content is masked for this viewer (or its original was not kept)"
    )


class Ledger:
    """Folds a run's entries into ledger items. Tool calls and approvals span several entries
    and become one item each, at the entry that opened them. An entry whose data is not
    shaped as expected (an older or newer writer) is shown as a plain event, never an error."""

    def __init__(self) -> None:
        self.items: list[LedgerItem] = []
        self.model_calls = 0
        self.cost_nusd = 0
        self._stage: str | None = None
        self._tools: dict[str, LedgerToolCall] = {}
        self._approvals: dict[str, LedgerApproval] = {}
        self._fold: dict[str, Callable[[AuditEntry], None]] = {
            "run.started": self._run_started,
            "stage.entered": self._stage_entered,
            "model.called": self._model_called,
            "tool.decided": self._tool_decided,
            "tool.executed": self._tool_executed,
            "approval.requested": self._approval_requested,
            "approval.decided": self._approval_decided,
            "approval.escalated": self._approval_changed,
            "approval.reminded": self._approval_changed,
            "approval.expired": self._approval_changed,
            "run.cancelled": self._run_cancelled,
        }

    def add(self, entry: AuditEntry) -> None:
        fold = self._fold.get(entry.action)
        try:
            if fold is not None:
                fold(entry)
                return
        except (ValidationError, KeyError, TypeError, ValueError):
            pass
        self._event(entry)

    def _event(self, entry: AuditEntry) -> None:
        self.items.append(
            LedgerEvent(
                seq=entry.seq, at=entry.at, action=entry.action, actor=entry.actor, data=entry.data
            )
        )

    def _run_started(self, entry: AuditEntry) -> None:
        # Every run starts in intake; no stage.entered entry records it.
        self._event(entry)
        self._step(entry, "intake")

    def _stage_entered(self, entry: AuditEntry) -> None:
        # The previous stage comes from the ledger itself: the entry's own `from` key is
        # masked by the email rule of the same name.
        self._step(entry, _requiredtext_of(entry.data, "stage"))

    def _step(self, entry: AuditEntry, stage: str) -> None:
        self.items.append(LedgerStep(seq=entry.seq, at=entry.at, stage=stage, previous=self._stage))
        self._stage = stage

    def _model_called(self, entry: AuditEntry) -> None:
        call = LedgerModelCall.model_validate(
            {
                **entry.data,
                "seq": entry.seq,
                "at": entry.at,
                "cost_usd": round(int(entry.data["cost_nusd"]) / 1e9, 9),
            }
        )
        self.items.append(call)
        self.model_calls += 1
        self.cost_nusd += call.cost_nusd

    def _tool_decided(self, entry: AuditEntry) -> None:
        data = entry.data
        decision = ToolDecisionOut(
            at=entry.at,
            effect=_requiredtext_of(data, "effect"),
            rule=text_of(data.get("rule")),
            reason=text_of(data.get("reason")),
            approval_id=data.get("approval_id"),
            approved_by=data.get("approved_by") or [],
        )
        call_id = _requiredtext_of(data, "call_id")
        call = self._tools.get(call_id)
        if call is None:
            call = LedgerToolCall(
                seq=entry.seq,
                at=entry.at,
                call_id=call_id,
                tool=_requiredtext_of(data, "tool"),
                actor=entry.actor,
                arguments=data.get("arguments"),
                effect=decision.effect,
                decisions=[],
            )
            self._tools[call_id] = call
            self.items.append(call)
        call.decisions.append(decision)
        call.effect = decision.effect
        if "arguments" in data:
            # A decision after an approval judges the approved (possibly edited) arguments.
            call.arguments = data["arguments"]

    def _tool_executed(self, entry: AuditEntry) -> None:
        call = self._tools[_requiredtext_of(entry.data, "call_id")]
        call.status = _requiredtext_of(entry.data, "status")
        call.result = entry.data.get("result")
        call.executed_at = entry.at

    def _approval_requested(self, entry: AuditEntry) -> None:
        data = entry.data
        approval = LedgerApproval(
            seq=entry.seq,
            at=entry.at,
            approval_id=_requiredtext_of(data, "approval_id"),
            title=text_of(data.get("title")),
            approval_kind=text_of(data.get("kind")),
            proposal=data.get("proposal"),
            roles=list(data.get("roles") or []),
            quorum=int(data.get("quorum") or 1),
            deadline_at=data.get("deadline_at"),
            status="pending",
        )
        self._approvals[approval.approval_id] = approval
        self.items.append(approval)

    def _approval_decided(self, entry: AuditEntry) -> None:
        data = entry.data
        approval = self._approvals[_requiredtext_of(data, "approval_id")]
        approval.decisions.append(
            ApprovalDecisionOut(
                by=entry.actor,
                at=entry.at,
                decision=_requiredtext_of(data, "decision"),
                comment=data.get("comment", ""),
                edits=data.get("edits"),
            )
        )
        approval.status = text_of(data.get("status")) or approval.status

    def _approval_changed(self, entry: AuditEntry) -> None:
        approval = self._approvals[_requiredtext_of(entry.data, "approval_id")]
        detail = {k: v for k, v in entry.data.items() if k != "approval_id"}
        approval.changes.append(ApprovalChangeOut(action=entry.action, at=entry.at, detail=detail))
        if entry.action == "approval.expired":
            approval.status = "expired"

    def _run_cancelled(self, entry: AuditEntry) -> None:
        for approval_id in entry.data.get("approvals_cancelled") or []:
            if approval_id in self._approvals:
                self._approvals[approval_id].status = "cancelled"
        self._event(entry)


async def run_ledger(svc: Services, principal: Principal, run_id: str) -> LedgerOut:
    """The run in time order, redacted for the caller (`GET /v1/runs/{id}/ledger`)."""
    require(svc, principal, "audit:read")
    described, entries = await run_entries(svc, principal, run_id)
    ledger = Ledger()
    for entry in entries:
        ledger.add(entry)
    started = next((e for e in entries if e.action == "run.started"), None)
    pipeline = described.typed_search_attributes.get(search.PIPELINE) if described else None
    if pipeline is None and started is not None:
        pipeline = text_of(started.data.get("pipeline")) or None
    return LedgerOut(
        run_id=run_id,
        pipeline=pipeline,
        status=run_status(described.status).value if described else _status(entries),
        requested_by=started.actor if started else None,
        items=ledger.items,
        model_calls=ledger.model_calls,
        total_cost_nusd=ledger.cost_nusd,
        total_cost_usd=round(ledger.cost_nusd / 1e9, 9),
        redacted=any(not e.revealed and masked(e.data) for e in entries),
    )


async def run_entries(
    svc: Services, principal: Principal, run_id: str
) -> tuple[WorkflowExecutionDescription | None, list[AuditEntry]]:
    """The run's audit entries decoded for the caller, and its description while Temporal
    still has it. A 404 unless the caller's tenant has the run."""
    if not RUN_ID.match(run_id):
        raise NotFound("no such run")
    try:
        _, described = await describe_run(svc, principal, run_id)
    except (NotFound, RPCError):
        # Gone from Temporal (retention) or Temporal unreachable: the log still has the run.
        # Tenant isolation does not depend on Temporal: the query below is the caller's tenant's.
        described = None
    async with svc.pool.acquire() as conn:
        rows = await audit.run_rows(conn, principal.tenant, run_id)
    if described is None and not rows:
        raise NotFound("no such run")
    reveal = svc.permissions.has_right(principal.roles, "audit:read_sensitive")
    return described, [svc.audit.decode(row, reveal_private=reveal) for row in rows]


def _status(entries: list[AuditEntry]) -> str:
    status = "running"
    for entry in entries:
        if entry.action in _TERMINAL:
            status = _TERMINAL[entry.action]
        elif entry.action == "run.redriven":
            status = "running"
    return status


def masked(value: Any) -> bool:
    """Whether redacted data shows a mask marker anywhere (`[masked]`, `[masked:email]`)."""
    if isinstance(value, str):
        return value == "[masked]" or "[masked:" in value
    if isinstance(value, dict):
        return any(masked(v) for v in value.values())
    if isinstance(value, list):
        return any(masked(v) for v in value)
    return False


def text_of(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _requiredtext_of(data: dict[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str):
        raise TypeError(f"{key} is not text")
    return value
