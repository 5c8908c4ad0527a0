"""`GET /v1/runs/{id}/events`: a run's live events over Server-Sent Events, on real Temporal,
PostgreSQL and a real HTTP server."""

from __future__ import annotations

import asyncio
import base64
import os
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.client import Client
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.worker import Worker

from activities import support_desk
from stead import search
from stead.config import Settings
from stead.pipeline.events import RUN_TOPIC, TOKENS_TOPIC
from stead.policy.redaction import default_redactor
from stead.service.run_events import RunStreams, StreamedItem, Viewer
from stead.store.db import Pool
from stead.store.principals import Principal
from tests.conftest import SimControl, Tenant, TenantFactory
from tests.events_support import LiveApi, Sse, read_events, served
from tests.helpers import decide_pending, eventually, record_history, start_run, wait_json
from tests.web_support import live_script_events

__all__ = ["served"]  # the fixture, used by name

SUMMARIZE = {"pipeline": "summarize", "input": {"text": "Revenue grew 12% in Q3. Costs fell 3%."}}


def types(events: list[Sse]) -> list[str]:
    return [e.event for e in events]


def offsets(events: list[Sse]) -> list[int]:
    return [int(e.id.split("@")[0]) for e in events if e.id]


def path_of(run_id: str) -> str:
    return f"/v1/runs/{run_id}/events"


async def approved_run(served: LiveApi, tenant: Tenant) -> str:
    """A summarize run, approved and finished."""
    run_id = await start_run(served.http, tenant, SUMMARIZE)
    await decide_pending(served.http, tenant, run_id)
    await wait_json(
        served.http,
        f"/v1/runs/{run_id}",
        tenant.auth("requester"),
        lambda b: b["status"] == "completed",
    )
    return run_id


async def test_a_run_streams_its_stages_calls_approvals_and_result(
    served: LiveApi, worker: list[Worker], tenant: Tenant, client: Client
) -> None:
    run_id = await start_run(served.http, tenant, SUMMARIZE)
    watching = asyncio.create_task(read_events(served.http, path_of(run_id), tenant.auth("admin")))
    await decide_pending(served.http, tenant, run_id)
    events = await asyncio.wait_for(watching, 60)

    assert types(events) == [
        "run.started",
        "stage.entered",
        "model.tokens",
        "model.called",
        "stage.entered",
        "approval.requested",
        "approval.decided",
        "stage.entered",
        "run.completed",
    ]
    assert set(types(events)) <= live_script_events()  # the web pages refresh on each
    assert offsets(events) == list(range(len(events))), "every id once, in order"
    called = events[3].data
    assert called["model"] == "claude-sonnet-5-5"
    assert called["input_tokens"] > 0
    assert called["output_tokens"] > 0
    assert called["cost_usd"] > 0
    assert called["cache_hit"] is False
    assert events[2].data["text"] == called["content"], "the streamed text is the reply"
    assert events[2].data["reset"] is True
    assert events[5].data["proposal"] == {"summary": called["content"]}
    assert events[6].data["decision"] == "approve"
    assert events[6].body["actor"] == "approver"
    assert events[8].data["output"]["summary"] == called["content"]
    assert [e.data["stage"] for e in events if e.event == "stage.entered"] == [
        "model_call",
        "review",
        "completed",
    ]
    await record_history(client.get_workflow_handle(f"{tenant.id}:{run_id}"), "summarize_watched")


async def test_each_viewer_sees_what_the_ledger_shows_them(
    served: LiveApi, worker: list[Worker], tenant: Tenant
) -> None:
    run_id = await approved_run(served, tenant)

    by_user = {
        user: await read_events(served.http, path_of(run_id), tenant.auth(user))
        for user in ("requester", "approver", "admin")
    }

    def first(user: str, kind: str) -> dict[str, Any]:
        return next(e.data for e in by_user[user] if e.event == kind)

    # Content is masked unless the viewer holds audit:read_sensitive (admin), as in the ledger.
    assert first("requester", "model.called")["content"] == "[masked]"
    assert first("requester", "run.completed")["output"] == "[masked]"
    assert first("admin", "run.completed")["output"]["summary"].startswith("Summary:")
    # The approval's proposal, as in each one's inbox: in full to those who may decide it.
    assert first("requester", "approval.requested")["proposal"] == "[masked]"
    assert first("approver", "approval.requested")["proposal"]["summary"].startswith("Summary:")
    assert first("approver", "model.called")["content"] == "[masked]"
    # Streamed tokens are content: only a viewer who may read content gets them.
    assert "model.tokens" not in types(by_user["requester"])
    assert "model.tokens" in types(by_user["admin"])
    # Facts are for everyone: the model, its tokens and cost, each decision.
    for user in by_user:
        called = first(user, "model.called")
        assert called["model"] == "claude-sonnet-5-5"
        assert called["cost_nusd"] > 0
    ledger = (
        await served.http.get(f"/v1/runs/{run_id}/ledger", headers=tenant.auth("requester"))
    ).json()
    approval = next(i for i in ledger["items"] if i["kind"] == "approval")
    assert approval["proposal"] == first("requester", "approval.requested")["proposal"]
    assert approval["decisions"][0]["comment"] == first("requester", "approval.decided")["comment"]


async def test_resuming_after_an_id_misses_nothing_and_repeats_nothing(
    served: LiveApi, worker: list[Worker], tenant: Tenant
) -> None:
    run_id = await start_run(served.http, tenant, SUMMARIZE)
    headers = tenant.auth("admin")
    first = await read_events(served.http, path_of(run_id), headers, until="approval.requested")
    await decide_pending(served.http, tenant, run_id)
    rest = await read_events(
        served.http, path_of(run_id), {**headers, "Last-Event-ID": first[-1].id}
    )
    whole = await read_events(served.http, path_of(run_id), headers)

    assert [e.body for e in first + rest] == [e.body for e in whole]
    assert len({e.id for e in whole}) == len(whole)
    # The same through the query parameter, for a first connection that wants to resume.
    after = await read_events(served.http, f"{path_of(run_id)}?after={first[1].id}", headers)
    assert [e.body for e in after] == [e.body for e in whole[2:]]


async def test_a_closed_run_replays_its_events_then_says_there_is_no_more(
    served: LiveApi, worker: list[Worker], tenant: Tenant
) -> None:
    run_id = await approved_run(served, tenant)
    headers = tenant.auth("requester")

    replayed = await read_events(served.http, path_of(run_id), headers)
    assert replayed[0].event == "run.started"
    assert replayed[-1].event == "run.completed"
    # A browser's EventSource reconnects after the stream ends; 204 makes it stop.
    again = await served.http.get(
        path_of(run_id), headers={**headers, "Last-Event-ID": replayed[-1].id}
    )
    assert again.status_code == 204
    assert again.content == b""
    # One before the last still gets the last.
    tail = await read_events(
        served.http, path_of(run_id), {**headers, "Last-Event-ID": replayed[-2].id}
    )
    assert [e.body for e in tail] == [replayed[-1].body]


async def test_only_those_who_may_read_the_run_watch_it(
    served: LiveApi, worker: list[Worker], tenant: Tenant, make_tenant: TenantFactory
) -> None:
    run_id = await approved_run(served, tenant)
    other = await make_tenant()

    elsewhere = await served.http.get(path_of(run_id), headers=other.auth("admin"))
    missing = await served.http.get(path_of("r_" + "a" * 26), headers=tenant.auth("admin"))
    assert elsewhere.status_code == 404
    assert missing.status_code == 404
    assert elsewhere.json() == missing.json()
    assert (await served.http.get(path_of(run_id))).status_code == 401
    forged = await served.http.get(
        path_of(run_id), headers={**tenant.auth("admin"), "Last-Event-ID": "not-an-id"}
    )
    assert forged.status_code == 422
    assert forged.json()["code"] == "invalid"


async def test_a_caller_without_runs_read_is_refused(
    served: LiveApi, worker: list[Worker], make_tenant: TenantFactory
) -> None:
    tenant = await make_tenant({"requester": ["requester"], "approver": ["approver"], "x": []})
    run_id = await start_run(served.http, tenant, SUMMARIZE)
    refused = await served.http.get(path_of(run_id), headers=tenant.auth("x"))
    assert refused.status_code == 403
    assert "runs:read" in refused.json()["detail"]
    await decide_pending(served.http, tenant, run_id)


async def test_viewers_of_one_run_share_one_subscription_and_see_the_same(
    served: LiveApi, worker: list[Worker], tenant: Tenant, client: Client
) -> None:
    run_id = await start_run(served.http, tenant, SUMMARIZE)
    headers = tenant.auth("admin")
    viewers = [
        asyncio.create_task(read_events(served.http, path_of(run_id), headers)) for _ in range(3)
    ]

    async def following() -> int:
        streams = getattr(served.app.state, "run_streams", None)
        return streams.following if isinstance(streams, RunStreams) else 0

    await eventually(following, lambda n: n == 1)
    await decide_pending(served.http, tenant, run_id)
    seen = await asyncio.wait_for(asyncio.gather(*viewers), 60)

    assert [e.body for e in seen[0]] == [e.body for e in seen[1]] == [e.body for e in seen[2]]
    await eventually(following, lambda n: n == 0)
    # Three viewers, one follower: the run's history holds the polls of one.
    polls = [
        e
        async for e in client.get_workflow_handle(f"{tenant.id}:{run_id}").fetch_history_events()
        if e.HasField("workflow_execution_update_accepted_event_attributes")
        and e.workflow_execution_update_accepted_event_attributes.accepted_request.input.name
        == "__temporal_workflow_stream_poll"
    ]
    assert 1 <= len(polls) <= len(seen[0])


async def test_a_step_streamed_again_after_a_retry_ends_with_one_final_text(
    served: LiveApi, worker: list[Worker], tenant: Tenant, sim: SimControl, client: Client
) -> None:
    # Both models of the route break off mid-stream: the first attempt fails, Temporal retries.
    await sim.fault(529, count=2, after_chunks=2)
    text = "Quarterly revenue grew by twelve percent while costs fell three percent overall."
    run_id = await start_run(
        served.http, tenant, {"pipeline": "summarize", "input": {"text": text, "review": False}}
    )
    events = await read_events(served.http, path_of(run_id), tenant.auth("admin"))

    tokens = [e.data for e in events if e.event == "model.tokens"]
    tries = [(t["attempt"], t["model"]) for t in tokens if t["reset"]]
    assert tries == [(1, "claude-sonnet-5-5"), (1, "claude-haiku-5-5"), (2, "claude-sonnet-5-5")]
    finals = [e.data for e in events if e.event == "model.called"]
    assert len(finals) == 1
    assert finals[0]["attempt"] == 2
    last_try = [t["text"] for t in tokens if t["attempt"] == 2]
    assert "".join(last_try) == finals[0]["content"]
    assert types(events).index("model.called") > max(
        i for i, e in enumerate(events) if e.event == "model.tokens"
    )
    await record_history(
        client.get_workflow_handle(f"{tenant.id}:{run_id}"), "summarize_restreamed"
    )


def test_tokens_of_an_attempt_or_call_already_replaced_are_dropped() -> None:
    viewer = Viewer(default_redactor(), Principal("t", "u", "user", ("admin",)), sensitive=True)

    def tokens(offset: int, call: int, attempt: int, text: str) -> StreamedItem:
        data = {"call": call, "attempt": attempt, "text": text, "reset": False}
        return StreamedItem(offset, TOKENS_TOPIC, {"action": "model.tokens", "data": data})

    final = StreamedItem(
        3, RUN_TOPIC, {"action": "model.called", "data": {"call": 1, "content": "final"}}
    )
    shown = [
        viewer.see(item)
        for item in (
            tokens(0, 1, 2, "second attempt"),
            tokens(1, 1, 1, "a late first attempt"),  # a zombie attempt's last batch
            tokens(2, 2, 1, "another call"),
            final,
            tokens(4, 1, 2, "after the final text"),
        )
    ]
    assert [s["text"] if s and "text" in s else s for s in shown[:3]] == [
        "second attempt",
        None,
        "another call",
    ]
    assert shown[3] == {"call": 1, "content": "final"}
    assert shown[4] is None


async def test_tool_calls_stream_with_their_permission_decisions(
    served: LiveApi, worker: list[Worker], tenant: Tenant, pool: Pool
) -> None:
    async with pool.acquire() as conn:
        await support_desk.upsert_customer(
            conn, tenant.id, "cus_1", "Jane Doe", "jane@initech.test", plan="pro"
        )
    hints = (
        "amount: 40\nreason: charged twice\nsubject: About your refund\n"
        "body: We refunded the duplicate charge.\nsend_email.to: jane@initech.test"
    )
    run_id = await start_run(
        served.http,
        tenant,
        {
            "pipeline": "support-agent",
            "input": {
                "ticket_id": "T-1",
                "customer_id": "cus_1",
                "subject": "Double charge",
                "body": f"I was charged twice.\n{hints}",
            },
        },
    )
    watching = asyncio.create_task(read_events(served.http, path_of(run_id), tenant.auth("admin")))
    await decide_pending(served.http, tenant, run_id, user="finance")
    events = await asyncio.wait_for(watching, 60)

    calls = [(e.data["tool"], e.data["status"]) for e in events if e.event == "tool.called"]
    assert ("issue_refund", "needs_approval") in calls
    assert ("issue_refund", "executed") in calls
    refund = next(e.data for e in events if e.event == "tool.called" and e.data["rule"])
    assert refund["arguments"]["customer_id"] == "cus_1"
    assert types(events)[-1] == "run.completed"
    # The web pages refresh on every one of these (a name they do not know, they ignore).
    assert set(types(events)) <= live_script_events()


async def test_a_document_ingest_streams_its_progress(
    served: LiveApi, worker: list[Worker], tenant: Tenant
) -> None:
    text = " ".join(f"word{i}" for i in range(1200))
    uploaded = await served.http.post(
        "/v1/documents", json={"title": "Long", "text": text}, headers=tenant.auth("requester")
    )
    assert uploaded.status_code in (200, 201, 202), uploaded.text
    run_id = uploaded.json()["run_id"]
    events = await read_events(served.http, path_of(run_id), tenant.auth("requester"))

    progress = [e.data for e in events if e.event == "run.progress"]
    assert progress, types(events)
    assert types(events)[-1] == "run.completed"


@workflow.defn(name="not-a-pipeline", sandboxed=False)
class NotAPipeline:
    """A workflow without live events, under a run's id: what a run started before they
    existed looks like to the API."""

    @workflow.run
    async def run(self) -> None:
        await workflow.wait_condition(lambda: False, timeout=timedelta(minutes=5))


async def test_a_run_without_live_events_is_a_conflict(
    served: LiveApi, tenant: Tenant, client: Client, test_settings: Settings
) -> None:
    run_id = "r_" + base64.b32encode(os.urandom(20)).decode().lower()[:26]
    async with Worker(
        client, task_queue=f"{test_settings.task_queue}-old", workflows=[NotAPipeline]
    ):
        handle = await client.start_workflow(
            NotAPipeline.run,
            id=f"{tenant.id}:{run_id}",
            task_queue=f"{test_settings.task_queue}-old",
            search_attributes=TypedSearchAttributes(
                [SearchAttributePair(search.CUSTOMER, tenant.id)]
            ),
        )
        try:
            refused = await served.http.get(path_of(run_id), headers=tenant.auth("admin"))
        finally:
            await handle.terminate()
    assert refused.status_code == 409
    assert refused.json()["code"] == "no_live_events"
