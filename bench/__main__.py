"""Run Stead's benchmarks and write their results.

    python -m bench                      # all of them, at full size (what `make bench` runs)
    python -m bench throughput latency   # some of them
    python -m bench --quick              # small sizes: a smoke test of the benchmarks
    python -m bench --out DIR --keep     # another results dir; keep the temporary platforms
    python -m bench scale --parked 3000  # fewer parked runs per leg than the full 10,000

Each benchmark starts its own platform (see bench/env.py), writes `<name>.json` and
`<name>.md` to the results dir (`bench/results/`, or `bench/results/quick/` with `--quick`)
and `SUMMARY.md` is rebuilt from every result there. Full sizes take long: run them on a quiet
machine (about an hour in all, half of it the scale benchmark's two orders of 10,000 runs).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import bench.audit
import bench.batches
import bench.budget
import bench.cache
import bench.caching
import bench.cuts
import bench.events
import bench.history
import bench.latency
import bench.profile
import bench.ratelimit
import bench.scale
import bench.throughput
from bench.env import RunOptions
from bench.report import (
    ORDER,
    RESULTS,
    Result,
    fmt,
    machine_facts,
    say,
    write,
    write_summary,
)

Benchmark = Callable[[RunOptions], Awaitable[Result]]
BENCHMARKS: dict[str, Benchmark] = {
    "throughput": bench.throughput.run,
    "latency": bench.latency.run,
    "scale": bench.scale.run,
    "history": bench.history.run,
    "cache": bench.cache.run,
    "budget": bench.budget.run,
    "profile": bench.profile.run,
    "ratelimit": bench.ratelimit.run,
    "cuts": bench.cuts.run,
    "audit": bench.audit.run,
    "caching": bench.caching.run,
    "batches": bench.batches.run,
    "events": bench.events.run,
}
assert tuple(BENCHMARKS) == ORDER


def _options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"any of {', '.join(BENCHMARKS)} (default: all)"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--out", type=Path, help="results dir (default bench/results[/quick])")
    parser.add_argument("--keep", action="store_true", help="keep temporary platforms")
    parser.add_argument(
        "--parked", type=int, metavar="N", help="scale: runs parked per leg (a busy machine)"
    )
    parser.add_argument(
        "--before", metavar="REV", help="cuts: the commit to measure against (default: its own)"
    )
    options = parser.parse_args(argv)
    unknown = [name for name in options.names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    return options


async def _run_one(name: str, options: RunOptions, out: Path) -> bool:
    say(f"== {name}{' (quick)' if options.quick else ''}")
    machine = machine_facts()
    date = datetime.now(UTC).isoformat(timespec="seconds")
    started = time.monotonic()
    try:
        result = await BENCHMARKS[name](options)
    except Exception:
        logging.getLogger("bench").exception("benchmark %s failed", name)
        return False
    result.machine, result.date = machine, date
    result.seconds = time.monotonic() - started
    write(result, out)
    for c in result.comparisons:
        ratio = f", ratio {fmt(c.ratio)}" if c.ratio is not None else ""
        target = f" (target {c.target}: {'met' if c.met else 'NOT met'})" if c.target else ""
        say(f"   {c.measure}: Stead {fmt(c.stead)}, baseline {fmt(c.baseline)}{ratio}{target}")
    return True


async def _main(options: argparse.Namespace) -> int:
    names = options.names or list(BENCHMARKS)
    out: Path = options.out or (RESULTS / "quick" if options.quick else RESULTS)
    run_options = RunOptions(
        quick=options.quick, keep=options.keep, parked=options.parked, before=options.before
    )
    failed = [name for name in names if not await _run_one(name, run_options, out)]
    say(f"summary: {write_summary(out)}")
    if failed:
        say(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    return asyncio.run(_main(_options(argv)))


if __name__ == "__main__":
    sys.exit(main())
