"""The reviewers' web app in a real browser (Playwright driving Debian's Chromium): finance
signs in, finds the agent's refund in the inbox as it arrives, approves it with a smaller
amount and watches the run complete; a requester is offered no decision and a forged one is
refused; another tenant's approval is a 404 page; a form without its CSRF token is refused;
and every page passes an axe-core accessibility check with no serious violations.

The live regions are tested through their fallback: the event streams are made unreachable
(`page.route`), so the pages must refresh themselves by fetching their fragments; one test
answers the tenant's feed with a stand-in stream instead, and the inbox follows it.

With STEAD_SCREENSHOTS=1 the screenshots go to docs/screenshots/ (the README shows them).
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from axe_playwright_python.async_playwright import Axe
from playwright.async_api import Browser, BrowserContext, Page, Route, async_playwright, expect
from temporalio.client import Client

from stead.api.app import create_app
from stead.config import Settings
from stead.store.db import Pool
from tests.conftest import Integrations, Tenant, TenantFactory, make_services
from tests.helpers import start_run, wait_json
from tests.servers import serve_app
from tests.web_support import CHROMIUM, refund_ticket, refund_waiting, refunds_for, seed_customers

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="chromium is not installed (Debian package `chromium`; .ci/run adds it)",
    ),
]
SCREENSHOTS = Path(__file__).parent.parent / "docs" / "screenshots"
SERIOUS = {"serious", "critical"}


@pytest.fixture
async def site(test_settings: Settings, client: Client, pool: Pool) -> AsyncIterator[str]:
    """The API (and so the pages) on a loopback port, refreshing live regions every 0.5 s."""
    settings = test_settings.model_copy(update={"web_refresh_seconds": 0.5})
    async with serve_app(create_app(settings, make_services(settings, client, pool))) as url:
        yield url


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        yield launched
        await launched.close()


@pytest.fixture
async def context(browser: Browser, site: str) -> AsyncIterator[BrowserContext]:
    ctx = await browser.new_context(base_url=site, viewport={"width": 1280, "height": 860})
    # No event streams yet: the pages must fall back to refreshing their fragments.
    await ctx.route(re.compile(r".*/v1/(runs/[^/]+/)?events$"), _unreachable)
    yield ctx
    await ctx.close()


async def _unreachable(route: Route) -> None:
    await route.fulfill(status=404, body="no stream")


async def sign_in(context: BrowserContext, key: str, path: str = "/ui/") -> Page:
    page = await context.new_page()
    await page.goto(path)
    await expect(page).to_have_url(re.compile(r"/ui/sign-in"))
    await page.get_by_label("API key").fill(key)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("button", name="Sign out")).to_be_visible()
    return page


async def accessible(page: Page) -> None:
    """axe-core (shipped in the axe-playwright-python package) finds nothing serious."""
    results = await Axe().run(page)
    serious = [v for v in results.response["violations"] if v.get("impact") in SERIOUS]
    assert not serious, results.generate_report()


async def screenshot(page: Page, name: str, tmp_path: Path) -> None:
    keep = os.environ.get("STEAD_SCREENSHOTS") == "1"
    folder = SCREENSHOTS if keep else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


@pytest.fixture
async def desk(tenant: Tenant, pool: Pool) -> Tenant:
    await seed_customers(pool, tenant)
    return tenant


@pytest.mark.usefixtures("worker")
async def test_finance_approves_a_refund_with_an_edit_and_sees_the_run_complete(
    context: BrowserContext,
    api: httpx.AsyncClient,
    desk: Tenant,
    integrations: Integrations,
    tmp_path: Path,
) -> None:
    page = await sign_in(context, desk.keys["finance"])
    await expect(page.get_by_role("heading", name="Inbox")).to_be_visible()
    await expect(page.get_by_text("Nothing is waiting for your decision.")).to_be_visible()

    run_id = await start_run(api, desk, refund_ticket("40"))
    # It arrives without a reload: the fallback refreshes the inbox's rows.
    row = page.locator("#inbox a[href^='/ui/approvals/']")
    await expect(row).to_be_visible(timeout=30_000)
    assert await page.locator("#inbox").get_attribute("data-live-mode") == "poll"
    await expect(page.locator("#inbox")).to_contain_text("cus_1")
    await expect(page.locator("#inbox")).to_contain_text("40.00")
    await accessible(page)
    await screenshot(page, "inbox", tmp_path)

    await row.click()
    await expect(page.get_by_text("the permission rule")).to_be_visible()
    await expect(page.locator("#timeline")).to_contain_text("lookup_customer")
    amount = page.get_by_label("Amount (editable)")
    await expect(amount).to_have_value("40.00")
    await amount.fill("25.00")
    await page.get_by_label("Comment").fill("Half: the second charge was partly reversed.")
    await accessible(page)
    await screenshot(page, "approval", tmp_path)
    await page.get_by_role("button", name="Approve with my edits").click()
    await expect(page.get_by_role("status")).to_contain_text("the approval is approved")

    await page.get_by_role("link", name=re.compile(r"support-agent run")).click()
    await expect(page).to_have_url(re.compile(rf"/ui/runs/{run_id}$"))
    # Live while it runs: the status turns to completed without a reload.
    await expect(page.locator("#timeline .status-line .badge").first).to_have_text(
        "completed", timeout=30_000
    )
    timeline = page.locator("#timeline")
    await expect(timeline).to_contain_text("issue_refund")
    await expect(timeline).to_contain_text("25.00")
    await expect(timeline).to_contain_text("approve by finance")
    await expect(page.get_by_role("link", name="Open in the Temporal Web UI")).to_have_attribute(
        "href", re.compile(rf"/namespaces/default/workflows/{desk.id}%3A{run_id}$")
    )
    await accessible(page)
    await screenshot(page, "run", tmp_path)
    refunds = await refunds_for(integrations.payments, integrations.token, run_id)
    assert [r["amount"] for r in refunds] == ["25.00"]


@pytest.mark.usefixtures("worker")
async def test_the_inbox_refreshes_on_an_event_of_the_tenants_stream(
    context: BrowserContext, api: httpx.AsyncClient, desk: Tenant
) -> None:
    """Where the tenant's feed answers, the inbox follows it instead of polling. The feed is a
    stand-in here (routed in the browser) until `GET /v1/events` exists: it holds the request
    until the refund waits, then answers one event (and a retry far beyond the test)."""
    ready = asyncio.Event()
    cookies: list[str] = []

    async def feed(route: Route) -> None:
        cookies.append((await route.request.all_headers()).get("cookie", ""))
        await ready.wait()
        body = "retry: 600000\nevent: approval.requested\ndata: {}\n\n"
        await route.fulfill(status=200, content_type="text/event-stream", body=body)

    page = await sign_in(context, desk.keys["finance"])
    await page.route(re.compile(r".*/v1/events$"), feed)
    await page.reload()
    await expect(page.get_by_text("Nothing is waiting for your decision.")).to_be_visible()
    fetched: list[str] = []
    page.on("request", lambda r: fetched.append(r.url) if "/ui/inbox/rows" in r.url else None)
    _, approval_id = await refund_waiting(api, desk)
    # While the run got there (seconds: refresh periods of 0.5 s), nothing polled.
    assert not fetched
    assert await page.locator("#inbox").get_attribute("data-live-mode") is None
    ready.set()
    await expect(page.locator(f"#inbox a[href='/ui/approvals/{approval_id}']")).to_be_visible()
    assert await page.locator("#inbox").get_attribute("data-live-mode") == "stream"
    assert cookies
    assert "stead_session" in cookies[-1]  # the session cookie authenticates the stream's GET


@pytest.mark.usefixtures("worker")
async def test_the_pages_follow_the_real_event_streams(
    browser: Browser, site: str, api: httpx.AsyncClient, desk: Tenant
) -> None:
    """With Stead's own streams answering (`GET /v1/events`, `GET /v1/runs/{id}/events`), the
    inbox and the run page update from their events, in stream mode throughout: the names the
    script listens for must be the names the streams send."""
    live = await browser.new_context(base_url=site, viewport={"width": 1280, "height": 860})
    try:
        page = await sign_in(live, desk.keys["finance"])
        inbox = page.locator("#inbox")
        await expect(inbox).to_have_attribute("data-live-mode", "stream")
        run_id = await start_run(api, desk, refund_ticket("30"))
        row = page.locator("#inbox a[href^='/ui/approvals/']")
        await expect(row).to_be_visible(timeout=30_000)
        assert await inbox.get_attribute("data-live-mode") == "stream"

        # The run's page, open while the run waits, follows its stream to the end.
        watching = await live.new_page()
        await watching.goto(f"/ui/runs/{run_id}")
        timeline = watching.locator("#timeline")
        await expect(timeline).to_have_attribute("data-live-mode", "stream")
        await row.click()
        await page.get_by_role("button", name="Approve as proposed").click()
        await expect(page.get_by_role("status")).to_contain_text("the approval is approved")
        await expect(timeline.locator(".status-line .badge").first).to_have_text(
            "completed", timeout=30_000
        )
        assert await timeline.get_attribute("data-live-mode") == "stream"
    finally:
        await live.close()


@pytest.mark.usefixtures("worker")
async def test_a_requester_sees_no_approve_button_and_forged_posts_are_refused(
    context: BrowserContext, api: httpx.AsyncClient, desk: Tenant
) -> None:
    _, approval_id = await refund_waiting(api, desk)
    path = f"/ui/approvals/{approval_id}"
    page = await sign_in(context, desk.keys["requester"], path)
    await expect(page).to_have_url(re.compile(path + "$"))
    await expect(page.get_by_text("You cannot decide this approval")).to_be_visible()
    assert await page.get_by_role("button", name=re.compile("Approve")).count() == 0
    await accessible(page)

    csrf = await page.locator('meta[name="csrf-token"]').get_attribute("content")
    forged = await page.request.post(
        f"{path}/decision", form={"csrf": csrf or "", "action": "approve"}
    )
    assert forged.status == 403
    assert "approvals:decide" in await forged.text()
    no_token = await page.request.post(f"{path}/decision", form={"action": "approve"})
    assert no_token.status == 403
    assert "security token" in await no_token.text()
    still = await api.get(f"/v1/approvals/{approval_id}", headers=desk.auth("finance"))
    assert still.json()["status"] == "pending"


@pytest.mark.usefixtures("worker")
async def test_another_tenants_approval_is_a_404_page(
    context: BrowserContext, api: httpx.AsyncClient, desk: Tenant, make_tenant: TenantFactory
) -> None:
    _, approval_id = await refund_waiting(api, desk)
    other = await make_tenant()
    page = await sign_in(context, other.keys["finance"])
    answer = await page.goto(f"/ui/approvals/{approval_id}")
    assert answer is not None
    assert answer.status == 404
    await expect(page.get_by_role("heading", name="Not found")).to_be_visible()
    await expect(page.locator("main")).not_to_contain_text("Traceback")
    await accessible(page)
    # Even with this person's valid token, deciding it is the same 404.
    csrf = await page.locator('meta[name="csrf-token"]').get_attribute("content")
    forged = await page.request.post(
        f"/ui/approvals/{approval_id}/decision",
        form={"csrf": csrf or "", "action": "approve"},
    )
    assert forged.status == 404


@pytest.mark.usefixtures("worker")
async def test_the_admin_pages_are_accessible(
    context: BrowserContext, api: httpx.AsyncClient, desk: Tenant, tmp_path: Path
) -> None:
    run_id = await start_run(
        api, desk, {"pipeline": "summarize", "input": {"text": "Revenue grew.", "review": False}}
    )
    await wait_json(
        api, f"/v1/runs/{run_id}", desk.auth("admin"), lambda b: b["status"] == "completed"
    )
    page = await sign_in(context, desk.keys["admin"])
    await page.get_by_role("link", name="Runs").click()
    await expect(page.locator("table.list")).to_contain_text(run_id)
    await accessible(page)
    await page.get_by_role("link", name="Usage").click()
    await expect(page.locator("svg.bars").first).to_be_visible()
    await expect(page.get_by_text("Intact:")).to_be_visible()
    await accessible(page)
    await screenshot(page, "usage", tmp_path)
    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    await accessible(page)
