"""History growth: a long agent conversation, with and without the claim-check.

One `support-agent` run of `turns` tool-calling turns per leg, on the same server, each leg
with its own worker and API (own task queue): claim-check on (`STEAD_PAYLOAD_OFFLOAD_BYTES`
2048, the default) and off (0, every payload inline: the baseline). The simulator is told to
call tools for `turns` turns (`sim_tool_turns`), alternating `lookup_customer` and
`draft_reply`, which the requester's grants allow without approval (`sim_skip_tools` keeps
the refund and the email out). Every model turn re-sends the whole transcript, so inline
histories grow quadratically.

Measured from the server: `history_size_bytes` and `history_length` as Temporal accounts them
for its limits (50 MiB, 51,200 events), bytes kept outside the history, and from the history
itself, the growth per turn between turn `turns/4` and the last (cumulative serialized event
bytes at each turn's model-call scheduling) and over the last 10 turns.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent

from activities import support_desk
from bench.env import BenchEnv, EnvSpec, RunOptions, SteadSpec, Tenant, bench_env
from bench.load import BenchError, SteadApi
from bench.report import Comparison, Result, Table, at_most, say
from bench.stats import ratio
from stead.service.runs import workflow_id

TARGET_BYTES = 2048
HISTORY_LIMIT = 50 * 2**20
EVENT_LIMIT = 51_200
LEGS = {
    "claim-check on": SteadSpec(name="offload", task_queue="stead"),
    "claim-check off": SteadSpec(
        name="inline", task_queue="stead-inline", settings={"STEAD_PAYLOAD_OFFLOAD_BYTES": "0"}
    ),
}


@dataclass(frozen=True)
class Sizes:
    turns: int


SIZES = {False: Sizes(200), True: Sizes(20)}


def ticket(turns: int) -> dict[str, Any]:
    hints = {
        "sim_tool_turns": str(turns),
        "sim_skip_tools": "issue_refund,send_email",
        "subject": "About your order",
        "body": "We are looking into the double charge and will refund it if confirmed.",
    }
    body = "I was charged twice for my order.\n" + "\n".join(f"{k}: {v}" for k, v in hints.items())
    return {
        "ticket_id": "T-1",
        "customer_id": "cus_1",
        "subject": "Double charge",
        "body": body,
        "max_turns": turns,
    }


def _is_model_call(event: HistoryEvent) -> bool:
    return (
        event.HasField("activity_task_scheduled_event_attributes")
        and event.activity_task_scheduled_event_attributes.activity_type.name == "model.call"
    )


def turn_marks(events: list[HistoryEvent]) -> list[int]:
    """Cumulative history bytes at each model call's scheduling (index k-1: turn k)."""
    marks, total = [], 0
    for event in events:
        total += event.ByteSize()
        if _is_model_call(event):
            marks.append(total)
    return marks


def _label(event: HistoryEvent, activities: dict[int, str]) -> str:
    kind = EventType.Name(event.event_type).removeprefix("EVENT_TYPE_")
    if event.HasField("activity_task_scheduled_event_attributes"):
        name = event.activity_task_scheduled_event_attributes.activity_type.name
        activities[event.event_id] = name
        return f"{kind} ({name})"
    if event.HasField("activity_task_started_event_attributes"):
        scheduled = event.activity_task_started_event_attributes.scheduled_event_id
        return f"{kind} ({activities.get(scheduled, '?')})"
    if event.HasField("activity_task_completed_event_attributes"):
        scheduled = event.activity_task_completed_event_attributes.scheduled_event_id
        return f"{kind} ({activities.get(scheduled, '?')})"
    return kind


def bytes_by_event(events: list[HistoryEvent], from_turn: int, turns: int) -> dict[str, float]:
    """Bytes per turn by event type (activity events by activity), from `from_turn` on."""
    activities: dict[int, str] = {}
    totals: dict[str, float] = {}
    turn = 0
    for event in events:
        turn += _is_model_call(event)
        label = _label(event, activities)
        if turn >= from_turn:
            totals[label] = totals.get(label, 0.0) + event.ByteSize() / (turns - from_turn + 1)
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


async def one_leg(
    env: BenchEnv, tenant: Tenant, leg: str, spec: SteadSpec, turns: int
) -> dict[str, Any]:
    async with SteadApi.client(env.stack(spec.name).api_url, connections=2) as http:
        run_id = await SteadApi(http).start(tenant, "support-agent", ticket(turns))
    handle = env.client.get_workflow_handle(workflow_id(tenant.id, run_id))
    await asyncio.wait_for(handle.result(), timeout=max(600.0, turns * 6.0))
    info = (await handle.describe()).raw_description.workflow_execution_info
    events = list((await handle.fetch_history()).events)
    marks = turn_marks(events)
    if len(marks) != turns:
        raise BenchError(f"{leg}: {len(marks)} model turns, expected {turns}")
    first = max(turns // 4, 1)
    last10 = max(turns - 10, 1)
    figures = {
        "history_size_bytes": info.history_size_bytes,
        "history_length": info.history_length,
        "external_payload_size_bytes": info.external_payload_size_bytes,
        "external_payload_count": info.external_payload_count,
        "bytes_per_turn": info.history_size_bytes / turns,
        "slope_bytes_per_turn": (marks[-1] - marks[first - 1]) / (turns - first),
        "last10_bytes_per_turn": (marks[-1] - marks[last10 - 1]) / (turns - last10),
        "events_per_turn": info.history_length / turns,
        "largest_event_bytes": max(e.ByteSize() for e in events),
        "slope_from_turn": first,
        "marks": marks,
        "bytes_per_turn_by_event": bytes_by_event(events, first, turns),
    }
    say(f"{leg}: {info.history_size_bytes} bytes, {figures['slope_bytes_per_turn']:.0f} B/turn")
    return figures


def _comparisons(legs: dict[str, dict[str, Any]], turns: int) -> list[Comparison]:
    on, off = legs["claim-check on"], legs["claim-check off"]
    first = on["slope_from_turn"]
    rows = []
    for key, measure in (
        ("slope_bytes_per_turn", f"history growth per turn, turn {first} → {turns}"),
        ("bytes_per_turn", "history bytes / turns"),
        ("last10_bytes_per_turn", "history growth per turn, last 10 turns"),
    ):
        rows.append(
            Comparison(
                f"{measure}, claim-check on / off",
                "bytes",
                on[key],
                off[key],
                ratio(on[key], off[key]),
                f"on <= {TARGET_BYTES}",
                at_most(on[key], TARGET_BYTES),
            )
        )
    return rows


def _by_event_table(legs: dict[str, dict[str, Any]]) -> Table:
    by_leg = [legs[leg]["bytes_per_turn_by_event"] for leg in LEGS]
    labels = list(dict.fromkeys(label for figures in by_leg for label in figures))
    rows = [[label, *(figures.get(label, 0.0) for figures in by_leg)] for label in labels]
    return Table(
        "History bytes per turn by event (from the slope's first turn)", ["event", *LEGS], rows
    )


def _result(sizes: Sizes, quick: bool, legs: dict[str, dict[str, Any]]) -> Result:
    keys = [
        "history_size_bytes",
        "history_length",
        "bytes_per_turn",
        "slope_bytes_per_turn",
        "last10_bytes_per_turn",
        "events_per_turn",
        "largest_event_bytes",
        "external_payload_size_bytes",
        "external_payload_count",
    ]
    rows = [[key, *(legs[leg][key] for leg in LEGS)] for key in keys]
    rows.append(
        [
            "% of the 50 MiB history limit",
            *(legs[leg]["history_size_bytes"] / HISTORY_LIMIT * 100 for leg in LEGS),
        ]
    )
    rows.append(
        [
            "% of the 51,200 event limit",
            *(legs[leg]["history_length"] / EVENT_LIMIT * 100 for leg in LEGS),
        ]
    )
    return Result(
        name="history",
        title=f"History growth: a {sizes.turns}-turn agent conversation, claim-check on vs off",
        quick=quick,
        params={**vars(sizes), "offload_bytes_on": 2048, "offload_bytes_off": 0},
        comparisons=_comparisons(legs, sizes.turns),
        tables=[Table("Per leg", ["figure", *LEGS], rows), _by_event_table(legs)],
        data=legs,
        notes=[
            "Bytes are Temporal's own accounting (`history_size_bytes`) and serialized event"
            " sizes; payloads are encrypted either way.",
            "With the claim-check, payloads above 2 KiB (after encryption) live in PostgreSQL"
            " and the history keeps a reference with the payload's hash.",
        ],
    )


async def run(options: RunOptions) -> Result:
    sizes = SIZES[options.quick]
    spec = EnvSpec(stead=tuple(LEGS.values()), bare=False)
    async with bench_env(spec, options) as env:
        tenant = await env.tenant()
        async with env.pool.acquire() as conn:
            await support_desk.upsert_customer(
                conn, tenant.id, "cus_1", "Jane Doe", "jane@initech.test"
            )
        legs = {leg: await one_leg(env, tenant, leg, s, sizes.turns) for leg, s in LEGS.items()}
    return _result(sizes, options.quick, legs)
