"""Stead's own suite runs on its shipped testing kit (`stead.testing`): real PostgreSQL,
Temporal, the simulator and the reference application's loopback integrations, once per
session, and a fresh tenant, task queue and worker for each test. The application under test
is the reference one (`stead_app = "worker:APP"` in pyproject.toml).

What is here is Stead's alone: spans captured for the observability tests, and shorthands
for the reference application that older tests import from this module.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from temporalio.client import Client
from temporalio.worker import Worker

from stead import testing
from stead.app import Runtime
from stead.config import Settings
from stead.policy.limits import LimitPolicy
from stead.service.access import Services
from stead.store.db import Pool
from stead.testing import (
    PAYLOAD_KEYS,
    Integrations,
    SimControl,
    Tenant,
    TenantFactory,
)
from worker import APP

pytest_plugins = ["stead.testing"]

__all__ = [
    "PAYLOAD_KEYS",
    "SPANS",
    "TEMPORAL",
    "Integrations",
    "SimControl",
    "Tenant",
    "TenantFactory",
    "app_runtime",
    "make_services",
    "running_workers",
    "spawn_worker",
]

# Spans from every test land here (one process-wide provider, as in production).
SPANS = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(SPANS))
trace.set_tracer_provider(_provider)

TEMPORAL = Path(sys.executable).parent / "temporal"
ROOT = Path(__file__).parent.parent


def app_runtime(settings: Settings) -> Runtime:
    """The reference application's registries for `settings` (as `App.load` builds them at a
    process's start)."""
    return APP.load(settings)


def make_services(
    settings: Settings, client: Client, pool: Pool, limits: LimitPolicy | None = None
) -> Services:
    """The reference application's API services for `settings`."""
    return testing.services(APP, settings, client, pool, limits)


@asynccontextmanager
async def running_workers(
    client: Client, settings: Settings, pool: Pool
) -> AsyncIterator[list[Worker]]:
    """The reference application's workers for `settings`."""
    async with testing.running_workers(APP, client, settings, pool) as workers:
        yield workers


def spawn_worker(client: Client, settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    """A real worker process (`python worker.py`) on the test's Temporal, store and queue,
    for tests that kill it with SIGKILL."""
    secret = {"STEAD_DATABASE_URL": settings.database_url}
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("STEAD_")},
        **{k: v.get_secret_value() for k, v in secret.items() if v is not None},
        "STEAD_TEMPORAL_ADDRESS": client.service_client.config.target_host,
        "STEAD_TASK_QUEUE": settings.task_queue,
        "STEAD_MODEL_BASE_URL": settings.model_base_url or "",
        "STEAD_APP": "worker:APP",
        "STEAD_INTEGRATIONS_FILE": str(settings.integrations_file or ""),
        "STEAD_PAYLOAD_KEYS": PAYLOAD_KEYS,
        "STEAD_WORKER_METRICS_PORT": str(settings.worker_metrics_port),
        "STEAD_PAYLOAD_OFFLOAD_BYTES": str(settings.payload_offload_bytes),
        "STEAD_POLICY_PATH": settings.policy_path_dirs or "",
    }
    return subprocess.Popen(
        [sys.executable, str(ROOT / "worker.py")],
        env=env,
        cwd=ROOT,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
