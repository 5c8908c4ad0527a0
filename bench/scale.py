"""Scale: many runs parked at an approval on one worker, then a mass approval.

Both legs park `parked` runs on the same server, bare first, then Stead, and only then are
both drained, so each leg's memory is read against a quiet baseline:
- Stead: `summarize` with `review: true` started over HTTP (one model step, then the review
  approval); parked when the approval is in PostgreSQL and the workflow has nothing in flight;
- bare: `bare-approval` (one no-op activity, then waits for a signal).

Memory: resident set size (psutil) of each worker process and of the Temporal server, before
parking (after a warm-up) and once everything is parked; the peak over the whole benchmark is
sampled every second. Each worker runs at its defaults: Stead's keeps 500 runs in its workflow
cache (`STEAD_WORKER_WORKFLOW_CACHE`), the bare one the SDK's 1,000; beyond that runs are
evicted and a decision replays their history.

Drain: every parked run is approved at once with at most `concurrency` decisions in flight
(Stead: `POST /v1/approvals/{id}/decision` over HTTP, which waits for the update; bare: a
signal), timed from the first decision to the last close time Temporal recorded. The ratio is
Stead's drain rate over bare's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

from temporalio.client import WorkflowHandle

from bench.bare import BareApproval, BareDecision, BareInput
from bench.env import BARE_QUEUE, BenchEnv, EnvSpec, RunOptions, SteadSpec, Tenant, bench_env
from bench.latency import settled
from bench.load import BenchError, SteadApi, bounded, last_close, since, wait_closed
from bench.report import Comparison, Result, Table, at_most, say
from bench.stats import ratio
from stead.service.runs import workflow_id

WORKER_TARGET_MIB = 300


@dataclass(frozen=True)
class Sizes:
    parked: int
    concurrency: int
    warmup: int


SIZES = {False: Sizes(10_000, 20, 20), True: Sizes(100, 10, 5)}
PROCESSES = ("stead-worker", "bare-worker", "temporal")


@dataclass
class Memory:
    """RSS in MiB by process at named moments, and the peak seen by the watcher."""

    at: dict[str, dict[str, float]] = field(default_factory=dict)
    peak: dict[str, float] = field(default_factory=dict)

    def read(self, env: BenchEnv, moment: str) -> None:
        self.at[moment] = {name: env.rss_mib(name) for name in PROCESSES}
        say(
            f"memory {moment}: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in self.at[moment].items())
        )

    def sample(self, env: BenchEnv) -> None:
        for name in PROCESSES:
            self.peak[name] = max(self.peak.get(name, 0.0), env.rss_mib(name))


@contextlib.asynccontextmanager
async def watching(env: BenchEnv, memory: Memory) -> AsyncIterator[None]:
    async def watch() -> None:
        while True:
            memory.sample(env)
            await asyncio.sleep(1)

    task = asyncio.create_task(watch())
    try:
        yield
    finally:
        task.cancel()


async def park_bare(
    env: BenchEnv, sizes: Sizes, count: int
) -> list[WorkflowHandle[BareApproval, object]]:
    tag = time.time_ns()

    async def start(index: int) -> WorkflowHandle[BareApproval, object]:
        return await env.raw.start_workflow(
            BareApproval.run,
            BareInput(text=f"text {index}"),
            id=f"bare-park-{tag}-{index}",
            task_queue=BARE_QUEUE,
        )

    handles = await bounded(count, sizes.concurrency, start)
    await bounded(count, sizes.concurrency, lambda i: settled(handles[i], within=600))
    return handles


async def park_stead(
    env: BenchEnv, api: SteadApi, tenant: Tenant, sizes: Sizes, count: int
) -> list[str]:
    """Start `count` reviewed summaries; return their approval ids once all are parked."""

    async def start(index: int) -> str:
        text = f"Revenue grew {index % 97}% in Q3 for {tenant.id} ({index}). Costs fell 3%."
        return await api.start(tenant, "summarize", {"text": text, "review": True})

    run_ids = await bounded(count, sizes.concurrency, start)
    query = "FROM approvals WHERE tenant_id = $1 AND status = 'pending'"
    deadline = time.monotonic() + max(600.0, count)
    async with env.pool.acquire() as conn:
        while (pending := await conn.fetchval(f"SELECT count(*) {query}", tenant.id)) < count:
            if time.monotonic() > deadline:
                raise BenchError(f"only {pending}/{count} runs reached their review")
            await asyncio.sleep(0.5)
        rows = [str(r["id"]) for r in await conn.fetch(f"SELECT id {query}", tenant.id)]
    handles = [env.client.get_workflow_handle(workflow_id(tenant.id, r)) for r in run_ids]
    await bounded(count, sizes.concurrency, lambda i: settled(handles[i], within=600))
    return rows


async def drain_bare(
    env: BenchEnv,
    sizes: Sizes,
    handles: list[WorkflowHandle[BareApproval, object]],
    since_: datetime,
) -> float:
    started = datetime.now(UTC)
    decision = BareDecision(approve=True)
    await bounded(
        len(handles), sizes.concurrency, lambda i: handles[i].signal(BareApproval.decide, decision)
    )
    query = f"WorkflowType = 'bare-approval' AND {since(since_)}"
    closed = await wait_closed(env.raw, query, len(handles), within=max(600.0, len(handles)))
    return (last_close(closed) - started).total_seconds()


async def drain_stead(
    env: BenchEnv, api: SteadApi, tenant: Tenant, sizes: Sizes, approvals: list[str]
) -> float:
    started = datetime.now(UTC)
    await bounded(len(approvals), sizes.concurrency, lambda i: api.decide(tenant, approvals[i]))
    query = f"WorkflowType = 'summarize' AND CustomerId = '{tenant.id}'"
    closed = await wait_closed(env.client, query, len(approvals), within=max(600.0, len(approvals)))
    return (last_close(closed) - started).total_seconds()


@dataclass
class Outcome:
    memory: Memory
    seconds: dict[str, float] = field(default_factory=dict)


async def _warm_up(env: BenchEnv, api: SteadApi, sizes: Sizes) -> None:
    say(f"warm-up: {sizes.warmup} parked and approved per leg")
    since_ = datetime.now(UTC)
    await drain_bare(env, sizes, await park_bare(env, sizes, sizes.warmup), since_)
    tenant = await env.tenant()
    await drain_stead(
        env, api, tenant, sizes, await park_stead(env, api, tenant, sizes, sizes.warmup)
    )


async def measure(env: BenchEnv, sizes: Sizes) -> Outcome:
    outcome = Outcome(Memory())
    memory, seconds = outcome.memory, outcome.seconds
    async with watching(env, memory), SteadApi.client(env.stack().api_url) as http:
        api = SteadApi(http)
        await _warm_up(env, api, sizes)
        await asyncio.sleep(2)
        memory.read(env, "before")
        bare_since, started = datetime.now(UTC), time.monotonic()
        handles = await park_bare(env, sizes, sizes.parked)
        seconds["park bare"] = time.monotonic() - started
        await asyncio.sleep(2)
        memory.read(env, "bare parked")
        tenant, started = await env.tenant(), time.monotonic()
        approvals = await park_stead(env, api, tenant, sizes, sizes.parked)
        seconds["park Stead"] = time.monotonic() - started
        await asyncio.sleep(2)
        memory.read(env, "all parked")
        seconds["drain bare"] = await drain_bare(env, sizes, handles, bare_since)
        say(f"bare drained in {seconds['drain bare']:.1f} s")
        seconds["drain Stead"] = await drain_stead(env, api, tenant, sizes, approvals)
        say(f"Stead drained in {seconds['drain Stead']:.1f} s")
        memory.read(env, "drained")
    return outcome


def _comparisons(sizes: Sizes, outcome: Outcome) -> list[Comparison]:
    at, n = outcome.memory.at, sizes.parked
    stead_rss = at["all parked"]["stead-worker"]
    bare_rss = at["all parked"]["bare-worker"]
    stead_kib = (stead_rss - at["before"]["stead-worker"]) * 1024 / n
    bare_kib = (bare_rss - at["before"]["bare-worker"]) * 1024 / n
    server_stead = (at["all parked"]["temporal"] - at["bare parked"]["temporal"]) * 1024 / n
    server_bare = (at["bare parked"]["temporal"] - at["before"]["temporal"]) * 1024 / n
    stead_rate = n / outcome.seconds["drain Stead"]
    bare_rate = n / outcome.seconds["drain bare"]
    return [
        Comparison(
            f"worker RSS with {n} parked, Stead vs bare",
            "MiB",
            stead_rss,
            bare_rss,
            ratio(stead_rss, bare_rss),
            f"Stead <= {WORKER_TARGET_MIB} MiB",
            at_most(stead_rss, WORKER_TARGET_MIB),
        ),
        Comparison(
            "worker RSS growth per parked run",
            "KiB",
            stead_kib,
            bare_kib,
            ratio(stead_kib, bare_kib),
        ),
        Comparison(
            "server RSS growth per parked run",
            "KiB",
            server_stead,
            server_bare,
            ratio(server_stead, server_bare),
        ),
        Comparison(
            "drain after mass approval, Stead / bare",
            "runs/s",
            stead_rate,
            bare_rate,
            ratio(stead_rate, bare_rate),
        ),
    ]


def _result(sizes: Sizes, quick: bool, outcome: Outcome) -> Result:
    memory = outcome.memory
    moments = list(memory.at)
    rows = [
        [name, *(memory.at[m][name] for m in moments), memory.peak.get(name)] for name in PROCESSES
    ]
    timing = [[what, secs, sizes.parked / secs] for what, secs in outcome.seconds.items()]
    return Result(
        name="scale",
        title=f"Scale: {sizes.parked} runs parked at approval on one worker, then a mass approval",
        quick=quick,
        params=vars(sizes),
        comparisons=_comparisons(sizes, outcome),
        tables=[
            Table("Resident memory (MiB)", ["process", *moments, "peak"], rows),
            Table("Parking and draining", ["phase", "seconds", "runs/s"], timing),
        ],
        data={"memory": memory.at, "peak_mib": memory.peak, "seconds": outcome.seconds},
        notes=[
            "Server growth for Stead is read after the bare runs were parked (both stay"
            " parked until the drains), so it is not inflated by the bare leg.",
            "Workflow caches at their defaults: Stead 500 runs (STEAD_WORKER_WORKFLOW_CACHE),"
            " bare 1,000 (the SDK's). Beyond it, memory per parked run is mostly the server's,"
            " and a decision replays the run's history.",
            "Go returns memory to the OS lazily: the server's RSS after draining is not a leak.",
        ],
    )


async def run(options: RunOptions) -> Result:
    sizes = SIZES[options.quick]
    async with bench_env(EnvSpec(stead=(SteadSpec(),)), options) as env:
        outcome = await measure(env, sizes)
    return _result(sizes, options.quick, outcome)
