"""Reading a tenant's audit log as a feed: entries of some actions after a sequence number.

The log's per-tenant sequence is gap-free and committed in order (each append holds the
tenant's chain lock until it commits), so "entries after N" never skips one that commits
later with a smaller number.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from stead.store.db import Conn


async def head(conn: Conn, tenant: str) -> int:
    """The tenant's last sequence number (0 for an empty log)."""
    found = await conn.fetchval(
        "SELECT seq FROM audit_log WHERE tenant_id = $1 ORDER BY seq DESC LIMIT 1", tenant
    )
    return int(found or 0)


async def after(
    conn: Conn, tenant: str, after_seq: int, actions: Sequence[str], limit: int
) -> list[asyncpg.Record]:
    """Entries of `actions` with a sequence number above `after_seq`, in order."""
    return await conn.fetch(
        "SELECT * FROM audit_log WHERE tenant_id = $1 AND seq > $2 AND action = ANY($3)"
        " ORDER BY seq LIMIT $4",
        tenant,
        after_seq,
        list(actions),
        limit,
    )
