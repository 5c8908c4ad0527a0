"""Running the model gateway activity in tests: a gateway on the real SDK, simulator and store,
calls for a tenant, and the simulator's record of what the gateway sent."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from stead.calls import ModelCall, ModelReply
from stead.config import Settings
from stead.contract import RunContext
from stead.gateway.model import ModelActivities
from stead.policy.models import PriceTable, RoutingPolicy, load_prices, load_routing
from stead.store.audit import audit_writer
from stead.store.db import Pool
from stead.worker import model_client
from tests.conftest import Tenant


@asynccontextmanager
async def gateway_for(
    pool: Pool,
    settings: Settings,
    *,
    routing: RoutingPolicy | None = None,
    prices: PriceTable | None = None,
) -> AsyncIterator[ModelActivities]:
    client = model_client(settings)
    try:
        yield ModelActivities(
            pool,
            client,
            prices or load_prices(),
            routing or load_routing(),
            audit_writer(settings),
            heartbeat_every=0.2,
        )
    finally:
        await client.close()


def call_for(tenant: Tenant, text: str = "Summarize: the sky is blue.", **fields: Any) -> ModelCall:
    """A call of a fresh run of `tenant`'s; `fields` are ModelCall's, and `pipeline`."""
    run_id = f"r_{uuid.uuid4().hex[:12]}"
    context = RunContext(
        tenant=tenant.id,
        run_id=run_id,
        pipeline=fields.pop("pipeline", "summarize"),
        requested_by="requester",
        budget_usd=fields.pop("budget_usd", None),
    )
    return ModelCall(
        context=context,
        step=fields.pop("step", "summarize"),
        call_key=f"{tenant.id}:{run_id}:model:1",
        task=fields.pop("task", "draft"),
        messages=fields.pop("messages", [{"role": "user", "content": text}]),
        **{"max_tokens": 200, **fields},
    )


async def run(gateway: ModelActivities, call: ModelCall, attempt: int = 1) -> ModelReply:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, attempt=attempt)
    return await env.run(gateway.call_model, call)


async def refused(gateway: ModelActivities, call: ModelCall) -> ApplicationError:
    with pytest.raises(ApplicationError) as caught:
        await run(gateway, call)
    return caught.value


async def sent_requests(sim_url: str) -> list[dict[str, Any]]:
    """The latest request bodies the simulator received, newest last."""
    async with httpx.AsyncClient(base_url=sim_url, headers={"x-api-key": "test"}) as http:
        response = await http.get("/_sim/requests")
    response.raise_for_status()
    found: list[dict[str, Any]] = response.json()
    return found


async def last_sent(sim_url: str, marker: str) -> dict[str, Any]:
    """The newest request whose first message contains `marker` (tests share the simulator)."""
    for body in reversed(await sent_requests(sim_url)):
        if marker in repr(body.get("messages", [])[:1]):
            return dict(body)
    raise AssertionError(f"the simulator received no request with {marker!r}")
