"""The authorization matrix: every API route, called without credentials, with a bad key,
with a principal that holds no rights, and as another tenant with a forged id.

Routes are enumerated from the app itself, so a new route fails this test until it has an
entry in `CASES` (a path-parameter sample and a valid body): nothing ships unexamined.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from temporalio.client import Client

from activities import support_desk
from stead.api.app import create_app
from stead.store import policy as policy_store
from stead.store.db import Pool
from tests.conftest import Tenant, TenantFactory
from tests.helpers import wait_json

# Routes open to anyone by design.
PUBLIC = {("GET", "/healthz"), ("GET", "/metrics")}
# Path parameters that name a tenant's object (others, like a pipeline name, do not).
OBJECTS = (
    "{run_id}",
    "{approval_id}",
    "{document_id}",
    "{user_id}",
    "{key_id}",
    "{grant_id}",
    "{endpoint_id}",
    "{delivery_id}",
    "{schedule_id}",
)
WEBHOOKS, SCHEDULES = ("POST", "/v1/admin/webhooks"), ("POST", "/v1/schedules")


@dataclass
class World:
    """Tenant A's real objects, which tenant B will try to reach by id."""

    tenant: Tenant
    ids: dict[str, str]


@pytest.fixture
async def world(
    api: httpx.AsyncClient, make_tenant: TenantFactory, pool: Pool, client: Client
) -> AsyncIterator[World]:
    unique_user = f"alice-{uuid.uuid4().hex[:8]}"
    tenant = await make_tenant(
        {
            "requester": ["requester"],
            "approver": ["approver"],
            "admin": ["admin"],
            unique_user: ["requester"],
        }
    )
    auth = tenant.auth("requester")
    async with pool.acquire() as conn:
        await support_desk.upsert_customer(conn, tenant.id, "cus_1", "Jane", "jane@a.test")
        grant = await policy_store.add_override(
            conn,
            tenant.id,
            {
                "subject_kind": "role",
                "subject": "requester",
                "effect": "deny",
                "action": "read",
                "resource": "document",
            },
            by="admin",
        )
    admin = tenant.auth("admin")
    endpoint = await api.post("/v1/admin/webhooks", json=BODIES[WEBHOOKS], headers=admin)
    assert endpoint.status_code == 201, endpoint.text
    endpoint_id = endpoint.json()["endpoint_id"]
    schedule = await api.post("/v1/schedules", json=BODIES[SCHEDULES], headers=auth)
    assert schedule.status_code == 201, schedule.text
    schedule_id = schedule.json()["schedule_id"]
    started = await api.post(
        "/v1/runs",
        json={"pipeline": "summarize", "input": {"text": "secret plans of A"}},
        headers=auth,
    )
    run_id = started.json()["run_id"]
    run = await wait_json(api, f"/v1/runs/{run_id}", auth, lambda b: bool(b["pending_approvals"]))
    approval_id = run["pending_approvals"][0]["approval_id"]
    document = await api.post(
        "/v1/documents",
        json={"title": "A handbook", "text": "A's confidential text."},
        headers=tenant.auth("admin"),
    )
    assert document.status_code == 201, document.text
    # The run's approval.requested, enqueued for the endpoint (no dispatcher runs here).
    deliveries = await wait_json(
        api,
        f"/v1/admin/webhooks/{endpoint_id}/deliveries",
        admin,
        lambda b: bool(b["items"]),
    )
    yield World(
        tenant,
        {
            "run_id": run_id,
            "approval_id": approval_id,
            "document_id": document.json()["document_id"],
            "user_id": unique_user,
            "key_id": tenant.keys[unique_user].split("_")[1],
            "grant_id": str(grant),
            "pipeline": "summarize",
            "step": "review",
            "endpoint_id": endpoint_id,
            "delivery_id": deliveries["items"][0]["delivery_id"],
            "schedule_id": schedule_id,
        },
    )
    await client.get_schedule_handle(f"{tenant.id}:{schedule_id}").delete()


# A valid body per route, so that a refusal is about authorization, never validation.
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/v1/runs"): {"pipeline": "summarize", "input": {"text": "hello"}},
    ("POST", "/v1/runs/{run_id}/retry"): {"mode": "restart"},
    ("POST", "/v1/approvals/{approval_id}/decision"): {"decision": "approve"},
    ("POST", "/v1/documents"): {"title": "t", "text": "x"},
    ("POST", "/v1/admin/users"): {"id": "mallory", "roles": ["admin"]},
    ("PUT", "/v1/admin/users/{user_id}/roles"): {"roles": ["admin"]},
    ("POST", "/v1/admin/users/{user_id}/keys"): {"label": "x"},
    ("POST", "/v1/admin/grants"): {
        "subject_kind": "role",
        "subject": "requester",
        "effect": "allow",
        "action": "*",
        "resource": "*",
    },
    ("PUT", "/v1/admin/budgets"): {"scope": "customer", "period": "day", "limit_usd": 1000},
    ("PUT", "/v1/admin/approval-policies/{pipeline}/{step}"): {"roles": ["requester"]},
    ("PUT", "/v1/admin/redaction"): {"drop": [], "mask": ["notes"]},
    WEBHOOKS: {"url": "https://hooks.example.com/stead", "events": ["approval.requested"]},
    ("PATCH", "/v1/admin/webhooks/{endpoint_id}"): {"enabled": False},
    ("POST", "/v1/admin/webhooks/{endpoint_id}/rotate-secret"): {"keep_previous_seconds": 0},
    SCHEDULES: {
        "pipeline": "summarize",
        "input": {"text": "Daily digest."},
        "cron": "0 9 * * 1-5",
        "paused": True,  # never fires during the test
    },
    ("POST", "/v1/schedules/{schedule_id}/pause"): {"note": "x"},
}


def routes() -> list[tuple[str, str]]:
    """Every documented operation: the API's public contract."""
    paths = create_app().openapi()["paths"]
    return sorted((method.upper(), path) for path, ops in paths.items() for method in ops)


ROUTES = [r for r in routes() if r not in PUBLIC and not r[1].startswith("/codec")]


def fill(path: str, ids: dict[str, str]) -> str:
    for name, value in ids.items():
        path = path.replace("{" + name + "}", value)
    assert "{" not in path, f"no sample id for a parameter of {path}: add it to World.ids"
    return path


# Event streams never end for a caller allowed to follow them, and httpx's ASGI transport
# returns only complete responses: these are called by `opened`, which reads what a stream
# sends first.
STREAMS = {("GET", "/v1/events"), ("GET", "/v1/runs/{run_id}/events")}


async def call(
    api: httpx.AsyncClient, method: str, path: str, ids: dict[str, str], headers: dict[str, str]
) -> httpx.Response:
    if (method, path) in STREAMS:
        return await opened(api, fill(path, ids), headers)
    body = BODIES.get((method, path))
    return await api.request(method, fill(path, ids), json=body, headers=headers)


async def opened(api: httpx.AsyncClient, url: str, headers: dict[str, str]) -> httpx.Response:
    """A GET of a stream, straight on the ASGI app: its status and what it sent within a
    second of starting (all of it, for a refusal), then the client goes away."""
    transport = api._transport  # the app behind the in-process client (httpx keeps it private)
    assert isinstance(transport, httpx.ASGITransport)
    path, _, query = url.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": [(b"host", b"test")]
        + [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }
    status, sent, started, ended = 0, bytearray(), asyncio.Event(), asyncio.Event()
    gone = asyncio.Event()

    async def receive() -> MutableMapping[str, Any]:
        if not started.is_set() and not gone.is_set():
            gone.set()  # the (empty) request body, once
            return {"type": "http.request", "body": b"", "more_body": False}
        await ended.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            started.set()
        elif message["type"] == "http.response.body":
            sent.extend(message.get("body", b""))
            if not message.get("more_body"):
                ended.set()

    async def serve() -> None:
        await transport.app(scope, receive, send)

    app = asyncio.create_task(serve())
    try:
        await asyncio.wait_for(started.wait(), timeout=30)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ended.wait(), timeout=1)
    finally:
        ended.set()
        app.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await app
    return httpx.Response(status, content=bytes(sent))


@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
async def test_route_refuses_strangers(
    api: httpx.AsyncClient, world: World, make_tenant: TenantFactory, method: str, path: str
) -> None:
    a = world.tenant
    nobody = await make_tenant({"nobody": [], "admin": ["admin"], "requester": ["requester"]})
    a_text = json.dumps(world.ids)

    for headers in (
        {},
        {"Authorization": "Bearer stead_000000000000_" + "x" * 43},
        {"Authorization": "Token abc"},
    ):
        response = await call(api, method, path, world.ids, headers)
        assert response.status_code == 401, (headers, response.text)

    # No rights at all: refused, and with a 403 (or 404 where the object is not theirs).
    response = await call(api, method, path, world.ids, nobody.auth("nobody"))
    assert response.status_code in (403, 404), response.text

    # Another tenant's admin, with A's ids: A's objects do not exist for them.
    response = await call(api, method, path, world.ids, nobody.auth("admin"))
    if any(param in path for param in OBJECTS):
        assert response.status_code == 404, response.text
        missing = await call(
            api, method, path, {k: _forged(v) for k, v in world.ids.items()}, nobody.auth("admin")
        )
        assert missing.status_code == 404
        assert response.json() == missing.json()  # indistinguishable from a missing object
    for value in world.ids.values():
        if len(value) > 12:  # ids, not common words like "review"
            assert value not in response.text, f"{value} leaked to another tenant"
    assert a.id not in response.text
    assert "secret plans" not in response.text
    assert a_text  # the world was built


def _forged(value: str) -> str:
    """An id of the same shape that names nothing."""
    if value.isdigit():
        return str(int(value) + 10**9)
    return value[:-3] + "zzz" if len(value) > 4 else value + "zz"


def test_every_route_is_in_the_matrix() -> None:
    with_body = {(m, p) for m, p in ROUTES if m in ("POST", "PUT")}
    bodyless = {
        ("POST", "/v1/runs/{run_id}/cancel"),
        ("POST", "/v1/runs/{run_id}/retry"),
        ("POST", "/v1/admin/webhooks/{endpoint_id}/deliveries/{delivery_id}/redeliver"),
        ("POST", "/v1/schedules/{schedule_id}/resume"),
    }
    missing = sorted(r for r in with_body if r not in BODIES and r not in bodyless)
    assert not missing, f"add a valid body for {missing}"
