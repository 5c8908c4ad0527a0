"""Health and metrics: `/healthz` is 200 only when Temporal and PostgreSQL both answer."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from stead.api.deps import ServicesDep
from stead.metrics import REGISTRY

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz(svc: ServicesDep) -> JSONResponse:
    async def temporal() -> str:
        await svc.temporal.service_client.check_health(timeout=timedelta(seconds=2))
        return "ok"

    async def postgres() -> str:
        async with svc.pool.acquire(timeout=2) as conn:
            await conn.fetchval("SELECT 1")
        return "ok"

    checks: dict[str, str] = {}
    for name, check in (("temporal", temporal), ("postgres", postgres)):
        try:
            checks[name] = await asyncio.wait_for(check(), timeout=3)
        except Exception as exc:  # any failure means unhealthy; report its kind only
            checks[name] = f"unreachable ({type(exc).__name__})"
    healthy = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if healthy else "unavailable", **checks},
        status_code=200 if healthy else 503,
    )


@router.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
