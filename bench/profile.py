"""Profile: where Stead's CPU per run goes beyond the hand-rolled pipeline doing the same work.

Runs the throughput benchmark's Stead leg (`triage` over HTTP, one tenant) and hand-rolled leg
(the same three model calls on plain Temporal, `bench.handrolled`) with the Stead worker, the
Stead API and the hand-rolled worker under `bench.sampler`, which samples every Python thread:
the SDK runs workflow activations in a thread pool that pyinstrument (main thread only) cannot
see, and py-spy is not installed here. The window is the measured batches only: the driver
signals the profiled processes to start afresh after the warm-up and to write their reports
after the batches.

PostgreSQL runs with pg_stat_statements for this benchmark; around each batch the driver reads
statements (calls and execution time), transactions, WAL (records, bytes, fsyncs) and rows
written per table, so the database's share is counted per run as well as timed.

Reported: CPU per run by process for both legs and the difference; each profiled process's
busy samples by category (first matching rule) turned into milliseconds per run (share of busy
samples times the process's CPU per run); PostgreSQL's work per run. Profilers slow what they
watch: the absolute figures are those of the profiled run, read the shares and differences.
Files: `profile-<process>.txt` (the top of each report) beside the results.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.env import BenchEnv, EnvSpec, RunOptions, SteadSpec, bench_env
from bench.load import BenchError, SteadApi
from bench.peers import HAND
from bench.report import REPO, Comparison, Result, Table, say
from bench.stats import ratio
from bench.throughput import DRIVER, SIZES, STEAD, Batch, cpu_table, peer_batch, stead_batch
from stead.store.db import Conn

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


def _sandbox_import(stack: Stack) -> bool:
    """Module code run inside the workflow sandbox: a module re-imported for a new run (the
    sandbox's `<string>` activation frames are not modules of the application)."""
    inside = False
    for frame in stack:
        if frame.startswith(("_Instance.", "_WorkflowWorker._create_workflow_instance")):
            inside = True
        elif inside and frame.startswith("<module> (") and not frame.startswith("<module> (<"):
            return True
    return False


# Each busy sample goes to the first rule it matches: leaf rules (time spent inside a library)
# come first so that the step rules below them do not swallow it.
COMMON_RULES: tuple[Rule, ...] = (
    ("tracing spans (OpenTelemetry)", _leaf("opentelemetry")),
    ("payload encryption (AES-GCM)", _on_stack("Sealer.")),
    ("claim-check: payload store", _on_stack("PostgresPayloadStore.")),
    ("asyncpg pool: reset query on every release", _on_stack("PoolConnectionHolder.release")),
)
WORKER_RULES: tuple[Rule, ...] = (
    *COMMON_RULES,
    ("model: count_tokens request", _on_stack("count_tokens")),
    ("model: messages.create request", _on_stack("ModelActivities._call_route")),
    ("model: messages.create request", _on_stack("ModelSteps.model_step")),
    ("model: memo, cache and budget lookup", _on_stack("prepare (stead/store/usage")),
    ("model: budget reservation", _on_stack("ModelActivities._reserve")),
    ("model: audit append (hash chain)", _on_stack("AuditWriter.")),
    ("model: settle, usage, memo, cache", _on_stack("ModelActivities._finish")),
    ("model: gateway, the rest", _on_stack("ModelActivities.")),
    ("ledger activities (audit flush, approvals)", _on_stack("LedgerActivities.")),
    ("sandbox: the workflow's modules re-imported per run", _sandbox_import),
    ("sandbox: new workflow instance", _on_stack("_Instance._create_instance")),
    ("workflow: pydantic payload conversion", _leaf("pydantic", "pydantic_core")),
    ("workflow: search attributes", _on_stack("upsert_search_attributes")),
    ("workflow: Stead's pipeline code", _on_stack("(stead/pipeline/")),
    ("workflow: sandbox's restricted proxies", _on_stack("workflow_sandbox/_restrictions")),
    ("workflow activations (SDK)", _on_stack("_Instance.activate", "_handle_activation")),
    ("activity worker (SDK)", _on_stack("_ActivityWorker")),
    ("event-loop wake-ups from other threads", _on_stack("_write_to_self", "_read_from_self")),
)
API_RULES: tuple[Rule, ...] = (
    *COMMON_RULES,
    ("auth: API key lookup", _on_stack("current_principal")),
    (
        "start: plan, approval policies, limits",
        _on_stack("admit_start (stead/", "overrides (stead/store"),
    ),
    ("start: Temporal start_workflow", _on_stack("launch (stead/api")),
    ("start: the rest of the route", _on_stack("start_run (stead/api")),
    ("FastAPI / Starlette", _leaf("fastapi", "starlette")),
    ("uvicorn / HTTP parsing", _on_stack("uvicorn/protocols", "httptools")),
)
# Profiled process -> (lines of its report kept in the results, categories).
PROFILED: dict[str, tuple[int, tuple[Rule, ...]]] = {
    "stead-worker": (500, WORKER_RULES),
    "hand-worker": (300, WORKER_RULES),
    "stead-api": (400, API_RULES),
}


def categorize(folded: str, rules: tuple[Rule, ...]) -> dict[str, float]:
    """Share (0-1) of busy samples per rule (first match wins), largest first."""
    counts: dict[str, int] = {}
    total = 0
    for line in folded.splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        stack, count = stack_text.split(";"), int(count_text)
        total += count
        name = next((name for name, match in rules if match(stack)), "other")
        counts[name] = counts.get(name, 0) + count
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    return {name: count / max(total, 1) for name, count in ranked}


# --- PostgreSQL's work per batch ----------------------------------------------------------------

_STATEMENTS = (
    "SELECT query, calls, total_exec_time FROM pg_stat_statements"
    " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
)
_WAL = "SELECT wal_records, wal_bytes FROM pg_stat_wal"
_WAL_FSYNCS = "SELECT coalesce(sum(fsyncs), 0) FROM pg_stat_io WHERE object = 'wal'"
_WRITES = "SELECT relname, n_tup_ins + n_tup_upd + n_tup_del AS written FROM pg_stat_user_tables"


@dataclass
class PgWork:
    """PostgreSQL's counters over one batch (deltas)."""

    statements: dict[str, tuple[int, float]] = field(default_factory=dict)  # calls, ms
    wal_records: int = 0
    wal_bytes: int = 0
    wal_fsyncs: int = 0
    rows_written: dict[str, int] = field(default_factory=dict)


async def _cumulative(conn: Conn) -> PgWork:
    """The counters that only grow (WAL, rows written), as they stand."""
    wal = await conn.fetchrow(_WAL)
    assert wal is not None  # pg_stat_wal always has its one row
    fsyncs = await conn.fetchval(_WAL_FSYNCS)
    writes = {r["relname"]: int(r["written"]) for r in await conn.fetch(_WRITES)}
    return PgWork({}, int(wal["wal_records"]), int(wal["wal_bytes"]), int(fsyncs or 0), writes)


async def _pg_reset(env: BenchEnv) -> PgWork:
    """Reset the statement counters; return the cumulative ones to subtract later."""
    async with env.pool.acquire() as conn:
        await conn.execute("SELECT pg_stat_statements_reset()")
        return await _cumulative(conn)


async def _pg_read(env: BenchEnv, before: PgWork) -> PgWork:
    """Read after a batch that waited for the backends' reports (`timed_batch`)."""
    async with env.pool.acquire() as conn:
        rows = await conn.fetch(_STATEMENTS)
        now = await _cumulative(conn)
    return PgWork(
        statements={
            " ".join(r["query"].split()): (int(r["calls"]), float(r["total_exec_time"]))
            for r in rows
        },
        wal_records=now.wal_records - before.wal_records,
        wal_bytes=now.wal_bytes - before.wal_bytes,
        wal_fsyncs=now.wal_fsyncs - before.wal_fsyncs,
        rows_written={
            name: count - before.rows_written.get(name, 0)
            for name, count in now.rows_written.items()
            if count > before.rows_written.get(name, 0)
        },
    )


# --- the measurement ----------------------------------------------------------------------------


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


@dataclass
class Measured:
    batches: list[Batch]
    pg: dict[str, PgWork]  # by leg


def _spec(out: Path) -> EnvSpec:
    worker = str(REPO / "worker.py")
    return EnvSpec(
        stead=(
            SteadSpec(
                worker_command=_sampled(out, "profile-stead-worker.txt", worker),
                api_command=_sampled(out, "profile-stead-api.txt", "--module", "stead.cli", "api"),
            ),
        ),
        bare=False,
        peers=True,
        hand_command=_sampled(out, "profile-hand-worker.txt", "--module", "bench.handrolled"),
        pg_statements=True,
    )


async def _measure(out: Path, options: RunOptions) -> Measured:
    sizes = SIZES[options.quick]
    async with bench_env(_spec(out), options) as env, SteadApi.client(env.stack().api_url) as http:
        api = SteadApi(http)
        say(f"warm-up: {sizes.warmup} runs per leg, then {sizes.runs} per leg profiled")
        await peer_batch(env, HAND, sizes.warmup, sizes.concurrency)
        await stead_batch(env, api, sizes.warmup, sizes.concurrency)
        _signal_all(env, signal.SIGUSR1)
        batches, pg = [], {}
        for leg in (HAND.name, STEAD):
            before = await _pg_reset(env)
            if leg == STEAD:
                batch = await stead_batch(env, api, sizes.runs, sizes.concurrency)
            else:
                batch = await peer_batch(env, HAND, sizes.runs, sizes.concurrency)
            pg[leg] = await _pg_read(env, before)
            batches.append(batch)
            say(f"{leg}: {batch.rate:.1f} runs/s")
        _signal_all(env, signal.SIGUSR2)
        await _reports(out)
    return Measured(batches, pg)


# --- the report ---------------------------------------------------------------------------------

LEGS = (HAND.name, STEAD)


def _per_run_ms(batch: Batch) -> dict[str, float]:
    return {name: seconds / batch.runs * 1000 for name, seconds in batch.cpu.items()}


# Each leg's processes by role; the other leg's workers idle (and are sampled) meanwhile.
ROLES: dict[str, dict[str, tuple[str, ...]]] = {
    HAND.name: {"worker": ("hand-worker",), "API": ()},
    STEAD: {"worker": ("stead-worker",), "API": ("stead-api",)},
}
SHARED = {"Temporal server": ("temporal",), "PostgreSQL": ("postgres",), "simulator": ("sim",)}


def _by_role(batch: Batch) -> dict[str, float]:
    ms = _per_run_ms(batch)
    roles = ROLES[batch.leg] | SHARED
    placed = {name for names in roles.values() for name in names} | {DRIVER}
    figures = {role: sum(ms.get(n, 0.0) for n in names) for role, names in roles.items()}
    figures["idle processes (the other leg's, sampled)"] = sum(
        v for n, v in ms.items() if n not in placed
    )
    figures["driver (load generator)"] = ms.get(DRIVER, 0.0)
    return figures


def _difference_table(measured: Measured) -> Table:
    hand, stead = (_by_role(b) for b in measured.batches)
    rows: list[list[Any]] = [
        [role, hand[role], stead[role], stead[role] - hand[role]] for role in stead
    ]
    rows.append(["all processes", sum(hand.values()), sum(stead.values()),
                 sum(stead.values()) - sum(hand.values())])  # fmt: skip
    return Table(
        "Where Stead's extra CPU goes, by role (ms per completed run, profiled)",
        ["role", HAND.name, STEAD, "Stead - hand-rolled"],
        rows,
    )


def category_table(name: str, folded: dict[str, str], measured: Measured) -> Table | None:
    """A profiled process's categories in ms per run: share of busy samples times CPU per run."""
    if name not in folded:
        return None
    rules = PROFILED[name][1]
    shares = categorize(folded[name], rules)
    leg = HAND.name if name == "hand-worker" else STEAD
    batch = next(b for b in measured.batches if b.leg == leg)
    cpu_ms = _per_run_ms(batch).get(name, 0.0)
    rows = [[category, share * 100, share * cpu_ms] for category, share in shares.items()]
    return Table(
        f"{name}: busy samples by category ({cpu_ms:.1f} ms CPU per run)",
        ["category", "% of busy samples", "ms per run"],
        rows,
    )


def _pg_tables(measured: Measured) -> list[Table]:
    runs = {b.leg: b.runs for b in measured.batches}
    batches = {b.leg: b for b in measured.batches}
    summary = [
        ["transactions", *(batches[leg].pg_transactions / runs[leg] for leg in LEGS)],
        ["WAL fsyncs (commits waiting for the disk)",
         *(measured.pg[leg].wal_fsyncs / runs[leg] for leg in LEGS)],
        ["WAL records", *(measured.pg[leg].wal_records / runs[leg] for leg in LEGS)],
        ["WAL bytes", *(measured.pg[leg].wal_bytes / runs[leg] for leg in LEGS)],
        ["statements", *(sum(c for c, _ in measured.pg[leg].statements.values()) / runs[leg]
                         for leg in LEGS)],
        ["statement execution ms", *(sum(ms for _, ms in measured.pg[leg].statements.values())
                                     / runs[leg] for leg in LEGS)],
    ]  # fmt: skip
    stead = measured.pg[STEAD]
    n = runs[STEAD]
    ranked = sorted(stead.statements.items(), key=lambda item: -item[1][0])
    statements = [
        [query[:140], calls / n, ms / n, ms / max(calls, 1)] for query, (calls, ms) in ranked[:30]
    ]
    writes = sorted(stead.rows_written.items(), key=lambda item: -item[1])
    return [
        Table("PostgreSQL's work per completed run", ["per run", *LEGS], summary),
        Table(
            "Stead's statements per completed run (pg_stat_statements, top 30 by calls)",
            ["statement", "calls per run", "ms per run", "ms per call"],
            statements,
        ),
        Table(
            "Stead's rows written per completed run, by table",
            ["table", "rows per run"],
            [[table, count / n] for table, count in writes],
        ),
    ]


def _result(
    options: RunOptions, measured: Measured, files: dict[str, str], folded: dict[str, str]
) -> Result:
    hand, stead = measured.batches
    hand_ms, stead_ms = _per_run_ms(hand), _per_run_ms(stead)
    sizes = SIZES[options.quick]
    categories = [category_table(name, folded, measured) for name in PROFILED]
    return Result(
        name="profile",
        title="Profile: where Stead's CPU per run goes beyond the hand-rolled pipeline",
        quick=options.quick,
        params={"runs": sizes.runs, "warmup": sizes.warmup, "concurrency": sizes.concurrency},
        comparisons=[
            Comparison(
                "CPU per run, all processes (profiled), Stead / hand-rolled",
                "ms",
                sum(stead_ms.values()),
                sum(hand_ms.values()),
                ratio(sum(stead_ms.values()), sum(hand_ms.values())),
            ),
            Comparison(
                "worker CPU per run (profiled), Stead / hand-rolled",
                "ms",
                stead_ms.get("stead-worker", 0.0),
                hand_ms.get("hand-worker", 0.0),
                ratio(stead_ms.get("stead-worker", 0.0), hand_ms.get("hand-worker", 0.0)),
            ),
            Comparison(
                "completed runs/s (profiled), Stead / hand-rolled",
                "runs/s",
                stead.rate,
                hand.rate,
                ratio(stead.rate, hand.rate),
            ),
        ],
        tables=[
            _difference_table(measured),
            *(table for table in categories if table is not None),
            *_pg_tables(measured),
            cpu_table(measured.batches, LEGS),
        ],
        files=files,
        data={
            "batches": [vars(b) | {"rate": b.rate} for b in measured.batches],
            "pg": {leg: vars(work) for leg, work in measured.pg.items()},
        },
        notes=[
            "Profiles: " + ", ".join(f"[{name}]({name})" for name in sorted(files)) + ".",
            "Each process's every Python thread is sampled every 5 ms; a category's ms per run"
            " is its share of the process's busy samples times the process's CPU per run"
            " (threads waiting for the GIL count as busy: a shape, not a stopwatch).",
            "The sampler costs CPU in every sampled process, idle ones too: the other leg's"
            " sampled workers are shown apart, and absolute figures run above the unprofiled"
            " throughput benchmark's.",
            "The hand-rolled worker has no gateway, so its model rows are its one activity;"
            " PostgreSQL's counters are deltas over each batch (the hand-rolled leg uses no"
            " database: what it shows is background work).",
        ],
    )


def _collect(out: Path, keep: bool) -> tuple[dict[str, str], dict[str, str]]:
    files = {
        f"profile-{name}.txt": _top(out / f"profile-{name}.txt", lines)
        for name, (lines, _) in PROFILED.items()
    }
    folded = {
        name: path.read_text()
        for name in PROFILED
        if (path := out / f"profile-{name}.folded").exists()
    }
    if keep:
        say(f"kept the full profiles (folded stacks too) in {out}")
    else:
        shutil.rmtree(out, ignore_errors=True)
    return files, folded


async def run(options: RunOptions) -> Result:
    out = Path(tempfile.mkdtemp(prefix="stead-profile-"))
    measured = await _measure(out, options)
    files, folded = _collect(out, options.keep)
    return _result(options, measured, files, folded)
