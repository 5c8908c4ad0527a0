"""Provider prompt caching: the gateway places the breakpoints, the route picks the TTL, the
cost follows the TTL's rates, and nothing the response cache or history sees depends on them.

On the real SDK against the simulator, which caches as upstream does (prefix matching, TTLs,
a minimum cacheable length, the 5m/1h split of the writes)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from stead import metrics
from stead.calls import ModelCall
from stead.config import Settings
from stead.gateway.model import ModelActivities
from stead.gateway.prompt import MAX_BREAKPOINTS, with_breakpoints
from stead.policy.models import RoutingPolicy, TokenCounts, load_prices, load_routing
from stead.store import budgets
from stead.store.db import Pool
from tests.conftest import Tenant
from tests.gateway_kit import call_for, gateway_for, last_sent, run

# Well past the 1,024-token minimum a breakpoint needs to cache anything.
POLICY = "Refunds for duplicate charges are issued within five days. " * 120
PRICES = load_prices()


def routing_with(prompt_cache: str) -> RoutingPolicy:
    """The shipped routing with the `draft` task class's prompt cache set to `prompt_cache`."""
    shipped = load_routing()
    draft = shipped.routes["draft"]
    changed = {
        plan: r.model_copy(update={"prompt_cache": prompt_cache}) for plan, r in draft.items()
    }
    return shipped.model_copy(update={"routes": {**shipped.routes, "draft": changed}})


@pytest.fixture
async def gateway(pool: Pool, settings: Settings) -> AsyncIterator[ModelActivities]:
    async with gateway_for(pool, settings) as made:
        yield made


def marks(body: dict[str, Any]) -> list[str]:
    """Where `body` carries cache_control: tools, system, messages.N."""
    found = [f"tools.{i}" for i, t in enumerate(body.get("tools") or []) if "cache_control" in t]
    system = body.get("system")
    if isinstance(system, list):
        found += [f"system.{i}" for i, b in enumerate(system) if "cache_control" in b]
    for index, message in enumerate(body["messages"]):
        content = message["content"]
        if isinstance(content, list) and any("cache_control" in b for b in content):
            found.append(f"messages.{index}")
    return found


def ttls(body: dict[str, Any]) -> set[str]:
    return {m["ttl"] for m in _markers(body)}


def _markers(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, dict):
        own = [value["cache_control"]] if "cache_control" in value else []
        return own + [m for v in value.values() for m in _markers(v)]
    if isinstance(value, list):
        return [m for v in value for m in _markers(v)]
    return []


def conversation(turns: int) -> list[dict[str, Any]]:
    """An agent conversation of `turns` tool rounds, ending with a user turn."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Work ticket T-1."}]
    for i in range(turns):
        use = {"type": "tool_use", "id": f"toolu_{i}", "name": "lookup", "input": {"n": i}}
        messages.append({"role": "assistant", "content": [{"type": "text", "text": "On it."}, use]})
        result = {"type": "tool_result", "tool_use_id": f"toolu_{i}", "content": f"result {i}"}
        messages.append({"role": "user", "content": [result]})
    return messages


TOOL = {"name": "lookup", "description": "Look it up.", "input_schema": {"type": "object"}}


# --- where the breakpoints go ----------------------------------------------------------------


def test_tools_system_and_the_conversation_so_far_are_marked_within_the_limit() -> None:
    body = {"messages": conversation(3), "system": POLICY, "tools": [TOOL], "max_tokens": 10}
    sent = with_breakpoints(body, "5m")
    # The tools, the system prompt, the previous user turn (the entry the last call wrote)
    # and the last message (the entry the next call reads).
    assert marks(sent) == ["tools.0", "system.0", "messages.4", "messages.6"]
    assert len(marks(sent)) <= MAX_BREAKPOINTS
    assert ttls(sent) == {"5m"}
    assert "cache_control" not in repr(body)  # the step's own request is untouched


def test_a_one_shot_prompt_marks_only_its_stable_prefix() -> None:
    body = {"messages": [{"role": "user", "content": "Summarize this."}], "system": POLICY}
    assert marks(with_breakpoints(body, "1h")) == ["system.0"]


def test_the_callers_own_marks_are_replaced_by_the_gateways() -> None:
    mark = {"type": "ephemeral"}
    messages = conversation(2)
    messages[0] = {
        "role": "user",
        "content": [{"type": "text", "text": "Work ticket T-1.", "cache_control": mark}],
    }
    body = {
        "messages": messages,
        "system": [{"type": "text", "text": POLICY, "cache_control": mark}],
        "tools": [{**TOOL, "cache_control": mark}],
    }
    sent = with_breakpoints(body, "1h")
    assert marks(sent) == ["tools.0", "system.0", "messages.2", "messages.4"]
    assert ttls(sent) == {"1h"}


async def test_breakpoints_do_not_change_the_requests_identity(
    pool: Pool, settings: Settings, tenant: Tenant
) -> None:
    """The response cache keys on what the model is asked, whatever the TTL or opt-out."""
    call = call_for(tenant, messages=conversation(2), system=POLICY, tools=[TOOL])
    planned = []
    for ttl in ("5m", "1h", "off"):
        async with gateway_for(pool, settings, routing=routing_with(ttl)) as gateway:
            planned += [
                gateway.plan(call),
                gateway.plan(call.model_copy(update={"prompt_cache": False})),
            ]
    assert len({p.digest for p in planned}) == 1
    assert {len(marks(p.sent)) for p in planned} == {0, MAX_BREAKPOINTS}
    assert all("cache_control" not in repr(p.request) for p in planned)


# --- what the provider caches, and what it costs -----------------------------------------------


async def test_a_shared_system_prompt_is_written_once_then_read(
    gateway: ModelActivities, tenant: Tenant, sim_url: str
) -> None:
    first = await run(gateway, call_for(tenant, "Question one?", system=POLICY, cache=False))
    second = await run(gateway, call_for(tenant, "Question two?", system=POLICY, cache=False))

    sent = await last_sent(sim_url, "Question two?")
    assert marks(sent) == ["system.0"]
    assert ttls(sent) == {"5m"}  # the draft route's TTL
    assert first.usage.cache_write_tokens > 1024
    assert first.usage.cache_read_tokens == 0
    assert second.usage.cache_write_tokens == 0
    assert second.usage.cache_read_tokens == first.usage.cache_write_tokens
    assert second.usage.cost_nusd < first.usage.cost_nusd / 3
    assert second.usage.cache_saved_nusd > 0 > first.usage.cache_saved_nusd  # a write costs more
    # Settled from the provider's own counts at the listed rates.
    for reply in (first, second):
        counts = TokenCounts(**reply.usage.model_dump(include=set(TokenCounts.model_fields)))
        assert reply.usage.cost_nusd == PRICES.cost_nusd(reply.model, counts)


async def test_the_routes_ttl_is_asked_for_and_billed_at_its_rate(
    pool: Pool, settings: Settings, tenant: Tenant, sim_url: str
) -> None:
    replies = {}
    for ttl in ("5m", "1h"):
        async with gateway_for(pool, settings, routing=routing_with(ttl)) as gateway:
            # A prefix of its own per TTL: each call writes its whole prefix.
            call = call_for(tenant, f"Only {ttl}?", system=f"{ttl}: {POLICY}", cache=False)
            replies[ttl] = await run(gateway, call)
        assert ttls(await last_sent(sim_url, f"Only {ttl}?")) == {ttl}
    five, hour = replies["5m"].usage, replies["1h"].usage
    assert five.cache_write_tokens == hour.cache_write_tokens > 1024
    # The provider's split of the writes by TTL, as recorded.
    assert (five.cache_write_1h_tokens, hour.cache_write_1h_tokens) == (0, hour.cache_write_tokens)
    # 1-hour writes at 2x input, 5-minute ones at 1.25x (sonnet: $4 and $2.50 per million).
    written = hour.cache_write_tokens
    assert hour.cost_nusd - five.cost_nusd == (4000 - 2500) * written


async def test_a_step_or_a_route_may_opt_out(
    pool: Pool, settings: Settings, gateway: ModelActivities, tenant: Tenant, sim_url: str
) -> None:
    opted = await run(
        gateway, call_for(tenant, "No caching here?", system=POLICY, prompt_cache=False)
    )
    assert marks(await last_sent(sim_url, "No caching here?")) == []
    assert (opted.usage.cache_write_tokens, opted.usage.cache_read_tokens) == (0, 0)
    async with gateway_for(pool, settings, routing=routing_with("off")) as off:
        await run(off, call_for(tenant, "Route says off?", system=POLICY))
    assert marks(await last_sent(sim_url, "Route says off?")) == []


async def test_the_response_cache_key_ignores_prompt_caching(
    gateway: ModelActivities, tenant: Tenant
) -> None:
    """The same step with and without breakpoints is the same request: the second is a
    response-cache hit."""
    first = await run(gateway, call_for(tenant, "Same question?", system=POLICY))
    again = await run(
        gateway, call_for(tenant, "Same question?", system=POLICY, prompt_cache=False)
    )
    assert (first.cache_hit, again.cache_hit) == (False, True)
    assert again.content == first.content


async def test_the_reservation_prices_writes_at_the_ttls_rate(
    pool: Pool, settings: Settings, tenant: Tenant
) -> None:
    async with pool.acquire() as conn:
        await budgets.set_budget(conn, tenant.id, "customer", "", "day", 10.0)
    reserved = {}
    for ttl in ("off", "1h"):
        call = call_for(tenant, f"Reserve {ttl}?", system=POLICY, cache=False)
        async with gateway_for(pool, settings, routing=routing_with(ttl)) as gateway:
            reply = await run(gateway, call)
        async with pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT amount_nusd, charged_nusd FROM budget_reservations WHERE call_key = $1",
                call.call_key,
            )
        assert row is not None
        reserved[ttl] = int(row["amount_nusd"])
        assert row["charged_nusd"] == reply.usage.cost_nusd  # settled from actual usage
    # Every prompt token may be written at the 1-hour rate (2x input): the worst case is
    # dearer than the same call uncached (the output part is the same).
    output_part = PRICES.worst_case_nusd(reply.model, 0, 200)
    assert reserved["1h"] - output_part == pytest.approx(2 * (reserved["off"] - output_part), 0.01)


# --- what a tenant sees ----------------------------------------------------------------------


async def test_usage_ledger_and_metrics_show_the_cache(
    gateway: ModelActivities, tenant: Tenant, api: httpx.AsyncClient, pool: Pool
) -> None:
    def read(model: str) -> float:
        sample = metrics.MODEL_PROMPT_TOKENS.labels("doc-qa", model, "cache_read")
        return float(sample._value.get())

    calls: list[ModelCall] = [
        call_for(tenant, f"Question {i}?", system=POLICY, pipeline="doc-qa", cache=False)
        for i in range(3)
    ]
    model = (await run(gateway, calls[0])).model
    before = read(model)
    replies = [await run(gateway, call) for call in calls[1:]]
    assert read(model) - before == sum(r.usage.cache_read_tokens for r in replies) > 0

    report = await api.get("/v1/usage?group_by=pipeline_model", headers=tenant.auth("admin"))
    assert report.status_code == 200, report.text
    [row] = report.json()["rows"]
    assert row["key"] == f"doc-qa/{model}"
    prompt = row["input_tokens"] + row["cache_read_tokens"] + row["cache_write_tokens"]
    assert row["prompt_cache_hit_ratio"] == round(row["cache_read_tokens"] / prompt, 4) > 0.5
    assert row["prompt_cache_saved_usd"] > 0  # two reads paid back the one write
    async with pool.acquire() as conn:
        stored = await conn.fetch(
            "SELECT cache_read_tokens, cache_saved_nusd FROM model_usage WHERE tenant_id = $1",
            tenant.id,
        )
    assert sum(r["cache_saved_nusd"] for r in stored) == round(row["prompt_cache_saved_usd"] * 1e9)
