"""Stead's Prometheus metrics. Names here are what `deploy/` dashboards and alerts use.

Labels are bounded by design: pipeline, model, stage, tool, status and the like come from
Stead's own policies (a handful of values each). Tenant, user and run ids never become labels;
per-customer figures live in the usage ledger (`GET /v1/usage`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from stead.contract import ApprovalStatus, AuditEvent, Usage

REGISTRY = CollectorRegistry(auto_describe=True)

# Dense from 1 s to 30 s, where model and tool calls live (a 2-20 s model call must not land in
# one 5-30 s bucket); coarse above, where a review waits for people.
# fmt: off
_STAGE_BUCKETS = (
    0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30,
    60, 120, 300, 900, 3600, 14400, 86400,
)
# fmt: on

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
    buckets=_STAGE_BUCKETS,
    registry=REGISTRY,
)
APPROVALS_REQUESTED = Counter(
    "stead_approvals_requested", "Approvals requested.", ["pipeline", "kind"], registry=REGISTRY
)
APPROVALS_DECIDED = Counter(
    "stead_approvals_decided",
    "Approvals that reached a final status: approved, rejected, expired or cancelled.",
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
    "Time from an approval request to a person's final decision (approved or rejected).",
    ["pipeline"],
    buckets=(1, 10, 60, 300, 1800, 3600, 14400, 86400, 259200),
    registry=REGISTRY,
)
MODEL_TOKENS = Counter(
    "stead_model_tokens", "Model tokens by kind.", ["model", "kind"], registry=REGISTRY
)
MODEL_COST = Counter("stead_model_cost_usd", "Model cost in USD.", ["model"], registry=REGISTRY)
MODEL_PROMPT_TOKENS = Counter(
    "stead_model_prompt_tokens",
    "Prompt tokens by how the provider's prompt cache served them: uncached, cache_read or"
    " cache_write. The cache hit ratio is cache_read over their sum.",
    ["pipeline", "model", "kind"],
    registry=REGISTRY,
)
MODEL_THINKING_TOKENS = Counter(
    "stead_model_thinking_tokens",
    "Output tokens spent on extended thinking (a part of the output tokens, billed as output).",
    ["pipeline", "model"],
    registry=REGISTRY,
)
MODEL_BATCH_REQUESTS = Counter(
    "stead_model_batch_requests",
    "Deferred model calls by how they ended: succeeded, errored, expired or canceled at the"
    " provider, or fallback (answered by a direct call after an error or the deadline).",
    ["result"],
    registry=REGISTRY,
)
MODEL_CACHE = Counter(
    "stead_model_cache_lookups", "Response cache lookups.", ["result"], registry=REGISTRY
)
MODEL_FALLBACKS = Counter(
    "stead_model_fallbacks",
    "Calls moved on from a model (`model`, the one that failed) to the next of its route.",
    ["model", "to_model"],
    registry=REGISTRY,
)
MODEL_ERRORS = Counter(
    "stead_model_errors", "Provider errors by kind.", ["model", "kind"], registry=REGISTRY
)
MODEL_LATENCY = Histogram(
    "stead_model_latency_seconds",
    "Provider latency per model call.",
    ["model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 60),
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


def observe_usage(pipeline: str, model: str, used: Usage) -> None:
    """Count a billed call's tokens and cost."""
    for kind, tokens in (
        ("input", used.input_tokens),
        ("output", used.output_tokens),
        ("cache_read", used.cache_read_tokens),
        ("cache_write", used.cache_write_tokens),
    ):
        if tokens:
            MODEL_TOKENS.labels(model, kind).inc(tokens)
    for kind, tokens in (
        ("uncached", used.input_tokens),
        ("cache_read", used.cache_read_tokens),
        ("cache_write", used.cache_write_tokens),
    ):
        if tokens:
            MODEL_PROMPT_TOKENS.labels(pipeline, model, kind).inc(tokens)
    if used.thinking_tokens:
        MODEL_THINKING_TOKENS.labels(pipeline, model).inc(used.thinking_tokens)
    if used.cost_nusd:
        MODEL_COST.labels(model).inc(used.cost_nusd / 1e9)


def observe_events(events: Iterable[AuditEvent]) -> None:
    """Count what newly stored audit events say happened. Each event is stored once, so each
    is counted once, however often the activity that carried it was retried or its workflow
    replayed, and whichever activity carried it (a ledger flush, a model or tool call)."""
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
        elif event.action == "approval.decided":
            _observe_decision(pipeline, data)
        elif event.action == "approval.expired":
            APPROVALS_DECIDED.labels(pipeline, "expired").inc()
        if event.action == "run.cancelled" and data.get("approvals_cancelled"):
            APPROVALS_DECIDED.labels(pipeline, "cancelled").inc(len(data["approvals_cancelled"]))


def _observe_decision(pipeline: str, data: dict[str, Any]) -> None:
    """A decision that settles its approval (a reject, or the approve that meets the quorum);
    an approve still short of the quorum leaves it pending and is not counted."""
    status = str(data.get("status", ""))
    if status not in _DECIDED:
        return
    APPROVALS_DECIDED.labels(pipeline, status).inc()
    waited = data.get("waited_seconds")
    if isinstance(waited, int | float):  # absent from runs recorded before it was added
        APPROVAL_SECONDS.labels(pipeline).observe(max(float(waited), 0.0))


_FINISHED = {"run.completed": "completed", "run.failed": "failed", "run.cancelled": "cancelled"}
_DECIDED = {ApprovalStatus.APPROVED.value, ApprovalStatus.REJECTED.value}
