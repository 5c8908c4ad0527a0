"""The Stead worker: the one place that registers workflows and activities.

`build_workers` wires activities to their dependencies (PostgreSQL pool, anthropic client,
policies) and returns two workers sharing one client: the main task queue (workflows and every
activity, model calls included) and the model queue `<queue>-model`, which serves the model calls
of runs started with a model-call rate (`STEAD_MODEL_CALLS_PER_SECOND`, enforced by the Temporal
server across every worker process). Run more processes to scale out; each holds no state of its
own.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import timedelta

import anthropic
import httpx
import httpx2
import uvloop
from pydantic import SecretStr
from temporalio.client import Client
from temporalio.worker import Worker

from stead.api.pipelines import PIPELINES
from stead.attest import AttestationInterceptor
from stead.config import ConfigError, Settings, load_settings
from stead.gateway.ledger import LedgerActivities
from stead.gateway.model import ModelActivities
from stead.gateway.retrieval import RetrievalActivities
from stead.gateway.tools import HttpIntegration, Integrations, ToolActivities
from stead.pipeline.base import PipelineWorkflow
from stead.policy.models import load_prices, load_routing
from stead.policy.permissions import load_policy
from stead.serving import serving
from stead.store import budgets
from stead.store.audit import audit_writer
from stead.store.db import Pool, pool_from_settings
from stead.store.payloads import PostgresPayloadStore
from stead.telemetry import interceptors, metrics_app, metrics_runtime, setup_tracing
from stead.temporal import connect

log = logging.getLogger("stead.worker")

WORKFLOWS: Sequence[type[PipelineWorkflow]] = tuple(PIPELINES.values())


def model_client(settings: Settings) -> anthropic.AsyncAnthropic:
    """The real SDK, pointed at the simulator unless an Anthropic key (and no base URL) is set.
    Retries are Temporal's: the SDK makes exactly one request per call."""
    key = (
        settings.anthropic_api_key.get_secret_value() if settings.anthropic_api_key else "sim-local"
    )
    return anthropic.AsyncAnthropic(
        api_key=key,
        base_url=settings.model_url,
        max_retries=0,
        timeout=settings.model_timeout_seconds,
        http_client=httpx2.AsyncClient(
            limits=httpx2.Limits(max_connections=200, max_keepalive_connections=50),
            timeout=settings.model_timeout_seconds,
        ),
    )


@dataclass
class Deps:
    pool: Pool
    model: anthropic.AsyncAnthropic
    http: httpx.AsyncClient

    async def close(self) -> None:
        await self.model.close()
        await self.http.aclose()


def make_deps(pool: Pool, settings: Settings) -> Deps:
    return Deps(pool=pool, model=model_client(settings), http=httpx.AsyncClient(timeout=20))


def integrations(settings: Settings, http: httpx.AsyncClient) -> Integrations:
    """Each integration with its own credentials; none of them ever reaches a prompt."""

    def secret(value: SecretStr | None) -> str | None:
        return value.get_secret_value() if value is not None else None

    return Integrations(
        payments=HttpIntegration(
            "payments", settings.payments_url, secret(settings.payments_token)
        ),
        email=HttpIntegration("email", settings.email_url, secret(settings.email_token)),
        http=http,
    )


def unconfigured_integrations(settings: Settings) -> list[str]:
    """What a worker without an integration's settings will do, said at start: a tool call
    to it is refused (IntegrationNotConfigured: not retried; the agent is told and the run
    goes on), so the operator learns it now rather than from every run."""
    wanted = {
        "payments": (settings.payments_url, settings.payments_token, "PAYMENTS"),
        "email": (settings.email_url, settings.email_token, "EMAIL"),
    }
    found = []
    for name, (url, token, prefix) in wanted.items():
        if not url or token is None:
            found.append(
                f"integration {name} is not configured (STEAD_{prefix}_URL and"
                f" STEAD_{prefix}_TOKEN): its tools are refused as IntegrationNotConfigured"
            )
    return found


def build_workers(
    client: Client, settings: Settings, deps: Deps, task_queue: str | None = None
) -> list[Worker]:
    queue = task_queue or settings.task_queue
    audit = audit_writer(settings)
    ledger = LedgerActivities(deps.pool, audit)
    model = ModelActivities(
        deps.pool,
        deps.model,
        load_prices(),
        load_routing(),
        audit,
        heartbeat_every=settings.heartbeat_seconds,
    )
    tools = ToolActivities(
        deps.pool,
        load_policy(),
        audit,
        integrations(settings, deps.http),
        heartbeat_every=settings.heartbeat_seconds,
    )
    retrieval = RetrievalActivities(deps.pool)
    throttle = timedelta(seconds=settings.heartbeat_seconds)
    main = Worker(
        client,
        task_queue=queue,
        workflows=list(WORKFLOWS),
        # Decisions and cancels must carry the API's attestation (stead/attest.py).
        interceptors=[AttestationInterceptor(settings.attestor)],
        max_cached_workflows=settings.worker_workflow_cache,
        activities=[
            model.call_model,
            ledger.flush,
            ledger.publish_approval,
            ledger.raise_budget,
            tools.invoke,
            retrieval.chunk_document,
            retrieval.search,
            retrieval.mark_document,
        ],
        max_heartbeat_throttle_interval=throttle,
        default_heartbeat_throttle_interval=throttle,
    )
    models = Worker(
        client,
        task_queue=f"{queue}-model",
        activities=[model.call_model],
        max_task_queue_activities_per_second=settings.model_calls_per_second,
        max_heartbeat_throttle_interval=throttle,
        default_heartbeat_throttle_interval=throttle,
    )
    return [main, models]


async def sweep_forever(pool: Pool, every: timedelta = timedelta(minutes=1)) -> None:
    """Charge reservations of attempts that died mid-call (see store.budgets.sweep_stale)."""
    while True:
        await asyncio.sleep(every.total_seconds())
        try:
            async with pool.acquire() as conn:
                charged = await budgets.sweep_stale(conn, timedelta(minutes=10))
            if charged:
                log.info("charged %d stale budget reservations", charged)
        except Exception:
            log.exception("budget sweep failed; will retry")


async def run(settings: Settings) -> None:
    setup_tracing(settings, "stead-worker")
    runtime, sdk_metrics = metrics_runtime() if settings.worker_metrics_port else (None, None)
    pool = await pool_from_settings(settings, "worker")
    client = await connect(
        settings,
        interceptors=list(interceptors(settings)),
        runtime=runtime,
        payload_store=PostgresPayloadStore(pool),
    )
    deps = make_deps(pool, settings)
    workers = build_workers(client, settings, deps)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with AsyncExitStack() as stack:
        if settings.worker_metrics_port:
            url = await stack.enter_async_context(
                serving(metrics_app(sdk_metrics), settings.host, settings.worker_metrics_port)
            )
            log.info("metrics at %s/metrics", url)
        sweeper = asyncio.create_task(sweep_forever(pool))
        tasks = [asyncio.create_task(w.run()) for w in workers]
        await client.service_client.check_health()
        for missing in unconfigured_integrations(settings):
            log.warning("%s", missing)
        log.info(
            "ready: polling %s (and %s-model) on %s, namespace %s%s",
            settings.task_queue,
            settings.task_queue,
            settings.temporal_target,
            settings.temporal_namespace,
            f"; metrics on :{settings.worker_metrics_port}" if settings.worker_metrics_port else "",
        )
        await stop.wait()
        sweeper.cancel()
        await asyncio.gather(*(w.shutdown() for w in workers))
        await asyncio.gather(*tasks, return_exceptions=True)
    await deps.close()
    await pool.close()
    # A custom runtime can abort the interpreter at exit (PyGILState_Release) unless the
    # client and runtime are gone first; measured here: 4 aborts in 31 runs without this.
    del workers, client, runtime
    gc.collect()


def main() -> None:
    # force: `stead worker` configured logging for WARNING before it handed over to us.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", force=True
    )
    for chatty in ("httpx", "httpx2"):  # one INFO line per request drowns everything else
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        settings = load_settings()
        settings.check_serving("worker")
    except ConfigError as exc:
        raise SystemExit(f"stead: {exc}") from None
    # uvloop's C event loop: the worker's hot path is socket I/O (Temporal's bridge wake-ups,
    # PostgreSQL, the model endpoint); measured in bench/throughput.
    uvloop.run(run(settings))


if __name__ == "__main__":
    main()
