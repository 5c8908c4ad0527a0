"""Traces and worker metrics.

Tracing: one OpenTelemetry trace per request runs API → StartWorkflow → RunWorkflow →
StartActivity → RunActivity → Stead's own `model.cache_lookup`, `model.call` and `tool.call`
spans. Spans carry model, tokens, cost, tenant and pipeline; never prompts, replies or
customer content, and a failed span records the error's type, never its text (a provider's
error message can quote the request). Spans are exported over OTLP/HTTP only when
`OTEL_EXPORTER_OTLP_ENDPOINT` is set. Scrapes and health probes are never traced.

Worker metrics: the Temporal SDK serves its own Prometheus metrics on a private loopback
port; the worker's `/metrics` serves Stead's metrics followed by the SDK's, so one scrape
target per worker holds both.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Response
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Status, StatusCode
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

from stead.config import Settings
from stead.metrics import REGISTRY

TRACER_NAME = "stead"


def setup_tracing(settings: Settings, service: str) -> None:
    """Install the process's tracer provider when traces are exported (once; a provider
    already set is kept). Without an exporter none is installed: FastAPI's and the anthropic
    SDK's own instrumentation then create no-op spans instead of recording spans nobody
    receives (measured: a noticeable share of each API request)."""
    if not settings.otel_exporter_otlp_endpoint:
        return
    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
        OTLPSpanExporter,
    )

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)


def tracing_interceptor() -> TracingInterceptor:
    return TracingInterceptor(trace.get_tracer(TRACER_NAME))


def interceptors(settings: Settings) -> list[TracingInterceptor]:
    """Temporal's tracing interceptor, when traces go somewhere. Without an exporter it would
    still add a header to every activity and spans to every task (measured: ~7 ms of worker
    CPU per three-step run) for traces nobody receives."""
    return [tracing_interceptor()] if settings.otel_exporter_otlp_endpoint else []


@contextmanager
def span(name: str, **attributes: str | int | float | bool) -> Iterator[trace.Span]:
    """A Stead span. Attributes are facts about the call, never its content. An exception
    marks it failed with the error's kind only: OpenTelemetry's default would record the
    exception's message, and an SDK's message can echo what was sent."""
    tracer = trace.get_tracer(TRACER_NAME)
    with tracer.start_as_current_span(
        name,
        attributes={f"stead.{k}": v for k, v in attributes.items()},
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        try:
            yield current
        except Exception as exc:
            current.set_status(Status(StatusCode.ERROR))
            current.set_attribute("error.type", error_kind(exc))
            raise


def error_kind(exc: BaseException) -> str:
    """What failed, without what the failure said: an HTTP status, or an error type."""
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        return str(status)
    kind = getattr(exc, "type", None)  # temporalio's ApplicationError: Stead's ErrorType
    return kind if isinstance(kind, str) and kind else type(exc).__name__


def untraced(scope: MutableMapping[str, Any]) -> bool:
    """FastAPI's `telemetry={"exclude": ...}`: scrapes and probes start no trace (one every
    few seconds per target, each a trace of its own, would bury the request traces)."""
    return scope.get("path") in UNTRACED_PATHS


UNTRACED_PATHS = frozenset({"/metrics", "/healthz"})


def set_attributes(current: trace.Span, **attributes: str | int | float | bool) -> None:
    current.set_attributes({f"stead.{k}": v for k, v in attributes.items()})


# --- worker metrics -------------------------------------------------------------------------


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def metrics_runtime() -> tuple[Runtime, str]:
    """A Temporal runtime whose SDK metrics are served on a private loopback port."""
    address = f"127.0.0.1:{free_loopback_port()}"
    # Prometheus conventions (`_total` counters, seconds), so the exposition passes promtool.
    config = PrometheusConfig(
        bind_address=address, counters_total_suffix=True, durations_as_seconds=True
    )
    runtime = Runtime(telemetry=TelemetryConfig(metrics=config))
    return runtime, f"http://{address}/metrics"


def metrics_app(sdk_metrics_url: str | None) -> FastAPI:
    # FastAPI's native telemetry off: a scrape must not start a trace (or record its own
    # HTTP metrics in OpenTelemetry).
    app = FastAPI(
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    client = httpx.AsyncClient(timeout=5)

    @app.get("/metrics")
    async def exposition() -> Response:
        body = generate_latest(REGISTRY)
        if sdk_metrics_url:
            try:
                sdk = await client.get(sdk_metrics_url)
                body += b"\n" + sdk.content
            except httpx.HTTPError:
                pass  # Stead's own metrics are still worth serving
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return app
