"""The audit chain under one tenant's load, alone: the real writer on embedded PostgreSQL.

The platform-wide `cuts` benchmark shows the audit cut inside a whole run, where a busy machine
drowns it; this one isolates it. `writers` callers (as many as runs in flight), each making
`appends` sequential appends of one model-call event, the way a run's model steps do:
- **batched** (`AuditWriter.record`, what the gateway calls): the tenant's appends in this
  process share a transaction;
- **one transaction each** (what `record` did before): every append takes the tenant's lock
  and holds it across its own commit's WAL flush.
Each on ONE tenant and spread over as many tenants as callers, the four legs interleaved and
rotating over `repeats` rounds. Figures: appends/s (median), transactions per append, and the
chain verified after every leg.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from bench.env import RunOptions, make_root
from bench.report import Comparison, Result, Table, at_least, say
from bench.throughput import rotated
from stead.contract import AuditEvent
from stead.policy.redaction import load_policy
from stead.store.audit import AuditWriter, verify
from stead.store.db import Pool, create_pool
from stead.store.embedded import EmbeddedPostgres
from stead.store.migrate import migrate
from worker import APP

TARGET = 0.95
BATCHED, EACH = "batched", "one transaction each"
LEGS = tuple(f"{way}, {spread}" for way in (BATCHED, EACH) for spread in ("1 tenant", "20 tenants"))


@dataclass(frozen=True)
class Sizes:
    writers: int
    appends: int
    repeats: int


SIZES = {False: Sizes(20, 50, 5), True: Sizes(20, 20, 3)}


@dataclass
class Leg:
    leg: str
    appends: int
    seconds: float
    transactions: int

    @property
    def rate(self) -> float:
        return self.appends / self.seconds


Append = Callable[[Pool, AuditWriter, AuditEvent], Awaitable[object]]


async def _batched(pool: Pool, writer: AuditWriter, event: AuditEvent) -> object:
    return await writer.record(pool, [event])


async def _each(pool: Pool, writer: AuditWriter, event: AuditEvent) -> object:
    async with pool.acquire() as conn, conn.transaction():
        return await writer.append_new(conn, [event])


def _event(tenant: str, writer: int, step: int) -> AuditEvent:
    return AuditEvent(
        key=f"r{writer}:model:{step}:{uuid.uuid4().hex[:8]}",
        tenant=tenant,
        actor="workflow:triage",
        actor_kind="system",
        action="model.called",
        run_id=f"r_{writer}",
        at=datetime.now(UTC),
        data={"step": step, "model": "claude-haiku", "input_tokens": 120, "output_tokens": 80},
    )


async def _transactions(pool: Pool) -> int:
    async with pool.acquire() as conn:
        count: int = await conn.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        )
    return count


async def run_leg(pool: Pool, writer: AuditWriter, leg: str, sizes: Sizes) -> Leg:
    append: Append = _batched if leg.startswith(BATCHED) else _each
    spread = leg.endswith("20 tenants")
    tenants = [f"bench-{uuid.uuid4().hex[:8]}" for _ in range(sizes.writers if spread else 1)]

    async def caller(index: int) -> None:
        tenant = tenants[index % len(tenants)]
        for step in range(sizes.appends):
            await append(pool, writer, _event(tenant, index, step))

    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_stat_clear_snapshot()")
    before = await _transactions(pool)
    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(caller(i) for i in range(sizes.writers))), timeout=300)
    seconds = time.monotonic() - started
    await asyncio.sleep(10.5)  # PostgreSQL reports an idle backend's counts late
    transactions = await _transactions(pool) - before
    async with pool.acquire() as conn:
        for tenant in tenants:
            checked = await verify(conn, tenant)
            expected = sizes.writers * sizes.appends // len(tenants)
            if not checked.ok or checked.entries != expected:
                raise AssertionError(f"{leg}: chain of {tenant} is {checked}")
    return Leg(leg, sizes.writers * sizes.appends, seconds, transactions)


def _median(legs: list[Leg], name: str) -> float:
    return statistics.median(leg.rate for leg in legs if leg.leg == name)


def _comparison(legs: list[Leg], way: str) -> Comparison:
    one, many = _median(legs, f"{way}, 1 tenant"), _median(legs, f"{way}, 20 tenants")
    share = one / many
    return Comparison(
        f"appends/s (median), {way}: 1 tenant / 20 tenants",
        "appends/s",
        one,
        many,
        share,
        f">= {TARGET}",
        at_least(share, TARGET),
    )


def _result(sizes: Sizes, quick: bool, legs: list[Leg]) -> Result:
    rows = []
    for name in LEGS:
        mine = [leg for leg in legs if leg.leg == name]
        appends = sum(leg.appends for leg in mine)
        rows.append([name, _median(legs, name), sum(leg.transactions for leg in mine) / appends])
    batched_one, each_one = _median(legs, LEGS[0]), _median(legs, LEGS[2])
    return Result(
        name="audit",
        title="The audit chain under one tenant's load: batched appends vs one transaction each",
        quick=quick,
        params=vars(sizes),
        comparisons=[
            _comparison(legs, BATCHED),
            _comparison(legs, EACH),
            Comparison(
                "appends/s (median), 1 tenant: batched / one transaction each",
                "appends/s",
                batched_one,
                each_one,
                batched_one / each_one,
            ),
        ],
        tables=[
            Table("Per leg", ["leg", "appends/s (median)", "transactions per append"], rows),
            Table(
                "Rounds (in order)",
                ["leg", "appends", "seconds", "appends/s"],
                [[leg.leg, leg.appends, leg.seconds, leg.rate] for leg in legs],
            ),
        ],
        data={"legs": [vars(leg) | {"rate": leg.rate} for leg in legs]},
        notes=[
            f"{sizes.writers} callers, each {sizes.appends} sequential appends of one event;"
            " every chain verified (intact, none lost) after its leg.",
            "Transactions: the database's commits over the leg, the verification's excluded.",
        ],
    )


async def run(options: RunOptions) -> Result:
    sizes = SIZES[options.quick]
    root = make_root()
    postgres = EmbeddedPostgres((root / "pg").resolve())
    url = postgres.start()
    try:
        assert APP.migrations is not None
        await migrate(url, application=(APP.name, APP.migrations))
        pool = await create_pool(url, app_role=None, max_size=sizes.writers + 4)
        writer = AuditWriter(load_policy(), None)
        legs: list[Leg] = []
        try:
            for round_ in range(sizes.repeats):
                for name in rotated(LEGS, round_):
                    leg = await run_leg(pool, writer, name, sizes)
                    say(f"round {round_ + 1}/{sizes.repeats} {name}: {leg.rate:.0f} appends/s")
                    legs.append(leg)
        finally:
            await pool.close()
    finally:
        postgres.stop()
        if not options.keep:
            shutil.rmtree(root, ignore_errors=True)
    return _result(sizes, options.quick, legs)
