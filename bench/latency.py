"""Latency, one run at a time on an otherwise idle platform, Stead against bare Temporal.

Samples alternate between the legs (bare, Stead, bare, ...) after a warm-up, so noise on the
machine lands on both. Each sample waits for its run to finish before the next one starts.

- start → accepted: Stead's `POST /v1/runs` (`triage`; HTTP, API key, permission check,
  approval policies from PostgreSQL, `start_workflow` with search attributes and memo) until
  its 201, against `client.start_workflow` of `bare-three-steps` until it returns.
- idle run end to end: the same start until the run's result is known to the client
  (`handle.result()`): three model steps through the gateway against three no-op activities.
- approval round trip: with a `summarize` run parked at its review (approval published, no
  workflow task or activity pending), `POST /v1/approvals/{id}/decision` until the run's result
  is known, against a signal to a parked `bare-approval` workflow until its result. The
  decision is an update whose validator checks the decider, so the API's answer itself waits
  for the worker; the time to that answer is reported too. For reference, the same round trip
  with a bare *update* (`bare-update`), Stead's mechanism without Stead.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from temporalio.client import WorkflowHandle

from bench.bare import BareApproval, BareDecision, BareInput, BareThreeSteps
from bench.env import BARE_QUEUE, BenchEnv, EnvSpec, RunOptions, SteadSpec, Tenant, bench_env
from bench.load import BenchError, SteadApi
from bench.report import Comparison, Result, Table, at_most, say
from bench.stats import ratio, summary_ms
from bench.throughput import triage_input
from stead.service.runs import workflow_id


@dataclass(frozen=True)
class Sizes:
    samples: int
    warmup: int


SIZES = {False: Sizes(200, 10), True: Sizes(20, 3)}


@dataclass
class Samples:
    """Seconds per sample, by measure and leg."""

    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, seconds: float) -> None:
        self.values.setdefault(key, []).append(seconds)


async def settled(handle: WorkflowHandle[Any, Any], within: float = 30) -> None:
    """Wait until the workflow has nothing in flight: no workflow task, no activity."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        raw = (await handle.describe()).raw_description
        if not raw.HasField("pending_workflow_task") and not raw.pending_activities:
            return
        await asyncio.sleep(0.02)
    raise BenchError(f"{handle.id} did not settle in {within:.0f}s")


async def pending_approval(env: BenchEnv, tenant: Tenant, run_id: str, within: float = 30) -> str:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        async with env.pool.acquire() as conn:
            found = await conn.fetchval(
                "SELECT id FROM approvals WHERE tenant_id = $1 AND run_id = $2"
                " AND status = 'pending'",
                tenant.id,
                run_id,
            )
        if found:
            return str(found)
        await asyncio.sleep(0.02)
    raise BenchError(f"run {run_id} did not reach its review in {within:.0f}s")


async def bare_run(env: BenchEnv, index: int, out: Samples) -> None:
    started = time.perf_counter()
    handle = await env.raw.start_workflow(
        BareThreeSteps.run,
        BareInput(text=f"message {index}"),
        id=f"bare-latency-{index}-{time.time_ns()}",
        task_queue=BARE_QUEUE,
    )
    out.add("bare:start", time.perf_counter() - started)
    await handle.result()
    out.add("bare:idle", time.perf_counter() - started)


async def stead_run(env: BenchEnv, api: SteadApi, tenant: Tenant, index: int, out: Samples) -> None:
    started = time.perf_counter()
    run_id = await api.start(tenant, "triage", triage_input(tenant.id, index))
    out.add("stead:start", time.perf_counter() - started)
    await env.client.get_workflow_handle(workflow_id(tenant.id, run_id)).result()
    out.add("stead:idle", time.perf_counter() - started)


async def bare_approval(env: BenchEnv, index: int, out: Samples, *, update: bool) -> None:
    leg = "bare-update" if update else "bare"
    handle = await env.raw.start_workflow(
        BareApproval.run,
        BareInput(text=f"text {index}"),
        id=f"{leg}-approval-{index}-{time.time_ns()}",
        task_queue=BARE_QUEUE,
    )
    await settled(handle)
    decision = BareDecision(approve=True)
    started = time.perf_counter()
    if update:
        await handle.execute_update(BareApproval.confirm, decision)
    else:
        await handle.signal(BareApproval.decide, decision)
    out.add(f"{leg}:decided", time.perf_counter() - started)
    await handle.result()
    out.add(f"{leg}:approval", time.perf_counter() - started)


async def stead_approval(
    env: BenchEnv, api: SteadApi, tenant: Tenant, index: int, out: Samples
) -> None:
    text = f"Revenue grew {index}% in Q3 for {tenant.id}. Costs fell 3%."
    run_id = await api.start(tenant, "summarize", {"text": text, "review": True})
    handle = env.client.get_workflow_handle(workflow_id(tenant.id, run_id))
    approval_id = await pending_approval(env, tenant, run_id)
    await settled(handle)
    started = time.perf_counter()
    await api.decide(tenant, approval_id)
    out.add("stead:decided", time.perf_counter() - started)
    await handle.result()
    out.add("stead:approval", time.perf_counter() - started)


async def measure(env: BenchEnv, sizes: Sizes) -> Samples:
    tenant = await env.tenant()
    warm, kept = Samples(), Samples()
    async with SteadApi.client(env.stack().api_url, connections=4) as http:
        api = SteadApi(http)
        for index in range(sizes.warmup + sizes.samples):
            out = warm if index < sizes.warmup else kept
            await bare_run(env, index, out)
            await stead_run(env, api, tenant, index, out)
            await bare_approval(env, index, out, update=False)
            await stead_approval(env, api, tenant, index, out)
            await bare_approval(env, index, out, update=True)
            if (index + 1) % 50 == 0:
                say(f"{index + 1}/{sizes.warmup + sizes.samples} samples")
    return kept


def _comparison(
    samples: Samples, measure: str, key: str, pct: str, target: float | None, base: str = "bare"
) -> Comparison:
    stead = summary_ms(samples.values[f"stead:{key}"])[pct]
    bare = summary_ms(samples.values[f"{base}:{key}"])[pct]
    share = ratio(stead, bare)
    return Comparison(
        f"{measure} {pct}, Stead / {base}",
        "ms",
        stead,
        bare,
        share,
        f"<= {target}" if target is not None else "",
        at_most(share, target) if target is not None else None,
    )


def _comparisons(samples: Samples) -> list[Comparison]:
    decision = "approval decision → run completed"
    return [
        _comparison(samples, "start → accepted", "start", "p99", 1.5),
        _comparison(samples, "start → accepted", "start", "p50", None),
        _comparison(samples, decision, "approval", "p50", 1.5),
        _comparison(samples, decision, "approval", "p50", None, base="bare-update"),
        _comparison(samples, "idle run end to end", "idle", "p50", 1.3),
        _comparison(samples, "idle run end to end", "idle", "p99", None),
    ]


def _result(sizes: Sizes, quick: bool, samples: Samples) -> Result:
    summaries = {key: summary_ms(values) for key, values in samples.values.items()}
    rows = [
        [key, s["n"], s["p50"], s["p90"], s["p99"], s["mean"], s["max"]]
        for key, s in sorted(summaries.items())
    ]
    return Result(
        name="latency",
        title="Latency: start, idle run, approval round trip; Stead (HTTP) vs bare Temporal",
        quick=quick,
        params=vars(sizes),
        comparisons=_comparisons(samples),
        tables=[
            Table(
                "All measures (ms)",
                ["leg:measure", "n", "p50", "p90", "p99", "mean", "max"],
                rows,
            )
        ],
        data={"summaries": summaries, "samples_s": samples.values},
        notes=[
            "`start`: request sent → run accepted (Stead: HTTP 201; bare: start_workflow).",
            "`idle`: start request → result known to the client; triage vs three no-op activities.",
            "`decided`: decision sent → accepted (Stead: the HTTP answer, which waits for the"
            " update to run in the worker; bare: the signal RPC).",
            "`approval`: decision sent → the run's result known to the client.",
            "`bare-update`: the bare approval decided with an update instead of a signal, the"
            " mechanism Stead's decisions use; shown for reference, without a target.",
        ],
    )


async def run(options: RunOptions) -> Result:
    sizes = SIZES[options.quick]
    async with bench_env(EnvSpec(stead=(SteadSpec(),)), options) as env:
        samples = await measure(env, sizes)
    return _result(sizes, options.quick, samples)
