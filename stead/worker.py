"""The Stead worker: an application's workflows and Stead's activities, on one task queue.

`plugin` packages the worker side of Stead as a Temporal plugin (`temporalio.plugin`): the
application's pipelines and Stead's own, the gateway activities (model calls, tools, ledger,
retrieval) wired to their dependencies, the attestation check on decisions, and the sandbox
that passes `stead` through. A team that runs its own Temporal workers adds it with
`Worker(client, task_queue=..., plugins=[plugin])`; `stead worker` does exactly that.

`build_workers` returns two workers sharing one client: the main task queue (workflows and
every activity, model calls included) and the model queue `<queue>-model`, which serves the
model calls of runs started with a model-call rate (`STEAD_MODEL_CALLS_PER_SECOND`, enforced by
the Temporal server across every worker process). Run more processes to scale out; each holds
no state of its own.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import anthropic
import httpx
import httpx2
import uvloop
from temporalio.client import Client
from temporalio.plugin import SimplePlugin
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from stead.app import App, AppError, Runtime
from stead.attest import AttestationInterceptor
from stead.builtin.schedules import ScheduledRunWorkflow
from stead.builtin.webhooks import WebhookDelivery
from stead.config import ConfigError, Settings, load_settings
from stead.crypto import Sealer
from stead.gateway.batcher import ModelBatcher
from stead.gateway.batches import BatchingModelActivities
from stead.gateway.ledger import LedgerActivities
from stead.gateway.retrieval import RetrievalActivities
from stead.gateway.schedules import ScheduleActivities
from stead.gateway.tools import ToolActivities
from stead.loader import load_app
from stead.serving import serving
from stead.store import budgets
from stead.store.audit import audit_writer
from stead.store.conversations import ConversationStore
from stead.store.db import Pool, pool_from_settings
from stead.store.payloads import PostgresPayloadStore
from stead.telemetry import interceptors, metrics_app, metrics_runtime, setup_tracing
from stead.temporal import connect, data_converter
from stead.webhooks.delivery import WebhookActivities, delivery_client
from stead.webhooks.dispatch import Dispatcher
from stead.webhooks.urls import Reach

log = logging.getLogger("stead.worker")
# Stead's own workflows that are not pipelines: webhook deliveries, schedules' firings, the
# batchers gathering deferred model calls.
PLATFORM_WORKFLOWS: tuple[type[Any], ...] = (WebhookDelivery, ScheduledRunWorkflow, ModelBatcher)


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
    # Webhook deliveries' own client: no redirects, no proxy, no kept-alive connections.
    hooks: httpx.AsyncClient = field(default_factory=delivery_client)

    async def close(self) -> None:
        await self.model.close()
        await self.http.aclose()
        await self.hooks.aclose()


def make_deps(pool: Pool, settings: Settings) -> Deps:
    return Deps(pool=pool, model=model_client(settings), http=httpx.AsyncClient(timeout=20))


@dataclass(frozen=True)
class Activities:
    """Stead's activities for one worker process, wired to their dependencies."""

    model: BatchingModelActivities
    ledger: LedgerActivities
    tools: ToolActivities
    retrieval: RetrievalActivities
    webhooks: WebhookActivities
    schedules: ScheduleActivities

    def all(self) -> list[Callable[..., Any]]:
        return [
            self.model.call_model,
            self.model.defer,
            self.model.collect_batch,
            self.model.abandon_batch,
            self.model.submit_batch,
            self.model.poll_batch,
            self.ledger.flush,
            self.ledger.publish_approval,
            self.ledger.raise_budget,
            self.tools.invoke,
            self.retrieval.chunk_document,
            self.retrieval.search,
            self.retrieval.mark_document,
            self.webhooks.deliver,
            self.webhooks.give_up,
            self.schedules.start_run,
            self.schedules.watch_run,
            self.schedules.cancel_run,
        ]


def activities(runtime: Runtime, settings: Settings, deps: Deps) -> Activities:
    policies = runtime.policies
    audit = audit_writer(settings, policies.redaction)
    return Activities(
        model=BatchingModelActivities(
            deps.pool,
            deps.model,
            policies.prices,
            policies.routing,
            audit,
            heartbeat_every=settings.heartbeat_seconds,
            conversations=ConversationStore(deps.pool, settings.encryption_keys),
        ),
        ledger=LedgerActivities(deps.pool, audit),
        tools=ToolActivities(
            deps.pool, runtime, audit, deps.http, heartbeat_every=settings.heartbeat_seconds
        ),
        retrieval=RetrievalActivities(deps.pool),
        webhooks=WebhookActivities(
            deps.pool,
            audit,
            Sealer(settings.encryption_keys) if settings.encryption_keys else None,
            Reach.of(settings),
            deps.hooks,
        ),
        schedules=ScheduleActivities(runtime, settings, deps.pool, audit),
    )


def sandbox() -> SandboxedWorkflowRunner:
    """The workflow sandbox, passing `stead` through: pipelines import it at module level,
    and it is imported once per process rather than for every run."""
    return SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules("stead")
    )


def plugin(
    runtime: Runtime, settings: Settings, deps: Deps, made: Activities | None = None
) -> SimplePlugin:
    """Stead's worker side as a Temporal plugin; see the module's docstring."""
    made = made or activities(runtime, settings, deps)
    return SimplePlugin(
        "stead",
        workflows=[*runtime.workflows, *PLATFORM_WORKFLOWS],
        activities=made.all(),
        # Decisions and cancels must carry the API's attestation (stead/attest.py).
        interceptors=[AttestationInterceptor(settings.attestor)],
        workflow_runner=sandbox(),
        data_converter=data_converter(settings, PostgresPayloadStore(deps.pool)),
    )


def build_workers(
    client: Client,
    settings: Settings,
    deps: Deps,
    runtime: Runtime,
    task_queue: str | None = None,
) -> list[Worker]:
    queue = task_queue or settings.task_queue
    made = activities(runtime, settings, deps)
    throttle = timedelta(seconds=settings.heartbeat_seconds)
    main = Worker(
        client,
        task_queue=queue,
        plugins=[plugin(runtime, settings, deps, made)],
        max_cached_workflows=settings.worker_workflow_cache,
        max_heartbeat_throttle_interval=throttle,
        default_heartbeat_throttle_interval=throttle,
    )
    models = Worker(
        client,
        task_queue=f"{queue}-model",
        activities=[made.model.call_model],
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


async def run(settings: Settings, runtime: Runtime) -> None:
    setup_tracing(settings, "stead-worker")
    temporal_runtime, sdk_metrics = (
        metrics_runtime() if settings.worker_metrics_port else (None, None)
    )
    pool = await pool_from_settings(settings, "worker")
    client = await connect(
        settings,
        interceptors=list(interceptors(settings)),
        runtime=temporal_runtime,
        payload_store=PostgresPayloadStore(pool),
    )
    deps = make_deps(pool, settings)
    workers = build_workers(client, settings, deps, runtime)
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
        dispatcher = asyncio.create_task(Dispatcher(pool, client, settings).run_forever())
        tasks = [asyncio.create_task(w.run()) for w in workers]
        await client.service_client.check_health()
        for missing in runtime.unconfigured():
            log.warning(
                "integration %s is not configured (%sURL and %sTOKEN): its tools are refused"
                " as IntegrationNotConfigured",
                missing.name,
                missing.env_prefix,
                missing.env_prefix,
            )
        log.info(
            "ready: %s, polling %s (and %s-model) on %s, namespace %s%s",
            runtime.app.name,
            settings.task_queue,
            settings.task_queue,
            settings.temporal_target,
            settings.temporal_namespace,
            f"; metrics on :{settings.worker_metrics_port}" if settings.worker_metrics_port else "",
        )
        await stop.wait()
        sweeper.cancel()
        dispatcher.cancel()
        await asyncio.gather(*(w.shutdown() for w in workers))
        await asyncio.gather(*tasks, return_exceptions=True)
    await deps.close()
    await pool.close()
    # A custom runtime can abort the interpreter at exit (PyGILState_Release) unless the
    # client and runtime are gone first; measured here: 4 aborts in 31 runs without this.
    del workers, client, temporal_runtime
    gc.collect()


def main(app: App | None = None) -> None:
    """Run a worker for `app`, or for the application the settings name (`STEAD_APP`)."""
    # force: `stead worker` configured logging for WARNING before it handed over to us.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", force=True
    )
    for chatty in ("httpx", "httpx2"):  # one INFO line per request drowns everything else
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        settings = load_settings()
        settings.check_serving("worker")
        runtime = (app or load_app(settings.app)).load(settings)
        missing = [i for i in runtime.unconfigured() if i.required]
        if missing:
            raise ConfigError(
                f"integration {missing[0].name} is not configured: set {missing[0].env_prefix}URL"
                f" and {missing[0].env_prefix}TOKEN (or STEAD_INTEGRATIONS_FILE)"
            )
    except (ConfigError, AppError) as exc:
        raise SystemExit(f"stead: {exc}") from None
    # uvloop's C event loop: the worker's hot path is socket I/O (Temporal's bridge wake-ups,
    # PostgreSQL, the model endpoint); measured in bench/throughput.
    uvloop.run(run(settings, runtime))


if __name__ == "__main__":
    main()
