"""Traces cross the whole path without carrying content; metrics expose bounded labels and
pass promtool; the worker's /metrics holds Stead's and the Temporal SDK's metrics."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest
from temporalio.client import Client

from api.app import refresh_gauges
from stead import metrics
from stead.config import Settings
from store.db import Pool
from tests.conftest import SPANS, Tenant, spawn_worker
from tests.helpers import eventually, free_ports, wait_json

PROMTOOL = shutil.which("promtool")


@pytest.mark.usefixtures("worker")
async def test_one_trace_from_request_to_model_call(api: httpx.AsyncClient, tenant: Tenant) -> None:
    canary = f"canary-{uuid.uuid4().hex}"
    SPANS.clear()
    started = await api.post(
        "/v1/runs",
        json={
            "pipeline": "summarize",
            "input": {"text": f"{canary} in a sentence.", "review": False},
        },
        headers=tenant.auth("requester"),
    )
    run_id = started.json()["run_id"]
    await wait_json(
        api, f"/v1/runs/{run_id}", tenant.auth("requester"), lambda b: b["status"] == "completed"
    )

    async def names() -> set[str]:
        return {s.name for s in SPANS.get_finished_spans()}

    await eventually(names, lambda found: "model.call" in found)
    spans = SPANS.get_finished_spans()
    by_name = {s.name: s for s in spans}
    http = by_name["POST /v1/runs"]
    chain = [
        "StartWorkflow:summarize",
        "RunWorkflow:summarize",
        "StartActivity:model.call",
        "RunActivity:model.call",
        "model.call",
    ]
    for name in chain:
        assert name in by_name, f"missing span {name}; have {sorted(by_name)}"
        assert by_name[name].context.trace_id == http.context.trace_id, name
    model = by_name["model.call"].attributes or {}
    assert model["stead.tenant"] == tenant.id
    assert model["stead.pipeline"] == "summarize"
    assert model["stead.model"] == "claude-sonnet-5-5"
    assert isinstance(model["stead.input_tokens"], int)
    assert model["stead.input_tokens"] > 0
    assert isinstance(model["stead.cost_usd"], float)
    assert model["stead.cost_usd"] > 0
    for item in spans:
        for value in (item.attributes or {}).values():
            assert canary not in str(value), f"content leaked into span {item.name}"
    assert (http.attributes or {})["http.route"] == "/v1/runs"


async def promtool_accepts(exposition: str) -> None:
    assert PROMTOOL is not None
    checked = await asyncio.to_thread(
        subprocess.run,
        [PROMTOOL, "check", "metrics"],
        input=exposition,
        text=True,
        capture_output=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def _labels(exposition: str) -> set[str]:
    return set(re.findall(r'="([^"]*)"', exposition))


@pytest.mark.usefixtures("worker")
async def test_api_metrics_have_bounded_labels(api: httpx.AsyncClient, tenant: Tenant) -> None:
    run = await api.post(
        "/v1/runs",
        json={"pipeline": "summarize", "input": {"text": "x", "review": False}},
        headers=tenant.auth("requester"),
    )
    await api.get(f"/v1/runs/{run.json()['run_id']}", headers=tenant.auth("requester"))
    exposition = (await api.get("/metrics")).text
    assert (
        'stead_http_requests_total{method="GET",route="/v1/runs/{run_id}",status="2xx"}'
        in exposition
    )
    labels = _labels(exposition)
    assert tenant.id not in labels
    assert not [value for value in labels if value.startswith("r_")]  # no run ids
    if PROMTOOL:
        await promtool_accepts(exposition)


async def test_worker_metrics_merge_stead_and_sdk(
    client: Client, test_settings: Settings, api: httpx.AsyncClient, tenant: Tenant, tmp_path: Path
) -> None:
    [port] = free_ports(1)
    settings = test_settings.model_copy(update={"worker_metrics_port": port})
    worker = spawn_worker(client, settings, tmp_path / "worker.log")
    try:
        run = await api.post(
            "/v1/runs",
            json={"pipeline": "summarize", "input": {"text": "y", "review": False}},
            headers=tenant.auth("requester"),
        )
        await wait_json(
            api,
            f"/v1/runs/{run.json()['run_id']}",
            tenant.auth("requester"),
            lambda b: b["status"] == "completed",
            within=30,
        )
        url = f"http://127.0.0.1:{port}/metrics"

        async def scrape() -> str:
            try:
                async with httpx.AsyncClient() as http:
                    return (await http.get(url)).text
            except httpx.HTTPError:
                return ""

        exposition = await eventually(
            scrape,
            lambda text: "stead_runs_finished_total" in text and "temporal_" in text,
            within=30,
        )
    finally:
        worker.terminate()
        assert worker.wait(timeout=30) == 0
    assert 'stead_runs_finished_total{pipeline="summarize",status="completed"}' in exposition
    assert "stead_stage_duration_seconds_bucket" in exposition
    assert "stead_model_tokens_total" in exposition
    assert "temporal_workflow_completed" in exposition or "temporal_workflow_task" in exposition
    assert tenant.id not in _labels(exposition)
    if not PROMTOOL:
        pytest.skip("promtool not installed (Debian package prometheus): exposition lint skipped")
    await promtool_accepts(exposition)


@pytest.mark.usefixtures("worker")
async def test_pending_approvals_gauge_follows_the_store(
    api: httpx.AsyncClient, tenant: Tenant, pool: Pool, client: Client
) -> None:
    run = await api.post(
        "/v1/runs",
        json={"pipeline": "summarize", "input": {"text": "z"}},
        headers=tenant.auth("requester"),
    )
    await wait_json(api, "/v1/approvals", tenant.auth("approver"), lambda b: len(b["items"]) == 1)
    refresher = asyncio.create_task(refresh_gauges(pool, client, every=0.05))
    try:
        async with pool.acquire() as conn:
            expected = await conn.fetchval(
                "SELECT count(*) FROM approvals WHERE status = 'pending'"
            )

        async def gauge() -> float:
            return float(metrics.APPROVALS_PENDING._value.get())

        await eventually(gauge, lambda v: v == expected)
    finally:
        refresher.cancel()
    assert expected >= 1
    assert run.status_code == 201
