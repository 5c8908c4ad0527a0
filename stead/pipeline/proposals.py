"""Typed proposals: the payloads humans approve, and the rules for editing them.

Each schema is a pydantic model; "approve with edits" may change only the fields a proposal
declares editable, and the edited whole must still validate. The same check runs in the API
(a fast 422) and in the workflow's update validator (the authority).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from policies.tools import TOOLS
from stead.contract import MAX_BUDGET_USD, Proposal


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SummaryProposal(_Schema):
    summary: str = Field(min_length=1, max_length=20_000)


class ReplyProposal(_Schema):
    to: str = Field(min_length=3, max_length=320)
    subject: str = Field(min_length=1, max_length=300)
    body: str = Field(min_length=1, max_length=20_000)


class RefundProposal(_Schema):
    customer_id: str = Field(min_length=1, max_length=128)
    amount: Decimal = Field(gt=0, max_digits=12, decimal_places=2)
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    reason: str = Field(min_length=1, max_length=2000)


class AnswerProposal(_Schema):
    answer: str = Field(min_length=1, max_length=20_000)
    citations: list[dict[str, Any]] = Field(default_factory=list)


class BudgetProposal(_Schema):
    scope: str
    current_usd: float = Field(ge=0, le=MAX_BUDGET_USD, allow_inf_nan=False)
    # An approver's edit of 1e300 overflowed the budget's nano-USD counter and crash-looped
    # the run: bounded like every budget.
    requested_usd: float = Field(gt=0, le=MAX_BUDGET_USD, allow_inf_nan=False)


class ToolCallProposal(_Schema):
    tool: str
    arguments: dict[str, Any]


SCHEMAS: dict[str, type[_Schema]] = {
    "summary": SummaryProposal,
    "reply": ReplyProposal,
    "refund": RefundProposal,
    "answer": AnswerProposal,
    "budget": BudgetProposal,
    "tool_call": ToolCallProposal,
}


def schema_for(name: str) -> type[BaseModel] | None:
    """A proposal schema by name; `tool:<name>` is that tool's input model."""
    if name.startswith("tool:"):
        spec = TOOLS.get(name.removeprefix("tool:"))
        return spec.input_model if spec else None
    return SCHEMAS.get(name)


class InvalidEdits(ValueError):
    """Edits touch a field that is not editable, or make the proposal invalid."""


def apply_edits(
    proposal: Proposal, current: dict[str, Any], edits: dict[str, Any]
) -> dict[str, Any]:
    """Return `current` with `edits` applied, validated against the proposal's schema."""
    forbidden = sorted(set(edits) - set(proposal.editable))
    if forbidden:
        allowed = ", ".join(proposal.editable) or "none"
        raise InvalidEdits(f"fields not editable: {', '.join(forbidden)} (editable: {allowed})")
    schema = schema_for(proposal.schema_name)
    if schema is None:
        raise InvalidEdits(f"unknown proposal schema {proposal.schema_name!r}")
    try:
        model = schema.model_validate({**current, **edits})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidEdits(f"{where}: {first['msg']}") from None
    return model.model_dump(mode="json")
