"""A run's live events for a viewer: `GET /v1/runs/{id}/events` and the client's `events()`.

The run publishes them to the stream its workflow hosts (`stead.pipeline.events`). Each API
process follows a run's stream once, however many viewers it has (`RunStreams`): every
follower would otherwise be a long-poll update of its own in the run's history and a workflow
task for the worker, per batch of events. A viewer reads the shared log from its own position.

- **Authorized like the run**: `runs:read`, and the run must be in the caller's tenant (another
  tenant's run is a 404, like a missing one).
- **Redacted like the ledger**: each event's data goes through the tenant's redaction (the file
  policy plus its own fields) for this viewer: masked fields (replies, arguments, proposals,
  the output) read "[masked]" unless the viewer holds `audit:read_sensitive`, and an approval's
  proposal is shown to those who may decide it, as in their inbox. Streamed tokens are content
  through and through: only viewers who may read content get them.
- **Resumable**: an event's id is `<offset>@<execution>`; `Last-Event-ID` resumes after it,
  with nothing missed or repeated. A re-driven run (`retry` with `mode: resume`) is a new
  execution whose log is rebuilt from its history: an id of the old execution starts the new
  one's events from the beginning, after a `stream.restarted` event.
- **Finite for a closed run**: it replays the log and ends; asked again after its last event,
  the answer is 204, which tells a browser's `EventSource` to stop reconnecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, Field
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowQueryFailedError,
)
from temporalio.contrib.workflow_streams import WorkflowStreamClient
from temporalio.service import RPCError

from stead.pipeline.events import TOKENS_TOPIC
from stead.policy.redaction import Redactor
from stead.service.access import Services, require
from stead.service.errors import Conflict, Invalid, Unavailable
from stead.service.proposals import proposal_viewer
from stead.service.runs import _task_failing, describe_run, run_status
from stead.store.principals import Principal

log = logging.getLogger("stead.service.run_events")
TERMINAL = frozenset({"run.completed", "run.failed", "run.cancelled"})
EVENT_ID = re.compile(r"^(\d{1,9})@([0-9a-f]{8})$")
# How often a caught-up follower polls again at most: each poll is an update in the run's
# history, so this bounds what one run's followers add to it.
POLL_COOLDOWN = timedelta(milliseconds=100)
_QUERY_SECONDS = 10.0


class RunEvent(BaseModel):
    """One event of a run, as a viewer sees it (the `data:` of each Server-Sent Event)."""

    id: str | None = Field(
        description="`<offset>@<execution>`, to resume after (`Last-Event-ID`); null for the "
        "stream's own notices (`stream.restarted`, `stream.error`, `run.ended`)"
    )
    run_id: str
    type: str = Field(
        description="the audit action (`run.started`, `stage.entered`, `approval.requested`, "
        "`approval.decided`, `run.completed`, ...), or `model.called`, `model.tokens`, "
        "`tool.called`, `run.progress`"
    )
    at: datetime
    actor: str
    data: dict[str, Any]


class NothingMore(Exception):  # not an error: the answer is 204, no content
    """A closed run's stream asked for after its last event: there is nothing to send."""


@dataclass
class StreamedItem:
    offset: int
    topic: str
    event: dict[str, Any]


class SharedStream:
    """One run's log as far as it has been read, growing while the run goes on."""

    def __init__(self, client: Client, workflow_id: str) -> None:
        self.items: list[StreamedItem] = []
        self.done = False
        self.error: str | None = None
        self.followers = 0
        self._client = client
        self._workflow_id = workflow_id
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._pump())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def read(self, start: int = 0) -> AsyncIterator[StreamedItem]:
        """Every item from index `start`, waiting for more until the stream is done."""
        index = start
        while True:
            while index < len(self.items):
                yield self.items[index]
                index += 1
            if self.done:
                return
            wake = self._wake
            await wake.wait()

    async def _pump(self) -> None:
        stream = WorkflowStreamClient.create(self._client, self._workflow_id)
        try:
            async for item in stream.subscribe(result_type=dict, poll_cooldown=POLL_COOLDOWN):
                self.items.append(StreamedItem(item.offset, item.topic, item.data))
                self._notify()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the viewers are told; they reconnect with their last id
            log.warning("following %s failed: %s", self._workflow_id, type(exc).__name__)
            self.error = f"the run's events could not be read ({type(exc).__name__}); reconnect"
        finally:
            self.done = True
            self._notify()

    def _notify(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()


class RunStreams:
    """The runs this process follows, each once, for as long as someone watches it."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._streams: dict[str, SharedStream] = {}
        self._lengths: dict[str, asyncio.Task[int]] = {}

    @property
    def following(self) -> int:
        return len(self._streams)

    def follows(self, workflow_id: str) -> bool:
        shared = self._streams.get(workflow_id)
        return shared is not None and not shared.done

    async def log_length(self, handle: WorkflowHandle[Any, Any]) -> int:
        """The run's log length (a query the worker answers), asked once for viewers who
        open the run's stream at the same time: ten viewers arriving together cost the
        worker ten query tasks otherwise (measured in bench/events.py)."""
        task = self._lengths.get(handle.id)
        if task is None:
            task = asyncio.create_task(_log_length(handle))
            self._lengths[handle.id] = task
            task.add_done_callback(lambda _: self._lengths.pop(handle.id, None))
        return await asyncio.shield(task)

    @contextlib.asynccontextmanager
    async def follow(self, workflow_id: str) -> AsyncIterator[SharedStream]:
        shared = self._streams.get(workflow_id)
        if shared is None or (shared.done and shared.error is not None):
            shared = SharedStream(self._client, workflow_id)
            self._streams[workflow_id] = shared
            shared.start()
        shared.followers += 1
        try:
            yield shared
        finally:
            shared.followers -= 1
            if shared.followers == 0 and self._streams.get(workflow_id) is shared:
                del self._streams[workflow_id]
                await shared.stop()


@dataclass
class Viewer:
    """What one caller may see of a run's events, and which streamed tokens are stale."""

    redactor: Redactor
    principal: Principal
    sensitive: bool
    final_calls: set[int] = field(default_factory=set)
    attempts: dict[int, int] = field(default_factory=dict)
    ended: bool = False

    def see(self, item: StreamedItem) -> dict[str, Any] | None:
        """The event's data for this viewer, or None when they get nothing of it. Every item
        of the log passes here in order, shown or not, so what is stale is known."""
        action = str(item.event.get("action", ""))
        data = item.event.get("data")
        data = dict(data) if isinstance(data, dict) else {}
        if item.topic == TOKENS_TOPIC:
            return self._tokens(data)
        if action == "model.called" and isinstance(data.get("call"), int):
            self.final_calls.add(data["call"])
        self.ended = self.ended or action in TERMINAL
        reveal = self.sensitive or (action == "approval.requested" and self._decides(data))
        return self.redactor.view(data, reveal_masked=reveal)

    def _tokens(self, data: dict[str, Any]) -> dict[str, Any] | None:
        call, attempt = data.get("call"), data.get("attempt")
        if not isinstance(call, int) or not isinstance(attempt, int):
            return None
        # A later attempt's text replaces an earlier one's; a call's final text replaces all.
        if call in self.final_calls or attempt < self.attempts.get(call, 0):
            return None
        self.attempts[call] = attempt
        if not self.sensitive:
            return None
        return self.redactor.view(data, reveal_masked=True)

    def _decides(self, data: dict[str, Any]) -> bool:
        roles = [r for r in data.get("roles") or [] if isinstance(r, str)]
        named = data.get("principals") or []
        return self.principal.id in named or self.principal.has_role(*roles)


@dataclass
class OpenedRunEvents:
    """A viewer's stream of one run, authorized and positioned, before anything is sent."""

    run_id: str
    handle: WorkflowHandle[Any, Any]
    execution: str
    start: int
    restarted: bool
    viewer: Viewer


def execution_tag(temporal_run_id: str) -> str:
    """Which execution of the run an id belongs to (the end of its Temporal run id)."""
    return temporal_run_id.replace("-", "")[-8:].lower()


async def open_run_events(
    svc: Services,
    principal: Principal,
    run_id: str,
    last_event_id: str | None,
    streams: RunStreams | None = None,
) -> OpenedRunEvents:
    """Check the caller may watch the run and where to start; raise before streaming."""
    require(svc, principal, "runs:read")
    handle, described = await describe_run(svc, principal, run_id)
    if _task_failing(described):
        raise Conflict(
            "the run is stuck (its workflow task keeps failing) and publishes nothing;"
            f" GET /v1/runs/{run_id} says why",
            code="run_stuck",
        )
    execution = execution_tag(described.run_id or "")
    start, restarted = 0, False
    if last_event_id:
        match = EVENT_ID.match(last_event_id.strip())
        if match is None:
            raise Invalid("Last-Event-ID is not an event id this API sent")
        if match[2] == execution:
            start = int(match[1]) + 1
        else:
            restarted = True
    closed = described.status is not WorkflowExecutionStatus.RUNNING
    if streams is None or closed or not streams.follows(handle.id):
        # A run this process follows has live events, and while it runs, where its log ends
        # does not matter here: no query then.
        total = await (streams.log_length(handle) if streams else _log_length(handle))
        if closed and start >= total and not restarted:
            raise NothingMore("the run is closed and every event was sent")
    async with svc.pool.acquire() as conn:
        proposals = await proposal_viewer(svc, conn, principal)
    viewer = Viewer(proposals.redactor, principal, proposals.sensitive)
    return OpenedRunEvents(run_id, handle, execution, start, restarted, viewer)


async def _log_length(handle: WorkflowHandle[Any, Any]) -> int:
    try:
        async with asyncio.timeout(_QUERY_SECONDS):
            return await WorkflowStreamClient(handle).get_offset()
    except WorkflowQueryFailedError:
        raise Conflict(
            "this run started before runs had live events; read GET /v1/runs/{id}/ledger",
            code="no_live_events",
        ) from None
    except (TimeoutError, RPCError) as exc:
        log.warning("offset query of %s failed: %r", handle.id, exc)
        raise Unavailable("the run's worker did not answer; is a worker running?") from None


async def run_events(streams: RunStreams, opened: OpenedRunEvents) -> AsyncIterator[RunEvent]:
    """The viewer's events from its position on; ends when the run has closed."""
    viewer = opened.viewer
    if opened.restarted:
        yield _notice(opened, "stream.restarted", {"reason": "the run was re-driven"})
    async with streams.follow(opened.handle.id) as shared:
        async for item in shared.read():
            data = viewer.see(item)
            if data is None or item.offset < opened.start:
                continue
            yield RunEvent(
                id=f"{item.offset}@{opened.execution}",
                run_id=opened.run_id,
                type=str(item.event.get("action", "")),
                at=item.event.get("at") or datetime.now(UTC),
                actor=str(item.event.get("actor", "")),
                data=data,
            )
        error = shared.error
    if error is not None:
        yield _notice(opened, "stream.error", {"detail": error})
    elif not viewer.ended:
        # Closed without its own last word: terminated through Temporal, or timed out.
        described = await opened.handle.describe()
        yield _notice(opened, "run.ended", {"status": run_status(described.status).value})


def _notice(opened: OpenedRunEvents, kind: str, data: dict[str, Any]) -> RunEvent:
    return RunEvent(
        id=None, run_id=opened.run_id, type=kind, at=datetime.now(UTC), actor="stead", data=data
    )
