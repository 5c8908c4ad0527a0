"""Bodies are bounded and anonymous requests cost nothing: checked on a real API process.

Before: bodies were read and parsed before authentication, so four unauthenticated 50 MB
posts took an API process from 172 MB to 535 MB. Now a request without a valid key is
answered 401 from its headers, and every body is capped (413) before it is buffered.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from temporalio.client import Client

from stead.config import Settings
from tests.conftest import PAYLOAD_KEYS, Tenant
from tests.helpers import eventually, free_ports

FIFTY_MB = 50 << 20
CHUNK = b"x" * (1 << 20)


@pytest.fixture
def api_process(client: Client, test_settings: Settings, tmp_path: Path) -> Iterator[str]:
    """`stead api` as its own process, so its memory is its own."""
    (port,) = free_ports(1)
    assert test_settings.database_url is not None
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("STEAD_")},
        "STEAD_DATABASE_URL": test_settings.database_url.get_secret_value(),
        "STEAD_TEMPORAL_ADDRESS": client.service_client.config.target_host,
        "STEAD_TASK_QUEUE": test_settings.task_queue,
        "STEAD_PAYLOAD_KEYS": PAYLOAD_KEYS,
        "STEAD_API_PORT": str(port),
    }
    log = (tmp_path / "api.log").open("ab")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "stead"), "api"], env=env, stdout=log, stderr=log
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=15)
        log.close()


def rss_of_listener(url: str) -> int:
    port = int(url.rsplit(":", 1)[1])
    for conn in psutil.net_connections("tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
            return int(psutil.Process(conn.pid).memory_info().rss)
    raise AssertionError("the API process is not listening")


async def declared_only(url: str, length: int) -> int:
    """Declare a huge body, send none of it, and read the status: what a server that waits
    for the body before answering would never return."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            f"POST /v1/runs HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n".encode()
        )
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), timeout=10)
        return int(status_line.split()[1])
    finally:
        writer.close()


async def streamed(total: int) -> AsyncIterator[bytes]:
    """A body without Content-Length, as a chunked upload sends it."""
    sent = 0
    while sent < total:
        yield CHUNK
        sent += len(CHUNK)


async def test_anonymous_and_oversized_bodies_are_refused_unread(
    api_process: str, tenant: Tenant
) -> None:
    async with httpx.AsyncClient(base_url=api_process, timeout=60) as http:

        async def health() -> int:
            try:
                return (await http.get("/healthz")).status_code
            except httpx.HTTPError:
                return 0

        await eventually(health, lambda status: status == 200, within=30)
        before = rss_of_listener(api_process)
        for _ in range(4):
            # Unauthenticated, streamed: a 401 from the headers, the body never read.
            try:
                anonymous = await http.post("/v1/runs", content=streamed(FIFTY_MB))
                assert anonymous.status_code == 401, anonymous.text
                assert anonymous.json()["code"] == "unauthorized"
            except httpx.HTTPError:
                pass  # the server may close the connection while the client still sends
            # Unauthenticated with a declared length over the cap: refused up front.
            assert await declared_only(api_process, FIFTY_MB) in (401, 413)
        after = rss_of_listener(api_process)
        assert after - before < 32 << 20, f"grew {(after - before) >> 20} MiB"

        # Authenticated: a body over the cap is a 413 in the API's error shape, streamed or not.
        too_big = b'{"pipeline": "summarize", "input": {"text": "' + b"y" * (2 << 20) + b'"}}'
        over = await http.post(
            "/v1/runs",
            content=too_big,
            headers={**tenant.auth("requester"), "Content-Type": "application/json"},
        )
        assert over.status_code == 413, over.text
        assert over.json()["code"] == "too_large"
        try:
            chunked = await http.post(
                "/v1/runs", content=streamed(FIFTY_MB), headers=tenant.auth("requester")
            )
            assert chunked.status_code == 413
        except httpx.HTTPError:
            pass
        final = rss_of_listener(api_process)
        assert final - before < 48 << 20, f"grew {(final - before) >> 20} MiB"

        # A document's body may be larger than a run's, up to its own limit: 800 kB of text
        # sent as \u escapes is a 4.8 MB body.
        escaped = json.dumps({"title": "Big", "text": "é" * 400_000}, ensure_ascii=True)
        document = await http.post(
            "/v1/documents",
            content=escaped.encode(),
            headers={**tenant.auth("requester"), "Content-Type": "application/json"},
        )
        assert document.status_code == 201, document.text
