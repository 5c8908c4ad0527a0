"""The support desk: the reference application's tools, integrations and records.

Built on Stead's public API only, as a team builds its own:

- two integrations, `payments` and `email`, configured like any other
  (`STEAD_INTEGRATION_PAYMENTS_URL`, `..._TOKEN`; `stead dev` serves loopback stand-ins);
- four tools: `lookup_customer` and `draft_reply` on the application's own tables,
  `issue_refund` and `send_email` through the integrations, each with the argument that
  names its customer, so the gateway checks the record and binds it to the run's facts;
- the `customer` record loader and the trusted-facts hook (the customer's email, from the
  ticket's customer id), and the demo data `stead dev` seeds.

The tables are the application's (`activities/migrations/`), not Stead's.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

import stead
from stead.sim.integrations import create_email_app, create_payments_app

MIGRATIONS = Path(__file__).parent / "migrations"

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


payments = stead.Integration(
    "payments",
    scopes=("refunds:create",),
    description="the payment provider's refunds API",
    dev_app=create_payments_app,
)
email = stead.Integration(
    "email",
    scopes=("email:send",),
    description="the email provider's messages API",
    dev_app=create_email_app,
)
CUSTOMER = stead.Subject("customer", "customer_id")


# --- the application's own records -----------------------------------------------------------


async def find_customer(db: Any, tenant: str, customer_id: str) -> dict[str, Any] | None:
    async with db.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT id, name, email, plan, restricted, notes FROM crm_customers"
            " WHERE tenant_id = $1 AND id = $2",
            tenant,
            customer_id,
        )
    return dict(row) if row else None


async def upsert_customer(
    conn: Any,
    tenant: str,
    customer_id: str,
    name: str,
    email_address: str,
    *,
    plan: str = "standard",
    restricted: bool = False,
    notes: str = "",
) -> None:
    await conn.execute(
        "INSERT INTO crm_customers (tenant_id, id, name, email, plan, restricted, notes)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (tenant_id, id) DO UPDATE SET"
        " name = EXCLUDED.name, email = EXCLUDED.email, plan = EXCLUDED.plan,"
        " restricted = EXCLUDED.restricted, notes = EXCLUDED.notes",
        tenant,
        customer_id,
        name,
        email_address,
        plan,
        restricted,
        notes,
    )


async def load_customer(ctx: stead.RecordContext, customer_id: str) -> Mapping[str, Any] | None:
    """A customer as the permission model sees it: `restricted` records (VIPs, legal holds)
    are readable only by roles whose read grant allows them."""
    return await find_customer(ctx.db, ctx.tenant, customer_id)


async def customer_facts(ctx: stead.RecordContext, given: Mapping[str, Any]) -> Mapping[str, Any]:
    """The customer's email, from the run's own customer id: what `send_email` is bound to."""
    customer_id = given.get("customer_id")
    if not isinstance(customer_id, str):
        return {}
    record = await find_customer(ctx.db, ctx.tenant, customer_id)
    return {"customer_email": record["email"]} if record else {}


# --- tools -----------------------------------------------------------------------------------


@stead.tool(action="read", resource="customer", subject=CUSTOMER)
async def lookup_customer(ctx: stead.ToolContext, args: LookupCustomer) -> stead.ToolResult:
    """Look up a customer record: name, email, plan, notes."""
    record = await find_customer(ctx.db, ctx.tenant, args.customer_id)
    if record is None:  # checked by the gateway already; gone since
        raise stead.ToolRefused("no such customer")
    return stead.ToolResult.of(record)


@stead.tool(action="draft", resource="reply")
async def draft_reply(ctx: stead.ToolContext, args: DraftReply) -> stead.ToolResult:
    """Save a draft reply to the customer. Drafting sends nothing."""
    async with ctx.db.acquire() as conn:
        # Idempotent by the operation key: a retried draft is stored once.
        await conn.execute(
            "INSERT INTO drafts (tenant_id, op_key, run_id, subject, body)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant_id, op_key) DO NOTHING",
            ctx.tenant,
            ctx.op_key,
            ctx.run_id,
            args.subject,
            args.body,
        )
    return stead.ToolResult(f"draft saved: {args.subject}", {"draft": ctx.op_key})


@stead.tool(
    action="execute",
    resource="refund",
    integration=payments,
    scopes=("refunds:create",),
    editable=("amount", "reason"),
    subject=CUSTOMER,
)
async def issue_refund(ctx: stead.ToolContext, args: IssueRefund) -> stead.ToolResult:
    """Refund the customer. A payment: it may need a human's approval first."""
    assert ctx.http is not None
    body = {**args.model_dump(mode="json"), "amount": f"{args.amount:.2f}"}
    refund = await ctx.http.post(
        "/v1/refunds", {**body, "metadata": ctx.metadata}, idempotency_key=ctx.op_key
    )
    return stead.ToolResult.of(refund)


@stead.tool(
    action="execute",
    resource="email",
    integration=email,
    scopes=("email:send",),
    editable=("subject", "body"),
)
async def send_email(ctx: stead.ToolContext, args: SendEmail) -> stead.ToolResult:
    """Send an email to the customer."""
    assert ctx.http is not None
    message = await ctx.http.post(
        "/v1/messages",
        {**args.model_dump(mode="json"), "metadata": ctx.metadata},
        idempotency_key=ctx.op_key,
    )
    return stead.ToolResult.of(message)


TOOLS = (lookup_customer, draft_reply, issue_refund, send_email)


async def seed(conn: Any) -> None:
    """The demo customers `stead dev` shows (idempotent)."""
    await upsert_customer(conn, "acme", "cus_100", "Jane Doe", "jane@initech.example")
    await upsert_customer(
        conn,
        "acme",
        "cus_900",
        "Vera Important",
        "vera@bigco.example",
        restricted=True,
        notes="VIP: restricted to approvers and admins",
    )
    await upsert_customer(conn, "globex", "cus_100", "Hank Scorpio", "hank@globex.example")
