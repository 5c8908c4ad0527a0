"""`ModelBatcher`: a tenant's deferred model calls, gathered into Message Batches.

Started (or joined) by `model.defer` with signal-with-start, one per tenant and task queue.
It keeps only ids: the calls wait in PostgreSQL (`stead.store.batches`). It submits when
`max_requests` wait or the oldest has waited `max_age_seconds`, checks each submitted batch
every `poll_seconds` on a durable timer (one short activity per check, never an activity that
holds a slot for hours), records the results and signals the runs (`model.batch_poll`), and
ends once nothing waits and nothing is in flight for a while; the next deferred call starts
it again. Its history is bounded by continue-as-new, carrying what waits and what flies.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from stead.calls import BatcherInput, PollBatch, Queued, SubmitBatch
    from stead.gateway.batches import ENQUEUE, BatchingModelActivities

# How long a batcher with nothing to do stays before it ends.
IDLE = timedelta(minutes=5)
_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=60),
    maximum_attempts=10,
)


@workflow.defn(name="stead.model-batcher")
class ModelBatcher:
    @workflow.init
    def __init__(self, start: BatcherInput) -> None:
        self._start = start
        self._pending: dict[str, datetime] = {q.custom_id: q.queued_at for q in start.pending}
        # Each submitted batch and when it is next checked.
        self._flying: dict[str, datetime] = dict.fromkeys(start.in_flight, workflow.now())
        self._flushes = start.flushes

    @workflow.signal(name=ENQUEUE)
    def enqueue(self, custom_id: str) -> None:
        """A deferred call is queued (a repeat, from a retried activity, changes nothing)."""
        self._pending.setdefault(custom_id, workflow.now())

    @workflow.run
    async def run(self, start: BatcherInput) -> None:
        while True:
            await self._flush_due()
            await self._poll_due()
            if workflow.info().is_continue_as_new_suggested():
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(self._carried())
            if not self._pending and not self._flying:
                with contextlib.suppress(asyncio.TimeoutError):
                    await workflow.wait_condition(lambda: bool(self._pending), timeout=IDLE)
                if not self._pending:  # a signal in the same task as the timer counts
                    await workflow.wait_condition(workflow.all_handlers_finished)
                    return
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await workflow.wait_condition(self._full, timeout=self._until_next())

    def _full(self) -> bool:
        return len(self._pending) >= self._start.max_requests

    def _until_next(self) -> timedelta:
        now = workflow.now()
        wakes = list(self._flying.values())
        if self._pending:
            oldest = min(self._pending.values())
            wakes.append(oldest + timedelta(seconds=self._start.max_age_seconds))
        return max(min(wakes) - now, timedelta(milliseconds=100))

    async def _flush_due(self) -> None:
        max_age = timedelta(seconds=self._start.max_age_seconds)
        while self._pending and (
            self._full() or workflow.now() - min(self._pending.values()) >= max_age
        ):
            ids = list(self._pending)[: self._start.max_requests]
            for custom_id in ids:
                del self._pending[custom_id]
            self._flushes += 1
            info = workflow.info()
            submit = SubmitBatch(
                tenant=self._start.tenant,
                custom_ids=ids,
                flush_key=f"{info.workflow_id}:{info.first_execution_run_id}:{self._flushes}",
            )
            try:
                batch_id = await workflow.execute_activity_method(
                    BatchingModelActivities.submit_batch,
                    submit,
                    start_to_close_timeout=timedelta(minutes=2),
                    heartbeat_timeout=timedelta(seconds=30),
                    retry_policy=_RETRY,
                )
            except ActivityError:
                # Its runs fall back to direct calls at their deadlines.
                workflow.logger.exception("batch submission failed for %d calls", len(ids))
                continue
            if batch_id is not None:
                self._flying[batch_id] = workflow.now() + self._poll_every

    @property
    def _poll_every(self) -> timedelta:
        return timedelta(seconds=self._start.poll_seconds)

    async def _poll_due(self) -> None:
        for batch_id, due in list(self._flying.items()):
            if due > workflow.now():
                continue
            try:
                ended = await workflow.execute_activity_method(
                    BatchingModelActivities.poll_batch,
                    PollBatch(tenant=self._start.tenant, batch_id=batch_id),
                    start_to_close_timeout=timedelta(minutes=10),
                    heartbeat_timeout=timedelta(seconds=60),
                    retry_policy=_RETRY,
                )
            except ActivityError:
                workflow.logger.exception("checking batch %s failed; trying again later", batch_id)
                ended = False
            if ended:
                del self._flying[batch_id]
            else:
                self._flying[batch_id] = workflow.now() + self._poll_every

    def _carried(self) -> BatcherInput:
        return self._start.model_copy(
            update={
                "pending": [Queued(custom_id=c, queued_at=t) for c, t in self._pending.items()],
                "in_flight": list(self._flying),
                "flushes": self._flushes,
            }
        )
