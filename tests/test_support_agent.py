"""The support agent proves the permission model: grants, constraints, approvals, re-checks,
exactly-once side effects. The simulator plays the model; hints in the ticket script it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.client import Client

from activities import support_desk
from stead.config import Settings
from stead.service.runs import workflow_id
from stead.store import policy as policy_store
from stead.store import principals
from stead.store.db import Pool
from tests.conftest import Integrations, Tenant, spawn_worker
from tests.helpers import eventually, record_history, wait_finished, wait_json
from tests.helpers import start_run as start

CUSTOMER_EMAIL = "jane@initech.test"


@pytest.fixture
async def customers(tenant: Tenant, pool: Pool) -> Tenant:
    async with pool.acquire() as conn:
        await support_desk.upsert_customer(
            conn, tenant.id, "cus_1", "Jane Doe", CUSTOMER_EMAIL, plan="pro"
        )
        await support_desk.upsert_customer(
            conn, tenant.id, "cus_vip", "Vera Important", "vera@bigco.test", restricted=True
        )
    return tenant


def ticket(customer: str = "cus_1", **hints: str) -> dict[str, Any]:
    lines = {
        "amount": "40",
        "reason": "charged twice",
        "subject": "About your refund",
        "body": "We refunded the duplicate charge.",
        "send_email.to": CUSTOMER_EMAIL,
        **hints,
    }
    body = "I was charged twice for my order.\n" + "\n".join(f"{k}: {v}" for k, v in lines.items())
    return {
        "pipeline": "support-agent",
        "input": {
            "ticket_id": "T-1",
            "customer_id": customer,
            "subject": "Double charge",
            "body": body,
        },
    }


async def finished(
    api: httpx.AsyncClient, tenant: Tenant, run_id: str, user: str = "requester"
) -> dict[str, Any]:
    return await wait_finished(api, tenant, run_id, user, within=30)


async def pending_refund(api: httpx.AsyncClient, tenant: Tenant, run_id: str) -> dict[str, Any]:
    inbox = await wait_json(
        api,
        "/v1/approvals",
        tenant.auth("finance"),
        lambda b: any(a["run_id"] == run_id and a["kind"] == "tool_call" for a in b["items"]),
    )
    return next(a for a in inbox["items"] if a["run_id"] == run_id)


ALL_TOOLS = ("lookup_customer", "draft_reply", "issue_refund", "send_email")


async def approve_and_finish(
    api: httpx.AsyncClient, tenant: Tenant, approval: dict[str, Any], run_id: str
) -> dict[str, Any]:
    """Finance approves the refund; the run, once completed."""
    ok = await api.post(
        f"/v1/approvals/{approval['approval_id']}/decision",
        json={"decision": "approve", "comment": "duplicate confirmed"},
        headers=tenant.auth("finance"),
    )
    assert ok.status_code == 200, ok.text
    run = await finished(api, tenant, run_id)
    assert run["status"] == "completed"
    return run


def in_inbox(approval: dict[str, Any]) -> Callable[[dict[str, Any]], bool]:
    return lambda inbox: any(a["approval_id"] == approval["approval_id"] for a in inbox["items"])


def actions(run: dict[str, Any]) -> dict[str, str]:
    return {a["tool"]: a["status"] for a in run["result"]["actions"]}


async def decisions(pool: Pool, tenant: Tenant, run_id: str) -> list[tuple[str, str, str]]:
    """(tool, effect, rule) of every tool.decided audit entry, in order."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT data FROM audit_log WHERE tenant_id = $1 AND run_id = $2"
            " AND action = 'tool.decided' ORDER BY seq",
            tenant.id,
            run_id,
        )
    parsed = [json.loads(r["data"]) for r in rows]
    return [(d["tool"], d["effect"], d["rule"]) for d in parsed]


async def refunds_for(integrations: Integrations, run_id: str) -> list[dict[str, Any]]:
    """Refunds the payment provider performed for this run (matched by the metadata the tool
    gateway attaches), whether or not the caller ever received the answer."""
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {integrations.token}"}) as http:
        refunds = (await http.get(f"{integrations.payments}/v1/refunds")).json()
    return [r for r in refunds if r.get("metadata", {}).get("run_id") == run_id]


@pytest.mark.usefixtures("worker", "customers")
async def test_refund_runs_only_after_finance_approves(
    api: httpx.AsyncClient, tenant: Tenant, pool: Pool, integrations: Integrations, client: Client
) -> None:
    run_id = await start(api, tenant, ticket())
    approval = await pending_refund(api, tenant, run_id)
    assert approval["proposal"]["amount"] == "40.00"
    assert approval["eligible_roles"] == ["finance"]
    assert await refunds_for(integrations, run_id) == []  # nothing paid while waiting

    # An approver without the refund right neither sees it nor may decide it.
    approver_inbox = (await api.get("/v1/approvals", headers=tenant.auth("approver"))).json()
    assert all(a["approval_id"] != approval["approval_id"] for a in approver_inbox["items"])
    refused = await api.post(
        f"/v1/approvals/{approval['approval_id']}/decision",
        json={"decision": "approve"},
        headers=tenant.auth("approver"),
    )
    assert refused.status_code == 403

    run = await approve_and_finish(api, tenant, approval, run_id)
    assert actions(run) == dict.fromkeys(ALL_TOOLS, "executed")
    refunds = await refunds_for(integrations, run_id)
    assert len(refunds) == 1
    assert refunds[0]["amount"] == "40.00"
    effects = await decisions(pool, tenant, run_id)
    assert [(t, e) for t, e, _ in effects] == [
        ("lookup_customer", "allowed"),
        ("draft_reply", "allowed"),
        ("issue_refund", "approval_required"),
        ("issue_refund", "allowed"),
        ("send_email", "allowed"),
    ]
    await record_history(
        client.get_workflow_handle(workflow_id(tenant.id, run_id)), "supportagent_refund_approved"
    )


@pytest.mark.usefixtures("worker", "customers")
async def test_refund_beyond_the_constraint_is_denied_not_proposed(
    api: httpx.AsyncClient, tenant: Tenant, pool: Pool, integrations: Integrations
) -> None:
    run_id = await start(api, tenant, ticket(amount="500"))
    run = await finished(api, tenant, run_id)
    assert run["status"] == "completed"
    assert actions(run)["issue_refund"] == "denied"
    assert run["approvals"] == []
    assert await refunds_for(integrations, run_id) == []
    refund = [d for d in await decisions(pool, tenant, run_id) if d[0] == "issue_refund"]
    assert refund == [("issue_refund", "denied", "agent:support-agent/execute:refund#3")]


@pytest.mark.usefixtures("worker", "customers")
async def test_email_outside_the_customers_domain_is_denied(
    api: httpx.AsyncClient, tenant: Tenant, pool: Pool
) -> None:
    run_id = await start(
        api, tenant, ticket(**{"send_email.to": "mallory@evil.test", "amount": "5"})
    )
    approval = await pending_refund(api, tenant, run_id)
    await api.post(
        f"/v1/approvals/{approval['approval_id']}/decision",
        json={"decision": "reject"},
        headers=tenant.auth("finance"),
    )
    run = await finished(api, tenant, run_id)
    assert actions(run)["send_email"] == "denied"
    assert actions(run)["issue_refund"] == "denied"  # rejected by the reviewer


@pytest.mark.usefixtures("worker", "customers")
async def test_agent_reads_only_what_its_user_may_read(
    api: httpx.AsyncClient, tenant: Tenant
) -> None:
    skip = {"sim_skip_tools": "draft_reply,issue_refund,send_email"}
    as_requester = await start(api, tenant, ticket("cus_vip", **skip))
    as_admin = await start(api, tenant, ticket("cus_vip", **skip), user="admin")
    requester_run = await finished(api, tenant, as_requester)
    admin_run = await finished(api, tenant, as_admin)
    assert actions(requester_run) == {"lookup_customer": "denied"}
    assert actions(admin_run) == {"lookup_customer": "executed"}


@pytest.mark.usefixtures("worker", "customers")
async def test_revoked_user_does_not_get_the_approved_action(
    api: httpx.AsyncClient, tenant: Tenant, pool: Pool, integrations: Integrations
) -> None:
    run_id = await start(api, tenant, ticket())
    approval = await pending_refund(api, tenant, run_id)
    async with pool.acquire() as conn:
        assert await principals.set_roles(conn, tenant.id, "requester", [])
    ok = await api.post(
        f"/v1/approvals/{approval['approval_id']}/decision",
        json={"decision": "approve"},
        headers=tenant.auth("finance"),
    )
    assert ok.status_code == 200
    run = await finished(api, tenant, run_id, user="admin")
    assert actions(run)["issue_refund"] == "denied"
    assert await refunds_for(integrations, run_id) == []
    rules = [d for d in await decisions(pool, tenant, run_id) if d[0] == "issue_refund"]
    assert rules[-1][1] == "denied"


@pytest.mark.usefixtures("worker", "customers")
async def test_approve_with_edits_within_the_approvers_right(
    api: httpx.AsyncClient, tenant: Tenant, integrations: Integrations
) -> None:
    run_id = await start(api, tenant, ticket())
    approval = await pending_refund(api, tenant, run_id)
    path = f"/v1/approvals/{approval['approval_id']}/decision"
    not_editable = await api.post(
        path,
        json={"decision": "approve", "edits": {"customer_id": "cus_2"}},
        headers=tenant.auth("finance"),
    )
    assert not_editable.status_code == 422
    beyond_right = await api.post(
        path,
        json={"decision": "approve", "edits": {"amount": "2000.00"}},
        headers=tenant.auth("finance"),
    )
    assert beyond_right.status_code == 403
    edited = await api.post(
        path,
        json={"decision": "approve", "edits": {"amount": "25.00"}},
        headers=tenant.auth("finance"),
    )
    assert edited.status_code == 200
    await finished(api, tenant, run_id)
    refunds = await refunds_for(integrations, run_id)
    assert [r["amount"] for r in refunds] == ["25.00"]


@pytest.mark.usefixtures("worker", "customers")
async def test_parallel_calls_wait_on_two_approvals_each_by_its_own_id(
    api: httpx.AsyncClient, tenant: Tenant, pool: Pool, integrations: Integrations, client: Client
) -> None:
    async with pool.acquire() as conn:  # this tenant reviews every outgoing email
        await policy_store.add_override(
            conn,
            tenant.id,
            {
                "subject_kind": "agent",
                "subject": "support-agent",
                "effect": "approve",
                "action": "execute",
                "resource": "email",
                "requires_approval": ["approver"],
            },
            by="admin",
        )
    run_id = await start(api, tenant, ticket(sim_parallel_tools="true"))
    run = await wait_json(
        api,
        f"/v1/runs/{run_id}",
        tenant.auth("requester"),
        lambda b: len(b["pending_approvals"]) == 2,
    )
    by_kind = {a["title"].split()[0]: a for a in run["pending_approvals"]}
    assert set(by_kind) == {"issue_refund", "send_email"}
    # Decisions go through the inbox, which the run writes just after its state shows them.
    for user, kind in (("approver", "send_email"), ("finance", "issue_refund")):
        await wait_json(api, "/v1/approvals", tenant.auth(user), in_inbox(by_kind[kind]))
    first = await api.post(
        f"/v1/approvals/{by_kind['send_email']['approval_id']}/decision",
        json={"decision": "approve"},
        headers=tenant.auth("approver"),
    )
    assert first.status_code == 200
    still = (await api.get(f"/v1/runs/{run_id}", headers=tenant.auth("requester"))).json()
    assert [a["title"].split()[0] for a in still["pending_approvals"]] == ["issue_refund"]
    second = await api.post(
        f"/v1/approvals/{by_kind['issue_refund']['approval_id']}/decision",
        json={"decision": "approve"},
        headers=tenant.auth("finance"),
    )
    assert second.status_code == 200
    done = await finished(api, tenant, run_id)
    assert actions(done)["send_email"] == "executed"
    assert actions(done)["issue_refund"] == "executed"
    assert len(await refunds_for(integrations, run_id)) == 1
    await record_history(
        client.get_workflow_handle(workflow_id(tenant.id, run_id)), "supportagent_parallel"
    )


@pytest.mark.usefixtures("worker", "customers")
async def test_budget_exhausted_parks_for_an_approval_to_raise_it(
    api: httpx.AsyncClient, tenant: Tenant, client: Client
) -> None:
    body = {**ticket(sim_skip_tools="draft_reply,issue_refund,send_email"), "budget_usd": 0.000001}
    run_id = await start(api, tenant, body)
    inbox = await wait_json(
        api,
        "/v1/approvals",
        tenant.auth("admin"),
        lambda b: any(a["run_id"] == run_id and a["kind"] == "budget" for a in b["items"]),
    )
    approval = next(a for a in inbox["items"] if a["run_id"] == run_id)
    assert approval["proposal"]["scope"] == "run"
    raised = await api.post(
        f"/v1/approvals/{approval['approval_id']}/decision",
        json={"decision": "approve", "edits": {"requested_usd": 1.0}},
        headers=tenant.auth("admin"),
    )
    assert raised.status_code == 200, raised.text
    run = await finished(api, tenant, run_id)
    assert run["status"] == "completed"
    assert actions(run) == {"lookup_customer": "executed"}
    await record_history(
        client.get_workflow_handle(workflow_id(tenant.id, run_id)), "supportagent_budget_raised"
    )


@pytest.mark.usefixtures("customers")
async def test_refund_exactly_once_when_the_worker_dies_after_paying(
    api: httpx.AsyncClient,
    tenant: Tenant,
    integrations: Integrations,
    client: Client,
    test_settings: Settings,
    tmp_path: Path,
) -> None:
    """SIGKILL the worker after the payment provider committed the refund and before the
    activity completed: the retry, on a new worker, carries the same idempotency key."""
    headers = {"Authorization": f"Bearer {integrations.token}"}
    async with httpx.AsyncClient(base_url=integrations.payments, headers=headers) as payments:
        # The next refund commits, then the answer is held: the caller dies waiting for it.
        armed = await payments.post(
            "/_control/faults",
            json={"status": 503, "count": 1, "after_commit": True, "hold_seconds": 30},
        )
        assert armed.status_code == 200
        first = spawn_worker(client, test_settings, tmp_path / "worker.log")
        second = None
        try:
            run_id = await start(api, tenant, ticket())
            approval = await pending_refund(api, tenant, run_id)
            await api.post(
                f"/v1/approvals/{approval['approval_id']}/decision",
                json={"decision": "approve"},
                headers=tenant.auth("finance"),
                timeout=30,
            )
            await eventually(lambda: refunds_for(integrations, run_id), lambda r: len(r) == 1)
            first.kill()
            first.wait()
            second = spawn_worker(client, test_settings, tmp_path / "worker.log")
            run = await finished(api, tenant, run_id)
        finally:
            for process in (first, second):
                if process is not None and process.poll() is None:
                    process.kill()
                    process.wait()
        await payments.post("/_control/faults", json={"status": 503, "count": 0})
    assert actions(run)["issue_refund"] == "executed"
    assert len(await refunds_for(integrations, run_id)) == 1


def plain_ticket(body: str, customer: str = "cus_1") -> dict[str, Any]:
    """A ticket as a customer writes it: no hints, the simulator reads it like a model."""
    return {
        "pipeline": "support-agent",
        "input": {
            "ticket_id": "T-7",
            "customer_id": customer,
            "subject": "Double charge",
            "body": body,
        },
    }


async def sent_emails(integrations: Integrations, run_id: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {integrations.token}"}) as http:
        sent = (await http.get(f"{integrations.email}/v1/messages")).json()
    return [m for m in sent if m.get("metadata", {}).get("run_id") == run_id]


async def drafts_of(pool: Pool, tenant: Tenant, run_id: str) -> list[dict[str, Any]]:
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT subject, body FROM drafts WHERE tenant_id = $1 AND run_id = $2",
            tenant.id,
            run_id,
        )
    return [dict(r) for r in rows]


@pytest.mark.usefixtures("worker", "customers")
async def test_an_unscripted_ticket_gets_a_sensible_agent(
    api: httpx.AsyncClient, tenant: Tenant, pool: Pool, integrations: Integrations
) -> None:
    """Without hints, the simulated model reads the ticket and the tool results: the amount
    from the ticket's text, the email from the lookup, a reply that says what it found."""
    body = "I was charged twice for order 1234: $40.00 each time. Please refund the duplicate."
    run_id = await start(api, tenant, plain_ticket(body))
    approval = await pending_refund(api, tenant, run_id)
    assert approval["proposal"]["amount"] == "40.00"
    assert approval["proposal"]["customer_id"] == "cus_1"
    assert approval["proposal"]["reason"].startswith("I was charged twice")
    run = await approve_and_finish(api, tenant, approval, run_id)
    assert actions(run) == dict.fromkeys(ALL_TOOLS, "executed")
    [refund] = await refunds_for(integrations, run_id)
    assert (refund["amount"], refund["currency"]) == ("40.00", "USD")
    [email] = await sent_emails(integrations, run_id)
    assert email["to"] == CUSTOMER_EMAIL  # learned from the lookup, not scripted
    assert email["body"].startswith("Hello Jane Doe,")
    assert "refund of 40.00 USD" in email["body"]
    [draft] = await drafts_of(pool, tenant, run_id)
    assert draft["body"].startswith("Hello Jane Doe,")
    reply = run["result"]["reply"]
    assert "Jane Doe" in reply
    assert CUSTOMER_EMAIL in reply
    assert "40.00" in reply


@pytest.mark.usefixtures("worker", "customers")
async def test_no_amount_no_refund(
    api: httpx.AsyncClient, tenant: Tenant, integrations: Integrations
) -> None:
    run_id = await start(api, tenant, plain_ticket("How do I change my delivery address?"))
    run = await finished(api, tenant, run_id)
    assert run["status"] == "completed"
    assert actions(run) == {
        "lookup_customer": "executed",
        "draft_reply": "executed",
        "send_email": "executed",
    }
    assert run["approvals"] == []
    assert await refunds_for(integrations, run_id) == []
