"""The dashboards and alerts on a real Prometheus, fed by real runs.

Debian's `prometheus` scrapes, every second, the API's `/metrics` and a real worker
process's `/metrics` (Stead's metrics and the Temporal SDK's), both on loopback ports, and
evaluates `deploy/prometheus/alerts.yml`. The test drives two rounds of runs (summarize
approved and rejected over HTTP, a model fallback injected in the simulator, a budget
refusal, triage twice for cache hits, a support agent whose refund is denied), then asks
Prometheus for every expression of every panel of `deploy/grafana/dashboards/stead.json`
and every alert rule, and checks each against what those runs must show: a value in range
for the series the runs made, not merely an answer without an error.

Two rounds, with a scrape in between, because Prometheus knows a counter only from its first
sample: a series born at 1 has no increase until it moves again (the same holds after any
process restart in production).
"""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from temporalio.client import Client

from activities import support_desk
from stead.api.app import create_app, refresh_gauges
from stead.config import Settings
from stead.policy.models import load_routing
from stead.serving import serving
from stead.store.db import Pool
from tests.conftest import SimControl, Tenant, make_services, spawn_worker
from tests.helpers import decide_pending, eventually, free_ports, start_run, wait_json

ROOT = Path(__file__).parent.parent
DASHBOARD = ROOT / "deploy/grafana/dashboards/stead.json"
RULES = ROOT / "deploy/prometheus"
PROMETHEUS = shutil.which("prometheus") or (
    "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
)
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="the prometheus binary is not installed (Debian package `prometheus`; .ci/run "
    "installs it)",
)

SCRAPE_SECONDS = 1
STEP_SECONDS = 1
# What Grafana substitutes for $__rate_interval: max(step + scrape interval, 4 x scrape interval).
RATE_INTERVAL = f"{max(STEP_SECONDS + SCRAPE_SECONDS, 4 * SCRAPE_SECONDS)}s"
PRIMARY, FALLBACK = load_routing().route("draft", "standard").models[:2]
CHEAP = load_routing().route("classify", "standard").models[0]
CUSTOMER_EMAIL = "jane@initech.test"


# --------------------------------------------------------------------------- expectations


@dataclass(frozen=True)
class Expect:
    """Some series whose labels include `labels` has, at some step, a finite value in
    (`low`, `high`] (or [`low`, `high`] when `inclusive`)."""

    labels: dict[str, str] = field(default_factory=dict)
    low: float = 0.0
    high: float = math.inf
    inclusive: bool = False

    def holds(self, value: float) -> bool:
        above = value >= self.low if self.inclusive else value > self.low
        return math.isfinite(value) and above and value <= self.high


def positive(**labels: str) -> Expect:
    return Expect(labels)


def seconds(**labels: str) -> Expect:
    """A duration measured in this test: above zero, under two minutes."""
    return Expect(labels, 0.0, 120.0)


def ratio(**labels: str) -> Expect:
    return Expect(labels, 0.0, 1.0)


# Every target of every panel, by (panel title, refId): what the runs below must make it show.
PANELS: dict[tuple[str, str], tuple[Expect, ...]] = {
    ("Runs started (range)", "A"): (positive(),),
    ("Run failure ratio (range)", "A"): (ratio(),),  # one refused by its budget per round
    ("Approvals pending", "A"): (Expect(low=1, inclusive=True),),
    ("Model cost (range)", "A"): (positive(),),
    # Cluster-wide; the runs here never get stuck, and other tests end theirs.
    ("Runs stuck", "A"): (Expect(low=0, inclusive=True),),
    ("Runs started by pipeline", "A"): (
        positive(pipeline="summarize"),
        positive(pipeline="triage"),
        positive(pipeline="support-agent"),
    ),
    ("Runs finished by pipeline and status", "A"): (
        positive(pipeline="summarize", status="completed"),
        positive(pipeline="summarize", status="failed"),
        positive(pipeline="triage", status="completed"),
        positive(pipeline="support-agent", status="completed"),
    ),
    ("Stage duration p50 by stage", "A"): (
        seconds(pipeline="summarize", stage="model_call"),
        seconds(pipeline="summarize", stage="review"),
        seconds(pipeline="triage", stage="model_call"),
    ),
    ("Stage duration p95 by stage", "A"): (
        seconds(pipeline="summarize", stage="model_call"),
        seconds(pipeline="summarize", stage="review"),
    ),
    ("Approvals requested and decided", "A"): (positive(pipeline="summarize", kind="summary"),),
    ("Approvals requested and decided", "B"): (
        positive(status="approved"),
        positive(status="rejected"),
    ),
    ("Time to decision", "A"): (seconds(),),
    ("Time to decision", "B"): (seconds(),),
    ("Tokens by model and kind", "A"): (
        positive(model=PRIMARY, kind="input"),
        positive(model=PRIMARY, kind="output"),
        positive(model=CHEAP, kind="input"),
    ),
    ("Cost by model", "A"): (positive(model=PRIMARY), positive(model=CHEAP)),
    ("Provider latency p50 / p99 by model", "A"): (seconds(model=PRIMARY),),
    ("Provider latency p50 / p99 by model", "B"): (seconds(model=PRIMARY),),
    # Each round asks triage the same thing twice: the second run is served from the cache.
    ("Response cache hit ratio", "A"): (Expect(low=0.0, high=0.99),),
    ("Fallbacks by model", "A"): (positive(model=PRIMARY, to_model=FALLBACK),),
    ("Provider errors by model and kind", "A"): (positive(model=PRIMARY, kind="529"),),
    ("Budget rejections by scope", "A"): (positive(scope="run"),),
    ("Permission denials by surface and action", "A"): (
        positive(surface="tool", action="issue_refund"),
    ),
    ("Tool calls by tool and decision", "A"): (
        positive(tool="lookup_customer", decision="allowed"),
        positive(tool="issue_refund", decision="denied"),
    ),
    ("Requests by route and status class", "A"): (
        positive(route="/v1/runs", method="POST", status="2xx"),
        positive(route="/v1/approvals/{approval_id}/decision", method="POST", status="2xx"),
    ),
    ("Latency p50 / p99 by route", "A"): (seconds(route="/v1/runs"),),
    ("Latency p50 / p99 by route", "B"): (seconds(route="/v1/runs"),),
    # The Temporal SDK's own metrics, from the worker process; {queue} is the test's queue.
    ("Workflow task schedule-to-start p95", "A"): (Expect({"task_queue": "{queue}"}, high=60),),
    ("Activity execution latency p95", "A"): (seconds(activity_type="model.call"),),
    ("Pollers", "A"): (positive(task_queue="{queue}"),),
    ("Workflows completed and client requests", "A"): (
        positive(workflow_type="summarize"),
        positive(workflow_type="triage"),
    ),
    ("Workflows completed and client requests", "B"): (positive(),),
}


@dataclass(frozen=True)
class AlertCheck:
    """What each clause's left side must show (by clause index, clauses joined by `and`), and
    the series the whole expression must return at the end (None: depends on the machine's
    load, so only its measure is checked)."""

    measures: dict[int, tuple[Expect, ...]]
    fires: tuple[dict[str, str], ...] | None = ()


# Every alert of alerts.yml. `for:` keeps any of them from firing within a test; the
# expression itself is evaluated here, and alerts.test.yml shows each one firing.
ALERTS: dict[str, AlertCheck] = {
    # Each round: 5 summarize runs finished, 1 refused by its budget (20% > 10%).
    "SteadRunsFailing": AlertCheck(
        {
            # A pipeline without failures has no ratio at all (no failed series to divide).
            0: (Expect({"pipeline": "summarize"}, 0.1, 0.5),),
            1: (Expect({"pipeline": "summarize"}, 5, inclusive=True),),
        },
        fires=({"pipeline": "summarize"},),
    ),
    "SteadRunsStuck": AlertCheck({0: (Expect(low=0, inclusive=True),)}, fires=None),
    # Compares with the rate 10 minutes back, which a new Prometheus does not have.
    "SteadBudgetRejectionsSpike": AlertCheck({0: (positive(scope="run"),)}),
    # Set in the test from the store's own count (other tests may have left runs parked).
    "SteadApprovalsBacklog": AlertCheck({0: (Expect(low=1, inclusive=True),)}),
    "SteadApprovalsSlow": AlertCheck({0: (seconds(pipeline="summarize"),)}),
    "SteadWorkflowTasksQueued": AlertCheck(
        {0: (Expect({"task_queue": "{queue}"}, high=60),)}, fires=None
    ),
    # Both targets answer until the test stops the worker (then checked separately).
    "SteadTargetDown": AlertCheck(
        {0: (Expect({"job": "stead-api"}, 0.5, 1), Expect({"job": "stead-worker"}, 0.5, 1))}
    ),
}


# --------------------------------------------------------------------------- Prometheus


@dataclass(frozen=True)
class Series:
    labels: dict[str, str]
    values: list[float]


class Prometheus:
    """The HTTP API of a running Prometheus."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def get(self, path: str, **params: str | float) -> Any:
        response = await self.http.get(path, params=params)
        body = response.json()
        assert body["status"] == "success", (params, body)
        return body["data"]

    async def instant(self, expr: str) -> list[Series]:
        data = await self.get("/api/v1/query", query=expr)
        return [Series(r["metric"], [float(r["value"][1])]) for r in data["result"]]

    async def over(self, expr: str, start: float, end: float) -> list[Series]:
        data = await self.get(
            "/api/v1/query_range", query=expr, start=start, end=end, step=STEP_SECONDS
        )
        return [Series(r["metric"], [float(v) for _, v in r["values"]]) for r in data["result"]]

    async def until(self, expr: str, within: float = 30) -> list[Series]:
        """Poll an instant query until it returns a series."""

        async def probe() -> list[Series]:
            return await self.instant(expr)

        return await eventually(probe, bool, within=within)

    async def scraped_since(self, moment: float) -> None:
        """Wait until every target has been scraped after `moment` (Unix seconds)."""

        async def probe() -> list[Series]:
            return await self.instant("timestamp(up)")

        await eventually(
            probe, lambda found: len(found) == 2 and min(s.values[0] for s in found) > moment
        )

    async def rules(self) -> list[dict[str, Any]]:
        data = await self.get("/api/v1/rules")
        return [rule for group in data["groups"] for rule in group["rules"]]

    async def alerts(self) -> list[dict[str, Any]]:
        return list((await self.get("/api/v1/alerts"))["alerts"])


@asynccontextmanager
async def prometheus(targets: dict[str, int], tmp: Path) -> AsyncIterator[Prometheus]:
    [port] = free_ports(1)
    config = {
        "global": {
            "scrape_interval": f"{SCRAPE_SECONDS}s",
            "evaluation_interval": f"{SCRAPE_SECONDS}s",
        },
        "rule_files": [str(RULES / name) for name in rule_files()],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{target}"]}]}
            for job, target in targets.items()
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    server = start_prometheus(tmp, port)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:

            async def ready() -> bool:
                try:
                    return (await http.get("/-/ready")).status_code == 200
                except httpx.HTTPError:
                    return server.poll() is not None  # exited: stop polling, fail below

            await eventually(ready, bool, within=30)
            assert server.poll() is None, (tmp / "prometheus.log").read_text()
            yield Prometheus(http)
    finally:
        server.terminate()
        await asyncio.to_thread(server.wait, 30)


def start_prometheus(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    assert PROMETHEUS is not None
    return subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=(tmp / "prometheus.log").open("ab"),
        stderr=subprocess.STDOUT,
    )


def rule_files() -> list[str]:
    """The rule files the shipped Prometheus config loads (alerts and any recording rules)."""
    shipped = yaml.safe_load((RULES / "prometheus.yml").read_text())
    files: list[str] = shipped["rule_files"]
    return files


def alert_rules() -> dict[str, str]:
    rules: dict[str, str] = {}
    for name in rule_files():
        for group in yaml.safe_load((RULES / name).read_text())["groups"]:
            for rule in group["rules"]:
                rules[rule.get("alert") or rule["record"]] = rule["expr"]
    return rules


def panel_targets() -> dict[tuple[str, str], str]:
    doc = yaml.safe_load(DASHBOARD.read_text())  # JSON is YAML
    panels = [p for top in doc["panels"] for p in (top, *top.get("panels", []))]
    return {(p["title"], t["refId"]): t["expr"] for p in panels for t in p.get("targets", [])}


def as_queried(expr: str, window: str) -> str:
    """What Grafana sends for this dashboard: every pipeline, its rate interval, a range."""
    return (
        expr.replace('"$pipeline"', '".*"')
        .replace("$__rate_interval", RATE_INTERVAL)
        .replace("$__range", window)
    )


_COMPARISON = re.compile(r"\s(>=|<=|==|!=|>|<)\s")


def clauses(expr: str) -> list[tuple[str, str]]:
    """Each `and`-joined clause of an alert expression as (left side, right side) of its
    comparison, split at parenthesis, brace and bracket depth 0."""
    found: list[tuple[str, str]] = []
    for clause in _top_level_split(expr, re.compile(r"\sand\s")):
        cut = _top_level_split(clause, _COMPARISON, limit=1)
        assert len(cut) == 2, f"no comparison in {clause!r}"
        found.append((cut[0].strip(), cut[1].strip()))
    return found


def _top_level_split(text: str, separator: re.Pattern[str], limit: int = 0) -> list[str]:
    parts: list[str] = []
    depth, start, index, quoted = 0, 0, 0, False
    while index < len(text):
        char = text[index]
        quoted = quoted != (char == '"')
        if not quoted:
            depth += (char in "([{") - (char in ")]}")
        match = separator.match(text, index) if depth == 0 and not quoted else None
        if match and (not limit or len(parts) < limit):
            parts.append(text[start:index])
            start = index = match.end()
            continue
        index += 1
    return [*parts, text[start:]]


def unmet(found: list[Series], expects: Iterable[Expect], queue: str) -> list[str]:
    """The expectations no series meets, with what was found."""
    missing = []
    for expect in expects:
        wanted = {k: v.replace("{queue}", queue) for k, v in expect.labels.items()}
        matching = [s for s in found if wanted.items() <= s.labels.items()]
        if not any(expect.holds(v) for s in matching for v in s.values):
            seen = [
                (s.labels, sorted({v for v in s.values if math.isfinite(v)})[-3:]) for s in matching
            ]
            missing.append(f"{expect} not met; matching series (top values): {seen}")
    return missing


# --------------------------------------------------------------------------- the runs


@dataclass
class Stack:
    api: httpx.AsyncClient
    tenant: Tenant
    sim: SimControl
    prom: Prometheus
    pool: Pool
    worker_metrics: str


def ticket(round_: int) -> dict[str, Any]:
    """A support ticket whose refund (500) is beyond the agent's limit: denied, not proposed."""
    hints = {
        "amount": "500",
        "reason": f"charged twice (round {round_})",
        "subject": "About your refund",
        "body": "We looked into it.",
        "send_email.to": CUSTOMER_EMAIL,
    }
    body = "I was charged twice.\n" + "\n".join(f"{k}: {v}" for k, v in hints.items())
    ticket_input = {"ticket_id": f"T-{round_}", "customer_id": "cus_1", "subject": "Refund"}
    return {"pipeline": "support-agent", "input": {**ticket_input, "body": body}}


async def finished(stack: Stack, run_id: str, status: str = "completed") -> None:
    await wait_json(
        stack.api,
        f"/v1/runs/{run_id}",
        stack.tenant.auth("requester"),
        lambda b: b["status"] == status,
        within=60,
    )


async def summarize(stack: Stack, text: str, *, review: bool = True, **body: Any) -> str:
    request = {"pipeline": "summarize", "input": {"text": text, "review": review}, **body}
    return await start_run(stack.api, stack.tenant, request)


async def reviewed(stack: Stack, round_: int, decision: str) -> None:
    """A summary decided over HTTP, once Prometheus shows it pending as the store does."""
    run_id = await summarize(stack, f"Round {round_}: revenue grew; to {decision}.")
    await wait_json(
        stack.api,
        f"/v1/runs/{run_id}",
        stack.tenant.auth("requester"),
        lambda b: bool(b["pending_approvals"]),
        within=30,
    )
    async with stack.pool.acquire() as conn:
        pending = await conn.fetchval("SELECT count(*) FROM approvals WHERE status = 'pending'")
    await stack.prom.until(f"max(stead_approvals_pending) == {pending}")
    await decide_pending(stack.api, stack.tenant, run_id, decision)
    await finished(stack, run_id)


async def one_round(stack: Stack, round_: int) -> None:
    # Alone first, so that no other run's call to the primary model takes the injected 529.
    await stack.sim.fault(529, model=PRIMARY)
    await finished(stack, await summarize(stack, f"Round {round_}: overloaded.", review=False))
    plain = await summarize(stack, f"Round {round_}: costs fell.", review=False)
    refused = await summarize(stack, f"Round {round_}: over budget.", budget_usd=0.000001)
    agent = await start_run(stack.api, stack.tenant, ticket(round_))
    # One at a time, so that each is seen pending before it is decided.
    for decision in ("approve", "reject"):
        await reviewed(stack, round_, decision)
    triage = {"pipeline": "triage", "input": {"message": f"Round {round_}: my order is late."}}
    for _ in range(2):  # the same message twice: the second run is answered from the cache
        await finished(stack, await start_run(stack.api, stack.tenant, triage))
    await finished(stack, plain)
    await finished(stack, refused, "failed")
    await finished(stack, agent)


# What each round leaves in the worker's counters, per round.
ROUND_COUNTS = {
    ("stead_runs_finished_total", ("summarize", "completed")): 4,
    ("stead_runs_finished_total", ("summarize", "failed")): 1,
    ("stead_runs_finished_total", ("triage", "completed")): 2,
    ("stead_runs_finished_total", ("support-agent", "completed")): 1,
}


async def settled(stack: Stack, round_: int) -> None:
    """Wait until the worker counted every run of `round_` as finished (a run reads as
    finished just before its last ledger write, which holds what is counted), then until
    Prometheus scraped both targets after that."""

    async def counts() -> dict[tuple[str, tuple[str, ...]], float]:
        async with httpx.AsyncClient() as http:
            text = (await http.get(stack.worker_metrics)).text
        found: dict[tuple[str, tuple[str, ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (
                    sample.name,
                    (sample.labels.get("pipeline", ""), sample.labels.get("status", "")),
                )
                if key in ROUND_COUNTS:
                    found[key] = sample.value
        return found

    await eventually(
        counts,
        lambda found: all(found.get(k, 0) >= n * round_ for k, n in ROUND_COUNTS.items()),
        within=30,
    )
    await stack.prom.scraped_since(time.time())


# --------------------------------------------------------------------------- the test


async def check_panels(prom: Prometheus, start: float, end: float, queue: str) -> list[str]:
    window = f"{math.ceil(end - start) + 2 * SCRAPE_SECONDS}s"
    targets = panel_targets()
    assert set(targets) == set(PANELS), "every panel target needs its expectation here"
    problems = []
    for key, expr in targets.items():
        found = await prom.over(as_queried(expr, window), start, end)
        problems += [f"panel {key}: {p}" for p in unmet(found, PANELS[key], queue)]
    pipelines = await prom.get(
        "/api/v1/label/pipeline/values", **{"match[]": "stead_runs_started_total"}
    )
    if not {"summarize", "triage", "support-agent"} <= set(pipelines):
        problems.append(f"the pipeline variable offers {pipelines}")
    return problems


async def check_alerts(
    prom: Prometheus, start: float, end: float, queue: str, backlog: bool
) -> list[str]:
    rules = alert_rules()
    assert set(rules) == set(ALERTS), "every rule needs its expectation here"
    problems = []
    for name, expr in rules.items():
        check = ALERTS[name]
        sides = clauses(expr)
        for index, expects in check.measures.items():
            found = await prom.over(sides[index][0], start, end)
            problems += [f"{name} clause {index}: {p}" for p in unmet(found, expects, queue)]
        fires = ({},) if name == "SteadApprovalsBacklog" and backlog else check.fires
        if fires is None:
            continue
        now = [s.labels for s in await prom.instant(expr)]
        if len(now) != len(fires) or not all(
            any(want.items() <= got.items() for got in now) for want in fires
        ):
            problems.append(f"{name}: returns {now}, expected {list(fires)}")
    for rule in await prom.rules():
        if rule["health"] != "ok" or rule.get("lastError"):
            problems.append(f"rule {rule['name']} does not evaluate: {rule.get('lastError')}")
    return problems


async def test_dashboards_and_alerts_on_a_real_prometheus(
    client: Client,
    test_settings: Settings,
    pool: Pool,
    tenant: Tenant,
    sim: SimControl,
    tmp_path: Path,
) -> None:
    async with pool.acquire() as conn:
        await support_desk.upsert_customer(
            conn, tenant.id, "cus_1", "Jane Doe", CUSTOMER_EMAIL, plan="pro"
        )
    api_port, worker_port = free_ports(2)
    worker_settings = test_settings.model_copy(update={"worker_metrics_port": worker_port})
    worker = spawn_worker(client, worker_settings, tmp_path / "worker.log")
    services = make_services(test_settings, client, pool)
    gauges = asyncio.create_task(refresh_gauges(pool, client, every=0.2))
    targets = {"stead-api": api_port, "stead-worker": worker_port}
    try:
        async with (
            serving(create_app(test_settings, services), port=api_port) as api_url,
            prometheus(targets, tmp_path) as prom,
            httpx.AsyncClient(base_url=api_url, timeout=60) as api,
        ):
            stack = Stack(api, tenant, sim, prom, pool, f"http://127.0.0.1:{worker_port}/metrics")
            await prom.until('min(up{job=~"stead-.*"}) == 1 and count(up) == 2', within=60)
            start = time.time()
            for round_ in (1, 2):
                await one_round(stack, round_)
                await settled(stack, round_)
            # A range query evaluates at start + k steps up to `end`: an increase carried by the
            # last scrape shows only at a step after it. Without this the second triage run's
            # cache hits, the round's last increase, fell outside the range whenever the rounds
            # ended within a step of that scrape (every time, once a change to the gateway's
            # budget path moved the rounds' timing).
            await asyncio.sleep(STEP_SECONDS + SCRAPE_SECONDS)
            end = time.time()
            async with pool.acquire() as conn:
                pending = await conn.fetchval(
                    "SELECT count(*) FROM approvals WHERE status = 'pending'"
                )
            problems = await check_panels(prom, start, end, test_settings.task_queue)
            problems += await check_alerts(prom, start, end, test_settings.task_queue, pending > 25)
            assert problems == [], "\n".join(problems)
            # The rule itself is evaluated by Prometheus: pending until its `for` has passed.
            await eventually(
                prom.alerts,
                lambda alerts: any(
                    a["labels"]["alertname"] == "SteadRunsFailing"
                    and a["labels"].get("pipeline") == "summarize"
                    and a["state"] == "pending"
                    for a in alerts
                ),
            )
            # A worker that stops answering is what SteadTargetDown's expression reports.
            worker.terminate()
            # Waited for off the event loop, which serves the API's /metrics meanwhile.
            assert await asyncio.to_thread(worker.wait, 30) == 0
            down = await prom.until(alert_rules()["SteadTargetDown"])
            assert [s.labels["job"] for s in down] == ["stead-worker"]
    finally:
        gauges.cancel()
        if worker.poll() is None:
            worker.terminate()
            await asyncio.to_thread(worker.wait, 30)
