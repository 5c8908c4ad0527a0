"""`stead.client` against the real API on a loopback server (and, for faults, through a
loopback proxy that fails requests and cuts streams as a bad network would)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field

import httpx
import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from temporalio.worker import Worker

from stead.client import (
    AsyncClient,
    Client,
    Forbidden,
    Invalid,
    NotFound,
    RunFailed,
    Unavailable,
    WaitTimeout,
)
from tests.conftest import Tenant
from tests.events_support import LiveApi, served
from tests.servers import serve_app
from workflows.inputs import SummarizeInput, Summary
from workflows.summarize import SummarizeWorkflow

__all__ = ["served"]  # the fixture, used by name

TEXT = "Revenue grew 12% in Q3. Costs fell 3%."


@asynccontextmanager
async def as_user(served: LiveApi, tenant: Tenant, user: str) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(served.url, tenant.keys[user], backoff=0.01) as client:
        yield client


async def approve_when_asked(approver: AsyncClient, run_id: str) -> None:
    async with aclosing(approver.events(run_id)) as events:
        async for event in events:
            if event.type == "approval.requested":
                break
    inbox = await approver.approvals()
    (mine,) = [a for a in inbox.items if a.run_id == run_id]
    decided = await approver.decide(mine.approval_id, "approve", comment="fine")
    assert decided.status == "approved"


async def test_a_typed_run_is_started_watched_approved_and_waited_for(
    served: LiveApi, worker: list[Worker], tenant: Tenant
) -> None:
    key = f"doc-{uuid.uuid4().hex[:8]}"
    async with (
        as_user(served, tenant, "requester") as requester,
        as_user(served, tenant, "approver") as approver,
    ):
        run = await requester.start(SummarizeWorkflow, SummarizeInput(text=TEXT), key=key)
        again = await requester.start(SummarizeWorkflow, SummarizeInput(text=TEXT), key=key)
        assert (again.run_id, again.created, run.created) == (run.run_id, False, True)

        await approve_when_asked(approver, run.run_id)
        summary = await requester.wait(run, timeout=60)
        seen = [e.type async for e in requester.events(run.run_id)]

    assert isinstance(summary, Summary)
    assert summary.summary.startswith("Summary:")
    assert summary.approval == "approved"
    assert seen[0] == "run.started"
    assert "approval.decided" in seen
    assert seen[-1] == "run.completed"


async def test_errors_carry_the_apis_detail_and_code(
    served: LiveApi, worker: list[Worker], tenant: Tenant
) -> None:
    async with (
        as_user(served, tenant, "requester") as requester,
        as_user(served, tenant, "approver") as approver,
    ):
        with pytest.raises(NotFound) as missing:
            await requester.get("r_" + "a" * 26)
        with pytest.raises(Invalid) as invalid:
            await requester.start("summarize", {"txt": TEXT})
        with pytest.raises(Forbidden) as refused:
            await approver.start("summarize", {"text": TEXT})
    assert missing.value.status == 404
    assert missing.value.code == "not_found"
    assert "input.text" in str(invalid.value.detail)
    assert refused.value.code == "forbidden"


async def test_waiting_gives_up_at_its_timeout_and_a_cancelled_run_fails_the_wait(
    served: LiveApi, worker: list[Worker], tenant: Tenant
) -> None:
    async with as_user(served, tenant, "requester") as requester:
        run = await requester.start("summarize", {"text": TEXT})
        with pytest.raises(WaitTimeout):
            await requester.wait(run, timeout=0.5)
        await requester.cancel(run.run_id)
        with pytest.raises(RunFailed) as failed:
            await requester.wait(run, timeout=60)
        listed = await requester.list(status="cancelled", pipeline="summarize")
    assert failed.value.run.status == "cancelled"
    assert run.run_id in [r.run_id for r in listed.items]


async def test_the_sync_facade_makes_the_same_calls(
    served: LiveApi, worker: list[Worker], tenant: Tenant
) -> None:
    def script() -> tuple[list[str], dict[str, str], list[str]]:
        with Client(served.url, tenant.keys["requester"]) as requester:
            catalog = requester.pipelines()
            run = requester.start("summarize", {"text": TEXT, "review": False})
            output = requester.wait(run, timeout=60)
            events = [e.type for e in requester.events(run.run_id)]
        return [p.name for p in catalog.pipelines], output, events

    # In a thread, as a script would: the facade runs its own event loop, and this test's
    # loop keeps serving the API and the worker meanwhile.
    names, output, events = await asyncio.to_thread(script)
    assert "summarize" in names
    assert output["summary"].startswith("Summary:")
    assert events[-1] == "run.completed"


@dataclass
class Faults:
    """What the proxy breaks: the first `refuse` requests get a 503; the first stream is cut
    after `cut_after` events; with `pings`, a keep-alive comment follows every event (as the
    API sends one after 15 idle seconds)."""

    refuse: int = 0
    cut_after: int | None = None
    pings: bool = False
    requests: list[str] = field(default_factory=list)
    resumed_from: list[str | None] = field(default_factory=list)


@asynccontextmanager
async def faulty_proxy(upstream: str, faults: Faults) -> AsyncIterator[str]:
    http = httpx.AsyncClient(base_url=upstream, timeout=None)

    async def forward(request: Request) -> Response:
        faults.requests.append(f"{request.method} {request.url.path}")
        if len(faults.requests) <= faults.refuse:
            return Response('{"detail": "busy", "code": "unavailable"}', status_code=503)
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        sent = http.build_request(
            request.method,
            request.url.path,
            params=request.query_params,
            headers=headers,
            content=await request.body(),
        )
        answer = await http.send(sent, stream=True)
        if request.url.path.endswith("/events"):
            faults.resumed_from.append(request.headers.get("last-event-id"))
        cut, faults.cut_after = faults.cut_after, None
        return StreamingResponse(
            relay(answer, cut),
            status_code=answer.status_code,
            headers={k: v for k, v in answer.headers.items() if k.lower() != "content-length"},
            background=BackgroundTask(answer.aclose),
        )

    async def relay(answer: httpx.Response, cut: int | None) -> AsyncIterator[bytes]:
        sent = 0
        async for line in answer.aiter_lines():
            yield (line + "\n").encode()
            sent += line == ""
            if line == "" and faults.pings:
                yield b": ping\n\n"
            if cut is not None and sent >= cut:
                raise ConnectionResetError("the proxy cuts the stream")

    app = Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST"])])
    try:
        async with serve_app(app) as url:
            yield url
    finally:
        await http.aclose()


async def ids_direct_and_through(
    served: LiveApi, tenant: Tenant, faults: Faults
) -> tuple[list[str | None], list[str | None]]:
    """A finished run's event ids read directly, and read through the faulty proxy."""
    async with as_user(served, tenant, "requester") as requester:
        run = await requester.start("summarize", {"text": TEXT, "review": False})
        await requester.wait(run, timeout=60)
        whole = [e.id async for e in requester.events(run.run_id)]
    async with (
        faulty_proxy(served.url, faults) as url,
        AsyncClient(url, tenant.keys["requester"], backoff=0.01) as through,
    ):
        return whole, [e.id async for e in through.events(run.run_id)]


async def test_a_cut_stream_resumes_after_the_last_event_without_loss_or_repeat(
    served: LiveApi, worker: list[Worker], tenant: Tenant
) -> None:
    faults = Faults(cut_after=3)
    whole, resumed = await ids_direct_and_through(served, tenant, faults)
    assert resumed == whole
    assert faults.resumed_from[:2] == [None, whole[2]]


async def test_keep_alive_comments_are_not_events(
    served: LiveApi, worker: list[Worker], tenant: Tenant
) -> None:
    whole, pinged = await ids_direct_and_through(served, tenant, Faults(pings=True))
    assert pinged == whole


async def test_safe_requests_are_retried_through_a_503_and_unsafe_ones_are_not(
    served: LiveApi, worker: list[Worker], tenant: Tenant
) -> None:
    faults = Faults(refuse=2)
    async with (
        faulty_proxy(served.url, faults) as url,
        AsyncClient(url, tenant.keys["requester"], backoff=0.01) as through,
    ):
        catalog = await through.pipelines()  # a GET: retried twice, then answered
        assert catalog.pipelines
        # The next two requests are refused: a start without a key (sent once, so it fails)
        # and the first try of one with a key (retried, so it starts).
        faults.refuse = len(faults.requests) + 2
        with pytest.raises(Unavailable):
            await through.start("summarize", {"text": TEXT})
        keyed = await through.start(
            "summarize", {"text": TEXT, "review": False}, key=uuid.uuid4().hex
        )
    assert faults.requests.count("GET /v1/pipelines") == 3
    assert faults.requests.count("POST /v1/runs") == 3
    assert keyed.created
