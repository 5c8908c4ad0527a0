"""The HTTP API: a thin layer that starts runs, reads their state and records decisions.

`create_app()` builds the app; its lifespan connects to Temporal and PostgreSQL once and
shares them through `app.state.services`. Tests pass ready-made services instead.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response

from api import errors
from api.deps import Services
from api.routes import admin, approvals, audit, documents, health, runs, usage
from policies.permissions import load_policy
from stead import metrics
from stead.config import Settings, load_settings
from stead.temporal import connect
from store.audit import audit_writer
from store.db import pool_from_settings


def create_app(settings: Settings | None = None, services: Services | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if services is not None:
            yield
            return
        config = settings or load_settings()
        pool = await pool_from_settings(config, "API")
        client = await connect(config)
        app.state.services = Services(config, client, pool, load_policy(), audit_writer(config))
        try:
            yield
        finally:
            await pool.close()

    app = FastAPI(
        title="Stead",
        version="0.1.0",
        summary="Durable AI pipelines: runs, approvals, usage and audit.",
        lifespan=lifespan,
    )
    if services is not None:
        app.state.services = services
    errors.install(app)
    app.include_router(runs.router)
    app.include_router(approvals.router)
    app.include_router(audit.router)
    app.include_router(documents.router)
    app.include_router(admin.router)
    app.include_router(usage.router)
    app.include_router(health.router)
    app.middleware("http")(_measure)
    return app


async def _measure(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    started = time.perf_counter()
    response = await call_next(request)
    # The router records the matched route in the scope: label by its template, never by
    # the raw path (which carries ids and would make the label set unbounded).
    route = getattr(request.scope.get("route"), "path", "unmatched")
    metrics.HTTP_REQUESTS.labels(route, request.method, f"{response.status_code // 100}xx").inc()
    metrics.HTTP_LATENCY.labels(route, request.method).observe(time.perf_counter() - started)
    return response
