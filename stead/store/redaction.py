"""A tenant's own redaction rules: field names it adds to `policies/redaction.yaml`.

Additions only (`RedactionPolicy.with_fields`): a tenant can make its audit log redact more,
never less. Names are matched like the file's field rules: anywhere in an entry's data,
case-insensitive, exact name. Stored lower-cased, sorted and de-duplicated.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from stead.store.db import Conn


@dataclass(frozen=True)
class TenantRedaction:
    drop: tuple[str, ...] = ()
    mask: tuple[str, ...] = ()
    updated_by: str | None = None
    updated_at: datetime | None = None

    @property
    def empty(self) -> bool:
        return not self.drop and not self.mask


def normalize(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted({name.strip().lower() for name in names if name.strip()}))


async def load(conn: Conn, tenant: str) -> TenantRedaction:
    row = await conn.fetchrow(
        "SELECT drop_fields, mask_fields, updated_by, updated_at FROM redaction_overrides"
        " WHERE tenant_id = $1",
        tenant,
    )
    if row is None:
        return TenantRedaction()
    return TenantRedaction(
        drop=tuple(row["drop_fields"]),
        mask=tuple(row["mask_fields"]),
        updated_by=row["updated_by"],
        updated_at=row["updated_at"],
    )


async def save(
    conn: Conn, tenant: str, drop: Iterable[str], mask: Iterable[str], updated_by: str
) -> TenantRedaction:
    """Replace the tenant's additions. Raises ValueError when a name is in both lists."""
    drop_names, mask_names = normalize(drop), normalize(mask)
    both = sorted(set(drop_names) & set(mask_names))
    if both:
        raise ValueError(f"fields cannot be both dropped and masked: {', '.join(both)}")
    updated_at: datetime = await conn.fetchval(
        "INSERT INTO redaction_overrides (tenant_id, drop_fields, mask_fields, updated_by)"
        " VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (tenant_id) DO UPDATE SET drop_fields = EXCLUDED.drop_fields,"
        " mask_fields = EXCLUDED.mask_fields, updated_by = EXCLUDED.updated_by,"
        " updated_at = now()"
        " RETURNING updated_at",
        tenant,
        list(drop_names),
        list(mask_names),
        updated_by,
    )
    return TenantRedaction(drop_names, mask_names, updated_by, updated_at)
