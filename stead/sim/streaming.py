"""`stream: true` in the simulator: the very message a non-streaming request gets, sent as the
Messages API's Server-Sent Events (`message_start`, a `content_block_start`, deltas and
`content_block_stop` per block, `message_delta` with the stop reason and usage, `message_stop`),
so the SDK's stream helpers rebuild exactly the body `POST /v1/messages` would have answered.

Text is sent a word at a time (`text_delta`), tool input as pieces of its JSON
(`input_json_delta`). A request may pace the deltas with the hint `sim_stream_chunk_ms: N`, and
a queued fault with `after_chunks` cuts the stream after that many deltas with an `error` event
(`overloaded_error` for a 529), as the real API reports errors once a stream has begun.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

_WORD = re.compile(r"\s*\S+\s*|\s+")
_JSON_PIECE = 24


@dataclass(frozen=True)
class StreamCut:
    """Where and how a stream breaks off: after `after_chunks` deltas, with this error."""

    after_chunks: int
    error_type: str
    message: str


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _pieces(block: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if block["type"] == "text":
        for word in _WORD.findall(block["text"]):
            yield {"type": "text_delta", "text": word}
    elif block["type"] == "tool_use":
        raw = json.dumps(block["input"], separators=(",", ":"), ensure_ascii=False)
        for start in range(0, len(raw), _JSON_PIECE):
            yield {"type": "input_json_delta", "partial_json": raw[start : start + _JSON_PIECE]}


def _opening(block: dict[str, Any]) -> dict[str, Any]:
    if block["type"] == "text":
        return {"type": "text", "text": ""}
    return {**block, "input": {}}


async def message_events(
    message: dict[str, Any], *, chunk_seconds: float = 0.0, cut: StreamCut | None = None
) -> AsyncIterator[bytes]:
    """The Server-Sent Events of `message` (a complete Messages API response body)."""
    usage = message["usage"]
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
    start["usage"] = {**usage, "output_tokens": 1}
    yield sse("message_start", {"type": "message_start", "message": start})
    yield sse("ping", {"type": "ping"})
    sent = 0
    for index, block in enumerate(message["content"]):
        yield sse(
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": _opening(block)},
        )
        for delta in _pieces(block):
            if cut is not None and sent >= cut.after_chunks:
                error = {"type": cut.error_type, "message": cut.message}
                yield sse("error", {"type": "error", "error": error})
                return
            if chunk_seconds:
                await asyncio.sleep(chunk_seconds)
            yield sse(
                "content_block_delta",
                {"type": "content_block_delta", "index": index, "delta": delta},
            )
            sent += 1
        yield sse("content_block_stop", {"type": "content_block_stop", "index": index})
    yield sse(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
            "usage": usage,
        },
    )
    yield sse("message_stop", {"type": "message_stop"})
