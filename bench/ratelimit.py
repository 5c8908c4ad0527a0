"""The cost of request limits on the start path: `POST /v1/runs` with and without them.

Stead stacks (worker and API) on one Temporal server and one PostgreSQL, alike but for
`STEAD_LIMITS_FILE`:
- `limited`: the shipped policy (policies/limits.yaml): the start's one read also charges the
  key's and the tenant's buckets and counts the tenant's runs waiting for approval;
- `unlimited`: a policy that limits nothing, so starts take the path without the limiter
  (the plain plan-and-overrides read, as before limits existed); twice, in separate
  processes, so the difference between two identical stacks is measured too.

Measures, samples alternating between legs after a warm-up:
- start → accepted, one at a time, each run finished before the next start (as in the
  latency benchmark), the legs' order rotating: `triage` on either stack, and on the limited
  stack for a tenant with `backlog` runs parked at review (the cap's count reads them all);
- the same start statement alone, from this process (no HTTP, no Temporal): the plain read
  against the read with the limiter, for a tenant with no backlog and for the one with;
- bursts: `burst` starts from one key with `concurrency` in flight on each stack, so starts
  of one tenant contend for its bucket rows.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.env import BenchEnv, EnvSpec, RunOptions, SteadSpec, Tenant, bench_env
from bench.latency import Samples, pending_approval
from bench.load import SteadApi, bounded
from bench.report import Comparison, Result, Table, say
from bench.stats import ratio, summary_ms
from bench.throughput import triage_input
from stead.policy.limits import LIMITS_FILE, LimitPolicy, load_limits
from stead.service.runs import workflow_id
from stead.store import approvals as approvals_store
from stead.store import ratelimits


@dataclass(frozen=True)
class Sizes:
    samples: int
    warmup: int
    backlog: int
    statements: int
    burst: int
    concurrency: int
    repeats: int


SIZES = {False: Sizes(200, 10, 500, 2000, 100, 20, 4), True: Sizes(20, 3, 20, 200, 20, 10, 2)}


def _specs(unlimited_file: Path) -> tuple[SteadSpec, ...]:
    return (
        SteadSpec("limited", "stead", {"STEAD_LIMITS_FILE": str(LIMITS_FILE)}),
        SteadSpec("unlimited", "stead-unlimited", {"STEAD_LIMITS_FILE": str(unlimited_file)}),
        # The same as `unlimited`, in processes of its own: the noise between two stacks.
        SteadSpec("unlimited-b", "stead-unlimited-b", {"STEAD_LIMITS_FILE": str(unlimited_file)}),
    )


async def _park(env: BenchEnv, tenant: Tenant, count: int, concurrency: int) -> None:
    """`count` summarize runs of `tenant` waiting at review, started without limits."""
    async with SteadApi.client(env.stack("unlimited").api_url) as http:
        api = SteadApi(http)

        async def one(index: int) -> None:
            text = f"Backlog item {index} for {tenant.id}. Revenue grew."
            run_id = await api.start(tenant, "summarize", {"text": text, "review": True})
            await pending_approval(env, tenant, run_id, within=120)

        await bounded(count, concurrency, one)


async def _timed_start(
    env: BenchEnv, api: SteadApi, tenant: Tenant, index: int, leg: str, out: Samples
) -> None:
    started = time.perf_counter()
    run_id = await api.start(tenant, "triage", triage_input(tenant.id, index))
    out.add(leg, time.perf_counter() - started)
    await env.client.get_workflow_handle(workflow_id(tenant.id, run_id)).result()


async def _sequential(env: BenchEnv, sizes: Sizes, backlog: Tenant) -> Samples:
    warm, kept = Samples(), Samples()
    async with contextlib.AsyncExitStack() as stack:
        apis = {
            name: SteadApi(
                await stack.enter_async_context(
                    SteadApi.client(env.stack(name).api_url, connections=4)
                )
            )
            for name in ("limited", "unlimited", "unlimited-b")
        }
        legs = [
            ("unlimited", apis["unlimited"], await env.tenant()),
            ("unlimited-b", apis["unlimited-b"], await env.tenant()),
            ("limited", apis["limited"], await env.tenant()),
            ("limited+backlog", apis["limited"], backlog),
        ]
        for index in range(sizes.warmup + sizes.samples):
            out = warm if index < sizes.warmup else kept
            # The order rotates, so that no leg always follows the same one.
            turn = index % len(legs)
            for leg, api, tenant in legs[turn:] + legs[:turn]:
                await _timed_start(env, api, tenant, index, leg, out)
            if (index + 1) % 50 == 0:
                say(f"{index + 1}/{sizes.warmup + sizes.samples} sequential samples")
    return kept


async def _statements(env: BenchEnv, sizes: Sizes, backlog: Tenant) -> Samples:
    """The start's store read alone: plain, then with the limiter at the shipped cap (the
    shipped buckets would refuse a loop this fast; these never do, and cost the same)."""
    shipped = load_limits().plan("default").runs_start
    unreachable = LimitPolicy.model_validate(
        {
            "plans": {
                "default": {
                    "runs.start": {
                        "per_key": {"per_second": 1e6, "burst": 10**7},
                        "per_tenant": {"per_second": 1e6, "burst": 10**7},
                        "max_runs_awaiting_approval": shipped.max_runs_awaiting_approval,
                    }
                }
            }
        }
    ).for_store("runs.start")
    quiet = await env.tenant()
    out = Samples()
    async with env.pool.acquire() as conn:
        for _ in range(sizes.statements):
            started = time.perf_counter()
            await approvals_store.start_settings(conn, quiet.id, "triage")
            out.add("plain read", time.perf_counter() - started)
            for leg, tenant in (("with limiter", quiet), ("with limiter, backlog", backlog)):
                started = time.perf_counter()
                await ratelimits.admit_start(conn, tenant.id, "triage", "bench", unreachable)
                out.add(leg, time.perf_counter() - started)
    return out


async def _burst(env: BenchEnv, sizes: Sizes, leg: str, out: Samples) -> float:
    """`sizes.burst` starts of one fresh key on `leg`'s stack, then their runs' ends (so the
    next burst meets an idle platform); starts per second."""
    tenant = await env.tenant()
    async with SteadApi.client(env.stack(leg).api_url) as http:
        api = SteadApi(http)

        async def one(index: int) -> str:
            started = time.perf_counter()
            run_id = await api.start(tenant, "triage", triage_input(tenant.id, index))
            out.add(f"burst {leg}", time.perf_counter() - started)
            return run_id

        began = time.perf_counter()
        run_ids = await bounded(sizes.burst, sizes.concurrency, one)
        rate = sizes.burst / (time.perf_counter() - began)
    for run_id in run_ids:
        await env.client.get_workflow_handle(workflow_id(tenant.id, run_id)).result()
    return rate


async def _bursts(env: BenchEnv, sizes: Sizes) -> tuple[Samples, dict[str, list[float]]]:
    """Bursts on each leg in turn, the order swapped every repeat."""
    out = Samples()
    rates: dict[str, list[float]] = {"unlimited": [], "limited": []}
    for repeat in range(sizes.repeats):
        for leg in ("unlimited", "limited")[:: 1 if repeat % 2 == 0 else -1]:
            rates[leg].append(await _burst(env, sizes, leg, out))
    return out, rates


def _comparison(samples: Samples, measure: str, leg: str, base: str, pct: str) -> Comparison:
    value = summary_ms(samples.values[leg])[pct]
    baseline = summary_ms(samples.values[base])[pct]
    return Comparison(
        f"{measure} {pct}, {leg} / {base}", "ms", value, baseline, ratio(value, baseline)
    )


def _result(
    sizes: Sizes,
    quick: bool,
    runs: Samples,
    statements: Samples,
    bursts: Samples,
    rates: dict[str, list[float]],
) -> Result:
    everything = {**runs.values, **statements.values, **bursts.values}
    summaries = {key: summary_ms(values) for key, values in everything.items()}
    start = "POST /v1/runs → 201"
    comparisons = [
        _comparison(runs, start, "unlimited-b", "unlimited", "p50"),
        _comparison(runs, start, "limited", "unlimited", "p50"),
        _comparison(runs, start, "limited", "unlimited", "p99"),
        _comparison(runs, start, "limited+backlog", "unlimited", "p50"),
        _comparison(statements, "start's store read", "with limiter", "plain read", "p50"),
        _comparison(statements, "start's store read", "with limiter, backlog", "plain read", "p50"),
        _comparison(bursts, f"{start} under load", "burst limited", "burst unlimited", "p50"),
    ]
    rows = [
        [key, s["n"], s["p50"], s["p90"], s["p99"], s["mean"], s["max"]]
        for key, s in summaries.items()
    ]
    return Result(
        name="ratelimit",
        title="Request limits: the start path with and without the limiter",
        quick=quick,
        params=vars(sizes),
        comparisons=comparisons,
        tables=[
            Table("All measures (ms)", ["measure", "n", "p50", "p90", "p99", "mean", "max"], rows),
            Table(
                "Bursts: starts per second (median of the repeats)",
                ["leg", "starts/s"],
                [[leg, round(statistics.median(r), 1)] for leg, r in rates.items()],
            ),
        ],
        data={"summaries": summaries, "burst_starts_per_s": rates, "samples_s": everything},
        notes=[
            "`limited`: the shipped policies/limits.yaml; `unlimited`: a policy that limits"
            " nothing, so the start takes the read without the limiter.",
            "`unlimited-b`: a second unlimited stack (its own worker and API): the difference"
            " between two identical stacks, the noise floor of the comparison.",
            f"`limited+backlog`: the tenant has {sizes.backlog} runs waiting for approval, which"
            " the cap's count reads on every start (the shipped cap is 1,000).",
            "Store read: the statement alone over the bench's own connection, no HTTP.",
            f"Bursts: {sizes.burst} starts from one key, {sizes.concurrency} in flight,"
            f" {sizes.repeats} per leg, alternating; each waits for the previous one's runs.",
        ],
    )


async def run(options: RunOptions) -> Result:
    sizes = SIZES[options.quick]
    with tempfile.TemporaryDirectory(prefix="stead-limits-") as scratch:
        unlimited_file = Path(scratch) / "limits.yaml"
        unlimited_file.write_text("plans:\n  default: {}\n")
        spec = EnvSpec(stead=_specs(unlimited_file), bare=False)
        async with bench_env(spec, options) as env:
            backlog = await env.tenant()
            say(f"parking {sizes.backlog} runs at review")
            await _park(env, backlog, sizes.backlog, sizes.concurrency)
            runs = await _sequential(env, sizes, backlog)
            statements = await _statements(env, sizes, backlog)
            bursts, rates = await _bursts(env, sizes)
    return _result(sizes, options.quick, runs, statements, bursts, rates)
