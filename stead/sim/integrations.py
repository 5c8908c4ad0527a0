"""Loopback stand-ins for the third parties Stead's agent acts on: a payment API and an email API.

In dev and tests these are real HTTP services, never patched functions, so a test can prove what
crossed the wire: each service records every POST it receives and every effect it performs.

Contract shared by both services (one generic `IdempotentService`, two thin apps):

- Every route needs `Authorization: Bearer <token>`; otherwise 401 `{"error": ...}`.
- `POST <resource>` needs an `Idempotency-Key` header of 1 to 200 characters (400 otherwise) and
  a JSON body matching the service's request model (422 otherwise, unknown fields included).
  - First use of a key performs the effect once: 201 with the new object.
  - Same key, same request (compared after validation and normalisation): 200 with the original
    response and `Idempotent-Replayed: true`; no new effect.
  - Same key, different request: 409 `{"error": "idempotency key reused with a different request"}`.
  - Concurrent requests with one key perform the effect exactly once.
  - Only successful effects are remembered: after a 4xx the key is still free.
- `GET <resource>` lists the effects in creation order; `GET /v1/calls` lists every POST to the
  resource in the order it was answered, replays and rejections included.
- `POST /_control/faults {"status", "count", "after_commit", "hold_seconds"}` makes the next
  `count` resource POSTs that pass authentication and the key check answer `status`. With
  `after_commit` the request is processed first (the effect is recorded), then the error is
  returned: a crash after the side effect, which the caller's retry must resolve through the
  idempotent replay. `hold_seconds` delays that answer, so a drill can kill the caller while its
  effect is done but unacknowledged.
- `POST /_control/reset` forgets effects, keys, calls and faults, and empties the state file.

With a `state_file`, each effect and its ledger entry are one JSON line, flushed and fsynced before
the response is sent, and reloaded when the app is created, so a restarted service still honours
old keys. Without one, state lives in memory. All state lives on `app.state`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
import signal
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Generic, TypeVar

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.types import ASGIApp

from stead.serving import EmbeddedServer

__all__ = [
    "MAX_IDEMPOTENCY_KEY_LENGTH",
    "FaultSpec",
    "IdempotentService",
    "MessageRequest",
    "RefundRequest",
    "create_email_app",
    "create_payments_app",
    "serve_apps",
]

logger = logging.getLogger(__name__)

MAX_IDEMPOTENCY_KEY_LENGTH = 200
KEY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
KEY_REUSED = "idempotency key reused with a different request"

JSONObject = dict[str, Any]

_AMOUNT = re.compile(r"\d{1,12}(\.\d{1,2})?")
# Deliberately loose: the provider accepts anything shaped like an address; deliverability is
# not something a mock can judge.
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


class RefundRequest(BaseModel):
    """Body of `POST /v1/refunds`. `amount` is a positive decimal string, normalised to 2 places."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    customer_id: str = Field(min_length=1, max_length=200)
    amount: str
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    reason: str = Field(min_length=1, max_length=1000)
    # Caller's references (like a payment provider's metadata), echoed back untouched.
    metadata: dict[str, str] = Field(default_factory=dict, max_length=20)

    @field_validator("amount")
    @classmethod
    def _positive_two_places(cls, value: str) -> str:
        # A string, not a JSON number: money must not pass through binary floating point.
        if not _AMOUNT.fullmatch(value):
            raise ValueError('must be a decimal string with at most 2 decimal places, e.g. "40.00"')
        amount = Decimal(value)
        if amount <= 0:
            raise ValueError("must be positive")
        return f"{amount:.2f}"


class MessageRequest(BaseModel):
    """Body of `POST /v1/messages`."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    to: str = Field(max_length=254)
    subject: str = Field(min_length=1, max_length=998)
    body: str = Field(max_length=100_000)
    metadata: dict[str, str] = Field(default_factory=dict, max_length=20)

    @field_validator("to")
    @classmethod
    def _address(cls, value: str) -> str:
        if not _EMAIL.fullmatch(value):
            raise ValueError("must be an email address")
        return value

    @field_validator("subject")
    @classmethod
    def _single_line(cls, value: str) -> str:
        # A line break in a subject is header injection in a real mail pipeline.
        if "\r" in value or "\n" in value:
            raise ValueError("must be a single line")
        return value


class FaultSpec(BaseModel):
    """Body of `POST /_control/faults`. `count` 0 disarms; a new spec replaces the previous one."""

    model_config = ConfigDict(extra="forbid", strict=True)

    status: int = Field(ge=400, le=599)
    count: int = Field(ge=0, le=10_000)
    after_commit: bool = False
    # With after_commit: hold the answer this long after committing, so a drill can kill the
    # caller while its side effect is done but unacknowledged.
    hold_seconds: float = Field(0.0, ge=0, le=3600)


class _LedgerEntry(BaseModel):
    """One performed effect and the idempotency key that owns it; one line of the state file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str
    fingerprint: str
    response: JSONObject


@dataclass
class _ArmedFault:
    status: int
    remaining: int
    after_commit: bool
    hold_seconds: float = 0.0


@dataclass(frozen=True)
class _Call:
    key: str | None
    path: str
    status: int
    replayed: bool
    at: str


RequestT = TypeVar("RequestT", bound=BaseModel)

# Builds the stored response from the validated request, the effect id and the creation time.
EffectBuilder = Callable[[RequestT, str, str], JSONObject]


class IdempotentService(Generic[RequestT]):
    """The idempotent ledger behind one integration: auth, keys, effects, call log and faults.

    `submit` is the whole `POST <resource>` contract described in the module docstring. The
    ledger check and the commit run under one asyncio lock and are shielded from cancellation, so
    a client that disconnects mid-request cannot leave a written-but-unrecorded effect.
    """

    def __init__(
        self,
        *,
        token: str,
        request_model: type[RequestT],
        id_prefix: str,
        build: EffectBuilder[RequestT],
        state_file: Path | None,
    ) -> None:
        if not token:
            raise ValueError("token must not be empty")
        self._token = token.encode()
        self._request_model = request_model
        self._id_prefix = id_prefix
        self._build = build
        self._state_file = state_file
        self._lock = asyncio.Lock()
        self._entries: dict[str, _LedgerEntry] = {}
        self._calls: list[_Call] = []
        self._fault: _ArmedFault | None = None
        if state_file is not None:
            self._load(state_file)

    def authorized(self, authorization: str | None) -> bool:
        """Whether an `Authorization` header value carries this service's bearer token."""
        if authorization is None:
            return False
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return False
        # Starlette decodes header bytes as latin-1; encoding back recovers the exact bytes sent.
        return hmac.compare_digest(credentials.strip().encode("latin-1"), self._token)

    def effects(self) -> list[JSONObject]:
        """Every effect performed, in creation order, as first returned to the caller."""
        return [entry.response for entry in self._entries.values()]

    def calls(self) -> list[JSONObject]:
        """Every resource POST answered, in order, with its key, path, status and replay flag."""
        return [asdict(call) for call in self._calls]

    def arm_fault(self, spec: FaultSpec) -> None:
        """Make the next `spec.count` authenticated, keyed resource POSTs answer `spec.status`."""
        self._fault = _ArmedFault(spec.status, spec.count, spec.after_commit, spec.hold_seconds)

    async def reset(self) -> None:
        """Forget everything, including the state file's contents."""
        async with self._lock:
            if self._state_file is not None:
                await asyncio.to_thread(_truncate, self._state_file, 0)
            self._entries.clear()
            self._calls.clear()
            self._fault = None

    async def submit(self, request: Request) -> JSONResponse:
        """Answer one `POST <resource>` and record the call."""
        key = request.headers.get(KEY_HEADER)
        response = await self._answer(request, key)
        self._calls.append(
            _Call(
                key=key,
                path=request.url.path,
                status=response.status_code,
                replayed=response.headers.get(REPLAYED_HEADER) == "true",
                at=_now(),
            )
        )
        return response

    async def _answer(self, request: Request, key: str | None) -> JSONResponse:
        if not self.authorized(request.headers.get("Authorization")):
            return _unauthorized()
        if not key:
            return _error(400, f"missing {KEY_HEADER} header")
        if len(key) > MAX_IDEMPOTENCY_KEY_LENGTH:
            return _error(400, f"{KEY_HEADER} longer than {MAX_IDEMPOTENCY_KEY_LENGTH} characters")
        fault = self._take_fault()
        if fault is not None and not fault.after_commit:
            return _injected(fault.status)
        try:
            payload = self._request_model.model_validate_json(await request.body())
        except ValidationError as exc:
            response = _invalid(exc)
        else:
            response = await asyncio.shield(self._apply(key, payload))
        if fault is not None:
            if fault.hold_seconds:
                await asyncio.sleep(fault.hold_seconds)
            return _injected(fault.status)
        return response

    def _take_fault(self) -> _ArmedFault | None:
        # No await between the check and the decrement: concurrent requests each take one.
        fault = self._fault
        if fault is None or fault.remaining <= 0:
            return None
        fault.remaining -= 1
        return fault

    async def _apply(self, key: str, payload: RequestT) -> JSONResponse:
        fingerprint = hashlib.sha256(
            json.dumps(payload.model_dump(mode="json"), sort_keys=True).encode()
        ).hexdigest()
        async with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                if entry.fingerprint != fingerprint:
                    return _error(409, KEY_REUSED)
                return JSONResponse(entry.response, headers={REPLAYED_HEADER: "true"})
            effect_id = f"{self._id_prefix}_{hashlib.sha256(key.encode()).hexdigest()[:24]}"
            entry = _LedgerEntry(
                key=key, fingerprint=fingerprint, response=self._build(payload, effect_id, _now())
            )
            if self._state_file is not None:
                # Durable before it is visible or answered: a crash now loses an effect no
                # caller was told about, so the caller's retry performs it exactly once.
                await asyncio.to_thread(_append_line, self._state_file, entry.model_dump_json())
            self._entries[key] = entry
        return JSONResponse(entry.response, status_code=201)

    def _load(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.touch()
            _fsync_dir(path.parent)
            return
        data = path.read_bytes()
        intact = 0
        for number, line in enumerate(data.splitlines(keepends=True), start=1):
            if not line.endswith(b"\n"):
                # A write torn by a crash. Its response was never sent, so dropping it is safe.
                logger.warning("%s: dropping torn last line %d", path, number)
                break
            if line.strip():
                try:
                    entry = _LedgerEntry.model_validate_json(line)
                except ValidationError as exc:
                    raise ValueError(f"{path}:{number}: corrupt ledger line: {exc}") from exc
                self._entries[entry.key] = entry
            intact += len(line)
        if intact < len(data):
            # Appends after a torn line would be glued onto it and become unreadable.
            _truncate(path, intact)


def _append_line(path: Path, line: str) -> None:
    with path.open("ab") as file:
        file.write(line.encode() + b"\n")
        file.flush()
        os.fsync(file.fileno())


def _truncate(path: Path, size: int) -> None:
    with path.open("r+b") as file:
        file.truncate(size)
        file.flush()
        os.fsync(file.fileno())


def _fsync_dir(directory: Path) -> None:
    # Makes a newly created file's directory entry durable, not just its contents.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _error(status: int, reason: str, **extra: Any) -> JSONResponse:
    """The services' error shape: `{"error": reason, ...extra}`."""
    return JSONResponse({"error": reason, **extra}, status_code=status)


def _unauthorized() -> JSONResponse:
    """401 with the challenge RFC 6750 asks for."""
    response = _error(401, "missing or invalid bearer token")
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


def _invalid(exc: ValidationError) -> JSONResponse:
    """422 naming each invalid field and why."""
    details = [
        {"loc": ".".join(str(part) for part in item["loc"]) or "body", "msg": item["msg"]}
        for item in exc.errors(include_url=False, include_context=False, include_input=False)
    ]
    reason = "; ".join(f"{detail['loc']}: {detail['msg']}" for detail in details)
    return _error(422, f"invalid request body: {reason}", details=details)


def _injected(status: int) -> JSONResponse:
    return _error(status, f"injected fault: {status}")


class _Rejected(Exception):
    def __init__(self, response: JSONResponse) -> None:
        super().__init__(response.status_code)
        self.response = response


def _service(request: Request) -> IdempotentService[Any]:
    service: IdempotentService[Any] = request.app.state.service
    return service


def _require_token(request: Request) -> None:
    if not _service(request).authorized(request.headers.get("Authorization")):
        raise _Rejected(_unauthorized())


def _create_app(title: str, resource: str, service: IdempotentService[Any]) -> FastAPI:
    # No OpenAPI or docs routes: every route of these services requires the token.
    app = FastAPI(title=title, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.service = service

    async def rejected(_request: Request, exc: Exception) -> JSONResponse:
        if not isinstance(exc, _Rejected):  # pragma: no cover - registered for _Rejected only
            raise exc
        return exc.response

    app.add_exception_handler(_Rejected, rejected)

    # The POST route checks the token itself so that rejected calls are recorded too.
    @app.post(resource)
    async def create(request: Request) -> JSONResponse:
        return await _service(request).submit(request)

    authed = [Depends(_require_token)]

    @app.get(resource, dependencies=authed)
    async def list_effects(request: Request) -> list[JSONObject]:
        return _service(request).effects()

    @app.get("/v1/calls", dependencies=authed)
    async def list_calls(request: Request) -> list[JSONObject]:
        return _service(request).calls()

    @app.post("/_control/faults", dependencies=authed)
    async def faults(request: Request) -> JSONResponse:
        try:
            spec = FaultSpec.model_validate_json(await request.body())
        except ValidationError as exc:
            return _invalid(exc)
        _service(request).arm_fault(spec)
        return JSONResponse(spec.model_dump())

    @app.post("/_control/reset", dependencies=authed)
    async def reset(request: Request) -> JSONResponse:
        await _service(request).reset()
        return JSONResponse({"reset": True})

    return app


def _refund(request: RefundRequest, effect_id: str, created_at: str) -> JSONObject:
    return {
        "id": effect_id,
        "status": "succeeded",
        **request.model_dump(),
        "created_at": created_at,
    }


def _message(request: MessageRequest, effect_id: str, created_at: str) -> JSONObject:
    return {"id": effect_id, "status": "queued", **request.model_dump(), "created_at": created_at}


def create_payments_app(token: str, state_file: Path | None = None) -> FastAPI:
    """The payment API: `POST/GET /v1/refunds` (ids `re_…`), `GET /v1/calls`, `/_control/*`."""
    service = IdempotentService(
        token=token,
        request_model=RefundRequest,
        id_prefix="re",
        build=_refund,
        state_file=state_file,
    )
    return _create_app("Stead payments simulator", "/v1/refunds", service)


def create_email_app(token: str, state_file: Path | None = None) -> FastAPI:
    """The email API: `POST/GET /v1/messages` (ids `em_…`), `GET /v1/calls`, `/_control/*`."""
    service = IdempotentService(
        token=token,
        request_model=MessageRequest,
        id_prefix="em",
        build=_message,
        state_file=state_file,
    )
    return _create_app("Stead email simulator", "/v1/messages", service)


async def _all_ready(servers: Sequence[EmbeddedServer]) -> None:
    for server in servers:
        await server.ready.wait()


async def _serve_until_stopped(names: Sequence[str], servers: Sequence[EmbeddedServer]) -> None:
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for server in servers:
            server.should_exit = True

    stop_signals = (signal.SIGINT, signal.SIGTERM)
    for sig in stop_signals:
        loop.add_signal_handler(sig, stop)
    try:
        tasks = [asyncio.create_task(server.serve()) for server in servers]
        for task in tasks:
            # One server ending takes the others down rather than leaving half the services up.
            task.add_done_callback(lambda _task: stop())
        ready = asyncio.create_task(_all_ready(servers))
        await asyncio.wait([ready, *tasks], return_when=asyncio.FIRST_COMPLETED)
        if all(server.ready.is_set() for server in servers):
            logger.info(
                "integrations ready: %s",
                " ".join(
                    f"{name}={server.url()}" for name, server in zip(names, servers, strict=True)
                ),
            )
        ready.cancel()
        await asyncio.gather(*tasks)
    finally:
        for sig in stop_signals:
            loop.remove_signal_handler(sig)


def serve_apps(host: str, apps: Sequence[tuple[str, ASGIApp, int]]) -> None:
    """Serve each named app on its port until SIGINT or SIGTERM; blocks. Main thread only.
    Port 0 picks a free port; once all listen, this module's logger says so at INFO with
    each one's base URL (`integrations ready: payments=http://... email=http://...`)."""
    servers = [
        EmbeddedServer(
            uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
        )
        for _, app, port in apps
    ]
    asyncio.run(_serve_until_stopped([name for name, _, _ in apps], servers))
