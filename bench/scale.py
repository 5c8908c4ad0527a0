"""Scale: many runs parked at an approval on one worker, then a mass approval.

Both legs park `parked` runs on the same server, one leg after the other, and only then are
both drained, so each leg's memory is read against a quiet baseline. The server's heap grows
in steps and keeps what it grew, so the leg parked second is measured on a heap the first one
already grew: the benchmark runs twice, each time in a fresh environment, once with the bare
leg first and once with Stead first, and reports each leg's growth in both orders.
- Stead: `summarize` with `review: true` started over HTTP (one model step, then the review
  approval); parked when the approval is in PostgreSQL and the workflow has nothing in flight;
- bare: `bare-approval` (one no-op activity, then waits for a signal).

Memory: resident set size (psutil) of each worker process and of the Temporal server, before
parking (after a warm-up), after each leg's parking and once everything is drained; the peak
over each environment is sampled every second. Each worker runs at its defaults: Stead's
keeps 500 runs in its workflow cache (`STEAD_WORKER_WORKFLOW_CACHE`), the bare one the SDK's
1,000; beyond that runs are evicted and a decision replays their history.

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
from dataclasses import dataclass, field, replace
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
BARE, STEAD = "bare", "Stead"
ORDERS = ((BARE, STEAD), (STEAD, BARE))


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
    order: tuple[str, str]  # the legs in the order they were parked
    memory: Memory
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.order[0]} first"


async def _warm_up(env: BenchEnv, api: SteadApi, sizes: Sizes) -> None:
    say(f"warm-up: {sizes.warmup} parked and approved per leg")
    since_ = datetime.now(UTC)
    await drain_bare(env, sizes, await park_bare(env, sizes, sizes.warmup), since_)
    tenant = await env.tenant()
    await drain_stead(
        env, api, tenant, sizes, await park_stead(env, api, tenant, sizes, sizes.warmup)
    )


async def measure(env: BenchEnv, sizes: Sizes, order: tuple[str, str]) -> Outcome:
    outcome = Outcome(order, Memory())
    memory, seconds = outcome.memory, outcome.seconds
    async with watching(env, memory), SteadApi.client(env.stack().api_url) as http:
        api = SteadApi(http)
        await _warm_up(env, api, sizes)
        await asyncio.sleep(2)
        memory.read(env, "before")
        bare_since = datetime.now(UTC)
        tenant = await env.tenant()
        handles: list[WorkflowHandle[BareApproval, object]] = []
        approvals: list[str] = []
        for leg in order:
            started = time.monotonic()
            if leg == BARE:
                handles = await park_bare(env, sizes, sizes.parked)
            else:
                approvals = await park_stead(env, api, tenant, sizes, sizes.parked)
            seconds[f"park {leg}"] = time.monotonic() - started
            await asyncio.sleep(2)
            memory.read(env, f"{leg} parked")
        for leg in order:
            if leg == BARE:
                seconds[f"drain {leg}"] = await drain_bare(env, sizes, handles, bare_since)
            else:
                seconds[f"drain {leg}"] = await drain_stead(env, api, tenant, sizes, approvals)
            say(f"{leg} drained in {seconds[f'drain {leg}']:.1f} s")
        memory.read(env, "drained")
    return outcome


def _growth_kib(outcome: Outcome, leg: str, process: str, parked: int) -> float:
    """RSS growth of `process` while `leg` was parking, per parked run."""
    at = outcome.memory.at
    before = "before" if outcome.order[0] == leg else f"{outcome.order[0]} parked"
    return (at[f"{leg} parked"][process] - at[before][process]) * 1024 / parked


def _comparisons(sizes: Sizes, outcome: Outcome) -> list[Comparison]:
    at, n, label = outcome.memory.at, sizes.parked, outcome.label
    parked = at[f"{outcome.order[1]} parked"]  # everything parked
    stead_rss, bare_rss = parked["stead-worker"], parked["bare-worker"]
    stead_kib = _growth_kib(outcome, STEAD, "stead-worker", n)
    bare_kib = _growth_kib(outcome, BARE, "bare-worker", n)
    server_stead = _growth_kib(outcome, STEAD, "temporal", n)
    server_bare = _growth_kib(outcome, BARE, "temporal", n)
    stead_rate = n / outcome.seconds[f"drain {STEAD}"]
    bare_rate = n / outcome.seconds[f"drain {BARE}"]
    return [
        Comparison(
            f"worker RSS with {n} parked, Stead vs bare ({label})",
            "MiB",
            stead_rss,
            bare_rss,
            ratio(stead_rss, bare_rss),
            f"Stead <= {WORKER_TARGET_MIB} MiB",
            at_most(stead_rss, WORKER_TARGET_MIB),
        ),
        Comparison(
            f"worker RSS growth per parked run ({label})",
            "KiB",
            stead_kib,
            bare_kib,
            ratio(stead_kib, bare_kib),
        ),
        Comparison(
            f"server RSS growth per parked run ({label})",
            "KiB",
            server_stead,
            server_bare,
            ratio(server_stead, server_bare),
        ),
        Comparison(
            f"drain after mass approval, Stead / bare ({label})",
            "runs/s",
            stead_rate,
            bare_rate,
            ratio(stead_rate, bare_rate),
        ),
    ]


def _tables(sizes: Sizes, outcome: Outcome) -> list[Table]:
    memory = outcome.memory
    moments = list(memory.at)
    rows = [
        [name, *(memory.at[m][name] for m in moments), memory.peak.get(name)] for name in PROCESSES
    ]
    timing = [[what, secs, sizes.parked / secs] for what, secs in outcome.seconds.items()]
    return [
        Table(f"Resident memory (MiB), {outcome.label}", ["process", *moments, "peak"], rows),
        Table(f"Parking and draining, {outcome.label}", ["phase", "seconds", "runs/s"], timing),
    ]


def _result(sizes: Sizes, quick: bool, outcomes: list[Outcome]) -> Result:
    return Result(
        name="scale",
        title=f"Scale: {sizes.parked} runs parked at approval on one worker, then a mass approval",
        quick=quick,
        params=vars(sizes) | {"orders": [o.label for o in outcomes]},
        comparisons=[c for o in outcomes for c in _comparisons(sizes, o)],
        tables=[table for o in outcomes for table in _tables(sizes, o)],
        data={
            o.label: {"memory": o.memory.at, "peak_mib": o.memory.peak, "seconds": o.seconds}
            for o in outcomes
        },
        notes=[
            "Each order is its own environment (fresh server, workers and database). A leg's"
            " growth is read across its own parking only; both stay parked until the drains.",
            "Workflow caches at their defaults: Stead 500 runs (STEAD_WORKER_WORKFLOW_CACHE),"
            " bare 1,000 (the SDK's). Beyond it, memory per parked run is mostly the server's,"
            " and a decision replays the run's history.",
            "Go returns memory to the OS lazily and grows its heap in steps: the server's growth"
            " depends on what came before (hence both orders), and its RSS after draining is"
            " not a leak.",
        ],
    )


async def run(options: RunOptions) -> Result:
    sizes = SIZES[options.quick]
    if options.parked:
        sizes = replace(sizes, parked=options.parked)
    outcomes = []
    for order in ORDERS:
        say(f"order: {' then '.join(order)}")
        async with bench_env(EnvSpec(stead=(SteadSpec(),)), options) as env:
            outcomes.append(await measure(env, sizes, order))
    return _result(sizes, options.quick, outcomes)
