"""Throughput: completed runs per second, Stead's whole stack against bare Temporal.

Same shape both ways, one worker process each, same server, same SDK defaults:
- Stead: `triage` (three sequential model steps) started over HTTP with a real API key, so
  each run pays HTTP, auth, policy resolution, the start, per step the model gateway (budget
  reservation, cache lookup, token count, the simulator at zero latency, settlement, usage,
  memo, cache write, audit) and the audit log's hash chain;
- bare: `bare-three-steps` (three no-op activities) started with `client.start_workflow`.

Each batch starts `runs` runs with at most `concurrency` starts in flight and is timed from
the first start request to the last close time Temporal recorded (completions are read from
visibility counts, which costs the server little). Warm-up batches first, then the legs
alternate for `repeats` batches each; the median is reported. The CPU seconds every process
spent per run show where the time goes.

Stead runs at its defaults: no model-call rate (`STEAD_MODEL_CALLS_PER_SECOND` unset), so model
calls ride the workflow's own task queue and the server hands them to the worker eagerly, as it
does the bare workflow's activities. With a rate set they go through the `-model` queue's
matching instead (about 11 ms more server CPU per three-step run, measured on the bare shape).
"""

from __future__ import annotations

import asyncio
import statistics
import uuid
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
    bench_env,
    cpu_delta,
)
from bench.load import SteadApi, bounded, last_close, since, wait_closed
from bench.report import Comparison, Result, Table, at_least, say
from bench.stats import ratio

TARGET = 0.8
Snapshot = tuple[dict[str, float], int]  # CPU seconds by process, PostgreSQL transactions


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


async def _snapshot(env: BenchEnv) -> Snapshot:
    await asyncio.sleep(1.1)  # let PostgreSQL's backends report their counts
    return env.cpu_seconds(), await env.pg_transactions()


def _batch(leg: str, runs: int, seconds: float, before: Snapshot, after: Snapshot) -> Batch:
    return Batch(leg, runs, seconds, cpu_delta(before[0], after[0]), after[1] - before[1])


async def stead_batch(env: BenchEnv, api: SteadApi, runs: int, concurrency: int) -> Batch:
    tenant = await env.tenant()
    before = await _snapshot(env)
    started = datetime.now(UTC)
    await bounded(
        runs, concurrency, lambda i: api.start(tenant, "triage", triage_input(tenant.id, i))
    )
    query = f"WorkflowType = 'triage' AND CustomerId = '{tenant.id}'"
    closed = await wait_closed(env.client, query, runs, within=max(120.0, runs))
    seconds = (last_close(closed) - started).total_seconds()
    return _batch("stead", runs, seconds, before, await _snapshot(env))


async def bare_batch(env: BenchEnv, runs: int, concurrency: int) -> Batch:
    tag = uuid.uuid4().hex[:8]
    before = await _snapshot(env)
    started = datetime.now(UTC)

    async def start(index: int) -> None:
        await env.raw.start_workflow(
            BareThreeSteps.run,
            BareInput(text=f"message {index}"),
            id=f"bare-{tag}-{index}",
            task_queue=BARE_QUEUE,
        )

    await bounded(runs, concurrency, start)
    query = f"WorkflowType = 'bare-three-steps' AND {since(started)}"
    closed = await wait_closed(env.raw, query, runs, within=max(120.0, runs))
    seconds = (last_close(closed) - started).total_seconds()
    return _batch("bare", runs, seconds, before, await _snapshot(env))


def cpu_table(batches: list[Batch]) -> Table:
    """CPU milliseconds per completed run by process, and database transactions per run."""
    names = sorted({name for b in batches for name in b.cpu})
    legs = {leg: [b for b in batches if b.leg == leg] for leg in ("bare", "stead")}
    runs = {leg: sum(b.runs for b in mine) or 1 for leg, mine in legs.items()}
    rows: list[list[Any]] = [
        [name, *(sum(b.cpu.get(name, 0.0) for b in legs[leg]) / runs[leg] * 1000 for leg in legs)]
        for name in names
    ]
    rows.append(
        [
            "all processes",
            *(sum(sum(b.cpu.values()) for b in legs[leg]) / runs[leg] * 1000 for leg in legs),
        ]
    )
    rows.append(
        [
            "PostgreSQL transactions per run",
            *(sum(b.pg_transactions for b in legs[leg]) / runs[leg] for leg in legs),
        ]
    )
    return Table("CPU per completed run, by process (ms)", ["process", "bare", "Stead"], rows)


def _result(sizes: Sizes, quick: bool, batches: list[Batch]) -> Result:
    bare = statistics.median(b.rate for b in batches if b.leg == "bare")
    stead = statistics.median(b.rate for b in batches if b.leg == "stead")
    share = ratio(stead, bare)
    per_batch = Table(
        "Batches (in order)",
        ["leg", "runs", "seconds", "runs/s"],
        [[b.leg, b.runs, b.seconds, b.rate] for b in batches],
    )
    return Result(
        name="throughput",
        title="Throughput: three-step pipeline, Stead (HTTP, full stack) vs bare Temporal",
        quick=quick,
        params=vars(sizes),
        comparisons=[
            Comparison(
                "completed runs/s (median), Stead / bare",
                "runs/s",
                stead,
                bare,
                share,
                f">= {TARGET}",
                at_least(share, TARGET),
            )
        ],
        tables=[per_batch, cpu_table(batches)],
        data={"batches": [vars(b) | {"rate": b.rate} for b in batches]},
        notes=[
            "Window: first start request to the last close time recorded by Temporal.",
            "Each Stead batch is one fresh tenant: all its runs share one audit chain and one"
            " set of budget counters, the contended case.",
            "Process `driver` is the load generator (HTTP client or Temporal client).",
        ],
    )


async def measure(env: BenchEnv, sizes: Sizes) -> list[Batch]:
    """Warm up both legs, then alternate bare and Stead batches."""
    batches: list[Batch] = []
    async with SteadApi.client(env.stack().api_url) as http:
        api = SteadApi(http)
        say(f"warm-up: {sizes.warmup} runs per leg")
        await bare_batch(env, sizes.warmup, sizes.concurrency)
        await stead_batch(env, api, sizes.warmup, sizes.concurrency)
        for rep in range(sizes.repeats):
            for leg in ("bare", "stead"):
                if leg == "bare":
                    batch = await bare_batch(env, sizes.runs, sizes.concurrency)
                else:
                    batch = await stead_batch(env, api, sizes.runs, sizes.concurrency)
                say(f"batch {rep + 1}/{sizes.repeats} {leg}: {batch.rate:.1f} runs/s")
                batches.append(batch)
    return batches


async def run(options: RunOptions) -> Result:
    sizes = SIZES[options.quick]
    async with bench_env(EnvSpec(stead=(SteadSpec(),)), options) as env:
        batches = await measure(env, sizes)
    return _result(sizes, options.quick, batches)
