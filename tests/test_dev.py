"""`stead dev` as a user runs it: real processes, real ports, the README walkthrough, a clean
stop, and a clean restart after being killed with SIGKILL."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from temporalio.client import Client

from stead.dev import port_free
from tests.helpers import free_ports
from tests.web_support import csrf_field

BIN = Path(sys.executable).parent
REPO = Path(__file__).parent.parent


@pytest.fixture
def dev_env(tmp_path: Path) -> dict[str, str]:
    names = [
        "API",
        "SIM",
        "WORKER_METRICS",
        "TEMPORAL",
        "TEMPORAL_UI",
        "TEMPORAL_HTTP",
        "TEMPORAL_METRICS",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEAD_", "TEMPORAL_"))}
    env.pop("DATABASE_URL", None)
    env.pop("ANTHROPIC_API_KEY", None)
    env["STEAD_DATA_DIR"] = str(tmp_path / "dev")
    for name, port in zip(names, free_ports(len(names)), strict=True):
        env[f"STEAD_{name}_PORT"] = str(port)
    # The reference application, whose two integrations get stand-ins on two ports from here.
    env["STEAD_APP"] = "worker:APP"
    env["STEAD_DEV_INTEGRATIONS_PORT"] = str(consecutive_free_ports(2))
    return env


def consecutive_free_ports(count: int) -> int:
    """The first of `count` consecutive ports free on 127.0.0.1 right now."""
    for _ in range(200):
        (first,) = free_ports(1)
        if first + count < 65535 and all(port_free("127.0.0.1", first + i) for i in range(count)):
            return first
    raise AssertionError("no consecutive free ports")


def start_dev(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [str(BIN / "stead"), "dev"],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        cwd=REPO,  # where `--app worker:APP` is importable from
    )
    deadline = time.monotonic() + 90
    while "Stead is running" not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"stead dev did not start:\n{log.read_text()}")
        time.sleep(0.2)
    return process


def child_pids(data_dir: Path) -> list[int]:
    return [int(p.read_text().split()[0]) for p in (data_dir / "run").glob("*.pid")]


def postgres_running(data_dir: Path) -> bool:
    pid_file = data_dir / "pg" / "postmaster.pid"
    return pid_file.exists() and psutil.pid_exists(int(pid_file.read_text().split()[0]))


@pytest.fixture
def dev(dev_env: dict[str, str], tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    process = start_dev(dev_env, tmp_path / "dev.log")
    yield process, Path(dev_env["STEAD_DATA_DIR"])
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def test_walkthrough_and_clean_stop(
    dev: tuple[subprocess.Popen[bytes], Path], dev_env: dict[str, str], tmp_path: Path
) -> None:
    process, data_dir = dev
    info = json.loads((data_dir / "dev.json").read_text())
    # The banner sends a reviewer to the web app's sign-in, which answers.
    assert f"Web app       {info['api']}/ui/" in (tmp_path / "dev.log").read_text()
    assert httpx.get(f"{info['api']}/ui/sign-in", timeout=10).status_code == 200
    assert set(info["keys"]) == {
        f"{t}/{r}"
        for t in ("acme", "globex")
        for r in ("requester", "approver", "finance", "admin")
    } | {"platform/operator"}
    api, keys = info["api"], info["keys"]
    with httpx.Client(base_url=api, timeout=10) as http:
        assert http.get("/healthz").status_code == 200
        started = http.post(
            "/v1/runs",
            headers={"Authorization": f"Bearer {keys['acme/requester']}"},
            json={"pipeline": "summarize", "input": {"text": "Stead makes AI pipelines durable."}},
        )
        assert started.status_code == 201, started.text
        run_id = started.json()["run_id"]
        approver = {"Authorization": f"Bearer {keys['acme/approver']}"}
        deadline = time.monotonic() + 30

        def waiting() -> list[dict[str, Any]]:
            items: list[dict[str, Any]] = http.get("/v1/approvals", headers=approver).json()[
                "items"
            ]
            return items

        # The app's demo sent a ticket at start: its refund waits for finance.
        while not any(a["pipeline"] == "support-agent" for a in waiting()):
            assert time.monotonic() < deadline, "the demo's refund never waited"
            time.sleep(0.2)
        # This run's own approval, not whatever else waits.
        while not (items := [a for a in waiting() if a["run_id"] == run_id]):
            assert time.monotonic() < deadline, "no approval appeared"
            time.sleep(0.1)
        # Operators find the same run with Temporal's own tools.
        listed = subprocess.run(
            [
                str(BIN / "temporal"),
                "workflow",
                "list",
                "--address",
                f"127.0.0.1:{dev_env['STEAD_TEMPORAL_PORT']}",
                "--query",
                'Stage="review"',
                "-o",
                "json",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert f"acme:{run_id}" in listed.stdout
        decided = http.post(
            f"/v1/approvals/{items[0]['approval_id']}/decision",
            headers=approver,
            json={"decision": "approve", "comment": "ok"},
        )
        assert decided.status_code == 200
        while (
            run := http.get(
                f"/v1/runs/{run_id}", headers={"Authorization": f"Bearer {keys['acme/requester']}"}
            ).json()
        )["status"] == "running":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert run["status"] == "completed"
        assert run["result"]["summary"]
        # globex cannot see acme's run.
        other = http.get(
            f"/v1/runs/{run_id}", headers={"Authorization": f"Bearer {keys['globex/admin']}"}
        )
        assert other.status_code == 404
        ui = httpx.get(info["ui"], timeout=10)
        assert ui.status_code == 200
    # The approver reads the run on the web app, linked to it in this Temporal Web UI.
    with httpx.Client(base_url=api, timeout=10) as browser:
        form = browser.get("/ui/sign-in")
        signed_in = browser.post(
            "/ui/sign-in", data={"key": keys["acme/approver"], "csrf": csrf_field(form.text)}
        )
        assert signed_in.status_code == 303, signed_in.text
        page = browser.get(f"/ui/runs/{run_id}")
        assert page.status_code == 200
        assert f'href="{info["ui"]}/namespaces/default/workflows/acme%3A{run_id}"' in page.text

    children = child_pids(data_dir)
    assert len(children) == 5  # temporal, sim, integrations, worker, api
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    assert not [pid for pid in children if psutil.pid_exists(pid)]
    assert not postgres_running(data_dir)


def test_restart_after_sigkill(dev_env: dict[str, str], tmp_path: Path) -> None:
    data_dir = Path(dev_env["STEAD_DATA_DIR"])
    first = start_dev(dev_env, tmp_path / "first.log")
    keys = json.loads((data_dir / "dev.json").read_text())["keys"]
    children = child_pids(data_dir)
    first.kill()
    first.wait()
    deadline = time.monotonic() + 20
    while [pid for pid in children if psutil.pid_exists(pid)]:
        assert time.monotonic() < deadline, "children outlived a SIGKILLed stead dev"
        time.sleep(0.1)
    assert postgres_running(data_dir)  # left behind on purpose; the next start reuses it

    second = start_dev(dev_env, tmp_path / "second.log")
    try:
        # The keys a developer copied still work after the restart.
        assert json.loads((data_dir / "dev.json").read_text())["keys"] == keys
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
    assert not postgres_running(data_dir)


def dev_once(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`stead dev` expected to refuse to start: its exit code and output."""
    return subprocess.run(
        [str(BIN / "stead"), "dev"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )


def test_busy_port_is_one_line(dev_env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(dev_env["STEAD_API_PORT"])))
        taken.listen()
        done = dev_once(dev_env)
    assert done.returncode == 1
    port = dev_env["STEAD_API_PORT"]
    expected = f"stead dev: port {port} (the API) is busy: set STEAD_API_PORT to move it"
    assert done.stderr.strip() == expected


def test_external_temporal_and_postgres_are_used_instead(
    dev_env: dict[str, str],
    tmp_path: Path,
    database_url: str,
    app_database_url: str,
    client: Client,
) -> None:
    """With STEAD_TEMPORAL_ADDRESS and DATABASE_URL set, stead dev starts neither server."""
    env = {
        **dev_env,
        "STEAD_TEMPORAL_ADDRESS": client.service_client.config.target_host,
        "DATABASE_URL": app_database_url,
        "STEAD_MIGRATE_DATABASE_URL": database_url,
        "STEAD_TASK_QUEUE": f"dev-external-{uuid.uuid4().hex[:8]}",
    }
    data_dir = Path(env["STEAD_DATA_DIR"])
    process = start_dev(env, tmp_path / "dev.log")
    try:
        names = sorted(p.stem for p in (data_dir / "run").glob("*.pid"))
        assert names == ["api", "integrations", "sim", "worker"]  # no temporal child
        assert not (data_dir / "pg").exists()  # no embedded PostgreSQL
        info = json.loads((data_dir / "dev.json").read_text())
        with httpx.Client(base_url=info["api"], timeout=10) as http:
            assert http.get("/healthz").json() == {
                "status": "ok",
                "temporal": "ok",
                "postgres": "ok",
            }
            started = http.post(
                "/v1/runs",
                headers={"Authorization": f"Bearer {info['keys']['acme/requester']}"},
                json={
                    "pipeline": "summarize",
                    "input": {"text": "External parts.", "review": False},
                },
            )
            assert started.status_code == 201, started.text
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


# --- stead dev as a supervisor -------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], what: str, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"not within {within}s: {what}"
        time.sleep(0.1)


def healthy(api: str) -> bool:
    try:
        return httpx.get(f"{api}/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def completes_a_run(info: dict[str, Any], label: str) -> None:
    """A summarize run without review, start to `completed`: the API, the worker, Temporal,
    PostgreSQL and the simulator all take part."""
    auth = {"Authorization": f"Bearer {info['keys']['acme/requester']}"}
    with httpx.Client(base_url=info["api"], timeout=10, headers=auth) as http:
        started = http.post(
            "/v1/runs",
            json={"pipeline": "summarize", "input": {"text": f"After {label}.", "review": False}},
        )
        assert started.status_code == 201, f"after {label}: {started.text}"
        run_id = started.json()["run_id"]
        wait_until(
            lambda: http.get(f"/v1/runs/{run_id}").json()["status"] == "completed",
            f"the run started after {label} completes",
        )


def in_log(log: Path, text: str) -> Callable[[], bool]:
    return lambda: text in log.read_text()


def pid_of(data_dir: Path, name: str) -> int:
    if name == "postgres":
        return int((data_dir / "pg" / "postmaster.pid").read_text().split()[0])
    return int((data_dir / "run" / f"{name}.pid").read_text().split()[0])


def test_every_child_killed_comes_back(
    dev: tuple[subprocess.Popen[bytes], Path], dev_env: dict[str, str], tmp_path: Path
) -> None:
    """SIGKILL each kind of child in turn: each is restarted with a line saying so, and the
    platform serves again (health and a whole run) before the next one is killed."""
    process, data_dir = dev
    log = tmp_path / "dev.log"
    info = json.loads((data_dir / "dev.json").read_text())
    payments = f"http://127.0.0.1:{dev_env['STEAD_DEV_INTEGRATIONS_PORT']}/"
    for name in ("worker", "temporal", "postgres", "api", "sim", "integrations"):
        before = pid_of(data_dir, name)
        os.kill(before, signal.SIGKILL)
        wait_until(in_log(log, f"stead dev: {name} is back"), f"{name} restarted")
        assert process.poll() is None, f"stead dev stopped after {name} was killed"
        assert pid_of(data_dir, name) != before
        wait_until(lambda: healthy(info["api"]), f"healthy after {name} was killed")
        if name == "integrations":
            assert httpx.get(payments, timeout=5).status_code < 500
        completes_a_run(info, f"{name} was killed")
    lines = log.read_text()
    assert "stead dev: worker exited with code -9 (SIGKILL); restarting in 0.5s" in lines
    assert "stead dev: postgres stopped (postmaster pid" in lines
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


def test_a_crash_loop_ends_with_a_clear_message(
    dev: tuple[subprocess.Popen[bytes], Path], dev_env: dict[str, str], tmp_path: Path
) -> None:
    """The simulator's port taken by someone else: every restart fails at once. After five
    crashes within a minute stead dev gives up, names the child and its log, stops
    everything and exits 1."""
    process, data_dir = dev
    children = child_pids(data_dir)
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        os.kill(pid_of(data_dir, "sim"), signal.SIGKILL)
        wait_until(lambda: bind_quietly(squatter, int(dev_env["STEAD_SIM_PORT"])), "port free")
        squatter.listen()
        assert process.wait(timeout=60) == 1
    lines = (tmp_path / "dev.log").read_text()
    restarts = re.findall(
        r"^stead dev: sim exited with code (-?\d+)[^;]*; restarting in ([\d.]+)s", lines, re.M
    )
    # The kill, then failed starts (the port is taken) with the back-off doubling each time.
    assert restarts, lines
    assert restarts[0] == ("-9", "0.5"), lines
    assert [delay for _, delay in restarts] == ["0.5", "1.0", "2.0", "4.0"], lines
    failed = {code for code, _ in restarts[1:]}
    assert len(failed) == 1
    assert failed != {"0"}
    assert (
        f"stead dev: giving up on sim: 5 crashes within 60s, the last: exited with code"
        f" {failed.pop()}; see {data_dir}/logs/sim.log"
    ) in lines
    assert not [pid for pid in children if psutil.pid_exists(pid)]
    assert not postgres_running(data_dir)


def bind_quietly(sock: socket.socket, port: int) -> bool:
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


def test_a_second_stead_dev_leaves_the_first_alone(
    dev: tuple[subprocess.Popen[bytes], Path], dev_env: dict[str, str]
) -> None:
    process, data_dir = dev
    children = child_pids(data_dir)
    second = dev_once(dev_env)
    assert second.returncode == 1
    expected = f"stead dev: already running (pid {process.pid}); stop it first"
    assert second.stderr.strip() == expected
    assert all(psutil.pid_exists(pid) for pid in children)
    assert sorted(child_pids(data_dir)) == sorted(children)  # pid files untouched
    info = json.loads((data_dir / "dev.json").read_text())
    assert healthy(info["api"])
    assert process.poll() is None


# --- owner-only state; the codec token off the command line ------------------------------------


def test_state_is_owner_only_and_the_token_is_not_on_a_command_line(
    dev_env: dict[str, str], tmp_path: Path
) -> None:
    data_dir = Path(dev_env["STEAD_DATA_DIR"])
    # What an older stead dev left with the default umask is tightened too.
    (data_dir / "logs").mkdir(parents=True, mode=0o755)
    (data_dir / "logs" / "api.log").write_text("old\n")
    (data_dir / "logs" / "api.log").chmod(0o644)
    data_dir.chmod(0o755)
    process = start_dev(dev_env, tmp_path / "dev.log")
    try:
        info = json.loads((data_dir / "dev.json").read_text())
        assert healthy(info["api"])
        # Written by the Temporal server itself, once runs exist.
        completes_a_run(info, "start")
        shared = os.geteuid() == 0  # PostgreSQL runs as embedded_postgres: it traverses
        assert data_dir.stat().st_mode & 0o777 == (0o711 if shared else 0o700)
        found = owner_only_violations(data_dir)
        assert not found, found
        for name in ("temporal.db", "temporal.db-wal", "temporal.db-shm", "dev.json", "dev.lock"):
            assert (data_dir / name).exists(), name
        assert (data_dir / "pg").stat().st_mode & 0o777 == 0o700

        token = (data_dir / "codec.token").read_text().strip()
        cmdline = Path(f"/proc/{pid_of(data_dir, 'temporal')}/cmdline").read_bytes()
        assert b"start-dev" in cmdline
        assert token.encode() not in cmdline
        for pid in child_pids(data_dir):
            assert token.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        # The UI still has it: its codec endpoint is the API's, with the token.
        settings = httpx.get(f"{info['ui']}/api/v1/settings", timeout=10).json()
        assert settings["Codec"]["Endpoint"] == f"{info['api']}/codec/{token}"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


def owner_only_violations(data_dir: Path) -> list[str]:
    """Paths under `data_dir` (outside PostgreSQL's own pg/) others may read or enter."""
    found = []
    for path in data_dir.rglob("*"):
        if path.is_relative_to(data_dir / "pg"):
            continue
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            found.append(f"{path.relative_to(data_dir)} {mode:o}")
    return found
