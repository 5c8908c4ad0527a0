"""Heartbeating while an activity waits on something slow (a provider, an integration).

Cancellation reaches a running activity only through a heartbeat's response, and a worker
that died is noticed by a missed heartbeat: both need heartbeats during the wait, not just
between steps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from temporalio import activity

T = TypeVar("T")


async def heartbeating(awaitable: Awaitable[T], every: float = 5.0) -> T:
    """Await `awaitable`, heartbeating every `every` seconds; cancel it if we are cancelled."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=every)
            if done:
                return task.result()
            activity.heartbeat()
    finally:
        task.cancel()
