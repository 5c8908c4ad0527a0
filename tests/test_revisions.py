"""Runs record the platform's workflow changes by the revision in their input, not by markers.

Before: every `workflow.patched` in the platform's pipeline code cost each new run a marker
and a `TemporalChangeVersion` upsert, and the end of a run and an approval request made one
upsert per search attribute. Older runs still replay (tests/histories/v2/, test_replay.py);
these tests pin what a run started today records, and that a worker never runs a run from a
revision it does not know down its own paths.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client

from stead import search
from stead.contract import WORKFLOW_REVISION, RunContext
from stead.service.runs import workflow_id
from tests.conftest import Tenant
from tests.helpers import eventually, wait_json
from tests.test_stuck_runs import start_test_run
from tests.test_summarize import finished, pending_approval, start
from tests.test_triage import run as run_triage
from workflows.summarize import SummarizeWorkflow


async def history(client: Client, tenant: Tenant, run_id: str) -> list[HistoryEvent]:
    fetched = await client.get_workflow_handle(workflow_id(tenant.id, run_id)).fetch_history()
    return list(fetched.events)


def upserts(events: list[HistoryEvent]) -> list[dict[str, Any]]:
    """Each upsert event's attributes, decoded (search attributes are plain JSON payloads)."""
    found = []
    for event in events:
        if event.event_type != EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES:
            continue
        fields = event.upsert_workflow_search_attributes_event_attributes.search_attributes
        found.append({k: json.loads(v.data) for k, v in fields.indexed_fields.items()})
    return found


def markers(events: list[HistoryEvent]) -> list[str]:
    return [
        e.marker_recorded_event_attributes.marker_name
        for e in events
        if e.event_type == EventType.EVENT_TYPE_MARKER_RECORDED
    ]


@pytest.mark.usefixtures("worker")
async def test_a_run_records_no_patch_markers_and_ends_in_one_upsert(
    api: httpx.AsyncClient, tenant: Tenant, client: Client
) -> None:
    run_id, done = await run_triage(api, tenant, "My invoice is wrong.\nsim_reply: ok")
    events = await history(client, tenant, run_id)
    assert "core_patch" not in markers(events)
    found = upserts(events)
    assert not any("TemporalChangeVersion" in u for u in found)
    # The end of the run is one upsert: its stage and its cost together.
    assert found[-1] == {"Stage": "completed", "CostUsd": pytest.approx(done["usage"]["cost_usd"])}
    handle = client.get_workflow_handle(workflow_id(tenant.id, run_id))
    described = await handle.describe()
    assert described.typed_search_attributes.get(search.STAGE) == "completed"


@pytest.mark.usefixtures("worker")
async def test_asking_for_approval_is_one_upsert_and_the_attributes_follow_the_run(
    api: httpx.AsyncClient, tenant: Tenant, client: Client
) -> None:
    run_id = await start(api, tenant)
    approval = await pending_approval(api, tenant, run_id)
    handle = client.get_workflow_handle(workflow_id(tenant.id, run_id))
    waiting = await handle.describe()
    assert waiting.typed_search_attributes.get(search.STAGE) == "review"
    assert waiting.typed_search_attributes.get(search.PENDING_APPROVAL) is True
    assert waiting.typed_search_attributes.get(search.APPROVAL_ROLES) == ["approver"]
    asked = [u for u in upserts(await history(client, tenant, run_id)) if "PendingApproval" in u]
    assert asked == [{"Stage": "review", "PendingApproval": True, "ApprovalRoles": ["approver"]}]

    decided = await api.post(
        f"/v1/approvals/{approval['approval_id']}/decision",
        json={"decision": "approve"},
        headers=tenant.auth("approver"),
    )
    assert decided.status_code == 200, decided.text
    assert (await finished(api, tenant, run_id))["status"] == "completed"
    events = await history(client, tenant, run_id)
    assert "core_patch" not in markers(events)
    ended = await handle.describe()
    assert ended.typed_search_attributes.get(search.STAGE) == "completed"
    assert ended.typed_search_attributes.get(search.PENDING_APPROVAL) is False
    assert not ended.typed_search_attributes.get(search.APPROVAL_ROLES)  # empty reads as unset


@pytest.mark.usefixtures("worker")
async def test_a_run_from_a_newer_revision_waits_for_a_worker_that_knows_it(
    api: httpx.AsyncClient, tenant: Tenant, client: Client, task_queue: str
) -> None:
    run_id, handle = await start_test_run(
        client, tenant, task_queue, SummarizeWorkflow, revision=WORKFLOW_REVISION + 1
    )
    try:

        async def failed_tasks() -> list[HistoryEvent]:
            return [
                e
                for e in await history(client, tenant, run_id)
                if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED
            ]

        await eventually(failed_tasks, bool, within=30)
        # Nothing ran: the run neither failed nor moved (no activity, no upsert).
        events = await history(client, tenant, run_id)
        assert not upserts(events)
        assert not any(e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED for e in events)
        described = await handle.describe()
        assert described.status is not None
        assert described.status.name == "RUNNING"
        shown = await wait_json(
            api, f"/v1/runs/{run_id}", tenant.auth("requester"), lambda b: b["stuck"], within=30
        )
        assert "upgrade the workers" in shown["stuck_error"]["message"]
    finally:
        await handle.terminate("test over")


def test_runs_started_before_revisions_read_as_revision_zero() -> None:
    """A context recorded before the field existed decodes (and so replays) as revision 0."""
    old = {"tenant": "t", "run_id": "r", "pipeline": "summarize", "requested_by": "u"}
    assert RunContext.model_validate(old).revision == 0
