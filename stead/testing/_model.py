"""A scripted model: a pipeline test says what the model answers, in order.

The session's model endpoint is the simulator (`stead.sim.messages`) behind this script, on a
loopback port, and the worker's real `anthropic` SDK calls it over HTTP as it calls Anthropic.
A call the script has an entry for gets that entry's answer (each entry answers once, the
first that fits); every other call is the simulator's, steered by its prompt hints as usual.

    scripted_model.answer(Triage(category="billing", urgent=True))  # a structured answer
    scripted_model.reply("Dear customer, ...")                        # a text reply
    scripted_model.use_tool("lookup_order", {"order_id": "A-1"})      # an agent's tool call

An entry fits a call by what the call asks for: `answer` a call that forces a structured
answer (`call_model(output=...)`), `reply` one that does not, `use_tool` one offering that
tool; `when="..."` narrows it to calls whose system prompt or messages contain the text.
Calls answered from the script are in `calls`; entries no call took are in `pending`.

Stead's response cache and its record of finished calls still apply in front of the model: a
call already answered (in the same tenant, with the same request) is not asked again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel
from starlette.responses import JSONResponse, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stead.sim.messages import count_tokens
from stead.sim.streaming import message_events

_Kind = Literal["answer", "reply", "tool"]


@dataclass(frozen=True)
class _Entry:
    kind: _Kind
    content: Any
    when: str | None
    tool: str = ""

    def describe(self) -> str:
        what = {"answer": "a structured answer", "reply": "a reply", "tool": f"a {self.tool} call"}
        return what[self.kind] + (f" when {self.when!r}" if self.when else "")


@dataclass
class ScriptedModel:
    """What the model answers in this test; see the module's docstring."""

    _entries: list[_Entry] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)
    """The request bodies answered from the script, in order."""

    def answer(
        self, value: BaseModel | Mapping[str, Any], *, when: str | None = None
    ) -> ScriptedModel:
        """The next call forcing a structured answer gets `value` (a model, or a mapping:
        give one that does not validate to exercise the repair)."""
        data = value.model_dump(mode="json") if isinstance(value, BaseModel) else dict(value)
        return self._add(_Entry("answer", data, when))

    def reply(self, text: str, *, when: str | None = None) -> ScriptedModel:
        """The next call that does not force a structured answer gets `text`."""
        return self._add(_Entry("reply", text, when))

    def use_tool(
        self, name: str, arguments: Mapping[str, Any], *, when: str | None = None
    ) -> ScriptedModel:
        """The next call offering tool `name` gets a call of it with `arguments`."""
        return self._add(_Entry("tool", dict(arguments), when, tool=name))

    @property
    def pending(self) -> list[str]:
        """The entries no call has taken yet, described."""
        return [entry.describe() for entry in self._entries]

    def reset(self) -> None:
        self._entries.clear()
        self.calls.clear()

    def _add(self, entry: _Entry) -> ScriptedModel:
        self._entries.append(entry)
        return self

    def _take(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """The scripted message for a `POST /v1/messages` body, or None for the simulator."""
        entry = next((e for e in self._entries if _fits(e, body)), None)
        if entry is None:
            return None
        self._entries.remove(entry)
        self.calls.append(body)
        return _message(body, entry)


def _forced(body: Mapping[str, Any]) -> str | None:
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "tool":
        return str(choice.get("name", ""))
    return None


def _texts(body: Mapping[str, Any]) -> str:
    return json.dumps([body.get("system"), body.get("messages")], ensure_ascii=False)


def _fits(entry: _Entry, body: Mapping[str, Any]) -> bool:
    if entry.when is not None and entry.when not in _texts(body):
        return False
    forced = _forced(body)
    if entry.kind == "answer":
        return forced is not None
    if entry.kind == "reply":
        return forced is None
    offered = {t.get("name") for t in body.get("tools") or () if isinstance(t, dict)}
    return entry.tool in offered and forced in (None, entry.tool)


def _tokens(value: Any) -> int:
    return -(-len(json.dumps(value, ensure_ascii=False).encode()) // 4)


def _message(body: dict[str, Any], entry: _Entry) -> dict[str, Any]:
    # Ids derive from the request, as the simulator's do: the same call, the same answer.
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:24]
    if entry.kind == "reply":
        content: list[dict[str, Any]] = [{"type": "text", "text": entry.content}]
        stop = "end_turn"
    else:
        name = entry.tool if entry.kind == "tool" else _forced(body)
        use = {"type": "tool_use", "id": f"toolu_script_{digest}", "name": name}
        content = [{**use, "input": entry.content}]
        stop = "tool_use"
    return {
        "id": f"msg_script_{digest}",
        "type": "message",
        "role": "assistant",
        "model": body.get("model"),
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {
            "input_tokens": count_tokens(body),
            "output_tokens": _tokens(content),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }


class ScriptedEndpoint:
    """An ASGI app: `model`'s script in front of `simulator` (another ASGI app)."""

    def __init__(self, simulator: ASGIApp, model: ScriptedModel) -> None:
        self.simulator = simulator
        self.model = model

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scripted = (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] == "/v1/messages"
            and bool(self.model._entries)
        )
        if not scripted:
            await self.simulator(scope, receive, send)
            return
        raw = await _read(receive)
        reply = None
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if isinstance(body, dict) and _has_key(scope):
            reply = self.model._take(body)
        if reply is None:
            await self.simulator(scope, _replaying(raw, receive), send)
            return
        if body.get("stream") is True:  # a step that streams: the same reply as its events
            streamed = StreamingResponse(message_events(reply), media_type="text/event-stream")
            await streamed(scope, receive, send)
            return
        await JSONResponse(reply)(scope, receive, send)


def _has_key(scope: Scope) -> bool:
    headers = dict(scope.get("headers") or [])
    return bool(headers.get(b"x-api-key") or headers.get(b"authorization"))


async def _read(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replaying(raw: bytes, receive: Receive) -> Receive:
    """`receive` with the body already read handed out again first."""
    sent = False

    async def again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()

    return again
