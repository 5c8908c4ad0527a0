"""The simulator's Message Batches: what a batch holds and how it moves through its life.

The HTTP endpoints are in `stead.sim.messages` (create, retrieve, results, cancel, under
`/v1/messages/batches`); this module keeps the state. A batch is `in_progress` for the
configured delay (`SimConfig.batch_delay_seconds`), then every request is processed at once,
exactly as `/v1/messages` would answer it (batch usage, prompt cache included) or with a
per-request error, and the batch has `ended`. A cancel before then ends it with every request
`canceled`; processing is never partial, so a result is either in or not.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

MAX_REQUESTS = 100_000
EXPIRES_AFTER = timedelta(hours=24)
_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
RESULT_KINDS = ("succeeded", "errored", "canceled", "expired")

# The answer for one request's params: {"type": "succeeded", "message": ...} or an error kind.
Process = Callable[[dict[str, Any]], dict[str, Any]]


class BatchRefused(ValueError):
    """A create body upstream would refuse as a whole (400)."""


@dataclass
class Batch:
    id: str
    api_key: str
    created_at: datetime
    due: float  # monotonic time its requests are processed
    requests: list[tuple[str, dict[str, Any]]]
    cancel_initiated_at: datetime | None = None
    ended_at: datetime | None = None
    results: list[dict[str, Any]] | None = None

    @property
    def status(self) -> str:
        if self.ended_at is not None:
            return "ended"
        return "canceling" if self.cancel_initiated_at is not None else "in_progress"

    def view(self, base_url: str) -> dict[str, Any]:
        counts = dict.fromkeys(RESULT_KINDS, 0)
        for result in self.results or []:
            counts[result["result"]["type"]] += 1
        ended = self.ended_at is not None
        return {
            "id": self.id,
            "type": "message_batch",
            "processing_status": self.status,
            "request_counts": {"processing": 0 if ended else len(self.requests), **counts},
            "created_at": self.created_at.isoformat(),
            "expires_at": (self.created_at + EXPIRES_AFTER).isoformat(),
            "ended_at": self.ended_at.isoformat() if self.ended_at else None,
            "cancel_initiated_at": (
                self.cancel_initiated_at.isoformat() if self.cancel_initiated_at else None
            ),
            "archived_at": None,
            "results_url": f"{base_url}v1/messages/batches/{self.id}/results" if ended else None,
        }


@dataclass
class BatchStore:
    batches: dict[str, Batch] = field(default_factory=dict)
    created: int = 0
    requests: int = 0
    canceled: int = 0

    def create(self, api_key: str, body: dict[str, Any], now: float, delay: float) -> Batch:
        requests = _requests(body)
        self.created += 1
        self.requests += len(requests)
        digest = hashlib.sha256(f"{self.created}:{api_key}:{now}".encode()).hexdigest()
        batch = Batch(
            id=f"msgbatch_sim_{digest[:24]}",
            api_key=api_key,
            created_at=datetime.now(UTC),
            due=now + delay,
            requests=requests,
        )
        self.batches[batch.id] = batch
        return batch

    def find(self, api_key: str, batch_id: str) -> Batch | None:
        """A batch of this key's (another key's batch is as missing as an unknown one)."""
        batch = self.batches.get(batch_id)
        return batch if batch is not None and batch.api_key == api_key else None

    def advance(self, batch: Batch, now: float, process: Process) -> None:
        """Process the batch once it is due, or end a cancelled one with nothing processed."""
        if batch.ended_at is not None:
            return
        if batch.cancel_initiated_at is not None:
            batch.results = [_result(cid, {"type": "canceled"}) for cid, _ in batch.requests]
            batch.ended_at = datetime.now(UTC)
            return
        if now < batch.due:
            return
        batch.results = [_result(cid, process(params)) for cid, params in batch.requests]
        batch.ended_at = datetime.now(UTC)

    def cancel(self, batch: Batch) -> None:
        if batch.ended_at is None and batch.cancel_initiated_at is None:
            batch.cancel_initiated_at = datetime.now(UTC)
            self.canceled += 1

    def clear(self) -> None:
        self.batches.clear()
        self.created = self.requests = self.canceled = 0


def _requests(body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    raw = body.get("requests")
    if not isinstance(raw, list) or not raw:
        raise BatchRefused("requests: field required (a non-empty list)")
    if len(raw) > MAX_REQUESTS:
        raise BatchRefused(f"requests: at most {MAX_REQUESTS:,} per batch")
    found: list[tuple[str, dict[str, Any]]] = []
    seen: set[str] = set()
    for index, item in enumerate(raw):
        custom_id = item.get("custom_id") if isinstance(item, dict) else None
        params = item.get("params") if isinstance(item, dict) else None
        if not isinstance(custom_id, str) or not _CUSTOM_ID.match(custom_id):
            raise BatchRefused(f"requests.{index}.custom_id: must match {_CUSTOM_ID.pattern}")
        if custom_id in seen:
            raise BatchRefused(f"requests.{index}.custom_id: {custom_id!r} is not unique")
        if not isinstance(params, dict):
            raise BatchRefused(f"requests.{index}.params: field required (an object)")
        seen.add(custom_id)
        found.append((custom_id, params))
    return found


def _result(custom_id: str, result: dict[str, Any]) -> dict[str, Any]:
    return {"custom_id": custom_id, "result": result}
