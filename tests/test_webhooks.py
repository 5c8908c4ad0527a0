"""Webhooks end to end: endpoints registered over the admin API, events enqueued with their
audit entries, delivered by Temporal workflows to a real loopback receiver that verifies the
Standard Webhooks signature; retries, the delivery log, re-delivery, disabling and rotation.

The exactly-once drill under worker kills is in tests/test_hooks_drill.py (`-m drill`).
"""

from __future__ import annotations

import ssl
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.testing import ActivityEnvironment

from stead.builtin.webhooks import WebhookDelivery
from stead.config import Settings
from stead.contract import AuditEvent
from stead.crypto import Sealer
from stead.service.access import Services
from stead.serving import serving
from stead.store.db import Pool
from stead.webhooks.delivery import DeliveryJob, DeliveryOutcome, WebhookActivities
from stead.webhooks.dispatch import Dispatcher, delivery_workflow_id
from stead.webhooks.urls import Reach, Resolver
from tests.conftest import Tenant, TenantFactory, make_services
from tests.helpers import eventually, record_history, start_run, wait_json
from tests.hooks_support import (
    Answer,
    Receiver,
    arrived,
    localhost_certificate,
    receiving,
    register,
)

pytest_plugins = ["tests.hooks_support"]


TEXT = "Revenue grew 12% in Q3 to $4.1M. Costs fell 3%. Confidential: Project Falcon."


def summarize(*, review: bool) -> dict[str, Any]:
    return {
        "pipeline": "summarize",
        "input": {"text": f"{TEXT} {uuid.uuid4().hex}", "review": review},
    }


# --- registration --------------------------------------------------------------------------


async def test_registration_checks_urls_and_shows_the_secret_once(
    api: httpx.AsyncClient, tenant: Tenant, make_tenant: TenantFactory
) -> None:
    admin = tenant.auth("admin")

    async def register_url(url: str, **more: Any) -> httpx.Response:
        body = {"url": url, "events": ["run.completed"], **more}
        return await api.post("/v1/admin/webhooks", json=body, headers=admin)

    refused = {
        "http://hooks.example.com/x": "https",
        "https://user:pass@hooks.example.com/x": "user name or password",
        "https://hooks.example.com/x#frag": "fragment",
        "https://10.1.2.3/x": "not a public address",
        "https://169.254.169.254/latest/meta-data": "not a public address",
        "https://[::ffff:10.0.0.1]/x": "not a public address",
        "ftp://hooks.example.com/x": "absolute",
        "/relative": "absolute",
    }
    for url, why in refused.items():
        response = await register_url(url)
        assert response.status_code == 422, (url, response.text)
        assert why in response.json()["detail"], (url, response.text)
    unknown_event = await register_url("https://hooks.example.com/x", events=["run.started"])
    assert unknown_event.status_code == 422

    created = await register_url("https://hooks.example.com/stead", description="billing")
    assert created.status_code == 201, created.text
    endpoint = created.json()
    assert endpoint["secret"].startswith("whsec_")
    assert endpoint["enabled"] is True
    assert endpoint["events"] == ["run.completed"]
    # Outside production a receiver on the developer's own machine may use plain http.
    assert (await register_url("http://127.0.0.1:9/x")).status_code == 201

    listed = await api.get("/v1/admin/webhooks", headers=admin)
    assert [e["endpoint_id"] for e in listed.json()] == [
        endpoint["endpoint_id"],
        listed.json()[1]["endpoint_id"],
    ]
    shown = await api.get(f"/v1/admin/webhooks/{endpoint['endpoint_id']}", headers=admin)
    assert shown.status_code == 200
    assert "secret" not in shown.json(), "the secret is shown once, at creation"
    assert endpoint["secret"] not in listed.text

    # Only holders of webhooks:manage (admins); another tenant's endpoint is not found.
    forbidden = await api.get("/v1/admin/webhooks", headers=tenant.auth("requester"))
    assert forbidden.status_code == 403
    other = await make_tenant()
    path = f"/v1/admin/webhooks/{endpoint['endpoint_id']}"
    assert (await api.get(path, headers=other.auth("admin"))).status_code == 404
    assert (await api.delete(path, headers=other.auth("admin"))).status_code == 404
    assert (await api.get("/v1/admin/webhooks/we_nope%00", headers=admin)).status_code == 404


async def test_the_secret_is_stored_sealed_and_changes_are_audited(
    api: httpx.AsyncClient, tenant: Tenant, database_url: str
) -> None:
    admin = tenant.auth("admin")
    created = await api.post(
        "/v1/admin/webhooks",
        json={"url": "https://hooks.example.com/a", "events": ["run.failed"]},
        headers=admin,
    )
    endpoint = created.json()
    secret, endpoint_id = endpoint["secret"], endpoint["endpoint_id"]
    rotated = await api.post(f"/v1/admin/webhooks/{endpoint_id}/rotate-secret", headers=admin)
    assert rotated.status_code == 200, rotated.text
    assert rotated.json()["secret"] != secret
    assert rotated.json()["previous_secret_expires_at"] is not None
    patched = await api.patch(
        f"/v1/admin/webhooks/{endpoint_id}", json={"enabled": False}, headers=admin
    )
    assert patched.json()["enabled"] is False
    assert patched.json()["disabled_reason"] == "disabled by an admin"
    assert (await api.delete(f"/v1/admin/webhooks/{endpoint_id}", headers=admin)).status_code == 204

    conn = await asyncpg.connect(database_url)
    try:
        dump = await conn.fetchval(
            "SELECT string_agg(t::text, ' ') FROM (SELECT * FROM audit_log WHERE tenant_id = $1) t",
            tenant.id,
        )
        actions = [
            r["action"]
            for r in await conn.fetch(
                "SELECT action FROM audit_log WHERE tenant_id = $1 ORDER BY seq", tenant.id
            )
        ]
    finally:
        await conn.close()
    assert actions == [
        "webhook.created",
        "webhook.secret_rotated",
        "webhook.updated",
        "webhook.deleted",
    ]
    for shown_once in (secret, rotated.json()["secret"]):
        assert shown_once.removeprefix("whsec_") not in dump


# --- enqueueing ---------------------------------------------------------------------------


def _event(tenant: str, run_id: str, action: str, key: str) -> AuditEvent:
    return AuditEvent(
        key=key,
        tenant=tenant,
        actor="workflow:summarize",
        actor_kind="system",
        action=action,
        run_id=run_id,
        at=datetime.now(UTC),
        data={"outcome": "completed", "cost_nusd": 1000},
    )


async def test_each_audit_entry_is_enqueued_once_with_it(
    api: httpx.AsyncClient, tenant: Tenant, pool: Pool, settings: Settings, client: Client
) -> None:
    """The outbox is written by the audit entry's own transaction: a retried write (same
    keys) enqueues nothing more, a rolled-back one nothing at all, unsubscribed actions and
    disabled endpoints nothing."""
    async with receiving() as receiver:
        first = await register(api, tenant, receiver, ["run.completed"])
        await register(api, tenant, receiver, ["run.completed", "run.failed"])
        off = await register(api, tenant, receiver, ["run.completed"])
    await api.patch(
        f"/v1/admin/webhooks/{off['endpoint_id']}",
        json={"enabled": False},
        headers=tenant.auth("admin"),
    )
    audit = make_services(settings, client, pool).audit
    batch = [
        _event(tenant.id, "r_one", "run.completed", f"k-{uuid.uuid4().hex}"),
        _event(tenant.id, "r_one", "stage.entered", f"k-{uuid.uuid4().hex}"),
        _event(tenant.id, "r_two", "run.failed", f"k-{uuid.uuid4().hex}"),
    ]
    for _ in range(3):  # a flush retried after its worker died
        async with pool.acquire() as conn, conn.transaction():
            await audit.append(conn, batch)

    async def rolled_back() -> None:
        async with pool.acquire() as conn, conn.transaction():
            await audit.append(conn, [_event(tenant.id, "r_three", "run.completed", "k-rolled")])
            raise RuntimeError("the worker died before the commit")

    with pytest.raises(RuntimeError):
        await rolled_back()

    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT e.type, e.run_id, d.endpoint_id FROM webhook_deliveries d"
            " JOIN webhook_events e ON e.tenant_id = d.tenant_id AND e.id = d.event_id"
            " WHERE d.tenant_id = $1 ORDER BY e.type, d.endpoint_id",
            tenant.id,
        )
        events = await conn.fetchval(
            "SELECT count(*) FROM webhook_events WHERE tenant_id = $1", tenant.id
        )
    assert events == 2  # run.completed and run.failed, once each
    got = sorted((r["type"], r["run_id"], r["endpoint_id"] == first["endpoint_id"]) for r in rows)
    assert got == [
        ("run.completed", "r_one", False),
        ("run.completed", "r_one", True),
        ("run.failed", "r_two", False),
    ]
    # These deliveries point at an audit entry of no run; start nothing for them.
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE webhook_deliveries SET dispatched_at = now() WHERE tenant_id = $1", tenant.id
        )


# --- delivery ------------------------------------------------------------------------------


@pytest.mark.usefixtures("hook_worker")
async def test_run_events_are_delivered_signed(
    hook_api: httpx.AsyncClient, tenant: Tenant, receiver: Receiver, client: Client
) -> None:
    endpoint = await register(hook_api, tenant, receiver)
    run_id = await start_run(hook_api, tenant, summarize(review=True))
    inbox = await wait_json(
        hook_api,
        "/v1/approvals",
        tenant.auth("approver"),
        lambda b: any(a["run_id"] == run_id for a in b["items"]),
    )
    approval = next(a for a in inbox["items"] if a["run_id"] == run_id)
    decided = await hook_api.post(
        f"/v1/approvals/{approval['approval_id']}/decision",
        json={"decision": "approve", "comment": "Project Falcon looks right"},
        headers=tenant.auth("approver"),
    )
    assert decided.status_code == 200, decided.text
    await arrived(receiver, 3)

    by_type = {r.json()["type"]: r for r in receiver.received}
    assert set(by_type) == {"approval.requested", "approval.decided", "run.completed"}
    assert all(r.verified for r in receiver.received), "every request carries a valid signature"
    assert len({r.webhook_id for r in receiver.received}) == 3
    completed = by_type["run.completed"].json()
    assert completed["data"] == {
        "run_id": run_id,
        "pipeline": "summarize",
        "outcome": "completed",
        "cost_usd": completed["data"]["cost_usd"],
        "model_calls": 1,
    }
    assert completed["data"]["cost_usd"] > 0
    decided_event = by_type["approval.decided"].json()["data"]
    assert decided_event["approval_id"] == approval["approval_id"]
    assert decided_event["decided_by"] == "approver"
    assert decided_event["decision"] == "approve"
    requested = by_type["approval.requested"].json()["data"]
    assert requested["roles"] == ["approver"]
    # Facts only: no input, summary, proposal or comment reaches the receiver.
    for request in receiver.received:
        assert b"Falcon" not in request.body
        assert b"Summary" not in request.body

    log = await wait_json(
        hook_api,
        f"/v1/admin/webhooks/{endpoint['endpoint_id']}/deliveries",
        tenant.auth("admin"),
        lambda b: len(b["items"]) == 3 and all(d["status"] == "succeeded" for d in b["items"]),
    )
    assert {d["event_id"] for d in log["items"]} == {r.webhook_id for r in receiver.received}
    assert all(d["attempts"] == 1 and d["last_status"] == 204 for d in log["items"])
    delivery = log["items"][0]
    handle = client.get_workflow_handle(delivery_workflow_id(tenant.id, delivery["delivery_id"]))
    await eventually(handle.describe, lambda d: d.status is WorkflowExecutionStatus.COMPLETED)
    await record_history(handle, "webhookdelivery_succeeded")


@pytest.mark.usefixtures("hook_worker")
async def test_a_failed_run_is_delivered(
    hook_api: httpx.AsyncClient, tenant: Tenant, receiver: Receiver
) -> None:
    await register(hook_api, tenant, receiver, ["run.failed"])
    body = {**summarize(review=False), "budget_usd": 0.0000001}
    run_id = await start_run(hook_api, tenant, body)
    await arrived(receiver, 1)
    event = receiver.received[0].json()
    assert event["type"] == "run.failed"
    assert event["data"]["run_id"] == run_id
    assert event["data"]["error_type"] == "BudgetExhausted"
    assert receiver.received[0].verified


@pytest.mark.usefixtures("hook_worker")
async def test_a_failing_endpoint_is_retried_then_disabled_and_redelivers_the_same_event(
    hook_api: httpx.AsyncClient, tenant: Tenant, receiver: Receiver, client: Client
) -> None:
    admin = tenant.auth("admin")
    receiver.default = Answer(status=500, body=b"down for maintenance")
    endpoint = await register(hook_api, tenant, receiver, ["run.completed"])
    path = f"/v1/admin/webhooks/{endpoint['endpoint_id']}"
    await start_run(hook_api, tenant, summarize(review=False))

    disabled = await wait_json(hook_api, path, admin, lambda b: not b["enabled"], within=30)
    assert "gave up after 3 attempts" in disabled["disabled_reason"]
    assert "HTTP 500" in disabled["disabled_reason"]
    assert len(receiver.received) == 3, "the quick settings try each delivery three times"
    assert len({r.webhook_id for r in receiver.received}) == 1, "a retry repeats the webhook-id"
    assert len({r.body for r in receiver.received}) == 1, "...and the body"
    log = (await hook_api.get(f"{path}/deliveries", headers=admin)).json()["items"]
    assert [(d["status"], d["attempts"], d["last_status"]) for d in log] == [("failed", 3, 500)]
    detail = (
        await hook_api.get(f"{path}/deliveries/{log[0]['delivery_id']}", headers=admin)
    ).json()
    assert [a["status_code"] for a in detail["attempt_log"]] == [500, 500, 500]
    assert detail["attempt_log"][0]["response"] == "down for maintenance"
    gave_up = client.get_workflow_handle(delivery_workflow_id(tenant.id, log[0]["delivery_id"]))
    await eventually(gave_up.describe, lambda d: d.close_time is not None)
    await record_history(gave_up, "webhookdelivery_gaveup")

    # Disabled: new events are not enqueued for it, and re-delivery waits for it to be enabled.
    quiet = await start_run(hook_api, tenant, summarize(review=False))
    done = await wait_json(
        hook_api, f"/v1/runs/{quiet}", tenant.auth("requester"), lambda b: b["status"] != "running"
    )
    assert done["status"] == "completed"
    redeliver = f"{path}/deliveries/{log[0]['delivery_id']}/redeliver"
    assert (await hook_api.post(redeliver, headers=admin)).status_code == 409
    enabled = await hook_api.patch(path, json={"enabled": True}, headers=admin)
    assert enabled.json()["enabled"] is True
    assert enabled.json()["disabled_reason"] is None

    receiver.default = Answer(status=200)
    again = await hook_api.post(redeliver, headers=admin)
    assert again.status_code == 202, again.text
    assert again.json()["redelivery_of"] == log[0]["delivery_id"]
    assert len(await arrived(receiver, 4)) == 4
    assert receiver.received[-1].webhook_id == receiver.received[0].webhook_id
    assert receiver.received[-1].body == receiver.received[0].body
    assert receiver.received[-1].verified
    after = await wait_json(
        hook_api,
        f"{path}/deliveries",
        admin,
        lambda b: any(d["status"] == "succeeded" for d in b["items"]),
    )
    assert [d["status"] for d in after["items"]] == ["succeeded", "failed"]


@pytest.mark.usefixtures("hook_worker")
async def test_redirects_are_not_followed(
    hook_api: httpx.AsyncClient, tenant: Tenant, receiver: Receiver
) -> None:
    async with receiving() as elsewhere:
        receiver.plan.append(Answer(status=307, headers={"location": elsewhere.url}))
        endpoint = await register(hook_api, tenant, receiver, ["run.completed"])
        await start_run(hook_api, tenant, summarize(review=False))
        log = await wait_json(
            hook_api,
            f"/v1/admin/webhooks/{endpoint['endpoint_id']}/deliveries",
            tenant.auth("admin"),
            lambda b: bool(b["items"]) and b["items"][0]["status"] == "succeeded",
            within=30,
        )
        assert elsewhere.received == []
    detail = await hook_api.get(
        f"/v1/admin/webhooks/{endpoint['endpoint_id']}/deliveries/{log['items'][0]['delivery_id']}",
        headers=tenant.auth("admin"),
    )
    attempts = detail.json()["attempt_log"]
    assert attempts[0]["status_code"] == 307
    assert f"redirect to {elsewhere.url} not followed" in attempts[0]["error"]
    assert attempts[1]["status_code"] == 204


def resolving(address: str) -> Resolver:
    """A resolver whose answer for `localhost` is `address` (what the check sees)."""

    async def resolve(host: str, port: int) -> list[str]:
        assert host == "localhost"
        return [address]

    return resolve


async def deliver_here(
    api: httpx.AsyncClient,
    tenant: Tenant,
    services: Services,
    receiver: Receiver,
    resolver: Resolver,
    http: httpx.AsyncClient | None = None,
) -> DeliveryOutcome:
    """Register `receiver`, enqueue one run.completed for it, and make the delivery's first
    attempt in this process (no dispatcher), resolving with `resolver`."""
    await register(api, tenant, receiver, ["run.completed"])
    async with services.pool.acquire() as conn, conn.transaction():
        await services.audit.append(
            conn, [_event(tenant.id, "r_one", "run.completed", f"k-{uuid.uuid4().hex}")]
        )
        delivery_id = await conn.fetchval(
            "UPDATE webhook_deliveries SET dispatched_at = now() WHERE tenant_id = $1 RETURNING id",
            tenant.id,
        )
    activities = WebhookActivities(
        services.pool,
        services.audit,
        Sealer(services.settings.encryption_keys),
        Reach(loopback=True),
        http,
        resolver=resolver,
    )
    try:
        job = DeliveryJob(tenant=tenant.id, delivery_id=delivery_id)
        return await ActivityEnvironment(client=services.temporal).run(activities.deliver, job)
    finally:
        await activities.close()


async def test_an_attempt_connects_to_the_address_it_checked(
    api: httpx.AsyncClient, tenant: Tenant, pool: Pool, settings: Settings, client: Client
) -> None:
    """DNS rebinding: the endpoint's name answers the check with one address and a second
    lookup with another (here `localhost`: 127.0.0.2 to the check, the system's 127.0.0.1 to
    anyone else, a receiver listening on each). The request goes to the address checked,
    still naming the endpoint's host."""
    checked, elsewhere = Receiver(), Receiver()
    async with serving(checked, host="127.0.0.2") as checked_url:
        port = urlsplit(checked_url).port
        async with serving(elsewhere, host="127.0.0.1", port=port or 0):
            checked.url = f"http://localhost:{port}/hooks"
            services = make_services(settings, client, pool)
            outcome = await deliver_here(api, tenant, services, checked, resolving("127.0.0.2"))
    assert outcome.status == "succeeded", outcome
    assert elsewhere.received == []
    assert [(r.host, r.verified) for r in checked.received] == [(f"localhost:{port}", True)]


async def test_a_pinned_attempt_over_tls_checks_the_endpoint_s_name(
    api: httpx.AsyncClient,
    tenant: Tenant,
    pool: Pool,
    settings: Settings,
    client: Client,
    tmp_path: Path,
) -> None:
    """Connected to the checked address, TLS still names the endpoint's host (SNI) and its
    certificate is verified against that name, not against the address."""
    certificate, key = localhost_certificate(tmp_path)
    receiver = Receiver()
    trusting = httpx.AsyncClient(
        verify=ssl.create_default_context(cafile=certificate),
        follow_redirects=False,
        trust_env=False,
        limits=httpx.Limits(max_keepalive_connections=0),
    )
    async with serving(
        receiver, host="127.0.0.2", ssl_certfile=str(certificate), ssl_keyfile=str(key)
    ) as url:
        port = urlsplit(url).port
        receiver.url = f"https://localhost:{port}/hooks"
        services = make_services(settings, client, pool)
        outcome = await deliver_here(
            api, tenant, services, receiver, resolving("127.0.0.2"), trusting
        )
    assert outcome.status == "succeeded", outcome
    assert [(r.host, r.verified) for r in receiver.received] == [(f"localhost:{port}", True)]


@pytest.mark.usefixtures("hook_worker")
async def test_after_a_rotation_both_secrets_sign_for_a_while(
    hook_api: httpx.AsyncClient, tenant: Tenant, receiver: Receiver
) -> None:
    admin = tenant.auth("admin")
    endpoint = await register(hook_api, tenant, receiver, ["run.completed"])
    rotate = f"/v1/admin/webhooks/{endpoint['endpoint_id']}/rotate-secret"
    rotated = await hook_api.post(rotate, json={"keep_previous_seconds": 3600}, headers=admin)
    receiver.secrets.append(rotated.json()["secret"])
    await start_run(hook_api, tenant, summarize(review=False))
    assert len(await arrived(receiver, 1)) == 1
    assert receiver.received[0].verified_by == (0, 1), "old and new secret both verify"

    latest = await hook_api.post(rotate, json={"keep_previous_seconds": 0}, headers=admin)
    receiver.secrets.append(latest.json()["secret"])
    await start_run(hook_api, tenant, summarize(review=False))
    assert len(await arrived(receiver, 2)) == 2
    assert receiver.received[1].verified_by == (2,), "only the newest secret signs now"


async def test_a_delivery_started_before_a_crash_is_not_started_twice(
    api: httpx.AsyncClient,
    tenant: Tenant,
    pool: Pool,
    client: Client,
    hook_settings: Settings,
    receiver: Receiver,
) -> None:
    """A dispatcher that started a workflow and died before marking its row: the next pass
    starts the rest and is refused the one already started (its workflow id), marking all."""
    await register(api, tenant, receiver, ["run.completed"])
    audit = make_services(hook_settings, client, pool).audit
    events = [_event(tenant.id, f"r_{i}", "run.completed", uuid.uuid4().hex) for i in range(3)]
    async with pool.acquire() as conn, conn.transaction():
        await audit.append(conn, events)
        ids = [
            r["id"]
            for r in await conn.fetch(
                "SELECT id FROM webhook_deliveries WHERE tenant_id = $1 ORDER BY id", tenant.id
            )
        ]
    dispatcher = Dispatcher(pool, client, hook_settings)
    early = await client.start_workflow(
        WebhookDelivery.run,
        dispatcher.job(tenant.id, ids[0]),
        id=delivery_workflow_id(tenant.id, ids[0]),
        task_queue=hook_settings.task_queue,
    )
    assert await dispatcher.dispatch_once() >= 3
    async with pool.acquire() as conn:
        undispatched = await conn.fetchval(
            "SELECT count(*) FROM webhook_deliveries WHERE tenant_id = $1"
            " AND dispatched_at IS NULL",
            tenant.id,
        )
    assert undispatched == 0
    runs = []
    for delivery_id in ids:
        handle = client.get_workflow_handle(delivery_workflow_id(tenant.id, delivery_id))
        runs.append((await handle.describe()).run_id)
        await handle.terminate("no worker in this test")
    assert runs[0] == early.result_run_id, "the early start is the delivery's one workflow"
