"""API errors: one shape, `{"detail": reason, "code": name}`, mapped by exception type."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg
from fastapi import FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path
from temporalio.service import RPCError, RPCStatusCode

from stead.service.errors import ServiceError


class ErrorOut(BaseModel):
    detail: str
    code: str | None = Field(
        None, description="stable name of the error; absent when the body was not even JSON"
    )


class ValidationIssue(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class InvalidOut(BaseModel):
    """422: request fields that failed validation (`detail` lists them), or a well-formed
    request that cannot be done as asked (`detail` says why, `code` is `invalid`)."""

    detail: str | list[ValidationIssue]
    code: str | None = None


# The errors every API route may answer, declared in its OpenAPI `responses` (found missing by
# the schemathesis drill in tests/test_drills.py: clients generated from the schema could not
# read a 401, 403, 404 or 409, and our 422 did not match FastAPI's declared one).
RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "The body is not valid JSON"},
    401: {"model": ErrorOut, "description": "Missing, invalid or revoked API key"},
    403: {"model": ErrorOut, "description": "The caller's roles do not grant this"},
    404: {"model": ErrorOut, "description": "No such object in the caller's tenant"},
    409: {"model": ErrorOut, "description": "The object's state does not allow this now"},
    413: {"model": ErrorOut, "description": "The body is too large"},
    422: {"model": InvalidOut, "description": "Invalid request"},
    503: {"model": ErrorOut, "description": "A service behind the API did not answer in time"},
}
# Declared by the routes that enforce the plan's request limits (policies/limits.yaml).
RATE_LIMITED: dict[int | str, dict[str, Any]] = {
    429: {
        "model": ErrorOut,
        "description": "Over the plan's request limit for this API key or tenant (code"
        " `rate_limited`); retry after `Retry-After` seconds",
        "headers": {
            "Retry-After": {
                "description": "seconds until the request can be admitted",
                "schema": {"type": "integer", "minimum": 1},
            }
        },
    }
}


def _clean(text: str) -> str:
    """Text safe to put in a JSON response: unpaired surrogates (which a request may carry in
    a JSON string escape) cannot be encoded as UTF-8 and made the response itself fail."""
    return text.encode("utf-8", "replace").decode("utf-8")


def validation_issues(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Pydantic's errors without the offending input or its context: the input may be a
    secret, NaN or infinity (not JSON), or text that cannot be encoded, and echoing it turned
    a 422 into a 500 (a lone surrogate in a document, `NaN` as a budget)."""
    return [
        {
            "loc": [p if isinstance(p, int) else _clean(str(p)) for p in error.get("loc", ())],
            "msg": _clean(str(error.get("msg", "invalid"))),
            "type": _clean(str(error.get("type", "value_error"))),
        }
        for error in errors
    ]


class BodyTooLarge(StarletteHTTPException):
    """A streamed body passed its limit while the route was reading it."""

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413)
        self.limit = limit


def too_large(limit: int) -> ServiceError:
    return ServiceError(f"the body is over {limit} bytes", code="too_large", status=413)


def error_response(exc: ServiceError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else exc.headers
    return JSONResponse(
        {"detail": exc.detail, "code": exc.code}, status_code=exc.status, headers=headers
    )


def retry_shortly(service: str) -> JSONResponse:
    return JSONResponse(
        {"detail": f"{service} did not answer; retry shortly", "code": "unavailable"},
        status_code=503,
        headers={"Retry-After": "5"},
    )


# PostgreSQL restarting, shutting down or refusing connections: the request did nothing
# durable (its transaction did not commit), so the client may send it again.
OUTAGES: tuple[type[Exception], ...] = (
    asyncpg.exceptions.PostgresConnectionError,  # the connection broke
    asyncpg.exceptions.OperatorInterventionError,  # shutting down, starting up
    asyncpg.exceptions.ConnectionDoesNotExistError,
    # A new pool connection while the server is down: refused on TCP, no socket file on a
    # Unix socket. The API touches no files of its own, so an OSError here is the database.
    OSError,
)


def install(app: FastAPI) -> None:
    async def invalid_request(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return JSONResponse(
            {"detail": validation_issues(exc.errors()), "code": "invalid"}, status_code=422
        )

    app.add_exception_handler(RequestValidationError, invalid_request)

    async def handle(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return error_response(exc)

    app.add_exception_handler(ServiceError, handle)

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        # Starlette answers 405 from the first route whose path matches, so `Allow` named only
        # that route's methods (GET on a path that also has PUT). RFC 9110 wants every method
        # the resource supports. Found by the schemathesis drill in tests/test_drills.py.
        assert isinstance(exc, StarletteHTTPException)
        if isinstance(exc, BodyTooLarge):
            return error_response(too_large(exc.limit))
        if exc.status_code == 405:
            path = request.url.path
            allowed = sorted(
                {
                    method
                    for route in iter_route_contexts(request.app.routes)
                    if route.path and compile_path(route.path)[0].fullmatch(path)
                    for method in route.methods or ()
                }
            )
            exc.headers = {**(exc.headers or {}), "Allow": ", ".join(allowed)}
        return await http_exception_handler(request, exc)

    app.add_exception_handler(StarletteHTTPException, method_not_allowed)

    async def unstorable_text(_: Request, exc: Exception) -> JSONResponse:
        # PostgreSQL keeps no NUL character in text or jsonb, and refuses the statement: a 500
        # for any request string holding one (found by the schemathesis drill in
        # tests/test_drills.py). The request is at fault, whatever route it took.
        return JSONResponse(
            {"detail": "text must not contain NUL (\\u0000) characters", "code": "invalid"},
            status_code=422,
        )

    async def temporal_unreachable(_: Request, exc: Exception) -> JSONResponse:
        # Temporal down or overloaded is a 503 the client may retry, never a 500.
        assert isinstance(exc, RPCError)
        if exc.status in (RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED):
            return retry_shortly("Temporal")
        raise exc

    app.add_exception_handler(RPCError, temporal_unreachable)

    async def postgres_unreachable(_: Request, exc: Exception) -> JSONResponse:
        # PostgreSQL restarting, shutting down or refusing connections: the request did nothing
        # durable (its transaction did not commit), so the client may send it again. A 500 in
        # the restart drill (tests/test_drills.py) before this.
        return retry_shortly("PostgreSQL")

    for outage in OUTAGES:
        app.add_exception_handler(outage, postgres_unreachable)

    for refusal in (
        asyncpg.exceptions.UntranslatableCharacterError,  # \u0000 in a jsonb string
        asyncpg.exceptions.CharacterNotInRepertoireError,  # NUL in a text column
    ):
        app.add_exception_handler(refusal, unstorable_text)
