"""Live events as Server-Sent Events: one run's (`/v1/runs/{id}/events`, stead.service.run_events)
and the tenant's feed of approvals and run endings (`/v1/events`, stead.service.feed).

Both authenticate through `CurrentPrincipal` only, so whatever authenticates a request there
(an API key, a browser's session) opens a stream, and both resume from `Last-Event-ID` (or the
`after` parameter, for a first connection that wants to resume). Idle streams get a comment
line every 15 seconds, which keeps proxies from closing them.
"""

from __future__ import annotations

from collections.abc import AsyncIterable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.sse import EventSourceResponse, ServerSentEvent
from starlette.exceptions import HTTPException as StarletteHTTPException

from stead.api.deps import CurrentPrincipal, ServicesDep
from stead.service import feed, run_events
from stead.service.feed import FeedEvent, OpenedFeed
from stead.service.run_events import NothingMore, OpenedRunEvents, RunEvent, RunStreams

router = APIRouter(tags=["events"])

LastEventId = Annotated[
    str | None,
    Header(alias="Last-Event-ID", max_length=64, description="resume after this event"),
]
After = Annotated[
    str | None,
    Query(max_length=64, description="resume after this event id (when no Last-Event-ID)"),
]


def _stream_of(model: type[Any], what: str) -> dict[int | str, dict[str, Any]]:
    return {
        200: {
            "description": f"Server-Sent Events: `event:` the type, `id:` the id, `data:` {what}"
            f" as JSON ({model.__name__})",
            "content": {"text/event-stream": {"schema": model.model_json_schema()}},
        }
    }


def run_streams(request: Request) -> RunStreams:
    """The runs this API process follows (one subscription per run, shared by viewers)."""
    streams = getattr(request.app.state, "run_streams", None)
    if not isinstance(streams, RunStreams):
        streams = RunStreams(request.app.state.services.temporal)
        request.app.state.run_streams = streams
    return streams


async def _opened_run(
    run_id: str,
    svc: ServicesDep,
    principal: CurrentPrincipal,
    streams: Annotated[RunStreams, Depends(run_streams)],
    last_event_id: LastEventId = None,
    after: After = None,
) -> OpenedRunEvents:
    resume = last_event_id or after
    try:
        return await run_events.open_run_events(svc, principal, run_id, resume, streams)
    except NothingMore:
        # 204 makes a browser's EventSource stop reconnecting to a stream that is over.
        raise StarletteHTTPException(status_code=204) from None


@router.get(
    "/v1/runs/{run_id}/events",
    response_class=EventSourceResponse,
    responses={
        **_stream_of(RunEvent, "the event"),
        204: {"description": "The run is closed and every event was sent"},
    },
)
async def watch_run(
    opened: Annotated[OpenedRunEvents, Depends(_opened_run)],
    streams: Annotated[RunStreams, Depends(run_streams)],
) -> AsyncIterable[ServerSentEvent]:
    """The run's live events: stages, model calls (model, tokens, cost, cache hit), tool calls
    and their permission decisions, approvals requested and decided, progress, streamed tokens
    of the steps that stream, and the result or error. Redacted for the caller as the ledger
    is. A closed run's events are replayed, then the stream ends."""
    async for event in run_events.run_events(streams, opened):
        yield ServerSentEvent(data=event, event=event.type, id=event.id)


async def _opened_feed(
    svc: ServicesDep,
    principal: CurrentPrincipal,
    last_event_id: LastEventId = None,
    after: After = None,
) -> OpenedFeed:
    return await feed.open_feed(svc, principal, last_event_id or after)


@router.get(
    "/v1/events", response_class=EventSourceResponse, responses=_stream_of(FeedEvent, "the entry")
)
async def tenant_feed(
    opened: Annotated[OpenedFeed, Depends(_opened_feed)], svc: ServicesDep
) -> AsyncIterable[ServerSentEvent]:
    """The tenant's approvals requested, escalated, expired and decided (with
    `approvals:read`) and runs completed, failed or cancelled (with `runs:read`), from now on,
    or after the given id. For a live inbox; ids are the audit log's sequence numbers."""
    async for event in feed.feed_events(svc, opened):
        yield ServerSentEvent(data=event, event=event.type, id=event.id)
