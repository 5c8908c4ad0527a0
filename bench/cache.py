"""Response cache: the same question asked `calls` times, cache on against cache off.

The simulator answers after a realistic `latency_ms`, so a hit's saved round trip shows.

- Gateway (exact on/off): the API exposes no per-call opt-out (`ModelCall.cache` is set by
  each pipeline), so this leg runs the model gateway activity itself (`ModelActivities
  .call_model` under `ActivityEnvironment`, as tests/test_model_gateway.py does) with the
  worker's own wiring: real SDK, simulator, PostgreSQL as the `stead_app` role. Cache on: the
  same call `calls` times for a fresh tenant (the first misses). Cache off: `cache=False`.
- End to end (HTTP): `summarize` with `review: false` (cache on, as shipped), one run at a
  time, start request to result: the same text every time against a different text every
  time (a cache that never hits; the texts differ by a short suffix, so a few tokens).

Cost is what the usage ledger charged (a hit is free); latency is per call or per run.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from temporalio.testing import ActivityEnvironment

from bench.env import BenchEnv, EnvSpec, RunOptions, SteadSpec, Tenant, bench_env
from bench.load import SteadApi
from bench.report import Comparison, Result, Table, say
from bench.stats import ratio, summary_ms
from stead.calls import ModelCall
from stead.contract import RunContext
from stead.gateway.model import ModelActivities
from stead.policy.models import load_prices, load_routing
from stead.service.runs import workflow_id
from stead.store.audit import audit_writer
from stead.store.db import create_pool
from stead.worker import model_client

QUESTION = "What is our refund policy for duplicate charges? Answer in two sentences."


@dataclass(frozen=True)
class Sizes:
    calls: int
    latency_ms: float


SIZES = {False: Sizes(50, 300.0), True: Sizes(8, 300.0)}


@dataclass
class Leg:
    seconds: list[float] = field(default_factory=list)
    cost_nusd: int = 0
    hits: int = 0

    def figures(self) -> dict[str, Any]:
        return {"cost_nusd": self.cost_nusd, "hits": self.hits, **summary_ms(self.seconds)}


def gateway_call(tenant: Tenant, cache: bool) -> ModelCall:
    run_id = f"r_{uuid.uuid4().hex[:12]}"
    context = RunContext(
        tenant=tenant.id, run_id=run_id, pipeline="summarize", requested_by="requester"
    )
    return ModelCall(
        context=context,
        step="summarize",
        call_key=f"{tenant.id}:{run_id}:model:1",
        task="draft",
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=200,
        cache=cache,
    )


async def gateway_legs(env: BenchEnv, sizes: Sizes) -> dict[str, Leg]:
    url = env.settings.database_url
    assert url is not None
    pool = await create_pool(url.get_secret_value(), app_role="stead_app")
    client = model_client(env.settings)
    gateway = ModelActivities(
        pool, client, load_prices(), load_routing(), audit_writer(env.settings)
    )
    legs: dict[str, Leg] = {}
    try:
        for name, cache in (("on", True), ("off", False)):
            tenant, leg = await env.tenant(), Leg()
            for _ in range(sizes.calls):
                started = time.perf_counter()
                reply = await ActivityEnvironment().run(
                    gateway.call_model, gateway_call(tenant, cache)
                )
                leg.seconds.append(time.perf_counter() - started)
                leg.cost_nusd += reply.usage.cost_nusd
                leg.hits += reply.cache_hit
            legs[name] = leg
            say(f"gateway, cache {name}: {leg.hits} hits, {leg.cost_nusd} nUSD")
    finally:
        await client.close()
        await pool.close()
    return legs


async def http_leg(env: BenchEnv, api: SteadApi, sizes: Sizes, repeated: bool) -> Leg:
    tenant, leg = await env.tenant(), Leg()
    for index in range(sizes.calls):
        text = QUESTION if repeated else f"{QUESTION} ({index})"
        started = time.perf_counter()
        run_id = await api.start(tenant, "summarize", {"text": text, "review": False})
        await env.client.get_workflow_handle(workflow_id(tenant.id, run_id)).result()
        leg.seconds.append(time.perf_counter() - started)
    async with env.pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT coalesce(sum(cost_nusd), 0) AS cost, count(*) FILTER (WHERE cache_hit) AS hits"
            " FROM model_usage WHERE tenant_id = $1",
            tenant.id,
        )
    assert row is not None
    leg.cost_nusd, leg.hits = int(row["cost"]), int(row["hits"])
    say(f"HTTP, {'repeated' if repeated else 'never repeated'}: {leg.hits} hits")
    return leg


def _pair(measure: str, unit: str, on: float, off: float) -> Comparison:
    return Comparison(measure, unit, on, off, ratio(on, off))


def _result(sizes: Sizes, quick: bool, legs: dict[str, Leg]) -> Result:
    f = {name: leg.figures() for name, leg in legs.items()}
    usd = 1e-9
    comparisons = [
        _pair(
            "gateway: cost of the calls, cache on / off",
            "USD",
            f["on"]["cost_nusd"] * usd,
            f["off"]["cost_nusd"] * usd,
        ),
        _pair(
            "gateway: latency per call p50, cache on / off", "ms", f["on"]["p50"], f["off"]["p50"]
        ),
        _pair(
            "gateway: latency per call mean, cache on / off",
            "ms",
            f["on"]["mean"],
            f["off"]["mean"],
        ),
        _pair(
            "end to end: cost, repeated / never-repeated question",
            "USD",
            f["repeated"]["cost_nusd"] * usd,
            f["unique"]["cost_nusd"] * usd,
        ),
        _pair(
            "end to end: run latency p50, repeated / never-repeated",
            "ms",
            f["repeated"]["p50"],
            f["unique"]["p50"],
        ),
    ]
    rows = [
        [
            name,
            sizes.calls,
            fig["hits"],
            fig["cost_nusd"] * usd,
            fig["p50"],
            fig["p99"],
            fig["mean"],
        ]
        for name, fig in f.items()
    ]
    return Result(
        name="cache",
        title=f"Response cache: one question asked {sizes.calls} times, cache on vs off",
        quick=quick,
        params=vars(sizes),
        comparisons=comparisons,
        tables=[
            Table("Legs", ["leg", "calls", "hits", "cost USD", "p50 ms", "p99 ms", "mean ms"], rows)
        ],
        data=f,
        notes=[
            "Gateway legs call the activity directly: the API offers no per-call cache opt-out.",
            "End-to-end legs go through HTTP, Temporal and the worker; a hit still pays the"
            " run's workflow, audit and ledger work, so the saved share is smaller than the"
            " gateway's.",
        ],
    )


async def run(options: RunOptions) -> Result:
    sizes = SIZES[options.quick]
    async with bench_env(EnvSpec(stead=(SteadSpec(),), bare=False), options) as env:
        await env.sim_latency(sizes.latency_ms)
        legs = await gateway_legs(env, sizes)
        async with SteadApi.client(env.stack().api_url, connections=2) as http:
            api = SteadApi(http)
            legs["repeated"] = await http_leg(env, api, sizes, repeated=True)
            legs["unique"] = await http_leg(env, api, sizes, repeated=False)
    return _result(sizes, options.quick, legs)
