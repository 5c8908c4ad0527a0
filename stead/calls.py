"""Inputs and results of every activity: one typed model each, shared by workflows and workers."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from stead.contract import (
    ApprovalState,
    AuditEvent,
    Frozen,
    RunContext,
    Usage,
)


class FlushAudit(Frozen):
    """Audit events to store; with them, approvals whose projection is behind (the API wrote
    the decision to the inbox already; this makes the workflow's own version durable)."""

    events: list[AuditEvent]
    approvals: list[ApprovalState] = Field(default_factory=list)
    context: RunContext | None = None
    workflow_id: str = ""


class PublishApproval(Frozen):
    """Project an approval's current state into the store (the inbox) and audit the change."""

    context: RunContext
    workflow_id: str
    approval: ApprovalState
    events: list[AuditEvent] = Field(default_factory=list)


class RaiseBudget(Frozen):
    """An approved budget increase (customer or user scope) to apply."""

    tenant: str
    scope: Literal["customer", "user"]
    subject: str
    period: str
    limit_nusd: int
    approval_id: str
    approved_by: tuple[str, ...]


class ModelCall(Frozen):
    """One model step. `step` names it in the run (for the ledger); `task` picks the route."""

    context: RunContext
    step: str
    # Stable across retries, replays and re-drives: the workflow derives it from its own history.
    call_key: str = ""
    # A task class of the routing policy (checked against it when the worker starts).
    task: str = Field(min_length=1, max_length=64)
    system: str | None = None
    messages: list[dict[str, Any]]
    # A long conversation (workflow revision 3 on): `messages` are those after the stored
    # prefix whose link this is ("" for none yet), of `prefix_length` messages; the gateway
    # resolves the whole transcript and stores `messages` (stead.store.conversations).
    # None: `messages` is the whole transcript.
    prefix: str | None = Field(None, max_length=64)
    prefix_length: int = Field(0, ge=0)
    tools: list[dict[str, Any]] = Field(default_factory=list)
    # The provider's tool_choice, e.g. {"type": "tool", "name": "respond"} for structured output.
    tool_choice: dict[str, Any] | None = None
    max_tokens: int = Field(1024, ge=1, le=64_000)
    escalate: bool = False
    # The exact-match response cache (stead's own).
    cache: bool = True
    # The provider's prompt cache: breakpoints at the route's TTL (off: none for this call).
    prompt_cache: bool = True
    # The run's budget in force (raised by an approval, it differs from the context's).
    run_budget_nusd: int | None = None
    # Through the Message Batches API (half price, results within hours): True or False for
    # this step; None follows the run's start flag.
    defer: bool | None = None
    events: list[AuditEvent] = Field(default_factory=list)
    # Set for a step the pipeline streams: the reply's text goes to the run's live events as
    # it arrives, as model call number `stream_call` (stead.gateway.streaming).
    stream_call: int | None = None


class ModelReply(Frozen):
    model: str
    content: list[dict[str, Any]]
    stop_reason: str
    usage: Usage
    cache_hit: bool = False
    fallbacks: int = 0
    attempt: int = 1
    latency_ms: float = 0.0
    # Answered through the Message Batches API (billed at batch rates).
    batch: bool = False

    @property
    def text(self) -> str:
        return "".join(b.get("text", "") for b in self.content if b.get("type") == "text")

    @property
    def tool_uses(self) -> list[dict[str, Any]]:
        return [b for b in self.content if b.get("type") == "tool_use"]


# --- Deferred model calls (Message Batches) -----------------------------------------------------


class DeferCall(Frozen):
    """Queue a model call for the tenant's batcher; `deadline_seconds` overrides the policy's."""

    call: ModelCall
    workflow_id: str
    task_queue: str
    deadline_seconds: float | None = Field(None, gt=0, le=7 * 86_400)


class DeferTicket(Frozen):
    """A queued call (`custom_id`), or its reply at once (a memo or a response-cache hit)."""

    custom_id: str
    reply: ModelReply | None = None
    deadline_seconds: float = 86_400.0
    # How often the waiting run looks for its result without a signal (a signal lost to an
    # outage must not leave it waiting until the deadline).
    check_seconds: float = 60.0


class BatchCheck(Frozen):
    """Look for a deferred call's result; `events` are the run's buffered audit events."""

    custom_id: str
    events: list[AuditEvent] = Field(default_factory=list)


BatchStatus = Literal["pending", "succeeded", "failed"]


class BatchOutcome(Frozen):
    status: BatchStatus
    reply: ModelReply | None = None
    reason: str = ""


class SubmitBatch(Frozen):
    """Submit these queued calls as one Message Batch; `flush_key` makes a retry find it."""

    tenant: str
    custom_ids: list[str]
    flush_key: str


class PollBatch(Frozen):
    tenant: str
    batch_id: str


class Queued(Frozen):
    custom_id: str
    queued_at: datetime


class BatcherInput(Frozen):
    """A tenant's batcher, and what it carries across continue-as-new."""

    tenant: str
    max_requests: int = Field(500, ge=1, le=100_000)
    max_age_seconds: float = Field(30.0, gt=0)
    poll_seconds: float = Field(30.0, gt=0)
    pending: list[Queued] = Field(default_factory=list)
    in_flight: list[str] = Field(default_factory=list)
    flushes: int = 0


class ApprovalGrant(Frozen):
    """Proof that humans approved a tool call, with the (possibly edited) arguments."""

    approval_id: str
    decided_by: tuple[str, ...]
    arguments: dict[str, Any]


class ToolInvocation(Frozen):
    """One tool call by an agent acting for the run's requester.

    `facts` are trusted values from the run itself (e.g. the ticket's customer id), never from
    the model; constraints such as "email only the customer's own domain" are checked
    against them. `op_key` is the side effect's idempotency key.
    """

    context: RunContext
    agent: str
    call_id: str
    tool: str
    arguments: dict[str, Any]
    op_key: str
    facts: dict[str, Any] = Field(default_factory=dict)
    # The tools the calling pipeline offers: a call of any other is refused.
    offered: tuple[str, ...] = ()
    approval: ApprovalGrant | None = None
    events: list[AuditEvent] = Field(default_factory=list)


ToolStatus = Literal["executed", "denied", "needs_approval", "failed"]


class ToolOutcome(Frozen):
    status: ToolStatus
    content: str
    is_error: bool = False
    rule: str = ""
    reason: str = ""
    approver_roles: tuple[str, ...] = ()
    arguments: dict[str, Any] = Field(default_factory=dict)
    facts: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)


# --- Retrieval (doc-qa) ------------------------------------------------------------------------


class ChunkDocument(Frozen):
    """Chunk a stored document and store chunks `first_chunk` up to `first_chunk + max_chunks`.

    Only the id travels: the activity reads the text from PostgreSQL. Chunking is a pure
    function of the text and the sizes, so every batch (and every retry) sees the same chunks.
    """

    tenant: str
    document_id: str
    first_chunk: int = Field(0, ge=0)
    max_chunks: int = Field(256, ge=1, le=10_000)
    chunk_words: int = Field(200, ge=20, le=2_000)
    overlap_words: int = Field(40, ge=0, le=500)


class ChunkedDocument(Frozen):
    document_id: str
    total: int  # the document's chunk count
    done: int  # chunks stored so far (`first_chunk` of the next batch)
    written: int  # chunks this call stored that were not stored before


class SearchPassages(Frozen):
    tenant: str
    query: str
    limit: int = Field(5, ge=1, le=50)


class Passage(Frozen):
    document_id: str
    chunk_no: int
    title: str
    text: str
    rank: float


class FoundPassages(Frozen):
    passages: list[Passage]


class MarkDocument(Frozen):
    tenant: str
    document_id: str
    status: Literal["indexing", "ready", "failed"]
