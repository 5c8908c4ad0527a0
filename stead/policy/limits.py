"""Request limits per tenant plan, from `limits.yaml` (or the file `STEAD_LIMITS_FILE` names).

The policy only says what the limits are; `store/ratelimits.py` enforces them in PostgreSQL,
where every API process shares them. `for_store(action)` is the form the store takes: the
limits of every plan for one action, so that one statement can pick the tenant's plan and
apply it.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

LIMITS_FILE = Path(__file__).parent / "defaults" / "limits.yaml"
Action = Literal["runs.start", "approvals.decide", "admin.write"]
ACTIONS: tuple[Action, ...] = ("runs.start", "approvals.decide", "admin.write")
DEFAULT_PLAN = "default"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Rate(_Strict):
    per_second: float = Field(gt=0, le=1_000_000, allow_inf_nan=False)
    burst: int = Field(ge=1, le=10_000_000)

    @property
    def interval(self) -> float:
        return 1 / self.per_second


class ActionLimits(_Strict):
    per_key: Rate | None = None
    per_tenant: Rate | None = None
    # Only for runs.start: refuse new runs while this many of the tenant's wait for a human.
    max_runs_awaiting_approval: int | None = Field(None, ge=1, le=10_000_000)

    def store_form(self, *, with_cap: bool) -> dict[str, Any]:
        form: dict[str, Any] = {}
        for scope, rate in (("key", self.per_key), ("tenant", self.per_tenant)):
            if rate is not None:
                form[scope] = {"interval": rate.interval, "burst": rate.burst}
        if with_cap and self.max_runs_awaiting_approval is not None:
            form["max_runs_awaiting_approval"] = self.max_runs_awaiting_approval
        return form


class PlanLimits(_Strict):
    runs_start: ActionLimits = Field(default_factory=ActionLimits, alias="runs.start")
    approvals_decide: ActionLimits = Field(default_factory=ActionLimits, alias="approvals.decide")
    admin_write: ActionLimits = Field(default_factory=ActionLimits, alias="admin.write")

    @model_validator(mode="after")
    def _cap_only_on_starts(self) -> PlanLimits:
        for limits in (self.approvals_decide, self.admin_write):
            if limits.max_runs_awaiting_approval is not None:
                raise ValueError("max_runs_awaiting_approval applies to runs.start only")
        return self

    def of(self, action: Action) -> ActionLimits:
        found: ActionLimits = getattr(self, action.replace(".", "_"))
        return found


class LimitPolicy(_Strict):
    plans: dict[str, PlanLimits]
    _store: dict[tuple[Action, bool], dict[str, dict[str, Any]]] = PrivateAttr()

    @model_validator(mode="after")
    def _has_default(self) -> LimitPolicy:
        if DEFAULT_PLAN not in self.plans:
            raise ValueError(f"limits need a {DEFAULT_PLAN!r} plan, used by plans without one")
        return self

    def model_post_init(self, context: Any, /) -> None:
        # Built once: the start path passes it on every request.
        self._store = {
            (action, cap): {
                plan: limits.of(action).store_form(with_cap=cap)
                for plan, limits in self.plans.items()
            }
            for action in ACTIONS
            for cap in (True, False)
        }

    def plan(self, name: str) -> PlanLimits:
        return self.plans.get(name) or self.plans[DEFAULT_PLAN]

    def for_store(self, action: Action, *, with_cap: bool = True) -> dict[str, dict[str, Any]]:
        """Every plan's limits for `action`, keyed by plan name, as `rate_limit_admit` reads
        them (see store/migrations/0009_rate_limits.sql)."""
        return self._store[(action, with_cap)]

    def enforced(self, action: Action, *, with_cap: bool = True) -> bool:
        """Whether any plan limits `action`; when none does, the check costs nothing."""
        return any(self.for_store(action, with_cap=with_cap).values())


@cache
def load_limits(path: Path = LIMITS_FILE) -> LimitPolicy:
    return LimitPolicy.model_validate(yaml.safe_load(path.read_text()))
