"""The run loop the benchmarks' own workers share (bare, hand-rolled, Pydantic AI): poll until
SIGINT or SIGTERM, as Stead's worker does. Only `temporalio` and the standard library, so the
Pydantic AI peer's venv can run it too."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from temporalio.client import Client
from temporalio.worker import Worker


async def serve_until_stopped(client: Client, queue: str, name: str, **worker: Any) -> None:
    """Run a worker on `queue` (`worker`: the Worker's other arguments) until signalled."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Worker(client, task_queue=queue, **worker):
        logging.getLogger(f"bench.{name}").info("%s worker polling %s", name, queue)
        await stop.wait()


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
