"""The pieces the fixtures are built from, usable on their own: tenants with keys, the
integrations' loopback stand-ins, workers and API clients for an application."""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import yaml
from starlette.types import ASGIApp
from temporalio.client import Client
from temporalio.worker import Worker

from stead.api.app import create_app
from stead.app import App, _collect_integrations, _collect_tools
from stead.config import Settings
from stead.integrations import Integration
from stead.policy.limits import LimitPolicy
from stead.service.access import Services
from stead.store import principals
from stead.store.audit import audit_writer
from stead.store.db import Pool
from stead.worker import build_workers, make_deps

# The payload key of every test process: committed histories recorded under the kit replay
# with it (a test key, never a secret).
PAYLOAD_KEYS = "test1:" + base64.b64encode(b"k" * 32).decode()
INTEGRATION_TOKEN = "integration-test-token"  # noqa: S105  # the stand-ins of a test session only
DEFAULT_USERS: Mapping[str, list[str]] = {
    "requester": ["requester"],
    "approver": ["approver"],
    "finance": ["approver", "finance"],
    "admin": ["admin"],
}

# An integration's stand-in: `(token, state_file) -> ASGI app`, the shape of `Integration.dev_app`.
StandIn = Callable[[str, Path], ASGIApp]


@dataclass(frozen=True)
class Tenant:
    """A fresh tenant: its id and one API key per user (`keys["requester"]`)."""

    id: str
    keys: dict[str, str]

    def auth(self, user: str) -> dict[str, str]:
        """Authorization headers of `user`'s key."""
        return {"Authorization": f"Bearer {self.keys[user]}"}


# `await make_tenant(users={"ann": ["approver"]}, plan="enterprise")`
TenantFactory = Callable[..., Awaitable[Tenant]]


async def create_tenant(
    owner_url: str, users: Mapping[str, list[str]] | None = None, plan: str = "standard"
) -> Tenant:
    """A tenant with a random id, and `users` (user id -> roles; default: a requester, an
    approver, a finance approver and an admin), each with an API key."""
    tenant = f"t-{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(owner_url)
    try:
        await principals.create_tenant(conn, tenant, tenant, plan)
        keys = {}
        for user, roles in (users or DEFAULT_USERS).items():
            await principals.upsert_principal(conn, tenant, user, roles)
            keys[user] = await principals.create_key(conn, tenant, user)
    finally:
        await conn.close()
    return Tenant(tenant, keys)


@dataclass(frozen=True)
class Integrations:
    """The application's integrations as the test session serves them: each stand-in's base
    URL by name, the token they accept, and the `STEAD_INTEGRATIONS_FILE` configuring them.
    `integrations.payments` is `integrations.url("payments")`."""

    urls: Mapping[str, str]
    token: str
    file: Path

    def url(self, name: str) -> str:
        try:
            return self.urls[name]
        except KeyError:
            known = ", ".join(sorted(self.urls)) or "none"
            raise KeyError(f"no stand-in serves integration {name!r} (served: {known})") from None

    def __getattr__(self, name: str) -> str:
        wanted = name.replace("_", "-")
        if name.startswith("__") or wanted not in self.urls:
            raise AttributeError(name)
        return self.urls[wanted]

    async def get(self, name: str, path: str) -> Any:
        """What the stand-in of integration `name` answers to `GET path` (e.g. what a tool
        created there), with the stand-ins' token; raises on an error status."""
        headers = {"Authorization": f"Bearer {self.token}"}
        async with httpx.AsyncClient(base_url=self.url(name), headers=headers) as http:
            response = await http.get(path)
        response.raise_for_status()
        return response.json()

    def configured(self, path: Path, **urls: str) -> Path:
        """A configuration file like `file`, with some URLs changed (e.g. a faulty payments
        service for one test)."""
        return write_integrations(path, {**self.urls, **urls}, self.token)


def write_integrations(path: Path, urls: Mapping[str, str], token: str) -> Path:
    """`STEAD_INTEGRATIONS_FILE` content: each integration's URL and credential (0600)."""
    path.write_text(
        yaml.safe_dump({name: {"url": url, "token": token} for name, url in urls.items()})
    )
    path.chmod(0o600)
    return path


def declared_integrations(app: App) -> dict[str, Integration]:
    """Every integration `app` acts through (declared, or named by one of its tools)."""
    tools = _collect_tools(app.tools, app.pipelines)
    return _collect_integrations(app.integrations, tools.values())


def stand_ins(app: App, given: Mapping[str, StandIn]) -> dict[str, StandIn]:
    """The stand-in of each integration: the one a test gives, else its own `dev_app`."""
    found: dict[str, StandIn] = {}
    for name, integration in declared_integrations(app).items():
        stand_in = given.get(name, integration.dev_app)
        if stand_in is not None:
            found[name] = stand_in
    unknown = sorted(set(given) - set(found))
    if unknown:
        raise ValueError(f"stand-ins given for integrations {app.name} lacks: {unknown}")
    return found


def services(
    app: App, settings: Settings, client: Client, pool: Pool, limits: LimitPolicy | None = None
) -> Services:
    """The API's services for `app` under `settings`, as `create_app` builds them."""
    runtime = app.load(settings)
    audit = audit_writer(settings, runtime.policies.redaction)
    return Services(settings, client, pool, runtime, audit, limits)


def api_client(app: App, settings: Settings, client: Client, pool: Pool) -> httpx.AsyncClient:
    """An HTTP client on `app`'s API (Stead's routes and the application's own), in this
    process through httpx's ASGI transport; the caller closes it."""
    asgi = create_app(settings, services(app, settings, client, pool))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://stead.test")


@asynccontextmanager
async def running_workers(
    app: App, client: Client, settings: Settings, pool: Pool
) -> AsyncIterator[list[Worker]]:
    """`app`'s workers (its task queue and the model queue), running until the block ends."""
    deps = make_deps(pool, settings)
    try:
        workers = build_workers(client, settings, deps, app.load(settings))
        async with AsyncExitStack() as stack:
            for worker in workers:
                await stack.enter_async_context(worker)
            yield workers
    finally:
        await deps.close()


@dataclass
class SimControl:
    """Fault injection on the session's simulator (`POST /_sim/faults`)."""

    http: httpx.AsyncClient

    async def fault(self, status: int, count: int = 1, **options: Any) -> None:
        """The next `count` model calls answer `status` (options: `model`, `retry_after`,
        `hang`; see stead.sim.messages)."""
        response = await self.http.post(
            "/_sim/faults", json={"status": status, "count": count, **options}
        )
        response.raise_for_status()

    async def stats(self) -> dict[str, Any]:
        """Requests by model, faults served and pending, prompt-cache entries."""
        return dict((await self.http.get("/_sim/stats")).json())
