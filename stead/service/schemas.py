"""API request and response bodies. Requests forbid unknown fields: a body can never set a
tenant, a role or an approval state."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Generic, Literal, TypeVar, get_args, get_origin

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from stead.contract import (
    MAX_BUDGET_USD,
    ApprovalState,
    ApprovalStatus,
    ErrorInfo,
    RunStatus,
    Stage,
    StageEntry,
    Usage,
)
from stead.store.text import unstorable_path

T = TypeVar("T")


def _not_a_number(value: object) -> object:
    # pydantic reads a bare number as a Unix timestamp (`to=0.5` is 1970-01-01T00:00:00.5Z);
    # the schema says date-time, and a number here is a mistake, not a time. Found by the
    # schemathesis drill in tests/test_drills.py (a schema-violating request was accepted).
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return value
        raise ValueError("must be an ISO 8601 date-time, e.g. 2026-01-31T00:00:00Z")
    return value


# A date-time query parameter: ISO 8601 only.
DateTimeParam = Annotated[datetime, BeforeValidator(_not_a_number)]


def _types(annotation: Any) -> set[Any]:
    """The plain types an annotation admits (`int | None` → {int, NoneType})."""
    args = get_args(annotation)
    if not args:
        return {annotation}
    if get_origin(annotation) is Annotated:
        return _types(args[0])
    return set().union(*(_types(a) for a in args))


class Request(BaseModel):
    """Every request body: unknown fields refused, numbers finite, text storable."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # Lax validation takes `true`/`false` for 1/0; a number field wants a number (the
        # fuzz drill sent `"keep_previous_seconds": false` and got a secret rotated).
        if isinstance(value, bool) and info.field_name is not None:
            accepted = _types(cls.model_fields[info.field_name].annotation)
            if bool not in accepted and accepted & {int, float, Decimal}:
                raise ValueError("must be a number, not true or false")
        return value

    @model_validator(mode="after")
    def _storable(self) -> Request:
        where = unstorable_path(self.model_dump())
        if where:
            raise ValueError(f"{where}: text must not contain NUL or unpaired surrogates")
        return self


class StartRun(Request):
    pipeline: str = Field(min_length=1, max_length=64, examples=["summarize"])
    input: dict[str, Any] = Field(examples=[{"text": "Quarterly revenue grew 12%..."}])
    # Strict: lax mode took `true` for 1.0 (the fuzz drill).
    budget_usd: float | None = Field(
        None, gt=0, le=MAX_BUDGET_USD, strict=True, description="cap for this run"
    )
    defer: bool = Field(
        False,
        description="every model step through the Message Batches API (half price, results"
        " within hours) unless the pipeline keeps a step direct",
    )
    defer_deadline_seconds: float | None = Field(
        None,
        ge=1,
        le=86_400,
        description="with defer: a call not back by then is made directly (default: the"
        " routing policy's, 24 hours)",
    )

    @model_validator(mode="after")
    def _deadline_needs_defer(self) -> StartRun:
        if self.defer_deadline_seconds is not None and not self.defer:
            raise ValueError("defer_deadline_seconds needs defer: true")
        return self


class RunStarted(BaseModel):
    run_id: str
    pipeline: str
    status: RunStatus
    created: bool = Field(description="false when an Idempotency-Key matched an existing run")


class UsageOut(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    cost_usd: float
    model_calls: int
    cache_hits: int
    fallbacks: int
    cache_write_1h_tokens: int = 0
    thinking_tokens: int = 0
    batch_calls: int = 0

    @staticmethod
    def of(usage: Usage) -> UsageOut:
        return UsageOut(**usage.model_dump(exclude={"cost_nusd"}), cost_usd=usage.cost_usd)


class ApprovalOut(BaseModel):
    approval_id: str
    run_id: str
    pipeline: str
    kind: str
    title: str
    proposal: dict[str, Any]
    editable: list[str]
    requested_by: str
    status: ApprovalStatus
    eligible_roles: list[str]
    eligible_principals: list[str]
    quorum: int
    approvals: int
    deadline_at: datetime
    created_at: datetime
    rule: str | None = Field(
        None, description="the permission rule that required this approval (a tool call's)"
    )
    proposal_schema: str | None = Field(
        None, description="the schema the proposal and its edits validate against"
    )
    decided_by: list[str] = Field(default_factory=list, description="who decided so far")

    @staticmethod
    def of_state(run_id: str, pipeline: str, approval: ApprovalState) -> ApprovalOut:
        return ApprovalOut(
            approval_id=approval.approval_id,
            run_id=run_id,
            pipeline=pipeline,
            kind=approval.proposal.kind,
            title=approval.proposal.title,
            proposal=approval.final_data or approval.proposal.data,
            editable=list(approval.proposal.editable),
            requested_by=approval.requested_by,
            status=approval.status,
            eligible_roles=list(approval.eligible_roles),
            eligible_principals=list(approval.policy.principals),
            quorum=approval.policy.quorum,
            approvals=approval.approve_count,
            deadline_at=approval.deadline_at,
            created_at=approval.created_at,
            rule=_rule(approval.proposal.context),
            proposal_schema=approval.proposal.schema_name,
            decided_by=[d.principal for d in approval.decisions],
        )

    @staticmethod
    def of_row(row: dict[str, Any]) -> ApprovalOut:
        return ApprovalOut(
            approval_id=row["id"],
            run_id=row["run_id"],
            pipeline=row["pipeline"],
            kind=row["kind"],
            title=row["title"],
            proposal=row["proposal"]["data"],
            editable=row["proposal"].get("editable", []),
            requested_by=row["requested_by"],
            status=ApprovalStatus(row["status"]),
            eligible_roles=row["eligible_roles"],
            eligible_principals=row["eligible_principals"],
            quorum=row["quorum"],
            approvals=row["approvals"],
            deadline_at=row["deadline_at"],
            created_at=row["created_at"],
            rule=_rule(row["proposal"].get("context") or {}),
            proposal_schema=row["proposal"].get("schema"),
            decided_by=list(row.get("decided_by") or []),
        )


def _rule(context: dict[str, Any]) -> str | None:
    rule = context.get("rule")
    return rule if isinstance(rule, str) else None


class RunOut(BaseModel):
    run_id: str
    pipeline: str
    status: RunStatus
    stage: Stage
    requested_by: str
    started_at: datetime | None
    closed_at: datetime | None = None
    stages: list[StageEntry] = []
    pending_approvals: list[ApprovalOut] = []
    approvals: list[ApprovalOut] = []
    attempts: dict[str, int] = {}
    usage: UsageOut | None = None
    last_error: ErrorInfo | None = None
    result: dict[str, Any] | None = None
    progress: dict[str, int] = Field(default_factory=dict)
    state_available: bool = Field(
        True,
        description="false when no worker answered the state query; facts then come "
        "from Temporal visibility alone",
    )
    stuck: bool = Field(
        False,
        description="the run's workflow task keeps failing (a bug or a bad value): it makes "
        "no progress until the code is fixed; cancel ends it",
    )
    stuck_error: ErrorInfo | None = Field(None, description="why its workflow task fails")


class RunSummary(BaseModel):
    run_id: str
    pipeline: str
    status: RunStatus
    stage: Stage | None
    requested_by: str | None
    pending_approval: bool
    stuck: bool = False
    error_type: str | None = None
    started_at: datetime | None
    closed_at: datetime | None


class Page(BaseModel, Generic[T]):  # Python 3.11 has no PEP 695 syntax
    items: list[T]
    next_cursor: str | None = Field(None, description="pass as `cursor` for the next page")


class DecisionIn(Request):
    decision: Literal["approve", "reject"]
    comment: str = Field("", max_length=4000)
    edits: dict[str, Any] | None = Field(
        None, description="with approve: changed fields of the proposal (editable ones only)"
    )


class DecisionOut(BaseModel):
    approval_id: str
    status: ApprovalStatus
    approvals: int
    quorum: int


class RetryIn(Request):
    mode: Literal["resume", "restart"] = Field(
        "resume",
        description="resume: re-run from the failed step, keeping what succeeded; "
        "restart: a new run with the same input",
    )
