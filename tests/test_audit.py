"""The audit log: exact tamper detection, idempotent writes, redaction before storage, the run
ledger and the tenant's views over the API."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from temporalio.testing import ActivityEnvironment

from stead.calls import FlushAudit
from stead.config import Settings
from stead.contract import ActorKind, AuditEvent, RunContext
from stead.crypto import Sealer
from stead.gateway.ledger import LedgerActivities
from stead.store.audit import (
    AuditWriter,
    Filters,
    audit_writer,
    row_hash,
    run_event,
    run_rows,
    search,
    verify,
    verify_run,
)
from stead.store.db import Conn, Pool
from tests.conftest import SimControl, Tenant, TenantFactory
from tests.helpers import wait_json

ROOT = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def event(
    tenant: str,
    action: str,
    data: dict[str, Any],
    *,
    run_id: str | None = None,
    actor: str = "workflow:test",
    kind: ActorKind = "system",
    n: int = 0,
) -> AuditEvent:
    return AuditEvent(
        key=f"{run_id or 'tenant'}:{uuid.uuid4().hex}",
        tenant=tenant,
        actor=actor,
        actor_kind=kind,
        action=action,
        run_id=run_id,
        at=T0 + timedelta(seconds=n),
        data=data,
    )


async def append(pool: Pool, writer: AuditWriter, events: list[AuditEvent]) -> int:
    async with pool.acquire() as conn, conn.transaction():
        return await writer.append(conn, events)


async def raw_rows(database_url: str, tenant: str) -> list[dict[str, Any]]:
    """The stored rows, read as the owner (not through the app role)."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT * FROM audit_log WHERE tenant_id = $1 ORDER BY seq", tenant)
    finally:
        await conn.close()
    return [dict(r) for r in rows]


def new_run_id() -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    return "r_" + "".join(alphabet[b % 32] for b in uuid.uuid4().bytes + uuid.uuid4().bytes)[:26]


# --- tampering -----------------------------------------------------------------------------


@asynccontextmanager
async def tampering(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """An owner connection with the audit log's refusal triggers off for one transaction.

    ALTER TABLE is transactional: no other session ever sees the triggers off, and if the
    tampering fails the rollback turns them back on. `finally` checks that they are on.
    """
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await conn.execute("ALTER TABLE audit_log DISABLE TRIGGER USER")
            yield conn
            await conn.execute("ALTER TABLE audit_log ENABLE TRIGGER USER")
    finally:
        enabled = await conn.fetchval(
            "SELECT bool_and(tgenabled = 'O') FROM pg_trigger"
            " WHERE tgrelid = 'audit_log'::regclass AND NOT tgisinternal"
        )
        await conn.close()
        assert enabled is True, "audit_log triggers left disabled (or missing)"


Tamper = Callable[[asyncpg.Connection, str], Awaitable[None]]


async def row_at(conn: asyncpg.Connection, tenant: str, seq: int) -> dict[str, Any]:
    row = await conn.fetchrow(
        "SELECT * FROM audit_log WHERE tenant_id = $1 AND seq = $2", tenant, seq
    )
    assert row is not None
    return dict(row)


async def update_data(conn: asyncpg.Connection, tenant: str) -> None:
    await conn.execute(
        'UPDATE audit_log SET data = \'{"stage":"nothing happened"}\''
        " WHERE tenant_id = $1 AND seq = 3",
        tenant,
    )


async def update_private(conn: asyncpg.Connection, tenant: str) -> None:
    """A sealed part slipped into an entry that had none: the hash covers it too."""
    await conn.execute(
        "UPDATE audit_log SET private = '\\x00'::bytea WHERE tenant_id = $1 AND seq = 3", tenant
    )


async def update_last(conn: asyncpg.Connection, tenant: str) -> None:
    await conn.execute("UPDATE audit_log SET data = '{}' WHERE tenant_id = $1 AND seq = 6", tenant)


async def update_and_rehash_first(conn: asyncpg.Connection, tenant: str) -> None:
    await rehash(conn, tenant, 1, data='{"stage":"nothing happened"}')


async def update_and_rehash(conn: asyncpg.Connection, tenant: str) -> None:
    row = await row_at(conn, tenant, 3)
    row["data"] = '{"stage":"nothing happened"}'
    await conn.execute(
        "UPDATE audit_log SET data = $2, entry_hash = $3 WHERE tenant_id = $1 AND seq = 3",
        tenant,
        row["data"],
        row_hash(row),
    )


async def rehash(conn: asyncpg.Connection, tenant: str, seq: int, **changes: Any) -> bytes:
    """Rewrite entry `seq` with `changes` and recompute its hash; return the new hash."""
    row = {**await row_at(conn, tenant, seq), **changes}
    row["entry_hash"] = row_hash(row)
    await conn.execute(
        "UPDATE audit_log SET data = $3, prev_hash = $4, entry_hash = $5"
        " WHERE tenant_id = $1 AND seq = $2",
        tenant,
        seq,
        row["data"],
        row["prev_hash"],
        row["entry_hash"],
    )
    return bytes(row["entry_hash"])


async def update_rehash_relink(conn: asyncpg.Connection, tenant: str) -> None:
    """Entry 3 rewritten and re-hashed, and entry 4 re-linked to its new hash (its own hash
    left as it was: recomputing it too would only move the break to entry 5)."""
    forged = await rehash(conn, tenant, 3, data='{"stage":"nothing happened"}')
    await conn.execute(
        "UPDATE audit_log SET prev_hash = $2 WHERE tenant_id = $1 AND seq = 4", tenant, forged
    )


async def relink_first(conn: asyncpg.Connection, tenant: str) -> None:
    """The first entry re-hashed onto a predecessor that never was."""
    await rehash(conn, tenant, 1, prev_hash=b"\x01" * 32)


async def delete_middle(conn: asyncpg.Connection, tenant: str) -> None:
    await conn.execute("DELETE FROM audit_log WHERE tenant_id = $1 AND seq = 3", tenant)


async def delete_two(conn: asyncpg.Connection, tenant: str) -> None:
    await conn.execute("DELETE FROM audit_log WHERE tenant_id = $1 AND seq IN (3, 4)", tenant)


async def delete_and_renumber(conn: asyncpg.Connection, tenant: str) -> None:
    await delete_middle(conn, tenant)
    await shift(conn, tenant, after=3, by=-1)


async def shift(conn: asyncpg.Connection, tenant: str, after: int, by: int) -> None:
    # Through negative seqs: the primary key is checked row by row.
    await conn.execute(
        "UPDATE audit_log SET seq = -seq WHERE tenant_id = $1 AND seq > $2", tenant, after
    )
    await conn.execute(
        "UPDATE audit_log SET seq = -seq + $2 WHERE tenant_id = $1 AND seq < 0", tenant, by
    )


def swap(a: int, b: int) -> Tamper:
    async def tamper(conn: asyncpg.Connection, tenant: str) -> None:
        for old, new in ((a, 0), (b, a), (0, b)):
            await conn.execute(
                "UPDATE audit_log SET seq = $3 WHERE tenant_id = $1 AND seq = $2", tenant, old, new
            )

    return tamper


async def insert_forged(conn: asyncpg.Connection, tenant: str) -> None:
    """A careful forger: the new entry at 3 is chained and hashed correctly."""
    before = await row_at(conn, tenant, 2)
    await shift(conn, tenant, after=2, by=1)
    forged = {
        **before,
        "seq": 3,
        "event_key": "forged",
        "action": "approval.decided",
        "actor": "mallory",
        "data": '{"decision":"approve"}',
        "private": None,
        "prev_hash": before["entry_hash"],
    }
    forged["entry_hash"] = row_hash(forged)
    await insert(conn, forged)


async def insert_naive(conn: asyncpg.Connection, tenant: str) -> None:
    """A careless forger: the new entry copies its neighbour's hashes."""
    original = await row_at(conn, tenant, 3)
    await shift(conn, tenant, after=2, by=1)
    await insert(conn, {**original, "seq": 3, "event_key": "forged", "actor": "mallory"})


async def insert(conn: asyncpg.Connection, row: dict[str, Any]) -> None:
    columns = list(row)
    await conn.execute(
        f"INSERT INTO audit_log ({', '.join(columns)})"
        f" VALUES ({', '.join(f'${i + 1}' for i in range(len(columns)))})",
        *row.values(),
    )


CONTENT = "its content does not match its hash"


@pytest.mark.parametrize(
    ("tamper", "seq", "problem", "detail"),
    [
        pytest.param(update_data, 3, "altered", CONTENT, id="update"),
        pytest.param(update_private, 3, "altered", CONTENT, id="update-private"),
        pytest.param(update_last, 6, "altered", CONTENT, id="update-last"),
        pytest.param(
            update_and_rehash_first,
            1,
            "altered",
            "rewritten and re-hashed: entry 2 was chained to another",
            id="update-rehash-first",
        ),
        pytest.param(
            update_and_rehash,
            3,
            "altered",
            "rewritten and re-hashed: entry 4 was chained to another",
            id="update-rehash",
        ),
        # Entry 4 is named, not 3: its hash covers the link to 3, and nothing else records
        # what entry 3 hashed to before, so "4 edited" and "3 rewritten, 4 re-linked" look
        # the same to the chain. What it shows is that the chain breaks there.
        pytest.param(update_rehash_relink, 4, "altered", CONTENT, id="update-rehash-relink"),
        pytest.param(
            relink_first,
            1,
            "altered",
            "the first entry does not start from the genesis hash",
            id="relink-first",
        ),
        pytest.param(delete_middle, 3, "deleted", "entry 3 missing before entry 4", id="delete"),
        pytest.param(
            delete_two, 3, "deleted", "entries 3..4 missing before entry 5", id="delete-two"
        ),
        pytest.param(
            delete_and_renumber,
            3,
            "deleted",
            "entry 3 missing; later renumbered",
            id="delete-renumber",
        ),
        pytest.param(
            swap(3, 4),
            3,
            "reordered",
            "the entry at 3 was written as entry 4",
            id="swap-adjacent",
        ),
        pytest.param(
            swap(1, 2), 1, "reordered", "the entry at 1 was written as entry 2", id="swap-first"
        ),
        pytest.param(
            swap(2, 5), 2, "reordered", "the entry at 2 was written as entry 5", id="swap-apart"
        ),
        pytest.param(
            insert_forged,
            3,
            "inserted",
            "entry 3 not in the chain: the entry now at 4 was written as entry 3,"
            " right after entry 2",
            id="insert-forged",
        ),
        pytest.param(
            insert_naive,
            3,
            "inserted",
            "the next entry was written as entry 3, right after 2",
            id="insert-naive",
        ),
    ],
)
async def test_tampering_is_named_at_the_exact_entry(
    pool: Pool,
    database_url: str,
    test_settings: Settings,
    tamper: Tamper,
    seq: int,
    problem: str,
    detail: str,
) -> None:
    tenant = f"t-tamper-{uuid.uuid4().hex[:8]}"
    stages = ["model_call", "review", "completed", "x", "y", "z"]
    writer = audit_writer(test_settings)
    events = [event(tenant, "stage.entered", {"stage": s}, n=i) for i, s in enumerate(stages)]
    await append(pool, writer, events)
    async with pool.acquire() as conn:
        intact = await verify(conn, tenant)
    assert (intact.ok, intact.entries, intact.head_seq) == (True, 6, 6)

    async with tampering(database_url) as owner:
        await tamper(owner, tenant)

    async with pool.acquire() as conn:
        result = await verify(conn, tenant)
    assert not result.ok
    assert (result.first_bad_seq, result.problem, result.detail) == (seq, problem, detail)
    assert (result.tenant, result.head_seq, result.head_hash) == (tenant, 0, "")


async def test_a_rewrite_relinked_to_the_end_shows_only_against_a_recorded_head(
    pool: Pool, database_url: str, test_settings: Settings
) -> None:
    """The limit of a hash chain kept in the database it protects: a forger who rewrites an
    entry and recomputes every link and hash after it leaves a chain that verifies. Only a
    head (last seq and hash) recorded elsewhere before the rewrite shows it."""
    tenant = f"t-rechain-{uuid.uuid4().hex[:8]}"
    events = [event(tenant, "stage.entered", {"stage": str(i)}, n=i) for i in range(5)]
    await append(pool, audit_writer(test_settings), events)
    async with pool.acquire() as conn:
        recorded = await verify(conn, tenant)
    last = (await raw_rows(database_url, tenant))[-1]
    assert (recorded.ok, recorded.head_seq) == (True, 5)
    assert recorded.head_hash == bytes(last["entry_hash"]).hex()

    async with tampering(database_url) as owner:
        link = await rehash(owner, tenant, 3, data='{"stage":"nothing happened"}')
        for seq in (4, 5):
            link = await rehash(owner, tenant, seq, prev_hash=link)

    async with pool.acquire() as conn:
        after = await verify(conn, tenant)
    assert (after.ok, after.entries, after.head_seq) == (True, 5, 5)
    assert (after.tenant, after.head_hash) == (tenant, link.hex())
    assert after.head_hash != recorded.head_hash


async def chain_around_a_run(pool: Pool, writer: AuditWriter, tenant: str, *, tail: bool) -> str:
    """Entry 1, a run's 10 entries (2..11), and unless `tail` one more after them."""
    run_id = new_run_id()
    first = event(tenant, "stage.entered", {"stage": "x"}, n=-1)
    after = [] if tail else [event(tenant, "redaction.updated", {"mask_fields": []}, n=20)]
    await append(pool, writer, [first, *tool_events(tenant, run_id), *after])
    return run_id


@pytest.mark.parametrize("tail", [False, True], ids=["inside", "at-the-end"])
async def test_an_intact_run_is_verified_from_its_own_entries(
    pool: Pool, test_settings: Settings, tail: bool
) -> None:
    tenant = f"t-run-{uuid.uuid4().hex[:8]}"
    run_id = await chain_around_a_run(pool, audit_writer(test_settings), tenant, tail=tail)
    async with pool.acquire() as conn:
        result = await verify_run(conn, tenant, run_id)
    # Its own 10 entries, not the tenant's chain (which a broken neighbour would make it walk).
    assert (result.tenant, result.ok, result.entries, result.head_seq) == (tenant, True, 10, 0)


async def test_interleaved_runs_are_each_verified_from_their_own_entries(
    pool: Pool, test_settings: Settings
) -> None:
    """Concurrent runs interleave in their tenant's chain: each run's check reads its entries
    and their neighbours, which belong to the other run."""
    tenant = f"t-weave-{uuid.uuid4().hex[:8]}"
    runs = [new_run_id(), new_run_id()]
    first = event(tenant, "stage.entered", {"stage": "x"}, n=-1)
    woven = [
        event(tenant, "stage.entered", {"stage": str(i)}, run_id=runs[i % 2], n=i) for i in range(8)
    ]
    await append(pool, audit_writer(test_settings), [first, *woven])
    async with pool.acquire() as conn:
        checked = [await verify_run(conn, tenant, run_id) for run_id in runs]
        page = await search(conn, tenant, Filters(run_id=runs[0]), after_seq=2, limit=2)
    assert [(c.ok, c.entries) for c in checked] == [(True, 4), (True, 4)]
    assert [r["seq"] for r in page] == [4, 6]


async def delete_first(conn: asyncpg.Connection, tenant: str) -> None:
    await conn.execute("DELETE FROM audit_log WHERE tenant_id = $1 AND seq = 1", tenant)


async def rehash_fifth(conn: asyncpg.Connection, tenant: str) -> None:
    await rehash(conn, tenant, 5, data='{"stage":"nothing happened"}')


async def update_fifth(conn: asyncpg.Connection, tenant: str) -> None:
    await conn.execute("UPDATE audit_log SET data = '{}' WHERE tenant_id = $1 AND seq = 5", tenant)


@pytest.mark.parametrize(
    ("tamper", "seq", "problem"),
    [
        pytest.param(update_fifth, 5, "altered", id="entry-altered"),
        pytest.param(rehash_fifth, 5, "altered", id="entry-rehashed"),
        pytest.param(delete_first, 1, "deleted", id="entry-before-deleted"),
    ],
)
async def test_a_run_check_names_tampering_in_or_next_to_its_entries(
    pool: Pool,
    database_url: str,
    test_settings: Settings,
    tamper: Tamper,
    seq: int,
    problem: str,
) -> None:
    tenant = f"t-run-{uuid.uuid4().hex[:8]}"
    run_id = await chain_around_a_run(pool, audit_writer(test_settings), tenant, tail=False)
    async with tampering(database_url) as owner:
        await tamper(owner, tenant)
    async with pool.acquire() as conn:
        result = await verify_run(conn, tenant, run_id)
    assert (result.ok, result.first_bad_seq, result.problem) == (False, seq, problem)


async def test_recorded_events_come_back_decoded(pool: Pool, test_settings: Settings) -> None:
    tenant = f"t-decode-{uuid.uuid4().hex[:8]}"
    writer = audit_writer(test_settings)
    run_id = new_run_id()
    events = [
        event(tenant, "run.started", {"pipeline": "summarize"}, run_id=run_id),
        event(tenant, "tool.executed", {"comment": "call bob@example.com"}, run_id=run_id, n=1),
    ]
    assert await writer.record(pool, []) == []
    assert await writer.record(pool, events) == events
    assert await writer.record(pool, events) == []  # a retry records nothing
    async with pool.acquire() as conn:
        rows = await run_rows(conn, tenant, run_id)
    plain, masked = (writer.decode(r, reveal_private=False) for r in rows)
    assert (plain.tenant, plain.seq, plain.key, plain.run_id) == (tenant, 1, events[0].key, run_id)
    assert (plain.actor, plain.actor_kind, plain.action) == (
        "workflow:test",
        "system",
        "run.started",
    )
    assert (plain.at, plain.data) == (T0, {"pipeline": "summarize"})
    assert (plain.prev_hash, plain.sealed, plain.revealed) == ("00" * 32, False, False)
    assert masked.prev_hash == plain.entry_hash == bytes(rows[0]["entry_hash"]).hex()
    assert (masked.sealed, masked.revealed, masked.data) == (True, False, {"comment": "[masked]"})
    shown = writer.decode(rows[1], reveal_private=True)
    assert (shown.revealed, shown.data) == (True, {"comment": "call bob@example.com"})


def test_a_run_event_carries_its_run() -> None:
    context = RunContext(
        tenant="acme", run_id="r_1", pipeline="triage", requested_by="ann", plan="enterprise"
    )
    before = datetime.now(UTC)
    made = run_event(context, "k1", "tool.decided", {"x": 1}, actor="agent:a", actor_kind="agent")
    assert made == AuditEvent(
        key="k1",
        tenant="acme",
        actor="agent:a",
        actor_kind="agent",
        action="tool.decided",
        run_id="r_1",
        at=made.at,
        data={"x": 1},
        pipeline="triage",
    )
    assert before <= made.at <= datetime.now(UTC)


async def run_cli(database_url: str, *args: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEAD_")}
    env["DATABASE_URL"] = database_url
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "stead.cli",
        *args,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_cli_verify_exit_codes(
    pool: Pool, database_url: str, test_settings: Settings
) -> None:
    tenant = f"t-cli-{uuid.uuid4().hex[:8]}"
    events = [event(tenant, "stage.entered", {"stage": str(i)}, n=i) for i in range(5)]
    await append(pool, audit_writer(test_settings), events)

    code, out = await run_cli(database_url, "audit", "verify", "--tenant", tenant)
    assert code == 0, out
    assert out.startswith(f"{tenant}: ok (5 entries, head 5 ")

    async with tampering(database_url) as owner:
        await swap(2, 4)(owner, tenant)
    code, out = await run_cli(database_url, "audit", "verify", "--tenant", tenant)
    assert code == 1, out
    assert f"{tenant}: BROKEN at seq 2: reordered" in out

    code, out = await run_cli(database_url, "audit", "verify", "--tenant", "t-no-such-tenant")
    assert code == 2, out


# --- idempotency ---------------------------------------------------------------------------


async def test_the_same_events_twice_are_stored_once(pool: Pool, test_settings: Settings) -> None:
    tenant = f"t-idem-{uuid.uuid4().hex[:8]}"
    writer = audit_writer(test_settings)
    events = [event(tenant, "stage.entered", {"stage": str(i)}, n=i) for i in range(4)]
    assert await append(pool, writer, events) == 4
    assert await append(pool, writer, events) == 0
    # A partly new batch writes only what is new, and concurrent writers of one batch race
    # for the tenant's lock: exactly one of them writes it.
    more = [event(tenant, "stage.entered", {"stage": str(i)}, n=i) for i in range(4, 7)]
    written = await asyncio.gather(*(append(pool, writer, events + more) for _ in range(3)))
    assert sorted(written) == [0, 0, 3]

    # A retried ledger activity: the same batch, a second attempt.
    batch = FlushAudit(events=[event(tenant, "run.completed", {"outcome": "ok"}, n=9)])
    ledger = LedgerActivities(pool, writer)
    assert await ActivityEnvironment().run(ledger.flush, batch) == 1
    assert await ActivityEnvironment().run(ledger.flush, batch) == 0

    async with pool.acquire() as conn:
        result = await verify(conn, tenant)
        keys = await conn.fetchval(
            "SELECT count(DISTINCT event_key) FROM audit_log WHERE tenant_id = $1", tenant
        )
    assert (result.ok, result.entries, keys) == (True, 8, 8)


# --- one tenant's concurrent appends --------------------------------------------------------


async def test_concurrent_appends_of_one_tenant_form_one_chain_and_share_commits(
    pool: Pool, database_url: str, test_settings: Settings
) -> None:
    tenant = f"t-busy-{uuid.uuid4().hex[:8]}"
    writer, other_process = audit_writer(test_settings), audit_writer(test_settings)
    recorded = [
        [event(tenant, "model.called", {"i": i, "j": j}, n=i) for j in range(i % 3 + 1)]
        for i in range(120)
    ]
    in_transactions = [[event(tenant, "run.completed", {"i": i}, n=i)] for i in range(10)]
    elsewhere = [[event(tenant, "tool.executed", {"i": i}, n=i)] for i in range(20)]
    results = await asyncio.gather(
        *(writer.record(pool, events) for events in recorded),
        # What the ledger does (inside the caller's transaction) and a second worker process's
        # writer: both contend for the same chain meanwhile.
        *(append(pool, writer, events) for events in in_transactions),
        *(other_process.record(pool, events) for events in elsewhere),
    )
    # Each caller gets back exactly its own events, all of them new.
    assert results[: len(recorded)] == recorded
    assert results[len(recorded) + len(in_transactions) :] == elsewhere

    everything = [e for group in (*recorded, *in_transactions, *elsewhere) for e in group]
    rows = await raw_rows(database_url, tenant)
    assert [r["seq"] for r in rows] == list(range(1, len(everything) + 1))  # no gaps
    assert {r["event_key"] for r in rows} == {e.key for e in everything}  # none lost
    async with pool.acquire() as conn:
        result = await verify(conn, tenant)
        # Rows one transaction wrote share its xmin: the 120 `record` calls of one writer
        # committed together in a few transactions, not each in its own.
        transactions = await conn.fetchval(
            "SELECT count(DISTINCT xmin::text) FROM audit_log"
            " WHERE tenant_id = $1 AND action = 'model.called'",
            tenant,
        )
    assert (result.ok, result.entries) == (True, len(everything))
    assert transactions < len(recorded) / 4


async def test_a_bad_event_fails_only_the_record_call_that_carried_it(
    pool: Pool, test_settings: Settings
) -> None:
    tenant = f"t-bad-{uuid.uuid4().hex[:8]}"
    writer = audit_writer(test_settings)
    good = [[event(tenant, "model.called", {"i": i}, n=i)] for i in range(6)]
    # PostgreSQL refuses a NUL in text: this one's transaction cannot commit.
    bad = event(tenant, "model.called", {"i": -1})
    bad = bad.model_copy(update={"key": "bad\x00key"})
    calls = [writer.record(pool, events) for events in good[:3]]
    calls += [writer.record(pool, [bad])]
    calls += [writer.record(pool, events) for events in good[3:]]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(results[3], asyncpg.PostgresError), results[3]
    assert [r for i, r in enumerate(results) if i != 3] == good

    async with pool.acquire() as conn:
        result = await verify(conn, tenant)
    assert (result.ok, result.entries) == (True, len(good))


async def test_a_write_committed_with_its_events_shares_their_transaction_or_fails_alone(
    pool: Pool, test_settings: Settings
) -> None:
    """`record(first=...)`: concurrent callers' writes and events commit together; a write
    that fails takes down its own events only."""
    tenant = f"t-first-{uuid.uuid4().hex[:8]}"
    writer = audit_writer(test_settings)
    keys = [f"{tenant}:memo:{i}" for i in range(8)]

    def memo(i: int) -> Callable[[Conn], Awaitable[None]]:
        async def write(conn: Conn) -> None:
            await conn.execute(
                "INSERT INTO model_calls (call_key, tenant_id, reply) VALUES ($1, $2, '{}')",
                keys[i],
                tenant,
            )
            if i == 5:
                raise RuntimeError("this write refuses to commit")

        return write

    events = [[event(tenant, "model.called", {"i": i}, n=i)] for i in range(8)]
    results = await asyncio.gather(
        *(writer.record(pool, events[i], first=memo(i)) for i in range(8)),
        return_exceptions=True,
    )
    assert isinstance(results[5], RuntimeError)
    assert [r for i, r in enumerate(results) if i != 5] == [
        e for i, e in enumerate(events) if i != 5
    ]
    async with pool.acquire() as conn:
        memos = {
            r["call_key"]: r["xmin"]
            for r in await conn.fetch(
                "SELECT call_key, xmin::text FROM model_calls WHERE call_key = ANY($1)", keys
            )
        }
        audited = {
            r["event_key"]: r["xmin"]
            for r in await conn.fetch(
                "SELECT event_key, xmin::text FROM audit_log WHERE tenant_id = $1", tenant
            )
        }
        result = await verify(conn, tenant)
    assert sorted(memos) == sorted(k for i, k in enumerate(keys) if i != 5)
    assert sorted(audited) == sorted(e[0].key for i, e in enumerate(events) if i != 5)
    for i, key in enumerate(keys):
        if i != 5:  # each write in the very transaction that appended its events
            assert memos[key] == audited[events[i][0].key]
    assert (result.ok, result.entries) == (True, 7)


async def test_an_empty_chain_verifies_with_no_head(pool: Pool) -> None:
    async with pool.acquire() as conn:
        result = await verify(conn, f"t-empty-{uuid.uuid4().hex[:8]}")
    assert (result.ok, result.entries, result.head_seq, result.head_hash) == (True, 0, 0, "")


async def test_concurrent_appends_for_one_tenant_make_one_chain(
    pool: Pool, test_settings: Settings
) -> None:
    tenant = f"t-race-{uuid.uuid4().hex[:8]}"
    writer = audit_writer(test_settings)
    batches = [[event(tenant, "stage.entered", {"stage": str(i)}, n=i)] for i in range(12)]
    assert await asyncio.gather(*(append(pool, writer, b) for b in batches)) == [1] * 12
    async with pool.acquire() as conn:
        result = await verify(conn, tenant)
    assert (result.ok, result.entries) == (True, 12)


async def test_one_batch_for_several_tenants_and_a_repeated_event(
    pool: Pool, test_settings: Settings
) -> None:
    first, second = (f"t-multi-{uuid.uuid4().hex[:8]}" for _ in range(2))
    writer = audit_writer(test_settings)
    repeated = event(first, "stage.entered", {"stage": "a"})
    batch = [repeated, repeated, event(second, "stage.entered", {"stage": "b"})]
    assert await append(pool, writer, batch) == 2  # the repeat within the batch is one entry
    async with pool.acquire() as conn:
        counts = [(await verify(conn, t)).entries for t in (first, second)]
    assert counts == [1, 1]


async def test_entries_are_stored_as_canonical_json(
    pool: Pool, database_url: str, test_settings: Settings
) -> None:
    """Sorted keys, no spaces, text as written, other values as text: the stored form the
    hash covers does not depend on how a writer ordered or typed its data."""
    tenant = f"t-canon-{uuid.uuid4().hex[:8]}"
    data = {"b": "café", "a": [1, {"d": 2, "c": None}], "when": T0}
    await append(pool, audit_writer(test_settings), [event(tenant, "x.y", data)])
    (row,) = await raw_rows(database_url, tenant)
    assert row["data"] == (
        '{"a":[1,{"c":null,"d":2}],"b":"café","when":"2026-03-01 12:00:00+00:00"}'
    )


async def test_without_payload_keys_masked_originals_are_not_kept(
    pool: Pool, database_url: str, test_settings: Settings
) -> None:
    tenant = f"t-nokeys-{uuid.uuid4().hex[:8]}"
    writer = audit_writer(test_settings.model_copy(update={"payload_keys": None}))
    await append(pool, writer, [event(tenant, "tool.executed", {"comment": "bob@example.com"})])
    (row,) = await raw_rows(database_url, tenant)
    assert (json.loads(row["data"]), row["private"]) == ({"comment": "[masked]"}, None)


# --- redaction -----------------------------------------------------------------------------

CARD = "4111 1111 1111 1111"  # passes the Luhn check
OTHER_CARD = "4242424242424242"
SECRET = "sk-ant-api03-Zx9_secretSECRET-0123456789"


async def test_redaction_happens_before_storage(
    pool: Pool, database_url: str, test_settings: Settings
) -> None:
    tenant = f"t-redact-{uuid.uuid4().hex[:8]}"
    data = {
        "note": f"card {CARD} on file",
        "hint": f"call with {SECRET} please",
        "contact": "reach bob@example.com today",
        "comment": f"paid by {OTHER_CARD} using {SECRET}; cc alice@example.org",
        "api_key": SECRET,
        "line": "ok\nseq=99 action=run.completed actor=admin",
    }
    writer = audit_writer(test_settings)
    await append(pool, writer, [event(tenant, "tool.executed", data, run_id=new_run_id())])
    (row,) = await raw_rows(database_url, tenant)

    private = (
        Sealer(test_settings.encryption_keys)
        .open(bytes(row["private"]), associated=f"{tenant}:{row['event_key']}".encode())
        .decode()
    )
    stored = json.loads(row["data"])
    for text in (row["data"], private):
        assert CARD not in text
        assert OTHER_CARD not in text
        assert "sk-ant-" not in text
    # Masked content is only in the sealed part, never in clear.
    assert "bob@example.com" not in row["data"]
    assert "alice@example.org" not in row["data"]
    assert b"example." not in bytes(row["private"])
    assert "bob@example.com" in private
    assert "alice@example.org" in private
    assert stored["note"] == "card [redacted:card_number] on file"
    assert stored["hint"] == "call with [redacted:anthropic_key] please"
    assert stored["contact"] == "reach [masked:email] today"
    assert stored["comment"] == "[masked]"
    assert stored["api_key"] == "[redacted]"
    # The newline cannot forge a second line in an export or a terminal.
    assert stored["line"] == "ok\\x0aseq=99 action=run.completed actor=admin"
    assert "\n" not in row["data"]

    revealed = writer.decode(row, reveal_private=True)
    assert revealed.revealed
    assert revealed.data["contact"] == "reach bob@example.com today"
    assert revealed.data["comment"].endswith("cc alice@example.org")
    assert "[redacted:card_number]" in revealed.data["comment"]


async def test_tokens_passwords_and_cards_never_reach_the_log(
    pool: Pool, database_url: str, test_settings: Settings, tenant: Tenant
) -> None:
    """Secrets in every shape the drop rules name, in free text and under field names of any
    case, are in neither the stored entry nor its sealed part."""
    key = tenant.keys["requester"]  # a real key, as `create_key` mints them
    secrets_planted = {
        "stead_key": key,
        "github_token": "ghp_" + "R8fQ2kLm9ZxW4vT7bN1cY6sH3jD5gA0eU2iO",
        "slack_token": "xoxb-1234567890-0987654321-AbCdEfGhIjKlMnOpQrStUvWx",
        "credential": "hunter2-correct-horse",
        "card_number": "4111_1111_1111_1111",
    }
    data = {
        "note": (
            f"retry with {secrets_planted['stead_key']} or {secrets_planted['github_token']};"
            f" slack {secrets_planted['slack_token']}; password: {secrets_planted['credential']}"
        ),
        "cards": ["paid 4111_1111_1111_1111", "and 5555.5555.5555.4444"],
        "comment": f"Bearer {key}",  # masked field: its sealed original is scrubbed too
        "Nested": {"PASSWORD": "p-1", "Api_Key": "k-1"},
    }
    writer = audit_writer(test_settings)
    await append(pool, writer, [event(tenant.id, "tool.executed", data, run_id=new_run_id())])
    (row,) = await raw_rows(database_url, tenant.id)
    private = (
        Sealer(test_settings.encryption_keys)
        .open(bytes(row["private"]), associated=f"{tenant.id}:{row['event_key']}".encode())
        .decode()
    )
    for text in (row["data"], private):
        for planted in (*secrets_planted.values(), "5555.5555.5555.4444", "p-1", "k-1"):
            assert planted not in text
    stored = json.loads(row["data"])
    for rule in ("stead_key", "github_token", "slack_token", "credential"):
        assert f"[redacted:{rule}]" in stored["note"]
    assert stored["cards"] == ["paid [redacted:card_number]", "and [redacted:card_number]"]
    assert stored["Nested"] == {"PASSWORD": "[redacted]", "Api_Key": "[redacted]"}
    assert "Bearer [redacted:stead_key]" in private


async def test_tenant_declared_fields_are_redacted(
    api: httpx.AsyncClient, tenant: Tenant, pool: Pool, database_url: str, test_settings: Settings
) -> None:
    url = "/v1/admin/redaction"
    body = {"mask": ["Ticket_Note"], "drop": ["internal_code"]}
    refused = await api.put(url, json=body, headers=tenant.auth("requester"))
    assert refused.status_code == 403
    for bad in (
        {"mask": ["x"], "drop": ["X"]},
        {"mask": ["call_id"]},
        {"mask": ["two words"]},
        {"mask": [], "tenant": "other"},
    ):
        invalid = await api.put(url, json=bad, headers=tenant.auth("admin"))
        assert invalid.status_code == 422, bad

    saved = await api.put(url, json=body, headers=tenant.auth("admin"))
    assert saved.status_code == 200, saved.text
    assert (saved.json()["mask"], saved.json()["drop"]) == (["ticket_note"], ["internal_code"])
    assert saved.json()["updated_by"] == "admin"
    assert "email" in saved.json()["file_mask"]
    assert (await api.get(url, headers=tenant.auth("admin"))).json()["mask"] == ["ticket_note"]

    data = {"ticket_note": "customer is furious", "internal_code": "X-42", "other": "fine"}
    await append(pool, audit_writer(test_settings), [event(tenant.id, "tool.executed", data)])
    rows = await raw_rows(database_url, tenant.id)
    assert [r["action"] for r in rows] == ["redaction.updated", "tool.executed"]
    assert rows[0]["actor"] == "admin"
    stored = json.loads(rows[1]["data"])
    assert stored == {"ticket_note": "[masked]", "internal_code": "[redacted]", "other": "fine"}
    private = Sealer(test_settings.encryption_keys).open(
        bytes(rows[1]["private"]), associated=f"{tenant.id}:{rows[1]['event_key']}".encode()
    )
    assert b"customer is furious" in private
    assert b"X-42" not in private


# --- the run's views over the API ----------------------------------------------------------

COMMENT = "accurate; questions to bob@example.com"


@pytest.mark.usefixtures("worker")
async def test_ledger_of_a_worker_driven_run(
    api: httpx.AsyncClient, tenant: Tenant, make_tenant: TenantFactory, pool: Pool
) -> None:
    started = await api.post(
        "/v1/runs",
        json={"pipeline": "summarize", "input": {"text": "Revenue grew 12%. Costs fell 3%."}},
        headers=tenant.auth("requester"),
    )
    assert started.status_code == 201, started.text
    run_id = started.json()["run_id"]
    review = await wait_json(
        api, f"/v1/runs/{run_id}", tenant.auth("requester"), lambda b: b["stage"] == "review"
    )
    approval_id = review["pending_approvals"][0]["approval_id"]
    decided = await api.post(
        f"/v1/approvals/{approval_id}/decision",
        json={"decision": "approve", "comment": COMMENT},
        headers=tenant.auth("approver"),
    )
    assert decided.status_code == 200, decided.text
    run = await wait_json(
        api, f"/v1/runs/{run_id}", tenant.auth("requester"), lambda b: b["status"] == "completed"
    )

    ledger_url = f"/v1/runs/{run_id}/ledger"
    # A run completes only after its last audit entries are flushed: no wait needed here.
    ledger = (await api.get(ledger_url, headers=tenant.auth("requester"))).json()
    assert ledger["status"] == "completed"
    steps = [i["stage"] for i in ledger["items"] if i["kind"] == "step"]
    assert steps == ["intake", "model_call", "review", "completed"]
    (call,) = [i for i in ledger["items"] if i["kind"] == "model_call"]
    assert call["model"]
    assert min(call["input_tokens"], call["output_tokens"], call["cost_nusd"]) > 0
    assert (call["cache_hit"], call["latency_ms"] >= 0) == (False, True)
    assert ledger["total_cost_usd"] == run["usage"]["cost_usd"]
    assert ledger["model_calls"] == run["usage"]["model_calls"] == 1
    assert ledger["requested_by"] == "requester"
    (approval,) = [i for i in ledger["items"] if i["kind"] == "approval"]
    assert approval["status"] == "approved"
    (decision,) = approval["decisions"]
    assert (decision["by"], decision["decision"]) == ("approver", "approve")
    assert decision["at"] >= approval["at"]
    seqs = [i["seq"] for i in ledger["items"]]
    assert seqs == sorted(seqs)

    # Requester and approver see the comment and the proposal masked; the admin sees both.
    for user in ("requester", "approver"):
        seen = (await api.get(ledger_url, headers=tenant.auth(user))).json()
        masked = next(i for i in seen["items"] if i["kind"] == "approval")
        assert masked["decisions"][0]["comment"] == "[masked]"
        assert masked["proposal"] == "[masked]"
        assert seen["redacted"] is True
        assert "bob@example.com" not in json.dumps(seen)
    full = (await api.get(ledger_url, headers=tenant.auth("admin"))).json()
    shown = next(i for i in full["items"] if i["kind"] == "approval")
    assert shown["decisions"][0]["comment"] == COMMENT
    assert shown["proposal"]["summary"] == run["result"]["summary"]
    assert full["redacted"] is False

    # Raw entries: one per key, chained in place; and the tenant's chain verifies.
    entries = await api.get(f"/v1/runs/{run_id}/audit", headers=tenant.auth("requester"))
    assert entries.status_code == 200
    body = entries.json()
    assert body["chain"] == {**body["chain"], "ok": True, "scope": "run"}
    actions = [e["action"] for e in body["items"]]
    assert actions.count("run.started") == actions.count("run.completed") == 1
    assert actions.count("model.called") == 1
    assert len({e["key"] for e in body["items"]}) == len(body["items"])
    assert body["items"][0]["data"]["input_sha256"]
    verified = await api.get("/v1/audit/verify", headers=tenant.auth("admin"))
    assert verified.json()["ok"] is True
    async with pool.acquire() as conn:
        count = await conn.fetchval(
            "SELECT count(*) FROM audit_log WHERE tenant_id = $1", tenant.id
        )
    assert verified.json()["entries"] == verified.json()["head_seq"] == count

    # Another tenant's run is not found; search and verification are for admins.
    other = await make_tenant()
    for path in (ledger_url, f"/v1/runs/{run_id}/audit"):
        assert (await api.get(path, headers=other.auth("admin"))).status_code == 404
    assert (await api.get("/v1/audit", headers=tenant.auth("requester"))).status_code == 403
    assert (await api.get("/v1/audit", headers=tenant.auth("approver"))).status_code == 403
    assert (await api.get("/v1/audit/verify", headers=tenant.auth("approver"))).status_code == 403


async def test_search_filters_pages_and_validates(
    api: httpx.AsyncClient, tenant: Tenant, pool: Pool, test_settings: Settings
) -> None:
    run_id = new_run_id()
    events = [
        event(tenant.id, "approval.requested", {"approval_id": "a1"}, run_id=run_id, n=1),
        event(
            tenant.id,
            "approval.decided",
            {"approval_id": "a1"},
            run_id=run_id,
            actor="ann",
            kind="user",
            n=2,
        ),
        *[event(tenant.id, "stage.entered", {"stage": str(i)}, n=10 + i) for i in range(5)],
    ]
    await append(pool, audit_writer(test_settings), events)
    admin = tenant.auth("admin")

    async def items(query: str) -> list[dict[str, Any]]:
        response = await api.get(f"/v1/audit?{query}", headers=admin)
        assert response.status_code == 200, response.text
        return list(response.json()["items"])

    assert [e["actor"] for e in await items("action=approval.decided")] == ["ann"]
    assert [e["action"] for e in await items("action=approval.*")] == [
        "approval.requested",
        "approval.decided",
    ]
    assert len(await items("actor=ann")) == 1
    assert len(await items(f"run_id={run_id}")) == 2
    window = "from=2026-03-01T12:00:10Z&to=2026-03-01T12:00:12%2B00:00"
    assert [e["data"]["stage"] for e in await items(window)] == ["0", "1"]

    seqs, cursor = [], None
    while True:
        page = await api.get(
            "/v1/audit",
            params={"limit": 3, **({"cursor": cursor} if cursor else {})},
            headers=admin,
        )
        seqs += [e["seq"] for e in page.json()["items"]]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert seqs == list(range(1, 8))

    for bad in (
        "from=2026-03-01T12:00:00",  # no UTC offset
        "from=2026-03-02T00:00:00Z&to=2026-03-01T00:00:00Z",
        "from=yesterday",
        "action=DROP%20TABLE",
        "limit=0",
        "cursor=bm90LWEtY3Vyc29y",
        "run_id=abc",
    ):
        response = await api.get(f"/v1/audit?{bad}", headers=admin)
        assert response.status_code == 422, bad
        assert response.json()["detail"], bad


REFUND = {"amount": 80, "currency": "USD", "customer_email": "eve@example.com"}


def tool_events(tenant: str, run_id: str) -> list[AuditEvent]:
    """What the tool gateway writes for a refund that needs approval, then a denied call."""

    def at_run(action: str, data: dict[str, Any], n: int, **who: Any) -> AuditEvent:
        return event(tenant, action, data, run_id=run_id, n=n, **who)

    agent = {"actor": "agent:support-agent", "kind": "agent"}
    rule = "role:requester/execute:refund#4"
    return [
        at_run(
            "run.started",
            {"pipeline": "support-agent", "input_sha256": "ab"},
            0,
            actor="requester",
            kind="user",
        ),
        at_run("stage.entered", {"stage": "tool_execution", "from": "intake"}, 1),
        at_run(
            "tool.decided",
            {
                "tool": "refund",
                "call_id": "c1",
                "arguments": REFUND,
                "effect": "approval_required",
                "rule": rule,
                "reason": "requires approval",
            },
            2,
            **agent,
        ),
        at_run(
            "approval.requested",
            {
                "approval_id": "ap1",
                "title": "Refund",
                "kind": "tool_call",
                "proposal": REFUND,
                "roles": ["finance"],
                "quorum": 1,
            },
            3,
        ),
        at_run(
            "approval.decided",
            {"approval_id": "ap1", "decision": "approve", "comment": "ok", "status": "approved"},
            4,
            actor="fin",
            kind="user",
        ),
        at_run(
            "tool.decided",
            {
                "tool": "refund",
                "call_id": "c1",
                "arguments": REFUND,
                "effect": "allowed",
                "rule": rule,
                "reason": "",
                "approval_id": "ap1",
                "approved_by": ["fin"],
            },
            5,
            **agent,
        ),
        at_run(
            "tool.executed",
            {"tool": "refund", "call_id": "c1", "status": "ok", "result": {"refund_id": "rf_1"}},
            6,
            **agent,
        ),
        at_run(
            "tool.decided",
            {
                "tool": "delete_customer",
                "call_id": "c2",
                "arguments": {},
                "effect": "denied",
                "rule": "default-deny",
                "reason": "no grant",
            },
            7,
            **agent,
        ),
        at_run(
            "model.called",
            {
                "step": "agent",
                "model": "m",
                "input_tokens": 10,
                "output_tokens": 5,
                "cache_read_tokens": 0,
                "cache_write_tokens": 0,
                "cost_nusd": 1234,
                "cache_hit": False,
                "fallbacks": 0,
                "latency_ms": 12.5,
                "attempt": 1,
            },
            8,
        ),
        at_run("run.completed", {"outcome": "completed", "output": {"reply": "done"}}, 9),
    ]


async def test_tool_calls_in_the_ledger_outlive_temporal(
    api: httpx.AsyncClient,
    tenant: Tenant,
    make_tenant: TenantFactory,
    pool: Pool,
    test_settings: Settings,
) -> None:
    """Tool-gateway entries fold into one item per call. Temporal has never heard of this run
    (as after retention deleted it), so the ledger comes from the audit log alone."""
    run_id = new_run_id()
    await append(pool, audit_writer(test_settings), tool_events(tenant.id, run_id))

    url = f"/v1/runs/{run_id}/ledger"
    ledger = (await api.get(url, headers=tenant.auth("requester"))).json()
    assert (ledger["status"], ledger["pipeline"]) == ("completed", "support-agent")
    assert (ledger["total_cost_nusd"], ledger["total_cost_usd"]) == (1234, 0.000001234)
    assert [i["kind"] for i in ledger["items"]] == [
        "event",
        "step",
        "step",
        "tool_call",
        "approval",
        "tool_call",
        "model_call",
        "event",
    ]
    refund, denied = [i for i in ledger["items"] if i["kind"] == "tool_call"]
    assert [d["effect"] for d in refund["decisions"]] == ["approval_required", "allowed"]
    assert refund["decisions"][1]["approved_by"] == ["fin"]
    assert (refund["effect"], refund["status"]) == ("allowed", "ok")
    assert refund["result"] == "[masked]"  # tool results are customer data
    assert refund["actor"] == "agent:support-agent"
    assert refund["arguments"] == "[masked]"
    assert (denied["effect"], denied["status"]) == ("denied", None)
    assert denied["decisions"][0]["rule"] == "default-deny"
    (approval,) = [i for i in ledger["items"] if i["kind"] == "approval"]
    assert (approval["status"], approval["decisions"][0]["by"]) == ("approved", "fin")

    full = (await api.get(url, headers=tenant.auth("admin"))).json()
    revealed = next(i for i in full["items"] if i["kind"] == "tool_call")
    assert revealed["arguments"] == REFUND
    assert revealed["result"] == {"refund_id": "rf_1"}

    other = await make_tenant()
    assert (await api.get(url, headers=other.auth("requester"))).status_code == 404
    unknown = f"/v1/runs/{new_run_id()}/ledger"
    assert (await api.get(unknown, headers=tenant.auth("requester"))).status_code == 404
    malformed = "/v1/runs/not-a-run/audit"
    assert (await api.get(malformed, headers=tenant.auth("requester"))).status_code == 404


async def test_run_view_names_tampering_next_to_the_run(
    api: httpx.AsyncClient, tenant: Tenant, pool: Pool, database_url: str, test_settings: Settings
) -> None:
    run_id = new_run_id()
    later = event(tenant.id, "redaction.updated", {"mask_fields": []}, n=20)
    await append(pool, audit_writer(test_settings), [*tool_events(tenant.id, run_id), later])
    url = f"/v1/runs/{run_id}/audit"
    intact = (await api.get(url, headers=tenant.auth("requester"))).json()
    assert intact["chain"]["ok"] is True
    assert (intact["chain"]["scope"], intact["chain"]["entries"]) == ("run", 10)

    # The run's last entry goes; what follows belongs to no run, so only the gap shows it.
    async with tampering(database_url) as owner:
        await owner.execute("DELETE FROM audit_log WHERE tenant_id = $1 AND seq = 10", tenant.id)
    broken = (await api.get(url, headers=tenant.auth("requester"))).json()["chain"]
    expected = {"scope": "tenant", "ok": False, "first_bad_seq": 10, "problem": "deleted"}
    assert broken == {**broken, **expected}
    whole = (await api.get("/v1/audit/verify", headers=tenant.auth("admin"))).json()
    assert whole == {**whole, **expected}


@pytest.mark.usefixtures("worker")
async def test_a_resumed_run_records_what_it_does_after_the_reset(
    api: httpx.AsyncClient, tenant: Tenant, sim: SimControl
) -> None:
    await sim.fault(400, model="claude-sonnet-5-5")  # the `draft` route's first model
    started = await api.post(
        "/v1/runs",
        json={"pipeline": "summarize", "input": {"text": "Alpha beta. Gamma delta."}},
        headers=tenant.auth("requester"),
    )
    run_id = started.json()["run_id"]
    run_url = f"/v1/runs/{run_id}"
    await wait_json(api, run_url, tenant.auth("requester"), lambda b: b["status"] == "failed")
    resumed = await api.post(f"{run_url}/retry", headers=tenant.auth("requester"))
    assert resumed.status_code == 202, resumed.text
    # The inbox row and the audit entries of the request are written in one transaction.
    await wait_json(
        api,
        "/v1/approvals",
        tenant.auth("approver"),
        lambda b: any(a["run_id"] == run_id for a in b["items"]),
    )
    ledger = (await api.get(f"{run_url}/ledger", headers=tenant.auth("requester"))).json()
    steps = [i["stage"] for i in ledger["items"] if i["kind"] == "step"]
    assert steps[-1] == "review"
    assert any(i["kind"] == "approval" for i in ledger["items"])
