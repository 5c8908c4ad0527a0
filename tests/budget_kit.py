"""Reading a tenant's budget state in tests: its counters and its reservations."""

from __future__ import annotations

from stead.store.db import Pool
from tests.conftest import Tenant


async def counter(pool: Pool, tenant: Tenant, scope: str = "customer") -> dict[str, int]:
    """spent, reserved and limit of the tenant's (only) counter of `scope`."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT spent_nusd, reserved_nusd, limit_nusd FROM budget_counters"
            " WHERE tenant_id = $1 AND scope = $2",
            tenant.id,
            scope,
        )
    assert row is not None, f"no {scope} budget counter for {tenant.id}"
    return {k: int(v) for k, v in dict(row).items()}


async def reservation(pool: Pool, tenant: Tenant) -> tuple[int, int | None]:
    """(reserved, charged) of the tenant's only reservation; charged is None while open."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT amount_nusd, charged_nusd FROM budget_reservations WHERE tenant_id = $1",
            tenant.id,
        )
    assert len(rows) == 1, rows
    return int(rows[0]["amount_nusd"]), rows[0]["charged_nusd"]
