"""Request limits in PostgreSQL: every API process draws on the same buckets.

The algorithm and its guarantees are in `migrations/0009_rate_limits.sql` (`rate_limit_admit`):
one statement, so one round trip, that reads the tenant's plan, picks that plan's limits from
the ones passed in (`LimitPolicy.for_store`), checks the cap on runs waiting for approval and
charges the key's and the tenant's buckets together or not at all. On the start path it rides
the read the start needs anyway (the plan and the approval-policy overrides).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg

from stead.contract import ApprovalPolicy
from stead.store.approvals import START_SETTINGS_SQL, start_settings_of
from stead.store.db import Conn

RefusedBy = Literal["key", "tenant", "awaiting_approval"]
# $1 tenant, $2 action, $3 key id, $4 every plan's limits, $5 now (NULL: the server's clock).
_ADMIT = (
    "SELECT t.plan, a.* FROM tenants t CROSS JOIN LATERAL rate_limit_admit(t.id, $2, $3,"
    " coalesce($4::jsonb -> t.plan, $4::jsonb -> 'default'), $5) a WHERE t.id = $1"
)
# $1 tenant, $2 pipeline, then as above from $3; the action is runs.start.
_ADMIT_START = (
    f"SELECT s.*, a.* FROM ({START_SETTINGS_SQL}) s"  # noqa: S608  # constants only, no input
    " CROSS JOIN LATERAL rate_limit_admit($1, 'runs.start', $3,"
    " coalesce($4::jsonb -> s.plan, $4::jsonb -> 'default'), $5) a"
)


@dataclass(frozen=True)
class Verdict:
    plan: str
    admitted: bool
    # Seconds until the same request could be admitted (0 when it was).
    retry_after: float = 0.0
    refused_by: RefusedBy | None = None


def _verdict(row: asyncpg.Record) -> Verdict:
    return Verdict(
        plan=str(row["plan"]),
        admitted=bool(row["admitted"]),
        retry_after=float(row["retry_after"]),
        refused_by=row["refused_by"],
    )


async def admit(
    conn: Conn,
    tenant: str,
    action: str,
    key_id: str,
    limits: Mapping[str, Mapping[str, Any]],
    *,
    now: datetime | None = None,
) -> Verdict:
    """Admit one request of `action` by `key_id`, charging its buckets, or refuse it."""
    row = await conn.fetchrow(_ADMIT, tenant, action, key_id, limits, now)
    return _verdict(row) if row is not None else Verdict(plan="standard", admitted=True)


async def admit_start(
    conn: Conn,
    tenant: str,
    pipeline: str,
    key_id: str,
    limits: Mapping[str, Mapping[str, Any]],
    *,
    now: datetime | None = None,
) -> tuple[Verdict, dict[str, ApprovalPolicy]]:
    """`admit` for a run start, in the same round trip as its start settings (the plan and
    the tenant's approval-policy overrides for `pipeline`)."""
    row = await conn.fetchrow(_ADMIT_START, tenant, pipeline, key_id, limits, now)
    plan, overrides = start_settings_of(row)
    verdict = _verdict(row) if row is not None else Verdict(plan=plan, admitted=True)
    return verdict, overrides
