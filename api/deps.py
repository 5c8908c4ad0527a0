"""Request dependencies: the shared clients, and the authenticated caller.

Routes declare what they need with these `Annotated` aliases; nothing reads globals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from temporalio.client import Client

from api.errors import Forbidden, Unauthorized, Unavailable
from policies.permissions import PLATFORM_RIGHT_PREFIX, PLATFORM_TENANT, PermissionPolicy
from stead import metrics
from stead.config import Settings
from store import principals
from store.audit import AuditWriter
from store.db import Pool
from store.principals import Principal
from workflows.state import CancelInput, DecideInput


@dataclass
class Services:
    settings: Settings
    temporal: Client
    pool: Pool
    permissions: PermissionPolicy
    audit: AuditWriter


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found


_bearer = HTTPBearer(auto_error=False, description="Stead API key: `Bearer stead_...`")


async def authenticate(svc: Services, authorization: str | None) -> Principal:
    """The principal behind an `Authorization: Bearer <key>` header, or Unauthorized."""
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("missing credentials: send Authorization: Bearer <API key>")
    async with svc.pool.acquire() as conn:
        principal = await principals.authenticate(conn, key.strip())
    if principal is None:
        raise Unauthorized("invalid or revoked API key")
    return principal


async def current_principal(
    request: Request,
    # Declared so that OpenAPI documents the scheme; the header itself was read, and the
    # caller authenticated, by `api.app.Authenticate` before the body was read.
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    found = getattr(request.state, "principal", None)
    if isinstance(found, Principal):
        return found
    return await authenticate(services(request), request.headers.get("authorization"))


ServicesDep = Annotated[Services, Depends(services)]
CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


AttestedT = TypeVar("AttestedT", DecideInput, CancelInput)


def attest(svc: Services, workflow_id: str, message: AttestedT) -> AttestedT:
    """Sign a decision or cancel after the caller's authorization passed (see stead.attest)."""
    attestor = svc.settings.attestor
    if attestor is None:
        raise Unavailable(
            "decisions need attestation keys: set STEAD_PAYLOAD_KEYS or STEAD_ATTESTATION_KEYS"
        )
    return message.model_copy(update={"attestation": attestor.sign(workflow_id, message.claim())})


def require(svc: Services, principal: Principal, right: str) -> None:
    """403 unless the caller's roles grant `right`. A platform right counts only for a member
    of the platform tenant: a role that reached a customer tenant's user by any path (an old
    row, a hand edit) still reaches no other tenant."""
    platform_only = right.startswith(PLATFORM_RIGHT_PREFIX)
    if (platform_only and principal.tenant != PLATFORM_TENANT) or not svc.permissions.has_right(
        principal.roles, right
    ):
        metrics.PERMISSION_DENIALS.labels("api", right).inc()
        raise Forbidden(f"this action needs the right {right!r}, which your roles do not grant")
