"""Ledger activities: the workflow's only way to write its record (audit, approvals inbox).

Both run as local activities on the workflow worker (cheap for the Temporal server) and are
idempotent: audit entries are keyed, approval projections are versioned.
"""

from __future__ import annotations

from temporalio import activity

from stead import metrics
from stead.calls import FlushAudit, PublishApproval, RaiseBudget
from stead.store import approvals, budgets
from stead.store.audit import AuditWriter
from stead.store.db import Pool


class LedgerActivities:
    def __init__(self, pool: Pool, audit: AuditWriter) -> None:
        self._pool = pool
        self._audit = audit

    @activity.defn(name="ledger.flush")
    async def flush(self, batch: FlushAudit) -> int:
        async with self._pool.acquire() as conn, conn.transaction():
            if batch.context is not None:
                for approval in batch.approvals:
                    await approvals.upsert(conn, batch.context, batch.workflow_id, approval)
            new = await self._audit.append_new(conn, batch.events)
        metrics.observe_events(new)
        return len(new)

    @activity.defn(name="ledger.publish_approval")
    async def publish_approval(self, change: PublishApproval) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await approvals.upsert(conn, change.context, change.workflow_id, change.approval)
            new = await self._audit.append_new(conn, change.events)
        # Decisions are counted from their audit events (stored once, by whichever activity
        # carries them), not from this projection: the API has usually brought it up to date
        # already, and then this upsert changes nothing.
        metrics.observe_events(new)

    @activity.defn(name="ledger.raise_budget")
    async def raise_budget(self, change: RaiseBudget) -> None:
        async with self._pool.acquire() as conn:
            await budgets.set_budget(
                conn,
                change.tenant,
                change.scope,
                change.subject,
                change.period,
                change.limit_nusd / 1e9,
            )
