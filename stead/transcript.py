"""Links of a conversation's items: what a workflow and the gateway agree a prefix is.

A model call's conversation is its preamble (system prompt and tools) followed by its
messages. Pure and deterministic, so workflows compute links (see stead.store.conversations
for how conversations are stored): `link_0` is 32 zero bytes and `link_i` is
SHA-256(`link_{i-1}` || SHA-256(`canonical(item_i)`)), so a link names an item and everything
before it.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

# Below this many bytes of preamble and messages a call carries them inline, as before: a
# short exchange is cheaper in the history than a database write. Fixed, not a setting: the
# workflow decides by it, and a run must decide the same way on every replay.
INLINE_BYTES = 4096
ZERO = bytes(32)


def preamble(system: str | None, tools: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What a call says before its messages, stored as a conversation's first item: the same
    at every turn of an agent, so stored once too."""
    return {"system": system, "tools": list(tools)}


def canonical(item: Mapping[str, Any]) -> bytes:
    """The bytes an item is linked and stored as: ASCII JSON with sorted keys, the same on
    every machine and every replay whatever it holds. TypeError for a value JSON cannot hold,
    ValueError for NaN or infinity (which a payload would not carry as they are)."""
    return json.dumps(
        item, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def extend(link: bytes, encoded: bytes) -> bytes:
    """The link of the message `encoded` placed after the prefix whose link is `link`."""
    return hashlib.sha256(link + hashlib.sha256(encoded).digest()).digest()


def links(encoded: Sequence[bytes], start: bytes = ZERO) -> list[bytes]:
    """The link of each message of `encoded`, placed after the prefix whose link is `start`."""
    out: list[bytes] = []
    link = start
    for item in encoded:
        link = extend(link, item)
        out.append(link)
    return out


def text_of(link: bytes) -> str:
    """A link as a call carries it ("" for the empty prefix)."""
    return base64.urlsafe_b64encode(link).decode("ascii") if link != ZERO else ""


def link_of(text: str) -> bytes:
    """The link `text_of` wrote; ValueError for anything else."""
    if not text:
        return ZERO
    link = base64.urlsafe_b64decode(text.encode("ascii"))
    if len(link) != len(ZERO):
        raise ValueError("not a link")
    return link
