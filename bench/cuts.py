"""The cuts of issue 18, each measured against the code before it in ONE run, legs interleaved.

One environment, one Temporal server and database, three Stead stacks (worker and API each):
- **before**: the platform as it was before the cuts (`--before REV`, default `BEFORE_REV`),
  exported with `git archive` into the run's directory and put first on the stacks'
  `PYTHONPATH` (the reference application is the same in both);
- **after**: this tree at its defaults;
- **after-512**: this tree with the old claim-check threshold (512 bytes), which separates
  the threshold cut from the audit cut.

Legs: `triage` over HTTP, 20 starts in flight, every run of a batch from ONE tenant (the
audit chain's contended case) and the same spread over 20 tenants, on `before` and `after`;
one tenant on `after-512`; and the hand-rolled peer, so that each Stead leg's ratio to it is
read within the round it ran in. The rounds rotate the legs' order. Figures: runs/s (median of
the rounds), CPU ms and PostgreSQL transactions per completed run, payloads offloaded per run;
and the sizes of every payload of one `triage` run (what the threshold is chosen from).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from temporalio.api.common.v1 import Payload

from bench.env import BenchEnv, EnvSpec, RunOptions, SteadSpec, Tenant, bench_env
from bench.load import SteadApi
from bench.peers import HAND
from bench.report import REPO, Comparison, Result, Table, at_least, say
from bench.throughput import (
    Batch,
    Sizes,
    median_rate,
    peer_batch,
    platform_ms,
    rotated,
    timed_batch,
    transactions_per_run,
    triage_input,
)
from stead.config import Settings
from stead.service.runs import workflow_id
from stead.store.payloads import payloads_in

# The last commit before the cuts: part 1's benchmarks and their results.
BEFORE_REV = "4fae21e"
OLD_THRESHOLD = 512
THRESHOLD: int = Settings.model_fields["payload_offload_bytes"].default
TENANTS = 20
# What the platform is made of (the reference application comes along: same in both trees).
EXPORTED = ("stead", "worker.py", "workflows", "activities", "policies")
BEFORE, AFTER, AFTER_512 = "before", "after", "after-512"
STACKS = {
    BEFORE: SteadSpec(name=BEFORE, task_queue="stead-before"),
    AFTER: SteadSpec(name=AFTER, task_queue="stead-after"),
    AFTER_512: SteadSpec(
        name=AFTER_512,
        task_queue="stead-after-512",
        settings={"STEAD_PAYLOAD_OFFLOAD_BYTES": str(OLD_THRESHOLD)},
    ),
}
SPREAD = f"-{TENANTS}-tenants"
LEGS = (HAND.name, BEFORE, AFTER, BEFORE + SPREAD, AFTER + SPREAD, AFTER_512)
ONE_TENANT_TARGET = 0.95


SIZES = {False: Sizes(100, 20, 10, 3), True: Sizes(60, 20, 10, 3)}


def export_before(rev: str, into: Path) -> Path:
    """The platform at `rev`, as files (no worktree of the shared repository is touched)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, *EXPORTED],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True, timeout=60)
    # As `make bench` does for this tree: the sandbox re-imports a workflow's modules for every
    # run, and without bytecode each re-import is a compile, which the `before` leg alone paid.
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", *(str(into / p) for p in EXPORTED)],
        check=True,
        timeout=300,
    )
    return into


def _stack_of(leg: str) -> str:
    return leg.removesuffix(SPREAD)


async def _payloads_stored(env: BenchEnv) -> int:
    async with env.pool.acquire() as conn:
        count: int = await conn.fetchval("SELECT count(*) FROM payload_store")
    return count


@dataclass
class CutBatch:
    batch: Batch
    offloaded: int  # payloads the claim-check stored during the batch


async def stead_batch(
    env: BenchEnv, leg: str, runs: int, concurrency: int, *, measured: bool
) -> CutBatch:
    tenants = TENANTS if leg.endswith(SPREAD) else 1
    owners: list[Tenant] = [await env.tenant() for _ in range(tenants)]
    stored = await _payloads_stored(env)
    async with SteadApi.client(env.stack(_stack_of(leg)).api_url) as http:
        api = SteadApi(http)

        async def start(index: int) -> str:
            tenant = owners[index % tenants]
            return await api.start(tenant, "triage", triage_input(tenant.id, index))

        batch = await timed_batch(env, leg, runs, concurrency, start, "triage", uses_pg=measured)
    return CutBatch(batch, await _payloads_stored(env) - stored)


async def run_leg(env: BenchEnv, leg: str, sizes: Sizes, runs: int, *, measured: bool) -> CutBatch:
    if leg == HAND.name:
        return CutBatch(await peer_batch(env, HAND, runs, sizes.concurrency), 0)
    return await stead_batch(env, leg, runs, sizes.concurrency, measured=measured)


async def payload_sizes(env: BenchEnv, leg: str) -> list[int]:
    """The size of each payload in one `triage` run's history (after encryption); negative
    for one the claim-check offloaded."""
    tenant = await env.tenant()
    async with SteadApi.client(env.stack(leg).api_url) as http:
        run_id = await SteadApi(http).start(
            tenant, "triage", triage_input(tenant.id, uuid.uuid4().int % 10**6)
        )
    wid = workflow_id(tenant.id, run_id)
    await env.client.get_workflow_handle(wid).result()
    history = await env.raw.get_workflow_handle(wid).fetch_history()
    return sorted(_stored_size(p) for event in history.events for p in payloads_in(event))


def _stored_size(payload: Payload) -> int:
    """Bytes of the payload itself: an offloaded one counts what it references, negated (so
    the table tells them apart)."""
    if payload.external_payloads:
        return -sum(e.size_bytes for e in payload.external_payloads)
    return payload.ByteSize()


def comparisons(batches: list[CutBatch]) -> list[Comparison]:
    plain = [c.batch for c in batches]

    def rate_ratio(leg: str, base: str, target: float | None = None) -> Comparison:
        value, baseline = median_rate(plain, leg), median_rate(plain, base)
        share = value / baseline if baseline else float("nan")
        return Comparison(
            f"completed runs/s (median), {leg} / {base}",
            "runs/s",
            value,
            baseline,
            share,
            f">= {target}" if target else "",
            at_least(share, target) if target else None,
        )

    def cpu_ratio(leg: str, base: str) -> Comparison:
        value, baseline = platform_ms(plain, leg), platform_ms(plain, base)
        return Comparison(
            f"CPU per completed run (all but the driver), {leg} / {base}",
            "ms",
            value,
            baseline,
            value / baseline if baseline else float("nan"),
        )

    return [
        rate_ratio(AFTER, AFTER + SPREAD, ONE_TENANT_TARGET),
        rate_ratio(BEFORE, BEFORE + SPREAD, ONE_TENANT_TARGET),
        rate_ratio(AFTER, BEFORE),
        rate_ratio(AFTER, HAND.name),
        rate_ratio(BEFORE, HAND.name),
        rate_ratio(AFTER, AFTER_512),
        cpu_ratio(AFTER, BEFORE),
        cpu_ratio(AFTER, HAND.name),
        cpu_ratio(BEFORE, HAND.name),
        cpu_ratio(AFTER, AFTER_512),
    ]


def _offloaded_per_run(batches: list[CutBatch], leg: str) -> float:
    mine = [c for c in batches if c.batch.leg == leg]
    return sum(c.offloaded for c in mine) / (sum(c.batch.runs for c in mine) or 1)


def _result(
    sizes: Sizes, quick: bool, rev: str, batches: list[CutBatch], sized: dict[str, list[int]]
) -> Result:
    plain = [c.batch for c in batches]
    legs = [leg for leg in LEGS if any(b.leg == leg for b in plain)]
    per_leg = Table(
        "Per leg (all measured batches)",
        ["leg", "runs/s (median)", "CPU ms/run", "PG transactions/run", "payloads offloaded/run"],
        [
            [
                leg,
                median_rate(plain, leg),
                platform_ms(plain, leg),
                transactions_per_run(plain, leg),
                _offloaded_per_run(batches, leg),
            ]
            for leg in legs
        ],
    )
    order = Table(
        "Batches (in order)",
        ["leg", "runs", "seconds", "runs/s", "CPU ms/run (all but the driver)"],
        [[b.leg, b.runs, b.seconds, b.rate, platform_ms([b], b.leg)] for b in plain],
    )
    payloads = Table(
        "Payloads of one triage run (bytes after encryption; * offloaded by the claim-check)",
        ["stack", "payloads", "offloaded", "sizes"],
        [
            [
                stack,
                len(s),
                sum(n < 0 for n in s),
                ", ".join(f"{abs(n):,}{'*' if n < 0 else ''}" for n in sorted(s, key=abs)),
            ]
            for stack, s in sized.items()
        ],
    )
    return Result(
        name="cuts",
        title="The cuts: claim-check threshold and batched audit appends, before / after",
        quick=quick,
        params=vars(sizes)
        | {"before": rev, "threshold": THRESHOLD, "old_threshold": OLD_THRESHOLD},
        comparisons=comparisons(batches),
        tables=[per_leg, payloads, order],
        data={
            "batches": [vars(c.batch) | {"offloaded": c.offloaded} for c in batches],
            "payload_sizes": sized,
        },
        notes=[
            f"`{BEFORE}`: the platform at {rev}; `{AFTER}`: this tree (claim-check threshold"
            f" {THRESHOLD:,} bytes, batched audit appends); `{AFTER_512}`: this tree with the"
            f" old threshold ({OLD_THRESHOLD} bytes).",
            f"A leg without `{SPREAD}` runs every run of a batch as ONE tenant; with it, the"
            f" batch is spread over {TENANTS} tenants.",
            "Every stack's worker and API run throughout: a leg's CPU includes the idle"
            " polling of the others, the same for every leg.",
        ],
    )


async def run(options: RunOptions) -> Result:
    sizes = SIZES[options.quick]
    rev = options.before or BEFORE_REV
    with tempfile.TemporaryDirectory(prefix="stead-bench-before-") as tmp:
        before_tree = export_before(rev, Path(tmp))
        batches, sized = await _measure(options, sizes, before_tree)
    return _result(sizes, options.quick, rev, batches, sized)


async def _measure(
    options: RunOptions, sizes: Sizes, before_tree: Path
) -> tuple[list[CutBatch], dict[str, list[int]]]:
    stacks = tuple(
        SteadSpec(
            name=s.name,
            task_queue=s.task_queue,
            settings={**s.settings, "PYTHONPATH": str(before_tree)},
        )
        if s.name == BEFORE
        else s
        for s in STACKS.values()
    )
    batches: list[CutBatch] = []
    async with bench_env(EnvSpec(stead=stacks, bare=False, peers=True), options) as env:
        sized = {leg: await payload_sizes(env, leg) for leg in (BEFORE, AFTER, AFTER_512)}
        say(f"warm-up: {sizes.warmup} runs per leg")
        for leg in LEGS:
            await run_leg(env, leg, sizes, sizes.warmup, measured=False)
        for round_ in range(sizes.repeats):
            for leg in rotated(LEGS, round_):
                cut = await run_leg(env, leg, sizes, sizes.runs, measured=True)
                say(
                    f"round {round_ + 1}/{sizes.repeats} {leg}: {cut.batch.rate:.1f} runs/s,"
                    f" {platform_ms([cut.batch], leg):.0f} ms CPU/run,"
                    f" {cut.offloaded / cut.batch.runs:.1f} offloaded/run"
                )
                batches.append(cut)
    return batches, sized
