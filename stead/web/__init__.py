"""The reviewers' web app: sign-in, inbox, approval, run, runs and usage pages under `/ui/`.

Served by the API process, rendered on the server (Jinja2 templates and static files are
package data here); the pages work without script, and one small static script makes the
inbox and run pages live. Every page and form goes through stead.service, so a page can show
or do nothing the API would refuse; sessions are in PostgreSQL (stead.service.sessions).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

from stead.web.errors import WebRoute, error_page
from stead.web.headers import PageHeaders
from stead.web.pages import approvals, runs, signin, usage

PREFIX = "/ui"
STATIC = Path(__file__).parent / "static"

_fallback = APIRouter(route_class=WebRoute)


@_fallback.get("/{path:path}")
async def not_found(request: Request, path: str) -> Response:
    return error_page(request, 404, "there is no such page")


def mount(app: FastAPI) -> None:
    """Serve the pages under `/ui/` (static files first: the last route answers every other
    path under `/ui/` with the 404 page)."""
    app.mount(f"{PREFIX}/static", StaticFiles(directory=STATIC), name="ui-static")
    for module in (signin, approvals, runs, usage):
        app.include_router(module.router, prefix=PREFIX, include_in_schema=False)
    app.include_router(_fallback, prefix=PREFIX, include_in_schema=False)
    app.add_middleware(PageHeaders, prefix=PREFIX)
