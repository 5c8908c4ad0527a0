"""The tools agents may call: what each takes, what it does to which resource, and through
which integration. Permissions (policies/permissions.yaml) decide who may use them.

Input models double as the JSON schemas offered to the model and as the proposal schemas for
"approve with edits": an approver may change only a tool's `editable` fields, and the edited
call must still validate.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

Money = Annotated[
    Decimal,
    Field(gt=0, max_digits=12, decimal_places=2),
    WithJsonSchema({"type": "number", "exclusiveMinimum": 0, "description": "amount, e.g. 40.00"}),
]
EMAIL = r"^[^@\s]+@[^@\s]+\.[A-Za-z]{2,}$"


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LookupCustomer(_Input):
    customer_id: str = Field(min_length=1, max_length=128, description="the customer's id")


class DraftReply(_Input):
    subject: str = Field(min_length=1, max_length=300)
    body: str = Field(min_length=1, max_length=20_000)


class IssueRefund(_Input):
    customer_id: str = Field(min_length=1, max_length=128)
    amount: Money
    currency: Literal["USD", "EUR", "GBP"] = "USD"
    reason: str = Field(min_length=1, max_length=2000)


class SendEmail(_Input):
    to: str = Field(pattern=EMAIL, max_length=320, description="recipient address")
    subject: str = Field(min_length=1, max_length=300)
    body: str = Field(min_length=1, max_length=20_000)


Integration = Literal["crm", "drafts", "payments", "email"]


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    input_model: type[_Input]
    action: Literal["read", "draft", "execute"]
    resource: str
    integration: Integration
    scope: str
    editable: tuple[str, ...] = ()
    # The argument that names the customer record the call is about, if any: the gateway
    # checks the record exists in the tenant and that the acting user may read it.
    subject: str | None = None

    def schema(self) -> dict[str, Any]:
        """The tool as offered to the model (Anthropic tool-use format)."""
        return {
            "name": self.name,
            "description": self.description,
            "input_schema": self.input_model.model_json_schema(),
        }


TOOLS: dict[str, ToolSpec] = {
    spec.name: spec
    for spec in (
        ToolSpec(
            "lookup_customer",
            "Look up a customer record: name, email, plan, notes.",
            LookupCustomer,
            "read",
            "customer",
            "crm",
            "customers:read",
            subject="customer_id",
        ),
        ToolSpec(
            "draft_reply",
            "Save a draft reply to the customer. Drafting sends nothing.",
            DraftReply,
            "draft",
            "reply",
            "drafts",
            "drafts:write",
        ),
        ToolSpec(
            "issue_refund",
            "Refund the customer. A payment: it may need a human's approval first.",
            IssueRefund,
            "execute",
            "refund",
            "payments",
            "refunds:create",
            editable=("amount", "reason"),
            subject="customer_id",
        ),
        ToolSpec(
            "send_email",
            "Send an email to the customer.",
            SendEmail,
            "execute",
            "email",
            "email",
            "email:send",
            editable=("subject", "body"),
        ),
    )
}

# What each integration's credentials are scoped to. A tool whose scope its integration does
# not hold is refused even when the caller's grants would allow it.
INTEGRATION_SCOPES: dict[str, frozenset[str]] = {
    "crm": frozenset({"customers:read"}),
    "drafts": frozenset({"drafts:write"}),
    "payments": frozenset({"refunds:create"}),
    "email": frozenset({"email:send"}),
}
