"""Throughput: completed three-step runs per second, Stead against what users would pick instead.

The same shape on every leg, one worker process each, all on one Temporal server:
- **Stead**: `triage` (three sequential model steps) started over HTTP with a real API key, so
  each run pays HTTP, auth, policy resolution, the start, per step the model gateway (budget
  reservation, cache lookup, token count, the simulator at zero latency, settlement, usage,
  memo, cache write, audit) and the audit log's hash chain. Two legs: every run of a batch
  from ONE tenant (one audit chain, one set of budget counters: the contended case, the
  headline) and the batch spread over 20 tenants;
- **hand-rolled** (`bench.handrolled`): the same three model calls, one `AsyncAnthropic` call
  per activity, `start_workflow`, nothing of Stead;
- **Pydantic AI** (`bench.pydantic_ai_peer`): three `TemporalAgent` runs, in its own venv;
- **no-op** (`bench.bare`): three no-op activities, the floor of the server itself.

Each batch starts `runs` runs with at most `concurrency` starts in flight and is timed from the
first start request to the last close time Temporal recorded (completions are read from
visibility counts, which costs the server little). A warm-up batch per leg first, then
`repeats` rounds in which every leg runs one batch, the legs' order rotating from round to
round so that no leg always follows the same one; the median batch is reported. CPU seconds
per completed run by process (psutil, every process of the platform) are steadier than wall
throughput on a shared machine: the CPU target is read from them.

Stead runs at its defaults: no model-call rate (`STEAD_MODEL_CALLS_PER_SECOND` unset), so model
calls ride the workflow's own task queue and the server hands them to the worker eagerly, as it
does the peers' activities.
"""

from __future__ import annotations

import asyncio
import statistics
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from bench.bare import BareInput, BareThreeSteps
from bench.env import (
    BARE_QUEUE,
    BenchEnv,
    EnvSpec,
    RunOptions,
    SteadSpec,
    Tenant,
    bench_env,
    cpu_delta,
)
from bench.load import SteadApi, bounded, last_close, since, wait_closed
from bench.peers import HAND, PYDANTIC_AI, Peer
from bench.report import Comparison, Result, Table, at_least, at_most, say
from bench.stats import ratio

Snapshot = tuple[dict[str, float], int]  # CPU seconds by process, PostgreSQL transactions
TENANTS = 20  # the spread leg: as many tenants as runs in flight
STEAD, SPREAD, HAND_LEG, PAI_LEG, NOOP = (
    "stead",
    f"stead-{TENANTS}-tenants",
    HAND.name,
    PYDANTIC_AI.name,
    "noop",
)
LEGS = (NOOP, HAND_LEG, PAI_LEG, STEAD, SPREAD)
DRIVER = "driver"  # the load generator: neither system's cost
TARGETS = {
    "vs hand-rolled": 0.9,
    "vs Pydantic AI": 1.5,
    "cpu vs hand-rolled": 1.15,
    "one tenant vs many": 0.95,
}


@dataclass(frozen=True)
class Sizes:
    runs: int
    concurrency: int
    warmup: int
    repeats: int


SIZES = {False: Sizes(300, 20, 20, 3), True: Sizes(30, 10, 5, 1)}


@dataclass
class Batch:
    leg: str
    runs: int
    seconds: float
    cpu: dict[str, float] = field(default_factory=dict)
    pg_transactions: int = 0

    @property
    def rate(self) -> float:
        return self.runs / self.seconds


def triage_input(tenant: str, index: int) -> dict[str, str]:
    # Unique per run (no cache hits); `sim_reply: ok` makes the check pass: three steps.
    return {"message": f"Invoice {index} for {tenant} is wrong.\nsim_reply: ok"}


# A PostgreSQL backend that goes idle within a second of its last report holds its counts
# for up to 10 s (PGSTAT_IDLE_INTERVAL): a leg that used the database waits that long before
# its transactions are read, or they would land in the next leg's window. CPU is read sooner,
# so the wait's idle CPU is not charged to the leg's runs.
CPU_SETTLE = 1.1
PG_SETTLE = 10.5


async def _snapshot(env: BenchEnv, uses_pg: bool) -> Snapshot:
    await asyncio.sleep(CPU_SETTLE)
    cpu = env.cpu_seconds()
    if uses_pg:
        await asyncio.sleep(PG_SETTLE - CPU_SETTLE)
    return cpu, await env.pg_transactions()


async def timed_batch(
    env: BenchEnv,
    leg: str,
    runs: int,
    concurrency: int,
    start: Callable[[int], Awaitable[object]],
    workflow_type: str,
    uses_pg: bool = False,
) -> Batch:
    """Start `runs` runs through `start(index)`, wait for every one to complete."""
    before = await _snapshot(env, uses_pg=False)
    started = datetime.now(UTC)
    await bounded(runs, concurrency, start)
    query = f"WorkflowType = '{workflow_type}' AND {since(started)}"
    closed = await wait_closed(env.raw, query, runs, within=max(120.0, runs))
    seconds = (last_close(closed) - started).total_seconds()
    after = await _snapshot(env, uses_pg)
    return Batch(leg, runs, seconds, cpu_delta(before[0], after[0]), after[1] - before[1])


async def stead_batch(
    env: BenchEnv, api: SteadApi, runs: int, concurrency: int, tenants: int = 1
) -> Batch:
    """`triage` over HTTP; run i belongs to tenant i mod `tenants` (fresh tenants)."""
    owners: list[Tenant] = [await env.tenant() for _ in range(tenants)]

    async def start(index: int) -> str:
        tenant = owners[index % tenants]
        return await api.start(tenant, "triage", triage_input(tenant.id, index))

    leg = STEAD if tenants == 1 else f"stead-{tenants}-tenants"
    return await timed_batch(env, leg, runs, concurrency, start, "triage", uses_pg=True)


async def bare_batch(env: BenchEnv, runs: int, concurrency: int) -> Batch:
    tag = uuid.uuid4().hex[:8]

    async def start(index: int) -> None:
        await env.raw.start_workflow(
            BareThreeSteps.run,
            BareInput(text=f"message {index}"),
            id=f"bare-{tag}-{index}",
            task_queue=BARE_QUEUE,
        )

    return await timed_batch(env, NOOP, runs, concurrency, start, "bare-three-steps")


async def peer_batch(env: BenchEnv, peer: Peer, runs: int, concurrency: int) -> Batch:
    tag = uuid.uuid4().hex[:8]

    async def start(index: int) -> None:
        text = triage_input(tag, index)["message"]
        await peer.start_triage(env.raw, text, f"{peer.name}-{tag}-{index}")

    return await timed_batch(env, peer.name, runs, concurrency, start, peer.triage_type)


def per_run(batches: list[Batch], leg: str) -> dict[str, float]:
    """CPU milliseconds per completed run by process over every batch of `leg`."""
    mine = [b for b in batches if b.leg == leg]
    runs = sum(b.runs for b in mine) or 1
    names = {name for b in mine for name in b.cpu}
    return {name: sum(b.cpu.get(name, 0.0) for b in mine) / runs * 1000 for name in names}


def platform_ms(batches: list[Batch], leg: str) -> float:
    """CPU ms per run of every process but the load generator."""
    return sum(ms for name, ms in per_run(batches, leg).items() if name != DRIVER)


def transactions_per_run(batches: list[Batch], leg: str) -> float:
    mine = [b for b in batches if b.leg == leg]
    return sum(b.pg_transactions for b in mine) / (sum(b.runs for b in mine) or 1)


def cpu_table(batches: list[Batch], legs: tuple[str, ...] = LEGS) -> Table:
    """CPU milliseconds per completed run by process (rows) and leg (columns). A leg's window
    includes the other legs' idle workers, which poll: every column pays the same idle cost."""
    legs = tuple(leg for leg in legs if any(b.leg == leg for b in batches))
    by_leg = {leg: per_run(batches, leg) for leg in legs}
    names = sorted({name for figures in by_leg.values() for name in figures})
    rows: list[list[Any]] = [
        [name, *(by_leg[leg].get(name, 0.0) for leg in legs)] for name in names
    ]
    rows.append(["all processes", *(sum(by_leg[leg].values()) for leg in legs)])
    rows.append(["all but the driver", *(platform_ms(batches, leg) for leg in legs)])
    rows.append(
        ["PostgreSQL transactions per run", *(transactions_per_run(batches, leg) for leg in legs)]
    )
    return Table("CPU per completed run, by process (ms)", ["process", *legs], rows)


def median_rate(batches: list[Batch], leg: str) -> float:
    return statistics.median(b.rate for b in batches if b.leg == leg)


def _rate(batches: list[Batch], leg: str, base: str, key: str | None) -> Comparison:
    stead, baseline = median_rate(batches, leg), median_rate(batches, base)
    share = ratio(stead, baseline)
    target = TARGETS[key] if key else None
    return Comparison(
        f"completed runs/s (median), {leg} / {base}",
        "runs/s",
        stead,
        baseline,
        share,
        f">= {target}" if target else "",
        at_least(share, target) if target else None,
    )


def _cpu(batches: list[Batch], base: str, target: float | None) -> Comparison:
    stead, baseline = platform_ms(batches, STEAD), platform_ms(batches, base)
    share = ratio(stead, baseline)
    return Comparison(
        f"CPU per completed run (all but the driver), {STEAD} / {base}",
        "ms",
        stead,
        baseline,
        share,
        f"<= {target}" if target else "",
        at_most(share, target) if target else None,
    )


def comparisons(batches: list[Batch]) -> list[Comparison]:
    return [
        _rate(batches, STEAD, HAND_LEG, "vs hand-rolled"),
        _rate(batches, STEAD, PAI_LEG, "vs Pydantic AI"),
        _cpu(batches, HAND_LEG, TARGETS["cpu vs hand-rolled"]),
        _rate(batches, STEAD, SPREAD, "one tenant vs many"),
        _cpu(batches, PAI_LEG, None),
        _cpu(batches, NOOP, None),
        _rate(batches, HAND_LEG, NOOP, None),
        _rate(batches, SPREAD, HAND_LEG, None),
    ]


def _result(sizes: Sizes, quick: bool, batches: list[Batch]) -> Result:
    per_batch = Table(
        "Batches (in order)",
        ["leg", "runs", "seconds", "runs/s", "CPU ms/run (all but the driver)"],
        [[b.leg, b.runs, b.seconds, b.rate, platform_ms([b], b.leg)] for b in batches],
    )
    return Result(
        name="throughput",
        title="Throughput: three-step pipeline; Stead vs hand-rolled Temporal, Pydantic AI, no-op",
        quick=quick,
        params=vars(sizes) | {"tenants_spread": TENANTS},
        comparisons=comparisons(batches),
        tables=[per_batch, cpu_table(batches)],
        data={"batches": [vars(b) | {"rate": b.rate} for b in batches]},
        notes=[
            "Window: first start request to the last close time recorded by Temporal.",
            f"`{STEAD}`: each batch is one fresh tenant (one audit chain, one set of budget"
            f" counters: the contended case); `{SPREAD}`: each batch spread over {TENANTS}"
            " fresh tenants.",
            "`driver` is the load generator (HTTP client for Stead, Temporal client otherwise);"
            " the CPU targets leave it out.",
            "`pai-worker` is Pydantic AI's worker, `hand-worker` the hand-rolled one,"
            " `bare-worker` the no-op one.",
        ],
    )


async def run_leg(env: BenchEnv, api: SteadApi, leg: str, runs: int, concurrency: int) -> Batch:
    if leg == NOOP:
        return await bare_batch(env, runs, concurrency)
    if leg == STEAD:
        return await stead_batch(env, api, runs, concurrency)
    if leg == SPREAD:
        return await stead_batch(env, api, runs, concurrency, tenants=TENANTS)
    peer = HAND if leg == HAND_LEG else PYDANTIC_AI
    return await peer_batch(env, peer, runs, concurrency)


def rotated(legs: tuple[str, ...], round_: int) -> tuple[str, ...]:
    shift = round_ % len(legs)
    return legs[shift:] + legs[:shift]


async def measure(env: BenchEnv, sizes: Sizes, legs: tuple[str, ...] = LEGS) -> list[Batch]:
    """A warm-up batch per leg, then `repeats` rounds of one batch per leg, order rotating."""
    batches: list[Batch] = []
    async with SteadApi.client(env.stack().api_url) as http:
        api = SteadApi(http)
        say(f"warm-up: {sizes.warmup} runs per leg")
        for leg in legs:
            await run_leg(env, api, leg, sizes.warmup, sizes.concurrency)
        for round_ in range(sizes.repeats):
            for leg in rotated(legs, round_):
                batch = await run_leg(env, api, leg, sizes.runs, sizes.concurrency)
                say(
                    f"round {round_ + 1}/{sizes.repeats} {leg}: {batch.rate:.1f} runs/s,"
                    f" {platform_ms([batch], leg):.0f} ms CPU/run"
                )
                batches.append(batch)
    return batches


async def run(options: RunOptions) -> Result:
    sizes = SIZES[options.quick]
    async with bench_env(EnvSpec(stead=(SteadSpec(),), peers=True), options) as env:
        batches = await measure(env, sizes)
    return _result(sizes, options.quick, batches)
