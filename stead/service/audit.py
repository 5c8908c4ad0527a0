"""The audit chain's state: whether a tenant's log is intact, for the API and the pages alike."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from stead.service.access import Services, require
from stead.store import audit
from stead.store.audit import Problem, Verification
from stead.store.principals import Principal


class ChainOut(BaseModel):
    scope: Literal["tenant", "run"] = Field(
        description="run: the run's entries and their neighbours were checked in place; "
        "tenant: the tenant's whole chain was recomputed"
    )
    ok: bool
    entries: int = Field(description="entries checked (up to the first bad one)")
    first_bad_seq: int | None = None
    problem: Problem | None = None
    detail: str = ""
    head_seq: int | None = Field(None, description="tenant scope: last entry of the intact chain")
    head_hash: str | None = None

    @staticmethod
    def of(result: Verification, scope: Literal["tenant", "run"]) -> ChainOut:
        whole = scope == "tenant" and result.ok
        return ChainOut(
            scope=scope,
            ok=result.ok,
            entries=result.entries,
            first_bad_seq=result.first_bad_seq,
            problem=result.problem,
            detail=result.detail,
            head_seq=result.head_seq if whole else None,
            head_hash=(result.head_hash or None) if whole else None,
        )


async def verify_chain(svc: Services, principal: Principal) -> ChainOut:
    """Recompute the caller's tenant's whole chain (admins: `audit:verify`)."""
    require(svc, principal, "audit:verify")
    async with svc.pool.acquire() as conn:
        result = await audit.verify(conn, principal.tenant)
    return ChainOut.of(result, "tenant")
