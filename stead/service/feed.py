"""The tenant's live feed (`GET /v1/events`): approvals requested and decided, runs finished.

What a reviewers' app needs for a live inbox, across every run of the caller's tenant. Its
source is the audit log in PostgreSQL, not the runs' own streams: every event it carries is an
audit entry already, written exactly once, kept for good and numbered by the tenant's gap-free
sequence, so an event's id is that number and a client resumes after any id it saw, even days
later, with nothing missed or repeated. Following each run's stream instead would mean one
subscription per open run, and nothing to resume from once a run's history is gone.

What the caller sees: approval events with `approvals:read` (an approval's proposal as their
inbox shows it: in full to those who may decide it, `eligible` telling them so), run endings
with `runs:read`, each entry redacted for the viewer as the audit views redact it.

Entries reach the log when the run writes them: an approval request at once; a decision with
the run's next ledger write (at once when the run's next step is a tool call or its end, when
the model call after it returns otherwise; the inbox, `GET /v1/approvals`, drops a decided
approval at once); a run's end at once.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from stead.service.access import Services, require
from stead.service.errors import Invalid
from stead.store import feed as feed_store
from stead.store.audit import AuditEntry
from stead.store.principals import Principal

APPROVAL_ACTIONS = (
    "approval.requested",
    "approval.decided",
    "approval.escalated",
    "approval.expired",
)
RUN_ACTIONS = ("run.completed", "run.failed", "run.cancelled")
SEQ = re.compile(r"^\d{1,18}$")
POLL_SECONDS = 0.5
_BATCH = 200


class FeedEvent(BaseModel):
    """One entry of the tenant's feed (the `data:` of each Server-Sent Event)."""

    id: str = Field(description="the entry's sequence number in the tenant's audit log")
    type: str = Field(description=f"one of {', '.join(APPROVAL_ACTIONS + RUN_ACTIONS)}")
    at: datetime
    actor: str
    run_id: str | None
    data: dict[str, Any]
    eligible: bool | None = Field(
        None,
        description="approval.requested and approval.escalated: whether the caller may decide"
        " the approval now",
    )


@dataclass(frozen=True)
class OpenedFeed:
    principal: Principal
    after: int
    actions: tuple[str, ...]
    sensitive: bool
    may_decide: bool


async def open_feed(svc: Services, principal: Principal, last_event_id: str | None) -> OpenedFeed:
    """Check the caller may follow the feed, and from where: after `last_event_id`, or from
    now on without one."""
    rights = svc.permissions
    approvals = rights.has_right(principal.roles, "approvals:read")
    runs = rights.has_right(principal.roles, "runs:read")
    if not approvals and not runs:
        require(svc, principal, "approvals:read")  # refuses, naming a right that would do
    if last_event_id is not None and not SEQ.match(last_event_id.strip()):
        raise Invalid("Last-Event-ID is not an event id this API sent")
    if last_event_id is not None:
        after = int(last_event_id.strip())
    else:
        async with svc.pool.acquire() as conn:
            after = await feed_store.head(conn, principal.tenant)
    return OpenedFeed(
        principal=principal,
        after=after,
        actions=(APPROVAL_ACTIONS if approvals else ()) + (RUN_ACTIONS if runs else ()),
        sensitive=rights.has_right(principal.roles, "audit:read_sensitive"),
        may_decide=rights.has_right(principal.roles, "approvals:decide"),
    )


async def feed_events(
    svc: Services, opened: OpenedFeed, *, poll_seconds: float = POLL_SECONDS
) -> AsyncIterator[FeedEvent]:
    """The feed from its position on, for as long as the caller listens."""
    after = opened.after
    while True:
        async with svc.pool.acquire() as conn:
            rows = await feed_store.after(
                conn, opened.principal.tenant, after, opened.actions, _BATCH
            )
        for row in rows:
            after = int(row["seq"])
            yield _event(svc, opened, row)
        if len(rows) < _BATCH:
            await asyncio.sleep(poll_seconds)


def _event(svc: Services, opened: OpenedFeed, row: Any) -> FeedEvent:
    entry = svc.audit.decode(row, reveal_private=opened.sensitive)
    eligible = None
    if entry.action in ("approval.requested", "approval.escalated"):
        eligible = opened.may_decide and _decides(opened.principal, entry)
        if eligible and not entry.revealed:
            # Its deciders read the proposal in full, as in their inbox.
            entry = svc.audit.decode(row, reveal_private=True)
    return FeedEvent(
        id=str(entry.seq),
        type=entry.action,
        at=entry.at,
        actor=entry.actor,
        run_id=entry.run_id,
        data=entry.data,
        eligible=eligible,
    )


def _decides(principal: Principal, entry: AuditEntry) -> bool:
    roles = [r for r in entry.data.get("roles") or [] if isinstance(r, str)]
    return principal.id in (entry.data.get("principals") or []) or principal.has_role(*roles)
