"""Who is looking at a page, and the tokens that make a form theirs.

A page's viewer comes from the session cookie (stead.service.sessions); without a live one,
a page sends the browser to sign in. Every state-changing form carries the session's CSRF
token (a synchronizer token, stored with the session) and is refused without it. The sign-in
form, which has no session yet, carries a signed double-submit token instead: an HMAC, under a
key derived from the deployment's keys, of a random value the browser also holds in a cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import quote

from fastapi import Depends
from starlette.requests import Request
from starlette.responses import Response

from stead.api.deps import ServicesDep
from stead.config import Settings
from stead.service import sessions
from stead.service.access import Services
from stead.service.errors import Forbidden, Unavailable
from stead.store.principals import Principal
from stead.store.sessions import Session

SIGN_IN = "/ui/sign-in"
HOME = "/ui/inbox"
PRESESSION_COOKIE = "stead_presession"
CSRF_FIELD = "csrf"
_STALE = "this form's security token is missing or stale: reload the page and try again"


class SignInRequired(Exception):
    """No live session: the browser signs in, then comes back to `next`."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


@dataclass(frozen=True)
class Viewer:
    session: Session
    token: str
    svc: Services

    @property
    def principal(self) -> Principal:
        return self.session.principal

    @property
    def csrf(self) -> str:
        return self.session.csrf_token

    def can(self, right: str) -> bool:
        """Whether to show a link or button; the service layer decides what happens."""
        return self.svc.permissions.has_right(self.principal.roles, right)


async def current_viewer(request: Request, svc: ServicesDep) -> Viewer:
    token = request.cookies.get(sessions.COOKIE)
    session = await sessions.resolve(svc, token) if token else None
    if session is None or token is None:
        wanted = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise SignInRequired(wanted if request.method == "GET" else HOME)
    viewer = Viewer(session, token, svc)
    request.state.viewer = viewer
    return viewer


ViewerDep = Annotated[Viewer, Depends(current_viewer)]


async def read_form(request: Request) -> dict[str, str]:
    """The form's text fields (last value wins). Read only after the viewer is known."""
    form = await request.form()
    return {k: v for k, v in form.items() if isinstance(v, str)}


def check_csrf(viewer: Viewer, form: dict[str, str]) -> None:
    sent = form.get(CSRF_FIELD, "")
    if not hmac.compare_digest(sent.encode(), viewer.csrf.encode()):
        raise Forbidden(_STALE, code="csrf")


# --- the sign-in form's token (no session yet) -----------------------------------------------


def _web_key(settings: Settings) -> bytes:
    secret = settings.attestation_keys or settings.payload_keys
    if secret is None:
        raise Unavailable("sign-in needs the deployment's keys: set STEAD_PAYLOAD_KEYS")
    return hashlib.sha256(b"stead-web-presession\0" + secret.get_secret_value().encode()).digest()


def presession_token(settings: Settings, request: Request) -> tuple[str, str | None]:
    """The sign-in form's token, and the cookie value to set if the browser holds none yet."""
    value = request.cookies.get(PRESESSION_COOKIE) or ""
    fresh = None
    if len(value) < 32:
        value = fresh = secrets.token_urlsafe(32)
    return _sign(settings, value), fresh


def set_presession_cookie(
    response: Response, request: Request, settings: Settings, value: str
) -> None:
    response.set_cookie(
        PRESESSION_COOKIE,
        value,
        max_age=3600,
        path="/ui/",
        httponly=True,
        samesite="strict",
        secure=secure(request, settings),
    )


def check_presession(settings: Settings, request: Request, form: dict[str, str]) -> None:
    value = request.cookies.get(PRESESSION_COOKIE) or ""
    sent = form.get(CSRF_FIELD, "")
    if len(value) < 32 or not hmac.compare_digest(sent.encode(), _sign(settings, value).encode()):
        raise Forbidden(_STALE, code="csrf")


def _sign(settings: Settings, value: str) -> str:
    return hmac.new(_web_key(settings), value.encode(), hashlib.sha256).hexdigest()


# --- the session cookie ----------------------------------------------------------------------


def secure(request: Request, settings: Settings) -> bool:
    return settings.web_secure_cookies or request.url.scheme == "https"


def set_session_cookie(response: Response, request: Request, svc: Services, token: str) -> None:
    response.set_cookie(
        sessions.COOKIE,
        token,
        max_age=int(sessions.lifetime(svc).total_seconds()),
        path="/",
        httponly=True,
        samesite="lax",
        secure=secure(request, svc.settings),
    )


def clear_session_cookie(response: Response, request: Request, settings: Settings) -> None:
    response.delete_cookie(
        sessions.COOKIE,
        path="/",
        httponly=True,
        samesite="lax",
        secure=secure(request, settings),
    )


def safe_next(value: str | None) -> str:
    """Where to go after signing in: a page of this app only, never another site."""
    value = value or ""
    local = value.startswith("/ui/") and not value.startswith("/ui/static/")
    if local and "//" not in value and "\\" not in value:
        return value
    return HOME


def sign_in_url(next_path: str) -> str:
    return f"{SIGN_IN}?next={quote(safe_next(next_path), safe='/')}"
