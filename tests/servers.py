"""Run an ASGI app on an ephemeral loopback port for the duration of a test.

Tests talk to real HTTP servers rather than patched functions, so what they prove holds for the
wire protocol too: headers, status codes, serialisation and concurrent connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Generator

import uvicorn
from starlette.types import ASGIApp


class _TestServer(uvicorn.Server):
    """A uvicorn server that reports readiness through an event and leaves signals alone."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # Ctrl+C must reach pytest, not stop one background server.
        yield


@contextlib.asynccontextmanager
async def serve_app(app: ASGIApp) -> AsyncIterator[str]:
    """Serve `app` on 127.0.0.1 at a free port; yield its base URL, e.g. `http://127.0.0.1:41234`.

    Returns only once the server accepts connections. On exit the server shuts down cleanly
    (lifespan shutdown included) before the context manager returns.
    """
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    server = _TestServer(config)
    task = asyncio.create_task(server.serve())
    ready = asyncio.create_task(server.ready.wait())
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if not server.ready.is_set():
        ready.cancel()
        await task  # re-raises the startup failure
        raise RuntimeError("uvicorn stopped before it started serving")
    try:
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
