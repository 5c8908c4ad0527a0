"""The audit log: append-only, hash-chained per tenant, redacted before storage.

Each entry's `entry_hash = sha256(prev_hash || canonical content)`, where the content covers
every column (tenant, seq, key, time, actor, action, run, redacted data, sealed private part).
Appends for one tenant are serialized by a transaction-scoped advisory lock, so the chain has
no forks under concurrency. `verify` walks a chain and names the first broken entry.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg

from policies.redaction import PathKey, Redactor, default_redactor, reveal
from stead.config import Settings
from stead.crypto import Sealer, SealError
from store.db import Conn
from workflows.state import AuditEvent

GENESIS = bytes(32)


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _content(
    tenant: str,
    seq: int,
    key: str,
    at: datetime,
    actor: str,
    actor_kind: str,
    action: str,
    run_id: str | None,
    data: str,
    private: bytes | None,
) -> bytes:
    fields = [tenant, seq, key, at.isoformat(), actor, actor_kind, action, run_id, data]
    fields.append(private.hex() if private is not None else None)
    return canonical_json(fields).encode()


def chain_hash(prev: bytes, content: bytes) -> bytes:
    return hashlib.sha256(prev + content).digest()


class AuditWriter:
    """Appends events idempotently. `sealer` encrypts masked originals; without one they are
    not kept at all (the visible, redacted entry is all that is stored)."""

    def __init__(self, redactor: Redactor, sealer: Sealer | None) -> None:
        self._redactor = redactor
        self._sealer = sealer

    async def append(self, conn: Conn, events: Sequence[AuditEvent]) -> int:
        """Append events (any tenants) inside the caller's transaction; return how many were new."""
        written = 0
        by_tenant: dict[str, list[AuditEvent]] = {}
        for event in events:
            by_tenant.setdefault(event.tenant, []).append(event)
        # A fixed lock order across tenants: two writers never wait on each other in a cycle.
        for tenant in sorted(by_tenant):
            written += await self._append_tenant(conn, tenant, by_tenant[tenant])
        return written

    async def _append_tenant(self, conn: Conn, tenant: str, events: list[AuditEvent]) -> int:
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 7))", tenant)
        keys = [e.key for e in events]
        present = {
            r["event_key"]
            for r in await conn.fetch(
                "SELECT event_key FROM audit_log WHERE tenant_id = $1 AND event_key = ANY($2)",
                tenant,
                keys,
            )
        }
        last = await conn.fetchrow(
            "SELECT seq, entry_hash FROM audit_log WHERE tenant_id = $1 ORDER BY seq DESC LIMIT 1",
            tenant,
        )
        seq, prev = (last["seq"], bytes(last["entry_hash"])) if last else (0, GENESIS)
        rows = []
        for event in events:
            if event.key in present:
                continue
            present.add(event.key)
            seq += 1
            visible, private = self._redactor.apply(event.data)
            data = canonical_json(visible)
            sealed = self._seal(private, tenant, event.key)
            row = (
                tenant,
                seq,
                event.key,
                event.at,
                event.actor,
                event.actor_kind,
                event.action,
                event.run_id,
                data,
                sealed,
            )
            entry_hash = chain_hash(prev, _content(*row))
            rows.append((*row, prev, entry_hash))
            prev = entry_hash
        if rows:
            await conn.executemany(
                "INSERT INTO audit_log (tenant_id, seq, event_key, at, actor, actor_kind, action,"
                " run_id, data, private, prev_hash, entry_hash)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                rows,
            )
        return len(rows)

    def _seal(self, private: list[tuple[PathKey, Any]], tenant: str, key: str) -> bytes | None:
        if not private or self._sealer is None:
            return None
        plaintext = canonical_json(private).encode()
        return self._sealer.seal(plaintext, associated=f"{tenant}:{key}".encode())


def audit_writer(settings: Settings) -> AuditWriter:
    keys = settings.encryption_keys
    return AuditWriter(default_redactor(), Sealer(keys) if keys else None)


# --- reading and verifying -------------------------------------------------------------------

Problem = Literal["altered", "deleted", "inserted", "reordered"]


@dataclass(frozen=True)
class Verification:
    tenant: str
    ok: bool
    entries: int
    first_bad_seq: int | None = None
    problem: Problem | None = None
    detail: str = ""


def _row_content(row: asyncpg.Record) -> bytes:
    private = bytes(row["private"]) if row["private"] is not None else None
    return _content(
        row["tenant_id"],
        row["seq"],
        row["event_key"],
        row["at"],
        row["actor"],
        row["actor_kind"],
        row["action"],
        row["run_id"],
        row["data"],
        private,
    )


async def verify(conn: Conn, tenant: str) -> Verification:
    """Recompute the chain; name the first entry that was altered, deleted, inserted or moved."""
    prev, expected_seq, count = GENESIS, 1, 0
    hashes_seen: dict[bytes, int] = {GENESIS: 0}
    async with conn.transaction(readonly=True, isolation="repeatable_read"):
        async for row in conn.cursor(
            "SELECT * FROM audit_log WHERE tenant_id = $1 ORDER BY seq", tenant
        ):
            count += 1
            seq, stored_prev = row["seq"], bytes(row["prev_hash"])
            recomputed = chain_hash(stored_prev, _row_content(row))
            if recomputed != bytes(row["entry_hash"]):
                return Verification(tenant, False, count, seq, "altered", "content hash mismatch")
            if stored_prev != prev:
                problem, detail = _classify_link(stored_prev, prev, hashes_seen, seq, expected_seq)
                return Verification(tenant, False, count, seq, problem, detail)
            if seq != expected_seq:
                return Verification(
                    tenant, False, count, seq, "deleted", f"entries {expected_seq}..{seq - 1} gone"
                )
            hashes_seen[bytes(row["entry_hash"])] = seq
            prev, expected_seq = bytes(row["entry_hash"]), seq + 1
    return Verification(tenant, True, count)


def _classify_link(
    stored_prev: bytes, prev: bytes, seen: dict[bytes, int], seq: int, expected_seq: int
) -> tuple[Problem, str]:
    if stored_prev in seen:
        # It links to an earlier entry than the one before it: something sits between them
        # that was not there when it was written, or entries were swapped.
        linked = seen[stored_prev]
        if seq == expected_seq and linked < expected_seq - 2:
            return "reordered", f"links to entry {linked}, not {expected_seq - 1}"
        return "inserted", f"entry {expected_seq - 1} was not in the chain when {seq} was written"
    if seq != expected_seq:
        return "deleted", f"entries {expected_seq}..{seq - 1} gone"
    return "deleted", f"the entry this one links to is missing before seq {seq}"


@dataclass(frozen=True)
class AuditEntry:
    tenant: str
    seq: int
    key: str
    at: datetime
    actor: str
    actor_kind: str
    action: str
    run_id: str | None
    data: dict[str, Any]
    entry_hash: str
    revealed: bool


def decode_entry(row: asyncpg.Record, sealer: Sealer | None, reveal_private: bool) -> AuditEntry:
    data: dict[str, Any] = json.loads(row["data"])
    revealed = False
    if reveal_private and row["private"] is not None and sealer is not None:
        try:
            plaintext = sealer.open(
                bytes(row["private"]), associated=f"{row['tenant_id']}:{row['event_key']}".encode()
            )
        except SealError:
            pass
        else:
            data = reveal(data, json.loads(plaintext))
            revealed = True
    return AuditEntry(
        tenant=row["tenant_id"],
        seq=row["seq"],
        key=row["event_key"],
        at=row["at"],
        actor=row["actor"],
        actor_kind=row["actor_kind"],
        action=row["action"],
        run_id=row["run_id"],
        data=data,
        entry_hash=bytes(row["entry_hash"]).hex(),
        revealed=revealed,
    )
