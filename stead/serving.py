"""Serving an ASGI app inside an event loop that something else owns.

Used by the worker's `/metrics`, the loopback integration services and the tests: the
server reports readiness through an event and leaves signal handling to its owner (uvicorn's
own handling lets only the last-started server see a signal).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Generator
from typing import Any

import uvicorn


class EmbeddedServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    def url(self) -> str:
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"


@contextlib.asynccontextmanager
async def serving(
    app: Any, host: str = "127.0.0.1", port: int = 0, **options: Any
) -> AsyncIterator[str]:
    """Serve `app` for the duration of the block; yield its base URL once it accepts
    connections. Port 0 picks a free one; `options` go to uvicorn.Config (`ssl_certfile`...).
    Shuts down cleanly (lifespan included) on exit."""
    server = EmbeddedServer(
        uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, **options)
    )
    task = asyncio.create_task(server.serve())
    ready = asyncio.create_task(server.ready.wait())
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if not server.ready.is_set():
        ready.cancel()
        await task  # re-raises the startup failure
        raise RuntimeError("uvicorn stopped before it started serving")
    try:
        yield server.url()
    finally:
        server.should_exit = True
        await task
