"""Deferred model calls through the Message Batches API, on the real SDK, simulator, Temporal
and PostgreSQL: runs share a batch and each sees its own result, batch rates are charged, the
reservation holds for the wait, cancelling a run cancels its request, a deadline or a failed
request falls back to a direct call, and the wait survives a worker's death."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
import yaml
from temporalio.client import Client

from stead.config import Settings
from stead.gateway.batches import batcher_id, custom_id_of
from stead.policy.models import TokenCounts, load_prices
from stead.service.runs import workflow_id
from stead.sim.messages import SimConfig, SimState, create_app
from stead.store import budgets
from stead.store.db import Pool
from stead.transcript import INLINE_BYTES
from tests.conftest import Tenant, running_workers, spawn_worker
from tests.helpers import eventually, record_history, start_run, wait_finished
from tests.servers import serve_app

PRICES = load_prices()
FAST = {"max_requests": 50, "max_age_seconds": 0.5, "poll_seconds": 0.3, "deadline_seconds": 600}


def policy_dir(path: Path, **batches: float) -> str:
    """A policy directory whose routing.yaml makes the batcher quick (test-sized timers)."""
    path.mkdir(exist_ok=True)
    (path / "routing.yaml").write_text(yaml.safe_dump({"batches": {**FAST, **batches}}))
    return str(path)


@pytest.fixture
def batch_settings(test_settings: Settings, tmp_path: Path) -> Settings:
    return test_settings.model_copy(update={"policy_path_dirs": policy_dir(tmp_path / "pol")})


@pytest.fixture
async def batch_api(
    api_for: Callable[[Settings], httpx.AsyncClient], batch_settings: Settings
) -> httpx.AsyncClient:
    return api_for(batch_settings)


@pytest.fixture
async def batch_worker(client: Client, batch_settings: Settings, pool: Pool) -> AsyncIterator[None]:
    async with running_workers(client, batch_settings, pool):
        yield


@pytest.fixture
async def sim_batches(sim_url: str) -> AsyncIterator[Callable[[float], Any]]:
    """Set the session simulator's batch delay; restored after the test."""
    async with httpx.AsyncClient(base_url=sim_url, headers={"x-api-key": "test"}) as http:

        async def delay(seconds: float) -> None:
            response = await http.post("/_sim/config", json={"batch_delay_seconds": seconds})
            response.raise_for_status()

        await delay(0.2)
        yield delay
        await delay(1.0)


def deferred_summary(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "pipeline": "summarize",
        "input": {"text": text, "review": False},
        "defer": True,
        **extra,
    }


async def finished(api: httpx.AsyncClient, tenant: Tenant, run_id: str) -> dict[str, Any]:
    return await wait_finished(api, tenant, run_id)


async def all_submitted(pool: Pool, tenant: Tenant, count: int) -> None:
    await eventually(
        lambda: deferred_rows(pool, tenant),
        lambda rows: [r["status"] for r in rows] == ["submitted"] * count,
        within=60,
    )


async def cancel(api: httpx.AsyncClient, tenant: Tenant, run_id: str) -> None:
    response = await api.post(
        f"/v1/runs/{run_id}/cancel", json={"reason": "not needed"}, headers=tenant.auth("requester")
    )
    assert response.status_code in (200, 202), response.text


async def usage_of(pool: Pool, tenant: Tenant) -> list[dict[str, Any]]:
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT run_id, call_key, attempt, model, batch, cost_nusd, input_tokens,"
            " output_tokens, cache_read_tokens, cache_write_tokens, cache_write_1h_tokens,"
            " thinking_tokens FROM model_usage WHERE tenant_id = $1 ORDER BY at",
            tenant.id,
        )
    return [dict(r) for r in rows]


async def deferred_rows(pool: Pool, tenant: Tenant) -> list[dict[str, Any]]:
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT custom_id, status, abandoned, batch_id, request IS NULL AS dropped"
            " FROM model_batch_requests WHERE tenant_id = $1",
            tenant.id,
        )
    return [dict(r) for r in rows]


def cost_at_batch_rates(row: dict[str, Any]) -> int:
    counts = TokenCounts(**{k: row[k] for k in TokenCounts.model_fields})
    return PRICES.cost_nusd(row["model"], counts, batch=True)


# --- the simulator's batch endpoints ----------------------------------------------------------


@pytest.fixture
async def own_sim() -> AsyncIterator[tuple[anthropic.AsyncAnthropic, SimState, list[float]]]:
    """A simulator of its own with a hand-driven clock: batches process when it passes 60 s."""
    app = create_app(SimConfig(batch_delay_seconds=60))
    state: SimState = app.state.sim
    now = [0.0]
    state.clock = lambda: now[0]
    async with (
        serve_app(app) as url,
        anthropic.AsyncAnthropic(api_key="k", base_url=url, max_retries=0) as client,
    ):
        yield client, state, now


def params(text: str) -> dict[str, Any]:
    return {
        "model": "claude-sonnet-5-5",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": text}],
    }


async def test_the_simulator_processes_a_batch_after_its_delay(
    own_sim: tuple[anthropic.AsyncAnthropic, SimState, list[float]],
) -> None:
    client, state, now = own_sim
    made = await client.messages.batches.create(
        requests=[
            {"custom_id": "a", "params": params("First text.")},  # type: ignore[typeddict-item]  # plain dicts, as the gateway sends
            {"custom_id": "b", "params": params("sim_batch_result: errored\nSecond.")},  # type: ignore[typeddict-item]  # the same
            {"custom_id": "c", "params": {"model": "claude-sonnet-5-5"}},  # type: ignore[typeddict-item]  # invalid on purpose
        ]
    )
    assert made.processing_status == "in_progress"
    assert made.request_counts.processing == 3
    assert made.results_url is None
    now[0] = 59
    assert (await client.messages.batches.retrieve(made.id)).processing_status == "in_progress"
    now[0] = 61
    ended = await client.messages.batches.retrieve(made.id)
    assert ended.processing_status == "ended"
    assert (ended.request_counts.succeeded, ended.request_counts.errored) == (1, 2)
    results = {r.custom_id: r.result async for r in await client.messages.batches.results(made.id)}
    assert results["a"].type == "succeeded"
    assert results["a"].message.usage.service_tier == "batch"
    assert results["b"].type == "errored"
    assert results["c"].type == "errored"
    assert "max_tokens" in results["c"].error.error.message
    assert state.batches.requests == 3


async def test_the_simulator_cancels_and_refuses_like_upstream(
    own_sim: tuple[anthropic.AsyncAnthropic, SimState, list[float]],
) -> None:
    client, _, now = own_sim
    made = await client.messages.batches.create(
        requests=[{"custom_id": "x", "params": params("Cancel me.")}]  # type: ignore[typeddict-item]  # a plain dict
    )
    canceling = await client.messages.batches.cancel(made.id)
    assert canceling.processing_status == "canceling"
    ended = await client.messages.batches.retrieve(made.id)
    assert (ended.processing_status, ended.request_counts.canceled) == ("ended", 1)
    now[0] = 1000  # too late to process it: it was cancelled
    [result] = [r async for r in await client.messages.batches.results(made.id)]
    assert result.result.type == "canceled"
    with pytest.raises(anthropic.NotFoundError):
        await client.messages.batches.retrieve("msgbatch_nope")
    with pytest.raises(anthropic.BadRequestError, match="custom_id"):
        await client.messages.batches.create(
            requests=[{"custom_id": "not ok!", "params": params("x")}]  # type: ignore[typeddict-item]  # a plain dict
        )
    with pytest.raises(anthropic.BadRequestError, match="unique"):
        await client.messages.batches.create(
            requests=[{"custom_id": "d", "params": params("x")}] * 2  # type: ignore[typeddict-item]  # a plain dict
        )


async def test_another_keys_batch_is_not_found(
    own_sim: tuple[anthropic.AsyncAnthropic, SimState, list[float]],
) -> None:
    client, _, _ = own_sim
    made = await client.messages.batches.create(
        requests=[{"custom_id": "x", "params": params("Mine.")}]  # type: ignore[typeddict-item]  # a plain dict
    )
    other = client.with_options(api_key="someone-else")
    with pytest.raises(anthropic.NotFoundError):
        await other.messages.batches.retrieve(made.id)


# --- deferred runs ---------------------------------------------------------------------------


@pytest.mark.usefixtures("batch_worker", "sim_batches")
async def test_runs_share_a_batch_and_each_gets_its_own_result_at_batch_rates(
    batch_api: httpx.AsyncClient,
    tenant: Tenant,
    pool: Pool,
    client: Client,
    batch_settings: Settings,
) -> None:
    texts = [f"Deferred text number {i}: revenue grew {i}%." for i in range(3)]
    run_ids = await asyncio.gather(
        *(start_run(batch_api, tenant, deferred_summary(t)) for t in texts)
    )
    done = [await finished(batch_api, tenant, r) for r in run_ids]
    for text, run in zip(texts, done, strict=True):
        assert run["status"] == "completed", run
        assert run["result"]["summary"] == f"Summary: {text}"  # its own, not a neighbour's
        assert run["usage"]["batch_calls"] == 1
    rows = await deferred_rows(pool, tenant)
    assert {r["status"] for r in rows} == {"succeeded"}
    assert len({r["batch_id"] for r in rows}) == 1  # one batch for the three runs
    assert all(r["dropped"] for r in rows)  # prompts are not kept once submitted
    used = await usage_of(pool, tenant)
    assert len(used) == 3
    for row in used:
        assert row["batch"] is True
        assert row["cost_nusd"] == cost_at_batch_rates(row)
        direct = PRICES.cost_nusd(
            row["model"], TokenCounts(**{k: row[k] for k in TokenCounts.model_fields})
        )
        assert row["cost_nusd"] * 2 == pytest.approx(direct, abs=1)
    ledger = (
        await batch_api.get(f"/v1/runs/{run_ids[0]}/ledger", headers=tenant.auth("admin"))
    ).json()
    [call] = [i for i in ledger["items"] if i["kind"] == "model_call"]
    assert call["batch"] is True
    await record_history(
        client.get_workflow_handle(workflow_id(tenant.id, run_ids[0])), "summarize_deferred"
    )
    batcher = client.get_workflow_handle(batcher_id(batch_settings.task_queue, tenant.id))
    # Its tasks go ahead of the runs' own: a backlog of runs must not hold up every batch.
    described = (await batcher.describe()).raw_description.workflow_execution_info
    assert described.priority.priority_key == 1
    await record_history(batcher, "modelbatcher_three_runs")


@pytest.mark.usefixtures("batch_worker")
async def test_the_reservation_holds_for_the_wait_and_settles_from_usage(
    batch_api: httpx.AsyncClient,
    tenant: Tenant,
    pool: Pool,
    sim_batches: Callable[[float], Any],
) -> None:
    await sim_batches(3.0)
    async with pool.acquire() as conn:
        await budgets.set_budget(conn, tenant.id, "customer", "", "day", 1.0)
    run_id = await start_run(batch_api, tenant, deferred_summary("Hold the budget, please."))

    async def counter() -> dict[str, Any]:
        async with pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT c.spent_nusd, c.reserved_nusd, r.held_until FROM budget_counters c,"
                " budget_reservations r WHERE c.tenant_id = $1 AND r.tenant_id = $1",
                tenant.id,
            )
        return dict(row) if row else {}

    waiting = await eventually(counter, lambda c: bool(c) and c["reserved_nusd"] > 0)
    assert waiting["held_until"] is not None  # the sweeper leaves it alone
    assert waiting["spent_nusd"] == 0
    run = await finished(batch_api, tenant, run_id)
    assert run["status"] == "completed"
    settled = await counter()
    [row] = await usage_of(pool, tenant)
    assert (settled["reserved_nusd"], settled["spent_nusd"]) == (0, row["cost_nusd"])


@pytest.mark.usefixtures("batch_worker")
async def test_cancelling_a_run_cancels_its_batch_when_it_is_the_only_one(
    batch_api: httpx.AsyncClient,
    tenant: Tenant,
    pool: Pool,
    sim: Any,
    sim_batches: Callable[[float], Any],
) -> None:
    await sim_batches(600)
    before = (await sim.stats())["batches_canceled"]
    run_id = await start_run(batch_api, tenant, deferred_summary("Cancel me while I wait."))
    await all_submitted(pool, tenant, 1)
    await cancel(batch_api, tenant, run_id)
    run = await finished(batch_api, tenant, run_id)
    assert run["status"] == "cancelled"
    assert (await sim.stats())["batches_canceled"] == before + 1
    # The batch ends canceled; nothing is billed and the reservation is released.
    rows = await eventually(
        lambda: deferred_rows(pool, tenant), lambda rows: rows[0]["status"] == "canceled"
    )
    assert rows[0]["abandoned"] is True
    assert await usage_of(pool, tenant) == []


@pytest.mark.usefixtures("batch_worker")
async def test_a_cancelled_run_leaves_a_shared_batch_to_the_others(
    batch_api: httpx.AsyncClient,
    tenant: Tenant,
    pool: Pool,
    sim: Any,
    sim_batches: Callable[[float], Any],
) -> None:
    await sim_batches(3.0)
    before = (await sim.stats())["batches_canceled"]
    runs = await asyncio.gather(
        *(start_run(batch_api, tenant, deferred_summary(f"Shared {i}.")) for i in range(2))
    )
    await all_submitted(pool, tenant, 2)
    await cancel(batch_api, tenant, runs[0])
    assert (await finished(batch_api, tenant, runs[0]))["status"] == "cancelled"
    other = await finished(batch_api, tenant, runs[1])
    assert other["status"] == "completed"
    assert other["result"]["summary"] == "Summary: Shared 1."
    assert (await sim.stats())["batches_canceled"] == before  # the other still wanted it
    # The cancelled run's answer came anyway: the provider billed it, so it is recorded.
    used = await usage_of(pool, tenant)
    assert sorted(r["run_id"] for r in used) == sorted(runs)


@pytest.mark.usefixtures("batch_worker")
async def test_past_its_deadline_a_call_is_made_directly(
    batch_api: httpx.AsyncClient,
    tenant: Tenant,
    pool: Pool,
    client: Client,
    sim_batches: Callable[[float], Any],
) -> None:
    await sim_batches(600)
    body = deferred_summary("Too slow a batch.", defer_deadline_seconds=2)
    run_id = await start_run(batch_api, tenant, body)
    run = await finished(batch_api, tenant, run_id)
    assert run["status"] == "completed"
    assert run["result"]["summary"] == "Summary: Too slow a batch."
    [row] = await usage_of(pool, tenant)
    assert row["batch"] is False  # the direct call, at standard rates
    [deferred] = await deferred_rows(pool, tenant)
    assert deferred["abandoned"] is True
    await record_history(
        client.get_workflow_handle(workflow_id(tenant.id, run_id)), "summarize_deferred_fallback"
    )


@pytest.mark.usefixtures("batch_worker")
@pytest.mark.parametrize("batch_delay", [0.2, 600.0], ids=["batched", "past-deadline"])
async def test_a_long_deferred_prompt_is_stored_once_and_reaches_the_model_whole(
    batch_api: httpx.AsyncClient,
    tenant: Tenant,
    pool: Pool,
    sim_batches: Callable[[float], Any],
    batch_delay: float,
) -> None:
    """A prompt past the inline limit goes to the conversation store by the defer step; the
    batch, and the direct call made at the deadline, both send it whole (the same input tokens
    as the same prompt sent directly)."""
    await sim_batches(batch_delay)
    facts = " ".join(f"fact{i}" for i in range(2 * INLINE_BYTES // 6))
    # Of the same length, and not the same text: the deferred call is no cache hit.
    text, twin = f"A long deferred text. {facts}", f"A long directed text. {facts}"
    direct_id = await start_run(
        batch_api, tenant, {"pipeline": "summarize", "input": {"text": twin, "review": False}}
    )
    direct = await finished(batch_api, tenant, direct_id)
    deadline = 2 if batch_delay > 60 else 600
    run_id = await start_run(
        batch_api, tenant, deferred_summary(text, defer_deadline_seconds=deadline)
    )
    run = await finished(batch_api, tenant, run_id)
    assert run["status"] == direct["status"] == "completed", run
    assert run["result"]["summary"] == direct["result"]["summary"].replace("directed", "deferred")
    first, deferred = await usage_of(pool, tenant)
    assert (first["batch"], deferred["batch"]) == (False, batch_delay < 60)
    assert deferred["input_tokens"] == first["input_tokens"] > INLINE_BYTES // 4
    async with pool.acquire() as conn:
        stored = await conn.fetch(
            "SELECT depth FROM conversation_messages WHERE workflow_id = $1",
            workflow_id(tenant.id, run_id),
        )
    assert [r["depth"] for r in stored] == [1, 2]  # the preamble, the prompt


@pytest.mark.usefixtures("batch_worker", "sim_batches")
async def test_a_request_the_batch_fails_is_made_directly(
    batch_api: httpx.AsyncClient, tenant: Tenant, pool: Pool
) -> None:
    run_id = await start_run(
        batch_api, tenant, deferred_summary("sim_batch_result: errored\nRetry me directly.")
    )
    run = await finished(batch_api, tenant, run_id)
    assert run["status"] == "completed"
    [deferred] = await deferred_rows(pool, tenant)
    assert deferred["status"] == "errored"
    [row] = await usage_of(pool, tenant)
    assert row["batch"] is False
    actions = [
        i.get("action")
        for i in (
            await batch_api.get(f"/v1/runs/{run_id}/ledger", headers=tenant.auth("admin"))
        ).json()["items"]
    ]
    assert "model.batch_failed" in actions


async def test_bad_defer_values_are_refused(batch_api: httpx.AsyncClient, tenant: Tenant) -> None:
    for extra in (
        '"defer_deadline_seconds": 60',  # without defer
        '"defer": true, "defer_deadline_seconds": 0',
        '"defer": true, "defer_deadline_seconds": 1e999',  # infinity
        '"defer": true, "defer_deadline_seconds": 86401',
        '"defer": "sometimes"',
    ):
        body = '{"pipeline": "summarize", "input": {"text": "x"}, ' + extra + "}"
        response = await batch_api.post(
            "/v1/runs",
            content=body,
            headers={**tenant.auth("requester"), "Content-Type": "application/json"},
        )
        assert response.status_code == 422, (extra, response.text)


async def test_the_wait_survives_the_workers_death(
    client: Client,
    batch_settings: Settings,
    batch_api: httpx.AsyncClient,
    tenant: Tenant,
    pool: Pool,
    sim_batches: Callable[[float], Any],
    tmp_path: Path,
) -> None:
    """SIGKILL the worker while runs wait for their batch: a new worker's batcher finds the
    batch, records each result once, and every run completes once, billed once."""
    await sim_batches(4.0)
    log = tmp_path / "worker.log"
    first = spawn_worker(client, batch_settings, log)
    second = None
    try:
        runs = await asyncio.gather(
            *(start_run(batch_api, tenant, deferred_summary(f"Survive {i}.")) for i in range(3)),
        )
        await all_submitted(pool, tenant, 3)
        first.kill()
        first.wait()
        second = spawn_worker(client, batch_settings, log)
        done = [await finished(batch_api, tenant, r) for r in runs]
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    assert [r["status"] for r in done] == ["completed"] * 3
    assert [r["result"]["summary"] for r in done] == [f"Summary: Survive {i}." for i in range(3)]
    used = await usage_of(pool, tenant)
    assert sorted(r["run_id"] for r in used) == sorted(runs)  # each billed once
    assert all(r["batch"] for r in used)
    async with pool.acquire() as conn:
        open_reservations = await conn.fetchval(
            "SELECT count(*) FROM budget_reservations WHERE tenant_id = $1 AND status = 'reserved'",
            tenant.id,
        )
    assert open_reservations == 0
    assert {custom_id_of(r["call_key"]) for r in used} == {
        r["custom_id"] for r in await deferred_rows(pool, tenant)
    }
