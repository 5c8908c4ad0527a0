"""Deferred model calls through the Message Batches API: half price, results within hours.

A deferred step (`call_model(..., defer=True)`, or every step of a run started with
`"defer": true`) goes through these activities instead of `model.call`:

- `model.defer` plans the call as `model.call` would (memo and response cache first), reserves
  its worst case at batch rates, held past the sweeper's age for as long as the batch may take,
  queues it in PostgreSQL and signals-with-start the tenant's batcher (`ModelBatcher`);
- the batcher submits queued calls as one batch (`model.batch_submit`, when enough wait or
  the oldest has waited long enough), checks it on a durable timer (`model.batch_poll`, a
  short activity each time), and once it has ended records every result: the cost first
  (settling the reservation from actual usage at batch rates, the ledger row), then the reply
  and audit event; then it signals each waiting run;
- the run, woken by that signal or by its own periodic timer, reads its result
  (`model.batch_collect`) by `custom_id`: only its own. A run cancelled or past its deadline
  gives the call up (`model.batch_abandon`): a queued call is never sent; a submitted one
  cancels its batch if no other run still waits on it, and is recorded as billed if the
  provider answered anyway; past its deadline the run then calls the model directly.

Why a batcher workflow per tenant: one process that can own "which calls are waiting and
since when" durably without a server of its own is a workflow; signal-with-start makes the
first deferred call of a quiet tenant start it and every later one join it, and a batcher
with nothing left to do ends. Per tenant, not shared: the batch discount is per request, so
mixing tenants saves nothing, and a tenant's requests, failures and cancellations then never
touch another's batch. Prompts stay out of every history (the queue is in PostgreSQL, and the
request body is dropped once submitted); only ids travel in signals.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import anthropic
from anthropic.types.messages import MessageBatchIndividualResponse
from anthropic.types.messages.batch_create_params import Request as BatchRequest
from temporalio import activity
from temporalio.common import Priority
from temporalio.service import RPCError, RPCStatusCode

from stead import metrics
from stead.calls import (
    BatchCheck,
    BatcherInput,
    BatchOutcome,
    DeferCall,
    DeferTicket,
    ModelCall,
    ModelReply,
    PollBatch,
    SubmitBatch,
)
from stead.errors import ErrorType, failure
from stead.gateway.heartbeat import heartbeating
from stead.gateway.model import (
    ModelActivities,
    called_event,
    gateway_event,
    reply_content,
    reply_usage,
)
from stead.pipeline.core import RunCore
from stead.store import batches, budgets, usage
from stead.store.batches import Deferred

# The reservation of a deferred call is its attempt 0 (direct attempts count from 1).
DEFER_ATTEMPT = 0
# A held reservation outlives its deadline by this much before the sweeper may charge it.
HOLD_MARGIN = timedelta(hours=1)
ENQUEUE = "stead.batch_enqueue"
BATCHER_PRIORITY = Priority(priority_key=1)
_SIGNALS_AT_ONCE = 32
# Results recorded at once: each is a few short transactions, so one at a time made a
# 500-request batch take minutes to record (bench/batches.py); bounded to spare the pool.
_RECORDS_AT_ONCE = 8
_RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504, 529}


def custom_id_of(call_key: str) -> str:
    """The call's id in a batch: `^[a-zA-Z0-9_-]{1,64}$`, derived from its call key."""
    return "c" + hashlib.sha256(call_key.encode()).hexdigest()[:40]


def batcher_id(task_queue: str, tenant: str) -> str:
    # No `tenant:` prefix: nothing the API resolves from a run id can name a batcher.
    return f"stead-batcher/{task_queue}/{tenant}"


def _bare(call: ModelCall) -> dict[str, Any]:
    """What recording a result needs of the call: its context and step, not its prompt."""
    lean = call.model_copy(update={"messages": [], "tools": [], "system": None, "events": []})
    return lean.model_dump(mode="json")


class BatchingModelActivities(ModelActivities):
    """The model gateway with its Message Batches activities (see the module docstring)."""

    @activity.defn(name="model.defer")
    async def defer(self, request: DeferCall) -> DeferTicket:
        call = await self.whole(request.call, DEFER_ATTEMPT)
        key = call.call_key
        plan = self.plan(call)
        policy = self._routing.batches
        deadline = request.deadline_seconds or policy.deadline_seconds
        ticket = DeferTicket(
            custom_id=custom_id_of(key),
            deadline_seconds=deadline,
            check_seconds=max(policy.poll_seconds * 2, 1.0),
        )
        ready = await self._lookup(call, key, plan)
        early = await self._answered(call, key, 1, ready)
        if early is not None:
            return ticket.model_copy(update={"reply": early})
        model = plan.models[0]
        if ready.budgeted or call.run_budget_nusd is not None:

            def worst_case(tokens: int) -> int:
                return self._prices.worst_case_nusd(
                    model, tokens, plan.sent["max_tokens"], cache_ttl=plan.ttl, batch=True
                )

            held = datetime.now(UTC) + timedelta(seconds=deadline) + HOLD_MARGIN
            await self._reserve_worst_case(
                call, key, DEFER_ATTEMPT, model, plan.sent, worst_case, held_until=held
            )
        async with self._pool.acquire() as conn:
            await batches.queue(
                conn,
                custom_id=ticket.custom_id,
                tenant=call.context.tenant,
                call_key=key,
                workflow_id=request.workflow_id,
                model=model,
                call={"call": _bare(call), "digest": plan.digest.hex(), "ttl": plan.ttl},
                request={"model": model, **plan.sent},
            )
        facts = {"step": call.step, "model": model, "deadline_seconds": deadline}
        deferred = gateway_event(call, f"{key}:deferred", "model.deferred", facts)
        await self._write_events([*call.events, deferred])
        await self._enqueue(call.context.tenant, request.task_queue, ticket.custom_id)
        return ticket

    async def _enqueue(self, tenant: str, task_queue: str, custom_id: str) -> None:
        # The batcher's module refers to these activities: imported here, not at the top.
        from stead.gateway.batcher import ModelBatcher  # noqa: PLC0415  # import cycle

        policy = self._routing.batches
        await activity.client().start_workflow(
            ModelBatcher.run,
            BatcherInput(
                tenant=tenant,
                max_requests=policy.max_requests,
                max_age_seconds=policy.max_age_seconds,
                poll_seconds=policy.poll_seconds,
            ),
            id=batcher_id(task_queue, tenant),
            task_queue=task_queue,
            start_signal=ENQUEUE,
            start_signal_args=[custom_id],
            # Ahead of the runs' own tasks (default 3): with a backlog of runs on the queue, a
            # batcher behind them flushed nothing for minutes while every run waited on it.
            priority=BATCHER_PRIORITY,
        )

    @activity.defn(name="model.batch_collect")
    async def collect_batch(self, check: BatchCheck) -> BatchOutcome:
        """The call's result if its batch has ended (recorded by the batcher), else pending."""
        if check.events:
            await self._write_events(check.events)
        async with self._pool.acquire() as conn:
            found = await batches.find(conn, check.custom_id)
        if found is None:
            return BatchOutcome(status="failed", reason="no such deferred call")
        if found.status == "succeeded" and found.reply is not None:
            return BatchOutcome(status="succeeded", reply=ModelReply.model_validate(found.reply))
        if found.status in batches.FINAL:
            return BatchOutcome(status="failed", reason=found.reason or found.status)
        return BatchOutcome(status="pending")

    @activity.defn(name="model.batch_abandon")
    async def abandon_batch(self, check: BatchCheck) -> None:
        """The run gives the call up: never send it, or cancel its batch if no other run still
        waits on it. Its reservation settles now (never sent) or when the batch ends."""
        if check.events:
            await self._write_events(check.events)
        async with self._pool.acquire() as conn:
            before = await batches.abandon(conn, check.custom_id)
            if before is None:
                return
            if not before.abandoned:
                metrics.MODEL_BATCH_REQUESTS.labels("abandoned").inc()
            if before.status == "queued":
                async with conn.transaction():
                    await budgets.settle(conn, before.call_key, DEFER_ATTEMPT, 0)
                return
            if before.status != "submitted" or before.batch_id is None:
                return
            if await batches.live_in_batch(conn, before.batch_id):
                return
        await self._cancel_at_provider(before.batch_id)

    async def _cancel_at_provider(self, batch_id: str) -> None:
        try:
            await heartbeating(
                self._client.messages.batches.cancel(batch_id), self._heartbeat_every
            )
        except anthropic.APIStatusError as exc:
            if exc.status_code in _RETRYABLE_STATUS:
                raise
            # Already ended or gone: nothing left to cancel.

    @activity.defn(name="model.batch_submit")
    async def submit_batch(self, submit: SubmitBatch) -> str | None:
        """Submit the still-queued calls among `custom_ids` as one batch; its id, or None if
        none was left to send (or the provider refused the batch: its runs are told)."""
        async with self._pool.acquire() as conn:
            known = await batches.batch_of_flush(conn, submit.flush_key)
            if known is not None:
                return known
            refused: list[str] = []
            async with conn.transaction():
                queued = await batches.take_queued(conn, submit.custom_ids)
                if not queued:
                    return None
                ids = [custom_id for custom_id, _ in queued]
                try:
                    made = await heartbeating(self._create(queued), self._heartbeat_every)
                except anthropic.APIStatusError as exc:
                    if exc.status_code in _RETRYABLE_STATUS:
                        raise
                    reason = f"the provider refused the batch ({exc.status_code})"
                    for custom_id in ids:
                        await batches.mark_result(
                            conn, custom_id, "errored", reason=reason, leaving=("queued",)
                        )
                    refused = ids
                else:
                    await batches.mark_submitted(
                        conn,
                        tenant=submit.tenant,
                        batch_id=made.id,
                        flush_key=submit.flush_key,
                        custom_ids=ids,
                    )
                    return made.id
        await self._settle_refused(refused)
        return None

    async def _create(
        self, queued: list[tuple[str, dict[str, Any]]]
    ) -> anthropic.types.messages.MessageBatch:
        requests = [cast(BatchRequest, {"custom_id": c, "params": p}) for c, p in queued]
        return await self._client.messages.batches.create(requests=requests)

    async def _settle_refused(self, custom_ids: list[str]) -> None:
        async with self._pool.acquire() as conn:
            found = [f for f in [await batches.find(conn, c) for c in custom_ids] if f]
            for deferred in found:
                async with conn.transaction():
                    await budgets.settle(conn, deferred.call_key, DEFER_ATTEMPT, 0)
        await self._signal(found)

    @activity.defn(name="model.batch_poll")
    async def poll_batch(self, poll: PollBatch) -> bool:
        """Whether the batch has ended; once it has, record every result and tell the runs."""
        try:
            batch = await heartbeating(
                self._client.messages.batches.retrieve(poll.batch_id), self._heartbeat_every
            )
        except anthropic.APIStatusError as exc:
            if exc.status_code in _RETRYABLE_STATUS:
                raise
            raise failure(
                ErrorType.BAD_REQUEST,
                f"the provider does not know batch {poll.batch_id} ({exc.status_code})",
                {"batch_id": poll.batch_id},
            ) from None
        if batch.processing_status != "ended":
            return False
        results = await self._client.messages.batches.results(poll.batch_id)
        await self._record_results(results)
        async with self._pool.acquire() as conn:
            members = await batches.in_batch(conn, poll.batch_id)
        for missing in (m for m in members if m.status == "submitted"):
            await self._record_failure(missing, "errored", "missing from the batch's results")
        async with self._pool.acquire() as conn:
            await batches.end_batch(conn, poll.batch_id)
        await self._signal(m for m in members if not m.abandoned)
        return True

    async def _record_results(self, results: AsyncIterator[MessageBatchIndividualResponse]) -> None:
        """Record the results as they stream in, a few at once (each on its own custom_id)."""
        gate = asyncio.Semaphore(_RECORDS_AT_ONCE)
        # Every task is kept to the end: a failed one must fail the poll (and be retried),
        # never leave its call to be taken for missing from the results.
        recording: list[asyncio.Task[None]] = []

        async def one(item: MessageBatchIndividualResponse) -> None:
            try:
                await self._record_result(item)
                activity.heartbeat()
            finally:
                gate.release()

        try:
            async for item in results:
                await gate.acquire()
                recording.append(asyncio.create_task(one(item)))
            await asyncio.gather(*recording)
        finally:
            for task in recording:
                task.cancel()

    async def _record_result(self, item: MessageBatchIndividualResponse) -> None:
        """One result: what it cost first (settled at batch rates), then what it said."""
        async with self._pool.acquire() as conn:
            found = await batches.find(conn, item.custom_id)
        if found is None or found.status != "submitted":
            return  # not ours, or recorded by an earlier attempt
        result = item.result
        metrics.MODEL_BATCH_REQUESTS.labels(result.type).inc()
        if result.type != "succeeded":
            reason = (
                f"{result.error.error.type}: {result.error.error.message}"[:300]
                if result.type == "errored"
                else result.type
            )
            await self._record_failure(found, result.type, reason)
            return
        call = ModelCall.model_validate(found.call["call"])
        message = result.message
        reply = ModelReply(
            model=found.model,
            content=reply_content(message),
            stop_reason=message.stop_reason or "end_turn",
            usage=reply_usage(
                self._prices, found.model, message.usage, found.call["ttl"], batch=True
            ),
            batch=True,
        )
        await self._record_cost(call, found.call_key, DEFER_ATTEMPT, reply, budgeted=True)
        metrics.observe_usage(call.context.pipeline, reply.model, reply.usage)
        stored = reply.model_dump(mode="json")
        cacheable = call.cache and reply.stop_reason != "max_tokens"
        entry = {"content": reply.content, "stop_reason": reply.stop_reason}
        async with self._pool.acquire() as conn:
            digest = bytes.fromhex(found.call["digest"])
            await usage.remember(
                conn,
                found.call_key,
                found.tenant,
                stored,
                (digest, entry, self._cache_ttl) if cacheable else None,
            )
            await batches.mark_result(conn, found.custom_id, "succeeded", reply=stored)
        await self._write_events([called_event(call, found.call_key, reply)])

    async def _record_failure(self, found: Deferred, status: str, reason: str) -> None:
        """Errored, expired or canceled: nothing billed, the reservation settles at zero."""
        call = ModelCall.model_validate(found.call["call"])
        async with self._pool.acquire() as conn, conn.transaction():
            await budgets.settle(conn, found.call_key, DEFER_ATTEMPT, 0)
            await batches.mark_result(conn, found.custom_id, status, reason=reason)
        data = {"step": call.step, "model": found.model, "result": status, "reason": reason}
        failed = gateway_event(call, f"{found.call_key}:batch", "model.batch_failed", data)
        await self._write_events([failed])

    async def _signal(self, members: Iterable[Deferred]) -> None:
        """Tell each waiting run its result is in (a run already closed is no longer
        waiting; a signal lost anyway is made good by the run's own periodic check)."""
        client = activity.client()
        gate = asyncio.Semaphore(_SIGNALS_AT_ONCE)

        async def one(member: Deferred) -> None:
            async with gate:
                handle = client.get_workflow_handle(member.workflow_id)
                try:
                    await handle.signal(RunCore.batch_result, member.custom_id)
                except RPCError as exc:
                    if exc.status != RPCStatusCode.NOT_FOUND:
                        raise

        await asyncio.gather(*(one(m) for m in members))
