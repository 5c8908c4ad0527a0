"""Live events: what watching a run costs, and how soon a watcher sees what the run did.

Three legs on one platform, `runs` sequential `summarize` runs each (no review; its model
step streams its tokens, paced by the simulator at `CHUNK_MS` per delta so that there is a
stream to follow): with 0, 1 and 10 subscribers per run, each an SSE connection (as an admin,
who may read the tokens) to `GET /v1/runs/{id}/events` opened as soon as the run is started
and read to the end.

Measured:
- delivery latency, step → subscriber: an event's `at` (the workflow's clock when the run
  published it, or the activity's for streamed tokens) to its arrival at a subscriber, for
  events published after that subscriber's stream was open (earlier ones are replays);
- history events and bytes per run that live events add, from each run's history: the
  patch's marker, the token batches' signals (`__temporal_workflow_stream_publish`) and the
  followers' long-poll updates (`__temporal_workflow_stream_poll`), against the whole history;
- CPU per run of the worker and of the API process, over each leg.

The API follows each run once however many subscribers it has (stead.service.run_events), so
10 subscribers should cost the worker and the history what 1 does.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from httpx_sse import aconnect_sse
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent

from bench.env import BenchEnv, EnvSpec, RunOptions, Tenant, bench_env, cpu_delta
from bench.load import BenchError, SteadApi
from bench.report import Comparison, Result, Table, at_most, say
from bench.stats import ratio, summary_ms
from stead.service.runs import workflow_id

SUBSCRIBERS = (0, 1, 10)
CHUNK_MS = 20
TEXT = f"sim_stream_chunk_ms: {CHUNK_MS}\n" + " ".join(
    ["Revenue grew 12% in Q3 while costs fell 3% and margins widened."] * 20
)
PUBLISH, POLL = "__temporal_workflow_stream_publish", "__temporal_workflow_stream_poll"
RUN_SECONDS = 120.0


@dataclass(frozen=True)
class Sizes:
    runs: int


SIZES = {False: Sizes(20), True: Sizes(3)}


@dataclass
class Watched:
    """What one subscriber saw: (event type, seconds from publication to arrival) of the
    events published while it was connected."""

    delays: list[tuple[str, float]] = field(default_factory=list)
    events: int = 0


async def subscribe(http: httpx.AsyncClient, tenant: Tenant, run_id: str) -> Watched:
    watched = Watched()
    path = f"/v1/runs/{run_id}/events"
    # An admin: a viewer who may read content gets the streamed tokens too.
    async with aconnect_sse(http, "GET", path, headers=tenant.auth("admin")) as source:
        if source.response.status_code != 200:
            body = (await source.response.aread()).decode(errors="replace")[:300]
            raise BenchError(f"events refused: {source.response.status_code} {body}")
        opened = datetime.now(UTC)
        async for message in source.aiter_sse():
            if not message.data:
                continue
            arrived = datetime.now(UTC)
            event = json.loads(message.data)
            watched.events += 1
            at = datetime.fromisoformat(event["at"])
            if at >= opened:
                watched.delays.append((event["type"], (arrived - at).total_seconds()))
            if event["type"] in ("run.completed", "run.failed", "run.cancelled"):
                break
    return watched


def stream_share(events: list[HistoryEvent]) -> dict[str, int]:
    """The history's events and bytes, and those of them that live events add."""
    extra = {"marker": 0, "publish_signals": 0, "poll_updates": 0, "extra_bytes": 0}
    polls: set[str] = set()
    for event in events:
        kind = event.event_type
        if kind == EventType.EVENT_TYPE_MARKER_RECORDED:
            extra["marker"] += 1
        elif (
            kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
            and event.workflow_execution_signaled_event_attributes.signal_name == PUBLISH
        ):
            extra["publish_signals"] += 1
        elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED:
            request = event.workflow_execution_update_accepted_event_attributes.accepted_request
            if request.input.name != POLL:
                continue
            polls.add(request.meta.update_id)
            extra["poll_updates"] += 1
        elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED:
            completed = event.workflow_execution_update_completed_event_attributes
            if completed.meta.update_id not in polls:
                continue
        else:
            continue
        extra["extra_bytes"] += event.ByteSize()
    return {
        **extra,
        "events": len(events),
        "bytes": sum(e.ByteSize() for e in events),
    }


async def one_run(env: BenchEnv, tenant: Tenant, http: httpx.AsyncClient, subs: int) -> Any:
    # A text of its own: the gateway's response cache would answer a repeated one, unstreamed.
    text = f"{TEXT} (run {uuid.uuid4().hex})"
    run_id = await SteadApi(http).start(tenant, "summarize", {"text": text, "review": False})
    watchers = [asyncio.create_task(subscribe(http, tenant, run_id)) for _ in range(subs)]
    handle = env.client.get_workflow_handle(workflow_id(tenant.id, run_id))
    await asyncio.wait_for(handle.result(), RUN_SECONDS)
    seen = await asyncio.wait_for(asyncio.gather(*watchers), RUN_SECONDS)
    history = list((await handle.fetch_history()).events)
    return seen, stream_share(history)


async def one_leg(env: BenchEnv, tenant: Tenant, subs: int, runs: int) -> dict[str, Any]:
    delays: list[tuple[str, float]] = []
    shares: list[dict[str, int]] = []
    seen_events: list[int] = []
    async with SteadApi.client(env.stack().api_url, connections=subs + 4) as http:
        await one_run(env, tenant, http, subs)  # warm-up, not counted
        before, started = env.cpu_seconds(), time.monotonic()
        for _ in range(runs):
            seen, share = await one_run(env, tenant, http, subs)
            shares.append(share)
            for watched in seen:
                delays.extend(watched.delays)
                seen_events.append(watched.events)
        elapsed = time.monotonic() - started
        cpu = cpu_delta(before, env.cpu_seconds())
    per_run = {key: sum(s[key] for s in shares) / runs for key in shares[0]}
    tokens = [d for kind, d in delays if kind == "model.tokens"]
    figures: dict[str, Any] = {
        "subscribers": subs,
        "runs": runs,
        "seconds": elapsed,
        "worker_cpu_ms_per_run": cpu.get("stead-worker", 0.0) * 1000 / runs,
        "api_cpu_ms_per_run": cpu.get("stead-api", 0.0) * 1000 / runs,
        "history": per_run,
        "latency_ms": summary_ms([d for _, d in delays]),
        "token_latency_ms": summary_ms(tokens),
        "events_per_subscriber": sum(seen_events) / len(seen_events) if seen_events else 0,
    }
    say(
        f"{subs} subscribers: worker {figures['worker_cpu_ms_per_run']:.0f} ms/run,"
        f" +{per_run['extra_bytes']:.0f} B history/run,"
        f" latency p50 {figures['latency_ms'].get('p50', '-')} ms"
    )
    return figures


ROWS = (
    ("worker CPU ms / run", "worker_cpu_ms_per_run"),
    ("API CPU ms / run", "api_cpu_ms_per_run"),
    ("history events / run", "history.events"),
    ("history bytes / run", "history.bytes"),
    ("of which live events: poll updates", "history.poll_updates"),
    ("of which live events: token signals", "history.publish_signals"),
    ("of which: markers", "history.marker"),
    ("of which live events: bytes", "history.extra_bytes"),
    ("delivery p50 ms", "latency_ms.p50"),
    ("delivery p99 ms", "latency_ms.p99"),
    ("token batch delivery p50 ms", "token_latency_ms.p50"),
    ("events seen / subscriber", "events_per_subscriber"),
)


def _figure(figures: dict[str, Any], path: str) -> Any:
    value: Any = figures
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _result(sizes: Sizes, quick: bool, legs: dict[int, dict[str, Any]]) -> Result:
    none, one, ten = legs[0], legs[1], legs[10]
    rows: list[list[Any]] = []
    for label, path in ROWS:
        rows.append([label, *(_figure(legs[s], path) for s in SUBSCRIBERS)])
    comparisons = [
        Comparison(
            "worker CPU per run, 10 subscribers / 1",
            "ms",
            ten["worker_cpu_ms_per_run"],
            one["worker_cpu_ms_per_run"],
            ratio(ten["worker_cpu_ms_per_run"], one["worker_cpu_ms_per_run"]),
            "<= 1.5 (one follower per run in the API)",
            at_most(ratio(ten["worker_cpu_ms_per_run"], one["worker_cpu_ms_per_run"]), 1.5),
        ),
        Comparison(
            "worker CPU per run, 1 subscriber / none",
            "ms",
            one["worker_cpu_ms_per_run"],
            none["worker_cpu_ms_per_run"],
            ratio(one["worker_cpu_ms_per_run"], none["worker_cpu_ms_per_run"]),
        ),
        Comparison(
            "delivery latency p99, step → subscriber (1 subscriber)",
            "ms",
            one["latency_ms"].get("p99", float("nan")),
            None,
            None,
            "<= 1000",
            at_most(one["latency_ms"].get("p99"), 1000),
        ),
    ]
    return Result(
        name="events",
        title=f"Live events: {sizes.runs} summarize runs with 0, 1 and 10 subscribers each",
        quick=quick,
        params={**vars(sizes), "subscribers": list(SUBSCRIBERS), "text_chars": len(TEXT)},
        comparisons=comparisons,
        tables=[Table("Per leg (subscribers per run)", ["figure", *map(str, SUBSCRIBERS)], rows)],
        data={str(s): legs[s] for s in SUBSCRIBERS},
        notes=[
            "Latency is from the event's `at` (workflow time at the publishing task, or the"
            " model activity's clock for token batches) to its arrival at the subscriber, for"
            " events published while the subscriber was connected; same machine, same clock.",
            "History figures are per run, from each run's full history; the markers row counts"
            " every marker (ledger writes are local activities; a run started before workflow"
            " revisions also carries the live-events patch's).",
        ],
    )


async def run(options: RunOptions) -> Result:
    sizes = SIZES[options.quick]
    async with bench_env(EnvSpec(bare=False), options) as env:
        tenant = await env.tenant()
        legs = {subs: await one_leg(env, tenant, subs, sizes.runs) for subs in SUBSCRIBERS}
    return _result(sizes, options.quick, legs)
