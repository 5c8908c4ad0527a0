"""Large payloads leave the history: stored encrypted in PostgreSQL, referenced by hash."""

from __future__ import annotations

import base64
import uuid

import asyncpg
import httpx
import pytest
from temporalio.api.common.v1 import Payload
from temporalio.client import Client
from temporalio.converter import (
    StorageDriverClaim,
    StorageDriverRetrieveContext,
    StorageDriverStoreContext,
)
from temporalio.worker import Replayer

from api.routes.runs import workflow_id
from stead.config import Settings
from stead.temporal import data_converter
from store.db import Pool
from store.payloads import PayloadMissing, PostgresPayloadStore
from tests.conftest import Tenant
from tests.helpers import wait_json
from worker import WORKFLOWS


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
        workflows=list(WORKFLOWS),
        data_converter=data_converter(settings, PostgresPayloadStore(pool)),
    )
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None


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
