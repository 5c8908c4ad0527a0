"""The `stead` command as an operator meets it: a bad setting or database URL is one line on
stderr naming the problem and a non-zero exit, never a traceback, never the password."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from temporalio.client import Client

from stead.config import Settings
from tests.conftest import PAYLOAD_KEYS, Tenant
from tests.helpers import free_ports

BIN = Path(sys.executable).parent
PASSWORD = "hunter2-not-for-logs"

# Every command that opens the database at start.
COMMANDS = {
    "worker": ["worker"],
    "api": ["api"],
    "migrate": ["migrate"],
    "admin": ["admin", "tenant-create", "cli-test"],
    "audit verify": ["audit", "verify"],
}


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("STEAD_", "TEMPORAL_"))}
    clean.pop("DATABASE_URL", None)
    clean["STEAD_DATA_DIR"] = str(tmp_path / "data")
    return clean


def stead(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "stead"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed command (asserted so), for the caller to read."""
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("stead: "), lines[0]
    assert PASSWORD not in done.stderr + done.stdout
    return lines[0]


def test_a_worker_with_a_bad_setting_says_which(env: dict[str, str]) -> None:
    env["STEAD_HEARTBEAT_SECONDS"] = "abc"
    line = one_line_error(stead(env, "worker"))
    assert line.startswith("stead: invalid STEAD_HEARTBEAT_SECONDS:"), line


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unparseable_database_url_is_one_line(env: dict[str, str], command: str) -> None:
    # The "@" is missing: a URL parser takes the password for the port, and says so.
    env["DATABASE_URL"] = f"postgresql://stead:{PASSWORD}/stead"
    line = one_line_error(stead(env, *COMMANDS[command]))
    assert line == (
        "stead: DATABASE_URL is not a valid URL (postgresql://user:password@host:port/database)"
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_a_refused_connection_is_one_line(env: dict[str, str], command: str) -> None:
    (port,) = free_ports(1)  # nothing listens there
    env["STEAD_DATABASE_URL"] = f"postgresql://stead:{PASSWORD}@127.0.0.1:{port}/stead"
    line = one_line_error(stead(env, *COMMANDS[command]))
    assert line == (
        f"stead: STEAD_DATABASE_URL: PostgreSQL at 127.0.0.1:{port} refused the connection"
        " (is it running?)"
    )


@pytest.mark.parametrize("command", ["worker", "migrate"])
def test_a_refused_login_is_one_line(env: dict[str, str], database_url: str, command: str) -> None:
    """A real server that refuses the role: its own words, not the URL."""
    parts = urlsplit(database_url)
    env["DATABASE_URL"] = parts._replace(netloc=f"nobody:{PASSWORD}@").geturl()
    line = one_line_error(stead(env, *COMMANDS[command]))
    assert line.startswith("stead: DATABASE_URL: PostgreSQL at the socket in"), line
    assert line.endswith('refused the login: role "nobody" does not exist'), line


def test_a_key_for_a_user_that_does_not_exist(
    env: dict[str, str], database_url: str, tenant: Tenant
) -> None:
    env["DATABASE_URL"] = database_url
    done = stead(env, "admin", "key-create", tenant.id, "nobody")
    assert done.returncode == 1
    assert one_line_error(done) == (
        f"stead: no user 'nobody' in tenant '{tenant.id}'; create it with"
        f" `stead admin user-create {tenant.id} nobody --roles ...`"
    )
    assert done.stdout == ""  # no key printed


def test_a_user_for_a_tenant_that_does_not_exist(env: dict[str, str], database_url: str) -> None:
    env["DATABASE_URL"] = database_url
    missing = f"t-{uuid.uuid4().hex[:8]}"
    done = stead(env, "admin", "user-create", missing, "alice", "--roles", "requester")
    assert done.returncode == 1
    assert one_line_error(done) == (
        f"stead: no tenant '{missing}'; create it with `stead admin tenant-create {missing}`"
    )


def test_a_worker_without_payload_keys_refuses_to_start(
    env: dict[str, str], database_url: str
) -> None:
    """A worker missing its keys once wrote plaintext payloads unnoticed."""
    env["DATABASE_URL"] = database_url
    line = one_line_error(stead(env, "worker"))
    assert "STEAD_PAYLOAD_KEYS" in line
    assert "STEAD_PAYLOAD_ENCRYPTION=false" in line
    env["STEAD_PAYLOAD_ENCRYPTION"] = "false"
    line = one_line_error(stead(env, "worker"))
    assert "STEAD_ATTESTATION_KEYS" in line  # decisions still need a key
    for command in ("api",):
        assert "STEAD_ATTESTATION_KEYS" in one_line_error(stead(env, command))


def test_a_worker_without_its_integrations_refuses_to_start(
    env: dict[str, str], settings: Settings, client: Client
) -> None:
    """The application's tools need their integrations: a worker without them would fail
    every call it picks up, so it does not start."""
    assert settings.database_url is not None
    env |= {
        "STEAD_DATABASE_URL": settings.database_url.get_secret_value(),
        "STEAD_TEMPORAL_ADDRESS": client.service_client.config.target_host,
        "STEAD_PAYLOAD_KEYS": PAYLOAD_KEYS,
        "STEAD_APP": "worker:APP",
    }
    line = one_line_error(stead(env, "worker"))
    assert "integration payments is not configured" in line
    assert "STEAD_INTEGRATION_PAYMENTS_URL" in line


def test_a_worker_says_when_it_is_ready(
    env: dict[str, str], settings: Settings, client: Client
) -> None:
    assert settings.database_url is not None
    env |= {
        "STEAD_DATABASE_URL": settings.database_url.get_secret_value(),
        "STEAD_TEMPORAL_ADDRESS": client.service_client.config.target_host,
        "STEAD_TASK_QUEUE": f"tq-{uuid.uuid4().hex[:8]}",
        "STEAD_PAYLOAD_KEYS": PAYLOAD_KEYS,
        "STEAD_WORKER_METRICS_PORT": "0",
        "STEAD_APP": "worker:APP",
        "STEAD_INTEGRATIONS_FILE": str(settings.integrations_file),
    }
    process = subprocess.Popen(
        [str(BIN / "stead"), "worker"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    lines: list[str] = []
    stderr = process.stderr
    assert stderr is not None
    # A thread reads: a blocking readline must not hang the test if the line never comes.
    reader = threading.Thread(target=lambda: lines.extend(stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("ready:" in line for line in lines):
            time.sleep(0.1)
    finally:
        process.terminate()
        process.wait(timeout=30)
    output = "".join(lines)
    assert f"ready: support-desk, polling {env['STEAD_TASK_QUEUE']}" in output, output
