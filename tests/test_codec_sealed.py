"""What Temporal stores and what its CLI shows: no plaintext, every payload sealed.

Every check that plaintext is absent has a control that finds the same plaintext through the
codec, so a test that could not see it anyway would fail.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections import Counter
from collections.abc import Iterator, Sequence

import httpx
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message
from temporalio.api.common.v1 import Payload
from temporalio.api.failure.v1 import Failure
from temporalio.api.sdk.v1 import ExternalStorageReference
from temporalio.client import Client, WorkflowHistory
from temporalio.converter import (
    PayloadCodec,
    StorageDriverClaim,
    StorageDriverRetrieveContext,
)

from stead.api.app import create_app
from stead.codec import ENCODING, EncryptionCodec
from stead.config import Settings
from stead.contract import RunContext, RunInput
from stead.pipeline.base import Pipeline
from stead.service.access import Services
from stead.service.runs import launch, new_run_id, workflow_id
from stead.store.db import Pool
from stead.store.payloads import PostgresPayloadStore
from tests.codec_support import FILLER, TEMPORAL, reveals
from tests.conftest import Tenant, make_services
from tests.helpers import wait_json
from tests.servers import serve_app


def messages(message: Message, path: str = "") -> Iterator[tuple[str, Message]]:
    """Every protobuf message inside `message` (itself included), with its field path."""
    yield path, message
    for field, value in message.ListFields():
        if isinstance(value, Message):
            yield from messages(value, f"{path}.{field.name}")
        elif hasattr(value, "items"):  # a map field
            for key, item in value.items():
                if isinstance(item, Message):
                    yield from messages(item, f"{path}.{field.name}[{key}]")
        elif field.message_type is not None:  # a repeated message field
            for index, item in enumerate(value):
                yield from messages(item, f"{path}.{field.name}[{index}]")


# Payloads the codec does not see, by design: search attributes are Temporal's index (Stead
# puts only stage, pipeline, tenant, requester, approval roles, error type and cost there),
# headers carry trace context, and the Core SDK writes the local-activity marker's own
# bookkeeping (activity id, type, attempt, times) itself; that marker's result is encoded.
_UNENCODED = (
    ".search_attributes",
    ".header",
    ".marker_recorded_event_attributes.details[data]",
    # The SDK's patch markers (`workflow.patched`): the patch id, a constant from our code.
    ".marker_recorded_event_attributes.details[patch-data]",
)
_REFERENCE_TYPE = ExternalStorageReference.DESCRIPTOR.full_name.encode()


async def check_sealed(
    history: WorkflowHistory, canary: str, store: PostgresPayloadStore
) -> Counter[str]:
    """Assert that every payload of `history` is encrypted (claim-check references: the
    payload they point at), that failures keep message and stack trace only in encoded
    attributes, and that no payload carries `canary`. Count what was checked."""
    seen: Counter[str] = Counter()
    for event in history.events:
        for path, message in messages(event):
            if isinstance(message, Failure):
                assert message.message == "Encoded failure", path
                assert message.stack_trace == "", path
                assert message.HasField("encoded_attributes"), path
                seen["failures"] += 1
            if not isinstance(message, Payload):
                continue
            assert canary.encode() not in message.data, path
            if any(part in path for part in _UNENCODED):
                continue
            stored = message
            if message.metadata.get("messageType") == _REFERENCE_TYPE:
                ref = json_format.Parse(message.data, ExternalStorageReference())
                claim = StorageDriverClaim(dict(ref.claim_data))
                [stored] = await store.retrieve(StorageDriverRetrieveContext(), [claim])
                assert canary.encode() not in stored.data, path
                seen["references"] += 1
            assert stored.metadata["encoding"] == ENCODING, path
            seen["sealed"] += 1
    return seen


async def temporal_cli(*args: str) -> bytes:
    # Not subprocess.run: this loop also runs the worker and the codec server the CLI calls.
    process = await asyncio.create_subprocess_exec(
        str(TEMPORAL),
        *args,
        "--disable-config-file",  # a developer's own profile must not add a codec
        "--disable-config-env",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, err.decode()
    return out


class _Recording(PayloadCodec):
    """Keeps the payloads exactly as the server returned them, then decodes them."""

    def __init__(self, inner: PayloadCodec) -> None:
        self.inner = inner
        self.received: list[Payload] = []

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return await self.inner.encode(payloads)

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        self.received += payloads
        return await self.inner.decode(payloads)


async def canary_runs(
    api: httpx.AsyncClient, tenant: Tenant, svc: Services, canary: str
) -> tuple[str, str]:
    """A completed summarize run and a failed ingest run, both carrying `canary`:
    in the input, the model's reply, an approval comment (an update's argument), an activity's
    failure message and the workflow's failure message."""
    started = await api.post(
        "/v1/runs",
        json={
            "pipeline": "summarize",
            "input": {"text": f"Customer note {canary}: {FILLER}\nsim_reply: Draft for {canary}"},
        },
        headers=tenant.auth("requester"),
    )
    assert started.status_code == 201, started.text
    run_id = started.json()["run_id"]
    run = await wait_json(
        api, f"/v1/runs/{run_id}", tenant.auth("requester"), lambda b: b["stage"] == "review"
    )
    decided = await api.post(
        f"/v1/approvals/{run['pending_approvals'][0]['approval_id']}/decision",
        json={"decision": "approve", "comment": f"checked {canary}"},
        headers=tenant.auth("approver"),
    )
    assert decided.status_code == 200, decided.text
    done = await wait_json(
        api, f"/v1/runs/{run_id}", tenant.auth("requester"), lambda b: b["status"] != "running"
    )
    assert done["result"]["summary"] == f"Draft for {canary}"  # the model's reply carries it

    # An ingest of a document that does not exist fails with its id in the activity's and
    # the run's failure messages; the id is the canary here.
    document_id = "d_" + canary
    context = RunContext(
        tenant=tenant.id,
        run_id=new_run_id(tenant.id, None),
        pipeline="ingest",
        requested_by="admin",
    )
    await launch(svc, RunInput(context=context, input={"document_id": document_id}), "-")
    failed = await wait_json(
        api,
        f"/v1/runs/{context.run_id}",
        tenant.auth("admin"),
        lambda b: b["status"] == "failed",
    )
    assert canary in failed["last_error"]["message"]
    return workflow_id(tenant.id, run_id), workflow_id(tenant.id, context.run_id)


@pytest.mark.usefixtures("worker")
async def test_temporal_stores_no_plaintext_and_the_cli_shows_none(
    api: httpx.AsyncClient,
    tenant: Tenant,
    client: Client,
    pool: Pool,
    test_settings: Settings,
    operator: dict[str, str],
) -> None:
    canary = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz234567") for _ in range(26))
    svc = make_services(test_settings, client, pool)
    completed, failed = await canary_runs(api, tenant, svc, canary)
    address = client.service_client.config.target_host

    store = PostgresPayloadStore(pool)
    seen = {
        wid: await check_sealed(
            await client.get_workflow_handle(wid).fetch_history(), canary, store
        )
        for wid in (completed, failed)
    }
    assert seen[completed]["sealed"] >= 10, seen
    if test_settings.payload_offload_bytes:  # off while recording histories
        assert seen[completed]["references"] >= 1, "the long input was not offloaded"
    assert seen[failed]["failures"] >= 2, "expected the activity's and the run's failure"

    # Temporal's CLI, as an operator without the codec would use it.
    for wid in (completed, failed):
        connect = ["--address", address, "-w", wid]
        outputs = {
            "show -o json": await temporal_cli("workflow", "show", *connect, "-o", "json"),
            "show --detailed": await temporal_cli("workflow", "show", *connect, "--detailed"),
            "describe -o json": await temporal_cli("workflow", "describe", *connect, "-o", "json"),
            "describe": await temporal_cli("workflow", "describe", *connect),
            "list -o json": await temporal_cli(
                "workflow",
                "list",
                "--address",
                address,
                "-q",
                f"WorkflowId = '{wid}'",
                "-o",
                "json",
            ),
        }
        for name, output in outputs.items():
            assert wid.encode() in output or b"binary/encrypted" in output, (name, output[:300])
            assert not reveals(output, canary), f"`temporal workflow {name}` shows the canary"

    # The control: the same CLI through the codec server, with an operator's key, reads it.
    app = create_app(test_settings, svc)
    async with serve_app(app) as url:
        for wid in (completed, failed):
            through_codec = await temporal_cli(
                "workflow", "show", "--address", address, "-w", wid, "-o", "json",
                "--codec-endpoint", f"{url}/codec",
                "--codec-auth", operator["Authorization"],
            )  # fmt: skip
            assert reveals(through_codec, canary), wid

    # Query results travel encrypted too, and decode for a client holding the keys.
    recording = _Recording(EncryptionCodec(test_settings.encryption_keys))
    converter = dataclasses.replace(client.data_converter, payload_codec=recording)
    config = client.config()
    config["data_converter"] = converter
    reader = Client(**config)
    view = await reader.get_workflow_handle(completed).query(Pipeline.state)
    assert canary in view.model_dump_json()
    assert recording.received
    for raw in recording.received:
        assert raw.metadata["encoding"] == ENCODING
        assert canary.encode() not in raw.data
