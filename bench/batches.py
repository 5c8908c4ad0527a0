"""Deferred model calls (Message Batches): cost per run against direct calls, and throughput.

One worker and API whose routing makes the batcher quick (`max_age_seconds` 2, `poll_seconds`
1; shipped: 30 and 30), on a simulator that processes a batch `batch_delay_seconds` after it
is created (upstream: minutes to hours). `summarize` runs with `review: false`:

- Cost: `cost_runs` runs started with `"defer": true` against the same texts started
  directly, each leg its own tenant (the response cache never answers); cost per run is what
  the usage ledger charged.
- Throughput: `runs` deferred runs started over HTTP (at most 20 starts in flight), first
  start to last close, against the same number of direct runs; the batches the simulator saw
  (how many runs shared each) are counted.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.env import SIM_HEADERS, BenchEnv, EnvSpec, RunOptions, SteadSpec, bench_env
from bench.load import SteadApi, bounded, last_close, wait_closed
from bench.report import Comparison, Result, Table, at_most, say
from bench.stats import ratio

BATCHES = {"max_requests": 500, "max_age_seconds": 2, "poll_seconds": 1, "deadline_seconds": 3600}
CONCURRENCY = 20


@dataclass(frozen=True)
class Sizes:
    cost_runs: int
    runs: int
    batch_delay_seconds: float


SIZES = {False: Sizes(20, 1000, 5.0), True: Sizes(5, 60, 2.0)}


def policy(directory: Path) -> str:
    (directory / "routing.yaml").write_text(yaml.safe_dump({"batches": BATCHES}))
    return str(directory)


async def sim(env: BenchEnv, method: str, path: str, body: Any = None) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=env.sim_url, headers=SIM_HEADERS) as http:
        response = await http.request(method, path, json=body)
        response.raise_for_status()
        found: dict[str, Any] = response.json()
        return found


def text(index: int) -> str:
    return f"Report {index}: revenue grew {index % 17}% while costs fell; the board approved it."


async def leg(env: BenchEnv, api: SteadApi, runs: int, defer: bool) -> dict[str, Any]:
    tenant = await env.tenant()
    before = await sim(env, "GET", "/_sim/stats")
    started = datetime.now(UTC)
    payload = {"review": False}
    await bounded(
        runs,
        CONCURRENCY,
        lambda i: api.start(tenant, "summarize", {"text": text(i), **payload}, defer=defer),
    )
    query = f"WorkflowType = 'summarize' AND CustomerId = '{tenant.id}'"
    closed = await wait_closed(env.client, query, runs, within=max(300.0, runs * 1.5))
    seconds = (last_close(closed) - started).total_seconds()
    after = await sim(env, "GET", "/_sim/stats")
    async with env.pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT count(*) AS calls, coalesce(sum(cost_nusd), 0) AS cost,"
            " count(*) FILTER (WHERE batch) AS batched FROM model_usage WHERE tenant_id = $1",
            tenant.id,
        )
    assert row is not None
    batches = after["batches_created"] - before["batches_created"]
    figures = {
        "runs": runs,
        "seconds": seconds,
        "runs_per_second": runs / seconds,
        "calls": int(row["calls"]),
        "batched_calls": int(row["batched"]),
        "cost_nusd": int(row["cost"]),
        "cost_per_run_nusd": int(row["cost"]) / runs,
        "batches": batches,
        "runs_per_batch": runs / batches if batches else 0.0,
    }
    say(f"{'deferred' if defer else 'direct'} x{runs}: {seconds:.1f} s, {batches} batches")
    return figures


def _result(sizes: Sizes, quick: bool, legs: dict[str, dict[str, Any]]) -> Result:
    cost_deferred = legs["cost, deferred"]["cost_per_run_nusd"]
    cost_direct = legs["cost, direct"]["cost_per_run_nusd"]
    cost_ratio = ratio(cost_deferred, cost_direct)
    fast, slow = legs["throughput, deferred"], legs["throughput, direct"]
    keys = ["runs", "seconds", "runs_per_second", "calls", "batched_calls", "cost_per_run_nusd"]
    rows = [
        [name, *(f[k] for k in keys), f["batches"], f["runs_per_batch"]] for name, f in legs.items()
    ]
    return Result(
        name="batches",
        title=f"Deferred model calls: cost per run, and {sizes.runs} deferred runs' throughput",
        quick=quick,
        params={**vars(sizes), **BATCHES, "concurrency": CONCURRENCY},
        comparisons=[
            Comparison(
                "cost per summarize run, deferred / direct",
                "USD",
                cost_deferred * 1e-9,
                cost_direct * 1e-9,
                cost_ratio,
                "<= 0.5",
                at_most(cost_ratio, 0.5 + 1e-9),
            ),
            Comparison(
                f"{sizes.runs} runs, first start to last close, deferred / direct",
                "runs/s",
                fast["runs_per_second"],
                slow["runs_per_second"],
                ratio(fast["runs_per_second"], slow["runs_per_second"]),
            ),
        ],
        tables=[
            Table(
                "Legs",
                ["leg", *keys, "batches", "runs per batch"],
                rows,
            )
        ],
        data=legs,
        notes=[
            f"The simulator processes a batch {sizes.batch_delay_seconds:g} s after it is"
            " created; upstream takes minutes to hours, so deferred throughput here is bounded"
            " by the batcher's timers and that delay, not by the provider.",
            "Deferred runs cost each model call at the batch rates (half of input and output);"
            " a run's non-model work is the same either way.",
        ],
    )


async def run(options: RunOptions) -> Result:
    sizes = SIZES[options.quick]
    with tempfile.TemporaryDirectory(prefix="bench-batches-") as policies:
        spec = SteadSpec(settings={"STEAD_POLICY_PATH": policy(Path(policies))})
        async with bench_env(EnvSpec(stead=(spec,), bare=False), options) as env:
            await sim(
                env, "POST", "/_sim/config", {"batch_delay_seconds": sizes.batch_delay_seconds}
            )
            async with SteadApi.client(env.stack().api_url, connections=CONCURRENCY) as http:
                api = SteadApi(http)
                legs = {
                    "cost, direct": await leg(env, api, sizes.cost_runs, defer=False),
                    "cost, deferred": await leg(env, api, sizes.cost_runs, defer=True),
                    "throughput, direct": await leg(env, api, sizes.runs, defer=False),
                    "throughput, deferred": await leg(env, api, sizes.runs, defer=True),
                }
    return _result(sizes, options.quick, legs)
