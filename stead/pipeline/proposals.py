"""Proposals people approve, and the rules for editing them.

A proposal's data is validated by a schema its pipeline declares (`proposals=` on the class),
a tool's input model (`tool:<name>`), or Stead's own budget raise. "Approve with edits" may
change only the fields the proposal declares editable, and the edited whole must still
validate. The same check runs in the API (a fast 422) and in the workflow's update validator
(the authority).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stead.contract import MAX_BUDGET_USD, Proposal


class BudgetProposal(BaseModel):
    """Raise a budget a run ran out of (`on_budget_exhausted="approval"`)."""

    model_config = ConfigDict(extra="forbid")

    scope: str
    current_usd: float = Field(ge=0, le=MAX_BUDGET_USD, allow_inf_nan=False)
    # An approver's edit of 1e300 overflowed the budget's nano-USD counter and crash-looped
    # the run: bounded like every budget.
    requested_usd: float = Field(gt=0, le=MAX_BUDGET_USD, allow_inf_nan=False)


class InvalidEdits(ValueError):
    """Edits touch a field that is not editable, or make the proposal invalid."""


def apply_edits(
    schema: type[BaseModel] | None,
    proposal: Proposal,
    current: dict[str, Any],
    edits: dict[str, Any],
) -> dict[str, Any]:
    """Return `current` with `edits` applied, validated against the proposal's `schema`."""
    forbidden = sorted(set(edits) - set(proposal.editable))
    if forbidden:
        allowed = ", ".join(proposal.editable) or "none"
        raise InvalidEdits(f"fields not editable: {', '.join(forbidden)} (editable: {allowed})")
    if schema is None:
        raise InvalidEdits(f"unknown proposal schema {proposal.schema_name!r}")
    try:
        model = schema.model_validate({**current, **edits})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidEdits(f"{where}: {first['msg']}") from None
    return model.model_dump(mode="json")
