"""What a page shows when it cannot show what was asked: a clear reason, never a stack trace.

Every page's route is a `WebRoute`: a refusal of the service layer becomes an error page with
its reason and status (another tenant's run or approval is the same 404 as a missing one), a
missing session sends the browser to sign in, an outage is a 503 to retry, and anything else
is logged here and shown as a plain 500.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from temporalio.service import RPCError, RPCStatusCode

from stead.api.errors import OUTAGES
from stead.service.errors import ServiceError
from stead.web.auth import SignInRequired, sign_in_url
from stead.web.render import page

log = logging.getLogger("stead.web")
FRAGMENT_HEADER = "x-stead-fragment"
_TITLES = {
    400: "Bad request",
    401: "Not signed in",
    403: "Not allowed",
    404: "Not found",
    409: "Not possible now",
    413: "Too large",
    422: "Not valid",
    429: "Too many requests",
    503: "Try again shortly",
}


def error_page(request: Request, status: int, reason: str) -> Response:
    if request.headers.get(FRAGMENT_HEADER):
        # A live region refreshing itself: it stops on an error and keeps what it shows.
        return PlainTextResponse(reason, status_code=status)
    title = _TITLES.get(status, "Something went wrong")
    return page(request, "error.html", status, title=title, reason=reason, code=status)


async def handle(request: Request, exc: Exception) -> Response:  # noqa: PLR0911  # one per kind
    if isinstance(exc, SignInRequired):
        if request.headers.get(FRAGMENT_HEADER):
            return PlainTextResponse("signed out", status_code=401)
        return RedirectResponse(sign_in_url(exc.next_path), status_code=303)
    if isinstance(exc, ServiceError):
        return error_page(request, exc.status, exc.detail)
    if isinstance(exc, RequestValidationError):
        issues = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg')}"
            for e in exc.errors()
        )
        return error_page(request, 422, issues or "the request is not valid")
    if isinstance(exc, HTTPException):
        return error_page(request, exc.status_code, str(exc.detail))
    if isinstance(exc, RPCError) and exc.status in (
        RPCStatusCode.UNAVAILABLE,
        RPCStatusCode.DEADLINE_EXCEEDED,
    ):
        return error_page(request, 503, "Temporal did not answer; try again shortly")
    if isinstance(exc, OUTAGES):
        return error_page(request, 503, "PostgreSQL did not answer; try again shortly")
    log.exception("page %s failed", request.url.path)
    return error_page(request, 500, "the page could not be shown; the error was logged")


class WebRoute(APIRoute):
    """A page's route: every exception becomes a page (see the module's docstring)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:  # every failure is shown as a page
                return await handle(request, exc)

        return guarded
