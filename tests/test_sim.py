"""The Messages API simulator, driven over real HTTP by the real Anthropic SDK.

Each test gets its own app and server, so faults, stats and the prompt cache never leak
between tests.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import anthropic
import httpx
import pytest
from anthropic.types import (
    Message,
    MessageParam,
    TextBlock,
    TextBlockParam,
    ToolParam,
    ToolResultBlockParam,
    ToolUseBlock,
)
from fastapi import FastAPI

from stead.sim.messages import SimConfig, SimState, count_tokens, create_app
from tests.helpers import eventually
from tests.servers import serve_app

MODEL = "claude-sim-test"
KEY = "test"

CUSTOMER_TOOL: ToolParam = {
    "name": "lookup_customer",
    "description": "Find a customer by id.",
    "input_schema": {
        "type": "object",
        "properties": {
            "customer_id": {"type": "integer"},
            "include_orders": {"type": "boolean"},
            "region": {"type": "string", "enum": ["eu", "us"]},
            "limit": {"type": "integer", "default": 10},
            "note": {"type": "string"},
        },
        "required": ["customer_id", "region"],
    },
}
EMAIL_TOOL: ToolParam = {
    "name": "send_email",
    "description": "Email a customer.",
    "input_schema": {
        "type": "object",
        "properties": {
            "to": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "weight": {"type": "number"},
        },
        "required": ["to", "tags", "weight"],
    },
}


@dataclass
class Sim:
    """A running simulator: its app (for state), an SDK client and a raw HTTP client."""

    url: str
    app: FastAPI
    client: anthropic.AsyncAnthropic
    http: httpx.AsyncClient

    @property
    def state(self) -> SimState:
        state: SimState = self.app.state.sim
        return state

    async def control(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        response = await self.http.request(method, path, json=body)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    app = create_app()
    async with (
        serve_app(app) as url,
        httpx.AsyncClient(base_url=url, headers={"x-api-key": KEY}) as http,
        anthropic.AsyncAnthropic(api_key=KEY, base_url=url, max_retries=0) as client,
    ):
        yield Sim(url, app, client, http)


def user(text: str) -> MessageParam:
    return {"role": "user", "content": text}


def text_of(message: Message) -> str:
    return "".join(block.text for block in message.content if isinstance(block, TextBlock))


def tool_uses(message: Message) -> list[ToolUseBlock]:
    return [block for block in message.content if isinstance(block, ToolUseBlock)]


def usage_total(message: Message) -> int:
    usage = message.usage
    cached = (usage.cache_creation_input_tokens or 0) + (usage.cache_read_input_tokens or 0)
    return usage.input_tokens + cached


def tool_result(use: ToolUseBlock, text: str, *, is_error: bool = False) -> ToolResultBlockParam:
    return {"type": "tool_result", "tool_use_id": use.id, "content": text, "is_error": is_error}


# --------------------------------------------------------------------------- replies


async def test_same_request_gives_identical_response(sim: Sim) -> None:
    messages = [user("Please check the status of order 1234 for me today.")]
    first = await sim.client.messages.create(model=MODEL, max_tokens=200, messages=messages)
    second = await sim.client.messages.create(model=MODEL, max_tokens=200, messages=messages)

    assert first.model_dump() == second.model_dump()
    assert first.id.startswith("msg_sim_")
    assert text_of(first) == "Summary: Please check the status of order 1234 for me today."
    assert first.stop_reason == "end_turn"
    assert first.usage.cache_creation_input_tokens == 0
    assert first.usage.cache_read_input_tokens == 0


async def test_different_requests_get_different_ids(sim: Sim) -> None:
    first = await sim.client.messages.create(model=MODEL, max_tokens=50, messages=[user("a")])
    second = await sim.client.messages.create(model=MODEL, max_tokens=50, messages=[user("b")])

    assert first.id != second.id


async def test_summary_keeps_only_the_first_forty_words(sim: Sim) -> None:
    words = [f"w{i}" for i in range(60)]
    reply = await sim.client.messages.create(
        model=MODEL, max_tokens=500, messages=[user(" ".join(words))]
    )

    assert text_of(reply) == "Summary: " + " ".join(words[:40])


async def test_latest_sim_reply_hint_wins(sim: Sim) -> None:
    reply = await sim.client.messages.create(
        model=MODEL,
        max_tokens=100,
        system="You are terse.\nsim_reply: from the system prompt",
        messages=[user("Hi.\nsim_reply:   All done, ticket closed.  ")],
    )

    assert text_of(reply) == "All done, ticket closed."
    assert reply.stop_reason == "end_turn"
    assert reply.usage.output_tokens == -(-len(b"All done, ticket closed.") // 4)


async def test_max_tokens_truncates_and_says_so(sim: Sim) -> None:
    reply = await sim.client.messages.create(
        model=MODEL, max_tokens=3, messages=[user("sim_reply: " + "abcdefgh" * 10)]
    )

    assert reply.stop_reason == "max_tokens"
    assert text_of(reply) == "abcdefghabcd"
    assert reply.usage.output_tokens == 3


# --------------------------------------------------------------------------- tokens


async def test_count_tokens_equals_usage_sum(sim: Sim) -> None:
    system: list[TextBlockParam] = [
        {
            "type": "text",
            # Long enough to cache (the minimum is 1,024 tokens).
            "text": "You route support tickets. " * 160,
            "cache_control": {"type": "ephemeral"},
        }
    ]
    messages = [user("Where is my parcel? It was due on Monday.")]
    counted = await sim.client.messages.count_tokens(
        model=MODEL, system=system, messages=messages, tools=[CUSTOMER_TOOL]
    )
    reply = await sim.client.messages.create(
        model=MODEL, max_tokens=100, system=system, messages=messages, tools=[CUSTOMER_TOOL]
    )

    assert counted.input_tokens > 0
    assert usage_total(reply) == counted.input_tokens
    assert reply.usage.cache_creation_input_tokens  # the cache split is part of the same sum


def test_count_tokens_formula_is_pinned() -> None:
    # 4 tokens of message overhead + ceil(5 bytes / 4).
    assert count_tokens({"model": MODEL, "messages": [user("hello")]}) == 6
    tool = {"name": "t", "description": "", "input_schema": {}}
    # 8 tokens of tool overhead + ceil(len("t{}") / 4).
    assert count_tokens({"messages": [], "tools": [tool]}) == 9


# --------------------------------------------------------------------------- tools


async def test_full_tool_loop(sim: Sim) -> None:
    tools = [CUSTOMER_TOOL, EMAIL_TOOL]
    messages: list[MessageParam] = [
        user("Customer 42 says the invoice is wrong.\ncustomer_id: 42\ninclude_orders: yes")
    ]

    first = await sim.client.messages.create(
        model=MODEL, max_tokens=300, tools=tools, messages=messages
    )
    assert first.stop_reason == "tool_use"
    assert text_of(first) == "Calling lookup_customer."
    [lookup] = tool_uses(first)
    assert lookup.id.startswith("toolu_sim_")
    assert lookup.name == "lookup_customer"
    # Hinted values are typed per schema; defaults and first enum fill the rest, and the
    # optional `note` without a hint or default is left out.
    assert lookup.input == {"customer_id": 42, "include_orders": True, "region": "eu", "limit": 10}

    messages += [
        first.to_param(),
        {"role": "user", "content": [tool_result(lookup, "to: ana@example.com\nweight: 2.5")]},
    ]
    second = await sim.client.messages.create(
        model=MODEL, max_tokens=300, tools=tools, messages=messages
    )
    [email] = tool_uses(second)
    assert email.name == "send_email"
    assert email.input == {"to": "ana@example.com", "tags": [], "weight": 2.5}

    messages += [
        second.to_param(),
        {"role": "user", "content": [tool_result(email, "mail server rejected", is_error=True)]},
    ]
    final = await sim.client.messages.create(
        model=MODEL, max_tokens=300, tools=tools, messages=messages
    )
    assert final.stop_reason == "end_turn"
    assert tool_uses(final) == []
    # The closing message says what each call returned.
    assert text_of(final) == (
        "Summary: 2 tool results, 1 error. lookup_customer: to: ana@example.com weight: 2.5;"
        " send_email: refused (mail server rejected)."
    )


async def test_tool_input_falls_back_when_a_hint_does_not_fit_the_schema(sim: Sim) -> None:
    tool: ToolParam = {
        "name": "ship",
        "input_schema": {
            "type": "object",
            "properties": {
                "count": {"type": "integer"},
                "address": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city"],
                },
                "express": {"type": ["boolean", "null"]},
            },
            "required": ["count", "address", "express"],
        },
    }
    reply = await sim.client.messages.create(
        model=MODEL, max_tokens=300, tools=[tool], messages=[user("count: many\nexpress: on")]
    )

    [use] = tool_uses(reply)
    assert use.input == {"count": 0, "address": {"city": "sim-city"}, "express": True}


async def test_parallel_tools_hint_calls_all_remaining_tools(sim: Sim) -> None:
    reply = await sim.client.messages.create(
        model=MODEL,
        max_tokens=300,
        tools=[CUSTOMER_TOOL, EMAIL_TOOL],
        messages=[user('Do everything at once.\nsim_parallel_tools: true\ntags: ["vip", "eu"]')],
    )

    uses = tool_uses(reply)
    assert [use.name for use in uses] == ["lookup_customer", "send_email"]
    assert len({use.id for use in uses}) == 2
    assert uses[1].input["tags"] == ["vip", "eu"]
    assert reply.stop_reason == "tool_use"


async def test_skip_tools_hint(sim: Sim) -> None:
    reply = await sim.client.messages.create(
        model=MODEL,
        max_tokens=300,
        tools=[CUSTOMER_TOOL, EMAIL_TOOL],
        messages=[user("Just email.\nsim_skip_tools: lookup_customer\nsend_email.to: x@y.z")],
    )

    assert [(use.name, use.input["to"]) for use in tool_uses(reply)] == [("send_email", "x@y.z")]


async def test_tool_choice_tool_forces_the_named_tool(sim: Sim) -> None:
    reply = await sim.client.messages.create(
        model=MODEL,
        max_tokens=300,
        tools=[CUSTOMER_TOOL, EMAIL_TOOL],
        tool_choice={"type": "tool", "name": "send_email"},
        messages=[user("Tell them.\nsim_skip_tools: send_email")],
    )

    assert [use.name for use in tool_uses(reply)] == ["send_email"]


async def test_tool_choice_none_gives_text(sim: Sim) -> None:
    reply = await sim.client.messages.create(
        model=MODEL,
        max_tokens=300,
        tools=[CUSTOMER_TOOL],
        tool_choice={"type": "none"},
        messages=[user("Just talk.")],
    )

    assert tool_uses(reply) == []
    assert reply.stop_reason == "end_turn"


async def test_tool_choice_any_overrides_skip_hints(sim: Sim) -> None:
    messages = [user("Anything.\nsim_skip_tools: lookup_customer")]
    auto = await sim.client.messages.create(
        model=MODEL, max_tokens=300, tools=[CUSTOMER_TOOL], messages=messages
    )
    forced = await sim.client.messages.create(
        model=MODEL,
        max_tokens=300,
        tools=[CUSTOMER_TOOL],
        tool_choice={"type": "any"},
        messages=messages,
    )

    assert tool_uses(auto) == []
    assert [use.name for use in tool_uses(forced)] == ["lookup_customer"]


# --------------------------------------------------------------------------- prompt cache


async def test_prompt_cache_is_created_then_read(sim: Sim) -> None:
    system: list[TextBlockParam] = [
        {"type": "text", "text": "Policy. " * 600, "cache_control": {"type": "ephemeral"}}
    ]

    async def ask(question: str) -> Message:
        return await sim.client.messages.create(
            model=MODEL, max_tokens=50, system=system, messages=[user(question)]
        )

    first = await ask("First question?")
    second = await ask("A different question?")
    cached = first.usage.cache_creation_input_tokens

    assert cached == -(-len(("Policy. " * 600).encode()) // 4)
    assert first.usage.cache_read_input_tokens == 0
    assert second.usage.cache_creation_input_tokens == 0
    assert second.usage.cache_read_input_tokens == cached
    assert usage_total(second) == count_tokens(
        {"system": system, "messages": [user("A different question?")]}
    )


async def test_prompt_cache_is_scoped_and_expires(sim: Sim) -> None:
    system: list[TextBlockParam] = [
        {"type": "text", "text": "Rules. " * 600, "cache_control": {"type": "ephemeral"}}
    ]
    now = [1000.0]
    sim.state.clock = lambda: now[0]

    async def cached_tokens(model: str) -> tuple[int | None, int | None]:
        reply = await sim.client.messages.create(
            model=model, max_tokens=50, system=system, messages=[user("q")]
        )
        return reply.usage.cache_creation_input_tokens, reply.usage.cache_read_input_tokens

    created = await cached_tokens(MODEL)
    assert created[0]
    assert created[1] == 0
    assert await cached_tokens("claude-other") == created  # another model has its own cache
    now[0] += 299
    assert await cached_tokens(MODEL) == (0, created[0])  # the read refreshed the entry
    now[0] += 301
    assert await cached_tokens(MODEL) == created


def cached_block(text: str, ttl: Literal["5m", "1h"] = "5m") -> TextBlockParam:
    return {"type": "text", "text": text, "cache_control": {"type": "ephemeral", "ttl": ttl}}


async def test_a_prefix_below_the_minimum_is_not_cached(sim: Sim) -> None:
    short = await sim.client.messages.create(
        model=MODEL, max_tokens=50, system=[cached_block("Short rules.")], messages=[user("q")]
    )
    haiku_sized = [cached_block("Rules. " * 700)]  # 1,225 tokens: enough for 1,024, not 2,048
    sonnet = await sim.client.messages.create(
        model="claude-sonnet-5-5", max_tokens=50, system=haiku_sized, messages=[user("q")]
    )
    haiku = await sim.client.messages.create(
        model="claude-haiku-5-5", max_tokens=50, system=haiku_sized, messages=[user("q")]
    )
    assert (short.usage.cache_creation_input_tokens, short.usage.cache_read_input_tokens) == (0, 0)
    assert sonnet.usage.cache_creation_input_tokens
    assert haiku.usage.cache_creation_input_tokens == 0


async def test_writes_are_split_by_ttl_and_ordered(sim: Sim) -> None:
    system = [cached_block("Long-lived. " * 400, "1h"), cached_block("Daily. " * 200)]
    reply = await sim.client.messages.create(
        model=MODEL, max_tokens=50, system=system, messages=[user("q")]
    )
    split = reply.usage.cache_creation
    assert split is not None
    assert split.ephemeral_1h_input_tokens == -(-len(("Long-lived. " * 400).encode()) // 4)
    assert split.ephemeral_5m_input_tokens == -(-len(("Daily. " * 200).encode()) // 4)
    assert reply.usage.cache_creation_input_tokens == (
        split.ephemeral_1h_input_tokens + split.ephemeral_5m_input_tokens
    )
    with pytest.raises(anthropic.BadRequestError, match="1h"):
        await sim.client.messages.create(
            model=MODEL, max_tokens=50, system=system[::-1], messages=[user("q")]
        )


async def test_at_most_four_breakpoints(sim: Sim) -> None:
    system = [cached_block(f"Part {i}. " * 300) for i in range(5)]
    with pytest.raises(anthropic.BadRequestError, match="maximum of 4"):
        await sim.client.messages.create(
            model=MODEL, max_tokens=50, system=system, messages=[user("q")]
        )


async def test_a_read_looks_back_twenty_blocks_at_most(sim: Sim) -> None:
    """A breakpoint reads an entry written up to 20 blocks before it, not further: a long
    turn needs the previous turn's breakpoint too (the gateway places it)."""
    head = [cached_block("Context. " * 600)]

    async def ask(tag: str, extra: int, *, both: bool) -> int:
        # Notes of their own per call: only the head is shared.
        tail: list[TextBlockParam] = [{"type": "text", "text": f"{tag} {i}"} for i in range(extra)]
        tail[-1] = cached_block(f"{tag} {extra - 1}")
        first = [*head] if both else [{"type": "text", "text": head[0]["text"]}]
        reply = await sim.client.messages.create(
            model=MODEL,
            max_tokens=50,
            messages=[{"role": "user", "content": [*first, *tail]}],
        )
        return reply.usage.cache_read_input_tokens or 0

    await ask("a", 1, both=True)  # writes an entry at the end of the head
    assert await ask("b", 20, both=False) > 0  # 20 blocks on: found by the lookback
    assert await ask("c", 30, both=False) == 0  # 30 on: out of reach
    assert await ask("d", 30, both=True) > 0  # with a breakpoint on the head itself


async def test_breakpoints_do_not_change_the_answer(sim: Sim) -> None:
    plain = await sim.client.messages.create(
        model=MODEL,
        max_tokens=50,
        system=[{"type": "text", "text": "Rules. " * 600}],
        messages=[user("Same?")],
    )
    marked = await sim.client.messages.create(
        model=MODEL, max_tokens=50, system=[cached_block("Rules. " * 600)], messages=[user("Same?")]
    )
    assert marked.id == plain.id
    assert marked.content == plain.content


async def test_top_level_cache_control_reads_the_previous_turn(sim: Sim) -> None:
    history: list[MessageParam] = [user("Long shared context. " * 200)]
    first = await sim.client.messages.create(
        model=MODEL, max_tokens=400, messages=history, cache_control={"type": "ephemeral"}
    )
    history += [first.to_param(), user("And a follow-up?")]
    second = await sim.client.messages.create(
        model=MODEL, max_tokens=400, messages=history, cache_control={"type": "ephemeral"}
    )

    assert first.usage.cache_creation_input_tokens == usage_total(first)
    # The automatic breakpoint moved to the new last turn; the first turn is read from cache.
    assert second.usage.cache_read_input_tokens == usage_total(first)
    assert second.usage.cache_creation_input_tokens == usage_total(second) - usage_total(first)
    assert second.usage.input_tokens == 0


# --------------------------------------------------------------------------- auth


@pytest.mark.parametrize("header", [{"x-api-key": KEY}, {"authorization": f"Bearer {KEY}"}])
async def test_both_key_headers_are_accepted(sim: Sim, header: dict[str, str]) -> None:
    body = {"model": MODEL, "max_tokens": 20, "messages": [user("hi")]}
    async with httpx.AsyncClient(base_url=sim.url, headers=header) as http:
        response = await http.post("/v1/messages", json=body)

    assert response.status_code == 200
    assert response.json()["type"] == "message"


async def test_missing_key_is_rejected(sim: Sim) -> None:
    body = {"model": MODEL, "max_tokens": 20, "messages": [user("hi")]}
    async with httpx.AsyncClient(base_url=sim.url) as anonymous:
        response = await anonymous.post("/v1/messages", json=body)

    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


async def test_configured_key_is_enforced() -> None:
    async with serve_app(create_app(SimConfig(api_key="right"))) as url:
        async with anthropic.AsyncAnthropic(api_key="right", base_url=url, max_retries=0) as ok:
            reply = await ok.messages.create(model=MODEL, max_tokens=20, messages=[user("hi")])
            assert reply.type == "message"
        async with anthropic.AsyncAnthropic(api_key="wrong", base_url=url, max_retries=0) as bad:
            with pytest.raises(anthropic.AuthenticationError) as raised:
                await bad.messages.create(model=MODEL, max_tokens=20, messages=[user("hi")])
            assert raised.value.type == "authentication_error"
        async with httpx.AsyncClient(base_url=url, headers={"x-api-key": "wrong"}) as http:
            assert (await http.get("/_sim/stats")).status_code == 401


# --------------------------------------------------------------------------- validation


async def test_sdk_sees_validation_errors_as_bad_request(sim: Sim) -> None:
    with pytest.raises(anthropic.BadRequestError) as raised:
        await sim.client.messages.create(
            model=MODEL, max_tokens=20, messages=[{"role": "assistant", "content": "hi"}]
        )

    assert raised.value.type == "invalid_request_error"
    assert "first message" in str(raised.value.api_message)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"model": ""}, "model"),
        ({"model": None}, "model"),
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [user("a"), user("b")]}, "alternate"),
        ({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, "unknown content"),
        ({"system": [{"type": "image"}]}, "system"),
        ({"stream": "yes"}, "stream"),
        ({"tool_choice": {"type": "any"}}, "tool_choice"),
        ({"tool_choice": {"type": ["auto"]}}, "tool_choice"),
        ({"messages": [{"role": ["user"], "content": "hi"}]}, "role"),
        ({"tools": [{"name": "bad name!", "input_schema": {}}]}, "tools.0.name"),
        ({"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]}, "tool_use_id"),
    ],
)
async def test_invalid_requests_are_rejected(
    sim: Sim, change: dict[str, Any], expected: str
) -> None:
    body = {"model": MODEL, "max_tokens": 20, "messages": [user("hi")]} | change
    response = await sim.http.post("/v1/messages", json=body)

    assert response.status_code == 400
    assert response.json()["type"] == "error"
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert expected in response.json()["error"]["message"]


async def test_tool_results_must_answer_the_previous_tool_uses(sim: Sim) -> None:
    use = {"type": "tool_use", "id": "toolu_1", "name": "lookup_customer", "input": {}}
    messages = [
        user("go"),
        {"role": "assistant", "content": [use]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_2"}]},
    ]
    body = {"model": MODEL, "max_tokens": 20, "messages": messages, "tools": [CUSTOMER_TOOL]}
    response = await sim.http.post("/v1/messages", json=body)

    assert response.status_code == 400
    assert "toolu_2" in response.json()["error"]["message"]


async def test_count_tokens_does_not_need_max_tokens_but_validates(sim: Sim) -> None:
    ok = await sim.http.post(
        "/v1/messages/count_tokens", json={"model": MODEL, "messages": [user("hello")]}
    )
    bad = await sim.http.post("/v1/messages/count_tokens", json={"model": MODEL, "messages": []})

    assert ok.json() == {"input_tokens": 6}
    assert bad.status_code == 400


async def test_unknown_model_is_not_found(sim: Sim) -> None:
    with pytest.raises(anthropic.NotFoundError) as raised:
        await sim.client.messages.create(model="gpt-4o", max_tokens=20, messages=[user("hi")])

    assert raised.value.type == "not_found_error"
    assert raised.value.api_message == "model: gpt-4o"


async def test_oversized_body_is_rejected(sim: Sim) -> None:
    body = {"model": MODEL, "max_tokens": 20, "messages": [user("x" * (8 * 1024 * 1024))]}
    response = await sim.http.post("/v1/messages", json=body)

    assert response.status_code == 413
    assert response.json()["error"]["type"] == "request_too_large"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_a_client_gone_mid_body_leaves_no_traceback(sim: Sim) -> None:
    """A worker killed while sending its request is ordinary: counted, not logged as a crash."""
    logged = _Records()
    server_log = logging.getLogger("uvicorn.error")  # where uvicorn logs an app's exception
    server_log.addHandler(logged)
    try:
        host, port = sim.url.removeprefix("http://").split(":")
        _, writer = await asyncio.open_connection(host, int(port))
        head = (
            f"POST /v1/messages HTTP/1.1\r\nHost: {host}\r\nx-api-key: {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        )
        writer.write(head.encode() + b'{"model": ')  # and no more: the client dies
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        # Either outcome ends the request: the disconnect counted, or a crash logged.
        await eventually(
            lambda: sim.control("GET", "/_sim/stats"),
            lambda stats: stats.get("client_disconnects") == 1 or bool(logged.records),
        )
    finally:
        server_log.removeHandler(logged)
    assert [r.getMessage() for r in logged.records] == []
    assert sim.state.stats.requests_total == 0  # it never became a request


async def test_unknown_route_uses_the_error_shape(sim: Sim) -> None:
    response = await sim.http.get("/v1/models/nope")

    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


# --------------------------------------------------------------------------- faults


async def test_rate_limit_fault_carries_retry_after(sim: Sim) -> None:
    await sim.control("POST", "/_sim/faults", {"status": 429, "retry_after": 7})

    with pytest.raises(anthropic.RateLimitError) as raised:
        await sim.client.messages.create(model=MODEL, max_tokens=20, messages=[user("hi")])

    assert raised.value.response.headers["retry-after"] == "7"
    assert raised.value.type == "rate_limit_error"


async def test_overloaded_fault(sim: Sim) -> None:
    await sim.control("POST", "/_sim/faults", {"status": 529})

    with pytest.raises(anthropic.OverloadedError) as raised:
        await sim.client.messages.create(model=MODEL, max_tokens=20, messages=[user("hi")])

    assert raised.value.status_code == 529
    assert raised.value.type == "overloaded_error"


async def test_server_error_fault_then_recovery(sim: Sim) -> None:
    await sim.control("POST", "/_sim/faults", {"status": 500, "count": 2})

    for _ in range(2):
        with pytest.raises(anthropic.InternalServerError) as raised:
            await sim.client.messages.create(model=MODEL, max_tokens=20, messages=[user("hi")])
        assert raised.value.type == "api_error"
    reply = await sim.client.messages.create(model=MODEL, max_tokens=20, messages=[user("hi")])

    assert reply.type == "message"
    stats = await sim.control("GET", "/_sim/stats")
    assert stats["faults_served"] == 2
    assert stats["requests"] == {MODEL: 3}


async def test_hang_fault_times_the_client_out(sim: Sim) -> None:
    await sim.control("POST", "/_sim/faults", {"status": 500, "hang": True})
    async with anthropic.AsyncAnthropic(
        api_key=KEY, base_url=sim.url, max_retries=0, timeout=0.5
    ) as impatient:
        with pytest.raises(anthropic.APITimeoutError):
            await impatient.messages.create(model=MODEL, max_tokens=20, messages=[user("hi")])
        reply = await impatient.messages.create(model=MODEL, max_tokens=20, messages=[user("hi")])

    assert reply.type == "message"  # the hang was consumed; the next call is answered
    assert (await sim.control("GET", "/_sim/stats"))["faults_served"] == 1


async def test_fault_scoped_to_a_model_spares_the_others(sim: Sim) -> None:
    await sim.control("POST", "/_sim/faults", {"status": 529, "model": "claude-flaky"})

    spared = await sim.client.messages.create(model=MODEL, max_tokens=20, messages=[user("hi")])
    with pytest.raises(anthropic.OverloadedError):
        await sim.client.messages.create(model="claude-flaky", max_tokens=20, messages=[user("hi")])

    assert spared.type == "message"
    assert (await sim.control("GET", "/_sim/stats"))["faults_pending"] == 0


async def test_count_tokens_is_never_faulted(sim: Sim) -> None:
    await sim.control("POST", "/_sim/faults", {"status": 500})

    counted = await sim.client.messages.count_tokens(model=MODEL, messages=[user("hello")])

    assert counted.input_tokens == 6
    stats = await sim.control("GET", "/_sim/stats")
    assert stats["faults_pending"] == 1
    assert stats["count_tokens_calls"] == 1


async def test_faults_can_be_cleared_and_specs_are_validated(sim: Sim) -> None:
    await sim.control("POST", "/_sim/faults", {"status": 500, "count": 3})
    cleared = await sim.control("DELETE", "/_sim/faults")
    bad = await sim.http.post("/_sim/faults", json={"status": 200})
    typo = await sim.http.post("/_sim/faults", json={"status": 500, "cuont": 2})

    assert cleared == {"cleared": 3}
    assert bad.status_code == 400
    assert "status" in bad.json()["error"]["message"]
    assert typo.status_code == 400


# --------------------------------------------------------------------------- control


async def test_latency_config_delays_responses(sim: Sim) -> None:
    assert (await sim.control("POST", "/_sim/config", {"latency_ms": 300}))["latency_ms"] == 300

    started = time.monotonic()
    await sim.client.messages.create(model=MODEL, max_tokens=20, messages=[user("hi")])

    assert time.monotonic() - started >= 0.3


async def test_reset_clears_faults_stats_and_cache(sim: Sim) -> None:
    system: list[TextBlockParam] = [
        {"type": "text", "text": "Cached. " * 600, "cache_control": {"type": "ephemeral"}}
    ]
    first = await sim.client.messages.create(
        model=MODEL, max_tokens=20, system=system, messages=[user("hi")]
    )
    await sim.control("POST", "/_sim/faults", {"status": 500})

    await sim.control("POST", "/_sim/reset")
    again = await sim.client.messages.create(
        model=MODEL, max_tokens=20, system=system, messages=[user("hi")]
    )

    assert again.usage.cache_creation_input_tokens == first.usage.cache_creation_input_tokens
    stats = await sim.control("GET", "/_sim/stats")
    assert stats["requests"] == {MODEL: 1}
    assert stats["faults_pending"] == 0


async def test_apps_do_not_share_state(sim: Sim) -> None:
    await sim.control("POST", "/_sim/faults", {"status": 500})
    other = create_app()

    assert len(sim.state.faults) == 1
    assert len(other.state.sim.faults) == 0


async def test_tool_turns_hint_keeps_an_agent_looping(sim: Sim) -> None:
    messages: list[MessageParam] = [user("Keep working.\nsim_tool_turns: 5")]
    called: list[str] = []
    for _ in range(10):
        reply = await sim.client.messages.create(
            model=MODEL, max_tokens=300, tools=[CUSTOMER_TOOL, EMAIL_TOOL], messages=messages
        )
        uses = tool_uses(reply)
        if not uses:
            break
        called += [use.name for use in uses]
        messages.append({"role": "assistant", "content": reply.content})
        messages.append(
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": use.id, "content": "ok"} for use in uses
                ],
            }
        )
    # Five tool turns, cycling through the offered tools, then a final text reply.
    assert called == ["lookup_customer", "send_email"] * 2 + ["lookup_customer"]
    assert reply.stop_reason == "end_turn"
