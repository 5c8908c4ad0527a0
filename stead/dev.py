"""`stead dev`: the whole platform on one machine, started, supervised and stopped cleanly.

Starts (on 127.0.0.1, every port pinned by settings):
  PostgreSQL (embedded, under <data_dir>/pg)    unless DATABASE_URL is set
  Temporal dev server + Web UI (<data_dir>/temporal.db)   unless STEAD_TEMPORAL_ADDRESS is set
  the model simulator, the loopback payment and email services, one worker, the API.

Children run in their own sessions with a parent-death signal, and their pids are recorded
under <data_dir>/run: Ctrl-C or SIGTERM stops them in order; if `stead dev` itself is killed
with SIGKILL they receive SIGTERM from the kernel, and the next start kills any leftover
whose pid file survived. PostgreSQL (daemonized by pg_ctl) is reused if still running.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import asyncpg
import httpx
import psutil

from stead.config import Settings
from stead.temporal import dev_server_args
from store.embedded import EmbeddedPostgres
from store.migrate import migrate
from store.seed import seed_demo
from workflows.search import SEARCH_ATTRIBUTES

_PR_SET_PDEATHSIG = 1
BIN = Path(sys.executable).parent


class DevError(Exception):
    """A start-up problem, explained in one line."""


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: the kernel sends SIGTERM when `stead dev` dies.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: IO[bytes]


@dataclass
class DevStack:
    settings: Settings
    children: list[Child] = field(default_factory=list)
    postgres: EmbeddedPostgres | None = None

    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir.resolve()

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    # --- preparation -----------------------------------------------------------------------

    def ports(self) -> list[tuple[int, str, str]]:
        s = self.settings
        wanted = [
            (s.api_port, "STEAD_API_PORT", "the API"),
            (s.sim_port, "STEAD_SIM_PORT", "the model simulator"),
            (s.payments_port, "STEAD_PAYMENTS_PORT", "the payments service"),
            (s.email_port, "STEAD_EMAIL_PORT", "the email service"),
        ]
        if s.worker_metrics_port:
            wanted.append((s.worker_metrics_port, "STEAD_WORKER_METRICS_PORT", "worker metrics"))
        if s.temporal_embedded:
            wanted += [
                (s.temporal_port, "STEAD_TEMPORAL_PORT", "Temporal"),
                (s.temporal_ui_port, "STEAD_TEMPORAL_UI_PORT", "the Temporal Web UI"),
                (s.temporal_http_port, "STEAD_TEMPORAL_HTTP_PORT", "Temporal's HTTP API"),
                (s.temporal_metrics_port, "STEAD_TEMPORAL_METRICS_PORT", "Temporal's metrics"),
            ]
        return wanted

    def check_ports(self) -> None:
        for port, variable, what in self.ports():
            if not port_free(self.settings.host, port):
                raise DevError(f"port {port} ({what}) is busy: set {variable} to move it")

    def reap_stale(self) -> None:
        """Kill children a previous `stead dev` left behind (it was SIGKILLed)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for pid_file in self.run_dir.glob("*.pid"):
            # A pid may have been reused by an unrelated process: only a process still running
            # the recorded program is ours.
            with contextlib.suppress(ValueError, IndexError, OSError, psutil.Error):
                pid_text, marker = pid_file.read_text().split(maxsplit=1)
                proc = psutil.Process(int(pid_text))
                if marker.strip() in " ".join(proc.cmdline()):
                    _terminate_group(proc.pid)
            pid_file.unlink(missing_ok=True)

    def payload_keys(self) -> str:
        if self.settings.payload_keys is not None:
            return self.settings.payload_keys.get_secret_value()
        key_file = self.data_dir / "payload.keys"
        if not key_file.exists():
            key = base64.b64encode(secrets.token_bytes(32)).decode()
            key_file.write_text(f"dev1:{key}\n")
            key_file.chmod(0o600)
        return key_file.read_text().strip()

    def integration_token(self) -> str:
        token_file = self.data_dir / "integrations.token"
        if not token_file.exists():
            token_file.write_text(secrets.token_urlsafe(24))
            token_file.chmod(0o600)
        return token_file.read_text().strip()

    def codec_token(self) -> str:
        """The codec's path token: the Web UI's only credential (see api/routes/codec.py)."""
        if self.settings.codec_token is not None:
            return self.settings.codec_token.get_secret_value()
        token_file = self.data_dir / "codec.token"
        if not token_file.exists():
            # Created 0600 from the start: the token decrypts every payload.
            fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(32))
        return token_file.read_text().strip()

    # --- services ----------------------------------------------------------------------------

    def spawn(self, name: str, args: list[str], env: dict[str, str]) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / f"{name}.log").open("ab")
        process = subprocess.Popen(  # noqa: S603  # our own binaries, no shell
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509  # no threads exist yet in this process
        )
        (self.run_dir / f"{name}.pid").write_text(f"{process.pid} {args[0]}")
        child = Child(name, process, log)
        self.children.append(child)
        return child

    def temporal_args(self) -> list[str]:
        s = self.settings
        args = [
            str(BIN / "temporal"),
            "server",
            "start-dev",
            "--db-filename",
            str(self.data_dir / "temporal.db"),
            "--ip",
            s.host,
            "--port",
            str(s.temporal_port),
            "--ui-ip",
            s.host,
            "--ui-port",
            str(s.temporal_ui_port),
            "--http-port",
            str(s.temporal_http_port),
            "--metrics-port",
            str(s.temporal_metrics_port),
            "--namespace",
            s.temporal_namespace,
            "--log-level",
            "warn",
            # Measured here: WAL + synchronous=NORMAL runs ~2.5x the default file-backed rate.
            "--sqlite-pragma",
            "journal_mode=WAL",
            "--sqlite-pragma",
            "synchronous=NORMAL",
            "--ui-codec-endpoint",
            f"{s.api_url}/codec/{self.codec_token()}",
            *dev_server_args(),
        ]
        for name, kind in SEARCH_ATTRIBUTES.items():
            args += ["--search-attribute", f"{name}={kind}"]
        return args

    async def start(self) -> dict[str, object]:
        s = self.settings
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.reap_stale()
        self.check_ports()
        env = dict(os.environ)
        env.update(
            {
                "STEAD_DATA_DIR": str(self.data_dir),
                "STEAD_PAYLOAD_KEYS": self.payload_keys(),
                # The browser may open the UI as 127.0.0.1 or as localhost: two origins.
                "STEAD_UI_ORIGIN": f"{s.ui_url},http://localhost:{s.temporal_ui_port}",
                "STEAD_CODEC_TOKEN": self.codec_token(),
            }
        )
        token = self.integration_token()
        env.setdefault("STEAD_PAYMENTS_URL", f"http://{s.host}:{s.payments_port}")
        env.setdefault("STEAD_EMAIL_URL", f"http://{s.host}:{s.email_port}")
        env.setdefault("STEAD_PAYMENTS_TOKEN", token)
        env.setdefault("STEAD_EMAIL_TOKEN", token)

        # Migrations and the demo seed run as the owner; the API and worker log in as the
        # application role and never see the owner's URL.
        owner_url = await self.start_postgres()
        app_url = self.app_database_url()
        env["STEAD_DATABASE_URL"] = app_url
        env.pop("DATABASE_URL", None)
        env.pop("STEAD_MIGRATE_DATABASE_URL", None)
        keys = await self.prepare_database(owner_url, app_url)

        if s.temporal_embedded:
            self.spawn("temporal", self.temporal_args(), env)
            env["STEAD_TEMPORAL_ADDRESS"] = s.temporal_target
        stead = str(BIN / "stead")
        self.spawn("sim", [stead, "sim"], env)
        self.spawn("integrations", [stead, "integrations"], env)
        await self.wait_for_temporal()
        self.spawn("worker", [stead, "worker"], env)
        self.spawn("api", [stead, "api"], env)
        await self.wait_for_api()
        info: dict[str, object] = {"api": s.api_url, "ui": s.ui_url, "keys": keys}
        dev_json = self.data_dir / "dev.json"
        dev_json.write_text(json.dumps(info, indent=2) + "\n")
        dev_json.chmod(0o600)
        return info

    async def start_postgres(self) -> str:
        """The owner's URL: the embedded server's superuser, or STEAD_MIGRATE_DATABASE_URL."""
        if not self.settings.database_embedded:
            assert self.settings.owner_database_url is not None
            return self.settings.owner_database_url.get_secret_value()
        self.postgres = EmbeddedPostgres(self.settings.pg_dir.resolve())
        return await asyncio.to_thread(self.postgres.start)

    def app_database_url(self) -> str:
        """The application's login: DATABASE_URL, or the embedded server's socket as the
        application role (the socket trusts local users: no password)."""
        if self.postgres is None:
            assert self.settings.database_url is not None
            return self.settings.database_url.get_secret_value()
        return self.postgres.url(user=self.settings.db_app_role)

    async def prepare_database(self, url: str, app_url: str) -> dict[str, str]:
        await migrate(url, app_url=app_url, app_role=self.settings.db_app_role)
        existing: dict[str, str] = {}
        dev_json = self.data_dir / "dev.json"
        with contextlib.suppress(OSError, ValueError, KeyError):
            existing = dict(json.loads(dev_json.read_text())["keys"])
        conn = await asyncpg.connect(url)
        try:
            return await seed_demo(conn, existing)
        finally:
            await conn.close()

    async def wait_for_temporal(self, within: float = 60) -> None:
        from stead.temporal import connect  # noqa: PLC0415  # keeps `stead --help` fast

        deadline = time.monotonic() + within
        env_settings = self.settings.model_copy(
            update={"temporal_address": self.settings.temporal_target}
        )
        last: Exception | None = None
        while time.monotonic() < deadline:
            self.check_children()
            try:
                client = await connect(env_settings)
                await client.service_client.check_health()
                return
            except Exception as exc:  # not up yet: keep polling until the deadline
                last = exc
                await asyncio.sleep(0.25)
        raise DevError(f"Temporal did not become healthy in {within:.0f}s: {last}")

    async def wait_for_api(self, within: float = 60) -> None:
        deadline = time.monotonic() + within
        async with httpx.AsyncClient() as http:
            while time.monotonic() < deadline:
                self.check_children()
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"{self.settings.api_url}/healthz")).status_code == 200:
                        return
                await asyncio.sleep(0.25)
        raise DevError(
            f"the API did not become healthy in {within:.0f}s; see {self.log_dir}/api.log"
        )

    def check_children(self) -> None:
        for child in self.children:
            code = child.process.poll()
            if code is not None:
                log = self.log_dir / f"{child.name}.log"
                raise DevError(f"{child.name} exited with code {code}; see {log}")

    async def supervise(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.check_children()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.5)

    def stop(self) -> None:
        for child in reversed(self.children):
            if child.process.poll() is None:
                _terminate_group(child.process.pid, wait=False)
        deadline = time.monotonic() + 15
        for child in reversed(self.children):
            remaining = max(deadline - time.monotonic(), 0.1)
            try:
                child.process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.process.pid, signal.SIGKILL)
                child.process.wait()
            child.log.close()
            (self.run_dir / f"{child.name}.pid").unlink(missing_ok=True)
        self.children.clear()
        if self.postgres is not None:
            self.postgres.stop()


def _terminate_group(pid: int, *, wait: bool = True) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    if not wait:
        return
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        try:
            proc.wait(timeout=10)
        except psutil.TimeoutExpired:
            os.killpg(pid, signal.SIGKILL)


def _banner(info: dict[str, object], stack: DevStack) -> str:
    keys = info["keys"]
    assert isinstance(keys, dict)
    s = stack.settings
    lines = [
        "",
        "Stead is running.",
        f"  API docs      {s.api_url}/docs",
        f"  Temporal UI   {s.ui_url}",
        f"  Temporal      {s.temporal_target}",
        f"  Simulator     http://{s.host}:{s.sim_port}  (set ANTHROPIC_API_KEY to call Claude)",
        f"  Logs          {stack.log_dir}",
        f"  Credentials   {stack.data_dir / 'dev.json'}",
        "",
        "Demo API keys (Authorization: Bearer KEY):",
        *(f"  {label:<18} {key}" for label, key in keys.items()),
        "",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


async def _main(settings: Settings) -> int:
    stack = DevStack(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        starting = asyncio.ensure_future(stack.start())
        stopping = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting not in done:
            starting.cancel()
            return 130
        stopping.cancel()
        print(_banner(starting.result(), stack), flush=True)
        await stack.supervise(stop)
        return 0
    except DevError as exc:
        print(f"stead dev: {exc}", file=sys.stderr)
        return 1
    finally:
        if stack.children or stack.postgres is not None:
            print("stopping...", file=sys.stderr, flush=True)
        await asyncio.to_thread(stack.stop)


def run_dev(settings: Settings) -> int:
    return asyncio.run(_main(settings))
