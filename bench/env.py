"""An isolated Stead platform per benchmark, configured like `stead dev`, in a temporary dir.

`bench_env(spec)` starts, in order: embedded PostgreSQL (migrated) under `<tmp>/pg`; the
Temporal dev server with `stead dev`'s exact arguments (`DevStack.temporal_args()`: file-backed
`<tmp>/temporal.db`, WAL pragmas, `dev_server_args()`, Stead's search attributes); the model
simulator at zero latency (`stead sim`); per `SteadSpec` a worker (`stead worker`) and an API
(`stead api`) on their own task queue; and, when asked, the bare worker (`python -m
bench.bare`) and the peers' workers (`bench.peers`: hand-rolled and Pydantic AI). Every
process is separate, so its CPU and memory can be read with psutil, and
each dies with the benchmark (the same parent-death signal `stead dev` uses). Both legs of a
comparison use this one server. Ports are free ones picked at start; nothing touches `.stead/`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import asyncpg
import httpx
import psutil
from pydantic import SecretStr
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client

from bench.peers import HAND, PYDANTIC_AI, pydantic_ai_command, shape
from bench.report import REPO, say
from bench.shape import ENV as SHAPE_ENV
from stead.config import Settings
from stead.dev import Child, DevStack, dev_integrations
from stead.store import principals
from stead.store.db import Pool, create_pool
from stead.store.embedded import EmbeddedPostgres
from stead.store.migrate import migrate
from stead.store.payloads import PostgresPayloadStore
from stead.telemetry import free_loopback_port
from stead.temporal import connect
from worker import APP

BIN = Path(sys.executable).parent
STEAD = str(BIN / "stead")
BARE_QUEUE = "bare"
BENCH_LIMITS = Path(__file__).with_name("limits.yaml")  # limits no benchmark reaches
SIM_HEADERS = {"x-api-key": "bench"}
# Settings that would point a child at something other than this environment.
_FOREIGN = ("STEAD_", "TEMPORAL_", "OTEL_")
BENCH_INTEGRATIONS_TOKEN = "bench-integrations-token"
_FOREIGN_NAMES = {"DATABASE_URL", "ANTHROPIC_API_KEY"}


@dataclass(frozen=True)
class RunOptions:
    """How `python -m bench` was asked to run: smoke sizes, and whether to keep the tmp dirs."""

    quick: bool = False
    keep: bool = False
    parked: int | None = None  # scale: runs parked per leg instead of the size's own
    before: str | None = None  # cuts: the revision to compare with instead of its default


@dataclass(frozen=True)
class SteadSpec:
    """One Stead worker process and its API process, polling / starting on `task_queue`."""

    name: str = "stead"
    task_queue: str = "stead"
    # Extra settings for both processes, e.g. {"STEAD_PAYLOAD_OFFLOAD_BYTES": "0"}.
    settings: Mapping[str, str] = field(default_factory=dict)
    # Command lines replacing `stead worker` / `stead api` (e.g. under a profiler).
    worker_command: tuple[str, ...] = ()
    api_command: tuple[str, ...] = ()


@dataclass(frozen=True)
class EnvSpec:
    stead: tuple[SteadSpec, ...] = (SteadSpec(),)
    bare: bool = True
    bare_command: tuple[str, ...] = ()  # replaces `python -m bench.bare`
    peers: bool = False  # the hand-rolled and Pydantic AI workers
    hand_command: tuple[str, ...] = ()  # replaces `python -m bench.handrolled`
    # PostgreSQL with pg_stat_statements loaded (a restart at start): statements per run.
    pg_statements: bool = False


@dataclass
class SteadStack:
    spec: SteadSpec
    api_url: str
    worker: Child
    api: Child


@dataclass
class Tenant:
    id: str
    keys: dict[str, str]

    def auth(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[user]}"}


USERS = {"requester": ["requester"], "approver": ["approver"], "admin": ["admin"]}


@dataclass
class BenchEnv:
    root: Path
    settings: Settings  # the driver's: Stead's converter, keys and database
    dev: DevStack
    pool: Pool
    raw: Client  # the default converter: bare workflows
    client: Client  # Stead's converter (pydantic, encryption, claim-check): Stead runs
    sim_url: str
    stacks: dict[str, SteadStack]
    bare: Child | None
    peers: bool = False

    def stack(self, name: str = "stead") -> SteadStack:
        return self.stacks[name]

    async def tenant(self, users: Mapping[str, list[str]] = USERS) -> Tenant:
        tenant = f"b-{uuid.uuid4().hex[:10]}"
        keys: dict[str, str] = {}
        async with self.pool.acquire() as conn:
            await principals.create_tenant(conn, tenant, tenant, "standard")
            for user, roles in users.items():
                await principals.upsert_principal(conn, tenant, user, list(roles))
                keys[user] = await principals.create_key(conn, tenant, user)
            # Report this connection's counts now, not up to 10 s later in a measured window.
            await conn.execute("SELECT pg_stat_force_next_flush()")
        return Tenant(tenant, keys)

    async def pg_transactions(self) -> int:
        """Transactions PostgreSQL has finished so far (each statement outside an explicit
        transaction is one): a proxy for database round trips. Backends report their counts
        at most once a second, and an idle one up to 10 s late: read it 10 s after the work."""
        async with self.pool.acquire() as conn:
            count = await conn.fetchval(
                "SELECT sum(xact_commit + xact_rollback) FROM pg_stat_database"
            )
        return int(count or 0)

    async def sim_latency(self, latency_ms: float) -> None:
        async with httpx.AsyncClient(base_url=self.sim_url, headers=SIM_HEADERS) as http:
            (await http.post("/_sim/config", json={"latency_ms": latency_ms})).raise_for_status()

    # --- processes ---------------------------------------------------------------------------

    def processes(self) -> dict[str, list[psutil.Process]]:
        """Every process of the platform by role; PostgreSQL is the postmaster and its
        backends."""
        found: dict[str, list[psutil.Process]] = {"driver": [psutil.Process()]}
        for child in self.dev.children:
            with contextlib.suppress(psutil.Error):
                found[child.name] = [psutil.Process(child.process.pid)]
        with contextlib.suppress(OSError, ValueError, IndexError, psutil.Error):
            pid_file = self.settings.pg_dir / "postmaster.pid"
            postmaster = psutil.Process(int(pid_file.read_text().split()[0]))
            found["postgres"] = [postmaster, *postmaster.children(recursive=True)]
        return found

    def cpu_seconds(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for name, procs in self.processes().items():
            total = 0.0
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    times = proc.cpu_times()
                    total += times.user + times.system
            totals[name] = total
        return totals

    def rss_mib(self, name: str) -> float:
        procs = self.processes().get(name, [])
        total = 0
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total / 2**20


def cpu_delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    return {name: after[name] - before.get(name, 0.0) for name in after}


def make_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="stead-bench-"))
    root.chmod(0o755)  # PostgreSQL runs as another user when we are root
    return root


def _base_settings(root: Path) -> Settings:
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    return Settings(
        env="dev",
        data_dir=root,
        host="127.0.0.1",
        temporal_port=free_loopback_port(),
        temporal_ui_port=free_loopback_port(),
        temporal_http_port=free_loopback_port(),
        temporal_metrics_port=free_loopback_port(),
        sim_port=free_loopback_port(),
        api_port=free_loopback_port(),
        # Two ports from here: the payments and email stand-ins.
        dev_integrations_port=free_loopback_port(),
        payload_keys=SecretStr(f"bench1:{key}"),
    )


def _child_env(settings: Settings, database_url: str, extra: Mapping[str, str]) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_FOREIGN) and k not in _FOREIGN_NAMES
    }
    assert settings.payload_keys is not None
    env.update(
        {
            "PYTHONPATH": str(REPO),
            "STEAD_ENV": "dev",
            "STEAD_DATA_DIR": str(settings.data_dir),
            "STEAD_HOST": settings.host,
            "STEAD_TEMPORAL_ADDRESS": f"{settings.host}:{settings.temporal_port}",
            "STEAD_DATABASE_URL": database_url,
            "STEAD_PAYLOAD_KEYS": settings.payload_keys.get_secret_value(),
            "STEAD_SIM_PORT": str(settings.sim_port),
            "STEAD_MODEL_BASE_URL": f"http://{settings.host}:{settings.sim_port}",
            "STEAD_LIMITS_FILE": str(BENCH_LIMITS),
            "STEAD_APP": "worker:APP",
            "STEAD_DEV_INTEGRATIONS_PORT": str(settings.dev_integrations_port),
            "STEAD_DEV_INTEGRATIONS_TOKEN": BENCH_INTEGRATIONS_TOKEN,
            "STEAD_DEV_INTEGRATIONS": ",".join(
                f"{i.name}:{port}" for i, port in dev_integrations(APP.load(settings), settings)
            ),
            **{
                f"{integration.env_prefix}{key}": value
                for integration, port in dev_integrations(APP.load(settings), settings)
                for key, value in (
                    ("URL", f"http://{settings.host}:{port}"),
                    ("TOKEN", BENCH_INTEGRATIONS_TOKEN),
                )
            },
            **extra,
        }
    )
    return env


async def _until(
    what: str, dev: DevStack, probe: Callable[[], Awaitable[bool]], within: float = 60
) -> None:
    """Poll `probe` until true; fail early, naming the log, if a child process died."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        dev.check_children()
        with contextlib.suppress(Exception):  # not up yet: any error means "try again"
            if await probe():
                return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{what} did not become ready in {within:.0f}s; logs in {dev.log_dir}")


async def _http_ok(url: str, headers: Mapping[str, str] | None = None) -> bool:
    async with httpx.AsyncClient(timeout=2) as http:
        return (await http.get(url, headers=headers)).status_code == 200


async def _has_pollers(client: Client, queue: str, kind: TaskQueueType.ValueType) -> bool:
    described = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=client.namespace, task_queue=TaskQueue(name=queue), task_queue_type=kind
        )
    )
    return bool(described.pollers)


def _spawn_stack(dev: DevStack, settings: Settings, url: str, spec: SteadSpec) -> SteadStack:
    api_port = free_loopback_port()
    env = _child_env(
        settings,
        url,
        {
            "STEAD_TASK_QUEUE": spec.task_queue,
            "STEAD_API_PORT": str(api_port),
            "STEAD_WORKER_METRICS_PORT": str(free_loopback_port()),
            **spec.settings,
        },
    )
    worker = dev.spawn(f"{spec.name}-worker", list(spec.worker_command or (STEAD, "worker")), env)
    api = dev.spawn(f"{spec.name}-api", list(spec.api_command or (STEAD, "api")), env)
    return SteadStack(spec, f"http://{settings.host}:{api_port}", worker, api)


async def _load_pg_statements(postgres: EmbeddedPostgres, url: str) -> None:
    """Load pg_stat_statements (a preloaded library: it takes a restart) and create it."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
    finally:
        await conn.close()
    postgres.stop()
    postgres.start()
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    finally:
        await conn.close()


def _spawn_peers(dev: DevStack, settings: Settings, url: str, spec: EnvSpec) -> None:
    shape_env = {SHAPE_ENV: shape().to_env()}
    hand_env = _child_env(settings, url, {"STEAD_TASK_QUEUE": HAND.queue, **shape_env})
    command = spec.hand_command or (sys.executable, "-m", "bench.handrolled")
    dev.spawn("hand-worker", list(command), hand_env)
    pai_env = _child_env(settings, url, {"STEAD_TASK_QUEUE": PYDANTIC_AI.queue, **shape_env})
    dev.spawn("pai-worker", list(pydantic_ai_command()), pai_env)


async def _start(dev: DevStack, settings: Settings, spec: EnvSpec) -> BenchEnv:
    postgres = EmbeddedPostgres(settings.pg_dir.resolve())
    dev.postgres = postgres  # DevStack.stop() stops it
    url = postgres.start()  # the owner's: migrations and the driver's own pool
    if spec.pg_statements:
        await _load_pg_statements(postgres, url)
    assert APP.migrations is not None
    await migrate(url, application=(APP.name, APP.migrations))
    app_url = postgres.url(user=settings.db_app_role)  # what Stead's processes log in as
    base_env = _child_env(settings, app_url, {})
    dev.spawn("temporal", dev.temporal_args(), base_env)
    dev.spawn("sim", [STEAD, "sim"], base_env)
    # The reference application's integrations, as `stead dev` serves them.
    dev.spawn("integrations", [STEAD, "dev-integrations"], base_env)
    http_api = f"http://{settings.host}:{settings.temporal_http_port}"
    sim_url = f"http://{settings.host}:{settings.sim_port}"
    await _until("Temporal", dev, lambda: _http_ok(f"{http_api}/api/v1/namespaces/default"))
    await _until("the simulator", dev, lambda: _http_ok(f"{sim_url}/_sim/stats", SIM_HEADERS))
    # Children are spawned before this process starts any threads (the Temporal client's).
    stacks = {s.name: _spawn_stack(dev, settings, app_url, s) for s in spec.stead}
    bare = None
    if spec.bare:
        bare_env = _child_env(settings, app_url, {"STEAD_TASK_QUEUE": BARE_QUEUE})
        command = spec.bare_command or (sys.executable, "-m", "bench.bare")
        bare = dev.spawn("bare-worker", list(command), bare_env)
    if spec.peers:
        _spawn_peers(dev, settings, app_url, spec)
    driver = settings.model_copy(
        update={
            "database_url": SecretStr(app_url),
            "temporal_address": f"{settings.host}:{settings.temporal_port}",
            "model_base_url": sim_url,
        }
    )
    pool = await create_pool(url, app_role=None, max_size=20)
    raw = await Client.connect(driver.temporal_target)
    client = await connect(driver, payload_store=PostgresPayloadStore(pool))
    env = BenchEnv(
        settings.data_dir, driver, dev, pool, raw, client, sim_url, stacks, bare, spec.peers
    )
    await _ready(env)
    return env


async def _ready(env: BenchEnv) -> None:
    workflow = TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW
    activity = TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY
    for stack in env.stacks.values():
        queue = stack.spec.task_queue
        await _until(stack.worker.name, env.dev, partial(_has_pollers, env.raw, queue, workflow))
        model_queue = partial(_has_pollers, env.raw, f"{queue}-model", activity)
        await _until(f"{stack.worker.name} (model queue)", env.dev, model_queue)
        await _until(stack.api.name, env.dev, partial(_http_ok, f"{stack.api_url}/healthz"))
    if env.bare is not None:
        await _until("bare-worker", env.dev, partial(_has_pollers, env.raw, BARE_QUEUE, workflow))
    if env.peers:
        for name, queue in (("hand-worker", HAND.queue), ("pai-worker", PYDANTIC_AI.queue)):
            await _until(name, env.dev, partial(_has_pollers, env.raw, queue, workflow))


@contextlib.asynccontextmanager
async def bench_env(spec: EnvSpec, options: RunOptions) -> AsyncIterator[BenchEnv]:
    """The platform for one benchmark; stopped and deleted on exit (kept with `--keep`)."""
    root = make_root()
    dev = DevStack(_base_settings(root))
    dev.run_dir.mkdir(parents=True)
    started = time.monotonic()
    env: BenchEnv | None = None
    try:
        env = await _start(dev, dev.settings, spec)
        say(f"environment up in {time.monotonic() - started:.1f} s ({root})")
        yield env
    finally:
        if env is not None:
            await env.pool.close()
        dev.stop()
        if options.keep:
            say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
