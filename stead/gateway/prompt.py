"""The request a model call sends: what the model is asked, then where the prompt cache breaks.

`request_body` is the request's identity: the messages, system prompt, tools and tool choice
of the step, and the route's thinking and effort settings (they change the answer). The
response cache keys on it, and it is all the workflow's history ever holds of a request.

`with_breakpoints` then marks, inside the activity, what the provider may cache: the tools and
the system prompt (the prefix every call of a step shares) and, in a conversation, the last
block of the previous user turn (the entry the last call wrote, read back exactly) and of the
last message (the entry the next turn reads). Four at most, the provider's limit; a caller's
own marks are dropped first, so the gateway's are the only ones. Moving a breakpoint never
changes the identity above, so neither the response cache nor a replay sees it.
"""

from __future__ import annotations

import copy
from typing import Any

from stead.calls import ModelCall
from stead.policy.models import CacheTtl, Route

MAX_BREAKPOINTS = 4
_FORCING = ("any", "tool")


def forces_tool(tool_choice: dict[str, Any] | None) -> bool:
    return bool(tool_choice) and (tool_choice or {}).get("type") in _FORCING


def request_body(call: ModelCall, route: Route) -> dict[str, Any]:
    """The step's request, with the route's thinking and effort. Thinking adds its budget to
    the step's `max_tokens` (the budget is output the step did not ask to be cut from), and is
    left off a call that forces a tool: the API refuses the two together."""
    body: dict[str, Any] = {"messages": call.messages, "max_tokens": call.max_tokens}
    if call.system:
        body["system"] = call.system
    if call.tools:
        body["tools"] = call.tools
    if call.tool_choice is not None:
        body["tool_choice"] = call.tool_choice
    if route.thinking is not None and not forces_tool(call.tool_choice):
        body["thinking"] = route.thinking.request()
        body["max_tokens"] = call.max_tokens + route.thinking.budget_tokens
    if route.effort is not None:
        body["output_config"] = {"effort": route.effort}
    return body


def is_conversation(body: dict[str, Any]) -> bool:
    """A call whose conversation the next call extends: a turn after the first, or an agent's
    first turn (tools offered, none forced). A one-shot prompt is not worth writing."""
    messages = body.get("messages") or []
    tools_offered = bool(body.get("tools")) and not forces_tool(body.get("tool_choice"))
    return len(messages) > 1 or tools_offered


def with_breakpoints(body: dict[str, Any], ttl: CacheTtl) -> dict[str, Any]:
    """A copy of `body` with the gateway's cache breakpoints (see the module docstring)."""
    sent: dict[str, Any] = _without_marks(body)
    mark: dict[str, Any] = {"type": "ephemeral", "ttl": ttl}
    placed = 0
    tools = sent.get("tools")
    if tools:
        tools[-1]["cache_control"] = dict(mark)
        placed += 1
    if sent.get("system"):
        blocks = _blocks(sent["system"])
        if _markable(blocks[-1]):
            blocks[-1]["cache_control"] = dict(mark)
            sent["system"] = blocks
            placed += 1
    if is_conversation(sent):
        messages = sent["messages"]
        turns = [len(messages) - 1]
        if len(messages) >= 3:
            turns.insert(0, len(messages) - 3)  # the previous user turn
        room = MAX_BREAKPOINTS - placed
        for index in turns[max(len(turns) - room, 0) :] if room > 0 else []:
            _mark_message(messages[index], mark)
    return sent


def _without_marks(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_marks(v) for k, v in value.items() if k != "cache_control"}
    if isinstance(value, list):
        return [_without_marks(item) for item in value]
    return copy.copy(value)


def _blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []


def _markable(block: dict[str, Any]) -> bool:
    # Thinking blocks cannot carry a breakpoint, nor can empty text.
    kind = block.get("type")
    if kind in ("thinking", "redacted_thinking"):
        return False
    return kind != "text" or bool(block.get("text"))


def _mark_message(message: dict[str, Any], mark: dict[str, Any]) -> None:
    blocks = _blocks(message.get("content"))
    target = next((b for b in reversed(blocks) if _markable(b)), None)
    if target is not None:
        target["cache_control"] = dict(mark)
        message["content"] = blocks
