"""Payload encryption end to end: the codec, the codec server, and what Temporal's own tools
(the CLI, the Web UI in a real browser) reveal with and without it.

Every check that plaintext is absent has a control that finds the same plaintext through the
codec, so a test that could not see it anyway would fail.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import json
import os
import re
import secrets
import shutil
import signal
import sys
import uuid
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import yaml
from google.protobuf import json_format
from google.protobuf.message import Message
from pydantic import SecretStr
from temporalio.api.common.v1 import Payload
from temporalio.api.failure.v1 import Failure
from temporalio.api.sdk.v1 import ExternalStorageReference
from temporalio.client import Client, WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import (
    JSONProtoPayloadConverter,
    PayloadCodec,
    StorageDriverClaim,
    StorageDriverRetrieveContext,
    StorageDriverStoreContext,
)

from stead.api.app import create_app
from stead.api.routes import codec as codec_route
from stead.codec import ENCODING, KEY_ID, REFUSED, EncryptionCodec
from stead.config import ConfigError, Settings, load_settings
from stead.contract import RunContext, RunInput
from stead.crypto import SealError
from stead.dev import DevStack
from stead.pipeline.base import Pipeline
from stead.search import SEARCH_ATTRIBUTES
from stead.service.access import Services
from stead.service.runs import launch, new_run_id, workflow_id
from stead.serving import serving
from stead.store.db import Pool
from stead.store.payloads import PostgresPayloadStore
from stead.temporal import data_converter, dev_server_args
from tests.conftest import Tenant, make_services, running_workers
from tests.helpers import eventually, free_ports, wait_json
from tests.servers import serve_app

BIN = Path(sys.executable).parent
TEMPORAL = BIN / "temporal"
CHROMIUM = shutil.which("chromium") or (
    "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
)
UI_ORIGIN = "http://127.0.0.1:8233"
CODEC_TOKEN = "test-codec-token-" + "x" * 16
OLD_KEY = ("old", b"o" * 32)
# Makes a run's input larger than the claim-check threshold, so it leaves the history.
FILLER = "The customer asked about the order. " * 100
NEW_KEY = ("new", b"n" * 32)


def payload(value: Any) -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=json.dumps(value).encode())


def wire(payloads: Sequence[Payload]) -> dict[str, Any]:
    """Proto-JSON `Payloads`, as the Web UI and the CLI send them."""
    return {
        "payloads": [
            {
                "metadata": {k: base64.b64encode(v).decode() for k, v in p.metadata.items()},
                "data": base64.b64encode(p.data).decode(),
            }
            for p in payloads
        ]
    }


def unwire(body: dict[str, Any]) -> list[Payload]:
    return [
        Payload(
            metadata={k: base64.b64decode(v) for k, v in p.get("metadata", {}).items()},
            data=base64.b64decode(p.get("data", "")),
        )
        for p in body["payloads"]
    ]


# --- the codec ------------------------------------------------------------------------------


async def test_round_trip_hides_data_and_type() -> None:
    codec = EncryptionCodec([NEW_KEY])
    original = payload({"text": "the quarterly numbers"})
    [sealed] = await codec.encode([original])
    assert sealed.metadata["encoding"] == ENCODING
    assert sealed.metadata[KEY_ID] == b"new"
    assert b"quarterly" not in sealed.data
    assert b"json/plain" not in sealed.data  # the original metadata is sealed too
    assert await codec.decode([sealed]) == [original]


async def test_old_key_still_decodes_after_rotation() -> None:
    [sealed] = await EncryptionCodec([OLD_KEY]).encode([payload("before rotation")])
    rotated = EncryptionCodec([NEW_KEY, OLD_KEY])
    assert await rotated.decode([sealed]) == [payload("before rotation")]
    [fresh] = await rotated.encode([payload("after")])
    assert fresh.metadata[KEY_ID] == b"new"  # the first key encrypts


async def test_unknown_key_id_fails_clearly() -> None:
    [sealed] = await EncryptionCodec([OLD_KEY]).encode([payload("x")])
    with pytest.raises(SealError, match="no key with id 'old'"):
        await EncryptionCodec([NEW_KEY]).decode([sealed])


async def test_tampered_ciphertext_fails() -> None:
    codec = EncryptionCodec([NEW_KEY])
    [sealed] = await codec.encode([payload("amount: 100")])
    flipped = bytearray(sealed.data)
    flipped[-1] ^= 1
    tampered = Payload(metadata=dict(sealed.metadata), data=bytes(flipped))
    with pytest.raises(SealError, match="failed authentication"):
        await codec.decode([tampered])


async def test_unencrypted_payloads_are_refused_unless_allowed() -> None:
    """A plaintext payload came from something other than Stead (someone who reached
    Temporal's frontend); only a migration window lets it through."""
    plain = payload({"principal": "forged"})
    [refused] = await EncryptionCodec([NEW_KEY]).decode([plain])
    assert refused.metadata["encoding"] == REFUSED
    assert not refused.data
    with pytest.raises(KeyError, match="refused-plaintext"):
        pydantic_data_converter.payload_converter.from_payload(refused, dict)
    assert await EncryptionCodec([NEW_KEY], allow_plaintext=True).decode([plain]) == [plain]


# --- the codec server -----------------------------------------------------------------------


@pytest.fixture
def codec_settings(test_settings: Settings) -> Settings:
    return test_settings.model_copy(
        update={"codec_token": SecretStr(CODEC_TOKEN), "ui_origin": UI_ORIGIN}
    )


@pytest.fixture
async def codec_api(
    codec_settings: Settings, client: Client, pool: Pool
) -> AsyncIterator[httpx.AsyncClient]:
    services = make_services(codec_settings, client, pool)
    transport = httpx.ASGITransport(app=create_app(codec_settings, services))
    async with httpx.AsyncClient(transport=transport, base_url="http://stead.test") as http:
        yield http


async def test_codec_routes_round_trip_with_the_workers_codec(
    codec_api: httpx.AsyncClient, codec_settings: Settings, operator: dict[str, str]
) -> None:
    originals = [payload({"tool": "refund", "amount": 42}), payload("a model's reply")]
    encoded = await codec_api.post("/codec/encode", json=wire(originals), headers=operator)
    assert encoded.status_code == 200, encoded.text
    sealed = unwire(encoded.json())
    assert all(p.metadata["encoding"] == ENCODING for p in sealed)
    # What the server encodes, the workers' own codec decodes, and the other way round.
    workers_codec = EncryptionCodec(codec_settings.encryption_keys)
    assert await workers_codec.decode(sealed) == originals
    from_worker = await workers_codec.encode(originals)
    decoded = await codec_api.post(f"/codec/{CODEC_TOKEN}/decode", json=wire(from_worker))
    assert decoded.status_code == 200, decoded.text
    assert unwire(decoded.json()) == originals

    # Fields a newer UI might add are ignored, even a key the protobuf parser would read as
    # an extension ("[x]").
    extended = wire(originals)
    extended["newer"] = 1
    for item in extended["payloads"]:
        item |= {"[masked]": None, "externalPayloads": []}
    again = await codec_api.post("/codec/encode", json=extended, headers=operator)
    assert again.status_code == 200, again.text
    assert await workers_codec.decode(unwire(again.json())) == originals


def reference(store: PostgresPayloadStore, claim: StorageDriverClaim) -> Payload:
    """A claim-check reference as the SDK writes it into a history."""
    ref = ExternalStorageReference(driver_name=store.name(), claim_data=claim.claim_data)
    made = JSONProtoPayloadConverter().to_payload(ref)
    assert made is not None
    return made


async def test_codec_decodes_payloads_kept_outside_the_history(
    codec_api: httpx.AsyncClient, codec_settings: Settings, pool: Pool
) -> None:
    store = PostgresPayloadStore(pool)
    original = payload({"transcript": "a long conversation " * 200})
    [sealed] = await EncryptionCodec(codec_settings.encryption_keys).encode([original])
    [claim] = await store.store(StorageDriverStoreContext(), [sealed])
    route = f"/codec/{CODEC_TOKEN}/decode"
    decoded = await codec_api.post(route, json=wire([reference(store, claim)]))
    assert decoded.status_code == 200, decoded.text
    assert unwire(decoded.json()) == [original]
    forged = reference(store, StorageDriverClaim({"sha256": "00" * 32}))
    missing = await codec_api.post(route, json=wire([payload("inline"), forged]))
    assert missing.status_code == 422
    assert missing.json()["detail"].startswith("payload 1 is stored outside the history")


async def test_codec_refuses_without_the_right_credentials(
    codec_api: httpx.AsyncClient, tenant: Tenant, operator: dict[str, str]
) -> None:
    body = wire([payload("x")])
    refused = {
        "no credentials": await codec_api.post("/codec/decode", json=body),
        "unknown API key": await codec_api.post(
            "/codec/decode",
            json=body,
            headers={"Authorization": "Bearer stead_000000000000_" + "a" * 40},
        ),
        "wrong path token": await codec_api.post(f"/codec/{'y' * 32}/decode", json=body),
    }
    for case, response in refused.items():
        assert response.status_code == 401, (case, response.text)
        assert response.json()["code"] == "unauthorized", case
    # A valid key whose roles do not hold platform:codec is known but not allowed: a tenant's
    # admin included, since the payload keys are not theirs but the platform's.
    for user in ("requester", "approver", "admin"):
        response = await codec_api.post("/codec/decode", json=body, headers=tenant.auth(user))
        assert response.status_code == 403, (user, response.text)
        assert "platform:codec" in response.json()["detail"]
    allowed = await codec_api.post("/codec/decode", json=body, headers=operator)
    assert allowed.status_code == 200


async def test_codec_bad_requests(
    codec_api: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    route = f"/codec/{CODEC_TOKEN}/decode"
    garbled = await codec_api.post(route, content=b'{"payloads": 7}')
    assert garbled.status_code == 400
    [foreign] = await EncryptionCodec([("elsewhere", b"e" * 32)]).encode([payload("x")])
    undecryptable = await codec_api.post(route, json=wire([payload("ok"), foreign]))
    assert undecryptable.status_code == 422
    assert undecryptable.json()["code"] == "undecodable"
    assert undecryptable.json()["detail"] == (
        "payload 1 cannot be decrypted: no key with id 'elsewhere'"
    )
    monkeypatch.setattr(codec_route, "MAX_BODY_BYTES", 1024)
    big = json.dumps(wire([payload("z" * 2048)])).encode()
    assert (await codec_api.post(route, content=big)).status_code == 413

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length to check up front
        for start in range(0, len(big), 256):
            yield big[start : start + 256]

    assert (await codec_api.post(route, content=chunked())).status_code == 413


async def test_codec_without_keys_is_unavailable(
    api_for: Callable[[Settings], httpx.AsyncClient],
    operator: dict[str, str],
    codec_settings: Settings,
) -> None:
    # A fresh Settings: model_copy would keep the cached `encryption_keys`.
    keyless = Settings(
        env="test",
        payload_keys=None,
        codec_token=CODEC_TOKEN,
        database_url=codec_settings.database_url,
    )
    http = api_for(keyless)
    for path, headers in (
        (f"/codec/{CODEC_TOKEN}/decode", {}),
        ("/codec/encode", operator),
    ):
        response = await http.post(path, json=wire([payload("x")]), headers=headers)
        assert response.status_code == 503, response.text
        assert "STEAD_PAYLOAD_KEYS" in response.json()["detail"]


async def test_cors_only_for_the_ui_origin(codec_api: httpx.AsyncClient) -> None:
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,x-namespace",
    }
    for path in ("/codec/decode", f"/codec/{CODEC_TOKEN}/decode"):
        allowed = await codec_api.options(path, headers={**preflight, "Origin": UI_ORIGIN})
        assert allowed.status_code == 204, path
        assert allowed.headers["access-control-allow-origin"] == UI_ORIGIN
        assert allowed.headers["access-control-allow-credentials"] == "true"
        assert "X-Namespace" in allowed.headers["access-control-allow-headers"]
        assert "POST" in allowed.headers["access-control-allow-methods"]
        other = await codec_api.options(path, headers={**preflight, "Origin": "http://evil.test"})
        assert "access-control-allow-origin" not in other.headers
        assert other.status_code == 403
    # The real request carries the header too, errors included, so the UI can read them.
    body = wire([payload("x")])
    ok = await codec_api.post(
        f"/codec/{CODEC_TOKEN}/decode", json=body, headers={"Origin": UI_ORIGIN}
    )
    assert ok.headers["access-control-allow-origin"] == UI_ORIGIN
    denied = await codec_api.post("/codec/decode", json=body, headers={"Origin": UI_ORIGIN})
    assert denied.status_code == 401
    assert denied.headers["access-control-allow-origin"] == UI_ORIGIN
    stranger = await codec_api.post(
        f"/codec/{CODEC_TOKEN}/decode", json=body, headers={"Origin": "http://evil.test"}
    )
    assert "access-control-allow-origin" not in stranger.headers


def test_a_bad_codec_token_is_refused_without_echoing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEAD_CODEC_TOKEN", "short/secret")
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert "STEAD_CODEC_TOKEN" in str(raised.value)
    assert "short/secret" not in str(raised.value)


def test_stead_dev_gives_the_ui_a_codec_url_with_a_private_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("STEAD_CODEC_TOKEN", "STEAD_HOST", "STEAD_PUBLIC_API_URL"):
        monkeypatch.delenv(name, raising=False)  # a developer's own settings change nothing
    stack = DevStack(Settings(data_dir=tmp_path, api_port=18000))
    args = stack.temporal_args()
    token_file = tmp_path / "codec.token"
    token = token_file.read_text()
    # The endpoint travels in the Temporal CLI's env file, never on the command line (ps).
    assert not any(token in arg for arg in args)
    env_file = Path(args[args.index("--env-file") + 1])
    stead_env = yaml.safe_load(env_file.read_text())["env"][args[args.index("--env") + 1]]
    assert stead_env["ui-codec-endpoint"] == f"http://127.0.0.1:18000/codec/{token}"
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert env_file.stat().st_mode & 0o777 == 0o600
    assert Settings(codec_token=token).codec_token is not None  # a token the API accepts
    # A restart keeps it: the running UI's endpoint stays valid.
    assert DevStack(Settings(data_dir=tmp_path)).codec_token() == token


# --- what Temporal stores, and what its CLI shows ----------------------------------------------

_BASE64 = re.compile(rb"[A-Za-z0-9+/_-]{12,}")


def reveals(output: bytes, secret: str) -> bool:
    """Whether `secret` is readable in `output`, directly or inside any base64 run: the CLI's
    JSON shows every payload's data as base64, plaintext or not."""
    needle = secret.encode()
    if needle in output:
        return True
    for run in _BASE64.findall(output):
        for decode in (base64.b64decode, base64.urlsafe_b64decode):
            try:
                if needle in decode(run + b"=" * (-len(run) % 4)):
                    return True
            except (binascii.Error, ValueError):
                continue
    return False


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


# --- the Web UI, in a real browser -----------------------------------------------------------


@asynccontextmanager
async def dev_server(codec_endpoint: str, log: Path) -> AsyncIterator[tuple[str, int]]:
    """A Temporal dev server with its Web UI whose codec is `codec_endpoint`; yields the
    frontend address and the UI port."""
    port, ui_port, http_port, metrics_port = free_ports(4)
    args = [
        "server", "start-dev", "--ip", "127.0.0.1", "--port", str(port),
        "--ui-ip", "127.0.0.1", "--ui-port", str(ui_port), "--http-port", str(http_port),
        "--metrics-port", str(metrics_port), "--log-level", "warn",
        "--ui-codec-endpoint", codec_endpoint,
        # The UI would otherwise fetch a newsfeed from the internet while the page renders.
        "--ui-disable-news-fetch",
        *dev_server_args(),
    ]  # fmt: skip
    for name, kind in SEARCH_ATTRIBUTES.items():
        args += ["--search-attribute", f"{name}={kind}"]
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            str(TEMPORAL), *args, stdout=out, stderr=asyncio.subprocess.STDOUT
        )
    try:
        yield f"127.0.0.1:{port}", ui_port
    finally:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout=15)
        except TimeoutError:
            process.kill()
            await process.wait()


async def connected(address: str, settings: Settings, pool: Pool) -> Client:
    converter = data_converter(settings, PostgresPayloadStore(pool))

    async def attempt() -> Client | None:
        try:
            return await Client.connect(address, data_converter=converter)
        except RuntimeError:  # not listening yet
            return None

    found = await eventually(attempt, lambda c: c is not None, within=30)
    assert found is not None
    return found


async def chromium(profile: Path, url: str, *action: str) -> bytes:
    """Run headless Chromium once on `url`; a fresh `profile` each time, so nothing cached
    by an earlier run (a decoded payload) carries over."""
    process = await asyncio.create_subprocess_exec(
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--window-size=1400,900",
        # The UI is a JS app: without virtual time the page is captured before it renders.
        "--virtual-time-budget=10000",
        *action,
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,  # its renderer and GPU processes go with it on a timeout
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout=45)
    except TimeoutError:
        os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        raise AssertionError(f"chromium did not finish rendering {url} in 45 s") from None
    assert process.returncode == 0
    return out


def png_facts(path: Path) -> tuple[int, int, int]:
    """Width, height and the number of distinct bytes in the image data (a blank page has
    almost none)."""
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = int.from_bytes(raw[16:20]), int.from_bytes(raw[20:24])
    data, at = b"", 8
    while at < len(raw):
        length = int.from_bytes(raw[at : at + 4])
        if raw[at + 4 : at + 8] == b"IDAT":
            data += raw[at + 8 : at + 8 + length]
        at += 12 + length
    return width, height, len(set(zlib.decompress(data)))


@pytest.mark.browser
@pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (Debian package `chromium`; .ci/run adds it)",
)
async def test_web_ui_shows_plaintext_only_through_the_codec(
    test_settings: Settings, pool: Pool, tenant: Tenant, tmp_path: Path
) -> None:
    canary = f"canary{uuid.uuid4().hex}"
    token = secrets.token_urlsafe(24)
    [api_port] = free_ports(1)
    codec_endpoint = f"http://127.0.0.1:{api_port}/codec/{token}"
    async with dev_server(codec_endpoint, tmp_path / "temporal.log") as (address, ui_port):
        settings = test_settings.model_copy(
            update={
                "temporal_address": address,
                "codec_token": SecretStr(token),
                "ui_origin": f"http://127.0.0.1:{ui_port}",
            }
        )
        client = await connected(address, settings, pool)
        svc = make_services(settings, client, pool)
        async with running_workers(client, settings, pool):
            async with serving(create_app(settings, svc), port=api_port) as api_url:
                async with httpx.AsyncClient(base_url=api_url, timeout=10) as http:
                    started = await http.post(
                        "/v1/runs",
                        json={
                            "pipeline": "summarize",
                            "input": {
                                "text": f"Note {canary}: {FILLER}\nsim_reply: Draft {canary}",
                                "review": False,
                            },
                        },
                        headers=tenant.auth("requester"),
                    )
                    assert started.status_code == 201, started.text
                    run_id = started.json()["run_id"]
                    # A closed run: the UI long-polls a running one's history, and virtual
                    # time never runs out while a request is pending.
                    await wait_json(
                        http,
                        f"/v1/runs/{run_id}",
                        tenant.auth("requester"),
                        lambda b: b["status"] == "completed",
                    )
                wid = workflow_id(tenant.id, run_id)
                described = await client.get_workflow_handle(wid).describe()
                page = (
                    f"http://127.0.0.1:{ui_port}/namespaces/default/workflows/"
                    f"{quote(wid, safe='')}/{described.run_id}/history"
                )
                decoded = await chromium(tmp_path / "p1", page, "--dump-dom")
                await chromium(tmp_path / "p2", page, f"--screenshot={tmp_path / 'with-codec.png'}")
                # The operator rotates the token: the UI's old one is refused.
                svc.settings = settings.model_copy(
                    update={"codec_token": SecretStr(secrets.token_urlsafe(24))}
                )
                refused = await chromium(tmp_path / "p3", page, "--dump-dom")
            # The codec server is down.
            offline = await chromium(tmp_path / "p4", page, "--dump-dom")
            await chromium(tmp_path / "p5", page, f"--screenshot={tmp_path / 'without-codec.png'}")

    assert canary.encode() in decoded
    for name, dom in (("refused", refused), ("offline", offline)):
        assert wid.encode() in dom, f"{name}: the page did not render the run"
        assert not reveals(dom, canary), f"{name}: the UI shows the canary without the codec"
    for shot in ("with-codec.png", "without-codec.png"):
        width, height, distinct = png_facts(tmp_path / shot)
        assert (width, height) == (1400, 900)
        assert distinct > 64, f"{shot} looks blank"
        assert (tmp_path / shot).stat().st_size > 20_000
    assert (tmp_path / "with-codec.png").read_bytes() != (
        tmp_path / "without-codec.png"
    ).read_bytes()
