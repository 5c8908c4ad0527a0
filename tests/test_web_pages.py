"""The reviewers' pages over HTTP, without a browser: each goes through the service layer, so
it shows and does exactly what the API would (the browser tests, tests/test_web_browser.py,
drive the same flows in Chromium)."""

from __future__ import annotations

import re
from html import unescape

import httpx
import pytest

from stead.store.db import Pool
from tests import web_support
from tests.conftest import Integrations, Tenant, TenantFactory
from tests.helpers import eventually, start_run, wait_json
from tests.web_support import (
    refund_ticket,
    refund_waiting,
    refunds_for,
    seed_customers,
    sign_in,
)

web = web_support.web  # the fixture: pytest finds it by this name


@pytest.fixture
async def desk(tenant: Tenant, pool: Pool) -> Tenant:
    await seed_customers(pool, tenant)
    return tenant


def text(html: str) -> str:
    return unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)))


@pytest.mark.usefixtures("worker")
async def test_finance_approves_the_refund_with_an_edit_on_the_pages(
    api: httpx.AsyncClient, web: httpx.AsyncClient, desk: Tenant, integrations: Integrations
) -> None:
    run_id, approval_id = await refund_waiting(api, desk)
    csrf = await sign_in(web, desk.keys["finance"])
    inbox = await web.get("/ui/inbox")
    assert f"/ui/approvals/{approval_id}" in inbox.text
    assert "cus_1" in inbox.text  # the customer the refund is for
    page = await web.get(f"/ui/approvals/{approval_id}")
    assert page.status_code == 200
    shown = text(page.text)
    assert "requires approval" in shown or "Required by" in shown
    assert 'name="edit.amount" value="40.00"' in page.text  # editable: an input
    assert 'name="edit.customer_id"' not in page.text  # not editable: shown only
    assert "lookup_customer" in shown  # the ledger so far

    # An edit the schema refuses is a clear 422 on the same page; nothing is decided.
    bad = await web.post(
        f"/ui/approvals/{approval_id}/decision",
        data={"csrf": csrf, "action": "approve_edits", "edit.amount": "-5"},
    )
    assert bad.status_code == 422
    assert "amount" in text(bad.text).lower()
    assert 'value="-5"' in bad.text  # what was typed is kept
    # Over what finance may refund themselves: the approver's own right is checked.
    over = await web.post(
        f"/ui/approvals/{approval_id}/decision",
        data={"csrf": csrf, "action": "approve_edits", "edit.amount": "5000"},
    )
    assert over.status_code == 403
    assert "approving needs the right" in text(over.text)
    nothing = await web.post(
        f"/ui/approvals/{approval_id}/decision", data={"csrf": csrf, "action": "approve_edits"}
    )
    assert nothing.status_code == 422
    assert "changed no field" in text(nothing.text)

    done = await web.post(
        f"/ui/approvals/{approval_id}/decision",
        data={"csrf": csrf, "action": "approve_edits", "edit.amount": "25.00", "comment": "half"},
    )
    assert done.status_code == 303, done.text
    assert done.headers["location"] == f"/ui/approvals/{approval_id}?decided=approved"
    again = await web.post(
        f"/ui/approvals/{approval_id}/decision", data={"csrf": csrf, "action": "approve"}
    )
    assert again.status_code == 409  # already decided: a message, not a second refund
    run = await wait_json(
        api,
        f"/v1/runs/{run_id}",
        desk.auth("requester"),
        lambda b: b["status"] != "running",
        within=30,
    )
    assert run["status"] == "completed"
    refunds = await refunds_for(integrations.payments, integrations.token, run_id)
    assert [r["amount"] for r in refunds] == ["25.00"]
    run_page = text((await web.get(f"/ui/runs/{run_id}")).text)
    assert "completed" in run_page
    assert "approve by finance" in run_page
    # Redacted for the viewer exactly as the API redacts: the comment is customer content,
    # masked for finance, shown to an admin (audit:read_sensitive).
    as_api = (await api.get(f"/v1/runs/{run_id}/ledger", headers=desk.auth("finance"))).text
    assert "half" not in as_api
    assert "half" not in run_page
    assert "[masked]" in run_page
    web.cookies.clear()
    await sign_in(web, desk.keys["admin"])
    assert "half" in text((await web.get(f"/ui/runs/{run_id}")).text)


@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize(
    ("user", "action", "reason"),
    [
        ("requester", "approve", "approvals:decide"),
        # An approver without finance may decide approvals, but not this refund's.
        ("approver", "reject", "deciding needs one of the roles finance"),
    ],
)
async def test_who_may_not_decide_is_offered_no_decision_and_a_forged_one_is_refused(
    api: httpx.AsyncClient,
    web: httpx.AsyncClient,
    desk: Tenant,
    user: str,
    action: str,
    reason: str,
) -> None:
    _, approval_id = await refund_waiting(api, desk)
    csrf = await sign_in(web, desk.keys[user])
    page = await web.get(f"/ui/approvals/{approval_id}")
    assert page.status_code == 200
    assert "/decision" not in page.text
    assert "You cannot decide this approval: it waits for finance" in text(page.text)
    forged = await web.post(
        f"/ui/approvals/{approval_id}/decision", data={"csrf": csrf, "action": action}
    )
    assert forged.status_code == 403
    assert reason in text(forged.text)
    still = await api.get(f"/v1/approvals/{approval_id}", headers=desk.auth("finance"))
    assert still.json()["status"] == "pending"


@pytest.mark.usefixtures("worker")
async def test_another_tenants_approval_and_run_are_404_pages(
    api: httpx.AsyncClient, web: httpx.AsyncClient, desk: Tenant, make_tenant: TenantFactory
) -> None:
    run_id, approval_id = await refund_waiting(api, desk)
    other = await make_tenant()
    csrf = await sign_in(web, other.keys["admin"])
    for path in (
        f"/ui/approvals/{approval_id}",
        f"/ui/runs/{run_id}",
        f"/ui/runs/{run_id}/timeline",
    ):
        page = await web.get(path)
        assert page.status_code == 404, path
        assert desk.id not in page.text
        assert "Traceback" not in page.text
    missing = await web.get("/ui/approvals/ap_doesnotexist")
    assert text(missing.text) == text((await web.get(f"/ui/approvals/{approval_id}")).text).replace(
        approval_id, "ap_doesnotexist"
    )
    forged = await web.post(
        f"/ui/approvals/{approval_id}/decision", data={"csrf": csrf, "action": "approve"}
    )
    assert forged.status_code == 404


@pytest.mark.usefixtures("worker")
async def test_admins_list_cancel_and_restart_runs_and_see_usage(
    api: httpx.AsyncClient, web: httpx.AsyncClient, desk: Tenant
) -> None:
    run_id, _ = await refund_waiting(api, desk)
    csrf = await sign_in(web, desk.keys["admin"])
    waiting = await web.get("/ui/runs?waiting=true&pipeline=support-agent")
    assert waiting.status_code == 200
    assert run_id in waiting.text
    assert run_id not in (await web.get("/ui/runs?status=completed")).text
    cancelled = await web.post(f"/ui/runs/{run_id}/cancel", data={"csrf": csrf})
    assert cancelled.status_code == 303
    await eventually(
        lambda: api.get(f"/v1/runs/{run_id}", headers=desk.auth("admin")),
        lambda r: r.json()["status"] == "cancelled",
        within=30,
    )
    twice = await web.post(f"/ui/runs/{run_id}/cancel", data={"csrf": csrf})
    assert twice.status_code == 409
    assert "already cancelled" in text(twice.text)
    restarted = await web.post(f"/ui/runs/{run_id}/retry", data={"csrf": csrf, "mode": "restart"})
    assert restarted.status_code == 303
    new_id = restarted.headers["location"].split("/ui/runs/")[1].split("?")[0]
    assert new_id != run_id
    usage = await web.get("/ui/usage?days=7")
    assert usage.status_code == 200
    assert "<svg" in usage.text
    assert "by model" in usage.text
    assert "Intact:" in usage.text  # the audit chain verifies
    for metric in ("tokens", "calls"):
        assert (await web.get(f"/ui/usage?metric={metric}")).status_code == 200
    assert (await web.get("/ui/usage?days=3")).status_code == 422


async def test_pages_a_role_may_not_see_are_refused_like_the_api(
    web: httpx.AsyncClient, tenant: Tenant
) -> None:
    await sign_in(web, tenant.keys["approver"])
    usage = await web.get("/ui/usage")
    assert usage.status_code == 403
    assert "usage:read" in text(usage.text)
    assert ">Usage<" not in (await web.get("/ui/inbox")).text  # and no link to it


@pytest.mark.usefixtures("worker")
async def test_a_refund_past_its_deadline_is_shown_expired_and_refuses_decisions(
    api: httpx.AsyncClient, web: httpx.AsyncClient, desk: Tenant
) -> None:
    # A refund left past its deadline (two seconds, for this tenant) expires.
    policy = {"roles": ["finance"], "timeout_seconds": 2, "on_deadline": "reject"}
    set_policy = await api.put(
        "/v1/admin/approval-policies/support-agent/tool_call",
        json=policy,
        headers=desk.auth("admin"),
    )
    assert set_policy.status_code == 200, set_policy.text
    run_id = await start_run(api, desk, refund_ticket())
    ledger = await wait_json(
        api,
        f"/v1/runs/{run_id}/ledger",
        desk.auth("admin"),
        lambda b: any(e["kind"] == "approval" for e in b["items"]),
        within=30,
    )
    late = next(e["approval_id"] for e in ledger["items"] if e["kind"] == "approval")
    await wait_json(
        api, f"/v1/approvals/{late}", desk.auth("finance"), lambda b: b["status"] == "expired"
    )
    csrf = await sign_in(web, desk.keys["finance"])
    shown = await web.get(f"/ui/approvals/{late}")
    assert "status-expired" in shown.text
    assert "/decision" not in shown.text  # nothing left to decide
    too_late = await web.post(
        f"/ui/approvals/{late}/decision", data={"csrf": csrf, "action": "approve"}
    )
    assert too_late.status_code == 409
    assert "approval is already expired" in text(too_late.text)
