"""The HTTP API: a thin layer that starts runs, reads their state and records decisions.

`create_app()` builds the app; its lifespan connects to Temporal and PostgreSQL once and
shares them through `app.state.services`. Tests pass ready-made services instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.datastructures import Headers
from starlette.requests import Request as StarletteRequest
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from temporalio.client import Client

from stead import metrics, web
from stead.api import errors
from stead.api.deps import authenticate_request
from stead.api.routes import (
    admin,
    approvals,
    audit,
    codec,
    documents,
    events,
    health,
    pipelines,
    runs,
    schedules,
    usage,
    webhooks,
)
from stead.api.routes.documents import MAX_TEXT_BYTES
from stead.app import App, Runtime
from stead.config import Settings, load_settings
from stead.service.access import Services
from stead.service.errors import ServiceError
from stead.service.runs import STUCK_QUERY
from stead.store import approvals as approvals_store
from stead.store.audit import audit_writer
from stead.store.db import Pool, pool_from_settings
from stead.store.payloads import PostgresPayloadStore
from stead.telemetry import interceptors, setup_tracing, untraced
from stead.temporal import connect

log = logging.getLogger("stead.api")
MAX_BODY_BYTES = 1 << 20
# A document's text limit, JSON-escaped (a non-ASCII character as \uXXXX is six bytes).
DOCUMENT_BODY_BYTES = 6 * MAX_TEXT_BYTES
CODEC_BODY_BYTES = codec.MAX_BODY_BYTES


def create_app(
    settings: Settings | None = None,
    services: Services | None = None,
    *,
    runtime: Runtime | None = None,
) -> FastAPI:
    """The API of an application (`runtime`, built by `App.load`): Stead's routes, and the
    application's own (`App(routers=...)`) beside them; without one, Stead's own pipelines
    alone. With ready-made `services` (tests), nothing is connected at start."""
    if services is not None:
        runtime = services.runtime
    if runtime is None:
        runtime = App("stead").load(settings or load_settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if services is not None:
            yield
            return
        assert runtime is not None
        config = settings or load_settings()
        setup_tracing(config, "stead-api")
        pool = await pool_from_settings(config, "API")
        client = await connect(
            config,
            interceptors=list(interceptors(config)),
            payload_store=PostgresPayloadStore(pool),
        )
        app.state.services = Services(
            config, client, pool, runtime, audit_writer(config, runtime.policies.redaction)
        )
        gauges = asyncio.create_task(refresh_gauges(pool, client))
        try:
            yield
        finally:
            gauges.cancel()
            await pool.close()

    # Swagger UI and ReDoc from the package's own copies, not a CDN: /docs works offline.
    app = FastAPIOffline(
        title="Stead",
        version="0.1.0",
        summary="Durable AI pipelines: runs, approvals, usage and audit.",
        lifespan=lifespan,
        telemetry={"exclude": untraced},
    )
    if services is not None:
        app.state.services = services
    errors.install(app)
    for router in (
        runs,
        approvals,
        audit,
        documents,
        admin,
        usage,
        webhooks,
        schedules,
        events,
        pipelines,
    ):
        app.include_router(router.router, responses=errors.RESPONSES)
    for extra in runtime.app.routers:
        app.include_router(extra, responses=errors.RESPONSES)
    app.include_router(health.router)
    app.include_router(codec.router, responses=errors.RESPONSES)
    web.mount(app)
    pipelines.document_start_bodies(app, runtime)
    app.add_middleware(Admission)
    app.add_middleware(RequestMetrics)
    return app


class Admission:
    """Bound every body and authenticate `/v1` requests, before anything reads the body.

    FastAPI reads and parses a request's body before it runs the route's dependencies, so
    authenticating in a dependency let an anonymous client make every API process buffer and
    parse bodies of any size (four 50 MB posts took one from 172 to 535 MB). Here a request
    without a valid key is answered 401 from its headers alone, and the principal reaches the
    route through the request's state. A body declared over its route's limit is a 413 before
    any of it is read; a streamed one is cut off as soon as it passes the limit. (FastAPI's
    `max_body_size` caps the same way, but Starlette answers its 413 in plain text, outside
    the error shape the API documents.)
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        limit = body_limit(path)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await errors.error_response(errors.too_large(limit))(scope, receive, send)
            return
        if path.startswith("/v1/"):
            request = StarletteRequest(scope)
            try:
                principal, key_id = await authenticate_request(request.app.state.services, request)
            except ServiceError as exc:
                await errors.error_response(exc)(scope, receive, send)
                return
            except errors.OUTAGES:
                await errors.retry_shortly("PostgreSQL")(scope, receive, send)
                return
            scope.setdefault("state", {}).update(principal=principal, key_id=key_id)
        received = 0

        async def bounded() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                # Raised inside the route's body read, which lets HTTP exceptions through
                # (anything else it reports as a 400); the error handlers answer it.
                raise errors.BodyTooLarge(limit)
            return message

        await self.app(scope, bounded, send)


def body_limit(path: str) -> int:
    """The most a request to `path` may send: documents and codec batches are larger."""
    if path.startswith("/codec/"):
        return CODEC_BODY_BYTES
    if path.rstrip("/") == "/v1/documents":
        return DOCUMENT_BODY_BYTES
    return MAX_BODY_BYTES


class RequestMetrics:
    """Request count and latency per route template, never the raw path: it carries ids,
    which would make the label set unbounded. A plain ASGI middleware: Starlette's
    BaseHTTPMiddleware runs every request through an extra task and stream."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"]
            metrics.HTTP_REQUESTS.labels(route, method, f"{status // 100}xx").inc()
            metrics.HTTP_LATENCY.labels(route, method).observe(time.perf_counter() - started)


async def refresh_gauges(pool: Pool, temporal: Client, every: float = 15.0) -> None:
    """Keep fleet-wide gauges current. They are facts about the store and the cluster, not
    about one process, so every API replica reports the same value (aggregate with max, not
    sum)."""
    while True:
        try:
            async with pool.acquire() as conn:
                metrics.APPROVALS_PENDING.set(await approvals_store.pending_count(conn))
            stuck = await temporal.count_workflows(STUCK_QUERY)
            metrics.RUNS_STUCK.set(stuck.count)
        except Exception:  # a failed refresh keeps the last value; retried
            log.warning("could not refresh gauges")
        await asyncio.sleep(every)
