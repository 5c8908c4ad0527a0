"""A run's live events: what `GET /v1/runs/{id}/events` streams while the run goes on.

The run hosts them in a `temporalio.contrib.workflow_streams.WorkflowStream`, an append-only
log kept in workflow state: the workflow appends its own events (no history event, no command:
a replay rebuilds the log exactly), subscribers long-poll it with an update from an offset, and
a closed run's log is read with a query. An event's offset is its id, so a subscriber that
reconnects with the last offset it saw misses nothing and sees nothing twice.

Two topics:

- `run`, written by the workflow: every audit event the run records itself (`run.started`,
  `stage.entered`, `approval.*`, `run.completed`, ...) with the same data, plus
  `model.called`, `tool.called` and `run.progress`;
- `tokens`, written by the model activity of a step whose pipeline streams it
  (`stream_steps=`): batches of the reply's text as it arrives (`stead.gateway.streaming`).

Content (replies, tool arguments and results, proposals, the output) is in the events as the
audit log holds it before redaction; the API redacts it for each viewer as the ledger does.
"""

from __future__ import annotations

from typing import Any

from temporalio import workflow
from temporalio.contrib.workflow_streams import WorkflowStream, WorkflowTopicHandle

# Runs started before live events existed have no stream; the patch keeps their replays as
# they were.
EVENTS_PATCH = "run-events"
RUN_TOPIC = "run"
TOKENS_TOPIC = "tokens"
# Text in an event is cut here: the log lives in the worker's memory for the run's lifetime,
# and the full text is in the run's result and ledger anyway.
MAX_EVENT_TEXT = 8_000


def event(action: str, data: dict[str, Any], *, actor: str, at: str) -> dict[str, Any]:
    """One event as the stream carries it (both topics)."""
    return {"action": action, "at": at, "actor": actor, "data": data}


def bounded(text: str) -> tuple[str, bool]:
    """`text` within MAX_EVENT_TEXT, and whether it was cut."""
    if len(text) <= MAX_EVENT_TEXT:
        return text, False
    return text[:MAX_EVENT_TEXT], True


class RunEvents:
    """The run's side of its event stream; does nothing for a run without one."""

    def __init__(self, stream: WorkflowStream | None) -> None:
        self._stream = stream
        self._topic: WorkflowTopicHandle[dict[str, Any]] | None = (
            stream.topic(RUN_TOPIC, type=dict) if stream is not None else None
        )

    @property
    def enabled(self) -> bool:
        return self._stream is not None

    def publish(self, action: str, data: dict[str, Any], *, actor: str) -> None:
        if self._topic is not None:
            self._topic.publish(event(action, data, actor=actor, at=workflow.now().isoformat()))

    def detach(self) -> None:
        """The run has published its last event: release subscribers waiting for more (they
        read the rest, then find the run closed), refuse new waits."""
        if self._stream is not None:
            self._stream.detach_pollers()

    async def close(self) -> None:
        """Detach, then wait for the released subscribers' polls to finish."""
        if self._stream is not None:
            self._stream.detach_pollers()
            await workflow.wait_condition(workflow.all_handlers_finished)
