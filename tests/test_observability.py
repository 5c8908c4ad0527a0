"""Traces cross the whole path without carrying content (not even through a provider's error
text), scrapes start no trace, and the README names the spans the code makes; metrics expose
bounded labels and pass promtool, decisions are counted once with their time to decision, and
the worker's /metrics holds Stead's and the Temporal SDK's metrics. tests/test_prometheus.py
queries every dashboard and alert expression on a real Prometheus."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import shutil
import subprocess
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode
from temporalio.client import Client
from temporalio.testing import ActivityEnvironment

from stead import metrics
from stead.api.app import refresh_gauges
from stead.calls import FlushAudit
from stead.config import Settings
from stead.contract import AuditEvent
from stead.gateway.ledger import LedgerActivities
from stead.serving import serving
from stead.store.audit import audit_writer
from stead.store.db import Pool
from stead.telemetry import metrics_app, span
from tests.conftest import SPANS, Tenant, running_workers, spawn_worker
from tests.helpers import decide_pending, eventually, free_ports, start_run, wait_json

ROOT = Path(__file__).parent.parent

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


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def decided(pipeline: str, status: str) -> float:
    return sample("stead_approvals_decided_total", pipeline=pipeline, status=status)


@pytest.mark.usefixtures("worker")
async def test_decisions_are_counted_with_their_time_to_decision(
    api: httpx.AsyncClient, tenant: Tenant
) -> None:
    def figures() -> tuple[float, float, float, float]:
        return (
            decided("summarize", "approved"),
            decided("summarize", "rejected"),
            sample("stead_approval_decision_seconds_count", pipeline="summarize"),
            sample("stead_approval_decision_seconds_sum", pipeline="summarize"),
        )

    approved0, rejected0, count0, sum0 = figures()
    runs = {
        decision: await start_run(
            api, tenant, {"pipeline": "summarize", "input": {"text": f"To {decision}."}}
        )
        for decision in ("approve", "reject")
    }
    for decision, run_id in runs.items():
        assert (await decide_pending(api, tenant, run_id, decision))["status"] in (
            "approved",
            "rejected",
        )
        await wait_json(
            api,
            f"/v1/runs/{run_id}",
            tenant.auth("requester"),
            lambda b: b["status"] == "completed",
        )

    async def counted() -> tuple[float, float, float]:
        approved, rejected, count, _ = figures()
        return approved - approved0, rejected - rejected0, count - count0

    assert await eventually(counted, lambda c: c == (1, 1, 2)) == (1, 1, 2)
    waited = figures()[3] - sum0
    assert 0 < waited < 60  # seconds from request to decision, both in this test


async def test_a_decision_is_counted_once_however_often_it_is_stored(
    pool: Pool, settings: Settings, tenant: Tenant
) -> None:
    """A retried ledger write, or a replayed workflow, stores the same events again: the
    store keeps each once and the metrics count it once. An approve that leaves the quorum
    unmet settles nothing and is not counted."""

    def event(status: str) -> AuditEvent:
        return AuditEvent(
            key=f"{tenant.id}:{uuid.uuid4().hex}",
            tenant=tenant.id,
            actor="approver",
            actor_kind="user",
            action="approval.decided",
            run_id="r_counted_once",
            at=datetime.now(UTC),
            data={
                "approval_id": "ap_1",
                "decision": "approve",
                "status": status,
                "waited_seconds": 42.0,
            },
            pipeline="doc-qa",
        )

    ledger = LedgerActivities(pool, audit_writer(settings))
    batch = FlushAudit(events=[event("pending"), event("approved")])
    before = decided("doc-qa", "approved"), decided("doc-qa", "pending")
    sum_before = sample("stead_approval_decision_seconds_sum", pipeline="doc-qa")
    for _ in range(3):
        await ActivityEnvironment().run(ledger.flush, batch)
    assert decided("doc-qa", "approved") == before[0] + 1
    assert decided("doc-qa", "pending") == before[1] == 0
    assert sample("stead_approval_decision_seconds_sum", pipeline="doc-qa") == sum_before + 42


async def test_scrapes_and_probes_start_no_trace(api: httpx.AsyncClient, tenant: Tenant) -> None:
    SPANS.clear()
    async with serving(metrics_app(None)) as worker_url, httpx.AsyncClient() as http:
        for _ in range(2):
            assert (await http.get(f"{worker_url}/metrics")).status_code == 200
    assert (await api.get("/metrics")).status_code == 200
    assert (await api.get("/healthz")).status_code == 200
    # The same app traces a real request, so the check above can fail.
    assert (await api.get("/v1/runs", headers=tenant.auth("requester"))).status_code == 200
    names = [s.name for s in SPANS.get_finished_spans()]
    assert "GET /v1/runs" in names
    assert [n for n in names if "/metrics" in n or "/healthz" in n] == []


def echoing_provider() -> FastAPI:
    """A Messages-API endpoint that refuses every request with a message quoting it, as a
    real provider's validation errors can."""
    app = FastAPI(telemetry={"tracing": False, "metrics": False, "logs": False})

    async def refuse(request: Request) -> JSONResponse:
        quoted = json.dumps((await request.json()).get("messages"))
        error = {"type": "invalid_request_error", "message": f"could not parse {quoted}"}
        return JSONResponse({"type": "error", "error": error}, status_code=400)

    app.add_api_route("/v1/messages", refuse, methods=["POST"])
    app.add_api_route("/v1/messages/count_tokens", refuse, methods=["POST"])
    return app


async def test_provider_error_text_never_reaches_a_span(
    client: Client, test_settings: Settings, pool: Pool, api: httpx.AsyncClient, tenant: Tenant
) -> None:
    canary = f"canary-{uuid.uuid4().hex}"
    async with serving(echoing_provider()) as provider:
        settings = test_settings.model_copy(update={"model_base_url": provider})
        async with running_workers(client, settings, pool):
            SPANS.clear()
            run_id = await start_run(
                api,
                tenant,
                {"pipeline": "summarize", "input": {"text": f"{canary} said no.", "review": False}},
            )
            run = await wait_json(
                api,
                f"/v1/runs/{run_id}",
                tenant.auth("requester"),
                lambda b: b["status"] == "failed",
                within=30,
            )

            async def spans() -> list[ReadableSpan]:
                return list(SPANS.get_finished_spans())

            found = await eventually(
                spans,
                lambda got: {"model.call", "RunActivity:model.call"} <= {s.name for s in got},
            )
    # Everything a span exports: attributes, status description, events (exceptions) and theirs.
    assert [s.name for s in found if canary in s.to_json()] == []
    (call,) = [s for s in found if s.name == "model.call"]
    assert call.status.status_code is StatusCode.ERROR
    assert (call.attributes or {})["error.type"] == "400"
    assert run["last_error"]["type"] == "BadRequest"
    assert canary not in run["last_error"]["message"]  # the workflow's failure is traced too


def test_a_failed_span_records_the_kind_not_the_text() -> None:
    canary = f"canary-{uuid.uuid4().hex}"
    SPANS.clear()
    with pytest.raises(ValueError, match=canary), span("model.call", step="x"):
        raise ValueError(f"the request was: {canary}")
    (failed,) = SPANS.get_finished_spans()
    assert failed.status.status_code is StatusCode.ERROR
    assert (failed.attributes or {})["error.type"] == "ValueError"
    assert canary not in failed.to_json()


# Stead's own helper (`stead.telemetry.span`), not `re.Match.span("group")`.
SPAN_CALL = re.compile(r'(?<![.\w])span\(\s*"([\w.]+)"')


def readme_section(title: str) -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index(f"## {title}\n")
    end = readme.find("\n## ", start + 1)
    return readme[start : end if end != -1 else None]


def test_readme_names_the_spans_the_code_makes() -> None:
    made = {
        name
        for folder in ("activities", "stead", "workflows")
        for path in (ROOT / folder).rglob("*.py")
        for name in SPAN_CALL.findall(path.read_text())
    }
    named = set(re.findall(r"`((?:model|tool)\.[a-z_]+)`", readme_section("Observability")))
    assert made == {"model.cache_lookup", "model.call", "tool.call"}
    assert named == made


@pytest.mark.usefixtures("worker")
async def test_cache_lookup_span_says_hit_or_miss(api: httpx.AsyncClient, tenant: Tenant) -> None:
    SPANS.clear()
    body = {"pipeline": "summarize", "input": {"text": "Cached twice.", "review": False}}
    for _ in range(2):  # the same request twice: a miss, then a hit
        run_id = await start_run(api, tenant, body)
        await wait_json(
            api,
            f"/v1/runs/{run_id}",
            tenant.auth("requester"),
            lambda b: b["status"] == "completed",
        )

    async def lookups() -> list[dict[str, object]]:
        return [
            dict(s.attributes or {})
            for s in SPANS.get_finished_spans()
            if s.name == "model.cache_lookup"
        ]

    found = await eventually(lookups, lambda got: len(got) == 2)
    assert [a["stead.result"] for a in found] == ["miss", "hit"]
    assert found[1]["stead.model"] == "claude-sonnet-5-5"
    assert {a["stead.tenant"] for a in found} == {tenant.id}
    calls = [s for s in SPANS.get_finished_spans() if s.name == "model.call"]
    assert len(calls) == 1  # the hit never reached a provider


def test_stage_buckets_resolve_model_call_durations() -> None:
    """No bucket between 1 s and 30 s more than doubles the previous one, so a 2-20 s model
    call is told apart from one twice as long."""
    bounds = [b for b in metrics.STAGE_SECONDS._upper_bounds if 1 <= b <= 30]
    assert (bounds[0], bounds[-1]) == (1, 30)
    assert all(b / a <= 2 for a, b in itertools.pairwise(bounds))
