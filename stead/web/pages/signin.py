"""Signing in (an API key, or OIDC when configured) and out."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.responses import RedirectResponse, Response

from stead.api.deps import ServicesDep
from stead.service import sessions
from stead.service.access import Services
from stead.service.errors import ServiceError
from stead.web.auth import (
    HOME,
    ViewerDep,
    check_csrf,
    check_presession,
    clear_session_cookie,
    presession_token,
    read_form,
    safe_next,
    secure,
    set_presession_cookie,
    set_session_cookie,
)
from stead.web.errors import WebRoute
from stead.web.oidc import BINDING_COOKIE, LOGIN_LIFETIME, OidcClient
from stead.web.render import page

router = APIRouter(route_class=WebRoute)
Next = Annotated[str | None, Query(alias="next", max_length=2000)]


def oidc_client(request: Request, svc: Services) -> OidcClient | None:
    """The process's OIDC client (built once: it caches the issuer's documents)."""
    if not svc.settings.oidc_issuer:
        return None
    state = request.app.state
    client: OidcClient | None = getattr(state, "oidc_client", None)
    if client is None or client.settings is not svc.settings:
        client = OidcClient(svc.settings)
        state.oidc_client = client
    return client


def _sign_in_page(
    request: Request, svc: Services, next_path: str | None, status: int = 200, error: str = ""
) -> Response:
    token, fresh = presession_token(svc.settings, request)
    response = page(
        request,
        "signin.html",
        status,
        next_path=safe_next(next_path),
        oidc=bool(svc.settings.oidc_issuer),
        error=error,
        csrf=token,
    )
    if fresh is not None:
        set_presession_cookie(response, request, svc.settings, fresh)
    return response


@router.get("/")
async def home() -> Response:
    return RedirectResponse(HOME, status_code=303)


@router.get("/sign-in")
async def sign_in_form(request: Request, svc: ServicesDep, next_path: Next = None) -> Response:
    return _sign_in_page(request, svc, next_path)


@router.post("/sign-in")
async def sign_in(request: Request, svc: ServicesDep) -> Response:
    form = await read_form(request)
    next_path = form.get("next")
    try:
        check_presession(svc.settings, request, form)
        token, _ = await sessions.sign_in_with_key(svc, form.get("key", ""))
    except ServiceError as exc:
        return _sign_in_page(request, svc, next_path, exc.status, exc.detail)
    response = RedirectResponse(safe_next(next_path), status_code=303)
    set_session_cookie(response, request, svc, token)
    return response


@router.post("/sign-out")
async def sign_out(request: Request, viewer: ViewerDep) -> Response:
    check_csrf(viewer, await read_form(request))
    await sessions.sign_out(viewer.svc, viewer.token, viewer.session)
    response = RedirectResponse("/ui/sign-in", status_code=303)
    clear_session_cookie(response, request, viewer.svc.settings)
    return response


@router.get("/oidc/start")
async def oidc_start(request: Request, svc: ServicesDep, next_path: Next = None) -> Response:
    client = oidc_client(request, svc)
    if client is None:
        return _sign_in_page(request, svc, next_path, 404, "OIDC sign-in is not configured")
    try:
        url, binding = await client.begin(svc.pool, safe_next(next_path))
    except ServiceError as exc:
        return _sign_in_page(request, svc, next_path, exc.status, exc.detail)
    response = RedirectResponse(url, status_code=303)
    response.set_cookie(
        BINDING_COOKIE,
        binding,
        max_age=int(LOGIN_LIFETIME.total_seconds()),
        path="/ui/oidc/",
        httponly=True,
        samesite="lax",  # the issuer's redirect back is a cross-site navigation
        secure=secure(request, svc.settings),
    )
    return response


@router.get("/oidc/callback")
async def oidc_callback(
    request: Request,
    svc: ServicesDep,
    state: Annotated[str, Query(max_length=200)] = "",
    code: Annotated[str, Query(max_length=4000)] = "",
    error: Annotated[str, Query(max_length=200)] = "",
) -> Response:
    client = oidc_client(request, svc)
    if client is None:
        return _sign_in_page(request, svc, None, 404, "OIDC sign-in is not configured")
    if error or not state or not code:
        reason = f"the identity provider did not sign you in ({error or 'no code'})"
        return _sign_in_page(request, svc, None, 401, reason)
    try:
        identity, return_to = await client.complete(
            svc.pool, state, code, request.cookies.get(BINDING_COOKIE)
        )
        token, _ = await sessions.sign_in_as(svc, identity.tenant, identity.principal_id)
    except ServiceError as exc:
        return _sign_in_page(request, svc, None, exc.status, exc.detail)
    response = RedirectResponse(safe_next(return_to), status_code=303)
    response.delete_cookie(BINDING_COOKIE, path="/ui/oidc/")
    set_session_cookie(response, request, svc, token)
    return response
