"""`stead dev` as a user runs it: real processes, real ports, the README walkthrough, a clean
stop, and a clean restart after being killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from temporalio.client import Client

from tests.helpers import free_ports

BIN = Path(sys.executable).parent


@pytest.fixture
def dev_env(tmp_path: Path) -> dict[str, str]:
    names = [
        "API",
        "SIM",
        "PAYMENTS",
        "EMAIL",
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
    return env


def start_dev(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [str(BIN / "stead"), "dev"], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
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
    dev: tuple[subprocess.Popen[bytes], Path], dev_env: dict[str, str]
) -> None:
    process, data_dir = dev
    info = json.loads((data_dir / "dev.json").read_text())
    assert set(info["keys"]) == {
        f"{t}/{r}" for t in ("acme", "globex") for r in ("requester", "approver", "admin")
    }
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
        while not (items := http.get("/v1/approvals", headers=approver).json()["items"]):
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


def test_busy_port_is_one_line(dev_env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(dev_env["STEAD_API_PORT"])))
        taken.listen()
        done = subprocess.run(
            [str(BIN / "stead"), "dev"],
            env=dev_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
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
