"""OIDC sign-in against a real issuer on loopback (tests/web_support.Issuer): the code flow
with PKCE, state and nonce, the ID token validated with joserfc, a claim mapped to a Stead
principal; every way a sign-in can be wrong is refused with a reason."""

from __future__ import annotations

from collections.abc import AsyncIterator
from html import unescape
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from temporalio.client import Client

from stead.config import ConfigError, Settings, load_settings
from stead.service.sessions import COOKIE
from stead.store.db import Pool
from tests.conftest import PAYLOAD_KEYS, Tenant
from tests.web_support import Issuer, oidc_issuer, session_csrf, web_client


@pytest.fixture
async def issuer(tenant: Tenant) -> AsyncIterator[Issuer]:
    async with oidc_issuer() as found:
        found.claims = {"sub": "approver", "stead_tenant": tenant.id}
        yield found


@pytest.fixture
async def web(
    issuer: Issuer, test_settings: Settings, client: Client, pool: Pool
) -> AsyncIterator[httpx.AsyncClient]:
    settings = issuer.settings(
        test_settings, oidc_redirect_url="http://stead.test/ui/oidc/callback"
    )
    async with web_client(settings, client, pool) as http:
        yield http


async def through_the_issuer(
    web: httpx.AsyncClient, next_path: str = "/ui/inbox"
) -> httpx.Response:
    """Start at Stead, follow the issuer's redirect back, and return Stead's callback answer."""
    start = await web.get(f"/ui/oidc/start?next={next_path}")
    assert start.status_code == 303, start.text
    to_issuer = start.headers["location"]
    asked = parse_qs(urlsplit(to_issuer).query)
    assert asked["code_challenge_method"] == ["S256"]
    assert asked["response_type"] == ["code"]
    assert {"state", "nonce", "code_challenge"} <= set(asked)
    async with httpx.AsyncClient() as browser_at_issuer:
        back = await browser_at_issuer.get(to_issuer)
    assert back.status_code == 302
    callback = urlsplit(back.headers["location"])
    return await web.get(f"{callback.path}?{callback.query}")


async def test_oidc_signs_in_the_principal_the_claim_names(
    web: httpx.AsyncClient, issuer: Issuer, tenant: Tenant
) -> None:
    page = await web.get("/ui/sign-in")
    assert "/ui/oidc/start" in page.text
    done = await through_the_issuer(web, "/ui/runs")
    assert done.status_code == 303, done.text
    assert done.headers["location"] == "/ui/runs"
    assert issuer.token_requests == 1
    inbox = await web.get("/ui/inbox")
    assert inbox.status_code == 200
    session_csrf(inbox.text)
    assert f'approver <span class="muted">({tenant.id}' in inbox.text
    # The session reads the API like a key-based one.
    assert (await web.get("/v1/approvals")).status_code == 200


@pytest.mark.parametrize(
    ("wrong", "reason"),
    [
        ("nonce", "invalid_claim"),
        ("audience", "invalid_claim"),
        ("issuer", "invalid_claim"),
        ("expired", "expired_token"),
        ("foreign_key", "bad_signature"),
    ],
)
async def test_an_id_token_that_does_not_validate_signs_nobody_in(
    web: httpx.AsyncClient, issuer: Issuer, wrong: str, reason: str
) -> None:
    issuer.misbehave = wrong
    refused = await through_the_issuer(web)
    assert refused.status_code == 401, refused.text
    assert "ID token is not valid" in refused.text
    assert reason in refused.text
    assert COOKIE not in refused.headers.get("set-cookie", "")
    assert (await web.get("/ui/inbox")).status_code == 303


async def test_a_callback_this_browser_did_not_start_is_refused(
    web: httpx.AsyncClient, issuer: Issuer
) -> None:
    start = await web.get("/ui/oidc/start")
    async with httpx.AsyncClient() as at_issuer:
        back = await at_issuer.get(start.headers["location"])
    callback = urlsplit(back.headers["location"])
    # Another browser (no binding cookie) lands the victim's code: refused, and spent.
    web.cookies.clear()
    stolen = await web.get(f"{callback.path}?{callback.query}")
    assert stolen.status_code == 401
    assert "not started in this browser" in stolen.text
    assert issuer.token_requests == 0  # the code was never even exchanged
    made_up = await web.get("/ui/oidc/callback?state=nope&code=nope")
    assert made_up.status_code == 401
    denied = await web.get("/ui/oidc/callback?error=access_denied&state=x")
    assert denied.status_code == 401
    assert "access_denied" in denied.text


async def test_a_state_is_used_once(web: httpx.AsyncClient, issuer: Issuer) -> None:
    start = await web.get("/ui/oidc/start")
    async with httpx.AsyncClient() as at_issuer:
        back = await at_issuer.get(start.headers["location"])
    callback = urlsplit(back.headers["location"])
    first = await web.get(f"{callback.path}?{callback.query}")
    assert first.status_code == 303
    replay = await web.get(f"{callback.path}?{callback.query}")
    assert replay.status_code == 401


async def test_an_identity_without_a_stead_user_is_refused(
    web: httpx.AsyncClient, issuer: Issuer, tenant: Tenant
) -> None:
    issuer.claims = {"sub": "stranger", "stead_tenant": tenant.id}
    refused = await through_the_issuer(web)
    assert refused.status_code == 403
    assert "no enabled Stead user 'stranger'" in unescape(refused.text)
    issuer.claims = {"sub": "approver"}
    no_tenant = await through_the_issuer(web)
    assert no_tenant.status_code == 403
    assert "names no tenant" in no_tenant.text


async def test_a_fixed_tenant_and_another_claim_map_the_principal(
    issuer: Issuer, test_settings: Settings, client: Client, pool: Pool, tenant: Tenant
) -> None:
    issuer.claims = {"sub": "opaque-123", "preferred_username": "finance"}
    settings = issuer.settings(
        test_settings,
        oidc_tenant=tenant.id,
        oidc_principal_claim="preferred_username",
        oidc_redirect_url="http://stead.test/ui/oidc/callback",
    )
    async with web_client(settings, client, pool) as web:
        done = await through_the_issuer(web)
        assert done.status_code == 303, done.text
        assert "finance" in (await web.get("/ui/inbox")).text


async def test_without_an_issuer_there_is_no_oidc_sign_in(
    test_settings: Settings, client: Client, pool: Pool
) -> None:
    async with web_client(test_settings, client, pool) as web:
        assert "/ui/oidc/start" not in (await web.get("/ui/sign-in")).text
        start = await web.get("/ui/oidc/start")
        assert start.status_code == 404
        assert "not configured" in start.text


def test_oidc_settings_are_checked_at_start() -> None:
    with pytest.raises(ConfigError, match="STEAD_OIDC_ISSUER"):
        load_settings(oidc_issuer="http://idp.example.com")  # in clear, not loopback
    assert load_settings(oidc_issuer="http://127.0.0.1:9000").oidc_issuer
    incomplete = load_settings(oidc_issuer="https://idp.example.com", payload_keys=PAYLOAD_KEYS)
    with pytest.raises(ConfigError, match="STEAD_OIDC_CLIENT_ID"):
        incomplete.check_serving("API")
