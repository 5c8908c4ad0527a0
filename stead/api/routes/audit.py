"""The audit log over HTTP: a run's ledger and entries, the tenant's search and chain check,
and the tenant's own redaction fields.

Every view reads the caller's tenant's log only, so another tenant's run is a 404, the same as
a run that never existed. Content is redacted for the viewer: masked fields read "[masked]"
unless the caller holds `audit:read_sensitive`; dropped content (secrets, card numbers) was
never stored and is shown to no one.

A run's views are built from the audit log, the long-term record, so they keep working after
Temporal's namespace retention has deleted the run's history; Temporal only adds the live
status of a run it still has.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field, StringConstraints

from stead.api.deps import CurrentPrincipal, ServicesDep, limited
from stead.api.errors import RATE_LIMITED
from stead.contract import AuditEvent
from stead.service import audit as chain
from stead.service import ledger
from stead.service.access import Services, require
from stead.service.audit import ChainOut
from stead.service.errors import Invalid
from stead.service.ledger import LedgerOut
from stead.service.runs import RUN_ID
from stead.service.schemas import DateTimeParam, Page, Request
from stead.store import audit, redaction
from stead.store.audit import AuditEntry

router = APIRouter(tags=["audit"])

_ACTION = r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)*(\.\*)?$"
# Keys the ledger reads to fold entries into items: a tenant may not redact them, or its
# ledgers would lose their steps, costs and decisions.
_STRUCTURAL = frozenset(
    {
        "approval_id",
        "call_id",
        "stage",
        "model",
        "cost_nusd",
        "input_tokens",
        "output_tokens",
        "cache_read_tokens",
        "cache_write_tokens",
        "cache_write_1h_tokens",
        "thinking_tokens",
        "cache_saved_nusd",
        "batch",
        "tool",
        "effect",
        "rule",
        "decision",
        "status",
        "pipeline",
        "input_sha256",
    }
)


# --- response and request bodies -----------------------------------------------------------


class AuditEntryOut(BaseModel):
    seq: int
    key: str
    at: datetime
    actor: str
    actor_kind: str
    action: str
    run_id: str | None
    data: dict[str, Any]
    prev_hash: str
    entry_hash: str
    revealed: bool = Field(description="masked originals are shown in `data`")

    @staticmethod
    def of(entry: AuditEntry) -> AuditEntryOut:
        return AuditEntryOut(
            seq=entry.seq,
            key=entry.key,
            at=entry.at,
            actor=entry.actor,
            actor_kind=entry.actor_kind,
            action=entry.action,
            run_id=entry.run_id,
            data=entry.data,
            prev_hash=entry.prev_hash,
            entry_hash=entry.entry_hash,
            revealed=entry.revealed,
        )


class RunAuditOut(BaseModel):
    run_id: str
    items: list[AuditEntryOut]
    chain: ChainOut


FieldName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_\-]{1,64}$")]


class RedactionIn(Request):
    drop: list[FieldName] = Field(default_factory=list, max_length=200)
    mask: list[FieldName] = Field(default_factory=list, max_length=200)


class RedactionOut(BaseModel):
    drop: list[str] = Field(description="the tenant's own fields dropped before storage")
    mask: list[str] = Field(description="the tenant's own fields masked (kept sealed)")
    file_drop: list[str] = Field(description="dropped for every tenant (policies/redaction.yaml)")
    file_mask: list[str]
    updated_by: str | None
    updated_at: datetime | None


# --- a run's views ---------------------------------------------------------------------------


@router.get("/v1/runs/{run_id}/ledger")
async def run_ledger(run_id: str, svc: ServicesDep, principal: CurrentPrincipal) -> LedgerOut:
    """The run in time order: steps, model calls (tokens, cost, cache, latency), tool calls
    (arguments, permission decisions, result), approvals (who, when, comment) and the rest,
    with the run's total model cost. Redacted for the caller."""
    return await ledger.run_ledger(svc, principal, run_id)


@router.get("/v1/runs/{run_id}/audit")
async def run_audit(run_id: str, svc: ServicesDep, principal: CurrentPrincipal) -> RunAuditOut:
    """The run's raw audit entries, redacted for the caller, and whether they are intact and
    in place in the tenant's chain (on a failure, the whole chain is checked to name it)."""
    require(svc, principal, "audit:read")
    _, entries = await ledger.run_entries(svc, principal, run_id)
    async with svc.pool.acquire() as conn:
        result = await audit.verify_run(conn, principal.tenant, run_id)
    return RunAuditOut(
        run_id=run_id,
        items=[AuditEntryOut.of(e) for e in entries],
        chain=ChainOut.of(result, "run" if result.ok else "tenant"),
    )


# --- the tenant's log ------------------------------------------------------------------------


@router.get("/v1/audit")
async def search_audit(
    svc: ServicesDep,
    principal: CurrentPrincipal,
    actor: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
    action: Annotated[
        str | None,
        Query(max_length=100, pattern=_ACTION, description="exact, or a prefix: `approval.*`"),
    ] = None,
    run_id: Annotated[str | None, Query(pattern=RUN_ID.pattern)] = None,
    since: Annotated[
        DateTimeParam | None, Query(alias="from", description="inclusive; with a UTC offset")
    ] = None,
    until: Annotated[
        DateTimeParam | None, Query(alias="to", description="exclusive; with a UTC offset")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> Page[AuditEntryOut]:
    """Search the tenant's audit log, oldest first (chain order). Admins only."""
    require(svc, principal, "audit:search")
    for name, value in (("from", since), ("to", until)):
        if value is not None and value.utcoffset() is None:
            raise Invalid(f"{name} needs a UTC offset, e.g. 2026-01-31T00:00:00Z")
    if since is not None and until is not None and since >= until:
        raise Invalid("from must be earlier than to")
    prefix = action[:-1] if action is not None and action.endswith(".*") else None
    filters = audit.Filters(
        actor=actor,
        action=None if prefix is not None else action,
        action_prefix=prefix,
        run_id=run_id,
        since=since,
        until=until,
    )
    async with svc.pool.acquire() as conn:
        rows = await audit.search(conn, principal.tenant, filters, _after(cursor), limit + 1)
    reveal = svc.permissions.has_right(principal.roles, "audit:read_sensitive")
    page = rows[:limit]
    return Page(
        items=[AuditEntryOut.of(svc.audit.decode(r, reveal_private=reveal)) for r in page],
        next_cursor=_cursor(page[-1]["seq"]) if len(rows) > limit else None,
    )


def _cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode()


def _after(cursor: str | None) -> int:
    if cursor is None:
        return 0
    try:
        kind, _, seq = base64.urlsafe_b64decode(cursor.encode()).decode().partition(":")
        # A sequence number is a bigint: a cursor past 2^63 was a 500 from the database.
        if kind == "seq" and seq.isdigit() and int(seq) < 2**63:
            return int(seq)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        pass
    raise Invalid("cursor is not one this API returned")


@router.get("/v1/audit/verify")
async def verify_chain(svc: ServicesDep, principal: CurrentPrincipal) -> ChainOut:
    """Recompute the tenant's whole chain; name the first entry altered, deleted, inserted or
    reordered. Record `head_seq`/`head_hash` elsewhere to detect a later truncation."""
    return await chain.verify_chain(svc, principal)


# --- the tenant's redaction fields -----------------------------------------------------------


@router.get("/v1/admin/redaction")
async def get_redaction(svc: ServicesDep, principal: CurrentPrincipal) -> RedactionOut:
    """The tenant's own redaction fields, next to the file policy's that apply to everyone."""
    require(svc, principal, "redaction:read")
    async with svc.pool.acquire() as conn:
        current = await redaction.load(conn, principal.tenant)
    return _redaction_out(svc, current)


@router.put(
    "/v1/admin/redaction",
    dependencies=[limited("admin.write", "redaction:write")],
    responses=RATE_LIMITED,
)
async def put_redaction(
    body: RedactionIn, svc: ServicesDep, principal: CurrentPrincipal
) -> RedactionOut:
    """Replace the tenant's own fields to drop or mask in audit content. They add to the file
    policy, never remove from it, and apply from the next entry written; entries already in
    the log are immutable and keep what they stored. The change itself is audited."""
    require(svc, principal, "redaction:write")
    reserved = sorted(set(redaction.normalize([*body.drop, *body.mask])) & _STRUCTURAL)
    if reserved:
        raise Invalid(f"fields the ledger is built from cannot be redacted: {', '.join(reserved)}")
    async with svc.pool.acquire() as conn, conn.transaction():
        try:
            saved = await redaction.save(conn, principal.tenant, body.drop, body.mask, principal.id)
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        await svc.audit.append(
            conn,
            [
                AuditEvent(
                    key=f"redaction:{uuid.uuid4().hex}",
                    tenant=principal.tenant,
                    actor=principal.id,
                    actor_kind=principal.kind,
                    action="redaction.updated",
                    at=datetime.now(UTC),
                    data={"drop_fields": list(saved.drop), "mask_fields": list(saved.mask)},
                )
            ],
        )
    return _redaction_out(svc, saved)


def _redaction_out(svc: Services, current: redaction.TenantRedaction) -> RedactionOut:
    fields = svc.audit.policy.fields
    return RedactionOut(
        drop=list(current.drop),
        mask=list(current.mask),
        file_drop=list(fields.drop),
        file_mask=list(fields.mask),
        updated_by=current.updated_by,
        updated_at=current.updated_at,
    )
