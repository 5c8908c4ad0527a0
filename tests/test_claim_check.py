"""Large payloads leave the history: stored encrypted in PostgreSQL, referenced by hash."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from pydantic import SecretStr
from temporalio.api.common.v1 import Payload
from temporalio.client import Client
from temporalio.converter import (
    StorageDriverClaim,
    StorageDriverRetrieveContext,
    StorageDriverStoreContext,
)
from temporalio.worker import Replayer

from stead.api.app import create_app
from stead.builtin import BUILTIN_PIPELINES
from stead.config import Settings
from stead.payload_gc import minimum_days, namespace_retention
from stead.service.runs import workflow_id
from stead.store.conversations import ConversationStore
from stead.store.db import Pool
from stead.store.payloads import (
    PayloadMissing,
    PostgresPayloadStore,
    claim_digest,
    referenced,
)
from stead.temporal import data_converter
from tests.conftest import Tenant, make_services, running_workers
from tests.helpers import wait_json
from worker import APP

# Every pipeline the reference application runs, Stead's own included.
WORKFLOWS: list[type[Any]] = [*BUILTIN_PIPELINES, *APP.pipelines]

STEAD = Path(sys.executable).parent / "stead"


@pytest.mark.usefixtures("worker")
async def test_large_input_is_stored_outside_the_history(
    api: httpx.AsyncClient, tenant: Tenant, client: Client, pool: Pool, settings: Settings
) -> None:
    if not settings.payload_offload_bytes:
        pytest.skip("payload offloading is off while recording histories")
    canary = f"canary-{uuid.uuid4().hex}"
    text = " ".join([canary, *(f"word{i}" for i in range(4000))])  # ~35 KB
    started = await api.post(
        "/v1/runs",
        json={"pipeline": "summarize", "input": {"text": text, "review": False}},
        headers=tenant.auth("requester"),
    )
    run_id = started.json()["run_id"]
    done = await wait_json(
        api, f"/v1/runs/{run_id}", tenant.auth("requester"), lambda b: b["status"] == "completed"
    )
    assert done["result"]["summary"].startswith(f"Summary: {canary}")

    handle = client.get_workflow_handle(workflow_id(tenant.id, run_id))
    history = await handle.fetch_history()
    raw = history.to_json()
    assert len(raw) < len(text), "the input is still inside the history"
    assert '"externalPayloads"' in raw  # the SDK's reference, with the stored size
    async with pool.acquire() as conn:
        stored = await conn.fetch(
            "SELECT data FROM payload_store ORDER BY created_at DESC LIMIT 50"
        )
    assert stored, "nothing was offloaded"
    assert all(canary.encode() not in bytes(r["data"]) for r in stored)  # stored encrypted

    replayer = Replayer(
        workflows=WORKFLOWS,
        data_converter=data_converter(settings, PostgresPayloadStore(pool)),
    )
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None


async def test_the_default_threshold_keeps_a_model_reply_inline_and_reads_older_claims(
    pool: Pool, test_settings: Settings
) -> None:
    """A model step's payloads (about 1 KiB encrypted) stay in the history at the default
    threshold; a long transcript still leaves it; and what the old 512-byte threshold
    offloaded still decodes."""
    default: int = Settings.model_fields["payload_offload_bytes"].default
    at = {n: test_settings.model_copy(update={"payload_offload_bytes": n}) for n in (512, default)}
    old = data_converter(at[512], PostgresPayloadStore(pool))
    new = data_converter(at[default], PostgresPayloadStore(pool))
    reply = {"role": "assistant", "text": " ".join(f"word{i}" for i in range(110))}
    transcript = {"messages": [reply] * (default // 400 + 1)}

    (inline,) = await new.encode([reply])
    assert claim_digest(inline) is None, "a model reply of about 1 KiB was offloaded"
    (long,) = await new.encode([transcript])
    assert claim_digest(long) is not None, "a transcript over the threshold stayed inline"
    (claimed,) = await old.encode([reply])
    assert claim_digest(claimed) is not None
    # A process that never saw it (empty payload memory) reads it from the store.
    fresh = data_converter(at[default], PostgresPayloadStore(pool))
    assert await fresh.decode([claimed, long]) == [reply, transcript]


async def test_a_missing_or_altered_payload_is_refused(pool: Pool, database_url: str) -> None:
    store = PostgresPayloadStore(pool)
    payload = Payload(metadata={"encoding": b"binary/plain"}, data=uuid.uuid4().bytes * 100)
    (claim,) = await store.store(StorageDriverStoreContext(), [payload])
    (back,) = await store.retrieve(StorageDriverRetrieveContext(), [claim])
    assert back == payload
    again = await store.store(StorageDriverStoreContext(), [payload])
    assert again == [claim]  # content-addressed: stored once
    forged = StorageDriverClaim({"h": base64.urlsafe_b64encode(bytes(32)).decode()})
    with pytest.raises(PayloadMissing):
        await store.retrieve(StorageDriverRetrieveContext(), [forged])

    # A process serves what it stored lately from memory: the address is the content's hash,
    # so the copy cannot be stale. Another process reads the row and checks it against the hash.
    owner = await asyncpg.connect(database_url)  # the app's role may not update the store
    try:
        await owner.execute(
            "UPDATE payload_store SET data = $2 WHERE sha256 = $1",
            base64.urlsafe_b64decode(claim.claim_data["h"]),
            b"tampered" + payload.SerializeToString()[8:],
        )
    finally:
        await owner.close()
    assert await store.retrieve(StorageDriverRetrieveContext(), [claim]) == [payload]
    with pytest.raises(PayloadMissing):
        await PostgresPayloadStore(pool).retrieve(StorageDriverRetrieveContext(), [claim])


async def test_remembered_payloads_stay_within_their_byte_limit(
    pool: Pool, database_url: str
) -> None:
    store = PostgresPayloadStore(pool, recent_bytes=3000)
    payloads = [Payload(data=uuid.uuid4().bytes * 70) for _ in range(3)]  # 1,123 B each
    claims = await store.store(StorageDriverStoreContext(), payloads)
    owner = await asyncpg.connect(database_url)  # only the owner deletes stored payloads
    try:  # gone from the database: only memory can serve them
        await owner.execute(
            "DELETE FROM payload_store WHERE sha256 = ANY($1)",
            [base64.urlsafe_b64decode(c.claim_data["h"]) for c in claims],
        )
    finally:
        await owner.close()
    with pytest.raises(PayloadMissing):  # the oldest was let go to stay under 3,000 bytes
        await store.retrieve(StorageDriverRetrieveContext(), claims[:1])
    assert await store.retrieve(StorageDriverRetrieveContext(), claims[1:]) == payloads[1:]


# --- collecting stored payloads -----------------------------------------------------------


def gc_cli(settings: Settings, client: Client, database_url: str, days: str) -> tuple[int, str]:
    """`stead payloads gc` as an operator runs it: the owner's URL, the session's Temporal."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("STEAD_", "TEMPORAL_"))},
        "STEAD_TEMPORAL_ADDRESS": client.service_client.config.target_host,
        "STEAD_TEMPORAL_NAMESPACE": client.namespace,
        "STEAD_MIGRATE_DATABASE_URL": database_url,
        "STEAD_DATABASE_URL": (settings.database_url or SecretStr("")).get_secret_value(),
    }
    done = subprocess.run(  # the venv's own `stead`, no shell
        [str(STEAD), "payloads", "gc", "--older-than-days", days],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done.returncode, (done.stdout + done.stderr).strip()


async def stored(database_url: str, since: datetime) -> set[bytes]:
    owner = await asyncpg.connect(database_url)
    try:
        rows = await owner.fetch("SELECT sha256 FROM payload_store WHERE created_at >= $1", since)
    finally:
        await owner.close()
    return {bytes(r["sha256"]) for r in rows}


async def age_payloads(database_url: str, digests: set[bytes], days: int) -> None:
    owner = await asyncpg.connect(database_url)
    try:
        await owner.execute(
            "UPDATE payload_store SET created_at = created_at - make_interval(days => $2)"
            " WHERE sha256 = ANY($1::bytea[])",
            list(digests),
            days,
        )
    finally:
        await owner.close()


async def age_conversations(database_url: str, workflows: list[str], days: int) -> dict[str, int]:
    """Make the workflows' stored conversation messages `days` older; how many each has."""
    owner = await asyncpg.connect(database_url)
    try:
        rows = await owner.fetch(
            "UPDATE conversation_messages SET created_at = created_at - make_interval(days => $2)"
            " WHERE workflow_id = ANY($1::text[]) RETURNING workflow_id",
            workflows,
            days,
        )
    finally:
        await owner.close()
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["workflow_id"]] = counts.get(row["workflow_id"], 0) + 1
    return counts


async def test_gc_keeps_what_a_parked_run_needs_and_refuses_unsafe_ages(
    client: Client, test_settings: Settings, pool: Pool, database_url: str, tenant: Tenant
) -> None:
    """A summarize run parked for review, its input and model reply claim-checked, all older
    than the cutoff: gc keeps them, deletes an orphan as old, and the run can still be read
    and approved by processes that never saw its payloads (no memory to serve them from)."""
    if not test_settings.payload_offload_bytes:
        pytest.skip("payload offloading is off while recording histories")
    owner = await asyncpg.connect(database_url)
    try:
        began: datetime = await owner.fetchval("SELECT now()")
    finally:
        await owner.close()
    canary = f"canary-{uuid.uuid4().hex}"
    text = " ".join([canary, *(f"word{i}" for i in range(3000))])
    async with (
        running_workers(client, test_settings, pool),
        _api(client, test_settings, pool) as api,
    ):
        started = await api.post(
            "/v1/runs",
            json={"pipeline": "summarize", "input": {"text": text}},
            headers=tenant.auth("requester"),
        )
        run_id = started.json()["run_id"]
        await wait_json(
            api, f"/v1/runs/{run_id}", tenant.auth("approver"), lambda b: b["stage"] == "review"
        )
    history = await client.get_workflow_handle(workflow_id(tenant.id, run_id)).fetch_history()
    needed = set().union(*(referenced(event) for event in history.events))
    (orphan,) = await PostgresPayloadStore(pool).store(
        StorageDriverStoreContext(), [Payload(data=uuid.uuid4().bytes * 200)]
    )
    orphan_digest = base64.urlsafe_b64decode(orphan.claim_data["h"])
    assert needed, "nothing of the run was claim-checked"
    assert needed | {orphan_digest} <= await stored(database_url, began)
    await age_payloads(database_url, needed | {orphan_digest}, days=90)
    # The parked run's long prompt went to the conversation store; a workflow with no history
    # left has rows there too.
    parked, gone = workflow_id(tenant.id, run_id), f"wf-gone-{uuid.uuid4().hex}"
    await ConversationStore(pool).resolve(gone, "", 0, [{"role": "user", "content": "bye"}])
    assert await age_conversations(database_url, [parked, gone], days=90) == {parked: 2, gone: 1}

    retention = await namespace_retention(client)
    least = minimum_days(retention)
    for nonsense in ("0", "-3", str(least - 1)):
        code, said = gc_cli(test_settings, client, database_url, nonsense)
        assert code == 2, said
        assert said.startswith("stead: payloads gc: --older-than-days must be"), said
        assert "\n" not in said
    assert f"at least {least}" in said

    code, said = gc_cli(test_settings, client, database_url, str(least))
    assert code == 0, said
    owner = await asyncpg.connect(database_url)
    try:
        left = {
            bytes(r["sha256"])
            for r in await owner.fetch(
                "SELECT sha256 FROM payload_store WHERE sha256 = ANY($1::bytea[])",
                list(needed | {orphan_digest}),
            )
        }
    finally:
        await owner.close()
    assert left == needed  # the orphan is gone; everything the parked run references stays
    assert await age_conversations(database_url, [parked, gone], days=0) == {parked: 2}
    assert "removed 1 stored conversation message(s)" in said, said

    # New processes with empty payload memories: the run's state and its approval must come
    # from the store.
    fresh = await Client.connect(
        client.service_client.config.target_host,
        namespace=client.namespace,
        data_converter=data_converter(test_settings, PostgresPayloadStore(pool)),
    )
    async with running_workers(fresh, test_settings, pool), _api(fresh, test_settings, pool) as api:
        run = await api.get(f"/v1/runs/{run_id}", headers=tenant.auth("approver"))
        assert run.status_code == 200, run.text
        (approval,) = run.json()["pending_approvals"]
        decided = await api.post(
            f"/v1/approvals/{approval['approval_id']}/decision",
            json={"decision": "approve"},
            headers=tenant.auth("approver"),
        )
        assert decided.status_code == 200, decided.text
        done = await wait_json(
            api, f"/v1/runs/{run_id}", tenant.auth("requester"), lambda b: b["status"] != "running"
        )
    assert done["status"] == "completed"
    assert done["result"]["summary"].startswith(f"Summary: {canary}")


@asynccontextmanager
async def _api(client: Client, settings: Settings, pool: Pool) -> AsyncIterator[httpx.AsyncClient]:
    services = make_services(settings, client, pool)
    transport = httpx.ASGITransport(app=create_app(settings, services))
    async with httpx.AsyncClient(transport=transport, base_url="http://stead.test") as http:
        yield http
