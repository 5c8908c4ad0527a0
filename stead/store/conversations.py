"""Conversations stored once: a model call's transcript as a chain of stored messages.

An agent re-sends its whole transcript at every turn. Carried in each model call's input, the
transcript was stored again at every turn (in the history, or through the claim-check in
`payload_store`): stored bytes quadratic in the conversation's length. From workflow revision
3, a call whose messages reach `INLINE_BYTES` carries instead the link of the longest prefix an
earlier call of the run stored, and only the messages after it. The gateway resolves the
prefix from `conversation_messages`, stores the new messages as the chain's next links, and
calls the model with the whole transcript: each message is stored once per run.

A message's link chains it onto its prefix: `link_0` is 32 zero bytes and `link_i` is
SHA-256(`link_{i-1}` || SHA-256(canonical JSON of message i)). The workflow computes links (pure
and deterministic); the gateway recomputes them over every message it resolves, so a row
changed in the database is refused, never sent to the model. With payload keys configured, a
row holds its message sealed (AES-GCM, bound to its run and row) under a row key that is an
HMAC of the link: the database alone can neither read a message nor confirm a guess of one.
Rows belong to a workflow id (a re-drive's run shares its base's rows) and `stead payloads gc`
deletes them once no history of that workflow id can be replayed.

Each worker keeps the links it stored or resolved lately in memory (bounded by bytes): a link
names its content, so a cached copy is never stale, and an agent's next turn on the same worker
resolves its prefix without reading the database.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from stead.crypto import Sealer, SealError
from stead.store.db import Conn, Pool
from stead.store.recent import Recent
from stead.transcript import ZERO, canonical, extend, link_of

_HMAC_LABEL = b"stead conversation row key v1"
# A chain longer than this is refused rather than walked (a model's context is far shorter).
MAX_DEPTH = 100_000


class ConversationMissing(Exception):
    """A call's stored prefix cannot be resolved: rows collected, altered, or in another
    database."""


class ConversationUnreadable(Exception):
    """A stored message is sealed under a key this worker does not have: a deployment to fix
    (every worker needs every payload key in use), not a run to fail."""


def _link_of(text: str) -> bytes:
    try:
        return link_of(text)
    except (ValueError, UnicodeEncodeError):
        raise ConversationMissing("the call's conversation prefix is not a link") from None


@dataclass(frozen=True)
class _Link:
    row: bytes  # the row's key
    parent: bytes  # the previous message's link (ZERO for a first message)
    encoded: bytes


class ConversationStore:
    def __init__(
        self,
        pool: Pool,
        keys: Sequence[tuple[str, bytes]] = (),
        *,
        recent_bytes: int = 16 << 20,
    ) -> None:
        self._pool = pool
        self._sealer = Sealer(keys) if keys else None
        self._key_ids = {key_id for key_id, _ in keys}
        # Every configured key can find a row (written before a rotation); the first names new ones.
        self._row_keys = [hmac.new(k, _HMAC_LABEL, hashlib.sha256).digest() for _, k in keys]
        self._recent: Recent[tuple[str, bytes], _Link] = Recent(
            recent_bytes, lambda link: len(link.encoded)
        )

    def _row_candidates(self, link: bytes) -> list[bytes]:
        if not self._row_keys:
            return [link]
        return [hmac.new(k, link, hashlib.sha256).digest() for k in self._row_keys]

    async def resolve(
        self, workflow_id: str, prefix: str, length: int, messages: Sequence[Mapping[str, Any]]
    ) -> list[dict[str, Any]]:
        """The whole transcript: the `length` stored messages ending at link `prefix`, then
        `messages`, which are stored as the chain's next links (idempotent: a retried attempt
        finds them there)."""
        head = _link_of(prefix)
        if not 0 <= length <= MAX_DEPTH or (head == ZERO) != (length == 0):
            raise ConversationMissing("the call's conversation prefix is malformed")
        chain = await self._prefix(workflow_id, head, length)
        new = [canonical(m) for m in messages]
        await self._keep(workflow_id, head, chain[-1].row if chain else None, length, new)
        return [json.loads(item.encoded) for item in chain] + [dict(m) for m in messages]

    async def _prefix(self, workflow_id: str, head: bytes, length: int) -> list[_Link]:
        """The links from the first message to `head`, checked against it."""
        found: list[_Link] = []
        at = head
        while at != ZERO and (cached := self._recent.get((workflow_id, at))) is not None:
            found.append(cached)
            at = cached.parent
        if at != ZERO:
            found.extend(await self._fetch(workflow_id, at, length - len(found)))
        found.reverse()
        # Each remembered link was computed from its content, each fetched one checked in
        # `_fetch`: the chain ends at `head` by construction; only its length is the call's.
        if len(found) != length:
            raise ConversationMissing(
                f"workflow {workflow_id}: the stored conversation has {len(found)} items,"
                f" the call says {length}"
            )
        return found

    async def _fetch(self, workflow_id: str, head: bytes, length: int) -> list[_Link]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "WITH RECURSIVE chain AS ("
                " SELECT row_key, parent, depth, data FROM conversation_messages"
                "  WHERE workflow_id = $1 AND row_key = ANY($2::bytea[]) AND depth = $3"
                " UNION ALL"
                " SELECT m.row_key, m.parent, m.depth, m.data"
                "  FROM conversation_messages m JOIN chain c"
                "  ON m.workflow_id = $1 AND m.row_key = c.parent AND m.depth = c.depth - 1"
                ") SELECT row_key, parent, data FROM chain ORDER BY depth",
                workflow_id,
                self._row_candidates(head),
                length,
            )
        if len(rows) != length:
            raise ConversationMissing(
                f"workflow {workflow_id}: {length - len(rows)} stored messages are missing"
            )
        out: list[_Link] = []
        parent = ZERO
        for row in rows:
            encoded = self._open(workflow_id, bytes(row["row_key"]), bytes(row["data"]))
            link = extend(parent, encoded)
            item = _Link(row=bytes(row["row_key"]), parent=parent, encoded=encoded)
            out.append(item)
            self._recent.put((workflow_id, link), item)
            parent = link
        if parent != head:
            raise ConversationMissing(
                f"workflow {workflow_id}: a stored conversation does not match its link"
            )
        out.reverse()
        return out

    async def _keep(
        self,
        workflow_id: str,
        head: bytes,
        head_row: bytes | None,
        depth: int,
        new: Sequence[bytes],
    ) -> None:
        rows: list[tuple[str, bytes, bytes | None, int, bytes]] = []
        parent, parent_row = head, head_row
        for offset, encoded in enumerate(new, start=1):
            link = extend(parent, encoded)
            row = self._row_candidates(link)[0]
            rows.append(
                (
                    workflow_id,
                    row,
                    parent_row,
                    depth + offset,
                    self._seal(workflow_id, row, encoded),
                )
            )
            self._recent.put((workflow_id, link), _Link(row=row, parent=parent, encoded=encoded))
            parent, parent_row = link, row
        if not rows:
            return
        async with self._pool.acquire() as conn:
            await conn.executemany(
                "INSERT INTO conversation_messages (workflow_id, row_key, parent, depth, data)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                rows,
            )

    def _seal(self, workflow_id: str, row: bytes, encoded: bytes) -> bytes:
        if self._sealer is None:
            return encoded
        return self._sealer.seal(encoded, _bound(workflow_id, row))

    def _open(self, workflow_id: str, row: bytes, data: bytes) -> bytes:
        if self._sealer is None:
            return data
        if Sealer.key_id_of(data) not in self._key_ids:
            raise ConversationUnreadable(
                f"workflow {workflow_id}: a stored message is sealed under payload key"
                f" {Sealer.key_id_of(data)!r}, which this worker does not have"
            )
        try:
            return self._sealer.open(data, _bound(workflow_id, row))
        except SealError:
            raise ConversationMissing(
                f"workflow {workflow_id}: a stored message cannot be opened"
            ) from None


def _bound(workflow_id: str, row: bytes) -> bytes:
    return workflow_id.encode() + b"\0" + row


async def collect(conn: Conn, older_than: timedelta, keep_workflows: Sequence[str]) -> int:
    """Delete stored messages older than `older_than` of workflows none of whose histories
    `stead payloads gc` found replayable (see stead/payload_gc.py)."""
    done = await conn.execute(
        "DELETE FROM conversation_messages WHERE created_at < now() - $1::interval"
        " AND NOT workflow_id = ANY($2::text[])",
        older_than,
        list(keep_workflows),
    )
    return int(done.split()[-1])
