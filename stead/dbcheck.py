"""What is wrong with a database URL, in one line that never shows its password.

The `stead` commands check the URL they were given before they start (a process that cannot
reach its database would otherwise end in a traceback, or, for the API, in uvicorn's).
Messages name the host and port, never the URL: parsers quote the text they choke on, and in
a URL like `postgresql://user:secret/db` the password sits where the port should be.
"""

from __future__ import annotations

import socket
from urllib.parse import parse_qs, urlsplit

import asyncpg

CONNECT_TIMEOUT = 10.0


def url_problem(url: str) -> str | None:
    """Why `url` is not a PostgreSQL URL, or None."""
    try:
        parts = urlsplit(url)
        if "," not in parts.netloc:  # asyncpg also takes host1:port1,host2:port2
            _ = parts.port
    except ValueError:
        return "is not a valid URL (postgresql://user:password@host:port/database)"
    if parts.scheme not in ("postgresql", "postgres"):
        return "must start with postgresql:// or postgres://"
    return None


def _where(url: str) -> str:
    parts = urlsplit(url)
    socket_dir = parse_qs(parts.query).get("host")
    if socket_dir:
        return f"the socket in {socket_dir[0]}"
    if "," in parts.netloc:
        return parts.netloc.rpartition("@")[2]
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}"


async def connect_problem(url: str) -> str | None:
    """Connect once; why that failed, or None. `url` must have passed `url_problem`."""
    try:
        conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT)
    except (
        OSError,
        TimeoutError,
        ValueError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
    ) as exc:
        return _describe(exc, _where(url))
    await conn.close()
    return None


# The first entry whose type matches says what went wrong. asyncpg's and the server's words
# ({detail}) name hosts, ports and users, never the URL; a ValueError's may quote the URL.
_REASONS: list[tuple[type[Exception], str]] = [
    (socket.gaierror, "cannot resolve the host of {where}"),
    (TimeoutError, "PostgreSQL at {where} did not answer within {timeout:.0f}s"),
    (ConnectionRefusedError, "PostgreSQL at {where} refused the connection (is it running?)"),
    (FileNotFoundError, "no PostgreSQL listens on {where}"),
    (asyncpg.PostgresError, "PostgreSQL at {where} refused the login: {detail}"),
    (ValueError, "the URL has a part the PostgreSQL client cannot parse (sslmode?)"),
    (Exception, "cannot reach PostgreSQL at {where}: {detail}"),
]


def _describe(exc: Exception, where: str) -> str:
    template = next(text for kind, text in _REASONS if isinstance(exc, kind))
    return template.format(where=where, timeout=CONNECT_TIMEOUT, detail=_first_line(exc))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


async def database_problem(url: str, variable: str) -> str | None:
    """Why a process cannot use the database at `url` (named by `variable`), or None."""
    if (problem := url_problem(url)) is not None:
        return f"{variable} {problem}"
    if (problem := await connect_problem(url)) is not None:
        return f"{variable}: {problem}"
    return None
