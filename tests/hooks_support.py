"""What the webhook and schedule tests share: a loopback webhook receiver (a real HTTP server
that verifies Standard Webhooks signatures), settings with short retry schedules, a worker
with the webhook dispatcher running beside it, and schedule cleanup.

Loaded by the tests that need it with `pytest_plugins = ["tests.hooks_support"]`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.types import Receive, Scope, Send
from temporalio.client import Client
from temporalio.service import RPCError
from temporalio.worker import Worker

from stead.config import Settings
from stead.store.db import Pool
from stead.webhooks.dispatch import Dispatcher
from tests.conftest import Tenant, make_services, running_workers
from tests.helpers import eventually
from tests.servers import serve_app


@dataclass(frozen=True)
class Received:
    webhook_id: str
    timestamp: str
    signature: str
    body: bytes
    # Indexes (in `Receiver.secrets`) of the secrets whose signature verified.
    verified_by: tuple[int, ...]
    host: str = ""  # the Host header

    @property
    def verified(self) -> bool:
        return bool(self.verified_by)

    def json(self) -> dict[str, Any]:
        import json  # noqa: PLC0415  # only for reading what arrived

        return dict(json.loads(self.body))


@dataclass
class Answer:
    status: int = 204
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay: float = 0.0


@dataclass
class Receiver:
    """A webhook receiver on loopback: records every request, verifies it with each secret it
    knows (as a tenant's backend would with `standardwebhooks`), and answers as planned
    (`plan`, then `default`)."""

    secrets: list[str] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    plan: deque[Answer] = field(default_factory=deque)
    default: Answer = field(default_factory=Answer)
    url: str = ""
    # Requests received and not yet answered (a kill now loses the sender's answer).
    answering: int = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.received.append(
            Received(
                webhook_id=headers.get("webhook-id", ""),
                timestamp=headers.get("webhook-timestamp", ""),
                signature=headers.get("webhook-signature", ""),
                body=body,
                verified_by=self._verify(body, headers),
                host=headers.get("host", ""),
            )
        )
        answer = self.plan.popleft() if self.plan else self.default
        self.answering += 1
        try:
            if answer.delay:
                await asyncio.sleep(answer.delay)
        finally:
            self.answering -= 1
        await send(
            {
                "type": "http.response.start",
                "status": answer.status,
                "headers": [(k.encode(), v.encode()) for k, v in answer.headers.items()],
            }
        )
        await send({"type": "http.response.body", "body": answer.body})

    def _verify(self, body: bytes, headers: dict[str, str]) -> tuple[int, ...]:
        ok = []
        for index, secret in enumerate(self.secrets):
            try:
                Webhook(secret).verify(body, headers)
            except WebhookVerificationError:
                continue
            ok.append(index)
        return tuple(ok)

    def of_type(self, event_type: str) -> list[Received]:
        return [r for r in self.received if r.json().get("type") == event_type]


async def arrived(receiver: Receiver, count: int, *, within: float = 30) -> list[Received]:
    """What the receiver got, once it has at least `count` requests."""

    async def probe() -> list[Received]:
        return list(receiver.received)

    return await eventually(probe, lambda got: len(got) >= count, within=within)


@contextlib.asynccontextmanager
async def receiving() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    async with serve_app(receiver) as url:
        receiver.url = f"{url}/hooks"
        yield receiver


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with receiving() as made:
        yield made


def localhost_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for the name `localhost` only (no address in it), its own
    trust anchor, and its key: a client verifying against an address fails."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "localhost.pem", directory / "localhost.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def quick(settings: Settings, **more: Any) -> Settings:
    """`settings` with a webhook retry schedule of seconds and a quick schedule watcher."""
    return settings.model_copy(
        update={
            "webhook_attempts": 3,
            "webhook_retry_first_seconds": 0.2,
            "webhook_retry_max_seconds": 0.5,
            "webhook_timeout_seconds": 2.0,
            "schedule_watch_max_seconds": 0.5,
            **more,
        }
    )


@pytest.fixture
def hook_settings(test_settings: Settings) -> Settings:
    return quick(test_settings)


@contextlib.asynccontextmanager
async def dispatching(pool: Pool, client: Client, settings: Settings) -> AsyncIterator[Dispatcher]:
    """A dispatcher like the one every worker process runs, for the duration of the block."""
    dispatcher = Dispatcher(pool, client, settings, poll_seconds=0.5)
    task = asyncio.create_task(dispatcher.run_forever())
    try:
        yield dispatcher
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def hook_worker(
    client: Client, hook_settings: Settings, pool: Pool
) -> AsyncIterator[list[Worker]]:
    """The test's workers with the quick settings, and a webhook dispatcher beside them."""
    async with (
        running_workers(client, hook_settings, pool) as workers,
        dispatching(pool, client, hook_settings),
    ):
        yield workers


@pytest.fixture
async def hook_api(
    client: Client, hook_settings: Settings, pool: Pool
) -> AsyncIterator[httpx.AsyncClient]:
    from stead.api.app import create_app  # noqa: PLC0415  # as conftest's `api`, other settings

    app = create_app(hook_settings, make_services(hook_settings, client, pool))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://stead.test") as http:
        yield http


async def register(
    api: httpx.AsyncClient, tenant: Tenant, receiver: Receiver, events: list[str] | None = None
) -> dict[str, Any]:
    """Register `receiver` for `events` (all four by default) as the tenant's admin; the
    receiver learns the secret."""
    response = await api.post(
        "/v1/admin/webhooks",
        json={
            "url": receiver.url,
            "events": events
            or ["run.completed", "run.failed", "approval.requested", "approval.decided"],
        },
        headers=tenant.auth("admin"),
    )
    assert response.status_code == 201, response.text
    created = dict(response.json())
    receiver.secrets.append(created["secret"])
    return created


@pytest.fixture
async def created_schedules(client: Client) -> AsyncIterator[list[tuple[str, str]]]:
    """(tenant, schedule id) of every schedule a test creates, deleted when it ends: one left
    behind would keep firing into a task queue nobody polls for the rest of the session."""
    made: list[tuple[str, str]] = []
    yield made
    for tenant, schedule_id in made:
        with contextlib.suppress(RPCError):  # deleted by the test itself
            await client.get_schedule_handle(f"{tenant}:{schedule_id}").delete()


async def create_schedule(
    api: httpx.AsyncClient,
    tenant: Tenant,
    made: list[tuple[str, str]],
    body: dict[str, Any],
    user: str = "requester",
) -> dict[str, Any]:
    """Create a schedule over HTTP as `user` (a 201 is asserted) and track it for cleanup."""
    response = await api.post("/v1/schedules", json=body, headers=tenant.auth(user))
    assert response.status_code == 201, response.text
    created = dict(response.json())
    made.append((tenant.id, created["schedule_id"]))
    return created
