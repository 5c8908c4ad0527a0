"""What an event carries: `{"type", "timestamp", "data"}`, as Standard Webhooks suggests.

Built from the audit entry the event came from (as stored: redacted), and only from facts:
ids, statuses, counts, cost. Never content: no input, output, proposal, comment or error
message, which may hold customer data the receiver's logs should not. A receiver that needs
the result reads `GET /v1/runs/{run_id}` with its own key, under its own rights.

The body is a pure function of the stored entry, so every attempt and every re-delivery of an
event sends the same bytes (only `webhook-timestamp` and the signature change).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

Data = Mapping[str, Any]


def _usd(data: Data) -> float:
    return round(int(data.get("cost_nusd") or 0) / 1e9, 9)


def _completed(data: Data, actor: str) -> dict[str, Any]:
    return {
        "outcome": data.get("outcome"),
        "cost_usd": _usd(data),
        "model_calls": data.get("model_calls"),
    }


def _failed(data: Data, actor: str) -> dict[str, Any]:
    return {
        "error_type": data.get("error_type"),
        "stage": data.get("stage"),
        "cost_usd": _usd(data),
    }


def _requested(data: Data, actor: str) -> dict[str, Any]:
    return {
        "approval_id": data.get("approval_id"),
        "kind": data.get("kind"),
        "roles": data.get("roles"),
        "quorum": data.get("quorum"),
        "deadline_at": data.get("deadline_at"),
    }


def _decided(data: Data, actor: str) -> dict[str, Any]:
    return {
        "approval_id": data.get("approval_id"),
        "decision": data.get("decision"),
        "status": data.get("status"),
        "decided_by": actor,
        "approvals": data.get("approvals"),
        "quorum": data.get("quorum"),
    }


_FIELDS: dict[str, Callable[[Data, str], dict[str, Any]]] = {
    "run.completed": _completed,
    "run.failed": _failed,
    "approval.requested": _requested,
    "approval.decided": _decided,
}


def body(
    event_type: str,
    at: datetime,
    run_id: str | None,
    actor: str,
    entry_data: str,
    run_started: str | None,
) -> str:
    """The JSON body of an event, from its audit entry's stored (redacted) data and the run's
    `run.started` entry (which names the pipeline)."""
    data = json.loads(entry_data)
    pipeline = json.loads(run_started).get("pipeline") if run_started else None
    payload = {
        "type": event_type,
        "timestamp": at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "data": {"run_id": run_id, "pipeline": pipeline, **_FIELDS[event_type](data, actor)},
    }
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
