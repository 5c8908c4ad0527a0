"""The codec server: Temporal's remote-codec protocol over Stead's payload encryption.

`POST .../encode` and `POST .../decode` take and return proto-JSON `Payloads`
(`{"payloads": [{"metadata": {k: base64}, "data": base64}]}`) and run them through the same
`EncryptionCodec` the API and workers use, so the Temporal Web UI and CLI can show what is
stored encrypted, to the people allowed to see it. Decoding first resolves claim-check
references (large payloads kept in PostgreSQL, see store/payloads.py), so those show too.

Two ways in, because codec clients authenticate so differently:

- `/codec/encode|decode` with `Authorization: Bearer <Stead API key>` of a principal holding
  `platform:codec`: the Temporal CLI (`--codec-auth`), scripts, a UI configured to pass a token.
- `/codec/{token}/encode|decode` with `STEAD_CODEC_TOKEN` in the path: the Web UI, which sends
  no credentials to a codec unless configured for OIDC. The token is then as secret as the UI's
  own settings (which serve the endpoint to every browser that loads the UI): reachable only
  by whoever may reach the UI.

CORS is answered here, for these routes only, and only for `STEAD_UI_ORIGIN`. Payload contents
are never logged; failures name the payload's index, never its bytes.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response, status
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.api.sdk.v1 import ExternalStorageReference
from temporalio.converter import StorageDriverClaim, StorageDriverRetrieveContext

from stead.api.deps import CurrentPrincipal, ServicesDep, services
from stead.codec import EncryptionCodec
from stead.config import Settings
from stead.crypto import SealError
from stead.service.access import require
from stead.service.errors import ServiceError, Unauthorized, Unavailable
from stead.store.payloads import PayloadMissing, PostgresPayloadStore

# Temporal refuses payloads over 2 MiB; base64 adds a third. A request the size of several of
# the largest payloads passes, anything bigger is not a codec call.
MAX_BODY_BYTES = 10 * 1024 * 1024
_PREFLIGHT_MAX_AGE = "600"
_ALLOWED_HEADERS = "Authorization, Content-Type, X-Namespace"
# How the SDK writes a claim-check reference (store/payloads.py) into a history.
_REFERENCE_TYPE = ExternalStorageReference.DESCRIPTOR.full_name.encode()


class _CodecRoute(APIRoute):
    """Adds CORS headers to every response of these routes, errors included, so the UI can
    read a 401 or 503 instead of seeing an opaque network failure."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def with_cors(request: Request) -> Response:
            try:
                response = await handler(request)
            except ServiceError as exc:
                # The same body shape as api.errors, built here so the CORS headers survive.
                response = JSONResponse(
                    {"detail": exc.detail, "code": exc.code}, status_code=exc.status
                )
                if exc.status == status.HTTP_401_UNAUTHORIZED:
                    response.headers["WWW-Authenticate"] = "Bearer"
            response.headers.update(_cors_headers(request))
            return response

        return with_cors


router = APIRouter(prefix="/codec", tags=["codec"], route_class=_CodecRoute)


def _cors_headers(request: Request) -> dict[str, str]:
    origin = request.headers.get("origin")
    allowed = services(request).settings.ui_origins
    headers = {"Vary": "Origin"}
    if origin is None or origin not in allowed:
        return headers
    headers |= {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Credentials": "true",
    }
    if request.method == "OPTIONS":
        headers |= {
            "Access-Control-Allow-Methods": "POST, OPTIONS",
            "Access-Control-Allow-Headers": _ALLOWED_HEADERS,
            "Access-Control-Max-Age": _PREFLIGHT_MAX_AGE,
        }
        # Chrome asks before a page reaches a more private address (a UI on a LAN address
        # calling a codec on loopback).
        if request.headers.get("access-control-request-private-network") == "true":
            headers["Access-Control-Allow-Private-Network"] = "true"
    return headers


@router.options("/encode", include_in_schema=False)
@router.options("/decode", include_in_schema=False)
@router.options("/{token}/encode", include_in_schema=False)
@router.options("/{token}/decode", include_in_schema=False)
async def preflight(request: Request) -> Response:
    """CORS preflight: answered without credentials, as browsers send none with it."""
    allowed = "Access-Control-Allow-Origin" in _cors_headers(request)
    return Response(
        status_code=status.HTTP_204_NO_CONTENT if allowed else status.HTTP_403_FORBIDDEN
    )


def _codec(settings: Settings) -> EncryptionCodec:
    if not settings.encryption_keys:
        raise Unavailable(
            "payload encryption is not configured (set STEAD_PAYLOAD_KEYS): nothing to decode",
            code="codec_unconfigured",
        )
    # The codec server only shows payloads: plaintext ones (written before encryption, or by
    # someone who reached Temporal directly) are shown as they are, for whoever investigates.
    return EncryptionCodec(settings.encryption_keys, allow_plaintext=True)


def _check_token(settings: Settings, token: str) -> None:
    expected = settings.codec_token
    # Compared in constant time; with no token configured, no path token is valid.
    if expected is None or not hmac.compare_digest(
        token.encode(), expected.get_secret_value().encode()
    ):
        raise Unauthorized("invalid codec token")


async def _read_payloads(request: Request) -> Payloads:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:  # a chunked or understated body is cut off here
            raise _too_large()
    try:
        # json_format.Parse took a body that is not UTF-8 for a 500, and a JSON string where a
        # message belongs for an empty message (found by the schemathesis drill in
        # tests/test_drills.py): the shape is checked first, as the OpenAPI schema states it.
        data = json.loads(bytes(body))
        if not _payloads_shaped(data):
            raise ValueError("not shaped like Payloads")
        # Unknown fields are ignored: a newer UI may send fields this protobuf version lacks.
        # They are dropped before parsing, because the parser reads a key in brackets
        # ("[x]") as a protobuf extension and refuses it even when told to ignore unknown
        # fields (found by the schemathesis drill in tests/test_drills.py).
        known = [
            {k: v for k, v in p.items() if k in ("metadata", "data")}
            for p in data.get("payloads") or []
        ]
        return json_format.ParseDict({"payloads": known}, Payloads())
    except (json_format.ParseError, ValueError):
        raise ServiceError('body must be proto-JSON Payloads: {"payloads": [...]}') from None


def _payloads_shaped(data: object) -> bool:
    """`{"payloads": [{"metadata": {str: str}, "data": str}]}`, any field null or absent."""
    if not isinstance(data, dict):
        return False
    payloads = data.get("payloads")
    if payloads is None:
        return True
    return isinstance(payloads, list) and all(
        isinstance(p, dict)
        and isinstance(p.get("data"), str | None)
        and isinstance(metadata := p.get("metadata"), dict | None)
        and all(isinstance(v, str) for v in (metadata or {}).values())
        for p in payloads
    )


def _too_large() -> ServiceError:
    return ServiceError(f"body over {MAX_BODY_BYTES} bytes", code="payload_too_large", status=413)


async def _encode(request: Request) -> JSONResponse:
    codec = _codec(services(request).settings)
    payloads = (await _read_payloads(request)).payloads
    # Encrypted only, never offloaded: an inline payload is valid wherever a reference is.
    return _reply(await codec.encode(payloads))


async def _decode(request: Request) -> JSONResponse:
    svc = services(request)
    codec = _codec(svc.settings)
    store = PostgresPayloadStore(svc.pool)
    decoded: list[Payload] = []
    for index, payload in enumerate((await _read_payloads(request)).payloads):
        try:
            decoded += await codec.decode([await _claimed(store, payload)])
        except SealError as exc:
            raise _undecodable(index, f"cannot be decrypted: {exc}") from None
        except PayloadMissing as exc:
            raise _undecodable(index, f"is stored outside the history: {exc}") from None
    return _reply(decoded)


async def _claimed(store: PostgresPayloadStore, payload: Payload) -> Payload:
    """The payload itself, or for a claim-check reference the stored (still encrypted)
    payload it points at, so large payloads show decoded in the UI too."""
    if (
        payload.metadata.get("encoding") != b"json/protobuf"
        or payload.metadata.get("messageType") != _REFERENCE_TYPE
    ):
        return payload
    try:
        reference = json_format.Parse(payload.data, ExternalStorageReference())
        claim = StorageDriverClaim(dict(reference.claim_data))
        if reference.driver_name != store.name():
            raise ValueError(f"unknown storage driver {reference.driver_name[:64]!r}")
        [stored] = await store.retrieve(StorageDriverRetrieveContext(), [claim])
    except (json_format.ParseError, KeyError, ValueError) as exc:
        raise PayloadMissing(f"malformed reference ({exc})") from None
    return stored


def _undecodable(index: int, reason: str) -> ServiceError:
    return ServiceError(f"payload {index} {reason}", code="undecodable", status=422)


def _reply(payloads: list[Payload]) -> JSONResponse:
    return JSONResponse(json_format.MessageToDict(Payloads(payloads=payloads)))


# The body the routes read raw (to bound its size), declared for the OpenAPI schema: without
# it a client generated from the schema sends none and gets a 400. Proto-JSON reads `null` as
# "not set", so every field may be null. Found by the schemathesis drill in tests/test_drills.py.
_BASE64 = {"type": ["string", "null"], "format": "byte"}
_BASE64_VALUE = {"type": "string", "format": "byte"}
_PAYLOADS_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "payloads": {
                            "type": ["array", "null"],
                            "items": {
                                "type": "object",
                                "properties": {
                                    "metadata": {
                                        "type": ["object", "null"],
                                        "additionalProperties": {
                                            "type": "string",
                                            "format": "byte",
                                        },
                                    },
                                    "data": _BASE64,
                                },
                            },
                        }
                    },
                }
            }
        },
    }
}


@router.post(
    "/encode",
    summary="Encode payloads (Bearer API key with platform:codec)",
    openapi_extra=_PAYLOADS_BODY,
)
async def encode(request: Request, svc: ServicesDep, principal: CurrentPrincipal) -> JSONResponse:
    require(svc, principal, "platform:codec")
    return await _encode(request)


@router.post(
    "/decode",
    summary="Decode payloads (Bearer API key with platform:codec)",
    openapi_extra=_PAYLOADS_BODY,
)
async def decode(request: Request, svc: ServicesDep, principal: CurrentPrincipal) -> JSONResponse:
    require(svc, principal, "platform:codec")
    return await _decode(request)


@router.post(
    "/{token}/encode",
    summary="Encode payloads (codec token in the path)",
    openapi_extra=_PAYLOADS_BODY,
)
async def encode_with_token(token: str, request: Request) -> JSONResponse:
    _check_token(services(request).settings, token)
    return await _encode(request)


@router.post(
    "/{token}/decode",
    summary="Decode payloads (codec token in the path)",
    openapi_extra=_PAYLOADS_BODY,
)
async def decode_with_token(token: str, request: Request) -> JSONResponse:
    _check_token(services(request).settings, token)
    return await _decode(request)
