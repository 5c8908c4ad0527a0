"""Text PostgreSQL can store.

PostgreSQL refuses two things Python strings may hold: the NUL character (in `text`, and as
`\\u0000` in `jsonb`) and lone UTF-16 surrogates (asyncpg cannot encode them as UTF-8). Input
that carries them is refused at the API; what a model or a third party sends back cannot be
refused, so it is made storable here before anything writes it.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar, cast

T = TypeVar("T")

REPLACEMENT = "\ufffd"
# Every surrogate code point is lone in a Python str: a valid pair decodes to one code point.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable(value: T) -> T:
    """`value` with every NUL and lone surrogate in its strings (dict keys too) replaced by
    U+FFFD, the character Unicode reserves for "not representable"; other values as they are."""
    return cast(T, _clean(value))  # the same shape comes back


def unstorable_path(value: Any, path: str = "") -> str | None:
    """Where `value` holds text PostgreSQL cannot store, as a dotted path (`input.text`,
    `items[2]`); None when it holds none. The API refuses such input by name."""
    if isinstance(value, str):
        return (path or "value") if _UNSTORABLE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            found = unstorable_path(str(key), where) or unstorable_path(item, where)
            if found:
                return found
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = unstorable_path(item, f"{path}[{index}]")
            if found:
                return found
    return None


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return _UNSTORABLE.sub(REPLACEMENT, value)
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_clean(v) for v in value)
    return value
