"""The run-state contract: what a run is, where it stands, and what waits for a human.

These pydantic models cross every boundary: workflow inputs and queries, activity inputs, the
API's responses. Adding an optional field is safe for running workflows; renaming or removing
one is not (old histories must still decode).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from stead.attest import digest

MAX_APPROVAL_TIMEOUT_SECONDS = 90 * 86_400
# The largest budget a run, a raise or an admin may set, in USD.
MAX_BUDGET_USD = 1_000_000.0


class Stage(StrEnum):
    INTAKE = "intake"
    ENRICHMENT = "enrichment"
    RETRIEVAL = "retrieval"
    MODEL_CALL = "model_call"
    TOOL_EXECUTION = "tool_execution"
    REVIEW = "review"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STAGES = frozenset({Stage.COMPLETED, Stage.FAILED, Stage.CANCELLED})

# What the platform's pipeline code records in a run's history changes by revision, and a run
# keeps the revision it was started at (its input says which: deterministic, and free).
# `workflow.patched` would have cost every new run a marker and a search-attribute upsert per
# change, for as long as the change is in the code. Runs started before revisions existed (0)
# still decide each earlier change by its patch marker.
#   1: the changes once gated by `workflow.patched` (run-events, agent-loop-stage-index,
#      model-batches, approval-projection-by-the-api) are taken without a marker.
#   2: one search-attribute upsert where there were several: on asking for approval (stage,
#      pending, roles) and at the end of a run (stage, cost, error type).
#   3: a model call whose messages reach 4 KiB carries the stored prefix's link and the
#      messages after it, not the whole transcript (stead.store.conversations).
# Workers must be upgraded before the processes that start runs: an older worker refuses a
# context with a revision it does not know (the workflow task fails and is retried), rather
# than running it down the older path.
WORKFLOW_REVISION = 3


class RunStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Frozen(BaseModel):
    # No NaN or infinity anywhere a run's state can hold a number: one in a deadline or a
    # budget made every workflow task of the run fail.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class Usage(BaseModel):
    input_tokens: int = 0
    output_tokens: int = Field(0, description="thinking included")
    cache_read_tokens: int = 0
    cache_write_tokens: int = Field(0, description="prompt-cache writes, both TTLs")
    cost_nusd: int = Field(0, description="cost in nano-USD (1e-9), exact for every listed price")
    model_calls: int = 0
    cache_hits: int = 0
    fallbacks: int = 0
    cache_write_1h_tokens: int = Field(0, description="the part of the writes with a 1-hour TTL")
    thinking_tokens: int = Field(0, description="the part of the output spent thinking")
    cache_saved_nusd: int = Field(
        0, description="what provider prompt caching saved, against every token uncached"
    )
    batch_calls: int = Field(0, description="calls answered through the Message Batches API")

    @property
    def cost_usd(self) -> float:
        return round(self.cost_nusd / 1e9, 9)

    def add(self, other: Usage) -> None:
        for name in Usage.model_fields:
            setattr(self, name, getattr(self, name) + getattr(other, name))


# A stage's name: one of `Stage`, or one a pipeline declares for itself.
StageName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,39}$")]


class StageEntry(BaseModel):
    stage: StageName
    entered_at: datetime
    left_at: datetime | None = None


class ErrorInfo(BaseModel):
    type: str
    message: str
    stage: StageName | None = None
    retryable: bool = False


# --- Approvals -----------------------------------------------------------------------------


class OnDeadline(StrEnum):
    ESCALATE = "escalate"  # hand the decision to the next role in the chain
    REMIND = "remind"  # record a reminder and wait again (up to max_reminders, then reject)
    REJECT = "reject"  # auto-reject: the approval expires


class ApprovalStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


class ApprovalPolicy(Frozen):
    """Who may decide, by when, and what happens at the deadline.

    `roles` is an escalation chain: at first only `roles[0]` (and `principals`) may decide;
    each escalation adds the next role. Eligibility is checked against the decider's roles at
    decision time, never at request time.
    """

    roles: tuple[str, ...] = ("approver",)
    principals: tuple[str, ...] = ()
    quorum: int = Field(1, ge=1, le=10)
    # At most 90 days per deadline (escalations and reminders each start a new one); 1e15
    # seconds overflowed the workflow's clock and crash-looped the run.
    timeout_seconds: int = Field(86_400, ge=1, le=MAX_APPROVAL_TIMEOUT_SECONDS)
    on_deadline: OnDeadline = OnDeadline.REJECT
    max_reminders: int = Field(2, ge=0, le=20)


class RunContext(Frozen):
    """Who started the run and for whom. Set by the API from the authenticated caller."""

    tenant: str
    run_id: str
    pipeline: str
    requested_by: str
    plan: str = "standard"
    budget_usd: float | None = None
    # Approval policy per step, fixed at start (file policy plus the tenant's overrides).
    approvals: dict[str, ApprovalPolicy] = Field(default_factory=dict)
    # Model calls go to the rate-limited `<queue>-model` (set when the API has a model-call
    # rate, STEAD_MODEL_CALLS_PER_SECOND), else to the run's own queue.
    limited_model_queue: bool = False
    # Every model step through the Message Batches API, unless a step says otherwise; a
    # deferred call not back within the deadline (default: the routing policy's) is made
    # directly.
    defer: bool = False
    defer_deadline_seconds: float | None = Field(None, ge=1, le=7 * 86_400)
    # The platform's workflow revision the run was started at (`WORKFLOW_REVISION`, set by
    # every start); 0 for runs started before revisions existed. See `WORKFLOW_REVISION`.
    revision: int = Field(0, ge=0)


class RunInput(Frozen):
    """One workflow input for every pipeline; `input` is validated by the pipeline's model."""

    context: RunContext
    input: dict[str, Any]


class Proposal(Frozen):
    """What is being approved, typed and readable.

    `schema_name` names the pydantic model in `stead.pipeline.proposals` that validates `data`,
    and `editable` lists the fields an approver may change ("approve with edits").
    """

    kind: str = Field(min_length=1, max_length=64)
    title: str
    schema_name: str
    data: dict[str, Any]
    editable: tuple[str, ...] = ()
    # Facts the decision depends on that are not editable (e.g. the ticket's customer email,
    # against which an email recipient is checked).
    context: dict[str, Any] = Field(default_factory=dict)


class Decision(Frozen):
    principal: str
    decision: Literal["approve", "reject"]
    comment: str = ""
    edits: dict[str, Any] | None = None
    decided_at: datetime


class ApprovalState(BaseModel):
    approval_id: str
    proposal: Proposal
    policy: ApprovalPolicy
    requested_by: str
    status: ApprovalStatus = ApprovalStatus.PENDING
    level: int = 0
    decisions: list[Decision] = Field(default_factory=list)
    reminders: int = 0
    created_at: datetime
    deadline_at: datetime
    final_data: dict[str, Any] | None = None
    version: int = 1

    @property
    def eligible_roles(self) -> tuple[str, ...]:
        return self.policy.roles[: self.level + 1]

    @property
    def approve_count(self) -> int:
        return sum(1 for d in self.decisions if d.decision == "approve")


class DecideInput(Frozen):
    """An approver's decision. `roles` are the decider's roles read by the API at decision time.

    `attestation` is the API's signature over the decision after its authorization check
    (`stead.attest`): the workers refuse a decision without a valid one, so nobody who merely
    reaches Temporal can decide in someone's name.
    """

    approval_id: str
    principal: str
    roles: tuple[str, ...]
    decision: Literal["approve", "reject"]
    comment: str = Field("", max_length=4000)
    edits: dict[str, Any] | None = None
    attested_at: datetime | None = None
    attestation: str = ""

    def claim(self) -> dict[str, Any]:
        return {
            "kind": "decide",
            "approval_id": self.approval_id,
            "principal": self.principal,
            "roles": sorted(self.roles),
            "decision": self.decision,
            "edits": digest(self.edits),
            "comment": digest(self.comment),
            "at": self.attested_at.isoformat() if self.attested_at else None,
        }


class CancelInput(Frozen):
    """Who asks the run to stop, attested by the API like a decision (`DecideInput`). The API
    then cancels the run through Temporal; the run records this principal as who cancelled."""

    principal: str
    reason: str = Field("", max_length=1000)
    attested_at: datetime | None = None
    attestation: str = ""

    def claim(self) -> dict[str, Any]:
        return {
            "kind": "cancel",
            "principal": self.principal,
            "reason": digest(self.reason),
            "at": self.attested_at.isoformat() if self.attested_at else None,
        }


class DecideResult(Frozen):
    approval_id: str
    status: ApprovalStatus
    approvals: int
    quorum: int
    # What the API needs to bring the inbox in step at once.
    version: int = 0
    decided_by: tuple[str, ...] = ()


class ApprovalOutcome(Frozen):
    approval_id: str
    status: ApprovalStatus
    data: dict[str, Any]
    decided_by: tuple[str, ...] = ()
    comment: str = ""

    @property
    def approved(self) -> bool:
        return self.status is ApprovalStatus.APPROVED


# --- The query view ------------------------------------------------------------------------


class RunView(BaseModel):
    """What `GET /v1/runs/{id}` returns: the run's state, straight from the workflow."""

    run_id: str
    pipeline: str
    tenant: str
    requested_by: str
    status: RunStatus
    stage: StageName
    stages: list[StageEntry]
    approvals: list[ApprovalState]
    attempts: dict[str, int]
    usage: Usage
    last_error: ErrorInfo | None = None
    result: dict[str, Any] | None = None
    started_at: datetime
    # Pipeline-specific counters (e.g. chunks indexed of total) for long-running steps.
    progress: dict[str, int] = Field(default_factory=dict)

    @property
    def pending_approvals(self) -> list[ApprovalState]:
        return [a for a in self.approvals if a.status is ApprovalStatus.PENDING]


class RunResult(Frozen):
    outcome: Literal["completed", "rejected"]
    output: dict[str, Any]
    usage: Usage


# --- Audit ---------------------------------------------------------------------------------

ActorKind = Literal["user", "agent", "service", "system"]


class AuditEvent(Frozen):
    """One audit entry before it is chained. `key` is unique per tenant: writing the same
    event twice (a retried activity, a replayed workflow) stores it once."""

    key: str
    tenant: str
    actor: str
    actor_kind: ActorKind
    action: str
    run_id: str | None = None
    at: datetime
    data: dict[str, Any] = Field(default_factory=dict)
    # The run's pipeline, for metrics (not stored in the log: the run id already names it).
    pipeline: str | None = None
