"""Mutation testing of the security- and money-critical modules: `make mutants`.

`TARGETS` is the one place that names each module and the fast tests that must catch its
mutants; when a module moves, change its path here and nothing else.

Each target runs mutmut 3 in its own work directory, `build/mutants/<target>/`: a copy of the
project whose `pyproject.toml` gets a `[tool.mutmut]` table for that target alone (mutmut reads
its settings only from the current directory). Within a target mutmut first runs the listed
tests once, recording which tests call which function, then tests every mutant of a function
with only the tests that called it, in processes forked from a server that never touched
Temporal or PostgreSQL itself. Results are kept per function: a second run tests only the
mutants of functions that changed since, unless a test or a setting changed (then all).

    make mutants [MUTANTS="audit codec"]
    python -m tests.mutants [TARGET ...] [--report-only] [--diffs] [--max-children N]

It prints one line per target (killed, survived, no tests, timeouts, the score) and the
surviving mutants, with `--diffs` what each changed (`mutmut show NAME` in the target's
`build/mutants/<target>/` shows one in full).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import fnmatch
import hashlib
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from stead.store.embedded import EmbeddedPostgres
from stead.store.migrate import migrate

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "mutants"
# Selected by marker, not by name: the browser and drill tests take minutes each.
PYTEST_ARGS = ("-m", "not drill and not browser", "-p", "no:cacheprovider")


@dataclass(frozen=True)
class Target:
    sources: tuple[str, ...]  # files mutmut mutates
    tests: tuple[str, ...]  # pytest arguments selecting the fast tests that cover them
    # Mutant names (fnmatch) that count, when only part of a file is in scope: mutmut names
    # a mutant `<module>.x_<function>__mutmut_<n>` (`xǁClassǁmethod` for a method).
    only: tuple[str, ...] = ("*",)


TARGETS: dict[str, Target] = {
    "permissions": Target(
        ("stead/policy/permissions.py",),
        ("tests/test_permissions.py", "tests/test_tool_gateway.py"),
    ),
    # Runs through a worker take seconds each, and would run for every mutant of the functions
    # they reach; the store-level tests cover the same functions in milliseconds.
    "budgets": Target(
        ("stead/store/budgets.py",), ("tests/test_budgets.py", "-k", "not concurrent")
    ),
    "audit": Target(
        ("stead/store/audit.py",),
        ("tests/test_audit.py", "-k", "not worker_driven and not resumed"),
    ),
    "redaction": Target(("stead/policy/redaction.py",), ("tests/test_redaction.py",)),
    "codec": Target(
        ("stead/codec.py", "stead/api/routes/codec.py"),
        ("tests/test_codec_crypto.py", "tests/test_codec_server.py"),
        only=("stead.codec.*", "stead.api.routes.codec.x__cors_headers__mutmut_*"),
    ),
    "attest": Target(
        ("stead/attest.py",), ("tests/test_attest.py", "tests/test_forged_messages.py")
    ),
    # The gateway, and the client its tools reach integrations through (a provider's answer
    # decides between retry and refusal there).
    "tools": Target(
        ("stead/gateway/tools.py", "stead/integrations.py"), ("tests/test_tool_gateway.py",)
    ),
}

# mutmut's exit codes (mutmut.stats.status_by_exit_code), folded into what a score needs.
_KILLED = {1, 3, 37}
_TIMEOUT = {36, 24, -24, 152, 255}
_NO_TESTS = {5, 33}


# The reference application: tests/conftest.py imports `worker` (its `APP`), and the tests
# drive its tools, policies and tables.
REFERENCE_APP = ("workflows", "activities", "api", "policies", "worker.py")


def _copied_paths() -> list[str]:
    """What the wheel ships (pyproject's wheel `packages`), the reference application, the
    tests and the project file: all a test may import or read."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    shipped: list[str] = project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    return [*shipped, *REFERENCE_APP, "tests", "pyproject.toml"]


# SQL text: mutmut's string mutants of it are its case (equivalent: SQL keywords and
# unquoted names ignore case) or garbage (killed by any test that runs the query, proving
# nothing). Lines that are one SQL string alone are left unmutated.
_SQL_LINE = (
    r'^\s*f?"(?=[^"]*\b(SELECT|INSERT|UPDATE|DELETE|FROM|WHERE|AND|SET|VALUES|RETURNING)\b)'
    r'[^"]*"\s*,?\s*(#.*)?$'
)


def _prepare(name: str, target: Target) -> Path:
    """The target's work directory with a fresh copy of the project. mutmut's mutated copy
    and results (`mutants/`) are kept while the tests and settings are those they were made
    with, so that only mutants of changed functions are tested again; otherwise they go, as a
    changed test may kill what survived."""
    work = WORK / name
    work.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for path in _copied_paths():
        source, dest = ROOT / path, work / path
        if dest.is_dir():
            shutil.rmtree(dest)
        if source.is_dir():
            shutil.copytree(source, dest, ignore=ignore)
        else:
            shutil.copy2(source, dest)  # mtimes kept: mutmut compares them
    config = {
        "source_paths": list(target.sources),
        "also_copy": _copied_paths(),
        "pytest_add_cli_args_test_selection": list(target.tests),
        "pytest_add_cli_args": list(PYTEST_ARGS),
        "do_not_mutate_patterns": [_SQL_LINE],
        # Temporal's core and asyncio do not survive a fork from a process that used them:
        # mutants are forked from a server that only imported and collected the tests.
        "process_isolation": "forkserver",
    }
    table = "\n[tool.mutmut]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items())
    with (work / "pyproject.toml").open("a") as out:
        out.write(table)
    stamp = work / "mutants" / ".made-with"
    made_with = _fingerprint(table)
    if not stamp.exists() or stamp.read_text() != made_with:
        shutil.rmtree(work / "mutants", ignore_errors=True)
        stamp.parent.mkdir()
        stamp.write_text(made_with)
    return work


def _fingerprint(table: str) -> str:
    digest = hashlib.sha256(table.encode())
    digest.update(importlib.metadata.version("mutmut").encode())
    for test in sorted((ROOT / "tests").rglob("*.py")):
        if test != Path(__file__):  # this file changes how mutmut is run, not what it finds
            digest.update(test.read_bytes())
    return digest.hexdigest()


def _run(name: str, target: Target, max_children: int, pgdata: Path) -> int:
    work = _prepare(name, target)
    mutmut = Path(sys.executable).with_name("mutmut")
    # Naming mutants makes mutmut retest them even when unchanged: only when a target is part
    # of a file.
    names = [] if target.only == ("*",) else list(target.only)
    command = [str(mutmut), "run", f"--max-children={max_children}", *names]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEAD_")}
    env["STEAD_TEST_PGDATA"] = str(pgdata)  # stead.testing attaches instead of initdb
    # In a session of its own, so that a stop reaches every process it started (its workers'
    # test sessions and their Temporal servers) and nothing else.
    process = subprocess.Popen(command, cwd=work, env=env, start_new_session=True)
    try:
        return process.wait()
    except KeyboardInterrupt:
        # mutmut keeps the results it has on SIGINT, but a test session it is running may
        # take the signal for itself: what is still there after a while is killed.
        os.killpg(process.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise


@contextmanager
def _postgres() -> Iterator[Path]:
    """One PostgreSQL for every test session of the run, migrated once (sessions migrate
    again, which finds nothing to do). Tests are independent by tenant, as in one session.
    One run at a time: a second would share the server, and stop it under the first."""
    WORK.mkdir(parents=True, exist_ok=True)
    lock = (WORK / ".lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit("make mutants is already running in this checkout") from None
    pg = EmbeddedPostgres(WORK / "pg")
    url = pg.start()
    try:
        asyncio.run(migrate(url))
        yield pg.pgdata
    finally:
        pg.stop("immediate")
        lock.close()


@dataclass(frozen=True)
class Score:
    name: str
    counts: Counter[str]
    survivors: list[str]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def score(self) -> float:
        caught = self.counts["killed"] + self.counts["timeout"]
        return 100.0 * caught / self.total if self.total else 0.0

    def line(self) -> str:
        c = self.counts
        return (
            f"{self.name:12} {self.score:5.1f}%  {c['killed']} killed, {c['survived']} survived,"
            f" {c['no tests']} without tests, {c['timeout']} timed out,"
            f" {c['not checked']} not checked, of {self.total}"
        )


def _status(code: int | None) -> str:
    if code is None:
        return "not checked"
    if code in _KILLED:
        return "killed"
    if code in _TIMEOUT:
        return "timeout"
    if code in _NO_TESTS:
        return "no tests"
    return "survived" if code == 0 else "suspicious"


def score(name: str, target: Target) -> Score:
    counts: Counter[str] = Counter()
    survivors: list[str] = []
    for source in target.sources:
        meta = WORK / name / "mutants" / f"{source}.meta"
        if not meta.exists():
            continue
        codes: dict[str, int | None] = json.loads(meta.read_text())["exit_code_by_key"]
        for key, code in sorted(codes.items()):
            if not any(fnmatch.fnmatchcase(key, pattern) for pattern in target.only):
                continue
            status = _status(code)
            counts[status] += 1
            if status in {"survived", "no tests", "suspicious"}:
                survivors.append(f"{key}: {status}")
    return Score(name, counts, survivors)


def _diff(name: str, mutant: str) -> str:
    mutmut = Path(sys.executable).with_name("mutmut")
    shown = subprocess.run(
        [str(mutmut), "show", mutant], cwd=WORK / name, capture_output=True, text=True, check=False
    )
    changed = [line for line in shown.stdout.splitlines() if line[:2] in ("- ", "+ ")]
    return "\n".join(f"    {line}" for line in changed)


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", metavar="TARGET", help=", ".join(TARGETS))
    parser.add_argument("--report-only", action="store_true", help="only print the last results")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--diffs", action="store_true", help="show each survivor's change")
    args = parser.parse_args(argv)
    names = args.targets or list(TARGETS)
    unknown = sorted(set(names) - set(TARGETS))
    if unknown:
        parser.error(f"unknown target {', '.join(unknown)}; known: {', '.join(TARGETS)}")
    failed: list[str] = []
    # A stopped run (Ctrl-C, kill) still stops its PostgreSQL; mutmut keeps what it finished.
    signal.signal(signal.SIGTERM, _interrupted)
    if not args.report_only:
        with _postgres() as pgdata:
            for name in names:
                started = time.monotonic()
                if _run(name, TARGETS[name], args.max_children, pgdata) != 0:
                    failed.append(name)
                minutes = (time.monotonic() - started) / 60
                print(f"mutants: {name} took {minutes:.1f} min", file=sys.stderr)
    scores = [score(name, TARGETS[name]) for name in names]
    print()
    for result in scores:
        print(result.line())
    for result in scores:
        for survivor in result.survivors:
            print(f"  {survivor}")
            if args.diffs:
                print(_diff(result.name, survivor.partition(":")[0]))
    if failed:
        print(f"mutmut failed for: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("mutants: stopped; mutmut keeps what it finished in build/mutants/")
