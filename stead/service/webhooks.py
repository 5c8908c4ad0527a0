"""Webhook endpoints of a tenant: register, change, rotate the secret, delete; read the
delivery log and re-deliver. Every write is audited (`webhook.*`), never with the secret.

A tenant admin registers an endpoint (`webhooks:manage`, held by admins) for some of the
event types in `stead.webhooks.EVENT_TYPES`. Its signing secret is generated here, returned
once (at creation and at each rotation) and stored sealed with the payload keys; a rotation
keeps the previous secret signing beside the new one for a grace period, so receivers can
switch without dropping deliveries.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import asyncpg
from pydantic import BaseModel, Field

from stead.crypto import Sealer
from stead.service.access import Services, require
from stead.service.audited import by_caller
from stead.service.errors import Conflict, Invalid, NotFound, Unavailable
from stead.service.schemas import Page, Request
from stead.store import webhooks as store
from stead.store.db import Conn
from stead.store.principals import Principal
from stead.webhooks import EVENT_TYPES, signing
from stead.webhooks.urls import Reach, UnsafeUrl, check_url

RIGHT = "webhooks:manage"
MAX_ENDPOINTS = 20
ENDPOINT_ID = re.compile(r"^we_[a-z2-7]{26}$")
DELIVERY_ID = re.compile(r"^whd_[0-9a-f]{32}$")
EventType = Literal["run.completed", "run.failed", "approval.requested", "approval.decided"]
DeliveryStatus = Literal["pending", "succeeded", "failed", "skipped"]


class EndpointIn(Request):
    url: str = Field(max_length=2000, examples=["https://hooks.example.com/stead"])
    events: list[EventType] = Field(min_length=1, max_length=len(EVENT_TYPES))
    description: str = Field("", max_length=500)


class EndpointPatch(Request):
    url: str | None = Field(None, max_length=2000)
    events: list[EventType] | None = Field(None, min_length=1, max_length=len(EVENT_TYPES))
    description: str | None = Field(None, max_length=500)
    enabled: bool | None = Field(
        None, description="true re-enables an endpoint disabled after failing (or by an admin)"
    )


class RotateIn(Request):
    keep_previous_seconds: int = Field(
        86_400,
        ge=0,
        le=7 * 86_400,
        description="how long the previous secret keeps signing beside the new one (0: stop now)",
    )


class EndpointOut(BaseModel):
    endpoint_id: str
    url: str
    events: list[str]
    description: str
    enabled: bool
    disabled_reason: str | None
    disabled_at: datetime | None
    failing_since: datetime | None
    last_success_at: datetime | None
    previous_secret_expires_at: datetime | None = Field(
        description="after a rotation: until when the previous secret still signs"
    )
    created_by: str
    created_at: datetime
    updated_at: datetime

    @staticmethod
    def of(row: asyncpg.Record) -> EndpointOut:
        expires = row["previous_expires_at"]
        return EndpointOut(
            endpoint_id=row["id"],
            url=row["url"],
            events=list(row["event_types"]),
            description=row["description"],
            enabled=row["enabled"],
            disabled_reason=row["disabled_reason"],
            disabled_at=row["disabled_at"],
            failing_since=row["failing_since"],
            last_success_at=row["last_success_at"],
            previous_secret_expires_at=expires if expires and expires > datetime.now(UTC) else None,
            created_by=row["created_by"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )


class EndpointCreated(EndpointOut):
    secret: str = Field(description="the signing secret (whsec_...): shown once, store it now")


class SecretOut(BaseModel):
    endpoint_id: str
    secret: str = Field(description="the new signing secret: shown once, store it now")
    previous_secret_expires_at: datetime | None


class AttemptOut(BaseModel):
    attempt: int
    at: datetime
    status_code: int | None
    error: str | None
    duration_ms: int
    response: str = Field(description="the start of the receiver's answer (at most 2 KiB)")


class DeliveryOut(BaseModel):
    delivery_id: str
    endpoint_id: str
    event_id: str = Field(description="the webhook-id header: the same on every retry")
    event_type: str
    run_id: str | None
    status: DeliveryStatus
    attempts: int
    last_status: int | None
    last_error: str | None
    redelivery_of: str | None
    requested_by: str | None
    created_at: datetime
    first_attempt_at: datetime | None
    last_attempt_at: datetime | None
    finished_at: datetime | None

    @staticmethod
    def of(row: asyncpg.Record) -> DeliveryOut:
        return DeliveryOut(delivery_id=row["id"], **{k: row[k] for k in _DELIVERY_FIELDS})


_DELIVERY_FIELDS = tuple(f for f in DeliveryOut.model_fields if f != "delivery_id")


class DeliveryDetail(DeliveryOut):
    attempt_log: list[AttemptOut]


def _sealer(svc: Services) -> Sealer:
    keys = svc.settings.encryption_keys
    if not keys:
        raise Unavailable(
            "webhook secrets are kept sealed with the payload keys: set STEAD_PAYLOAD_KEYS"
        )
    return Sealer(keys)


def _url(svc: Services, url: str) -> str:
    try:
        return check_url(url, Reach.of(svc.settings))
    except UnsafeUrl as exc:
        raise Invalid(f"url: {exc}") from None


def _check_ids(endpoint_id: str, delivery_id: str | None = None) -> None:
    """A malformed id is not found, like any other unknown one (and never reaches SQL)."""
    if not ENDPOINT_ID.match(endpoint_id):
        raise NotFound("no such webhook endpoint")
    if delivery_id is not None and not DELIVERY_ID.match(delivery_id):
        raise NotFound("no such delivery")


def _new_endpoint_id() -> str:
    return "we_" + base64.b32encode(secrets.token_bytes(20)).decode().lower()[:26]


async def _audit(
    svc: Services, conn: Conn, principal: Principal, action: str, data: dict[str, Any]
) -> None:
    await svc.audit.append(conn, [by_caller(principal, action, data)])


async def register(svc: Services, principal: Principal, body: EndpointIn) -> EndpointCreated:
    require(svc, principal, RIGHT)
    url = _url(svc, body.url)
    sealer = _sealer(svc)
    endpoint_id, secret = _new_endpoint_id(), signing.new_secret()
    events: list[str] = sorted(set(body.events))
    async with svc.pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 11))", principal.tenant
        )
        if await store.count_endpoints(conn, principal.tenant) >= MAX_ENDPOINTS:
            raise Conflict(f"a tenant may register at most {MAX_ENDPOINTS} webhook endpoints")
        row = await store.insert_endpoint(
            conn,
            principal.tenant,
            endpoint_id,
            url,
            body.description,
            events,
            signing.seal(sealer, principal.tenant, endpoint_id, secret),
            principal.id,
        )
        await _audit(
            svc,
            conn,
            principal,
            "webhook.created",
            {"endpoint_id": endpoint_id, "url": url, "events": events},
        )
    return EndpointCreated(**EndpointOut.of(row).model_dump(), secret=secret)


async def list_endpoints(svc: Services, principal: Principal) -> list[EndpointOut]:
    require(svc, principal, RIGHT)
    async with svc.pool.acquire() as conn:
        rows = await store.list_endpoints(conn, principal.tenant)
    return [EndpointOut.of(r) for r in rows]


async def get_endpoint(svc: Services, principal: Principal, endpoint_id: str) -> EndpointOut:
    require(svc, principal, RIGHT)
    _check_ids(endpoint_id)
    async with svc.pool.acquire() as conn:
        row = await store.get_endpoint(conn, principal.tenant, endpoint_id)
    if row is None:
        raise NotFound("no such webhook endpoint")
    return EndpointOut.of(row)


async def update_endpoint(
    svc: Services, principal: Principal, endpoint_id: str, body: EndpointPatch
) -> EndpointOut:
    require(svc, principal, RIGHT)
    _check_ids(endpoint_id)
    changes: dict[str, Any] = {}
    if body.url is not None:
        changes["url"] = _url(svc, body.url)
    if body.events is not None:
        changes["event_types"] = sorted(set(body.events))
    if body.description is not None:
        changes["description"] = body.description
    if body.enabled is not None:
        changes["enabled"] = body.enabled
    if not changes:
        raise Invalid("nothing to change: set url, events, description or enabled")
    async with svc.pool.acquire() as conn, conn.transaction():
        row = await store.update_endpoint(conn, principal.tenant, endpoint_id, changes)
        if row is None:
            raise NotFound("no such webhook endpoint")
        await _audit(
            svc, conn, principal, "webhook.updated", {"endpoint_id": endpoint_id, **changes}
        )
    return EndpointOut.of(row)


async def rotate_secret(
    svc: Services, principal: Principal, endpoint_id: str, body: RotateIn
) -> SecretOut:
    require(svc, principal, RIGHT)
    _check_ids(endpoint_id)
    sealer = _sealer(svc)
    secret = signing.new_secret()
    keep = body.keep_previous_seconds
    expires = datetime.now(UTC) + timedelta(seconds=keep) if keep else None
    async with svc.pool.acquire() as conn, conn.transaction():
        row = await store.rotate_secret(
            conn,
            principal.tenant,
            endpoint_id,
            signing.seal(sealer, principal.tenant, endpoint_id, secret),
            expires,
        )
        if row is None:
            raise NotFound("no such webhook endpoint")
        await _audit(
            svc,
            conn,
            principal,
            "webhook.secret_rotated",
            {
                "endpoint_id": endpoint_id,
                "previous_expires_at": expires.isoformat() if expires else None,
            },
        )
    return SecretOut(endpoint_id=endpoint_id, secret=secret, previous_secret_expires_at=expires)


async def delete_endpoint(svc: Services, principal: Principal, endpoint_id: str) -> None:
    """Delete the endpoint and its delivery log; deliveries still retrying end as skipped."""
    require(svc, principal, RIGHT)
    _check_ids(endpoint_id)
    async with svc.pool.acquire() as conn, conn.transaction():
        if not await store.delete_endpoint(conn, principal.tenant, endpoint_id):
            raise NotFound("no such webhook endpoint")
        await _audit(svc, conn, principal, "webhook.deleted", {"endpoint_id": endpoint_id})


# --- the delivery log ------------------------------------------------------------------------


def _encode_cursor(row: asyncpg.Record) -> str:
    raw = f"{row['created_at'].isoformat()}|{row['id']}".encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        at, _, delivery_id = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        return datetime.fromisoformat(at), delivery_id
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise Invalid("cursor is not one this API returned") from None


async def list_deliveries(
    svc: Services,
    principal: Principal,
    endpoint_id: str,
    *,
    status: DeliveryStatus | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> Page[DeliveryOut]:
    """The endpoint's deliveries, newest first."""
    await get_endpoint(svc, principal, endpoint_id)
    before = _decode_cursor(cursor) if cursor else None
    async with svc.pool.acquire() as conn:
        rows = await store.list_deliveries(
            conn, principal.tenant, endpoint_id, status=status, before=before, limit=limit
        )
    more = _encode_cursor(rows[-1]) if len(rows) == limit else None
    return Page(items=[DeliveryOut.of(r) for r in rows], next_cursor=more)


async def get_delivery(
    svc: Services, principal: Principal, endpoint_id: str, delivery_id: str
) -> DeliveryDetail:
    require(svc, principal, RIGHT)
    _check_ids(endpoint_id, delivery_id)
    async with svc.pool.acquire() as conn:
        row = await store.get_delivery(conn, principal.tenant, delivery_id, endpoint_id)
        if row is None:
            raise NotFound("no such delivery")
        attempts = await store.attempts(conn, principal.tenant, delivery_id)
    return DeliveryDetail(
        **DeliveryOut.of(row).model_dump(),
        attempt_log=[AttemptOut.model_validate(dict(a)) for a in attempts],
    )


async def redeliver(
    svc: Services, principal: Principal, endpoint_id: str, delivery_id: str
) -> DeliveryOut:
    """Send the delivery's event again, as a new delivery with the same `webhook-id` (a
    receiver that has it already ignores it). The endpoint must be enabled."""
    require(svc, principal, RIGHT)
    _check_ids(endpoint_id, delivery_id)
    # Missing, whichever id is wrong: the same answer as GET .../deliveries/{id}.
    async with svc.pool.acquire() as conn:
        if await store.get_delivery(conn, principal.tenant, delivery_id, endpoint_id) is None:
            raise NotFound("no such delivery")
    endpoint = await get_endpoint(svc, principal, endpoint_id)
    if not endpoint.enabled:
        raise Conflict("the endpoint is disabled: enable it first (PATCH with enabled: true)")
    new_id = "whd_" + uuid.uuid4().hex
    async with svc.pool.acquire() as conn, conn.transaction():
        if await store.get_delivery(conn, principal.tenant, delivery_id, endpoint_id) is None:
            raise NotFound("no such delivery")
        await store.redeliver(conn, principal.tenant, delivery_id, new_id, principal.id)
        await _audit(
            svc,
            conn,
            principal,
            "webhook.redelivered",
            {"endpoint_id": endpoint_id, "delivery_id": delivery_id, "new_delivery_id": new_id},
        )
        row = await store.get_delivery(conn, principal.tenant, new_id)
    assert row is not None
    return DeliveryOut.of(row)
