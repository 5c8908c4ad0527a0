"""A client for Stead's HTTP API: `AsyncClient`, and `Client`, the same calls without `await`.

    async with stead.client.AsyncClient("http://127.0.0.1:8000", api_key) as stead_api:
        run = await stead_api.start(SummarizeWorkflow, SummarizeInput(text=...), key="doc-7")
        async for event in stead_api.events(run.run_id):
            print(event.type, event.data)
        summary = await stead_api.wait(run, timeout=300)  # a Summary, typed

A pipeline class (when the application is importable) types the input and the output; a
pipeline's name and a dict work too. Errors are `SteadError`s named after the API's answer
(`NotFound`, `Forbidden`, `Conflict`, `Invalid`, ...) with its `detail` and `code`. Requests
that are safe to repeat are retried with back-off on a dropped connection, a 429 (after its
Retry-After) or a 502/503/504: reads, and starts with an idempotency key (the API returns the
same run for the same key). Event streams reconnect with `Last-Event-ID`, so a dropped
connection loses and repeats nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Literal, TypeVar, overload

import httpx
from httpx_sse import aconnect_sse
from pydantic import BaseModel

from stead.contract import RunStatus
from stead.pipeline.base import Pipeline
from stead.service.catalog import Catalog
from stead.service.feed import FeedEvent
from stead.service.run_events import TERMINAL, RunEvent
from stead.service.schemas import (
    ApprovalOut,
    DecisionOut,
    Page,
    RunOut,
    RunStarted,
    RunSummary,
)

__all__ = [
    "AsyncClient",
    "Client",
    "Conflict",
    "Forbidden",
    "Invalid",
    "NotFound",
    "RateLimited",
    "RunFailed",
    "StartedRun",
    "SteadError",
    "Unauthorized",
    "Unavailable",
    "WaitTimeout",
]

InT = TypeVar("InT", bound=BaseModel)
OutM = TypeVar("OutM", bound=BaseModel)
OutT = TypeVar("OutT")
T = TypeVar("T")
_RETRY_STATUS = frozenset({429, 502, 503, 504})
# Stream notices after which nothing more comes for the run.
_FINAL = TERMINAL | {"run.ended"}


class SteadError(Exception):
    """An answer of the API that is not a success: its status, `detail` and `code`."""

    def __init__(self, status: int, detail: Any, code: str | None = None) -> None:
        super().__init__(f"{status} {code or ''}: {detail}".replace("  ", " "))
        self.status, self.detail, self.code = status, detail, code


class Unauthorized(SteadError):
    """401: no key, or a wrong or revoked one."""


class Forbidden(SteadError):
    """403: the caller's roles do not grant this."""


class NotFound(SteadError):
    """404: no such run or approval in the caller's tenant."""


class Conflict(SteadError):
    """409: the object's state does not allow this now."""


class Invalid(SteadError):
    """422: the request is not valid (`detail` says which field, or why)."""


class RateLimited(SteadError):
    """429: over the plan's request limit."""


class Unavailable(SteadError):
    """503 (or 502, 504): a service behind the API did not answer."""


class RunFailed(SteadError):
    """`wait` found the run failed or cancelled; `run` is its state."""

    def __init__(self, run: RunOut) -> None:
        why = run.last_error.message if run.last_error else run.status.value
        super().__init__(200, f"run {run.run_id} {run.status.value}: {why}", run.status.value)
        self.run = run


class WaitTimeout(TimeoutError):
    """`wait` gave up before the run ended (it goes on)."""


_BY_STATUS: dict[int, type[SteadError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    422: Invalid,
    429: RateLimited,
    502: Unavailable,
    503: Unavailable,
    504: Unavailable,
}


@dataclass(frozen=True)
class StartedRun(Generic[OutT]):
    """A run just started (or found again by its idempotency key); `wait` on it gives its
    output as `output_model` when the pipeline's class was given."""

    run_id: str
    pipeline: str
    created: bool
    output_model: type[OutT] | None = None


def error_of(response: httpx.Response) -> SteadError:
    try:
        body = response.json()
    except ValueError:
        body = {"detail": response.text}
    detail = body.get("detail", body) if isinstance(body, dict) else body
    code = body.get("code") if isinstance(body, dict) else None
    kind = _BY_STATUS.get(response.status_code, SteadError)
    return kind(response.status_code, detail, code if isinstance(code, str) else None)


class AsyncClient:
    """Stead's API for one API key. `url` and `api_key` default to `STEAD_URL` and
    `STEAD_API_KEY`. `retries` bounds the retries of a safe request, `backoff` is the first
    wait (doubled each time, with jitter)."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.25,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        url = url or os.environ.get("STEAD_URL") or "http://127.0.0.1:8000"
        key = api_key or os.environ.get("STEAD_API_KEY")
        if not key:
            raise ValueError("an API key is needed (api_key=, or STEAD_API_KEY)")
        self._http = httpx.AsyncClient(
            base_url=url,
            headers={"Authorization": f"Bearer {key}"},
            timeout=timeout,
            transport=transport,
        )
        self._retries, self._backoff = retries, backoff

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- runs ---------------------------------------------------------------------------

    @overload
    async def start(
        self,
        pipeline: type[Pipeline[InT, OutM]],
        input: InT,
        *,
        key: str | None = None,
        budget_usd: float | None = None,
    ) -> StartedRun[OutM]: ...

    @overload
    async def start(
        self,
        pipeline: str,
        input: BaseModel | Mapping[str, Any],
        *,
        key: str | None = None,
        budget_usd: float | None = None,
    ) -> StartedRun[dict[str, Any]]: ...

    async def start(
        self,
        pipeline: type[Pipeline[Any, Any]] | str,
        input: BaseModel | Mapping[str, Any],
        *,
        key: str | None = None,
        budget_usd: float | None = None,
    ) -> StartedRun[Any]:
        """Start a run. With `key` (an idempotency key) a repeated start returns the same run,
        so it is retried on a dropped connection; without one it is sent once."""
        name = pipeline if isinstance(pipeline, str) else pipeline.pipeline
        body: dict[str, Any] = {
            "pipeline": name,
            "input": input.model_dump(mode="json") if isinstance(input, BaseModel) else input,
        }
        if budget_usd is not None:
            body["budget_usd"] = budget_usd
        headers = {"Idempotency-Key": key} if key else {}
        response = await self._send("POST", "/v1/runs", json=body, headers=headers, safe=bool(key))
        started = RunStarted.model_validate(response.json())
        output = None if isinstance(pipeline, str) else pipeline.output_model
        return StartedRun(started.run_id, started.pipeline, started.created, output)

    async def get(self, run_id: str) -> RunOut:
        return await self._get(f"/v1/runs/{run_id}", RunOut)

    async def list(
        self,
        *,
        status: RunStatus | str | None = None,
        pipeline: str | None = None,
        pending_approval: bool | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page[RunSummary]:
        """The tenant's runs, newest first; pass `next_cursor` as `cursor` for more."""
        params = _params(
            status=status, pipeline=pipeline, pending_approval=pending_approval, cursor=cursor
        )
        return await self._get("/v1/runs", Page[RunSummary], {**params, "limit": limit})

    # A deadline is the call's point (and the sync facade's), so `timeout` is a parameter.
    @overload
    async def wait(
        self,
        run: StartedRun[OutT],
        *,
        timeout: float,  # noqa: ASYNC109
        poll: float = ...,
    ) -> OutT: ...

    @overload
    async def wait(
        self,
        run: str,
        *,
        timeout: float,  # noqa: ASYNC109
        poll: float = ...,
    ) -> RunOut: ...

    async def wait(
        self,
        run: StartedRun[Any] | str,
        *,
        timeout: float,  # noqa: ASYNC109
        poll: float = 2.0,
    ) -> Any:
        """Wait for the run to end: its output (typed as the pipeline's, for a run started
        from its class; a dict otherwise), or its state for a run id. `RunFailed` if it failed
        or was cancelled, `WaitTimeout` after `timeout` seconds."""
        run_id = run if isinstance(run, str) else run.run_id
        deadline = time.monotonic() + timeout
        interval = 0.1
        while True:
            state = await self.get(run_id)
            if state.status is not RunStatus.RUNNING:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeout(f"run {run_id} is still {state.stage.value} after {timeout}s")
            await asyncio.sleep(min(interval, left))
            interval = min(interval * 2, poll)
        if state.status is not RunStatus.COMPLETED:
            raise RunFailed(state)
        if isinstance(run, str):
            return state
        output = state.result or {}
        if run.output_model is None:
            return output
        model: Any = run.output_model
        return model.model_validate(output)

    async def cancel(self, run_id: str) -> RunSummary:
        response = await self._send("POST", f"/v1/runs/{run_id}/cancel")
        return RunSummary.model_validate(response.json())

    async def retry(self, run_id: str, mode: Literal["resume", "restart"] = "resume") -> RunStarted:
        """Re-drive a failed run: `resume` from the failed step, or `restart` anew."""
        response = await self._send("POST", f"/v1/runs/{run_id}/retry", json={"mode": mode})
        return RunStarted.model_validate(response.json())

    async def events(
        self, run_id: str, *, last_event_id: str | None = None, reconnects: int = 5
    ) -> AsyncGenerator[RunEvent, None]:
        """The run's live events, from the start (or after `last_event_id`) until it ends;
        a closed run's are replayed. A dropped stream is resumed where it stopped, up to
        `reconnects` times in a row without an event in between."""
        async for data in self._stream(f"/v1/runs/{run_id}/events", last_event_id, reconnects):
            event = RunEvent.model_validate(data)
            yield event
            if event.type in _FINAL:
                return

    async def feed(
        self, *, last_event_id: str | None = None, reconnects: int = 5
    ) -> AsyncGenerator[FeedEvent, None]:
        """The tenant's feed of approvals and finished runs, from now (or after
        `last_event_id`) for as long as it is read."""
        async for data in self._stream("/v1/events", last_event_id, reconnects):
            yield FeedEvent.model_validate(data)

    # --- approvals ----------------------------------------------------------------------

    async def approvals(self, *, limit: int = 50, cursor: str | None = None) -> Page[ApprovalOut]:
        """The approvals the caller may decide now, earliest deadline first."""
        params = {**_params(cursor=cursor), "limit": limit}
        return await self._get("/v1/approvals", Page[ApprovalOut], params)

    async def approval(self, approval_id: str) -> ApprovalOut:
        return await self._get(f"/v1/approvals/{approval_id}", ApprovalOut)

    async def decide(
        self,
        approval_id: str,
        decision: Literal["approve", "reject"],
        *,
        comment: str = "",
        edits: Mapping[str, Any] | None = None,
    ) -> DecisionOut:
        """Approve (with `edits` to the proposal's editable fields) or reject. Sent once: a
        decision repeated after a lost answer is a `Conflict` (already decided)."""
        body: dict[str, Any] = {"decision": decision, "comment": comment}
        if edits is not None:
            body["edits"] = dict(edits)
        path = f"/v1/approvals/{approval_id}/decision"
        return DecisionOut.model_validate((await self._send("POST", path, json=body)).json())

    async def pipelines(self) -> Catalog:
        """The pipelines the caller may start, with their input and output schemas."""
        return await self._get("/v1/pipelines", Catalog)

    # --- transport ----------------------------------------------------------------------

    async def _get(self, path: str, model: type[T], params: Mapping[str, Any] | None = None) -> T:
        response = await self._send("GET", path, params=params, safe=True)
        parse: Any = model
        result: T = parse.model_validate(response.json())
        return result

    async def _send(
        self,
        method: str,
        path: str,
        *,
        safe: bool = False,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        for attempt in range(self._retries + 1):
            last = attempt == self._retries
            try:
                response = await self._http.request(
                    method, path, json=json, params=params, headers=headers
                )
            except httpx.TransportError:
                if not safe or last:
                    raise
                await asyncio.sleep(self._delay(attempt, None))
                continue
            if response.is_success:
                return response
            if not safe or last or response.status_code not in _RETRY_STATUS:
                raise error_of(response)
            await asyncio.sleep(self._delay(attempt, response))
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        after = response.headers.get("Retry-After") if response is not None else None
        if after is not None:
            try:
                return min(float(after), 60.0)
            except ValueError:
                pass
        jitter = 0.5 + random.random()  # noqa: S311  # spreads retries; no secret in it
        return float(self._backoff * (2**attempt) * jitter)

    async def _stream(
        self, path: str, last_event_id: str | None, reconnects: int
    ) -> AsyncIterator[dict[str, Any]]:
        """Each event's data; reconnects with the last id seen when the stream drops or asks
        to be reconnected to, ends when the server says there is no more (204)."""
        last, failures = last_event_id, 0
        while True:
            headers = {"Last-Event-ID": last} if last else {}
            try:
                async with aconnect_sse(
                    self._http, "GET", path, headers=headers, timeout=httpx.Timeout(30, read=None)
                ) as source:
                    if source.response.status_code == 204:
                        return
                    if not source.response.is_success:
                        await source.response.aread()
                        raise error_of(source.response)
                    async for message in source.aiter_sse():
                        if not message.data:
                            # A keep-alive comment: the decoder reports it as an event
                            # without data (after an event with an id).
                            continue
                        if message.event == "stream.error":
                            break  # the server lost the run's stream: resume from our last id
                        failures = 0
                        if message.id:
                            last = message.id
                        yield dict(json.loads(message.data))
            except httpx.TransportError:
                pass
            except SteadError as error:
                if error.status not in _RETRY_STATUS:
                    raise
            failures += 1
            if failures > reconnects:
                raise Unavailable(503, f"the stream {path} kept breaking off", "stream_broken")
            await asyncio.sleep(self._delay(failures - 1, None))


def _params(**values: Any) -> dict[str, Any]:
    return {
        name: (str(v).lower() if isinstance(v, bool) else str(v))
        for name, v in values.items()
        if v is not None
    }


class Client:
    """`AsyncClient`'s calls, blocking: for scripts and the CLI. One event loop of its own
    runs them; not for use from inside a running event loop."""

    def __init__(self, url: str | None = None, api_key: str | None = None, **options: Any):
        self._runner = asyncio.Runner()
        self._async = self._run(_make(url, api_key, options))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._run(self._async.aclose())
        self._runner.close()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(coro)

    def _iterate(self, events: AsyncGenerator[T, None]) -> Iterator[T]:
        try:
            while True:
                try:
                    yield self._run(_next(events))
                except StopAsyncIteration:
                    return
        finally:
            self._run(events.aclose())

    def start(
        self,
        pipeline: type[Pipeline[Any, Any]] | str,
        input: BaseModel | Mapping[str, Any],
        *,
        key: str | None = None,
        budget_usd: float | None = None,
    ) -> StartedRun[Any]:
        return self._run(self._async.start(pipeline, input, key=key, budget_usd=budget_usd))

    def get(self, run_id: str) -> RunOut:
        return self._run(self._async.get(run_id))

    def list(self, **filters: Any) -> Page[RunSummary]:
        return self._run(self._async.list(**filters))

    def wait(self, run: StartedRun[Any] | str, *, timeout: float, poll: float = 2.0) -> Any:
        return self._run(self._async.wait(run, timeout=timeout, poll=poll))

    def cancel(self, run_id: str) -> RunSummary:
        return self._run(self._async.cancel(run_id))

    def retry(self, run_id: str, mode: Literal["resume", "restart"] = "resume") -> RunStarted:
        return self._run(self._async.retry(run_id, mode))

    def approvals(self, *, limit: int = 50, cursor: str | None = None) -> Page[ApprovalOut]:
        return self._run(self._async.approvals(limit=limit, cursor=cursor))

    def approval(self, approval_id: str) -> ApprovalOut:
        return self._run(self._async.approval(approval_id))

    def decide(
        self,
        approval_id: str,
        decision: Literal["approve", "reject"],
        *,
        comment: str = "",
        edits: Mapping[str, Any] | None = None,
    ) -> DecisionOut:
        return self._run(self._async.decide(approval_id, decision, comment=comment, edits=edits))

    def pipelines(self) -> Catalog:
        return self._run(self._async.pipelines())

    def events(self, run_id: str, **options: Any) -> Iterator[RunEvent]:
        return self._iterate(self._async.events(run_id, **options))

    def feed(self, **options: Any) -> Iterator[FeedEvent]:
        return self._iterate(self._async.feed(**options))


async def _next(events: AsyncGenerator[T, None]) -> T:
    return await anext(events)


async def _make(url: str | None, api_key: str | None, options: dict[str, Any]) -> AsyncClient:
    # Made inside the runner's loop, where its connections will live.
    return AsyncClient(url, api_key, **options)
