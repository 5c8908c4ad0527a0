"""Token streaming for a model step whose pipeline asks for it (`stream_steps=`).

The model activity reads the provider's reply as a stream (the SDK's `messages.stream`) and
publishes its text to the run's live events (`stead.pipeline.events`, topic `tokens`) in
batches: what arrived during each `BATCH_SECONDS` goes in one event, sent as one signal to the
run's workflow. The reply the activity returns is the stream's final message, the very message
`messages.create` returns, so the durable result does not depend on streaming.

Each batch names its call, attempt and model; the first batch of an attempt (or of a fallback
model within it) has `reset: true`, telling a subscriber to drop the provisional text it holds
for that call. The call's `model.called` event, which the workflow publishes once the activity
returns, carries the final text: a retried attempt can repeat or replace provisional text, never
what a subscriber was shown as final. Publishing is best effort: a batch that cannot be sent
never fails or delays the call by more than `FLUSH_TIMEOUT_SECONDS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any

import anthropic
import httpx2
from temporalio import activity
from temporalio.contrib.workflow_streams import TopicHandle, WorkflowStreamClient

from stead.calls import ModelCall
from stead.pipeline.events import TOKENS_TOPIC, event

log = logging.getLogger("stead.gateway.streaming")
BATCH_SECONDS = 0.2
FLUSH_TIMEOUT_SECONDS = 5.0
# Errors the API reports inside a stream that has begun: the request was fine, the provider
# was not (the same as a 5xx or 529 before the stream began).
_PASSING = frozenset({"overloaded_error", "api_error", "rate_limit_error", "timeout_error"})


class StreamCut(anthropic.APIConnectionError):
    """The provider broke a stream off (an error event, a dropped connection): the gateway
    treats it as a connection failure, so the next model of the route is tried."""


class TokenStream:
    """Publishes one model call's text as it streams; `async with` around the call."""

    def __init__(self, call: ModelCall) -> None:
        self._call = call
        self._attempt = activity.info().attempt
        self._model = ""
        self._pending: list[str] = []
        self._part = 0
        self._reset = True
        self._client: WorkflowStreamClient | None = None
        self._topic: TopicHandle[dict[str, Any]] | None = None
        self._ticker: asyncio.Task[None] | None = None

    async def __aenter__(self) -> TokenStream:
        # Not entered as a context manager: its background flusher is not used. This class
        # flushes at its own ticks, and cancelling that flusher just as a flush was asked for
        # (Python 3.11's `wait_for` then swallows the cancel) left it waiting out its interval.
        self._client = WorkflowStreamClient.from_within_activity(
            max_retry_duration=timedelta(seconds=30)
        )
        self._topic = self._client.topic(TOKENS_TOPIC, type=dict)
        self._ticker = asyncio.create_task(self._tick())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        self._batch()
        try:
            async with asyncio.timeout(FLUSH_TIMEOUT_SECONDS):
                await self._flush()
        except TimeoutError:
            log.warning("streamed tokens of %s not all published in time", self._call.call_key)

    async def _flush(self) -> None:
        if self._client is None:
            return
        try:
            await self._client.flush()
        except Exception as error:  # live tokens are best effort; the reply is what counts
            log.warning("could not publish streamed tokens: %s", type(error).__name__)

    async def message(
        self, client: anthropic.AsyncAnthropic, model: str, request: dict[str, Any]
    ) -> anthropic.types.Message:
        """`messages.create(model=model, **request)`, read as a stream."""
        self._batch()
        self._model, self._reset, self._part = model, True, 0
        try:
            async with client.messages.stream(model=model, **request) as stream:
                async for text in stream.text_stream:
                    self._pending.append(text)
                return await stream.get_final_message()
        except anthropic.APIStatusError as exc:
            # Once a stream has begun its status is 200; an error then arrives as an event.
            if exc.status_code == 200 and _error_type(exc.body) in _PASSING:
                why = f"stream broke off: {_error_type(exc.body)}"
                raise StreamCut(message=why, request=exc.request) from None
            raise
        except httpx2.TransportError as exc:
            why = f"stream broke off: {type(exc).__name__}"
            raise StreamCut(message=why, request=_request_of(exc, client)) from None

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(BATCH_SECONDS)
            self._batch()
            await self._flush()

    def _batch(self) -> None:
        if not self._pending or self._topic is None:
            return
        text, self._pending = "".join(self._pending), []
        self._part += 1
        data = {
            "call": self._call.stream_call,
            "step": self._call.step,
            "attempt": self._attempt,
            "model": self._model,
            "part": self._part,
            "reset": self._reset,
            "text": text,
        }
        self._reset = False
        actor = f"workflow:{self._call.context.pipeline}"
        now = datetime.now(UTC).isoformat()
        self._topic.publish(event("model.tokens", data, actor=actor, at=now))


def _error_type(body: object) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    kind = error.get("type") if isinstance(error, dict) else None
    return kind if isinstance(kind, str) else ""


def _request_of(exc: httpx2.TransportError, client: anthropic.AsyncAnthropic) -> httpx2.Request:
    try:
        return exc.request
    except RuntimeError:  # raised when the error was made without its request
        return httpx2.Request("POST", f"{client.base_url}v1/messages")
