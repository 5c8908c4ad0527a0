"""A long conversation stores each message once: the model call carries the stored prefix's
link and the new messages, and the gateway resolves the whole transcript."""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg
import httpx
import pytest
from temporalio.client import Client

from activities import support_desk
from stead.config import Settings
from stead.service.runs import workflow_id
from stead.store.conversations import (
    ConversationMissing,
    ConversationStore,
    ConversationUnreadable,
)
from stead.store.db import Pool
from stead.store.payloads import referenced
from stead.transcript import INLINE_BYTES, canonical, links, text_of
from tests.conftest import Tenant
from tests.helpers import record_history, start_run, wait_finished

KEY_A = ("a", b"A" * 32)
KEY_B = ("b", b"B" * 32)


def turns_of(n: int, canary: str) -> list[dict[str, Any]]:
    return [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"{canary} message {i}"}
        for i in range(n)
    ]


async def rows_of(database_url: str, workflow: str) -> list[asyncpg.Record]:
    owner = await asyncpg.connect(database_url)
    try:
        return await owner.fetch(
            "SELECT row_key, parent, depth, data FROM conversation_messages"
            " WHERE workflow_id = $1 ORDER BY depth",
            workflow,
        )
    finally:
        await owner.close()


async def test_a_prefix_resolves_in_a_fresh_process_and_each_message_is_stored_once(
    pool: Pool, database_url: str
) -> None:
    workflow, canary = f"wf-{uuid.uuid4().hex}", f"canary-{uuid.uuid4().hex}"
    messages = turns_of(5, canary)
    store = ConversationStore(pool, [KEY_A])
    assert await store.resolve(workflow, "", 0, messages[:3]) == messages[:3]
    chain = links([canonical(m) for m in messages])
    # The next turn names the prefix by its link and sends only what is new; a retried
    # attempt stores nothing twice.
    for _ in range(2):
        assert await store.resolve(workflow, text_of(chain[2]), 3, messages[3:]) == messages
    rows = await rows_of(database_url, workflow)
    assert [r["depth"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["parent"] for r in rows[1:]] == [r["row_key"] for r in rows[:-1]]
    for row in rows:
        assert canary.encode() not in bytes(row["data"])  # sealed
    # Row keys are HMACs of the links: the database cannot confirm a guessed message.
    assert {bytes(r["row_key"]) for r in rows}.isdisjoint(chain)

    # Another worker, nothing in memory, a rotated key list: read from the database, and the
    # conversation goes on under the new key.
    rotated = ConversationStore(pool, [KEY_B, KEY_A])
    more = [*messages, {"role": "user", "content": "and one more"}]
    assert await rotated.resolve(workflow, text_of(chain[4]), 5, more[5:]) == more
    longer = links([canonical(m) for m in more])
    assert (
        await ConversationStore(pool, [KEY_B, KEY_A]).resolve(workflow, text_of(longer[5]), 6, [])
        == more
    )
    # A worker without the key that sealed them reads nothing (and says which key it lacks:
    # retried, not failed); a row sealed for another run does not open in this one.
    with pytest.raises(ConversationUnreadable, match="payload key 'a'"):
        await ConversationStore(pool, [KEY_B]).resolve(workflow, text_of(longer[5]), 6, [])
    owner = await asyncpg.connect(database_url)
    try:
        other = f"wf-{uuid.uuid4().hex}"
        await owner.execute(
            "INSERT INTO conversation_messages (workflow_id, row_key, parent, depth, data)"
            " SELECT $2, row_key, parent, depth, data FROM conversation_messages"
            " WHERE workflow_id = $1",
            workflow,
            other,
        )
    finally:
        await owner.close()
    with pytest.raises(ConversationMissing, match="cannot be opened"):
        await ConversationStore(pool, [KEY_B, KEY_A]).resolve(other, text_of(longer[5]), 6, [])


async def test_an_altered_missing_or_foreign_prefix_is_refused(
    pool: Pool, database_url: str
) -> None:
    workflow = f"wf-{uuid.uuid4().hex}"
    messages = turns_of(4, "x")
    chain = links([canonical(m) for m in messages])
    await ConversationStore(pool, [KEY_A]).resolve(workflow, "", 0, messages)

    # Another workflow's rows are not this one's.
    with pytest.raises(ConversationMissing, match="missing"):
        await ConversationStore(pool, [KEY_A]).resolve(
            f"wf-{uuid.uuid4().hex}", text_of(chain[3]), 4, []
        )
    # A length that does not match the link, or a link that is not one.
    with pytest.raises(ConversationMissing):
        await ConversationStore(pool, [KEY_A]).resolve(workflow, text_of(chain[3]), 3, [])
    with pytest.raises(ConversationMissing, match="not a link"):
        await ConversationStore(pool, [KEY_A]).resolve(workflow, "!!", 4, [])

    # Unsealed rows (no payload keys) changed in the database are refused by their link.
    plain = f"wf-{uuid.uuid4().hex}"
    await ConversationStore(pool).resolve(plain, "", 0, messages)
    owner = await asyncpg.connect(database_url)
    try:
        await owner.execute(
            "UPDATE conversation_messages SET data = $2 WHERE workflow_id = $1 AND depth = 2",
            plain,
            canonical({"role": "assistant", "content": "words never said"}),
        )
        with pytest.raises(ConversationMissing, match="does not match"):
            await ConversationStore(pool).resolve(plain, text_of(chain[3]), 4, [])
        await owner.execute("DELETE FROM conversation_messages WHERE workflow_id = $1", plain)
        with pytest.raises(ConversationMissing, match="missing"):
            await ConversationStore(pool).resolve(plain, text_of(chain[3]), 4, [])
    finally:
        await owner.close()


@pytest.mark.usefixtures("worker")
async def test_a_long_agent_conversation_stores_each_message_once(
    api: httpx.AsyncClient,
    tenant: Tenant,
    client: Client,
    pool: Pool,
    database_url: str,
    settings: Settings,
) -> None:
    async with pool.acquire() as conn:
        await support_desk.upsert_customer(conn, tenant.id, "cus_1", "Jane Doe", "j@x.test")
    turns, canary = 8, f"canary-{uuid.uuid4().hex}"
    hints = {
        "sim_tool_turns": str(turns),
        "sim_skip_tools": "issue_refund,send_email",
        "subject": "About your order",
        "body": "We are looking into it.",
        # The first message alone passes the inline limit: every call stores its new messages.
        "note": f"{canary} " + "detail " * (3 * INLINE_BYTES // 7),
    }
    body = "I was charged twice.\n" + "\n".join(f"{k}: {v}" for k, v in hints.items())
    run_id = await start_run(
        api,
        tenant,
        {
            "pipeline": "support-agent",
            "input": {
                "ticket_id": "T-1",
                "customer_id": "cus_1",
                "subject": "Double charge",
                "body": body,
                "max_turns": turns + 4,
            },
        },
    )
    view = await wait_finished(api, tenant, run_id, within=120)
    assert view["status"] == "completed", view
    # The simulator calls tools until it has seen `turns` results in the transcript it gets:
    # a transcript cut short would have kept it calling them.
    assert view["usage"]["model_calls"] == turns + 1, view["usage"]

    workflow = workflow_id(tenant.id, run_id)
    rows = await rows_of(database_url, workflow)
    # The last call's conversation: its preamble, the ticket, a tool call and its result per turn.
    assert [r["depth"] for r in rows] == list(range(1, 2 * turns + 3))
    assert all(canary.encode() not in bytes(r["data"]) for r in rows)
    handle = client.get_workflow_handle(workflow)
    await record_history(handle, "supportagent_long_conversation")
    history = await handle.fetch_history()
    calls = [
        e
        for e in history.events
        if e.activity_task_scheduled_event_attributes.activity_type.name == "model.call"
    ]
    assert len(calls) == turns + 1
    # Only the first call carries the long ticket; every later one a link and one turn's
    # messages: what each puts in the history or the payload store stays flat.
    owner = await asyncpg.connect(database_url)
    try:
        stored = {
            bytes(r["sha256"]): int(r["size"])
            for r in await owner.fetch(
                "SELECT sha256, size FROM payload_store WHERE sha256 = ANY($1::bytea[])",
                list(set().union(*(referenced(e) for e in calls))),
            )
        }
    finally:
        await owner.close()
    carried = [e.ByteSize() + sum(stored[d] for d in referenced(e)) for e in calls]
    note = len(hints["note"])
    assert carried[0] > note
    assert all(size < note for size in carried[1:]), carried
    assert max(carried[1:]) - min(carried[1:]) < 512, carried


def test_a_message_canonical_form_is_stable_and_ascii() -> None:
    one = {"content": [{"type": "text", "text": "héllo \ud800"}], "role": "user"}
    same = {"role": "user", "content": [{"text": "héllo \ud800", "type": "text"}]}
    assert canonical(one) == canonical(same)
    assert json.loads(canonical(one)) == one
    with pytest.raises(TypeError):
        canonical({"role": "user", "content": object()})
