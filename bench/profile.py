"""Profile of the throughput benchmark's hot path: where Stead's CPU per run goes.

Runs the throughput benchmark's legs (warm-up, then one batch each) with the Stead worker,
the bare worker and the Stead API under `bench.sampler`, which samples every Python thread:
the SDK runs workflow activations in a thread pool that pyinstrument (main thread only) cannot
see, and py-spy is not installed here. The window is the measured batches only: the driver
signals the profiled processes to start afresh after the warm-up and to write their reports
after the batches.

Writes `profile-worker.txt`, `profile-bare-worker.txt` and `profile-api.txt` (the top of
each) beside the results, and the CPU per run by process. Profilers slow what they watch:
read the shares, not the absolute rates.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.env import BenchEnv, EnvSpec, RunOptions, SteadSpec, bench_env
from bench.load import BenchError, SteadApi
from bench.report import REPO, Comparison, Result, Table, say
from bench.stats import ratio
from bench.throughput import SIZES, Batch, bare_batch, cpu_table, stead_batch

Stack = list[str]  # frame labels, outermost first: "qualname (file:line)"
Rule = tuple[str, Callable[[Stack], bool]]


def _innermost_package(stack: Stack) -> str:
    """The site-packages distribution of the innermost frame outside the standard library."""
    for frame in reversed(stack):
        where = frame.rsplit("(", 1)[-1]
        if where.startswith(("stdlib/", "<frozen", "<string>")):
            continue
        if where.startswith(".venv/"):
            return where.split("/")[4]
        return where.split("/")[0]
    return "stdlib"


def _on_stack(*names: str) -> Callable[[Stack], bool]:
    return lambda stack: any(name in frame for frame in stack for name in names)


def _leaf(*packages: str) -> Callable[[Stack], bool]:
    return lambda stack: _innermost_package(stack) in packages


# Each busy sample goes to the first rule it matches: leaf rules (time spent inside a library)
# come first so that the step rules below them do not swallow it.
WORKER_RULES: tuple[Rule, ...] = (
    ("tracing spans (OpenTelemetry)", _leaf("opentelemetry")),
    ("payload encryption (AES-GCM)", _on_stack("Sealer.")),
    ("asyncpg pool: reset query on every release", _on_stack("PoolConnectionHolder.release")),
    ("model: count_tokens request", _on_stack("count_tokens")),
    ("model: messages.create request", _on_stack("ModelActivities._call_route")),
    ("model: memo, cache and budget lookup", _on_stack("usage.prepare", "prepare")),
    ("model: budget reservation", _on_stack("ModelActivities._reserve")),
    ("model: settle, usage, memo, cache, audit", _on_stack("ModelActivities._finish")),
    ("ledger activities (audit flush, approvals)", _on_stack("LedgerActivities.")),
    ("sandbox: new workflow instance (re-import)", _on_stack("_Instance._create_instance")),
    ("workflow activations", _on_stack("_Instance.activate", "_handle_activation")),
    ("activity worker (SDK)", _on_stack("_ActivityWorker")),
    ("event-loop wake-ups from other threads", _on_stack("_write_to_self", "_read_from_self")),
)
API_RULES: tuple[Rule, ...] = (
    ("tracing spans (OpenTelemetry)", _leaf("opentelemetry")),
    ("payload encryption (AES-GCM)", _on_stack("Sealer.")),
    ("asyncpg pool: reset query on every release", _on_stack("PoolConnectionHolder.release")),
    ("auth: API key lookup", _on_stack("current_principal")),
    ("start: plan, approval policies, limits", _on_stack("admit_start (api", "overrides (store")),
    ("start: Temporal start_workflow", _on_stack("launch (api")),
    ("start: the rest of the route", _on_stack("start_run (api")),
    (
        "FastAPI / Starlette",
        _leaf("fastapi"),
    ),
    ("FastAPI / Starlette", _leaf("starlette")),
    ("uvicorn / HTTP parsing", _on_stack("uvicorn/protocols", "httptools")),
)


def categorize(folded: str, rules: tuple[Rule, ...]) -> list[list[Any]]:
    """Share of busy samples per rule (first match wins), largest first."""
    counts: dict[str, int] = {}
    total = 0
    for line in folded.splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        stack, count = stack_text.split(";"), int(count_text)
        total += count
        name = next((name for name, match in rules if match(stack)), "other")
        counts[name] = counts.get(name, 0) + count
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    return [[name, count / max(total, 1) * 100, count] for name, count in ranked]


# Profiled process -> lines of its report kept in the results.
PROFILED = {"stead-worker": 500, "bare-worker": 300, "stead-api": 400}


def _sampled(out: Path, name: str, *target: str) -> tuple[str, ...]:
    return (sys.executable, "-m", "bench.sampler", "--out", str(out / name), *target)


def _signal_all(env: BenchEnv, sig: signal.Signals) -> None:
    for name in PROFILED:
        child = next(c for c in env.dev.children if c.name == name)
        os.kill(child.process.pid, sig)


async def _reports(out: Path, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while not all((out / f"profile-{name}.txt").exists() for name in PROFILED):
        if time.monotonic() > deadline:
            raise BenchError("the profiled processes did not write their reports")
        await asyncio.sleep(0.2)


def _top(path: Path, lines: int) -> str:
    if not path.exists():
        return f"(no profile written: {path.name})\n"
    text = path.read_text().splitlines()
    kept = text[:lines]
    if len(text) > lines:
        kept.append(f"... ({len(text) - lines} more lines cut)")
    return "\n".join(kept) + "\n"


async def _measure(out: Path, options: RunOptions) -> list[Batch]:
    sizes = SIZES[options.quick]
    repo = str(REPO / "worker.py")
    spec = EnvSpec(
        stead=(
            SteadSpec(
                worker_command=_sampled(out, "profile-stead-worker.txt", repo),
                api_command=_sampled(out, "profile-stead-api.txt", "--module", "stead.cli", "api"),
            ),
        ),
        bare_command=_sampled(out, "profile-bare-worker.txt", "--module", "bench.bare"),
    )
    async with bench_env(spec, options) as env, SteadApi.client(env.stack().api_url) as http:
        api = SteadApi(http)
        say(f"warm-up: {sizes.warmup} runs per leg, then {sizes.runs} per leg profiled")
        await bare_batch(env, sizes.warmup, sizes.concurrency)
        await stead_batch(env, api, sizes.warmup, sizes.concurrency)
        _signal_all(env, signal.SIGUSR1)
        batches = [
            await bare_batch(env, sizes.runs, sizes.concurrency),
            await stead_batch(env, api, sizes.runs, sizes.concurrency),
        ]
        _signal_all(env, signal.SIGUSR2)
        await _reports(out)
    return batches


def _result(
    options: RunOptions, batches: list[Batch], files: dict[str, str], tables: list[Table]
) -> Result:
    bare, stead = batches
    per_run = {b.leg: b.cpu.get(f"{b.leg}-worker", 0.0) / b.runs * 1000 for b in batches}
    sizes = SIZES[options.quick]
    return Result(
        name="profile",
        title="Profile: the throughput benchmark's legs under sampling profilers",
        quick=options.quick,
        params={"runs": sizes.runs, "warmup": sizes.warmup, "concurrency": sizes.concurrency},
        comparisons=[
            Comparison(
                "worker CPU per run (profiled), Stead / bare",
                "ms",
                per_run["stead"],
                per_run["bare"],
                ratio(per_run["stead"], per_run["bare"]),
            ),
            Comparison(
                "completed runs/s (profiled), Stead / bare",
                "runs/s",
                stead.rate,
                bare.rate,
                ratio(stead.rate, bare.rate),
            ),
        ],
        tables=[cpu_table(batches), *tables],
        files=files,
        notes=[
            "Profiles: " + ", ".join(f"[{name}]({name})" for name in sorted(files)) + ".",
            "Each process's every Python thread is sampled every 5 ms; percentages are of busy"
            " samples (a thread not waiting), so they show shares, not CPU seconds.",
        ],
    )


def _profile_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="stead-profile-"))


CATEGORIZED = {"stead-worker": WORKER_RULES, "stead-api": API_RULES}


def _categories(out: Path) -> list[Table]:
    tables = []
    for name, rules in CATEGORIZED.items():
        folded = out / f"profile-{name}.folded"
        if folded.exists():
            rows = categorize(folded.read_text(), rules)
            title = f"Where {name}'s busy samples go (first matching rule)"
            tables.append(Table(title, ["category", "% of busy samples", "samples"], rows))
    return tables


def _collect(out: Path, keep: bool) -> tuple[dict[str, str], list[Table]]:
    files = {
        f"profile-{name}.txt": _top(out / f"profile-{name}.txt", lines)
        for name, lines in PROFILED.items()
    }
    tables = _categories(out)
    if keep:
        say(f"kept the full profiles (folded stacks too) in {out}")
    else:
        shutil.rmtree(out, ignore_errors=True)
    return files, tables


async def run(options: RunOptions) -> Result:
    out = _profile_dir()
    batches = await _measure(out, options)
    files, tables = _collect(out, options.keep)
    return _result(options, batches, files, tables)
