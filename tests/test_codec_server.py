"""The codec server: the Web UI's and the CLI's way to read payloads, its credentials, bad
requests and CORS."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
import yaml
from pydantic import SecretStr
from temporalio.api.common.v1 import Payload
from temporalio.api.sdk.v1 import ExternalStorageReference
from temporalio.client import Client
from temporalio.converter import (
    JSONProtoPayloadConverter,
    StorageDriverClaim,
    StorageDriverStoreContext,
)

from stead.api.app import create_app
from stead.api.routes import codec as codec_route
from stead.codec import ENCODING, EncryptionCodec
from stead.config import ConfigError, Settings, load_settings
from stead.dev import DevStack
from stead.store.db import Pool
from stead.store.payloads import PostgresPayloadStore
from tests.codec_support import payload, unwire, wire
from tests.conftest import Tenant, make_services

UI_ORIGIN = "http://127.0.0.1:8233"
CODEC_TOKEN = "test-codec-token-" + "x" * 16


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
        assert allowed.headers["access-control-allow-headers"] == (
            "Authorization, Content-Type, X-Namespace"
        )
        assert allowed.headers["access-control-allow-methods"] == "POST, OPTIONS"
        assert allowed.headers["access-control-max-age"] == "600"
        assert allowed.headers["vary"] == "Origin"  # caches keep answers per origin
        assert "access-control-allow-private-network" not in allowed.headers
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


async def test_a_private_network_preflight_is_answered(codec_api: httpx.AsyncClient) -> None:
    """Chrome asks first when a page on a more public address calls loopback."""
    headers = {
        "Origin": UI_ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Private-Network": "true",
    }
    path = f"/codec/{CODEC_TOKEN}/decode"
    asked = await codec_api.options(path, headers=headers)
    assert asked.status_code == 204
    assert asked.headers["access-control-allow-private-network"] == "true"
    stranger = await codec_api.options(path, headers={**headers, "Origin": "http://evil.test"})
    assert "access-control-allow-private-network" not in stranger.headers


@pytest.mark.parametrize(
    "origin",
    [
        f"{UI_ORIGIN}.evil.test",  # the allowed origin as a prefix of another host
        f"{UI_ORIGIN}3",  # ... of another port
        f"{UI_ORIGIN}/",
        UI_ORIGIN[:-1],  # a prefix of the allowed origin
        "http://127.0.0.1",
        "127.0.0.1:8233",  # a substring of it
        "https://127.0.0.1:8233",
        f"http://evil.test#{UI_ORIGIN}",
        "null",
        "",
    ],
)
async def test_cors_needs_the_exact_origin(codec_api: httpx.AsyncClient, origin: str) -> None:
    """Origins are compared whole: none that merely starts with, ends with or contains the
    UI's origin gets a CORS grant, on the preflight or the request."""
    path = f"/codec/{CODEC_TOKEN}/decode"
    preflight = await codec_api.options(
        path, headers={"Origin": origin, "Access-Control-Request-Method": "POST"}
    )
    assert preflight.status_code == 403
    response = await codec_api.post(path, json=wire([payload("x")]), headers={"Origin": origin})
    assert response.status_code == 200  # the token is valid: only the browser grant is missing
    for answer in (preflight, response):
        assert not [h for h in answer.headers if h.startswith("access-control-")]
        assert answer.headers["vary"] == "Origin"


async def test_cors_allows_each_listed_origin(
    codec_settings: Settings, api_for: Callable[[Settings], httpx.AsyncClient]
) -> None:
    """`STEAD_UI_ORIGIN` may list the UI under several names, each allowed exactly."""
    names = ["http://localhost:8233", "http://127.0.0.1:8233/"]
    http = api_for(codec_settings.model_copy(update={"ui_origin": " , ".join(names)}))
    path = f"/codec/{CODEC_TOKEN}/decode"
    for origin in ("http://localhost:8233", UI_ORIGIN):
        response = await http.options(
            path, headers={"Origin": origin, "Access-Control-Request-Method": "POST"}
        )
        assert response.status_code == 204, origin
        assert response.headers["access-control-allow-origin"] == origin
    refused = await http.options(path, headers={"Origin": "http://localhost:823"})
    assert refused.status_code == 403


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
