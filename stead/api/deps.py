"""Request dependencies: the shared clients, and the authenticated caller.

Routes declare what they need with these `Annotated` aliases; nothing reads globals. What the
caller may then do is checked by the service layer (stead.service), for every front alike.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from stead.policy.limits import Action
from stead.service.access import Services, enforce, require
from stead.service.errors import Unauthorized
from stead.store import principals
from stead.store.principals import Principal


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


_READS = frozenset({"GET", "HEAD", "OPTIONS"})


def api_key_id(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The id part of the caller's key, `stead_<id>_<secret>`: the subject of per-key limits.
    Meaningful only beside `CurrentPrincipal`, which checks the key."""
    parts = credentials.credentials.split("_", 2) if credentials else []
    return parts[1] if len(parts) == 3 else ""


ApiKeyId = Annotated[str, Depends(api_key_id)]


def limited(action: Action, right: str) -> Any:
    """A route dependency for writes: the caller holds `right` and is within the plan's
    limits for `action` (429 otherwise). Reads pass untouched. The right is checked first, so a
    caller refused anyway spends none of the allowance the tenant's real callers need."""

    async def check(
        request: Request, svc: ServicesDep, principal: CurrentPrincipal, key_id: ApiKeyId
    ) -> None:
        if request.method in _READS:
            return
        require(svc, principal, right)
        await enforce(svc, principal, key_id, action)

    return Depends(check)
