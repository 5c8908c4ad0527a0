"""The Temporal Web UI, in a real browser: plaintext shows only through the codec."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import uuid
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from pydantic import SecretStr
from temporalio.client import Client

from stead.api.app import create_app
from stead.config import Settings
from stead.search import SEARCH_ATTRIBUTES
from stead.service.runs import workflow_id
from stead.serving import serving
from stead.store.db import Pool
from stead.store.payloads import PostgresPayloadStore
from stead.temporal import data_converter, dev_server_args
from tests.codec_support import FILLER, TEMPORAL, reveals
from tests.conftest import Tenant, make_services, running_workers
from tests.helpers import eventually, free_ports, wait_json

CHROMIUM = shutil.which("chromium") or (
    "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
)


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
