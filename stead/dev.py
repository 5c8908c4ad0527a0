"""`stead dev`: the whole platform on one machine, started, supervised and stopped cleanly.

Starts (on 127.0.0.1, every port pinned by settings):
  PostgreSQL (embedded, under <data_dir>/pg)    unless DATABASE_URL is set
  Temporal dev server + Web UI (<data_dir>/temporal.db)   unless STEAD_TEMPORAL_ADDRESS is set
  the model simulator, the loopback payment and email services, one worker, the API.

It is a supervisor (stead/supervisor.py): a child that crashes, or a PostgreSQL whose
postmaster is gone, is started again with back-off, one line on stderr per restart; after
repeated crashes of one it stops everything and exits 1. The worker and the API are restarted
only once the servers they need serve again.

One `stead dev` per data directory: it holds an flock on <data_dir>/dev.lock for its lifetime,
and a second one says who holds it and leaves everything alone. Children run in their own
sessions with a parent-death signal, and their pids are recorded under <data_dir>/run:
Ctrl-C or SIGTERM stops them in order; if `stead dev` itself is killed with SIGKILL they
receive SIGTERM from the kernel (and the lock is released with its last descriptor), and the
next start kills any leftover whose pid file survived. PostgreSQL (daemonized by pg_ctl) is
reused if still running.

Everything under <data_dir> is owner-only: files 0600, directories 0700, created so (a umask
of 077 for `stead dev` and its children). The one exception: as root, PostgreSQL runs as the
system user `embedded_postgres`, which must reach <data_dir>/pg; <data_dir> is then 0711
(others may traverse it to a name they know, not list or read it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

import asyncpg
import httpx
import psutil
import yaml

from stead.config import Settings
from stead.dbcheck import database_problem
from stead.search import SEARCH_ATTRIBUTES
from stead.store.embedded import EmbeddedPostgres
from stead.store.migrate import migrate
from stead.store.seed import seed_demo
from stead.supervisor import GiveUp, Supervisor
from stead.temporal import dev_server_args

if TYPE_CHECKING:
    from stead.app import Runtime
    from stead.integrations import Integration

_PR_SET_PDEATHSIG = 1
# Resolved before any fork: the child then makes a plain call, no dynamic loading.
_prctl = ctypes.CDLL(None, use_errno=True).prctl
BIN = Path(sys.executable).parent
PRIVATE_UMASK = 0o077
# The Temporal CLI's `--env-file` (kept for compatibility; its TOML profiles hold client
# settings only) sets any flag of the command from a YAML file: the one way to hand
# `server start-dev` a value that `ps` must not show. tests/test_dev.py checks it still works.
_TEMPORAL_ENV = "stead"


class DevError(Exception):
    """A start-up problem, explained in one line."""


def _child_setup() -> None:
    # Runs in the child between fork and exec: the kernel sends SIGTERM when `stead dev` dies,
    # and whatever the child creates (temporal.db and its -wal/-shm, ...) is owner-only.
    os.umask(PRIVATE_UMASK)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def write_private(path: Path, text: str) -> None:
    """Replace `path` with `text`, owner-only from the first byte (never widened, then fixed)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    tmp.replace(path)


def private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def open_log(path: Path) -> IO[bytes]:
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")


def _narrow(path: Path, mode: int) -> None:
    with contextlib.suppress(OSError):
        if not path.is_symlink() and path.stat().st_mode & 0o077:
            path.chmod(mode)


def exit_description(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"exited with code {code} ({signal.Signals(-code).name})"
    return f"exited with code {code}"


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: IO[bytes]
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    # Supervised units that must serve before this child is restarted.
    needs: tuple[str, ...] = ()
    # Whether a restarted child serves again; None: running is serving.
    probe: Callable[[], Awaitable[bool]] | None = None


@dataclass
class ChildUnit:
    """A child process as the supervisor sees it."""

    stack: DevStack
    child: Child

    @property
    def name(self) -> str:
        return self.child.name

    @property
    def needs(self) -> tuple[str, ...]:
        return self.child.needs

    def failure(self) -> str | None:
        code = self.child.process.poll()
        return None if code is None else exit_description(code)

    async def restart(self) -> None:
        self.stack.respawn(self.child)

    async def ready(self) -> bool:
        return self.child.probe is None or await self.child.probe()


@dataclass
class PostgresUnit:
    """The embedded PostgreSQL: pg_ctl daemonizes it, so it is watched by its postmaster's pid
    (psutil tells a reused pid from ours by its start time) and restarted through
    `EmbeddedPostgres.start()`, which also recovers from the stale postmaster.pid of a kill."""

    postgres: EmbeddedPostgres
    after_start: Callable[[], None]
    postmaster: psutil.Process | None = None
    name: str = "postgres"
    needs: tuple[str, ...] = ()

    def watch(self) -> None:
        pid_file = self.postgres.pgdata / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError, psutil.Error):
            self.postmaster = psutil.Process(int(pid_file.read_text().split()[0]))

    def failure(self) -> str | None:
        proc = self.postmaster
        with contextlib.suppress(psutil.Error):
            # is_running() compares start times: a reused pid is not our postmaster.
            if proc is not None and proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                return None
        # Not our child: its exit code went to whoever reaped it.
        pid = proc.pid if proc is not None else "?"
        return f"stopped (postmaster pid {pid} is gone, exit code unknown)"

    async def restart(self) -> None:
        # pg_ctl takes a killed postmaster not reaped yet (a zombie) for a running server.
        if self.postmaster is not None:
            with contextlib.suppress(psutil.Error):
                await asyncio.to_thread(self.postmaster.wait, 10)
        try:
            await asyncio.to_thread(self.postgres.start)
        finally:
            self.after_start()
        self.watch()
        if self.failure() is not None:
            raise RuntimeError("pg_ctl reported a running server, but no postmaster runs")

    async def ready(self) -> bool:
        return True  # pg_ctl start -w returned: it accepts connections


def dev_integrations(runtime: Runtime, settings: Settings) -> list[tuple[Integration, int]]:
    """The application's integrations `stead dev` stands in for (those with a `dev_app` and
    no configuration), each with its port: STEAD_DEV_INTEGRATIONS_PORT, then up by one."""
    unconfigured = [i for i in runtime.unconfigured() if i.dev_app is not None]
    ordered = sorted(unconfigured, key=lambda i: i.name)
    return [(i, settings.dev_integrations_port + n) for n, i in enumerate(ordered)]


@dataclass
class DevStack:
    settings: Settings
    # The application: its migrations, seed and integration stand-ins (None: the platform's
    # own parts only, as tests of single pieces use it).
    runtime: Runtime | None = None
    children: list[Child] = field(default_factory=list)
    postgres: EmbeddedPostgres | None = None
    lock: IO[str] | None = None
    postgres_unit: PostgresUnit | None = None

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

    def acquire_lock(self) -> None:
        """Hold <data_dir>/dev.lock for this process's lifetime, or say who holds it.

        An flock, not a pid file: the kernel drops it when its holder dies however it dies,
        so a SIGKILLed `stead dev` never blocks the next one, and a live one is never mistaken
        for a stale one."""
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.data_dir / "dev.lock"
        lock = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o600), "r+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock.read().strip() or "unknown"
            lock.close()
            raise DevError(f"already running (pid {holder}); stop it first") from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self.lock = lock

    def release_lock(self) -> None:
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def data_dir_mode(self) -> int:
        # As root, PostgreSQL runs as `embedded_postgres` and must traverse <data_dir> to pg/.
        shared = os.geteuid() == 0 and self.settings.database_embedded
        return 0o711 if shared else 0o700

    def make_private(self) -> None:
        """Owner-only <data_dir>, and state an older `stead dev` left readable tightened.

        New files are created owner-only; this fixes what earlier versions wrote with the
        default umask. `pg/` is PostgreSQL's own (it keeps it 0700 itself)."""
        self.data_dir.chmod(self.data_dir_mode())
        pg_dir = self.settings.pg_dir.resolve()
        for root, dirs, files in os.walk(self.data_dir):
            here = Path(root)
            dirs[:] = [d for d in dirs if here / d != pg_dir]
            for names, mode in ((dirs, 0o700), (files, 0o600)):
                for name in names:
                    _narrow(here / name, mode)

    def ports(self) -> list[tuple[int, str, str]]:
        s = self.settings
        wanted = [
            (s.api_port, "STEAD_API_PORT", "the API"),
            (s.sim_port, "STEAD_SIM_PORT", "the model simulator"),
            *(
                (port, "STEAD_DEV_INTEGRATIONS_PORT", f"the {integration.name} stand-in")
                for integration, port in self.stand_ins()
            ),
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
        """Kill children a previous `stead dev` left behind (it was SIGKILLed). Only called
        while holding the lock: no live `stead dev` owns these pid files."""
        private_dir(self.run_dir)
        for pid_file in self.run_dir.glob("*.pid"):
            # A pid may have been reused by an unrelated process: only a process still running
            # the recorded program is ours.
            with contextlib.suppress(ValueError, IndexError, OSError, psutil.Error):
                pid_text, marker = pid_file.read_text().split(maxsplit=1)
                proc = psutil.Process(int(pid_text))
                if marker.strip() in " ".join(proc.cmdline()):
                    _terminate_group(proc.pid)
            pid_file.unlink(missing_ok=True)

    def _secret_file(self, name: str, make: Callable[[], str]) -> str:
        path = self.data_dir / name
        if not path.exists():
            write_private(path, make())
        return path.read_text().strip()

    def payload_keys(self) -> str:
        if self.settings.payload_keys is not None:
            return self.settings.payload_keys.get_secret_value()
        return self._secret_file(
            "payload.keys", lambda: f"dev1:{base64.b64encode(secrets.token_bytes(32)).decode()}\n"
        )

    def integration_token(self) -> str:
        return self._secret_file("integrations.token", lambda: secrets.token_urlsafe(24))

    def codec_token(self) -> str:
        """The codec's path token: the Web UI's only credential (see api/routes/codec.py)."""
        if self.settings.codec_token is not None:
            return self.settings.codec_token.get_secret_value()
        return self._secret_file("codec.token", lambda: secrets.token_urlsafe(32))

    # --- services ----------------------------------------------------------------------------

    def _popen(
        self, name: str, args: list[str], env: dict[str, str], log: IO[bytes]
    ) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(  # noqa: S603  # our own binaries, no shell
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            # Restarts fork a process that has threads (the Temporal client's). The hook stays
            # safe: two system calls through functions resolved before the fork (no import, no
            # dlopen), and glibc resets its malloc locks in the child. Always called from the
            # main thread: the parent-death signal follows the thread that forked.
            preexec_fn=_child_setup,  # noqa: PLW1509
        )
        write_private(self.run_dir / f"{name}.pid", f"{process.pid} {args[0]}")
        return process

    def spawn(
        self,
        name: str,
        args: list[str],
        env: dict[str, str],
        *,
        needs: tuple[str, ...] = (),
        probe: Callable[[], Awaitable[bool]] | None = None,
    ) -> Child:
        private_dir(self.run_dir)
        log = open_log(private_dir(self.log_dir) / f"{name}.log")
        process = self._popen(name, args, env, log)
        child = Child(name, process, log, list(args), dict(env), needs, probe)
        self.children.append(child)
        return child

    def respawn(self, child: Child) -> None:
        """Start a crashed child again in place: same program, environment and log."""
        child.process = self._popen(child.name, child.args, child.env, child.log)

    def temporal_env_file(self) -> Path:
        """The Temporal CLI's env file carrying the UI's codec endpoint, whose path holds the
        codec token: on the command line it would be readable by every local user in `ps`."""
        path = self.data_dir / "temporal-env.yaml"
        endpoint = f"{self.settings.api_url}/codec/{self.codec_token()}"
        config = {"env": {_TEMPORAL_ENV: {"ui-codec-endpoint": endpoint}}}
        write_private(path, yaml.safe_dump(config))
        return path

    def temporal_args(self) -> list[str]:
        s = self.settings
        args = [
            str(BIN / "temporal"),
            "server",
            "start-dev",
            "--env-file",
            str(self.temporal_env_file()),
            "--env",
            _TEMPORAL_ENV,
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
            *dev_server_args(),
        ]
        for name, kind in SEARCH_ATTRIBUTES.items():
            args += ["--search-attribute", f"{name}={kind}"]
        return args

    async def start(self) -> dict[str, object]:
        s = self.settings
        self.acquire_lock()
        self.make_private()
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
        # The application's unconfigured integrations get loopback stand-ins (its `dev_app`s),
        # their URLs and one private token handed to the worker as their configuration.
        stand_ins = self.stand_ins()
        if stand_ins:
            token = self.integration_token()
            env["STEAD_DEV_INTEGRATIONS_TOKEN"] = token
            # What the stand-ins' child serves: it sees the configuration below like every
            # child, so it is told rather than asked to work out what is unconfigured.
            env["STEAD_DEV_INTEGRATIONS"] = ",".join(f"{i.name}:{p}" for i, p in stand_ins)
            for integration, port in stand_ins:
                env[f"{integration.env_prefix}URL"] = f"http://{s.host}:{port}"
                env[f"{integration.env_prefix}TOKEN"] = token

        # Migrations and the demo seed run as the owner; the API and worker log in as the
        # application role and never see the owner's URL.
        owner_url = await self.start_postgres()
        app_url = self.app_database_url()
        env["STEAD_DATABASE_URL"] = app_url
        env.pop("DATABASE_URL", None)
        env.pop("STEAD_MIGRATE_DATABASE_URL", None)
        keys = await self.prepare_database(owner_url, app_url)

        servers: tuple[str, ...] = ("postgres",) if s.database_embedded else ()
        if s.temporal_embedded:
            self.spawn("temporal", self.temporal_args(), env, probe=self.temporal_healthy)
            env["STEAD_TEMPORAL_ADDRESS"] = s.temporal_target
            # The children see an external Temporal now: tell the web app where its UI is.
            env["STEAD_TEMPORAL_UI_URL"] = s.temporal_ui_base or s.ui_url
            servers += ("temporal",)
        stead = str(BIN / "stead")
        self.spawn("sim", [stead, "sim"], env, probe=self.answers(s.sim_port))
        if stand_ins:
            first = self.answers(stand_ins[0][1])
            self.spawn("integrations", [stead, "dev-integrations"], env, probe=first)
        await self.wait_for_temporal()
        metrics = self.answers(s.worker_metrics_port) if s.worker_metrics_port else None
        self.spawn("worker", [stead, "worker"], env, needs=servers, probe=metrics)
        self.spawn("api", [stead, "api"], env, needs=servers, probe=self.answers(s.api_port))
        await self.wait_for_api()
        info: dict[str, object] = {"api": s.api_url, "ui": s.ui_url, "keys": keys}
        write_private(self.data_dir / "dev.json", json.dumps(info, indent=2) + "\n")
        await self.run_demo(keys)
        return info

    async def run_demo(self, keys: Mapping[str, str]) -> None:
        """The application's demo hook, through the API; a failure is said, not fatal: the
        platform serves without its demo."""
        demo = self.runtime.app.demo if self.runtime else None
        if demo is None:
            return
        try:
            async with httpx.AsyncClient(base_url=self.settings.api_url, timeout=30) as api:
                await demo(api, keys)
        except Exception as exc:  # an app's code: whatever it raised, the stack stays up
            _say(f"the application's demo did not run: {type(exc).__name__}")

    async def start_postgres(self) -> str:
        """The owner's URL: the embedded server's superuser, or STEAD_MIGRATE_DATABASE_URL."""
        if not self.settings.database_embedded:
            assert self.settings.owner_database_url is not None
            url = self.settings.owner_database_url.get_secret_value()
            named = (
                "STEAD_MIGRATE_DATABASE_URL"
                if self.settings.migrate_database_url
                else "DATABASE_URL"
            )
            if (problem := await database_problem(url, named)) is not None:
                raise DevError(problem)
            return url
        self.postgres = EmbeddedPostgres(self.settings.pg_dir.resolve())
        self.postgres_unit = PostgresUnit(self.postgres, after_start=self.narrow_data_dir)
        try:
            return await asyncio.to_thread(self.postgres.start)
        finally:
            self.narrow_data_dir()
            self.postgres_unit.watch()

    def narrow_data_dir(self) -> None:
        # embedded_postgres widens every ancestor of pg/ to g+rx,o+rx on each start: <data_dir>
        # goes back to traverse-only, so nobody else can list it.
        self.data_dir.chmod(self.data_dir_mode())

    def app_database_url(self) -> str:
        """The application's login: DATABASE_URL, or the embedded server's socket as the
        application role (the socket trusts local users: no password)."""
        if self.postgres is None:
            assert self.settings.database_url is not None
            return self.settings.database_url.get_secret_value()
        return self.postgres.url(user=self.settings.db_app_role)

    def stand_ins(self) -> list[tuple[Integration, int]]:
        return dev_integrations(self.runtime, self.settings) if self.runtime else []

    async def prepare_database(self, url: str, app_url: str) -> dict[str, str]:
        app = self.runtime.app if self.runtime else None
        await migrate(
            url,
            app_url=app_url,
            app_role=self.settings.db_app_role,
            application=(app.name, app.migrations) if app and app.migrations else None,
        )
        existing: dict[str, str] = {}
        dev_json = self.data_dir / "dev.json"
        with contextlib.suppress(OSError, ValueError, KeyError):
            existing = dict(json.loads(dev_json.read_text())["keys"])
        conn = await asyncpg.connect(url)
        try:
            return await seed_demo(conn, existing, app.seed if app else None)
        finally:
            await conn.close()

    async def temporal_healthy(self) -> bool:
        from stead.temporal import connect  # noqa: PLC0415  # keeps `stead --help` fast

        target = self.settings.model_copy(
            update={"temporal_address": self.settings.temporal_target}
        )
        try:
            client = await connect(target)
            await client.service_client.check_health()
        except Exception:  # not up (yet): any failure means "not healthy"
            return False
        return True

    def answers(self, port: int) -> Callable[[], Awaitable[bool]]:
        """A probe: whether an HTTP server answers on `port` (any status: it serves)."""
        url = f"http://{self.settings.host}:{port}/"

        async def probe() -> bool:
            async with httpx.AsyncClient(timeout=2) as http:
                try:
                    await http.get(url)
                except httpx.HTTPError:
                    return False
            return True

        return probe

    async def wait_for_temporal(self, within: float = 60) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            self.check_children()
            if await self.temporal_healthy():
                return
            await asyncio.sleep(0.25)
        raise DevError(
            f"Temporal did not become healthy in {within:.0f}s; see {self.log_dir}/temporal.log"
        )

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
                raise DevError(f"{child.name} {exit_description(code)}; see {log}")

    def supervisor(self, say: Callable[[str], None]) -> Supervisor:
        units: list[ChildUnit | PostgresUnit] = []
        if self.postgres_unit is not None:
            units.append(self.postgres_unit)
        units += [ChildUnit(self, child) for child in self.children]
        return Supervisor(units, say)

    async def supervise(self, stop: asyncio.Event, say: Callable[[str], None]) -> None:
        """Keep every child (and the embedded PostgreSQL) running until `stop` is set; raise
        DevError when one crashes too often (the caller then stops everything)."""
        supervisor = self.supervisor(say)
        while not stop.is_set():
            try:
                await supervisor.tend(time.monotonic())
            except GiveUp as exc:
                log = self.log_dir / f"{exc.unit}.log"
                if exc.unit == "postgres":
                    log = self.settings.pg_dir.resolve() / "server.log"
                raise DevError(f"{exc}; see {log}") from None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.25)

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
        self.release_lock()


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
        f"  Web app       {s.api_url}/ui/  (sign in with a demo key below: acme/approver"
        " approves refunds, acme/admin sees runs and usage)",
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


def _say(line: str) -> None:
    print(f"stead dev: {line}", file=sys.stderr, flush=True)


async def _main(settings: Settings, runtime: Runtime) -> int:
    # Owner-only from the first file: logs, pid files, keys, dev.json, what pg_ctl writes.
    os.umask(PRIVATE_UMASK)
    stack = DevStack(settings, runtime)
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
        await stack.supervise(stop, _say)
        return 0
    except DevError as exc:
        print(f"stead dev: {exc}", file=sys.stderr)
        return 1
    finally:
        if stack.children or stack.postgres is not None:
            print("stopping...", file=sys.stderr, flush=True)
        await asyncio.to_thread(stack.stop)


def run_dev(settings: Settings, runtime: Runtime) -> int:
    return asyncio.run(_main(settings, runtime))
