"""Extended thinking and effort from the routing policy: asked for, budgeted, billed as output,
shown in the ledger; the simulator thinks when asked and refuses what upstream refuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
import yaml
from temporalio.client import Client

from stead.config import Settings
from stead.gateway.model import input_token_bound
from stead.policy.models import (
    Effort,
    RoutingPolicy,
    Thinking,
    TokenCounts,
    load_prices,
    load_routing,
)
from stead.sim.messages import count_tokens
from stead.store import budgets
from stead.store.db import Pool
from stead.worker import model_client
from tests.conftest import Tenant, running_workers
from tests.gateway_kit import call_for, gateway_for, last_sent, run
from tests.helpers import start_run, wait_json

PRICES = load_prices()
BUDGET = 2048


def thinking_routes(effort: Effort | None = "high", budget: int = BUDGET) -> RoutingPolicy:
    """The shipped routing with thinking (and `effort`) on the `draft` task class."""
    shipped = load_routing()
    update = {"thinking": Thinking(budget_tokens=budget), "effort": effort}
    draft = {plan: r.model_copy(update=update) for plan, r in shipped.routes["draft"].items()}
    return shipped.model_copy(update={"routes": {**shipped.routes, "draft": draft}})


def counts_of(usage: Any) -> TokenCounts:
    return TokenCounts(**usage.model_dump(include=set(TokenCounts.model_fields)))


async def test_thinking_is_asked_for_and_billed_as_output(
    pool: Pool, settings: Settings, tenant: Tenant, sim_url: str
) -> None:
    async with gateway_for(pool, settings, routing=thinking_routes()) as gateway:
        reply = await run(gateway, call_for(tenant, "Think it through.", cache=False))

    sent = await last_sent(sim_url, "Think it through.")
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": BUDGET}
    assert sent["output_config"] == {"effort": "high"}
    assert sent["max_tokens"] == 200 + BUDGET  # the step's own 200 stay for its answer
    assert reply.content[0]["type"] == "thinking"
    assert reply.content[0]["signature"]
    assert reply.text.startswith("Summary:")  # the answer, without the thinking
    used = reply.usage
    assert 0 < used.thinking_tokens < used.output_tokens
    assert used.cost_nusd == PRICES.cost_nusd(reply.model, counts_of(used))
    without = counts_of(used).model_copy(
        update={"output_tokens": used.output_tokens - used.thinking_tokens, "thinking_tokens": 0}
    )
    sonnet_output = 10_000  # nano-USD per output token: thinking is billed at this rate
    assert used.cost_nusd - PRICES.cost_nusd(reply.model, without) == (
        sonnet_output * used.thinking_tokens
    )
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT thinking_tokens, output_tokens FROM model_usage WHERE tenant_id = $1",
            tenant.id,
        )
    assert row is not None
    assert (row["thinking_tokens"], row["output_tokens"]) == (
        used.thinking_tokens,
        used.output_tokens,
    )


async def test_the_thinking_budget_is_reserved(
    pool: Pool, settings: Settings, tenant: Tenant, sim_url: str
) -> None:
    async with pool.acquire() as conn:
        await budgets.set_budget(conn, tenant.id, "customer", "", "day", 5.0)
    call = call_for(tenant, "Reserve for thinking.", cache=False)
    async with gateway_for(pool, settings, routing=thinking_routes()) as gateway:
        reply = await run(gateway, call)
        bound = input_token_bound(gateway.plan(call).sent)
    sent = await last_sent(sim_url, "Reserve for thinking.")
    async with pool.acquire() as conn:
        reserved = await conn.fetchval(
            "SELECT amount_nusd FROM budget_reservations WHERE call_key = $1", call.call_key
        )
    route = thinking_routes().route("draft", "standard")
    counted = count_tokens({k: v for k, v in sent.items() if k != "max_tokens"})
    assert bound is not None
    assert bound >= counted

    def worst(input_tokens: int) -> int:
        return max(
            PRICES.worst_case_nusd(m, input_tokens, 200 + BUDGET, cache_ttl=route.cache_ttl)
            for m in route.models
        )

    # The thinking budget is output the call may bill: in the worst case, beside max_tokens
    # (reserved from the bound on the input, the budget having room for it).
    assert reserved == worst(bound)
    assert reply.usage.cost_nusd < worst(counted)


async def test_effort_sets_how_much_is_thought(
    pool: Pool, settings: Settings, tenant: Tenant
) -> None:
    spent = {}
    for effort in ("low", "max"):
        async with gateway_for(pool, settings, routing=thinking_routes(effort)) as gateway:
            reply = await run(gateway, call_for(tenant, f"Effort {effort}.", cache=False))
        spent[effort] = reply.usage.thinking_tokens
    assert 0 < spent["low"] < spent["max"] <= BUDGET


async def test_a_forced_tool_call_goes_without_thinking(
    pool: Pool, settings: Settings, tenant: Tenant, sim_url: str
) -> None:
    """The API refuses thinking with a forced tool (structured output): the gateway leaves it
    off such a call instead of failing the step."""
    tool = {"name": "respond", "input_schema": {"type": "object", "properties": {}}}
    call = call_for(
        tenant,
        "Answer in structure.",
        tools=[tool],
        tool_choice={"type": "tool", "name": "respond"},
    )
    async with gateway_for(pool, settings, routing=thinking_routes()) as gateway:
        reply = await run(gateway, call)
    assert "thinking" not in await last_sent(sim_url, "Answer in structure.")
    assert [b["name"] for b in reply.tool_uses] == ["respond"]


async def test_thinking_blocks_go_back_in_an_agent_loop(
    pool: Pool, settings: Settings, tenant: Tenant
) -> None:
    tool = {
        "name": "lookup_customer",
        "input_schema": {
            "type": "object",
            "properties": {"customer_id": {"type": "string"}},
            "required": ["customer_id"],
        },
    }
    messages: list[dict[str, Any]] = [{"role": "user", "content": "customer_id: cus_1\nHelp."}]
    async with gateway_for(pool, settings, routing=thinking_routes()) as gateway:
        first = await run(gateway, call_for(tenant, messages=messages, tools=[tool], cache=False))
        [use] = first.tool_uses
        messages += [
            {"role": "assistant", "content": first.content},  # thinking block included
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": use["id"],
                        "content": '{"name": "Jane Doe"}',
                    }
                ],
            },
        ]
        second = await run(gateway, call_for(tenant, messages=messages, tools=[tool], cache=False))
    assert first.content[0]["type"] == "thinking"
    assert second.stop_reason == "end_turn"
    assert "Jane Doe" in second.text


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ({"thinking": {"type": "enabled", "budget_tokens": 512}}, "budget_tokens"),
        ({"thinking": {"type": "enabled", "budget_tokens": 4096}}, "greater than"),
        ({"thinking": {"type": "sometimes"}}, "thinking.type"),
        ({"output_config": {"effort": "extreme"}}, "effort"),
        (
            {
                "thinking": {"type": "enabled", "budget_tokens": 1024},
                "tools": [{"name": "t", "input_schema": {"type": "object"}}],
                "tool_choice": {"type": "any"},
            },
            "forces tool use",
        ),
    ],
)
async def test_the_simulator_refuses_what_upstream_refuses(
    settings: Settings, extra: dict[str, Any], problem: str
) -> None:
    client = model_client(settings)
    try:
        with pytest.raises(anthropic.BadRequestError, match=problem):
            await client.messages.create(
                model="claude-sonnet-5-5",
                max_tokens=2048,
                messages=[{"role": "user", "content": "hi"}],
                **extra,
            )
    finally:
        await client.close()


async def test_a_runs_ledger_shows_its_thinking(
    client: Client,
    test_settings: Settings,
    pool: Pool,
    tenant: Tenant,
    api_for: Any,
    tmp_path: Path,
) -> None:
    """Through a worker and the API: a pipeline whose route thinks, and its ledger."""
    routing = {
        "routes": {
            "draft": {
                "default": {
                    "models": ["claude-sonnet-5-5"],
                    "thinking": {"budget_tokens": 1024},
                    "effort": "medium",
                }
            }
        }
    }
    (tmp_path / "routing.yaml").write_text(yaml.safe_dump(routing))
    settings = test_settings.model_copy(update={"policy_path_dirs": str(tmp_path)})
    api: httpx.AsyncClient = api_for(settings)
    async with running_workers(client, settings, pool):
        run_id = await start_run(
            api, tenant, {"pipeline": "summarize", "input": {"text": "Q3 grew.", "review": False}}
        )
        done = await wait_json(
            api, f"/v1/runs/{run_id}", tenant.auth("requester"), lambda b: b["status"] != "running"
        )
    assert done["status"] == "completed", done
    assert done["usage"]["thinking_tokens"] > 0
    ledger = (await api.get(f"/v1/runs/{run_id}/ledger", headers=tenant.auth("admin"))).json()
    [call] = [item for item in ledger["items"] if item["kind"] == "model_call"]
    assert call["thinking_tokens"] == done["usage"]["thinking_tokens"]
    assert call["output_tokens"] > call["thinking_tokens"]
