"""Session-wide real parts: PostgreSQL, Temporal, the simulator, the loopback integrations.

Each test gets what it needs to stay independent of the others without restarting anything:
a fresh tenant (every table is tenant-scoped), a fresh task queue, its own worker.
"""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import yaml
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from stead import search
from stead.api.app import create_app
from stead.app import Runtime
from stead.config import Settings
from stead.policy.limits import LimitPolicy
from stead.policy.permissions import PLATFORM_TENANT
from stead.service.access import Services
from stead.sim.integrations import create_email_app, create_payments_app
from stead.sim.messages import SimConfig
from stead.sim.messages import create_app as create_sim
from stead.store import principals
from stead.store.audit import audit_writer
from stead.store.db import Pool, create_pool
from stead.store.embedded import EmbeddedPostgres
from stead.store.migrate import migrate
from stead.store.payloads import PostgresPayloadStore
from stead.telemetry import tracing_interceptor
from stead.temporal import data_converter, dev_server_args, ensure_search_attributes
from stead.worker import build_workers, make_deps
from tests.servers import serve_app
from worker import APP

# Spans from every test land here (one process-wide provider, as in production).
SPANS = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(SPANS))
trace.set_tracer_provider(_provider)

BIN = Path(sys.executable).parent
TEMPORAL = BIN / "temporal"
TEST_SERVER = BIN / "temporal-test-server"
INTEGRATION_TOKEN = "integration-test-token"
PAYLOAD_KEYS = "test1:" + base64.b64encode(b"k" * 32).decode()


@pytest.fixture(scope="session")
def tmp_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stead")


@pytest.fixture(scope="session")
def postgres(tmp_root: Path) -> Iterator[EmbeddedPostgres]:
    # `make mutants` runs thousands of short sessions: they share one server it started (and
    # stops), instead of each paying for an initdb.
    shared = os.environ.get("STEAD_TEST_PGDATA")
    pg = EmbeddedPostgres(Path(shared) if shared else tmp_root / "pg")
    pg.start()
    yield pg
    if not shared:
        pg.stop("immediate")


@pytest.fixture(scope="session")
async def database_url(postgres: EmbeddedPostgres) -> str:
    """The owner's (a superuser's) URL: migrations, and tests that inspect or tamper."""
    url = postgres.url()
    assert APP.migrations is not None
    await migrate(url, application=(APP.name, APP.migrations))
    return url


@pytest.fixture(scope="session")
def app_database_url(postgres: EmbeddedPostgres, database_url: str) -> str:
    """The application's login, as in production: the `stead_app` role itself (the embedded
    server trusts its Unix socket, so no password)."""
    return postgres.url(user="stead_app")


@pytest.fixture(scope="session")
async def pool(app_database_url: str) -> AsyncIterator[Pool]:
    created = await create_pool(app_database_url, app_role="stead_app", max_size=20)
    yield created
    await created.close()


@pytest.fixture(scope="session")
async def sim_url() -> AsyncIterator[str]:
    async with serve_app(create_sim(SimConfig())) as url:
        yield url


@dataclass(frozen=True)
class Integrations:
    """The reference application's loopback integrations, and the file configuring them."""

    payments: str
    email: str
    token: str
    file: Path

    def configured(self, path: Path, **urls: str) -> Path:
        """A configuration file like `file`, with some URLs changed (e.g. a faulty payments
        service for one test)."""
        return write_integrations(
            path, {"payments": self.payments, "email": self.email, **urls}, self.token
        )


def write_integrations(path: Path, urls: dict[str, str], token: str) -> Path:
    """`STEAD_INTEGRATIONS_FILE` content: each integration's URL and credential."""
    path.write_text(
        yaml.safe_dump({name: {"url": url, "token": token} for name, url in urls.items()})
    )
    path.chmod(0o600)
    return path


@pytest.fixture(scope="session")
async def integrations(tmp_root: Path) -> AsyncIterator[Integrations]:
    async with AsyncExitStack() as stack:
        payments = await stack.enter_async_context(
            serve_app(create_payments_app(INTEGRATION_TOKEN, tmp_root / "payments.jsonl"))
        )
        email = await stack.enter_async_context(
            serve_app(create_email_app(INTEGRATION_TOKEN, tmp_root / "email.jsonl"))
        )
        file = write_integrations(
            tmp_root / "integrations.yaml",
            {"payments": payments, "email": email},
            INTEGRATION_TOKEN,
        )
        yield Integrations(payments, email, INTEGRATION_TOKEN, file)


@pytest.fixture(scope="session")
def settings(
    database_url: str,
    app_database_url: str,
    sim_url: str,
    integrations: Integrations,
    tmp_root: Path,
) -> Settings:
    return Settings(
        env="test",
        data_dir=tmp_root / "data",
        database_url=app_database_url,
        migrate_database_url=database_url,
        model_base_url=sim_url,
        payload_keys=PAYLOAD_KEYS,
        integrations_file=integrations.file,
        app="worker:APP",
        model_timeout_seconds=5,
        # Committed histories must replay without this database: record them inline.
        payload_offload_bytes=0 if os.environ.get("STEAD_RECORD_HISTORIES") == "1" else 2048,
        worker_metrics_port=0,  # tests that want a worker's /metrics pick a free port
    )


@pytest.fixture(scope="session")
async def temporal(settings: Settings, pool: Pool) -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(TEMPORAL),
        data_converter=data_converter(settings, PostgresPayloadStore(pool)),
        search_attributes=search.KEYS,
        dev_server_extra_args=dev_server_args(),
        interceptors=[tracing_interceptor()],
    )
    yield env
    await env.shutdown()


@pytest.fixture(scope="session")
def client(temporal: WorkflowEnvironment) -> Client:
    return temporal.client


def app_runtime(settings: Settings) -> Runtime:
    """The reference application's registries for `settings` (as `App.load` builds them at a
    process's start)."""
    return APP.load(settings)


@pytest.fixture(scope="session")
def runtime(settings: Settings) -> Runtime:
    return app_runtime(settings)


def make_services(
    settings: Settings, client: Client, pool: Pool, limits: LimitPolicy | None = None
) -> Services:
    """The API's services for `settings`, as `create_app` builds them in a process."""
    runtime = app_runtime(settings)
    audit = audit_writer(settings, runtime.policies.redaction)
    return Services(settings, client, pool, runtime, audit, limits)


@dataclass
class Tenant:
    id: str
    keys: dict[str, str]

    def auth(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[user]}"}


TenantFactory = Callable[..., Awaitable[Tenant]]


@pytest.fixture
async def make_tenant(database_url: str) -> TenantFactory:
    async def make(users: dict[str, list[str]] | None = None, plan: str = "standard") -> Tenant:
        tenant = f"t-{uuid.uuid4().hex[:10]}"
        users = users or {
            "requester": ["requester"],
            "approver": ["approver"],
            "finance": ["approver", "finance"],
            "admin": ["admin"],
        }
        conn = await asyncpg.connect(database_url)
        try:
            await principals.create_tenant(conn, tenant, tenant, plan)
            keys = {}
            for user, roles in users.items():
                await principals.upsert_principal(conn, tenant, user, roles)
                keys[user] = await principals.create_key(conn, tenant, user)
        finally:
            await conn.close()
        return Tenant(tenant, keys)

    return make


@pytest.fixture
async def tenant(make_tenant: TenantFactory) -> Tenant:
    return await make_tenant()


@pytest.fixture
async def operator(database_url: str) -> dict[str, str]:
    """Authorization headers of a platform operator: a member of the platform tenant, outside
    every customer tenant, made the way `stead admin operator-create` makes one."""
    conn = await asyncpg.connect(database_url)
    try:
        await principals.create_tenant(conn, PLATFORM_TENANT, "Platform", "platform")
        user = f"op-{uuid.uuid4().hex[:8]}"
        await principals.upsert_principal(conn, PLATFORM_TENANT, user, ["operator"])
        key = await principals.create_key(conn, PLATFORM_TENANT, user)
    finally:
        await conn.close()
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def task_queue() -> str:
    return f"tq-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def test_settings(settings: Settings, task_queue: str) -> Settings:
    return settings.model_copy(update={"task_queue": task_queue})


@asynccontextmanager
async def running_workers(
    client: Client, settings: Settings, pool: Pool
) -> AsyncIterator[list[Worker]]:
    deps = make_deps(pool, settings)
    workers = build_workers(client, settings, deps, app_runtime(settings))
    async with AsyncExitStack() as stack:
        for w in workers:
            await stack.enter_async_context(w)
        yield workers
    await deps.close()


@pytest.fixture
async def worker(
    client: Client, test_settings: Settings, pool: Pool
) -> AsyncIterator[list[Worker]]:
    async with running_workers(client, test_settings, pool) as workers:
        yield workers


@pytest.fixture
async def api(
    client: Client, test_settings: Settings, pool: Pool
) -> AsyncIterator[httpx.AsyncClient]:
    services = make_services(test_settings, client, pool)
    app = create_app(test_settings, services)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://stead.test") as http:
        yield http


def random_key() -> str:
    return secrets.token_hex(8)


@pytest.fixture(scope="session")
async def time_env(settings: Settings, pool: Pool) -> AsyncIterator[WorkflowEnvironment]:
    """The time-skipping test server: deadlines of hours pass in milliseconds."""
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(TEST_SERVER),
        data_converter=data_converter(settings, PostgresPayloadStore(pool)),
    )
    await ensure_search_attributes(env.client)
    yield env
    await env.shutdown()


@pytest.fixture
async def time_worker(
    time_env: WorkflowEnvironment, test_settings: Settings, pool: Pool
) -> AsyncIterator[list[Worker]]:
    async with running_workers(time_env.client, test_settings, pool) as workers:
        yield workers


@dataclass
class SimControl:
    """Fault injection on the session's simulator; faults are cleared after each test."""

    http: httpx.AsyncClient

    async def fault(self, status: int, count: int = 1, **options: Any) -> None:
        response = await self.http.post(
            "/_sim/faults", json={"status": status, "count": count, **options}
        )
        response.raise_for_status()

    async def stats(self) -> dict[str, Any]:
        return dict((await self.http.get("/_sim/stats")).json())


@pytest.fixture
async def sim(sim_url: str) -> AsyncIterator[SimControl]:
    headers = {"x-api-key": "test"}
    async with httpx.AsyncClient(base_url=sim_url, headers=headers) as http:
        control = SimControl(http)
        yield control
        await http.delete("/_sim/faults")


@pytest.fixture
async def api_for(
    client: Client, pool: Pool
) -> AsyncIterator[Callable[[Settings], httpx.AsyncClient]]:
    """An API client for settings other than the test's defaults."""
    opened: list[httpx.AsyncClient] = []

    def make(settings: Settings) -> httpx.AsyncClient:
        services = make_services(settings, client, pool)
        transport = httpx.ASGITransport(app=create_app(settings, services))
        http = httpx.AsyncClient(transport=transport, base_url="http://stead.test")
        opened.append(http)
        return http

    yield make
    for http in opened:
        await http.aclose()


def spawn_worker(client: Client, settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    """A real worker process (`python worker.py`) on the test's Temporal, store and queue,
    for tests that kill it with SIGKILL."""
    secret = {"STEAD_DATABASE_URL": settings.database_url}
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("STEAD_")},
        **{k: v.get_secret_value() for k, v in secret.items() if v is not None},
        "STEAD_TEMPORAL_ADDRESS": client.service_client.config.target_host,
        "STEAD_TASK_QUEUE": settings.task_queue,
        "STEAD_MODEL_BASE_URL": settings.model_base_url or "",
        "STEAD_APP": "worker:APP",
        "STEAD_INTEGRATIONS_FILE": str(settings.integrations_file or ""),
        "STEAD_PAYLOAD_KEYS": PAYLOAD_KEYS,
        "STEAD_WORKER_METRICS_PORT": str(settings.worker_metrics_port),
        "STEAD_PAYLOAD_OFFLOAD_BYTES": str(settings.payload_offload_bytes),
    }
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).parent.parent / "worker.py")],
        env=env,
        cwd=Path(__file__).parent.parent,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
