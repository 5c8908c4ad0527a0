"""The model gateway: every model call in Stead is this activity.

One attempt does, in order: return the memoized reply if an earlier attempt of this call
finished; serve an exact-match cache hit for the model asked for (free, recorded); reserve the
worst-case cost on every applicable budget, waiting while only calls in flight stand in the
way; call the route's models in order, moving to the next on 429, 529, 5xx or timeout (a
fallback); record the cost (settle the reservation, write the ledger row), the memo, cache
entry and audit events in one transaction.

A billed call is never left off the record. The reply is made storable (NUL and lone
surrogates replaced, see `store.text`) before it is memoized, cached, audited or handed to the
workflow; should the one transaction fail all the same, the cost is written alone, in a
transaction of identifiers and numbers that no reply can make fail, before anything else is
tried. If even the cost cannot be written, the attempt fails loudly and its reservation is
charged in full, here or by the sweeper (`store.budgets.sweep_stale`).

Temporal owns retries: the SDK client runs with `max_retries=0` and a timeout below the
activity's start-to-close. When every model of the route is unavailable the attempt fails
retryably, with the provider's retry-after as the next retry delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, NoReturn, TypeAlias, TypeVar

import anthropic
from temporalio import activity

from stead import metrics
from stead.calls import ModelCall, ModelReply
from stead.contract import AuditEvent, Usage
from stead.errors import ErrorType, failure
from stead.gateway.heartbeat import heartbeating
from stead.gateway.prompt import request_body, with_breakpoints
from stead.gateway.streaming import TokenStream
from stead.policy.models import CacheTtl, PriceTable, RoutingPolicy, TokenCounts
from stead.store import budgets, usage
from stead.store.audit import AuditWriter, run_event
from stead.store.conversations import (
    ConversationMissing,
    ConversationStore,
    ConversationUnreadable,
)
from stead.store.db import Conn, Pool
from stead.store.text import storable
from stead.telemetry import set_attributes, span
from stead.transcript import preamble

T = TypeVar("T")
# What `usage.remember` takes: the call's key, its tenant, the reply, and the cache entry.
_Memo: TypeAlias = tuple[str, str, dict[str, Any], tuple[bytes, dict[str, Any], timedelta] | None]
_RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504, 529}
_AUTH_STATUS = {401, 403}
_TOKEN_FIELDS = {*usage.TOKEN_COLUMNS, "cache_saved_nusd"}
# Polling a busy budget: the first look soon (calls settle in milliseconds to seconds), then
# less often, jittered so that waiters do not come back in step.
_BUDGET_POLL_FIRST = 0.05
_BUDGET_POLL_MAX = 1.0


class _Unavailable(Exception):
    type = ErrorType.PROVIDER_UNAVAILABLE  # what a failed span records (stead.telemetry)

    def __init__(self, retry_after: float | None, detail: str) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


def _retry_after(exc: anthropic.APIStatusError) -> float | None:
    raw = exc.response.headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(float(raw), 0.0)
    except ValueError:
        pass
    try:
        return max((parsedate_to_datetime(raw) - datetime.now(UTC)).total_seconds(), 0.0)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class Planned:
    """What one model call sends: the route's models in order, the request as the response
    cache and history know it (`request`, `digest`), and as sent, with breakpoints at `ttl`."""

    models: tuple[str, ...]
    request: dict[str, Any]
    digest: bytes
    ttl: CacheTtl | None
    sent: dict[str, Any]


class ModelActivities:
    def __init__(
        self,
        pool: Pool,
        client: anthropic.AsyncAnthropic,
        prices: PriceTable,
        routing: RoutingPolicy,
        audit: AuditWriter,
        *,
        cache_ttl: timedelta = timedelta(hours=24),
        heartbeat_every: float = 5.0,
        # How long a call waits for reservations in flight to settle before its attempt fails
        # retryably; with the call itself it stays well inside the model policy's
        # start-to-close (policies/retries.py).
        budget_wait: timedelta = timedelta(minutes=2),
        # Where long conversations' messages are (workflow revision 3 on); by default in
        # `pool`, unsealed: give the worker's payload keys.
        conversations: ConversationStore | None = None,
    ) -> None:
        self._pool = pool
        self._conversations = conversations or ConversationStore(pool)
        self._client = client
        self._prices = prices
        self._routing = routing
        self._audit = audit
        self._cache_ttl = cache_ttl
        self._heartbeat_every = heartbeat_every
        self._budget_wait = budget_wait

    @activity.defn(name="model.call")
    async def call_model(self, call: ModelCall) -> ModelReply:
        attempt = activity.info().attempt
        call = await self.whole(call, attempt)
        key = call.call_key or _fallback_key()
        plan = self.plan(call)
        models, sent, digest, ttl = plan.models, plan.sent, plan.digest, plan.ttl
        ready = await self._lookup(call, key, plan)
        early = await self._answered(call, key, attempt, ready)
        if early is not None:
            return early
        # Without a budget to enforce there is nothing to reserve, and no reason to spend a
        # provider round trip counting tokens.
        budgeted = ready.budgeted or call.run_budget_nusd is not None
        worst = 0
        if budgeted:

            def worst_case(input_tokens: int) -> int:
                return max(
                    self._prices.worst_case_nusd(m, input_tokens, sent["max_tokens"], cache_ttl=ttl)
                    for m in models
                )

            worst = await self._reserve_worst_case(call, key, attempt, models[0], sent, worst_case)

        settled = False
        try:
            started = time.perf_counter()
            with span(
                "model.call",
                tenant=call.context.tenant,
                pipeline=call.context.pipeline,
                step=call.step,
                task=call.task,
                attempt=attempt,
            ) as current:
                model, message, fallbacks = await heartbeating(
                    self._route(models, sent, call), self._heartbeat_every
                )
                latency_ms = (time.perf_counter() - started) * 1000
                reply = self._reply(model, message, fallbacks, attempt, latency_ms, ttl)
                set_attributes(
                    current,
                    model=model,
                    fallbacks=fallbacks,
                    input_tokens=reply.usage.input_tokens,
                    output_tokens=reply.usage.output_tokens,
                    cost_usd=reply.usage.cost_usd,
                    cache_hit=False,
                )
            await self._finish(call, key, attempt, reply, digest, budgeted=budgeted)
            settled = True
            return reply
        except _Unavailable as exc:
            await self._release(call, key, attempt, 0, f"all route models unavailable: {exc}")
            settled = True
            delay = timedelta(seconds=exc.retry_after) if exc.retry_after else None
            raise failure(
                ErrorType.PROVIDER_UNAVAILABLE,
                f"every model of the route failed: {exc}",
                {"attempt": attempt},
                next_retry_delay=delay,
            ) from None
        except anthropic.APIStatusError as exc:
            await self._release(call, key, attempt, 0, f"provider refused: {exc.status_code}")
            settled = True
            kind = (
                ErrorType.AUTHENTICATION
                if exc.status_code in _AUTH_STATUS
                else ErrorType.BAD_REQUEST
            )
            # The provider's own words stay in the details (encrypted in the history, for an
            # operator with the codec): the message reaches traces, and a provider's message
            # can quote the request.
            raise failure(
                kind,
                f"the provider refused the request ({exc.status_code} {type(exc).__name__})",
                {"attempt": attempt, "provider_message": _provider_message(exc)},
            ) from None
        finally:
            if not settled and budgeted:
                # Cancelled or crashed mid-call: the provider may bill what it generated, so
                # the reservation is charged in full.
                await asyncio.shield(self._release_quietly(key, attempt, worst))

    async def whole(self, call: ModelCall, attempt: int) -> ModelCall:
        """The call with its whole transcript: a long conversation's stored prefix resolved
        and its new messages stored for the next turn (stead.store.conversations)."""
        if call.prefix is None:
            return call
        new = call.messages
        if not call.prefix_length:  # nothing stored yet: the preamble comes first
            new = [preamble(call.system, call.tools), *call.messages]
        try:
            head, *messages = await self._conversations.resolve(
                activity.info().workflow_id or "", call.prefix, call.prefix_length, new
            )
        except ConversationMissing as exc:
            raise failure(ErrorType.CONVERSATION_MISSING, str(exc), {"attempt": attempt}) from None
        except ConversationUnreadable as exc:
            raise failure(
                ErrorType.CONVERSATION_UNREADABLE, str(exc), {"attempt": attempt}
            ) from None
        if set(head) != {"system", "tools"}:
            raise failure(
                ErrorType.CONVERSATION_MISSING,
                "the stored conversation does not begin with a preamble",
                {"attempt": attempt},
            )
        return call.model_copy(
            update={
                "system": head.get("system"),
                "tools": head.get("tools") or [],
                "messages": messages,
                "prefix": None,
                "prefix_length": 0,
            }
        )

    def plan(self, call: ModelCall) -> Planned:
        """The call's models, request and identity (a bad task class is a bad request)."""
        try:
            route = self._routing.route(call.task, call.context.plan)
        except KeyError:
            raise failure(
                ErrorType.BAD_REQUEST, f"no route for task class {call.task!r}", {"attempt": 1}
            ) from None
        request = request_body(call, route)
        ttl = route.cache_ttl if call.prompt_cache else None
        return Planned(
            models=route.candidates(call.escalate),
            request=request,
            # The identity is taken before the breakpoints: where they sit is the gateway's
            # business, not the request's.
            digest=usage.request_hash(request),
            ttl=ttl,
            sent=with_breakpoints(request, ttl) if ttl else request,
        )

    # --- steps -------------------------------------------------------------------------------

    async def _lookup(self, call: ModelCall, key: str, plan: Planned) -> usage.Prepared:
        with span(
            "model.cache_lookup",
            tenant=call.context.tenant,
            pipeline=call.context.pipeline,
            step=call.step,
        ) as lookup:
            async with self._pool.acquire() as conn:
                ready = await usage.prepare(
                    conn,
                    tenant=call.context.tenant,
                    principal=call.context.requested_by,
                    call_key=key,
                    model=plan.models[0],
                    digest=plan.digest if call.cache else None,
                )
            set_attributes(lookup, **_lookup_facts(call.cache, ready))
        return ready

    async def _answered(
        self, call: ModelCall, key: str, attempt: int, ready: usage.Prepared
    ) -> ModelReply | None:
        """The reply without a provider call: an earlier attempt's memo, or a cache hit."""
        if ready.memo is not None:
            memo = ModelReply.model_validate(ready.memo)
            # The attempt that memoized it may have failed before its audit write.
            await self._write_events([*call.events, called_event(call, key, memo)])
            return memo
        if call.cache:
            metrics.MODEL_CACHE.labels("hit" if ready.cached else "miss").inc()
            if ready.cached is not None:
                return await self._serve_cached(call, key, attempt, *ready.cached)
        return None

    async def _serve_cached(
        self, call: ModelCall, key: str, attempt: int, model: str, stored: dict[str, Any]
    ) -> ModelReply:
        """A cache hit is the activity's result (replay stays deterministic) and costs nothing."""
        reply = ModelReply(
            model=model,
            content=stored["content"],
            stop_reason=stored["stop_reason"],
            usage=Usage(model_calls=1, cache_hits=1),
            cache_hit=True,
            attempt=attempt,
        )
        await self._finish(call, key, attempt, reply, None, budgeted=False)
        return reply

    async def _reserve_worst_case(
        self,
        call: ModelCall,
        key: str,
        attempt: int,
        model: str,
        request: dict[str, Any],
        worst_case: Callable[[int], int],
        *,
        held_until: datetime | None = None,
    ) -> int:
        """Reserve what the call can cost at most, and return it. First with a bound on its
        input tokens taken from the request itself: when the budget has room for that, no
        provider round trip is spent on counting (against Anthropic, `count_tokens` is a
        request of its own before every budgeted call). Only when the bound does not fit, or
        cannot be taken (images, documents), are the tokens counted by the provider and the
        reservation made with the exact worst case, waiting for calls in flight as before."""
        bound = input_token_bound(request)
        if bound is not None:
            amount = worst_case(bound)
            try:
                await self._reserve_once(call, key, attempt, amount, held_until)
                return amount
            except budgets.BudgetRefused:
                pass  # a refused reservation took nothing: try again with the exact count
        amount = worst_case(await self._count_tokens(model, request))
        await self._reserve(call, key, attempt, amount, held_until=held_until)
        return amount

    async def _reserve_once(
        self, call: ModelCall, key: str, attempt: int, amount: int, held_until: datetime | None
    ) -> None:
        async with self._pool.acquire() as conn:
            await budgets.reserve(
                conn,
                call.context,
                key,
                attempt,
                amount,
                run_limit_nusd=call.run_budget_nusd,
                held_until=held_until,
            )

    async def _count_tokens(self, model: str, request: dict[str, Any]) -> int:
        params = _input_params(request)
        try:
            counted = await heartbeating(
                self._client.messages.count_tokens(model=model, **params), self._heartbeat_every
            )
            return int(counted.input_tokens)
        except (TimeoutError, anthropic.APIError):
            # Counting is advisory; never block a call on it. Two bytes a token overestimates
            # every tokenizer we know, so the reservation stays a worst case.
            return len(repr(params).encode()) // 2 + 16

    async def _reserve(
        self,
        call: ModelCall,
        key: str,
        attempt: int,
        amount: int,
        *,
        held_until: datetime | None = None,
    ) -> None:
        """Reserve the call's worst case. While the only obstacle is other calls' reservations
        in flight, wait (heartbeating) for them to settle, up to `budget_wait`.

        Waiting here rather than failing the attempt keeps Temporal's attempts for real
        attempts: a wait is no failure of the call, and retries spent on it would fail runs
        that the budget can pay for. Each look is the same conditional reservation, so spend
        can no more pass a limit while waiting than without it.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._budget_wait.total_seconds()
        pause = _BUDGET_POLL_FIRST
        while True:
            try:
                await self._reserve_once(call, key, attempt, amount, held_until)
                return
            except budgets.BudgetExhausted as exc:
                await self._reject(call, key, attempt, exc)
            except budgets.BudgetBusy as exc:
                left = deadline - loop.time()
                if left <= 0:
                    raise failure(
                        ErrorType.BUDGET_BUSY,
                        f"{exc}; calls in flight did not settle within"
                        f" {self._budget_wait.total_seconds():g}s",
                        {"scope": exc.scope, "period": exc.period, "attempt": attempt},
                    ) from None
                await heartbeating(
                    asyncio.sleep(min(random.uniform(pause / 2, pause), left)),  # noqa: S311  # jitter, not a secret
                    self._heartbeat_every,
                )
                pause = min(pause * 2, _BUDGET_POLL_MAX)

    async def _reject(
        self, call: ModelCall, key: str, attempt: int, exc: budgets.BudgetExhausted
    ) -> NoReturn:
        metrics.BUDGET_REJECTIONS.labels(exc.scope).inc()
        await self._write_events(
            [
                *call.events,
                gateway_event(
                    call,
                    f"{key}:budget:{attempt}",
                    "budget.rejected",
                    {
                        "step": call.step,
                        "scope": exc.scope,
                        "period": exc.period,
                        "limit_nusd": exc.limit_nusd,
                        "used_nusd": exc.spent_nusd + exc.reserved_nusd,
                        "spent_nusd": exc.spent_nusd,
                        "reserved_nusd": exc.reserved_nusd,
                        "requested_nusd": exc.requested_nusd,
                    },
                ),
            ]
        )
        raise failure(
            ErrorType.BUDGET_EXHAUSTED,
            str(exc),
            {
                "scope": exc.scope,
                "period": exc.period,
                "limit_nusd": exc.limit_nusd,
                "attempt": attempt,
            },
        ) from None

    async def _route(
        self, models: tuple[str, ...], request: dict[str, Any], call: ModelCall
    ) -> tuple[str, anthropic.types.Message, int]:
        async with _tokens(call) as tokens:
            return await self._call_route(models, request, tokens)

    async def _call_route(
        self, models: tuple[str, ...], request: dict[str, Any], tokens: TokenStream | None = None
    ) -> tuple[str, anthropic.types.Message, int]:
        """Try each model in order; return (model, message, fallbacks used)."""
        failures: list[str] = []
        retry_after: float | None = None
        for index, model in enumerate(models):
            if index:
                metrics.MODEL_FALLBACKS.labels(models[index - 1], model).inc()
            started = time.perf_counter()
            try:
                message = await (
                    tokens.message(self._client, model, request)
                    if tokens is not None
                    else self._client.messages.create(model=model, **request)
                )
            except anthropic.APIStatusError as exc:
                metrics.MODEL_ERRORS.labels(model, str(exc.status_code)).inc()
                if exc.status_code not in _RETRYABLE_STATUS:
                    raise
                after = _retry_after(exc)
                retry_after = max(retry_after or 0.0, after) if after is not None else retry_after
                failures.append(f"{model}: {exc.status_code}")
                continue
            except (TimeoutError, anthropic.APIConnectionError) as exc:
                kind = (
                    "timeout"
                    if isinstance(exc, anthropic.APITimeoutError | asyncio.TimeoutError)
                    else "connection"
                )
                metrics.MODEL_ERRORS.labels(model, kind).inc()
                failures.append(f"{model}: {kind}")
                continue
            metrics.MODEL_LATENCY.labels(model).observe(time.perf_counter() - started)
            return model, message, index
        raise _Unavailable(retry_after, "; ".join(failures))

    def _reply(
        self,
        model: str,
        message: anthropic.types.Message,
        fallbacks: int,
        attempt: int,
        latency_ms: float,
        ttl: CacheTtl | None,
    ) -> ModelReply:
        return ModelReply(
            model=model,
            content=reply_content(message),
            stop_reason=message.stop_reason or "end_turn",
            usage=reply_usage(self._prices, model, message.usage, ttl, fallbacks=fallbacks),
            fallbacks=fallbacks,
            attempt=attempt,
            latency_ms=round(latency_ms, 2),
        )

    async def _finish(
        self,
        call: ModelCall,
        key: str,
        attempt: int,
        reply: ModelReply,
        digest: bytes | None,
        *,
        budgeted: bool = True,
    ) -> None:
        """Record the call: what it cost, what it said and its audit events in one
        transaction (one commit, shared with the tenant's other calls finishing meanwhile), so
        a worker that dies after it cannot leave a cost without its reply (the retry would buy
        the reply again) or a call without its audit entry.

        Should that transaction fail, the cost is written alone first and the memo and cache
        entry after it, then the events: they can fail only in an outage (their content is
        storable), and the cost must not go down with them. A retry then finds the cost
        recorded and, once the memo is written, the reply too, so it does not call the
        provider again.
        """
        cacheable = digest is not None and call.cache and reply.stop_reason != "max_tokens"
        memo = (
            key,
            call.context.tenant,
            reply.model_dump(mode="json"),
            (
                digest,
                {"content": reply.content, "stop_reason": reply.stop_reason},
                self._cache_ttl,
            )
            if cacheable and digest is not None
            else None,
        )
        events = _storable_events([*call.events, called_event(call, key, reply)])

        async def cost(conn: Conn) -> None:
            await self._cost_statements(conn, call, key, attempt, reply, budgeted, memo)

        audited = True
        try:
            await self._audit.record(self._pool, events, first=cost)
        except Exception:  # whatever failed, the cost alone is tried next
            await self._record_cost(call, key, attempt, reply, budgeted=budgeted)
            async with self._pool.acquire() as conn:
                await usage.remember(conn, *memo)
            audited = False
        metrics.observe_usage(call.context.pipeline, reply.model, reply.usage)
        if not audited:
            await self._audit.record(self._pool, events)

    def _usage_row(
        self, call: ModelCall, key: str, attempt: int, reply: ModelReply
    ) -> dict[str, Any]:
        """The ledger row: numbers and our own identifiers, nothing a provider wrote."""
        ctx = call.context
        return {
            **_facts(call, reply),
            "call_key": key,
            "attempt": attempt,
            "tenant_id": ctx.tenant,
            "principal_id": ctx.requested_by,
            "pipeline": ctx.pipeline,
            "run_id": ctx.run_id,
        }

    async def _write_cost(
        self,
        call: ModelCall,
        key: str,
        attempt: int,
        reply: ModelReply,
        *,
        budgeted: bool,
    ) -> None:
        """Settle the reservation and write the ledger row, in one transaction of their own."""
        async with self._pool.acquire() as conn, conn.transaction():
            await self._cost_statements(conn, call, key, attempt, reply, budgeted, None)

    async def _cost_statements(
        self,
        conn: Conn,
        call: ModelCall,
        key: str,
        attempt: int,
        reply: ModelReply,
        budgeted: bool,
        memo: _Memo | None,
    ) -> None:
        if budgeted:
            await budgets.settle(conn, key, attempt, reply.usage.cost_nusd)
        await usage.record_usage(conn, self._usage_row(call, key, attempt, reply))
        if memo is not None:
            await usage.remember(conn, *memo)

    async def _record_cost(
        self, call: ModelCall, key: str, attempt: int, reply: ModelReply, *, budgeted: bool
    ) -> None:
        """The cost alone. If even this fails the attempt fails, loudly."""
        try:
            await self._write_cost(call, key, attempt, reply, budgeted=budgeted)
        except Exception:
            activity.logger.exception(
                "the cost of model call %s (attempt %s: %s, %s input and %s output tokens, %s"
                " nano-USD) could not be recorded; %s",
                key,
                attempt,
                reply.model,
                reply.usage.input_tokens,
                reply.usage.output_tokens,
                reply.usage.cost_nusd,
                "its reservation is charged in full instead (now, or by the sweeper)"
                if budgeted
                else "no budget applies, so this line is its only record",
            )
            raise

    async def _release(
        self, call: ModelCall, key: str, attempt: int, charged: int, why: str
    ) -> None:
        failed = gateway_event(
            call,
            f"{key}:failed:{attempt}",
            "model.failed",
            {
                "step": call.step,
                "attempt": attempt,
                "reason": why,
            },
        )
        async with self._pool.acquire() as conn, conn.transaction():
            await budgets.settle(conn, key, attempt, charged)
            new = await self._audit.append_new(conn, _storable_events([*call.events, failed]))
        metrics.observe_events(new)

    async def _release_quietly(self, key: str, attempt: int, charged: int) -> None:
        """Charge an attempt abandoned mid-call in full, marked `expired` like one whose worker
        died: spend the budget counts with no usage row behind it, told apart from settled
        calls."""
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await budgets.settle(conn, key, attempt, charged, status="expired")
        except Exception:  # the sweeper charges it later if this fails
            activity.logger.warning("could not settle reservation %s/%s now", key, attempt)

    async def _write_events(self, events: list[AuditEvent]) -> None:
        await self._audit.record(self._pool, _storable_events(events))


# What a request costs in tokens beyond the bytes it sends: the system prompt the provider adds
# for tool use (a few hundred tokens) and each message's role markers, with room to spare.
_BOUND_SLACK_TOKENS = 1024
# Content whose tokens its bytes do not bound: an image is billed by its pixels, a document by
# its pages.
_UNBOUNDED_BLOCKS = frozenset({"image", "document"})


def input_token_bound(request: Mapping[str, Any]) -> int | None:
    """An upper bound on a request's input tokens, from the request alone; None when it holds
    an image or a document. Every token of text stands for at least one byte of it, so the
    UTF-8 size of what is sent bounds the tokens of what is sent."""
    params = _input_params(request)
    if _holds_unbounded(params):
        return None
    sent = json.dumps(params, ensure_ascii=False, separators=(",", ":")).encode()
    return len(sent) + _BOUND_SLACK_TOKENS


def _input_params(request: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a request its input tokens are counted from."""
    return {k: v for k, v in request.items() if k != "max_tokens"}


def _holds_unbounded(value: Any) -> bool:
    if isinstance(value, Mapping):
        if value.get("type") in _UNBOUNDED_BLOCKS:
            return True
        return any(_holds_unbounded(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_holds_unbounded(v) for v in value)
    return False


def reply_content(message: anthropic.types.Message) -> list[dict[str, Any]]:
    # Whatever the provider sent, the reply is stored, audited and passed on from here.
    return storable([b.model_dump(mode="json", exclude_none=True) for b in message.content])


def token_counts(raw: anthropic.types.Usage, ttl: CacheTtl | None) -> TokenCounts:
    """The provider's usage, with the cache writes split by TTL as the API reports them (a
    provider that reports no split wrote at the TTL asked for)."""
    written = raw.cache_creation_input_tokens or 0
    split = raw.cache_creation
    one_hour = split.ephemeral_1h_input_tokens if split else (written if ttl == "1h" else 0)
    details = raw.output_tokens_details
    return TokenCounts(
        input_tokens=raw.input_tokens,
        output_tokens=raw.output_tokens,
        cache_read_tokens=raw.cache_read_input_tokens or 0,
        cache_write_tokens=written,
        cache_write_1h_tokens=min(one_hour, written),
        thinking_tokens=min(details.thinking_tokens if details else 0, raw.output_tokens),
    )


def reply_usage(
    prices: PriceTable,
    model: str,
    raw: anthropic.types.Usage,
    ttl: CacheTtl | None,
    *,
    fallbacks: int = 0,
    batch: bool = False,
) -> Usage:
    """A billed call's usage: tokens by kind, its cost (at batch rates for a batch) and what
    the prompt cache saved."""
    counts = token_counts(raw, ttl)
    return Usage(
        **counts.model_dump(),
        cost_nusd=prices.cost_nusd(model, counts, batch=batch),
        cache_saved_nusd=prices.cache_saved_nusd(model, counts, batch=batch),
        model_calls=1,
        fallbacks=fallbacks,
        batch_calls=int(batch),
    )


def _tokens(call: ModelCall) -> contextlib.AbstractAsyncContextManager[TokenStream | None]:
    """Where a streamed step's text goes as it arrives; nowhere for the others."""
    return TokenStream(call) if call.stream_call is not None else contextlib.nullcontext()


def _provider_message(exc: anthropic.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:300]
    return exc.__class__.__name__


def _lookup_facts(cache: bool, ready: usage.Prepared) -> dict[str, str]:
    """The lookup's result: `memo` (an earlier attempt finished), `hit` (with the model whose
    entry answered), `miss`, or `off` (the call opted out of the cache)."""
    if ready.memo is not None:
        return {"result": "memo"}
    if not cache:
        return {"result": "off"}
    if ready.cached is not None:
        return {"result": "hit", "model": ready.cached[0]}
    return {"result": "miss"}


def _storable_events(events: list[AuditEvent]) -> list[AuditEvent]:
    # A workflow's events may quote text from anywhere; none of it may fail a gateway write.
    return [e.model_copy(update={"data": storable(e.data)}) for e in events]


def _facts(call: ModelCall, reply: ModelReply) -> dict[str, Any]:
    used = reply.usage
    return {
        "step": call.step,
        "model": reply.model,
        **used.model_dump(include=_TOKEN_FIELDS),
        "cost_nusd": used.cost_nusd,
        "cache_hit": reply.cache_hit,
        "fallbacks": reply.fallbacks,
        "latency_ms": reply.latency_ms,
        "batch": reply.batch,
    }


def called_event(call: ModelCall, key: str, reply: ModelReply) -> AuditEvent:
    """The call's audit event; one per call (its key has no attempt), from the reply alone,
    so a retry that returns the memo writes the same event."""
    data = {**_facts(call, reply), "attempt": reply.attempt, "stop_reason": reply.stop_reason}
    return gateway_event(call, f"{key}:call", "model.called", data)


def gateway_event(call: ModelCall, key: str, action: str, data: dict[str, Any]) -> AuditEvent:
    actor = f"workflow:{call.context.pipeline}"
    return run_event(call.context, key, action, data, actor=actor, actor_kind="system")


def _fallback_key() -> str:
    info = activity.info()
    return f"{info.workflow_id}:{info.workflow_run_id}:{info.activity_id}"
