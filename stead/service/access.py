"""Who may do what, and how much: the checks every operation makes, whatever front calls it.

`Services` is what an operation may use, built once as the process starts; `require` refuses a
caller whose roles lack a right; `enforce` and `admit_start` charge the plan's request limits;
`attest` signs a decision or cancel once the caller's authorization passed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from temporalio.client import Client

from stead import metrics
from stead.app import Runtime
from stead.config import Settings
from stead.contract import ApprovalPolicy, CancelInput, DecideInput
from stead.policy.limits import Action, LimitPolicy, Rate
from stead.policy.permissions import PLATFORM_RIGHT_PREFIX, PLATFORM_TENANT, PermissionPolicy
from stead.service.errors import Conflict, Forbidden, RateLimited, Unavailable
from stead.store import approvals as approvals_store
from stead.store import ratelimits
from stead.store.audit import AuditWriter
from stead.store.db import Pool
from stead.store.principals import Principal


@dataclass
class Services:
    """What every request may use: built once, as the process starts."""

    settings: Settings
    temporal: Client
    pool: Pool
    runtime: Runtime
    audit: AuditWriter
    # None: the limits of the runtime's policies. Tests pass their own.
    limit_policy: LimitPolicy | None = None

    def __post_init__(self) -> None:
        self.limits = self.limit_policy or self.runtime.policies.limits

    @property
    def permissions(self) -> PermissionPolicy:
        return self.runtime.policies.permissions


AttestedT = TypeVar("AttestedT", DecideInput, CancelInput)


def attest(svc: Services, workflow_id: str, message: AttestedT) -> AttestedT:
    """Sign a decision or cancel after the caller's authorization passed (see stead.attest)."""
    attestor = svc.settings.attestor
    if attestor is None:
        raise Unavailable(
            "decisions need attestation keys: set STEAD_PAYLOAD_KEYS or STEAD_ATTESTATION_KEYS"
        )
    return message.model_copy(update={"attestation": attestor.sign(workflow_id, message.claim())})


def require(svc: Services, principal: Principal, right: str) -> None:
    """403 unless the caller's roles grant `right`. A platform right counts only for a member
    of the platform tenant: a role that reached a customer tenant's user by any path (an old
    row, a hand edit) still reaches no other tenant."""
    platform_only = right.startswith(PLATFORM_RIGHT_PREFIX)
    if (platform_only and principal.tenant != PLATFORM_TENANT) or not svc.permissions.has_right(
        principal.roles, right
    ):
        metrics.PERMISSION_DENIALS.labels("api", right).inc()
        raise Forbidden(f"this action needs the right {right!r}, which your roles do not grant")


async def admit(
    svc: Services, principal: Principal, key_id: str, action: Action, right: str
) -> None:
    """A write of `action`: the caller holds `right` and is within the plan's limits (429
    otherwise). The right is checked first, so a caller refused anyway spends none of the
    allowance the tenant's real callers need."""
    require(svc, principal, right)
    await enforce(svc, principal, key_id, action)


async def enforce(svc: Services, principal: Principal, key_id: str, action: Action) -> None:
    """Charge one request of `action` to the caller's key and tenant, or refuse it (429)."""
    if not svc.limits.enforced(action):
        return
    async with svc.pool.acquire() as conn:
        verdict = await ratelimits.admit(
            conn, principal.tenant, action, key_id, svc.limits.for_store(action)
        )
    _refuse_unless_admitted(svc, verdict, action)


async def admit_start(
    svc: Services, principal: Principal, key_id: str, pipeline: str, *, with_cap: bool = True
) -> tuple[str, dict[str, ApprovalPolicy]]:
    """The plan and approval-policy overrides a new run of `pipeline` starts with, once the
    plan's limits admit it: 429 over a rate, 409 (`approval_backlog`) at the cap on runs
    waiting for approval. One round trip, the read every start makes anyway."""
    async with svc.pool.acquire() as conn:
        if not svc.limits.enforced("runs.start", with_cap=with_cap):
            return await approvals_store.start_settings(conn, principal.tenant, pipeline)
        limits = svc.limits.for_store("runs.start", with_cap=with_cap)
        verdict, overrides = await ratelimits.admit_start(
            conn, principal.tenant, pipeline, key_id, limits
        )
    _refuse_unless_admitted(svc, verdict, "runs.start")
    return verdict.plan, overrides


def _refuse_unless_admitted(svc: Services, verdict: ratelimits.Verdict, action: Action) -> None:
    if verdict.admitted:
        return
    limits = svc.limits.plan(verdict.plan).of(action)
    if verdict.refused_by == "awaiting_approval":
        # 409, not 429: waiting does not clear it, a person deciding does. A 429 would send
        # clients that retry on Retry-After into a loop no delay can end.
        raise Conflict(
            f"{limits.max_runs_awaiting_approval} of this tenant's runs are waiting for"
            " approval, the most its plan allows; decide some before starting more",
            code="approval_backlog",
        )
    by_key = verdict.refused_by == "key"
    raise RateLimited(
        f"{'this API key' if by_key else 'this tenant'} is over its {action} limit"
        f" ({_rate(limits.per_key if by_key else limits.per_tenant)});"
        f" retry in {verdict.retry_after:.1f} s",
        retry_after=verdict.retry_after,
    )


def _rate(rate: Rate | None) -> str:
    return f"{rate.burst} at once, then {rate.per_second:g} a second" if rate else "no limit"
