"""What the live-events tests share: the API on a real loopback server (Server-Sent Events need
one: an in-process transport hands over a response only once it is complete) and a reader."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from httpx_sse import EventSource, aconnect_sse
from temporalio.client import Client

from stead.api.app import create_app
from stead.config import Settings
from stead.store.db import Pool
from tests.conftest import make_services
from tests.servers import serve_app


@dataclass
class LiveApi:
    url: str
    app: FastAPI
    http: httpx.AsyncClient


@asynccontextmanager
async def live_api(settings: Settings, client: Client, pool: Pool) -> AsyncIterator[LiveApi]:
    app = create_app(settings, make_services(settings, client, pool))
    async with serve_app(app) as url, httpx.AsyncClient(base_url=url, timeout=60) as http:
        yield LiveApi(url, app, http)


@pytest.fixture
async def served(client: Client, test_settings: Settings, pool: Pool) -> AsyncIterator[LiveApi]:
    async with live_api(test_settings, client, pool) as api:
        yield api


@dataclass
class Sse:
    """One Server-Sent Event: its type, id, and the event's `data` (the body's `data` field;
    the whole body is in `body`)."""

    event: str
    id: str
    body: dict[str, Any]

    @property
    def data(self) -> dict[str, Any]:
        inner = self.body.get("data")
        return inner if isinstance(inner, dict) else {}


async def events_of(source: EventSource) -> AsyncIterator[Sse]:
    async for message in source.aiter_sse():
        if message.data:  # else a keep-alive comment, not an event
            yield Sse(message.event, message.id, json.loads(message.data))


async def read_events(
    http: httpx.AsyncClient,
    path: str,
    headers: dict[str, str],
    *,
    stop_after: int | None = None,
    until: str | None = None,
) -> list[Sse]:
    """The stream's events until it ends, `stop_after` events were read, or an event of type
    `until` arrived (then the connection is closed, as a client going away does)."""
    seen: list[Sse] = []
    async with aconnect_sse(http, "GET", path, headers=headers, timeout=60) as source:
        assert source.response.status_code == 200, await source.response.aread()
        async for event in events_of(source):
            seen.append(event)
            if stop_after is not None and len(seen) >= stop_after:
                break
            if until is not None and event.event == until:
                break
    return seen


async def following(
    http: httpx.AsyncClient, path: str, headers: dict[str, str], count: int
) -> asyncio.Task[list[Sse]]:
    """Read `count` events in the background; returns once the stream is open (its 200 came,
    so the server has settled where it starts)."""
    opened = asyncio.Event()

    async def read() -> list[Sse]:
        seen: list[Sse] = []
        async with aconnect_sse(http, "GET", path, headers=headers, timeout=60) as source:
            assert source.response.status_code == 200, await source.response.aread()
            opened.set()
            async for event in events_of(source):
                seen.append(event)
                if len(seen) >= count:
                    break
        return seen

    task = asyncio.create_task(read())
    ready = asyncio.create_task(opened.wait())
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    if task.done():
        task.result()  # raises what went wrong
    return task
