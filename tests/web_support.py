"""What the web app's tests share: a signed-in browser-less client, a small OIDC issuer on
loopback, the support desk's refund scenario, and (for the browser tests) Chromium.

The issuer is a real HTTP server (discovery, JWKS, authorize, token) signing ID tokens with an
RSA key it generates at start; `Issuer.misbehave` makes its next token wrong in one way.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from temporalio.client import Client

import stead.web
from activities import support_desk
from stead.api.app import create_app
from stead.config import Settings
from stead.store.db import Pool
from tests.conftest import Tenant, make_services
from tests.drills_support import CUSTOMER, CUSTOMER_EMAIL, ticket
from tests.helpers import start_run, wait_json
from tests.servers import serve_app

CHROMIUM = shutil.which("chromium") or (
    "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
)
_CSRF_FIELD = re.compile(r'name="csrf" value="([^"]+)"')
_CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]+)">')


def csrf_field(html: str) -> str:
    found = _CSRF_FIELD.search(html)
    assert found, "the page has no CSRF field"
    return found[1]


def session_csrf(html: str) -> str:
    found = _CSRF_META.search(html)
    assert found, "the page shows no signed-in viewer"
    return found[1]


async def sign_in(http: httpx.AsyncClient, key: str, next_path: str = "/ui/inbox") -> str:
    """Sign `http` in with `key` as a browser would (the form, its token, the cookie); the
    session's CSRF token."""
    form = await http.get("/ui/sign-in")
    assert form.status_code == 200, form.text
    done = await http.post(
        "/ui/sign-in", data={"key": key, "csrf": csrf_field(form.text), "next": next_path}
    )
    assert done.status_code == 303, done.text
    landed = await http.get(done.headers["location"])
    assert landed.status_code == 200, landed.text
    return session_csrf(landed.text)


@asynccontextmanager
async def web_client(
    settings: Settings, client: Client, pool: Pool, base_url: str = "http://stead.test"
) -> AsyncIterator[httpx.AsyncClient]:
    """A cookie-keeping client of a fresh API app (its own services, as another process)."""
    app = create_app(settings, make_services(settings, client, pool))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=base_url) as http:
        yield http


@pytest.fixture
async def web(
    test_settings: Settings, client: Client, pool: Pool
) -> AsyncIterator[httpx.AsyncClient]:
    """A browser-less client of the test's API app, keeping cookies like a browser."""
    async with web_client(test_settings, client, pool) as http:
        yield http


# --- the support desk's refund ---------------------------------------------------------------


async def seed_customers(pool: Pool, tenant: Tenant) -> None:
    async with pool.acquire() as conn:
        await support_desk.upsert_customer(
            conn, tenant.id, CUSTOMER, "Jane Doe", CUSTOMER_EMAIL, plan="pro"
        )


def refund_ticket(amount: str = "40") -> dict[str, Any]:
    """A ticket whose agent run proposes a refund of `amount` (the simulator reads the hints)."""
    return ticket("web", amount)


async def refund_waiting(
    api: httpx.AsyncClient, tenant: Tenant, amount: str = "40"
) -> tuple[str, str]:
    """A support-agent run waiting for finance to approve its refund: (run id, approval id)."""
    run_id = await start_run(api, tenant, refund_ticket(amount))
    inbox = await wait_json(
        api,
        "/v1/approvals",
        tenant.auth("finance"),
        lambda b: any(a["run_id"] == run_id for a in b["items"]),
        within=30,
    )
    return run_id, next(a["approval_id"] for a in inbox["items"] if a["run_id"] == run_id)


async def refunds_for(payments_url: str, token: str, run_id: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as http:
        refunds = (await http.get(f"{payments_url}/v1/refunds")).json()
    return [r for r in refunds if r.get("metadata", {}).get("run_id") == run_id]


# --- a small OIDC issuer ---------------------------------------------------------------------


@dataclass
class Issuer:
    """The identity provider: who signs in next (`claims`) and how the next token is wrong."""

    url: str = ""
    client_id: str = "stead-web"
    client_secret: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    claims: dict[str, Any] = field(default_factory=dict)
    misbehave: str = ""  # "nonce", "audience", "expired", "foreign_key", "issuer"
    key: RSAKey = field(default_factory=lambda: RSAKey.generate_key(2048, parameters={"kid": "k1"}))
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    token_requests: int = 0

    def settings(self, base: Settings, **extra: Any) -> Settings:
        return base.model_copy(
            update={
                "oidc_issuer": self.url,
                "oidc_client_id": self.client_id,
                "oidc_client_secret": SecretStr(self.client_secret),
                **extra,
            }
        )

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/.well-known/openid-configuration", self._discovery),
                Route("/jwks", self._jwks),
                Route("/authorize", self._authorize),
                Route("/token", self._token, methods=["POST"]),
            ]
        )

    async def _discovery(self, _: Request) -> Response:
        return JSONResponse(
            {
                "issuer": self.url,
                "authorization_endpoint": f"{self.url}/authorize",
                "token_endpoint": f"{self.url}/token",
                "jwks_uri": f"{self.url}/jwks",
                "id_token_signing_alg_values_supported": ["RS256"],
                "token_endpoint_auth_methods_supported": ["client_secret_basic"],
                "code_challenge_methods_supported": ["S256"],
            }
        )

    async def _jwks(self, _: Request) -> Response:
        return JSONResponse({"keys": [self.key.as_dict(private=False)]})

    async def _authorize(self, request: Request) -> Response:
        """Signs in whoever `claims` names, as a person at the issuer's login page would."""
        q = request.query_params
        if q.get("client_id") != self.client_id or q.get("code_challenge_method") != "S256":
            return JSONResponse({"error": "invalid_request"}, status_code=400)
        code = secrets.token_urlsafe(16)
        self.codes[code] = {
            "nonce": q["nonce"],
            "challenge": q["code_challenge"],
            "redirect_uri": q["redirect_uri"],
        }
        target = f"{q['redirect_uri']}?{urlencode({'code': code, 'state': q['state']})}"
        return RedirectResponse(target, status_code=302)

    async def _token(self, request: Request) -> Response:
        self.token_requests += 1
        form = await request.form()
        expected = base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
        if request.headers.get("authorization") != f"Basic {expected}":
            return JSONResponse({"error": "invalid_client"}, status_code=401)
        grant = self.codes.pop(str(form.get("code")), None)
        verifier = str(form.get("code_verifier", ""))
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        if (
            grant is None
            or grant["redirect_uri"] != form.get("redirect_uri")
            or challenge.rstrip(b"=").decode() != grant["challenge"]
        ):
            return JSONResponse({"error": "invalid_grant"}, status_code=400)
        return JSONResponse(
            {
                "access_token": "at",
                "token_type": "Bearer",
                "id_token": self._id_token(grant["nonce"]),
            }
        )

    def _id_token(self, nonce: str) -> str:
        now = int(time.time())
        claims = {
            "iss": self.url,
            "aud": self.client_id,
            "iat": now,
            "exp": now + 300,
            "nonce": nonce,
            **self.claims,
        }
        key = self.key
        wrong = self.misbehave
        if wrong == "nonce":
            claims["nonce"] = "someone-elses"
        elif wrong == "audience":
            claims["aud"] = "another-client"
        elif wrong == "expired":
            claims["iat"], claims["exp"] = now - 7200, now - 3600
        elif wrong == "issuer":
            claims["iss"] = "https://evil.test"
        elif wrong == "foreign_key":
            key = RSAKey.generate_key(2048, parameters={"kid": "k1"})
        return jwt.encode({"alg": "RS256", "kid": "k1"}, claims, key)


@asynccontextmanager
async def oidc_issuer() -> AsyncIterator[Issuer]:
    issuer = Issuer()
    async with serve_app(issuer.app()) as url:
        issuer.url = url
        yield issuer


def live_script_events() -> set[str]:
    """The event names the pages' script (`stead/web/static/live.js`) refreshes on."""
    script = (Path(stead.web.__file__).parent / "static" / "live.js").read_text()
    listed = re.search(r"DEFAULT_EVENTS = \[(.*?)\];", script, flags=re.S)
    assert listed is not None, "live.js lists no DEFAULT_EVENTS"
    return set(re.findall(r'"([^"]+)"', listed.group(1)))
