"""The audit log: append-only, hash-chained per tenant, redacted before storage.

Each entry's `entry_hash = sha256(prev_hash || canonical content)`, where the content covers
every column (tenant, seq, key, time, actor, action, run, redacted data, sealed private part).
Appends for one tenant are serialized by a transaction-scoped advisory lock, so the chain has
no forks under concurrency. That lock is held until the commit's WAL flush, so `record` (an
append in a transaction of its own) coalesces a process's concurrent appends of one tenant
into one transaction: one lock and one flush for all of them, each caller still returning
only once its entries are durable. `verify` walks a chain and names the first broken entry and what
was done to it: altered, deleted, inserted or reordered.

What the chain alone cannot show: entries removed from the end, or a whole chain rewritten
from some point on. `verify` reports the head (last seq and hash) of an intact chain; an
operator who records it elsewhere can detect both later.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypeAlias

import asyncpg

from stead import metrics
from stead.config import Settings
from stead.contract import ActorKind, AuditEvent, RunContext
from stead.crypto import Sealer, SealError
from stead.policy.redaction import (
    PathKey,
    RedactionPolicy,
    Redactor,
    load_policy,
    neutralize,
    reveal,
)
from stead.store.db import Conn, Pool

GENESIS = bytes(32)
# How many moved predecessors `verify` follows to find where an entry was first written, and
# how many renumbered-away entries it looks for: enough for any hand edit, bounded for a
# deliberately tangled chain.
_MAX_TRACE = 64
_MAX_GAP = 64
# Distinct tenant field sets whose compiled redactors are kept; past it the cache restarts.
_REDACTOR_CACHE = 256

Row: TypeAlias = "asyncpg.Record | Mapping[str, Any]"


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


def row_hash(row: Row, seq: int | None = None) -> bytes:
    """A stored row's entry hash recomputed from its columns; with `seq`, the hash it would
    have had if it had been written at that position (how `verify` finds moved entries)."""
    private = bytes(row["private"]) if row["private"] is not None else None
    content = _content(
        row["tenant_id"],
        row["seq"] if seq is None else seq,
        row["event_key"],
        row["at"],
        row["actor"],
        row["actor_kind"],
        row["action"],
        row["run_id"],
        row["data"],
        private,
    )
    return chain_hash(bytes(row["prev_hash"]), content)


# In one read, after the tenant's lock: which of the keys are stored already, the chain's
# head, and the tenant's own redaction fields.
_CHAIN_STATE = """
    SELECT coalesce(
               (SELECT array_agg(event_key) FROM audit_log
                WHERE tenant_id = $1 AND event_key = ANY($2)),
               '{}'
           ) AS present,
           head.seq, head.entry_hash, r.drop_fields, r.mask_fields
    FROM (SELECT 1) AS one
    LEFT JOIN LATERAL (
        SELECT seq, entry_hash FROM audit_log WHERE tenant_id = $1 ORDER BY seq DESC LIMIT 1
    ) AS head ON true
    LEFT JOIN redaction_overrides AS r ON r.tenant_id = $1
"""


@dataclass
class _Waiting:
    """Events a `record` call hands to its tenant's appender, and where it waits for them."""

    events: Sequence[AuditEvent]
    done: asyncio.Future[list[AuditEvent]]
    firsts: Sequence[Write] = ()


# A write that must commit with an append, or not at all (`AuditWriter.record`'s `first`).
Write: TypeAlias = Callable[[Conn], Awaitable[None]]

# Appends of one tenant through one pool: the pool's identity (it belongs to one event loop)
# and the tenant.
_ChainKey: TypeAlias = tuple[int, str]


class AuditWriter:
    """Appends events idempotently, redacted by the file policy plus the tenant's own
    additions. `sealer` encrypts masked originals; without one they are not kept at all (the
    visible, redacted entry is all that is stored)."""

    def __init__(self, policy: RedactionPolicy, sealer: Sealer | None) -> None:
        self._policy = policy
        self._sealer = sealer
        self._redactors: dict[tuple[tuple[str, ...], tuple[str, ...]], Redactor] = {}
        # `record` calls waiting for their tenant's appender, and the appenders running.
        self._waiting: dict[_ChainKey, list[_Waiting]] = {}
        # The task appending for a tenant: a caller committing its own events, or an appender.
        self._appenders: dict[_ChainKey, asyncio.Task[Any]] = {}

    async def append(self, conn: Conn, events: Sequence[AuditEvent]) -> int:
        """Append events (any tenants) inside the caller's transaction; return how many were new."""
        return len(await self.append_new(conn, events))

    async def record(
        self, pool: Pool, events: Sequence[AuditEvent], *, first: Write | None = None
    ) -> list[AuditEvent]:
        """Append events in a transaction of their own; count what was new in the metrics.

        Returns once they are committed. Concurrent calls for the same tenant share one
        transaction: while one commits, the next ones gather and commit together after it.
        `first` runs in that transaction before the append (before the chain's lock is taken):
        a write that commits with the events or not at all, at no commit of its own. If the
        shared transaction fails, each caller's part is tried alone.
        """
        firsts = [first] if first is not None else []
        if not events:
            if firsts:
                await self._commit(pool, [], firsts)
            return []
        tenants = {event.tenant for event in events}
        if len(tenants) == 1:
            new = await self._through_appender(pool, tenants.pop(), events, firsts)
        else:
            new = await self._commit(pool, events, firsts)
        metrics.observe_events(new)
        return new

    async def _commit(
        self, pool: Pool, events: Sequence[AuditEvent], firsts: Sequence[Write] = ()
    ) -> list[AuditEvent]:
        async with pool.acquire() as conn, conn.transaction():
            for write in firsts:
                await write(conn)
            return await self.append_new(conn, events)

    async def _through_appender(
        self, pool: Pool, tenant: str, events: Sequence[AuditEvent], firsts: Sequence[Write]
    ) -> list[AuditEvent]:
        key = (id(pool), tenant)
        running = self._appenders.get(key)
        if running is not None and not running.done():  # done: its loop went away mid-flush
            waiting = _Waiting(events, asyncio.get_running_loop().create_future(), firsts)
            self._waiting.setdefault(key, []).append(waiting)
            return await waiting.done
        # Nobody is appending for the tenant: commit here, with no hop through another task,
        # and hand to an appender whatever gathers meanwhile.
        current = asyncio.current_task()
        assert current is not None
        self._appenders[key] = current
        try:
            return await self._commit(pool, events, firsts)
        finally:
            self._handed_over(pool, key, current)

    def _handed_over(self, pool: Pool, key: _ChainKey, finished: asyncio.Task[Any]) -> None:
        if self._appenders.get(key) is not finished:
            return
        if self._waiting.get(key):
            self._appenders[key] = asyncio.create_task(self._append_waiting(pool, key))
        else:
            del self._appenders[key]

    async def _append_waiting(self, pool: Pool, key: _ChainKey) -> None:
        """The tenant's appender: commits everything waiting, then what gathered meanwhile,
        until nothing waits (no await between the last check and leaving)."""
        batch: list[_Waiting] = []
        try:
            while batch := self._waiting.pop(key, []):
                await self._commit_batch(pool, batch)
        except BaseException as exc:  # cancelled with the loop: no caller may wait forever
            for waiting in [*batch, *self._waiting.pop(key, [])]:
                _settle(waiting, exc)
            raise
        finally:
            current = asyncio.current_task()
            if current is not None and self._appenders.get(key) is current:
                del self._appenders[key]

    async def _commit_batch(self, pool: Pool, batch: list[_Waiting]) -> None:
        try:
            new = await self._commit(
                pool,
                [event for waiting in batch for event in waiting.events],
                [write for waiting in batch for write in waiting.firsts],
            )
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0], exc)
                return
            # One caller's bad event (or failing write) must not fail the others: each alone,
            # in order.
            for waiting in batch:
                await self._commit_batch(pool, [waiting])
            return
        # `append_new` returns the very objects it stored, so each caller gets its own.
        stored = {id(event) for event in new}
        for waiting in batch:
            _settle(waiting, [event for event in waiting.events if id(event) in stored])

    async def append_new(self, conn: Conn, events: Sequence[AuditEvent]) -> list[AuditEvent]:
        """Append events; return those that were not stored before (what a retry adds: none)."""
        written: list[AuditEvent] = []
        by_tenant: dict[str, list[AuditEvent]] = {}
        for event in events:
            by_tenant.setdefault(event.tenant, []).append(event)
        # A fixed lock order across tenants: two writers never wait on each other in a cycle.
        for tenant in sorted(by_tenant):
            written += await self._append_tenant(conn, tenant, by_tenant[tenant])
        return written

    @property
    def policy(self) -> RedactionPolicy:
        """The file policy, before any tenant's additions."""
        return self._policy

    def decode(self, row: Row, *, reveal_private: bool) -> AuditEntry:
        """A stored entry for a reader; masked originals only with `reveal_private`."""
        return decode_entry(row, self._sealer, reveal_private)

    async def _append_tenant(
        self, conn: Conn, tenant: str, events: list[AuditEvent]
    ) -> list[AuditEvent]:
        # The lock is its own statement: under READ COMMITTED each statement reads from a
        # snapshot taken when it starts, so reads in the locking statement itself could miss
        # an entry committed just before the lock was granted, and fork the chain.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 7))", tenant)
        keys = [e.key for e in events]
        state = await conn.fetchrow(_CHAIN_STATE, tenant, keys)
        assert state is not None
        present = set(state["present"])
        if all(key in present for key in keys):
            return []  # a retried write: nothing new
        redactor = self._redactor(
            tuple(state["drop_fields"] or ()), tuple(state["mask_fields"] or ())
        )
        last_hash = state["entry_hash"]
        seq, prev = (state["seq"], bytes(last_hash)) if last_hash is not None else (0, GENESIS)
        rows = []
        new: list[AuditEvent] = []
        for event in events:
            if event.key in present:
                continue
            present.add(event.key)
            new.append(event)
            seq += 1
            visible, private = redactor.apply(event.data)
            data = canonical_json(visible)
            sealed = self._seal(private, tenant, event.key)
            row = (
                tenant,
                seq,
                event.key,
                event.at,
                # Who and what are neutralized like content: no forged lines in an export.
                neutralize(event.actor),
                event.actor_kind,
                neutralize(event.action),
                neutralize(event.run_id) if event.run_id is not None else None,
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
        return new

    def _redactor(self, drop: tuple[str, ...], mask: tuple[str, ...]) -> Redactor:
        # The tenant's additions are read in the append's own transaction (with the chain's
        # state) rather than cached: the log cannot be scrubbed afterwards, so a field a
        # tenant has just declared sensitive must not reach it in clear from any worker, not
        # even for a cache's lifetime. Only the compiled redactor is reused.
        key = (drop, mask)
        found = self._redactors.get(key)
        if found is None:
            if len(self._redactors) >= _REDACTOR_CACHE:
                self._redactors.clear()
            found = Redactor(self._policy.with_fields(drop=drop, mask=mask))
            self._redactors[key] = found
        return found

    def _seal(self, private: list[tuple[PathKey, Any]], tenant: str, key: str) -> bytes | None:
        if not private or self._sealer is None:
            return None
        plaintext = canonical_json(private).encode()
        return self._sealer.seal(plaintext, associated=f"{tenant}:{key}".encode())


def _settle(waiting: _Waiting, outcome: list[AuditEvent] | BaseException) -> None:
    if waiting.done.done():  # its caller was cancelled; the entries are stored all the same
        return
    if isinstance(outcome, asyncio.CancelledError):
        waiting.done.cancel()
    elif isinstance(outcome, BaseException):
        waiting.done.set_exception(outcome)
    else:
        waiting.done.set_result(outcome)


def run_event(
    context: RunContext,
    key: str,
    action: str,
    data: dict[str, Any],
    *,
    actor: str,
    actor_kind: ActorKind,
) -> AuditEvent:
    """An event an activity records about its run, stamped now."""
    return AuditEvent(
        key=key,
        tenant=context.tenant,
        actor=actor,
        actor_kind=actor_kind,
        action=action,
        run_id=context.run_id,
        at=datetime.now(UTC),
        data=data,
        pipeline=context.pipeline,
    )


def audit_writer(settings: Settings, policy: RedactionPolicy | None = None) -> AuditWriter:
    """The writer for a process: its redaction policy (the runtime's; Stead's defaults when
    none is given), masked originals sealed with the payload keys."""
    keys = settings.encryption_keys
    return AuditWriter(policy or load_policy(), Sealer(keys) if keys else None)


# --- verifying -------------------------------------------------------------------------------

Problem = Literal["altered", "deleted", "inserted", "reordered"]


@dataclass(frozen=True)
class Verification:
    tenant: str
    ok: bool
    entries: int
    first_bad_seq: int | None = None
    problem: Problem | None = None
    detail: str = ""
    # The last entry of an intact chain: kept outside the database, it reveals a later
    # truncation or rewrite from the end, which the chain alone cannot.
    head_seq: int = 0
    head_hash: str = ""


async def verify(conn: Conn, tenant: str) -> Verification:
    """Recompute the tenant's chain; name the first entry altered, deleted, inserted or moved.

    One pass in seq order checks that each entry has the next seq, links to the previous
    entry's hash and hashes to its own. At the first that does not, `_diagnose` works out
    what happened from where that entry was originally written.
    """
    prev, expected, count = GENESIS, 1, 0
    broken: asyncpg.Record | None = None
    async with conn.transaction(readonly=True, isolation="repeatable_read"):
        async for row in conn.cursor(
            "SELECT * FROM audit_log WHERE tenant_id = $1 ORDER BY seq", tenant
        ):
            count += 1
            own = bytes(row["entry_hash"])
            if row["seq"] != expected or bytes(row["prev_hash"]) != prev or row_hash(row) != own:
                broken = row
                break
            prev, expected = own, expected + 1
        if broken is not None:
            seq, problem, detail = await _diagnose(conn, tenant, broken, expected, prev)
            return Verification(tenant, False, count, seq, problem, detail)
    return Verification(
        tenant, True, count, head_seq=expected - 1, head_hash=prev.hex() if count else ""
    )


async def _diagnose(  # noqa: PLR0911  # one return per kind of tampering reads best
    conn: Conn, tenant: str, row: asyncpg.Record, expected: int, prev: bytes
) -> tuple[int, Problem, str]:
    """Classify the first row that does not continue the verified chain (seqs below
    `expected` are intact and in place; `prev` is the hash of the last of them)."""
    seq: int = row["seq"]
    own = bytes(row["entry_hash"])
    if seq > expected:
        return expected, "deleted", f"{_span(expected, seq - 1)} missing before entry {seq}"
    if row_hash(row) == own:
        # Intact where it stands, yet chained to an entry other than the one before it: that
        # one was rewritten and its hash recomputed to hide the change.
        if seq <= 1:
            return seq, "altered", "the first entry does not start from the genesis hash"
        return seq - 1, "altered", f"rewritten and re-hashed: entry {seq} was chained to another"
    written = await _written_at(conn, tenant, row, before=seq)
    if written is not None and written > seq:
        return seq, "reordered", f"the entry at {seq} was written as entry {written}"
    if written is not None:
        return (
            written,
            "inserted",
            (
                f"{_span(written, seq - 1)} not in the chain: the entry now at {seq}"
                f" was written as entry {written}, right after entry {written - 1}"
            ),
        )
    following = await _row_at(conn, tenant, seq + 1)
    if (
        following is not None
        and bytes(following["prev_hash"]) == prev
        and row_hash(following, seq) == bytes(following["entry_hash"])
    ):
        return seq, "inserted", f"the next entry was written as entry {seq}, right after {seq - 1}"
    stored_prev = bytes(row["prev_hash"])
    orphan = stored_prev not in (prev, GENESIS)
    if orphan and await _row_with_hash(conn, tenant, stored_prev) is None:
        # Chained to an entry that no longer exists, and hashes at a later seq: entries were
        # deleted and the ones after them renumbered to close the gap.
        for gap in range(1, _MAX_GAP + 1):
            if row_hash(row, seq + gap) == own:
                return seq, "deleted", f"{_span(seq, seq + gap - 1)} missing; later renumbered"
    return seq, "altered", "its content does not match its hash"


async def _written_at(
    conn: Conn, tenant: str, row: asyncpg.Record, before: int, depth: int = 0
) -> int | None:
    """The seq at which `row` was first chained, found through its predecessor; None when its
    content does not hash at that seq or the predecessor cannot be found.

    Entries below `before` are verified in place. A predecessor that was moved too is traced
    the same way (two swapped neighbours), up to `_MAX_TRACE` steps.
    """
    stored_prev = bytes(row["prev_hash"])
    if stored_prev == GENESIS:
        at = 1
    else:
        pred = await _row_with_hash(conn, tenant, stored_prev)
        if pred is None:
            return None
        if pred["seq"] < before:
            at = pred["seq"] + 1
        elif depth >= _MAX_TRACE:
            return None
        else:
            pred_at = await _written_at(conn, tenant, pred, before, depth + 1)
            if pred_at is None:
                return None
            at = pred_at + 1
    return at if row_hash(row, at) == bytes(row["entry_hash"]) else None


async def _row_at(conn: Conn, tenant: str, seq: int) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT * FROM audit_log WHERE tenant_id = $1 AND seq = $2", tenant, seq
    )


async def _row_with_hash(conn: Conn, tenant: str, entry_hash: bytes) -> asyncpg.Record | None:
    # No index on entry_hash: this runs only while diagnosing a broken chain, and an index
    # would cost every append.
    return await conn.fetchrow(
        "SELECT * FROM audit_log WHERE tenant_id = $1 AND entry_hash = $2 ORDER BY seq LIMIT 1",
        tenant,
        entry_hash,
    )


def _span(first: int, last: int) -> str:
    return f"entry {first}" if first == last else f"entries {first}..{last}"


async def verify_run(conn: Conn, tenant: str, run_id: str) -> Verification:
    """Check one run's entries where they stand: each hashes to itself, links to the entry
    before it and is linked to by the entry after it (none missing after it).

    It reads the run's entries and their neighbours, not the tenant's whole chain, so any
    reader of the run can afford it. If anything is off, the whole chain is verified to name
    the exact problem (which may lie next to, not in, the run's entries).
    """
    async with conn.transaction(readonly=True, isolation="repeatable_read"):
        seqs: list[int] = [
            r["seq"]
            for r in await conn.fetch(
                "SELECT seq FROM audit_log WHERE tenant_id = $1 AND run_id = $2 ORDER BY seq",
                tenant,
                run_id,
            )
        ]
        around = sorted({s + step for s in seqs for step in (-1, 0, 1)})
        rows = {
            r["seq"]: r
            for r in await conn.fetch(
                "SELECT * FROM audit_log WHERE tenant_id = $1 AND seq = ANY($2)", tenant, around
            )
        }
        last = await conn.fetchval("SELECT max(seq) FROM audit_log WHERE tenant_id = $1", tenant)
    if all(_in_place(rows, seq, last) for seq in seqs):
        return Verification(tenant, True, len(seqs))
    return await verify(conn, tenant)


def _in_place(rows: Mapping[int, asyncpg.Record], seq: int, last: int) -> bool:
    row, before, after = rows[seq], rows.get(seq - 1), rows.get(seq + 1)
    if row_hash(row) != bytes(row["entry_hash"]):
        return False
    expected_prev = GENESIS if seq == 1 else (bytes(before["entry_hash"]) if before else None)
    if bytes(row["prev_hash"]) != expected_prev:
        return False
    if after is None:
        return seq == last
    return bytes(after["prev_hash"]) == bytes(row["entry_hash"])


# --- reading ---------------------------------------------------------------------------------


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
    prev_hash: str = ""
    # Masked originals are stored (sealed) for this entry; `revealed` says if they are shown.
    sealed: bool = False


def decode_entry(row: Row, sealer: Sealer | None, reveal_private: bool) -> AuditEntry:
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
        prev_hash=bytes(row["prev_hash"]).hex(),
        sealed=row["private"] is not None,
    )


async def run_rows(conn: Conn, tenant: str, run_id: str) -> list[asyncpg.Record]:
    """A run's entries in chain order (the run id is unique within its tenant)."""
    return await conn.fetch(
        "SELECT * FROM audit_log WHERE tenant_id = $1 AND run_id = $2 ORDER BY seq",
        tenant,
        run_id,
    )


@dataclass(frozen=True)
class Filters:
    """A search of one tenant's log. `action_prefix` matches `approval.` for `approval.*`;
    `since` is inclusive and `until` exclusive."""

    actor: str | None = None
    action: str | None = None
    action_prefix: str | None = None
    run_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None


async def search(
    conn: Conn, tenant: str, filters: Filters, after_seq: int, limit: int
) -> list[asyncpg.Record]:
    """Matching entries with seq above `after_seq`, in chain order, at most `limit`."""
    return await conn.fetch(
        "SELECT * FROM audit_log WHERE tenant_id = $1"
        " AND ($2::text IS NULL OR actor = $2)"
        " AND ($3::text IS NULL OR action = $3)"
        " AND ($4::text IS NULL OR starts_with(action, $4))"
        " AND ($5::text IS NULL OR run_id = $5)"
        " AND ($6::timestamptz IS NULL OR at >= $6)"
        " AND ($7::timestamptz IS NULL OR at < $7)"
        " AND seq > $8"
        " ORDER BY seq LIMIT $9",
        tenant,
        filters.actor,
        filters.action,
        filters.action_prefix,
        filters.run_id,
        filters.since,
        filters.until,
        after_seq,
        limit,
    )
