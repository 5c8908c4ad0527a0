"""Inputs and results of every activity: one typed model each, shared by workflows and workers."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from workflows.state import (
    ApprovalState,
    AuditEvent,
    Frozen,
    RunContext,
    Usage,
)

TaskClass = Literal["classify", "draft", "reason", "answer", "agent"]


class FlushAudit(Frozen):
    events: list[AuditEvent]


class PublishApproval(Frozen):
    """Project an approval's current state into the store (the inbox) and audit the change."""

    context: RunContext
    workflow_id: str
    approval: ApprovalState
    events: list[AuditEvent] = Field(default_factory=list)


class ModelCall(Frozen):
    """One model step. `step` names it in the run (for the ledger); `task` picks the route."""

    context: RunContext
    step: str
    # Stable across retries, replays and re-drives: the workflow derives it from its own history.
    call_key: str = ""
    task: TaskClass
    system: str | None = None
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] = Field(default_factory=list)
    max_tokens: int = Field(1024, ge=1, le=64_000)
    escalate: bool = False
    cache: bool = True
    # The run's budget in force (raised by an approval, it differs from the context's).
    run_budget_nusd: int | None = None
    events: list[AuditEvent] = Field(default_factory=list)


class ModelReply(Frozen):
    model: str
    content: list[dict[str, Any]]
    stop_reason: str
    usage: Usage
    cache_hit: bool = False
    fallbacks: int = 0
    attempt: int = 1
    latency_ms: float = 0.0

    @property
    def text(self) -> str:
        return "".join(b.get("text", "") for b in self.content if b.get("type") == "text")

    @property
    def tool_uses(self) -> list[dict[str, Any]]:
        return [b for b in self.content if b.get("type") == "tool_use"]
