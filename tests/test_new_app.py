"""Done when: a new user builds on the installed Stead alone, outside this repository.

In a temporary directory: Stead's wheel is built (its top level must be `stead` alone) and
installed with its testing extra into a fresh virtual environment; `stead new app` makes a
project, `stead new tool` adds a tool on a new HTTP integration and `stead new pipeline` a
pipeline using it, with its approval rule. Then the project's own `make test` (ruff, mypy
--strict against the installed Stead, its tests on the testing kit) must pass, and its
`make dev` must serve the new pipeline: one run is started over HTTP, waits for its approval,
is approved, and completes with the tool's record made at the integration's stand-in. This
repository's files are never touched.

Slow (a fresh environment, a cold mypy): 2 to 5 minutes on the shared 2-core machine
(276 s at load average 11; user CPU 80 s). pip's cache and the one wheel built here are
reused; the project's `make dev` starts while its `make test` runs, on free ports, with its
state in its own directory. The guide's edit (docs/building.md) is type-checked here too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import pytest

from stead.dev import port_free
from tests import guide
from tests.helpers import free_ports

ROOT = Path(__file__).resolve().parents[1]
PIPELINE, TOOL, INTEGRATION = "credit-request", "issue_credit", "billing"
# Not passed on: this session's settings, and a model key (`make dev` must use its simulator;
# an empty ANTHROPIC_API_KEY counts as set, and would send model calls to Anthropic).
NOT_PASSED = (
    "STEAD_",
    "PYTEST_",
    "VIRTUAL_ENV",
    "PYTHON",
    "DATABASE_URL",
    "TEMPORAL_",
    "ANTHROPIC_",
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("make") is None, reason="needs make"),
]


def clean_env(**extra: str) -> dict[str, str]:
    """The machine's environment without this test session's (no STEAD_*, no venv)."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith(NOT_PASSED)}
    return {**kept, **extra}


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> str:
    done = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def repo_state() -> str:
    """What git says of this checkout: tracked changes and untracked files."""
    done = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    diff = subprocess.run(["git", "diff", "HEAD"], cwd=ROOT, capture_output=True, check=False)
    return done.stdout + str(hash(diff.stdout))


def build_wheel(into: Path) -> Path:
    into.mkdir()
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(into), str(ROOT)],
        into,
        clean_env(),
        300,
    )
    (wheel,) = into.glob("stead-*.whl")
    return wheel


def dev_ports() -> dict[str, str]:
    """Free ports for every server `make dev` starts; the integrations' stand-ins take
    consecutive ones from STEAD_DEV_INTEGRATIONS_PORT."""
    names = ["API", "SIM", "TEMPORAL", "TEMPORAL_UI", "TEMPORAL_HTTP", "TEMPORAL_METRICS"]
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    base = next(p for p in free_ports(20) if all(port_free("127.0.0.1", p + n) for n in range(2)))
    env = {f"STEAD_{name}_PORT": str(port) for name, port in ports.items()}
    return {**env, "STEAD_DEV_INTEGRATIONS_PORT": str(base), "STEAD_WORKER_METRICS_PORT": "0"}


def poll(probe: Callable[[], Any], ok: Callable[[Any], bool], within: float, what: str) -> Any:
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except (httpx.HTTPError, OSError, ValueError) as exc:
            last = exc
        else:
            if ok(last):
                return last
        time.sleep(0.25)
    raise AssertionError(f"{what} within {within}s; last: {last!r}")


class DevStack:
    """The generated project's `make dev`, in its own process group."""

    def __init__(self, project: Path, venv: Path, env: dict[str, str]) -> None:
        self.project = project
        self.log = (project.parent / "make-dev.log").open("wb")
        self.process = subprocess.Popen(
            ["make", "dev", f"VENV={venv}"],
            cwd=project,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def keys(self) -> dict[str, str]:
        dev_json = self.project / ".stead" / "dev.json"

        def read() -> dict[str, str]:
            if self.process.poll() is not None:
                raise AssertionError(f"make dev exited: {self.output()}")
            return dict(json.loads(dev_json.read_text())["keys"])

        keys: dict[str, str] = poll(read, bool, 180, "make dev never wrote .stead/dev.json")
        return keys

    def output(self) -> str:
        return (self.project.parent / "make-dev.log").read_text()[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


@pytest.fixture
def dev_stack(tmp_path: Path) -> Iterator[Callable[[Path, Path, dict[str, str]], DevStack]]:
    started: list[DevStack] = []

    def start(project: Path, venv: Path, env: dict[str, str]) -> DevStack:
        started.append(DevStack(project, venv, env))
        return started[-1]

    yield start
    for stack in started:
        stack.stop()


def drive_one_run(api: str, keys: dict[str, str], stand_in: str, token: str) -> dict[str, Any]:
    """Start a run of the new pipeline over HTTP, approve its review, see it complete."""
    requester = {"Authorization": f"Bearer {keys['acme/requester']}"}
    approver = {"Authorization": f"Bearer {keys['acme/approver']}"}
    # The simulator answers the structured step from these hints in the prompt.
    text = "The outage cost me a day.\nnote: Credit cus_1 for the outage\nurgent: true"
    body = {"pipeline": PIPELINE, "input": {"customer_id": "cus_1", "request": text}}
    with httpx.Client(base_url=api, timeout=30) as http:
        started = http.post("/v1/runs", json=body, headers=requester)
        assert started.status_code == 201, started.text
        run_id = started.json()["run_id"]
        inbox = poll(
            lambda: http.get("/v1/approvals", headers=approver).json()["items"],
            lambda items: any(a["run_id"] == run_id for a in items),
            60,
            "the review never reached the approver's inbox",
        )
        (approval,) = [a for a in inbox if a["run_id"] == run_id]
        assert approval["proposal"] == {"note": "Credit cus_1 for the outage", "urgent": True}
        decided = http.post(
            f"/v1/approvals/{approval['approval_id']}/decision",
            json={"decision": "approve", "comment": "fine"},
            headers=approver,
        )
        assert decided.status_code == 200, decided.text
        run: dict[str, Any] = poll(
            lambda: http.get(f"/v1/runs/{run_id}", headers=requester).json(),
            lambda r: r["status"] != "running",
            60,
            "the run never ended",
        )
    with httpx.Client(base_url=stand_in, headers={"Authorization": f"Bearer {token}"}) as http:
        records = http.get("/v1/credits").json()
    assert [r["id"] for r in records] == [run["result"]["record_id"]]
    return run


def test_a_new_app_builds_tests_and_serves_on_the_installed_stead(
    tmp_path: Path, dev_stack: Callable[[Path, Path, dict[str, str]], DevStack]
) -> None:
    before = repo_state()
    took: dict[str, float] = {}
    clock = time.monotonic()

    def lap(name: str) -> None:
        nonlocal clock
        took[name] = round(time.monotonic() - clock, 1)
        clock = time.monotonic()

    wheel = build_wheel(tmp_path / "wheel")
    top = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert top == {"stead", f"stead-{metadata.version('stead')}.dist-info"}
    lap("wheel")

    venv = tmp_path / "venv"
    env = clean_env(PYTEST_ADDOPTS=f"--basetemp={tmp_path / 'project-pytest'}")
    run([sys.executable, "-m", "venv", str(venv)], tmp_path, env, 300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-compile"]
    run([*pip, f"{wheel}[testing]"], tmp_path, env, 900)
    lap("install")

    stead = str(venv / "bin" / "stead")
    project = tmp_path / "apps" / "shop-desk"
    run([stead, "new", "app", str(project)], tmp_path, env, 60)
    new_tool = [stead, "new", "tool", TOOL, "--integration", INTEGRATION]
    tool_report = run(new_tool, project, env, 60)
    pipeline_report = run([stead, "new", "pipeline", PIPELINE, "--tool", TOOL], project, env, 60)
    assert f"wired policies/approvals.yaml: who reviews {PIPELINE}" in pipeline_report
    assert f"wrote activities/{INTEGRATION}.py" in tool_report
    lap("generate")

    run(["make", "install", f"VENV={venv}"], project, env, 600)
    lap("project install")

    # `make dev` starts (PostgreSQL, Temporal, the worker) while `make test` runs: they share
    # nothing but the venv, installed above, and the machine.
    ports = dev_ports()
    stack = dev_stack(project, venv, {**env, **ports})
    checked = run(["make", "test", f"VENV={venv}"], project, env, 1200)
    assert "Success: no issues found" in checked  # mypy --strict, on the installed Stead
    assert " passed" in checked
    lap("make test")

    keys = stack.keys()
    api = f"http://127.0.0.1:{ports['STEAD_API_PORT']}"
    # Stand-ins are served in name order: billing first.
    stand_in = f"http://127.0.0.1:{ports['STEAD_DEV_INTEGRATIONS_PORT']}"
    token = (project / ".stead" / "integrations.token").read_text().strip()
    run_view = drive_one_run(api, keys, stand_in, token)
    assert run_view["status"] == "completed", run_view
    assert run_view["result"]["approval"] == "approved"
    assert run_view["result"]["note"] == "Credit cus_1 for the outage"
    stack.stop()
    lap("make dev")

    # The guide's edit to a running pipeline (docs/building.md), under mypy --strict too;
    # tests/test_building_guide.py replays it.
    assert guide.apply_edits(project)
    run(["make", "typecheck", f"VENV={venv}"], project, env, 600)
    lap("guide's edit, mypy")

    assert repo_state() == before, "the new app's path edited Stead's own files"
    print(f"\ntest_new_app phases (s): {took}")  # the figure to report
