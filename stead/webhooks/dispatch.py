"""From the outbox to Temporal: one delivery workflow per delivery row.

Every worker process runs a `Dispatcher`. It wakes on `NOTIFY stead_webhooks` (sent when a
transaction that enqueued deliveries commits) and every few seconds anyway (a missed
notification, a listener reconnecting), claims deliveries not yet started with `FOR UPDATE
SKIP LOCKED` (so dispatchers in several workers share the work), starts their workflows and
marks them dispatched in the same transaction. A dispatcher that dies between the start and
the commit leaves the rows to the next pass, whose start is refused as a duplicate by the
workflow id (`<tenant>:<delivery id>`): each delivery runs once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta

import asyncpg
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError

from stead.builtin.webhooks import WebhookDelivery
from stead.config import Settings
from stead.store import webhooks as store
from stead.store.db import Pool, check_login
from stead.webhooks.delivery import DeliveryJob

log = logging.getLogger("stead.webhooks")
CHANNEL = "stead_webhooks"
BATCH = 100
# Batches per wake-up: a backlog is worked through in bounded passes, and the next wake (or
# the poll) continues it.
MAX_BATCHES = 50


def delivery_workflow_id(tenant: str, delivery_id: str) -> str:
    return f"{tenant}:{delivery_id}"


class Dispatcher:
    def __init__(
        self,
        pool: Pool,
        client: Client,
        settings: Settings,
        *,
        poll_seconds: float = 5.0,
    ) -> None:
        self._pool = pool
        self._client = client
        self._settings = settings
        self._poll = poll_seconds
        self._wake = asyncio.Event()

    def job(self, tenant: str, delivery_id: str) -> DeliveryJob:
        s = self._settings
        return DeliveryJob(
            tenant=tenant,
            delivery_id=delivery_id,
            attempts=s.webhook_attempts,
            retry_first_seconds=s.webhook_retry_first_seconds,
            retry_max_seconds=s.webhook_retry_max_seconds,
            timeout_seconds=s.webhook_timeout_seconds,
        )

    async def dispatch_once(self) -> int:
        """Start every delivery waiting to be started (in bounded batches); how many."""
        started = 0
        for _ in range(MAX_BATCHES):
            async with self._pool.acquire() as conn, conn.transaction():
                rows = await store.claim_undispatched(conn, BATCH)
                keys = [(r["tenant_id"], r["id"]) for r in rows]
                await asyncio.gather(*(self._start(tenant, delivery) for tenant, delivery in keys))
                await store.mark_dispatched(conn, keys)
            started += len(keys)
            if len(keys) < BATCH:
                break
        return started

    async def _start(self, tenant: str, delivery_id: str) -> None:
        # Refused as a duplicate: started by an earlier pass that did not live to mark it.
        with contextlib.suppress(WorkflowAlreadyStartedError):
            await self._client.start_workflow(
                WebhookDelivery.run,
                self.job(tenant, delivery_id),
                id=delivery_workflow_id(tenant, delivery_id),
                task_queue=self._settings.task_queue,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                static_summary=f"webhook delivery {delivery_id} for {tenant}",
                rpc_timeout=timedelta(seconds=10),
            )

    async def run_forever(self) -> None:
        """Dispatch on every notification and every `poll_seconds`, until cancelled."""
        listener = asyncio.create_task(self._listen_forever())
        try:
            while True:
                try:
                    await self.dispatch_once()
                except Exception:
                    log.exception("webhook dispatch failed; will retry")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self._poll)
                self._wake.clear()
        finally:
            listener.cancel()

    async def _listen_forever(self) -> None:
        backoff = 0.5
        while True:
            try:
                await self._listen()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The poll keeps deliveries moving meanwhile, only later.
                log.warning("webhook listener lost (%s); reconnecting", type(exc).__name__)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    async def _listen(self) -> None:
        url = self._settings.database_url
        if url is None:
            raise RuntimeError("no database URL to listen on")
        conn = await asyncpg.connect(url.get_secret_value())
        try:
            await check_login(conn, self._settings.db_app_role)
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _: lost.set())
            await conn.add_listener(CHANNEL, lambda *_: self._wake.set())
            self._wake.set()  # anything enqueued while we were not listening
            await lost.wait()
        finally:
            await conn.close(timeout=5)
