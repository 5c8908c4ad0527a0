"""Drill: webhooks under SIGKILL. Real worker processes (each running its dispatcher) are
killed while deliveries are at the receiver, with runs finishing and approvals being decided
meanwhile; the loopback receiver verifies every signature. It fails on a run event enqueued
twice or not at all, an event that never arrives, two ids for one event, a retry that sends
different bytes, or a request whose signature does not verify.

Behind the `drill` marker (`make test-drills`); writes its figures to tests/drills-results.json.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.client import Client

from stead.config import Settings
from stead.store.db import Pool
from stead.webhooks.dispatch import delivery_workflow_id
from tests.conftest import Tenant
from tests.drills_support import WorkerProcesses, all_closed, in_flight, record, summarize
from tests.helpers import decide_pending, eventually
from tests.helpers import start_run as start
from tests.hooks_support import Answer, Receiver, register

pytestmark = pytest.mark.drill
pytest_plugins = ["tests.hooks_support"]

KILLS = 8
EVENT_ACTIONS = ("run.completed", "run.failed", "approval.requested", "approval.decided")


async def kill_while_answering(
    workers: WorkerProcesses, client: Client, pool: Pool, tenant: Tenant, receiver: Receiver
) -> bool:
    """SIGKILL the worker once one of its delivery attempts is at the receiver, waiting for
    its answer (the sender will never record it); True if that happened, False if no delivery
    was in flight within the wait (the worker is killed anyway)."""
    prefix = workers.identity_prefix

    async def probe() -> bool:
        if not receiver.answering:
            return False
        async with pool.acquire() as conn:
            ids = [
                delivery_workflow_id(tenant.id, r["id"])
                for r in await conn.fetch(
                    "SELECT id FROM webhook_deliveries WHERE tenant_id = $1 AND status = 'pending'",
                    tenant.id,
                )
            ]
        running = await in_flight(client, ids)
        return any(
            a.activity == "webhooks.deliver" and a.identity.startswith(prefix) for a in running
        )

    try:
        await eventually(probe, bool, within=45)
        caught = True
    except AssertionError:
        caught = False
    workers.kill()
    return caught


async def figures_of(pool: Pool, tenant: Tenant, receiver: Receiver) -> dict[str, Any]:
    async with pool.acquire() as conn:
        audited = await conn.fetch(
            "SELECT a.seq, a.action, a.run_id, e.id AS event_id,"
            " (SELECT count(*) FROM webhook_events x WHERE x.tenant_id = a.tenant_id"
            "  AND x.audit_seq = a.seq) AS enqueued"
            " FROM audit_log a LEFT JOIN webhook_events e"
            " ON e.tenant_id = a.tenant_id AND e.audit_seq = a.seq"
            " WHERE a.tenant_id = $1 AND a.action = ANY($2)",
            tenant.id,
            list(EVENT_ACTIONS),
        )
        deliveries = Counter(
            r["status"]
            for r in await conn.fetch(
                "SELECT status FROM webhook_deliveries WHERE tenant_id = $1", tenant.id
            )
        )
    expected = {r["event_id"] for r in audited if r["event_id"]}
    requests = Counter(r.webhook_id for r in receiver.received)
    bodies: dict[str, set[bytes]] = {}
    for request in receiver.received:
        bodies.setdefault(request.webhook_id, set()).add(request.body)
    return {
        "run_events_audited": len(audited),
        "run_events_enqueued_once": sum(r["enqueued"] == 1 for r in audited),
        "run_events_enqueued_twice_or_more": sum(r["enqueued"] > 1 for r in audited),
        "run_events_never_enqueued": sum(r["enqueued"] == 0 for r in audited),
        "deliveries": dict(deliveries),
        "requests_received": len(receiver.received),
        "event_ids_received": len(requests),
        "events_never_received": len(expected - set(requests)),
        "ids_received_for_no_event": len(set(requests) - expected),
        "events_received_more_than_once": sum(n > 1 for n in requests.values()),
        "retries_with_other_bytes": sum(len(b) > 1 for b in bodies.values()),
        "requests_not_verified": sum(not r.verified for r in receiver.received),
        "events_by_type": dict(Counter(r["action"] for r in audited)),
    }


async def test_kill_worker_during_webhook_deliveries(
    client: Client,
    test_settings: Settings,
    api: httpx.AsyncClient,
    tenant: Tenant,
    pool: Pool,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    """8 times: start runs (one of them with a review), decide the reviews waiting, and
    SIGKILL the worker while a delivery waits for the receiver's (slowed) answer; start
    another worker. Every run event reaches the receiver under one id, signed, as the same
    bytes on every retry."""
    receiver.default = Answer(status=204, delay=1.5)
    await register(api, tenant, receiver)
    workers = WorkerProcesses(client, test_settings, tmp_path)
    run_ids: list[str] = []
    reviewed: list[str] = []
    with_review = 0
    caught = 0
    try:
        for cycle in range(KILLS):
            await workers.spawn()
            for waiting in reviewed:
                await decide_pending(api, tenant, waiting)
            reviewed = [await start(api, tenant, summarize(f"hooks {cycle}", review=True))]
            run_ids += reviewed
            with_review += len(reviewed)
            run_ids += [
                await start(api, tenant, summarize(f"hooks {cycle}", review=False))
                for _ in range(2)
            ]
            caught += await kill_while_answering(workers, client, pool, tenant, receiver)
        await workers.spawn()
        for waiting in reviewed:
            await decide_pending(api, tenant, waiting)
        closed = await all_closed(client, tenant, run_ids, within=240)

        async def settled() -> dict[str, Any]:
            return await figures_of(pool, tenant, receiver)

        figures = await eventually(
            settled,
            lambda f: set(f["deliveries"]) == {"succeeded"} and not f["events_never_received"],
            within=300,
        )
    finally:
        workers.close()
    figures |= {
        "runs": len(run_ids),
        "kills": workers.kills,
        "kills_with_a_delivery_at_the_receiver": caught,
        "temporal_status": dict(closed),
    }
    record("kill_during_webhook_deliveries", figures)
    assert closed == {"COMPLETED": len(run_ids)}
    # Each run completes once; a reviewed one asks for and records one decision too.
    assert figures["run_events_audited"] == len(run_ids) + 2 * with_review
    assert figures["run_events_enqueued_once"] == figures["run_events_audited"]
    assert figures["event_ids_received"] == figures["run_events_audited"]
    for must_be_zero in (
        "run_events_enqueued_twice_or_more",
        "run_events_never_enqueued",
        "events_never_received",
        "ids_received_for_no_event",
        "retries_with_other_bytes",
        "requests_not_verified",
    ):
        assert figures[must_be_zero] == 0, (must_be_zero, figures)
    assert caught >= KILLS // 2, "most kills should land on a delivery at the receiver"
