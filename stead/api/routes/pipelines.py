"""/v1/pipelines: the catalog of pipelines the caller may start (stead.service.catalog)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI

from stead.api.deps import CurrentPrincipal, ServicesDep
from stead.app import Runtime
from stead.service import catalog
from stead.service.catalog import Catalog

router = APIRouter(prefix="/v1/pipelines", tags=["pipelines"])


@router.get("")
async def list_pipelines(svc: ServicesDep, principal: CurrentPrincipal) -> Catalog:
    """The pipelines the caller may start with `POST /v1/runs`: each one's input and output
    JSON Schemas, stages, approval steps, tools and streamed steps."""
    return catalog.catalog(svc, principal)


def document_start_bodies(app: FastAPI, runtime: Runtime) -> None:
    """Make the OpenAPI document's body of `POST /v1/runs` the union of the runtime's
    pipelines' start bodies, discriminated on `pipeline` (built once, on first request)."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = plain()
        body, defs = catalog.start_run_schema(runtime)
        if body:
            components = document.setdefault("components", {}).setdefault("schemas", {})
            for name, schema in defs.items():
                components.setdefault(name, schema)
            post = document["paths"]["/v1/runs"]["post"]
            post["requestBody"]["content"]["application/json"]["schema"] = body
        return document

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customize
