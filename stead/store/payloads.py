"""Claim-check for Temporal payloads: large ones live in PostgreSQL, histories hold a hash.

A storage driver for the Temporal SDK's external storage. The SDK calls it after the payload
codec, so what is stored is already encrypted; the history keeps a small reference with the
payload's SHA-256. An agent conversation whose every turn re-sends the whole transcript would
otherwise grow its history quadratically toward Temporal's limits; with the claim-check each
turn adds a small, constant amount, and identical payloads are stored once.

Each process keeps the payloads it stored or fetched lately in memory (bounded by bytes). The
address is the content's hash, so a cached copy can never be stale: an activity that runs in
the worker that scheduled it, or a run replayed soon after, costs no database round trip.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Collection, Iterable, Iterator, Sequence
from datetime import timedelta
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from temporalio.api.common.v1 import Payload
from temporalio.api.sdk.v1 import ExternalStorageReference
from temporalio.converter import (
    StorageDriver,
    StorageDriverClaim,
    StorageDriverRetrieveContext,
    StorageDriverStoreContext,
)

from stead.store.db import Conn, Pool
from stead.store.recent import Recent

_DRIVER = "stead-postgres"
_REFERENCE_TYPE = ExternalStorageReference.DESCRIPTOR.full_name.encode()
# The SDK marks references it has passed through the codec with this metadata key.
_REFERENCE_MARKER = "__temporal_external_storage_reference"


class PayloadMissing(Exception):
    """A referenced payload is not in the store (collected too early, or another database)."""


class PostgresPayloadStore(StorageDriver):
    def __init__(self, pool: Pool, *, recent_bytes: int = 16 << 20) -> None:
        self._pool = pool
        self._recent: Recent[bytes, bytes] = Recent(recent_bytes, len)

    def name(self) -> str:
        return _DRIVER

    async def store(
        self, context: StorageDriverStoreContext, payloads: Sequence[Payload]
    ) -> list[StorageDriverClaim]:
        blobs = [p.SerializeToString() for p in payloads]
        digests = [hashlib.sha256(b).digest() for b in blobs]
        async with self._pool.acquire() as conn:
            # Stored again: its age restarts, since a history of today now references it.
            await conn.executemany(
                "INSERT INTO payload_store (sha256, data, size) VALUES ($1, $2, $3)"
                " ON CONFLICT (sha256) DO UPDATE SET created_at = now()",
                [(d, b, len(b)) for d, b in zip(digests, blobs, strict=True)],
            )
        for digest, blob in zip(digests, blobs, strict=True):
            self._recent.put(digest, blob)
        # Base64 rather than hex: the claim is written into the history at every offloaded step.
        return [StorageDriverClaim({"h": base64.urlsafe_b64encode(d).decode()}) for d in digests]

    async def retrieve(
        self, context: StorageDriverRetrieveContext, claims: Sequence[StorageDriverClaim]
    ) -> list[Payload]:
        digests = [_digest(c) for c in claims]
        found = {d: blob for d in digests if (blob := self._recent.get(d)) is not None}
        missing = [d for d in digests if d not in found]
        if missing:
            async with self._pool.acquire() as conn:
                rows = await conn.fetch(
                    "SELECT sha256, data FROM payload_store WHERE sha256 = ANY($1)", missing
                )
            for row in rows:
                digest, blob = bytes(row["sha256"]), bytes(row["data"])
                # The hash is the address and the integrity check: a changed row is refused.
                if hashlib.sha256(blob).digest() == digest:
                    found[digest] = blob
                    self._recent.put(digest, blob)
        payloads = []
        for digest in digests:
            blob = found.get(digest)
            if blob is None:
                raise PayloadMissing(f"payload {digest.hex()[:16]}... is missing or altered")
            payload = Payload()
            payload.ParseFromString(blob)
            payloads.append(payload)
        return payloads


def _digest(claim: StorageDriverClaim) -> bytes:
    data = claim.claim_data
    if "h" in data:
        return base64.urlsafe_b64decode(data["h"])
    return bytes.fromhex(data["sha256"])  # references written before the shorter form


def claim_digest(payload: Payload) -> bytes | None:
    """The digest a claim-check reference (as the SDK writes it into a history) points at in
    this store; None for any other payload. Raises ValueError for a reference that cannot be
    read (what it points at cannot be shown to be unreferenced)."""
    try:
        return _claim_digest(payload)
    except (json_format.ParseError, KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ValueError(f"unreadable claim-check reference ({type(exc).__name__})") from None


def _claim_digest(payload: Payload) -> bytes | None:
    encoding = payload.metadata.get("encoding")
    if encoding == b"json/protobuf" and payload.metadata.get("messageType") == _REFERENCE_TYPE:
        reference = json_format.Parse(payload.data, ExternalStorageReference())
        driver, claim = reference.driver_name, dict(reference.claim_data)
    elif encoding == b"json/external-storage-reference":  # the SDK's earlier form
        legacy = json.loads(payload.data)
        driver, claim = legacy.get("driver_name"), legacy.get("driver_claim", {}).get("claim_data")
    elif payload.metadata.get(_REFERENCE_MARKER) == b"true":
        # A codec-encoded reference (a later SDK's option): unreadable here, so whatever it
        # points at cannot be shown to be unreferenced.
        raise ValueError("an encoded claim-check reference")
    else:
        return None
    if driver != _DRIVER:
        return None
    return _digest(StorageDriverClaim(claim))


def referenced(message: Message) -> set[bytes]:
    """Digests of every payload of this store that `message` (a history event, anything
    holding payloads at any depth) references."""
    found: set[bytes] = set()
    for payload in payloads_in(message):
        digest = claim_digest(payload)
        if digest is not None:
            found.add(digest)
    return found


def payloads_in(message: Message) -> Iterator[Payload]:
    """Every payload `message` holds, at any depth (maps of payloads included)."""
    if isinstance(message, Payload):
        yield message
        return
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            if field.message_type.fields_by_name["value"].message_type is None:
                continue
            items: Iterable[Any] = value.values()
        else:
            items = value if field.is_repeated else [value]
        for item in items:
            yield from payloads_in(item)


async def collect(conn: Conn, older_than: timedelta, keep: Collection[bytes] = ()) -> int:
    """Delete stored payloads last stored more than `older_than` ago, except `keep` (those a
    history still references). `stead payloads gc` decides both: see stead/payload_gc.py."""
    done = await conn.execute(
        "DELETE FROM payload_store WHERE created_at < now() - $1::interval"
        " AND NOT sha256 = ANY($2::bytea[])",
        older_than,
        list(keep),
    )
    return int(done.split()[-1])
