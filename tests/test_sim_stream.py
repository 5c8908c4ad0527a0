"""The simulator's `stream: true`, read by the real Anthropic SDK's stream helpers over HTTP."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import pytest
from anthropic.types import MessageParam, ToolParam

from stead.sim.messages import create_app
from tests.servers import serve_app

MODEL = "claude-sim-test"
WEATHER: ToolParam = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city", "days"],
    },
}


@pytest.fixture
async def sdk() -> AsyncIterator[tuple[anthropic.AsyncAnthropic, httpx.AsyncClient]]:
    async with (
        serve_app(create_app()) as url,
        anthropic.AsyncAnthropic(api_key="k", base_url=url, max_retries=0) as client,
        httpx.AsyncClient(base_url=url, headers={"x-api-key": "k"}) as http,
    ):
        yield client, http


def ask(text: str) -> list[MessageParam]:
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize(
    "request_body",
    [
        {"messages": ask("Revenue grew 12% in Q3 while costs fell by 3% over the year.")},
        {"messages": ask("city: Paris\ndays: 3"), "tools": [WEATHER]},
    ],
    ids=["text", "tool_use"],
)
async def test_a_streamed_message_is_the_message_create_returns(
    sdk: tuple[anthropic.AsyncAnthropic, httpx.AsyncClient], request_body: dict[str, Any]
) -> None:
    client, _ = sdk
    created = await client.messages.create(model=MODEL, max_tokens=300, **request_body)
    deltas: list[str] = []
    async with client.messages.stream(model=MODEL, max_tokens=300, **request_body) as stream:
        async for text in stream.text_stream:
            deltas.append(text)
        streamed = await stream.get_final_message()

    assert streamed.model_dump(exclude_none=True) == created.model_dump(exclude_none=True)
    text = "".join(b.text for b in created.content if b.type == "text")
    assert "".join(deltas) == text
    assert len(deltas) > 1, "text arrives in pieces, not in one delta"


async def test_deltas_are_paced_by_the_chunk_hint(
    sdk: tuple[anthropic.AsyncAnthropic, httpx.AsyncClient],
) -> None:
    client, _ = sdk
    messages = ask("sim_stream_chunk_ms: 30\nsim_reply: one two three four five six")
    arrivals: list[float] = []
    async with client.messages.stream(model=MODEL, max_tokens=100, messages=messages) as stream:
        async for _ in stream.text_stream:
            arrivals.append(time.monotonic())

    assert len(arrivals) == 6
    assert arrivals[-1] - arrivals[0] >= 5 * 0.03 * 0.9


async def test_a_fault_after_chunks_breaks_the_stream_off_with_an_error_event(
    sdk: tuple[anthropic.AsyncAnthropic, httpx.AsyncClient],
) -> None:
    client, http = sdk
    queued = await http.post("/_sim/faults", json={"status": 529, "after_chunks": 2})
    assert queued.status_code == 200
    messages = ask("sim_reply: one two three four five")
    seen: list[str] = []

    async def read() -> None:
        async with client.messages.stream(model=MODEL, max_tokens=100, messages=messages) as s:
            async for text in s.text_stream:
                seen.append(text)

    with pytest.raises(anthropic.APIStatusError) as raised:
        await read()

    assert seen == ["one ", "two "]
    assert raised.value.body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "simulated fault: overloaded_error"},
    }
    # The fault was used up: the same request streams in full now.
    async with client.messages.stream(model=MODEL, max_tokens=100, messages=messages) as again:
        assert (await again.get_final_text()) == "one two three four five"


async def test_a_fault_after_chunks_fails_a_request_that_does_not_stream_outright(
    sdk: tuple[anthropic.AsyncAnthropic, httpx.AsyncClient],
) -> None:
    client, http = sdk
    await http.post("/_sim/faults", json={"status": 529, "after_chunks": 2})
    with pytest.raises(anthropic.InternalServerError):
        await client.messages.create(model=MODEL, max_tokens=100, messages=ask("hello"))
