"""History growth: a long agent conversation, with and without the claim-check.

One `support-agent` run of `turns` tool-calling turns per leg, on the same server, each leg
with its own worker and API (own task queue): claim-check on (`STEAD_PAYLOAD_OFFLOAD_BYTES`
at its default) and off (0, every payload inline: the baseline). The simulator is told to
call tools for `turns` turns (`sim_tool_turns`), alternating `lookup_customer` and
`draft_reply`, which the requester's grants allow without approval (`sim_skip_tools` keeps
the refund and the email out). Every model turn sends the model the whole transcript; from
workflow revision 3 the model call's input carries only the link of the stored prefix and the
turn's new messages (stead.store.conversations), so neither the history nor the stores hold
the transcript again at every turn.

Measured from the server: `history_size_bytes` and `history_length` as Temporal accounts them
for its limits (50 MiB, 51,200 events), bytes kept outside the history, and from the history
itself, the growth per turn between turn `turns/4` and the last (cumulative serialized event
bytes at each turn's model-call scheduling) and over the last 10 turns.

The claim-check only moves bytes: what leaves the history lands in the payload store. Every
claim-check reference in the history (`stead.store.payloads.referenced`) is attributed to the
turn that first references it, and its stored size read from `payload_store`; each message
row of the conversation store to the turn whose model call wrote it. Total stored bytes per
turn, and whether a turn late in the conversation stores more than an early one (a
conversation re-stored whole at every turn grows quadratically; the target is constant).
"""

from __future__ import annotations

import asyncio
import bisect
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent

from activities import support_desk
from bench.env import BenchEnv, EnvSpec, RunOptions, SteadSpec, Tenant, bench_env
from bench.load import BenchError, SteadApi
from bench.report import Comparison, Result, Table, at_most, say
from bench.stats import ratio
from stead.config import Settings
from stead.service.runs import workflow_id
from stead.store.payloads import referenced

TARGET_BYTES = 2048
# The claim-check leg runs at Stead's default threshold.
OFFLOAD_DEFAULT: int = Settings.model_fields["payload_offload_bytes"].default
# Stored bytes per turn late in the conversation over those early in it: constant is 1.
STORED_GROWTH_TARGET = 1.1
WINDOW = 10  # turns per window of the stored-bytes comparison
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


async def stored_by_turn(
    env: BenchEnv, events: list[HistoryEvent], turns: int, workflow: str
) -> tuple[list[int], list[int]]:
    """Bytes stored outside the history at each turn (index 0: before the first turn, index
    `turns + 1`: after the last model call answered, the run's end): by the claim-check (first
    referenced at that turn), and by the conversation store (written after that turn's model
    call was scheduled, before the next one was)."""
    first_seen: dict[bytes, int] = {}
    scheduled: list[datetime] = []
    turn = 0
    last_call = max(e.event_id for e in events if _is_model_call(e))
    for event in events:
        if _is_model_call(event):
            turn += 1
            scheduled.append(event.event_time.ToDatetime(tzinfo=UTC))
        if (
            event.HasField("activity_task_completed_event_attributes")
            and event.activity_task_completed_event_attributes.scheduled_event_id == last_call
        ):
            turn += 1  # the last model call has answered: what follows is the run's end
        for digest in referenced(event):
            first_seen.setdefault(digest, turn)
    async with env.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT sha256, size FROM payload_store WHERE sha256 = ANY($1)", list(first_seen)
        )
        messages = await conn.fetch(
            "SELECT created_at, length(data) AS size FROM conversation_messages"
            " WHERE workflow_id = $1",
            workflow,
        )
    sizes = {bytes(row["sha256"]): int(row["size"]) for row in rows}
    if len(sizes) != len(first_seen):
        raise BenchError(f"{len(first_seen) - len(sizes)} referenced payloads are not stored")
    stored = [0] * (turns + 2)
    for digest, at in first_seen.items():
        stored[at] += sizes[digest]
    conversation = [0] * (turns + 2)
    for row in messages:
        conversation[bisect.bisect_right(scheduled, row["created_at"])] += int(row["size"])
    return stored, conversation


def stored_figures(
    payloads: list[int], conversation: list[int], history_bytes: int, turns: int
) -> dict[str, Any]:
    first = max(turns // 4, 1)
    stored = [a + b for a, b in zip(payloads, conversation, strict=True)]
    early = stored[first : first + WINDOW]
    late = stored[turns + 1 - WINDOW : turns + 1]
    total = sum(stored)
    return {
        "stored_bytes": total,
        "payload_store_bytes": sum(payloads),
        "conversation_store_bytes": sum(conversation),
        "stored_payloads_bytes_per_turn": total / turns,
        "history_and_stored_bytes_per_turn": (total + history_bytes) / turns,
        "stored_bytes_per_turn_early": sum(early) / len(early),
        "stored_bytes_per_turn_last10": sum(late) / len(late),
        "stored_early_window": f"turns {first}-{first + len(early) - 1}",
        "stored_at_the_end": stored[turns + 1],
        "stored_by_turn": stored,
    }


async def one_leg(
    env: BenchEnv, tenant: Tenant, leg: str, spec: SteadSpec, turns: int
) -> dict[str, Any]:
    began = time.perf_counter()
    async with SteadApi.client(env.stack(spec.name).api_url, connections=2) as http:
        run_id = await SteadApi(http).start(tenant, "support-agent", ticket(turns))
    handle = env.client.get_workflow_handle(workflow_id(tenant.id, run_id))
    await asyncio.wait_for(handle.result(), timeout=max(600.0, turns * 6.0))
    elapsed = time.perf_counter() - began
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
        # Wall time of the run, start to result: indicative only (one run, shared machine).
        "run_seconds": elapsed,
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
    payloads, conversation = await stored_by_turn(env, events, turns, handle.id)
    figures |= stored_figures(payloads, conversation, info.history_size_bytes, turns)
    say(
        f"{leg}: {info.history_size_bytes} bytes, {figures['slope_bytes_per_turn']:.0f} B/turn;"
        f" payload store {figures['payload_store_bytes']} bytes, conversation store"
        f" {figures['conversation_store_bytes']} bytes"
    )
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
    early, late = on["stored_bytes_per_turn_early"], on["stored_bytes_per_turn_last10"]
    growth = ratio(late, early)
    rows.append(
        Comparison(
            f"stored bytes per turn (payload + conversation store), last {WINDOW} turns /"
            f" {on['stored_early_window']} (claim-check on)",
            "bytes",
            late,
            early,
            growth,
            f"<= {STORED_GROWTH_TARGET} (constant per turn)",
            at_most(growth, STORED_GROWTH_TARGET),
        )
    )
    rows.append(
        Comparison(
            "history + stored bytes per turn, claim-check on / off",
            "bytes",
            on["history_and_stored_bytes_per_turn"],
            off["history_and_stored_bytes_per_turn"],
            ratio(
                on["history_and_stored_bytes_per_turn"], off["history_and_stored_bytes_per_turn"]
            ),
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
        "run_seconds",
        "bytes_per_turn",
        "slope_bytes_per_turn",
        "last10_bytes_per_turn",
        "events_per_turn",
        "largest_event_bytes",
        "external_payload_size_bytes",
        "external_payload_count",
        "stored_bytes",
        "payload_store_bytes",
        "conversation_store_bytes",
        "stored_payloads_bytes_per_turn",
        "history_and_stored_bytes_per_turn",
        "stored_bytes_per_turn_early",
        "stored_bytes_per_turn_last10",
        "stored_at_the_end",
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
        params={**vars(sizes), "offload_bytes_on": OFFLOAD_DEFAULT, "offload_bytes_off": 0},
        comparisons=_comparisons(legs, sizes.turns),
        tables=[Table("Per leg", ["figure", *LEGS], rows), _by_event_table(legs)],
        data=legs,
        notes=[
            "Bytes are Temporal's own accounting (`history_size_bytes`) and serialized event"
            " sizes; payloads are encrypted either way.",
            f"With the claim-check, payloads above {OFFLOAD_DEFAULT} bytes (the default; after"
            " encryption) live in PostgreSQL"
            " and the history keeps a reference with the payload's hash.",
            "`stored_*`: payload-store bytes (encrypted, as stored) referenced by the run's"
            " history, each counted once, at the turn that first references it;"
            " `stored_bytes_per_turn_early` covers the window named in the comparison.",
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
