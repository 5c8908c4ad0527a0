"""Stead's Prometheus metrics. Names here are what `deploy/` dashboards and alerts use.

Labels are bounded by design: pipeline, model, stage, tool, status and the like come from
Stead's own policies (a handful of values each). Tenant, user and run ids never become labels;
per-customer figures live in the usage ledger (`GET /v1/usage`).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from workflows.state import AuditEvent

REGISTRY = CollectorRegistry(auto_describe=True)

RUNS_STARTED = Counter(
    "stead_runs_started", "Runs started through the API.", ["pipeline"], registry=REGISTRY
)
RUNS_FINISHED = Counter(
    "stead_runs_finished",
    "Runs that reached a terminal state.",
    ["pipeline", "status"],
    registry=REGISTRY,
)
STAGE_SECONDS = Histogram(
    "stead_stage_duration_seconds",
    "Time runs spent in each stage.",
    ["pipeline", "stage"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120, 600, 3600, 86400),
    registry=REGISTRY,
)
APPROVALS_REQUESTED = Counter(
    "stead_approvals_requested", "Approvals requested.", ["pipeline", "kind"], registry=REGISTRY
)
APPROVALS_DECIDED = Counter(
    "stead_approvals_decided",
    "Approvals that reached a final status.",
    ["pipeline", "status"],
    registry=REGISTRY,
)
APPROVALS_PENDING = Gauge(
    "stead_approvals_pending", "Approvals waiting for a decision.", registry=REGISTRY
)
RUNS_STUCK = Gauge(
    "stead_runs_stuck",
    "Running runs whose workflow task keeps failing (a bug or a bad value): they make no"
    " progress until fixed or cancelled.",
    registry=REGISTRY,
)
APPROVAL_SECONDS = Histogram(
    "stead_approval_decision_seconds",
    "Time from an approval request to its final status.",
    ["pipeline"],
    buckets=(1, 10, 60, 300, 1800, 3600, 14400, 86400, 259200),
    registry=REGISTRY,
)
MODEL_TOKENS = Counter(
    "stead_model_tokens", "Model tokens by kind.", ["model", "kind"], registry=REGISTRY
)
MODEL_COST = Counter("stead_model_cost_usd", "Model cost in USD.", ["model"], registry=REGISTRY)
MODEL_CACHE = Counter(
    "stead_model_cache_lookups", "Response cache lookups.", ["result"], registry=REGISTRY
)
MODEL_FALLBACKS = Counter(
    "stead_model_fallbacks",
    "Calls moved to the next model of a route.",
    ["model"],
    registry=REGISTRY,
)
MODEL_ERRORS = Counter(
    "stead_model_errors", "Provider errors by kind.", ["model", "kind"], registry=REGISTRY
)
MODEL_LATENCY = Histogram(
    "stead_model_latency_seconds",
    "Provider latency per model call.",
    ["model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
BUDGET_REJECTIONS = Counter(
    "stead_budget_rejections", "Model calls refused by a budget.", ["scope"], registry=REGISTRY
)
TOOL_CALLS = Counter(
    "stead_tool_calls", "Tool calls by decision.", ["tool", "decision"], registry=REGISTRY
)
PERMISSION_DENIALS = Counter(
    "stead_permission_denials",
    "Actions refused by the permission model.",
    ["surface", "action"],
    registry=REGISTRY,
)
HTTP_REQUESTS = Counter(
    "stead_http_requests",
    "API requests by route template and status class.",
    ["route", "method", "status"],
    registry=REGISTRY,
)
HTTP_LATENCY = Histogram(
    "stead_http_request_duration_seconds",
    "API request latency by route template.",
    ["route", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=REGISTRY,
)


def observe_events(events: Iterable[AuditEvent]) -> None:
    """Count what newly stored audit events say happened (each event is stored once, so each
    is counted once, however often the activity that carried it was retried)."""
    for event in events:
        pipeline = event.pipeline or "unknown"
        data = event.data
        if event.action == "stage.entered" and "previous_seconds" in data:
            STAGE_SECONDS.labels(pipeline, str(data["previous"])).observe(
                float(data["previous_seconds"])
            )
        elif event.action in _FINISHED:
            RUNS_FINISHED.labels(pipeline, _FINISHED[event.action]).inc()
        elif event.action == "approval.requested":
            APPROVALS_REQUESTED.labels(pipeline, str(data.get("kind", "unknown"))).inc()


_FINISHED = {"run.completed": "completed", "run.failed": "failed", "run.cancelled": "cancelled"}
