"""Helpdesk intake: the helpdesk posts each new ticket here, and a support-agent run works it.

This is how a product feeds its own events into Stead: a route in the product's shape that
maps the event to a pipeline's input and starts the run in the caller's name (the helpdesk's
API key, an integration principal with `runs:start`). The helpdesk's ticket id is the run's
idempotency key, so a webhook delivered twice starts one run.
"""

from __future__ import annotations

from collections.abc import Mapping

import httpx
from fastapi import APIRouter, status
from pydantic import BaseModel, ConfigDict, Field

import stead.api
from workflows.inputs import SupportTicket

router = APIRouter(prefix="/v1/support", tags=["support desk"])


class Requester(BaseModel):
    customer_id: str = Field(min_length=1, max_length=128)


class HelpdeskTicket(BaseModel):
    """A new ticket as the helpdesk sends it."""

    model_config = ConfigDict(extra="ignore")  # a helpdesk sends more than we read

    id: str = Field(min_length=1, max_length=100, pattern=r"^[\x21-\x7e]+$")
    subject: str = Field(min_length=1, max_length=300)
    description: str = Field(min_length=1, max_length=20_000)
    requester: Requester


@router.post("/intake", status_code=status.HTTP_202_ACCEPTED)
async def intake(ticket: HelpdeskTicket, runs: stead.api.Runs) -> stead.api.RunStarted:
    """Start (once per helpdesk ticket) a support-agent run working the ticket."""
    work = SupportTicket(
        ticket_id=ticket.id,
        customer_id=ticket.requester.customer_id,
        subject=ticket.subject,
        body=ticket.description,
    )
    return await runs.start("support-agent", work, idempotency_key=f"helpdesk:{ticket.id}")


DEMO_TICKET = {
    "id": "DEMO-1",
    "subject": "Double charge",
    "requester": {"customer_id": "cus_100"},
    "description": "I was charged twice for my order.\namount: 60\nreason: charged twice",
}


async def demo(api: httpx.AsyncClient, keys: Mapping[str, str]) -> None:
    """`stead dev`'s demo: the helpdesk sends one ticket, so finance (`acme/approver`) finds
    the agent's refund waiting in the web app. Once per data directory: the ticket id is the
    run's idempotency key."""
    sent = await api.post(
        "/v1/support/intake",
        json=DEMO_TICKET,
        headers={"Authorization": f"Bearer {keys['acme/requester']}"},
    )
    sent.raise_for_status()
