"""Dependencies for an application's own routes: the caller, and runs in the caller's name."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends
from pydantic import BaseModel, ValidationError

from stead.api.deps import ApiKeyId, CurrentPrincipal, ServicesDep
from stead.service import runs
from stead.service.access import Services
from stead.service.errors import Invalid
from stead.service.schemas import RunOut, RunStarted, RunSummary, StartRun
from stead.store.principals import Principal

_KEY = re.compile(r"[\x21-\x7e]{1,200}")

# The authenticated caller (401 before the handler runs without a valid API key).
Caller = CurrentPrincipal


@dataclass(frozen=True)
class RunOps:
    """Run operations as the caller: each checks the caller's rights and the plan's limits,
    exactly as `POST /v1/runs` and the other run routes do, and refuses with the same errors."""

    _svc: Services
    principal: Principal
    _key_id: str

    async def start(
        self,
        pipeline: str,
        input: BaseModel | Mapping[str, Any],
        *,
        idempotency_key: str | None = None,
        budget_usd: float | None = None,
    ) -> RunStarted:
        """Start a run; with an `idempotency_key` already used, the same run (`created` false)."""
        data = input.model_dump(mode="json") if isinstance(input, BaseModel) else dict(input)
        try:
            body = StartRun(pipeline=pipeline, input=data, budget_usd=budget_usd)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise Invalid(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        if idempotency_key is not None and not _KEY.fullmatch(idempotency_key):
            raise Invalid("idempotency_key: 1 to 200 printable ASCII characters, no spaces")
        return await runs.start_run(self._svc, self.principal, self._key_id, body, idempotency_key)

    async def get(self, run_id: str) -> RunOut:
        return await runs.get_run(self._svc, self.principal, run_id)

    async def cancel(self, run_id: str) -> RunSummary:
        return await runs.cancel_run(self._svc, self.principal, run_id)


def _run_ops(svc: ServicesDep, principal: CurrentPrincipal, key_id: ApiKeyId) -> RunOps:
    return RunOps(svc, principal, key_id)


Runs = Annotated[RunOps, Depends(_run_ops)]
