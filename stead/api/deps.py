"""Request dependencies: the shared clients, and the authenticated caller.

Routes declare what they need with these `Annotated` aliases; nothing reads globals. What the
caller may then do is checked by the service layer (stead.service), for every front alike.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import HTTPConnection

from stead.policy.limits import Action
from stead.service import sessions
from stead.service.access import Services, admit
from stead.service.errors import Forbidden, Unauthorized
from stead.store import principals
from stead.store.principals import Principal


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found


_READS = frozenset({"GET", "HEAD", "OPTIONS"})
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


async def authenticate_request(svc: Services, request: HTTPConnection) -> tuple[Principal, str]:
    """The caller of an API request and the subject of its per-key limits: a Bearer key, or
    the web app's session cookie. A cookie alone authenticates reads only (a browser's
    EventSource); a write with it also needs the session's CSRF token in `X-CSRF-Token`, which
    another site cannot read, so the JSON API is no more open to forged requests than a key."""
    authorization = request.headers.get("authorization")
    token = request.cookies.get(sessions.COOKIE)
    if authorization or not token:
        principal = await authenticate(svc, authorization)
        return principal, principals.key_id((authorization or "").partition(" ")[2].strip()) or ""
    session = await sessions.resolve(svc, token)
    if session is None:
        raise Unauthorized("the browser session has expired or was signed out; sign in again")
    if request.scope.get("method") not in _READS:
        sent = request.headers.get(sessions.CSRF_HEADER, "")
        if not secrets.compare_digest(sent.encode(), session.csrf_token.encode()):
            raise Forbidden(
                f"a write with a browser session needs its CSRF token in {sessions.CSRF_HEADER}"
            )
    return session.principal, session.limit_key


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


def api_key_id(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The id part of the caller's key, `stead_<id>_<secret>`: the subject of per-key limits
    (for a browser session, what its session counts against). Meaningful only beside
    `CurrentPrincipal`, which checks the key."""
    found = getattr(request.state, "key_id", None)
    if isinstance(found, str):
        return found
    parts = credentials.credentials.split("_", 2) if credentials else []
    return parts[1] if len(parts) == 3 else ""


ApiKeyId = Annotated[str, Depends(api_key_id)]


def limited(action: Action, right: str) -> Any:
    """A route dependency for writes: `stead.service.access.admit` (the right, then the plan's
    limits for `action`). Reads pass untouched."""

    async def check(
        request: Request, svc: ServicesDep, principal: CurrentPrincipal, key_id: ApiKeyId
    ) -> None:
        if request.method in _READS:
            return
        await admit(svc, principal, key_id, action, right)

    return Depends(check)
