"""The approvals projection: the inbox's source, written only by the ledger activity."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from stead.contract import (
    ApprovalPolicy,
    ApprovalState,
    ApprovalStatus,
    DecideResult,
    RunContext,
)
from stead.store.db import Conn


async def upsert(
    conn: Conn, context: RunContext, workflow_id: str, approval: ApprovalState
) -> bool:
    """Write the approval's state unless a newer version is already stored; True if written."""
    done = await conn.execute(
        """
        INSERT INTO approvals (id, tenant_id, run_id, workflow_id, pipeline, kind, title, proposal,
            requested_by, eligible_roles, eligible_principals, quorum, approvals, decided_by,
            status, deadline_at, created_at, updated_at, version)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
            now(), $18)
        ON CONFLICT (id) DO UPDATE SET
            proposal = EXCLUDED.proposal, eligible_roles = EXCLUDED.eligible_roles,
            approvals = EXCLUDED.approvals, decided_by = EXCLUDED.decided_by,
            status = EXCLUDED.status, deadline_at = EXCLUDED.deadline_at,
            updated_at = now(), version = EXCLUDED.version
        WHERE approvals.version < EXCLUDED.version
        """,
        approval.approval_id,
        context.tenant,
        context.run_id,
        workflow_id,
        context.pipeline,
        approval.proposal.kind,
        approval.proposal.title,
        {
            "data": approval.final_data or approval.proposal.data,
            "schema": approval.proposal.schema_name,
            "editable": list(approval.proposal.editable),
            "context": approval.proposal.context,
        },
        approval.requested_by,
        list(approval.eligible_roles),
        list(approval.policy.principals),
        approval.policy.quorum,
        approval.approve_count,
        [d.principal for d in approval.decisions],
        approval.status.value,
        approval.deadline_at,
        approval.created_at,
        approval.version,
    )
    return done.endswith(" 1")


async def record_decision(conn: Conn, tenant: str, approval_id: str, result: DecideResult) -> None:
    """Bring the inbox in step with a decision the run accepted (unless it moved on already)."""
    await conn.execute(
        "UPDATE approvals SET status = $3, approvals = $4, decided_by = $5, version = $6,"
        " updated_at = now() WHERE tenant_id = $1 AND id = $2 AND version < $6",
        tenant,
        approval_id,
        result.status.value,
        result.approvals,
        list(result.decided_by),
        result.version,
    )


async def inbox(
    conn: Conn,
    tenant: str,
    principal: str,
    roles: Sequence[str],
    *,
    limit: int,
    after: tuple[datetime, str] | None,
    pipeline: str | None = None,
    kind: str | None = None,
) -> list[dict[str, Any]]:
    """Pending approvals this principal may decide now, oldest deadline first, optionally of
    one pipeline or kind only.

    Excludes requests the principal made (they cannot approve their own) and ones they have
    already voted on (quorum needs distinct principals).
    """
    rows = await conn.fetch(
        """
        SELECT * FROM approvals
        WHERE tenant_id = $1 AND status = 'pending'
          AND (eligible_roles && $3::text[] OR $2 = ANY (eligible_principals))
          AND requested_by <> $2 AND NOT ($2 = ANY (decided_by))
          AND ($4::timestamptz IS NULL OR (deadline_at, id) > ($4, $5))
          AND ($7::text IS NULL OR pipeline = $7) AND ($8::text IS NULL OR kind = $8)
        ORDER BY deadline_at, id
        LIMIT $6
        """,
        tenant,
        principal,
        list(roles),
        after[0] if after else None,
        after[1] if after else "",
        limit,
        pipeline,
        kind,
    )
    return [dict(r) for r in rows]


async def get(conn: Conn, tenant: str, approval_id: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "SELECT * FROM approvals WHERE tenant_id = $1 AND id = $2", tenant, approval_id
    )
    return dict(row) if row else None


async def close_for_run(conn: Conn, tenant: str, run_id: str, status: str) -> list[str]:
    """Close a run's pending approvals whose run ended without closing them (terminated): the
    inbox must not offer a decision that no run will ever receive. Returns their ids."""
    rows = await conn.fetch(
        "UPDATE approvals SET status = $3, version = version + 1, updated_at = now()"
        " WHERE tenant_id = $1 AND run_id = $2 AND status = 'pending' RETURNING id",
        tenant,
        run_id,
        status,
    )
    return [r["id"] for r in rows]


def is_open(row: dict[str, Any]) -> bool:
    return bool(row["status"] == ApprovalStatus.PENDING.value)


# $1 tenant, $2 pipeline. A query of its own, so the start path can add to this one read.
START_SETTINGS_SQL = (
    "SELECT t.plan, coalesce((SELECT json_agg(json_build_object('step', o.step,"
    " 'policy', o.policy) ORDER BY o.pipeline = '*' DESC) FROM approval_overrides o"
    " WHERE o.tenant_id = t.id AND o.pipeline IN ($2, '*')), '[]') AS overrides"
    " FROM tenants t WHERE t.id = $1"
)


async def start_settings(
    conn: Conn, tenant: str, pipeline: str
) -> tuple[str, dict[str, ApprovalPolicy]]:
    """What a new run of `pipeline` needs from the store, in one read: the tenant's plan and
    its approval-policy overrides for the pipeline."""
    return start_settings_of(await conn.fetchrow(START_SETTINGS_SQL, tenant, pipeline))


def start_settings_of(row: asyncpg.Record | None) -> tuple[str, dict[str, ApprovalPolicy]]:
    if row is None:
        return "standard", {}
    found = {o["step"]: ApprovalPolicy.model_validate(o["policy"]) for o in row["overrides"]}
    return str(row["plan"]), found


async def overrides(conn: Conn, tenant: str, pipeline: str) -> dict[str, ApprovalPolicy]:
    rows = await conn.fetch(
        "SELECT step, policy FROM approval_overrides WHERE tenant_id = $1 AND pipeline IN ($2, '*')"
        " ORDER BY pipeline = '*' DESC",
        tenant,
        pipeline,
    )
    return {r["step"]: ApprovalPolicy.model_validate(r["policy"]) for r in rows}


async def set_override(
    conn: Conn, tenant: str, pipeline: str, step: str, policy: ApprovalPolicy, by: str
) -> None:
    await conn.execute(
        "INSERT INTO approval_overrides (tenant_id, pipeline, step, policy, updated_by)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant_id, pipeline, step)"
        " DO UPDATE SET policy = EXCLUDED.policy, updated_by = EXCLUDED.updated_by,"
        " updated_at = now()",
        tenant,
        pipeline,
        step,
        policy.model_dump(mode="json"),
        by,
    )


async def pending_count(conn: Conn) -> int:
    """Pending approvals across all tenants (for the fleet-wide gauge; no tenant label)."""
    return int(await conn.fetchval("SELECT count(*) FROM approvals WHERE status = 'pending'"))
