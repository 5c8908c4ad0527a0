"""Run an ASGI app on an ephemeral loopback port for the duration of a test.

Tests talk to real HTTP servers rather than patched functions, so what they prove holds for the
wire protocol too: headers, status codes, serialisation and concurrent connections.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.types import ASGIApp

from stead.serving import serving


@contextlib.asynccontextmanager
async def serve_app(app: ASGIApp) -> AsyncIterator[str]:
    """Serve `app` on 127.0.0.1 at a free port; yield its base URL, e.g. `http://127.0.0.1:41234`."""
    async with serving(app) as url:
        yield url
