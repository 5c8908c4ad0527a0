"""Browser sessions: an API key (or an OIDC identity) exchanged for a session in PostgreSQL.

The key itself never reaches the browser's storage: the browser holds only a random session
token, in an HttpOnly cookie. Sessions live in the database, so every API process honours
every other's; each request reads the principal's roles afresh, and a revoked key or a
disabled principal ends its sessions on the next request. Signing in and out is audited.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from stead.contract import AuditEvent
from stead.service.access import Services
from stead.service.errors import Forbidden, Unauthorized
from stead.store import principals, sessions
from stead.store.principals import Principal
from stead.store.sessions import Method, Session

# The cookie holding the session token, and the header a script sends its CSRF token in.
COOKIE = "stead_session"
CSRF_HEADER = "x-csrf-token"


def lifetime(svc: Services) -> timedelta:
    return timedelta(hours=svc.settings.web_session_hours)


async def sign_in_with_key(svc: Services, key: str) -> tuple[str, Session]:
    """A new session for the person behind `key`; Unauthorized for a bad or revoked key."""
    key = key.strip()
    async with svc.pool.acquire() as conn:
        principal = await principals.authenticate(conn, key)
    if principal is None:
        raise Unauthorized("invalid or revoked API key")
    return await open_session(svc, principal, "api_key", principals.key_id(key))


async def sign_in_as(svc: Services, tenant: str, principal_id: str) -> tuple[str, Session]:
    """A new session for a principal an identity provider vouched for (OIDC)."""
    async with svc.pool.acquire() as conn:
        principal = await principals.get_principal(conn, tenant, principal_id)
    if principal is None:
        raise Forbidden(f"no enabled Stead user {principal_id!r} in tenant {tenant!r}")
    return await open_session(svc, principal, "oidc")


async def open_session(
    svc: Services, principal: Principal, method: Method, api_key_id: str | None = None
) -> tuple[str, Session]:
    # Sessions are for people: an agent's or a service's key signs in nowhere.
    if principal.kind != "user":
        raise Forbidden(f"a {principal.kind}'s credentials cannot open a browser session")
    async with svc.pool.acquire() as conn, conn.transaction():
        token, session = await sessions.create(conn, principal, method, lifetime(svc), api_key_id)
    await _audit(svc, principal, "web.signed_in", method)
    return token, session


async def resolve(svc: Services, token: str) -> Session | None:
    """The live session behind a cookie's token, or None."""
    async with svc.pool.acquire() as conn:
        return await sessions.lookup(conn, token)


async def sign_out(svc: Services, token: str, session: Session) -> None:
    async with svc.pool.acquire() as conn:
        revoked = await sessions.revoke(conn, token)
    if revoked:
        await _audit(svc, session.principal, "web.signed_out", session.method)


async def _audit(svc: Services, principal: Principal, action: str, method: Method) -> None:
    event = AuditEvent(
        key=f"{action}:{uuid.uuid4().hex}",
        tenant=principal.tenant,
        actor=principal.id,
        actor_kind="user",
        action=action,
        at=datetime.now(UTC),
        data={"method": method},
    )
    await svc.audit.record(svc.pool, [event])
