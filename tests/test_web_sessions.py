"""The web app's sessions and forms over HTTP, without a browser: signing in exchanges a key
for a session in PostgreSQL (the key never goes back to the browser), the cookie's flags,
sign-out and revocation, CSRF on every form, the cookie on the JSON API (reads only, unless the
CSRF header comes too), and the security headers of every page."""

from __future__ import annotations

import hashlib
import re

import asyncpg
import httpx
import pytest
from temporalio.client import Client

from stead.config import Settings
from stead.service.sessions import COOKIE
from stead.store import principals
from stead.store.db import Pool, create_pool
from tests import web_support
from tests.conftest import Tenant
from tests.web_support import (
    csrf_field,
    sign_in,
    web_client,
)

web = web_support.web  # the fixture: pytest finds it by this name


def cookie(token: str) -> dict[str, str]:
    """Headers sending this session token alone (whatever the client's jar holds)."""
    return {"Cookie": f"{COOKIE}={token}"}


def cookie_header(response: httpx.Response, name: str = COOKIE) -> str:
    found = [v for v in response.headers.get_list("set-cookie") if v.startswith(f"{name}=")]
    assert found, f"no {name} cookie set"
    return found[0]


async def test_signing_in_exchanges_the_key_for_a_session(
    web: httpx.AsyncClient, tenant: Tenant, pool: Pool
) -> None:
    form = await web.get("/ui/sign-in")
    key = tenant.keys["approver"]
    done = await web.post("/ui/sign-in", data={"key": key, "csrf": csrf_field(form.text)})
    assert done.status_code == 303
    assert done.headers["location"] == "/ui/inbox"
    cookie = cookie_header(done)
    flags = {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "max-age", "path"} <= flags
    assert "samesite=lax" in cookie.lower()
    assert "secure" not in flags  # plain HTTP, no setting: a Secure cookie would never return
    token = cookie.split(";")[0].split("=", 1)[1]
    assert key.split("_")[2] not in cookie
    # Only the token's hash is stored; the key itself nowhere.
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT * FROM web_sessions WHERE token_hash = $1",
            hashlib.sha256(token.encode()).digest(),
        )
    assert row is not None
    assert (row["tenant_id"], row["principal_id"], row["method"]) == (
        tenant.id,
        "approver",
        "api_key",
    )
    stored = str(dict(row))
    assert key.split("_")[2] not in stored
    assert token not in stored
    inbox = await web.get("/ui/inbox")
    assert inbox.status_code == 200
    assert "approver" in inbox.text
    assert key.split("_")[2] not in inbox.text


async def test_cookies_are_secure_over_tls_or_when_the_setting_says(
    test_settings: Settings, client: Client, pool: Pool, tenant: Tenant
) -> None:
    async with web_client(test_settings, client, pool, base_url="https://stead.test") as tls:
        form = await tls.get("/ui/sign-in")
        assert "secure" in cookie_header(form, "stead_presession").lower()
        done = await tls.post(
            "/ui/sign-in", data={"key": tenant.keys["approver"], "csrf": csrf_field(form.text)}
        )
        assert "; secure" in cookie_header(done).lower()
    # TLS ends at a proxy: the browser is on HTTPS and sends the cookies back; the app sees
    # plain HTTP and marks them Secure because the setting says so.
    forced = test_settings.model_copy(update={"web_secure_cookies": True})
    async with web_client(forced, client, pool) as proxied:
        form = await proxied.get("/ui/sign-in")
        presession = cookie_header(form, "stead_presession")
        assert "; secure" in presession.lower()
        done = await proxied.post(
            "/ui/sign-in",
            data={"key": tenant.keys["approver"], "csrf": csrf_field(form.text)},
            headers={"Cookie": presession.split(";")[0]},
        )
        assert "; secure" in cookie_header(done).lower()


async def test_a_bad_key_is_refused_on_the_sign_in_page(
    web: httpx.AsyncClient, tenant: Tenant
) -> None:
    form = await web.get("/ui/sign-in")
    bad = await web.post("/ui/sign-in", data={"key": "stead_nope", "csrf": csrf_field(form.text)})
    assert bad.status_code == 401
    assert "invalid or revoked API key" in bad.text
    assert COOKIE not in bad.headers.get("set-cookie", "")
    assert (await web.get("/ui/inbox")).status_code == 303


async def test_an_agents_key_opens_no_browser_session(
    web: httpx.AsyncClient, make_tenant: object, database_url: str
) -> None:
    tenant = await make_tenant({"bot": ["requester"]})  # type: ignore[operator]
    conn = await asyncpg.connect(database_url)
    try:
        await principals.upsert_principal(conn, tenant.id, "bot", ["requester"], kind="service")
    finally:
        await conn.close()
    form = await web.get("/ui/sign-in")
    refused = await web.post(
        "/ui/sign-in", data={"key": tenant.keys["bot"], "csrf": csrf_field(form.text)}
    )
    assert refused.status_code == 403
    assert "cannot open a browser session" in refused.text


async def test_pages_ask_to_sign_in_and_come_back(web: httpx.AsyncClient, tenant: Tenant) -> None:
    away = await web.get("/ui/runs?status=failed")
    assert away.status_code == 303
    assert away.headers["location"] == "/ui/sign-in?next=/ui/runs%3Fstatus%3Dfailed"
    form = await web.get(away.headers["location"])
    assert 'name="next" value="/ui/runs?status=failed"' in form.text
    done = await web.post(
        "/ui/sign-in",
        data={
            "key": tenant.keys["admin"],
            "csrf": csrf_field(form.text),
            "next": "/ui/runs?status=failed",
        },
    )
    assert done.headers["location"] == "/ui/runs?status=failed"
    # Never to another site.
    elsewhere = await web.post(
        "/ui/sign-in",
        data={"key": tenant.keys["admin"], "csrf": csrf_field(form.text), "next": "//evil.test/x"},
    )
    assert elsewhere.headers["location"] == "/ui/inbox"


async def test_sign_out_ends_the_session(web: httpx.AsyncClient, tenant: Tenant) -> None:
    csrf = await sign_in(web, tenant.keys["approver"])
    token = web.cookies[COOKIE]
    refused = await web.post("/ui/sign-out", data={})
    assert refused.status_code == 403  # no CSRF token: not even sign-out
    out = await web.post("/ui/sign-out", data={"csrf": csrf})
    assert out.status_code == 303
    assert (await web.get("/ui/inbox")).status_code == 303
    # The old token is dead server-side, not merely forgotten by this browser.
    replay = await web.get("/ui/inbox", headers=cookie(token))
    assert replay.status_code == 303
    assert (await web.get("/v1/approvals", headers=cookie(token))).status_code == 401


async def test_a_revoked_key_or_disabled_user_ends_their_sessions(
    web: httpx.AsyncClient, make_tenant: object, database_url: str
) -> None:
    tenant = await make_tenant({"a": ["approver"], "b": ["approver"]})  # type: ignore[operator]
    await sign_in(web, tenant.keys["a"])
    a_token = web.cookies[COOKIE]
    web.cookies.clear()
    await sign_in(web, tenant.keys["b"])
    b_token = web.cookies[COOKIE]
    web.cookies.clear()
    for token in (a_token, b_token):
        assert (await web.get("/ui/inbox", headers=cookie(token))).status_code == 200
    conn = await asyncpg.connect(database_url)
    try:
        await principals.revoke_key(conn, tenant.id, principals.key_id(tenant.keys["a"]) or "")
        await principals.disable_principal(conn, tenant.id, "b")
    finally:
        await conn.close()
    for token in (a_token, b_token):
        assert (await web.get("/ui/inbox", headers=cookie(token))).status_code == 303
        assert (await web.get("/v1/approvals", headers=cookie(token))).status_code == 401


async def test_an_expired_session_is_refused(
    web: httpx.AsyncClient, tenant: Tenant, database_url: str
) -> None:
    await sign_in(web, tenant.keys["approver"])
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE web_sessions SET expires_at = now() - interval '1 second'"
            " WHERE token_hash = $1",
            hashlib.sha256(web.cookies[COOKIE].encode()).digest(),
        )
    finally:
        await conn.close()
    assert (await web.get("/ui/inbox")).status_code == 303


async def test_a_session_opened_by_one_api_process_works_in_another(
    test_settings: Settings, client: Client, pool: Pool, tenant: Tenant
) -> None:
    async with web_client(test_settings, client, pool) as one:
        await sign_in(one, tenant.keys["approver"])
        token = one.cookies[COOKIE]
    async with web_client(test_settings, client, pool) as other:
        page = await other.get("/ui/inbox", headers=cookie(token))
        assert page.status_code == 200
        assert "approver" in page.text


async def test_forms_without_their_token_are_refused(
    web: httpx.AsyncClient, tenant: Tenant
) -> None:
    # The sign-in form: no token, a token without its cookie, a token for another cookie.
    form = await web.get("/ui/sign-in")
    token = csrf_field(form.text)
    key = tenant.keys["approver"]
    assert (await web.post("/ui/sign-in", data={"key": key})).status_code == 403
    assert (
        await web.post(
            "/ui/sign-in",
            data={"key": key, "csrf": token},
            headers={"Cookie": "stead_presession=" + "x" * 40},
        )
    ).status_code == 403
    # A session's forms: none, someone else's, a made-up one.
    csrf = await sign_in(web, key)
    for sent in ({}, {"csrf": "0" * 43}, {"csrf": token}):
        refused = await web.post(
            "/ui/approvals/ap_missing/decision", data={"action": "approve", **sent}
        )
        assert refused.status_code == 403, sent
        assert "security token" in refused.text
    # With the token, the same request reaches the service layer (and its 404).
    missing = await web.post(
        "/ui/approvals/ap_missing/decision", data={"action": "approve", "csrf": csrf}
    )
    assert missing.status_code == 404


async def test_the_cookie_reads_the_json_api_but_writes_only_with_the_csrf_header(
    web: httpx.AsyncClient, tenant: Tenant
) -> None:
    csrf = await sign_in(web, tenant.keys["requester"])
    assert (await web.get("/v1/approvals")).status_code == 200
    body = {"pipeline": "summarize", "input": {"text": "x"}}
    refused = await web.post("/v1/runs", json=body)
    assert refused.status_code == 403
    assert "X-CSRF-Token".lower() in refused.json()["detail"].lower()
    wrong = await web.post("/v1/runs", json=body, headers={"X-CSRF-Token": "nope"})
    assert wrong.status_code == 403
    started = await web.post("/v1/runs", json=body, headers={"X-CSRF-Token": csrf})
    assert started.status_code == 201, started.text
    # A Bearer key still decides alone, and wins over a cookie.
    as_admin = await web.get("/v1/usage", headers=tenant.auth("admin"))
    assert as_admin.status_code == 200


def no_inline_script(html: str) -> None:
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "an inline <script>"
    assert not re.search(r"\son[a-z]+\s*=", html), "an inline event handler"
    assert not re.search(r"\sstyle\s*=", html), "an inline style"


@pytest.mark.parametrize("path", ["/ui/sign-in", "/ui/inbox", "/ui/runs", "/ui/usage", "/ui/nope"])
async def test_every_page_has_the_security_headers_and_no_inline_script(
    web: httpx.AsyncClient, tenant: Tenant, path: str
) -> None:
    await sign_in(web, tenant.keys["admin"])
    page = await web.get(path)
    assert page.status_code == (404 if path == "/ui/nope" else 200), page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["cache-control"] == "no-store"
    no_inline_script(page.text)


async def test_an_unexpected_failure_is_a_plain_page_without_a_trace(
    test_settings: Settings, client: Client, app_database_url: str, tenant: Tenant
) -> None:
    closed = await create_pool(app_database_url, app_role="stead_app", max_size=1)
    await closed.close()  # every query now fails with an error no handler expects
    async with web_client(test_settings, client, closed) as broken:
        form = await broken.get("/ui/sign-in")
        assert form.status_code == 200
        failed = await broken.post(
            "/ui/sign-in", data={"key": tenant.keys["approver"], "csrf": csrf_field(form.text)}
        )
    assert failed.status_code == 500
    assert "the error was logged" in failed.text
    assert "Traceback" not in failed.text
    assert "pool" not in failed.text.lower()  # nothing of the cause reaches the page
    assert failed.headers["content-security-policy"]
