"""Audit entries an operation writes in the caller's name (an admin's change, a schedule's)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from stead.contract import AuditEvent
from stead.store.principals import Principal


def by_caller(principal: Principal, action: str, data: dict[str, Any]) -> AuditEvent:
    """An entry of `action` by the caller, now; its key is new for every call (each call is
    one change, recorded once by the transaction that makes it)."""
    return AuditEvent(
        key=f"{action}:{uuid.uuid4().hex}",
        tenant=principal.tenant,
        actor=principal.id,
        actor_kind="user",
        action=action,
        at=datetime.now(UTC),
        data=data,
    )
