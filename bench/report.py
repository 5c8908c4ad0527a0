"""Benchmark results: one JSON and one markdown file per benchmark, plus `SUMMARY.md`.

Every result records the machine it ran on (cores, CPU, memory, Python, SDK and server
versions, load average when it started), the date and the commit, and whether it was a
`--quick` smoke run: a quick figure is a smoke test of the benchmark, never a measurement.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
# The order benchmarks appear in SUMMARY.md.
ORDER = (
    "throughput",
    "latency",
    "scale",
    "history",
    "cache",
    "budget",
    "profile",
    "ratelimit",
    "cuts",
    "audit",
    "caching",
    "batches",
    "events",
)


def say(message: str) -> None:
    """Progress on stdout, timestamped: benchmarks run for minutes."""
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


@dataclass
class Comparison:
    """One headline figure: Stead against its baseline from the same run."""

    measure: str
    unit: str
    stead: float
    baseline: float | None
    # How the ratio is defined is part of the measure's name (e.g. "Stead / bare").
    ratio: float | None
    target: str = ""
    met: bool | None = None


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[Any]]


@dataclass
class Result:
    name: str
    title: str
    quick: bool
    params: dict[str, Any]
    comparisons: list[Comparison] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # Extra files to write beside the result (name -> text), e.g. profiles.
    files: dict[str, str] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    date: str = ""
    seconds: float = 0.0


def at_least(value: float | None, target: float) -> bool | None:
    return None if value is None or math.isnan(value) else value >= target


def at_most(value: float | None, target: float) -> bool | None:
    return None if value is None or math.isnan(value) else value <= target


def _run(args: list[str]) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=20, check=False)
    except OSError:
        return "unknown"
    return done.stdout.strip() or "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_facts() -> dict[str, Any]:
    """What a reader needs to compare two result files."""
    temporal = Path(sys.executable).parent / "temporal"
    load1, load5, _ = os.getloadavg()
    dirty = _run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    return {
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "temporalio_sdk": metadata.version("temporalio"),
        "temporal_cli": _run([str(temporal), "--version"]),
        "commit": _run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "worktree_dirty": dirty not in ("", "unknown"),
        "load_average_at_start": [round(load1, 2), round(load5, 2)],
    }


def _fmt_float(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def fmt(value: Any) -> str:
    """A table cell: thousands separators, three significant digits below 100."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return _fmt_float(value)
    return str(value)


def _markdown_table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return lines


def _comparison_rows(result: Result) -> list[list[Any]]:
    return [
        [c.measure, c.unit, c.stead, c.baseline, c.ratio, c.target, c.met]
        for c in result.comparisons
    ]


def _machine(machine: dict[str, Any]) -> str:
    """The machine and the versions, the same for every result of one summary."""
    return (
        f"{machine.get('cores')} cores ({machine.get('cpu')}), {machine.get('memory_gib')} GiB,"
        f" Python {machine.get('python')}, temporalio {machine.get('temporalio_sdk')},"
        f" {machine.get('temporal_cli')}"
    )


def _machine_line(machine: dict[str, Any]) -> str:
    return (
        f"{_machine(machine)}; commit {machine.get('commit')}"
        f"{' (dirty tree)' if machine.get('worktree_dirty') else ''};"
        f" load at start {machine.get('load_average_at_start')}"
    )


def to_markdown(result: Result) -> str:
    lines = [f"# {result.title}", ""]
    if result.quick:
        lines += ["**Quick smoke run (`--quick`): small sizes, not a measurement.**", ""]
    lines += [
        f"{result.date}, {result.seconds:.0f} s. {_machine_line(result.machine)}.",
        "",
        "Parameters: " + ", ".join(f"`{k}={v}`" for k, v in result.params.items()),
        "",
    ]
    if result.comparisons:
        headers = ["measure", "unit", "Stead", "baseline", "ratio", "target", "met"]
        lines += [*_markdown_table(headers, _comparison_rows(result)), ""]
    for table in result.tables:
        lines += [f"## {table.title}", "", *_markdown_table(table.headers, table.rows), ""]
    if result.notes:
        lines += ["## Notes", "", *(f"- {note}" for note in result.notes), ""]
    return "\n".join(lines)


def write(result: Result, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    record = asdict(result)
    record["files"] = sorted(result.files)
    payload = json.dumps(record, indent=2, default=str) + "\n"
    outputs = {
        f"{result.name}.json": payload,
        f"{result.name}.md": to_markdown(result),
        **result.files,
    }
    # Written whole then renamed: an interrupted run never leaves half a file.
    for name, text in outputs.items():
        partial = out / f"{name}.tmp"
        partial.write_text(text)
        partial.replace(out / name)


_TARGET = re.compile(r"^(>=|<=)\s*(-?[0-9.]+)")


def _target_figure(c: dict[str, Any]) -> float | None:
    """What a target is read against: the ratio when the target is one ("<= 1.15"), else
    Stead's own figure ("Stead <= 300 MiB", "on <= 2048", or no baseline at all)."""
    if _TARGET.match(c["target"]) and c["ratio"] is not None:
        return float(c["ratio"])
    return None if c["stead"] is None else float(c["stead"])


def _verdict(c: dict[str, Any], measured: float | None) -> str:
    """met, or by how much (share of the target) it was missed."""
    if c["met"] is None or measured is None:
        return "-"
    if c["met"]:
        return "met"
    found = re.search(r"(>=|<=)\s*(-?[0-9.]+)", c["target"])
    if not found or float(found.group(2)) == 0:
        return "**missed**"
    goal = float(found.group(2))
    short = (goal - measured) / goal if found.group(1) == ">=" else (measured - goal) / goal
    return f"**missed by {abs(short) * 100:.0f}%**"


def _targets_table(found: dict[str, dict[str, Any]], names: list[str]) -> list[str]:
    rows: list[list[Any]] = []
    for name in names:
        for c in found[name].get("comparisons", []):
            if c["target"]:
                measured = _target_figure(c)
                label = f"[{name}]({name}.md)" + (" (quick)" if found[name].get("quick") else "")
                rows.append([label, c["measure"], measured, c["target"],
                             _verdict(c, measured)])  # fmt: skip
    if not rows:
        return []
    return [
        "## Targets",
        "",
        *_markdown_table(["benchmark", "measure", "measured", "target", "verdict"], rows),
        "",
        "## Every figure",
        "",
    ]


def write_summary(out: Path) -> Path:
    """One table of every headline figure from the result files present in `out`."""
    out.mkdir(parents=True, exist_ok=True)  # every benchmark may have failed before writing
    found: dict[str, dict[str, Any]] = {
        p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))
    }
    names = [n for n in ORDER if n in found] + sorted(set(found) - set(ORDER))
    headers = ["benchmark", "measure", "unit", "Stead", "baseline", "ratio", "target", "met"]
    rows: list[list[Any]] = []
    runs: list[list[Any]] = []
    for name in names:
        result = found[name]
        label = f"[{name}]({name}.md)" + (" (quick)" if result.get("quick") else "")
        ran_on = result.get("machine", {})
        dirty = " (dirty tree)" if ran_on.get("worktree_dirty") else ""
        load = ran_on.get("load_average_at_start")
        runs.append([label, result.get("date", "?"), f"{ran_on.get('commit')}{dirty}", load])
        for c in result.get("comparisons", []):
            rows.append(
                [
                    label,
                    c["measure"],
                    c["unit"],
                    c["stead"],
                    c["baseline"],
                    c["ratio"],
                    c["target"],
                    c["met"],
                ]
            )
    machine: dict[str, Any] = next(iter(found.values()), {}).get("machine", {})
    lines = [
        "# Stead benchmarks: summary",
        "",
        "Each figure compares Stead with a baseline measured in the same run on the same",
        "Temporal server. `(quick)` marks smoke runs with small sizes: not measurements.",
        "",
        f"Machine: {_machine(machine)}." if machine else "",
        "",
        *_targets_table(found, names),
        *_markdown_table(headers, rows),
        "",
        "## When and on what each ran",
        "",
        *_markdown_table(["benchmark", "date", "commit", "load average at start"], runs),
        "",
    ]
    target = out / "SUMMARY.md"
    target.write_text("\n".join(lines))
    return target
