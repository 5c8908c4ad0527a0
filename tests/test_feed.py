"""`GET /v1/events`: the tenant's live feed of approvals and run endings, from the audit log,
over a real HTTP server."""

from __future__ import annotations

import asyncio

from temporalio.worker import Worker

from tests.conftest import Tenant, TenantFactory
from tests.events_support import LiveApi, Sse, following, read_events, served
from tests.helpers import decide_pending, start_run

__all__ = ["served"]  # the fixture, used by name

SUMMARIZE = {"pipeline": "summarize", "input": {"text": "Revenue grew 12% in Q3. Costs fell 3%."}}


async def follow(served: LiveApi, headers: dict[str, str], count: int) -> asyncio.Task[list[Sse]]:
    """Read `count` feed events in the background, from the log's head when the feed opens."""
    return await following(served.http, "/v1/events", headers, count)


async def approved_run(served: LiveApi, tenant: Tenant) -> tuple[str, list[Sse]]:
    """A run approved while its approver follows the feed, and the three events they saw."""
    watching = await follow(served, tenant.auth("approver"), count=3)
    run_id = await start_run(served.http, tenant, SUMMARIZE)
    await decide_pending(served.http, tenant, run_id)
    return run_id, await asyncio.wait_for(watching, 60)


async def test_a_reviewer_sees_approvals_arrive_and_runs_end(
    served: LiveApi, worker: list[Worker], tenant: Tenant
) -> None:
    run_id, events = await approved_run(served, tenant)

    assert [e.event for e in events] == ["approval.requested", "approval.decided", "run.completed"]
    requested = events[0].body
    assert requested["run_id"] == run_id
    assert requested["eligible"] is True
    assert requested["data"]["proposal"]["summary"].startswith("Summary:")
    assert events[1].body["actor"] == "approver"
    assert events[2].data["output"] == "[masked]"  # content, as the audit views show it
    ids = [int(e.id) for e in events]
    assert ids == sorted(ids)


async def test_resuming_after_an_id_gets_what_came_after_it(
    served: LiveApi, worker: list[Worker], tenant: Tenant
) -> None:
    _, events = await approved_run(served, tenant)

    resumed = await read_events(
        served.http,
        "/v1/events",
        {**tenant.auth("approver"), "Last-Event-ID": events[0].id},
        stop_after=2,
    )
    assert [e.body for e in resumed] == [e.body for e in events[1:]]


async def test_a_requester_is_told_of_approvals_they_may_not_decide(
    served: LiveApi, worker: list[Worker], tenant: Tenant
) -> None:
    watching = await follow(served, tenant.auth("requester"), count=1)
    run_id = await start_run(served.http, tenant, SUMMARIZE)
    events = await asyncio.wait_for(watching, 60)
    await decide_pending(served.http, tenant, run_id)

    assert events[0].event == "approval.requested"
    assert events[0].body["eligible"] is False
    assert events[0].data["proposal"] == "[masked]"


async def test_the_feed_holds_only_the_callers_tenant(
    served: LiveApi, worker: list[Worker], tenant: Tenant, make_tenant: TenantFactory
) -> None:
    other = await make_tenant()
    watching = await follow(served, tenant.auth("admin"), count=1)
    elsewhere = await start_run(served.http, other, SUMMARIZE)
    await decide_pending(served.http, other, elsewhere)
    mine = await start_run(served.http, tenant, SUMMARIZE)
    events = await asyncio.wait_for(watching, 60)
    await decide_pending(served.http, tenant, mine)

    assert events[0].body["run_id"] == mine


async def test_the_feed_needs_a_right_to_approvals_or_runs(
    served: LiveApi, make_tenant: TenantFactory
) -> None:
    tenant = await make_tenant({"nobody": [], "approver": ["approver"]})
    refused = await served.http.get("/v1/events", headers=tenant.auth("nobody"))
    assert refused.status_code == 403
    assert refused.json()["code"] == "forbidden"
    forged = await served.http.get(
        "/v1/events", headers={**tenant.auth("approver"), "Last-Event-ID": "12; DROP"}
    )
    assert forged.status_code == 422
    assert "Last-Event-ID" in forged.json()["detail"]
