"""Schedules: a pipeline run on a cron or an interval, started each time as its owner.

Each is a Temporal Schedule (`client.create_schedule`) with id `<tenant>:<schedule id>`, built
from the caller's tenant like a run's workflow id, so another tenant's schedule is not found.
Its action starts `stead.scheduled-run` (stead/builtin/schedules.py), which starts the run
through the service layer as the schedule's owner, under the owner's rights, limits and
budgets at that time. Creating one needs `schedules:manage` and `runs:start`; anyone with
`schedules:manage` in the tenant may read its schedules; pausing, resuming and deleting one
is for its owner or an admin (`runs:manage`). Every change is audited (`schedule.*`).
"""

from __future__ import annotations

import base64
import re
import secrets
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator
from temporalio.client import (
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleDescription,
    ScheduleHandle,
    ScheduleIntervalSpec,
    ScheduleListDescription,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleState,
)
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.service import RPCError, RPCStatusCode

from stead import search
from stead.builtin.schedules import ScheduledRunWorkflow
from stead.contract import MAX_BUDGET_USD
from stead.crypto import SealError
from stead.gateway.schedules import RIGHT, ScheduledRun, input_sealer, workflow_schedule_id
from stead.service.access import Services, require
from stead.service.audited import by_caller
from stead.service.errors import Conflict, Forbidden, Invalid, NotFound, Unavailable
from stead.service.runs import check_start
from stead.service.schemas import Request, StartRun
from stead.store import schedules as store
from stead.store.principals import Principal

SCHEDULE_ID = re.compile(r"^sch_[a-z2-7]{26}$")
# Schedules per tenant, counted from Temporal's visibility (which lags creation by a moment,
# so a burst of creates can pass it by the few in flight).
MAX_SCHEDULES = 100
Overlap = Literal["skip", "buffer_one", "buffer_all", "cancel_other", "allow_all"]
_OVERLAP = {
    "skip": ScheduleOverlapPolicy.SKIP,
    "buffer_one": ScheduleOverlapPolicy.BUFFER_ONE,
    "buffer_all": ScheduleOverlapPolicy.BUFFER_ALL,
    "cancel_other": ScheduleOverlapPolicy.CANCEL_OTHER,
    "allow_all": ScheduleOverlapPolicy.ALLOW_ALL,
}


class ScheduleIn(Request):
    pipeline: str = Field(min_length=1, max_length=64, examples=["summarize"])
    input: dict[str, Any] = Field(examples=[{"text": "Daily digest...", "review": False}])
    budget_usd: float | None = Field(None, gt=0, le=MAX_BUDGET_USD, description="cap per run")
    cron: str | None = Field(
        None, min_length=1, max_length=200, description="5 fields (`0 9 * * 1-5`) or @daily etc."
    )
    every_seconds: int | None = Field(None, ge=1, le=366 * 86_400)
    timezone: str | None = Field(
        None, max_length=64, pattern=r"^[A-Za-z0-9_+/-]+$", description="IANA name, for cron"
    )
    overlap: Overlap = Field(
        "skip",
        description="when a firing comes while the previous run still runs: skip it, buffer"
        " one (or all) until it ends, cancel the previous run, or allow both",
    )
    catchup_window_seconds: int = Field(
        300,
        ge=10,
        le=7 * 86_400,
        description="firings missed while Temporal was unavailable are made up if not older",
    )
    paused: bool = False
    note: str = Field("", max_length=500)

    @model_validator(mode="after")
    def _one_spec(self) -> ScheduleIn:
        if (self.cron is None) == (self.every_seconds is None):
            raise ValueError("give exactly one of cron and every_seconds")
        if self.timezone is not None and self.cron is None:
            raise ValueError("timezone goes with cron")
        return self


class NoteIn(Request):
    note: str = Field("", max_length=500)


class ScheduleStartOut(BaseModel):
    scheduled_at: datetime
    run_id: str | None
    refused: str | None = Field(None, description="why no run was started at that time")


class ScheduleSummary(BaseModel):
    schedule_id: str
    pipeline: str
    owner: str
    cron: str | None
    every_seconds: int | None
    timezone: str | None
    paused: bool
    note: str = Field(description="why it is paused (when Stead paused it, the reason)")
    next_runs: list[datetime]


class ScheduleOut(ScheduleSummary):
    overlap: Overlap
    input: dict[str, Any]
    budget_usd: float | None = None
    created_at: datetime | None
    skipped_overlapping: int = Field(0, description="firings skipped by the overlap policy")
    recent_starts: list[ScheduleStartOut] = Field(default_factory=list, description="newest first")


def _new_id() -> str:
    return "sch_" + base64.b32encode(secrets.token_bytes(20)).decode().lower()[:26]


def _spec(body: ScheduleIn) -> ScheduleSpec:
    if body.cron is not None:
        return ScheduleSpec(cron_expressions=[body.cron], time_zone_name=body.timezone)
    assert body.every_seconds is not None
    return ScheduleSpec(
        intervals=[ScheduleIntervalSpec(every=timedelta(seconds=body.every_seconds))]
    )


async def create(svc: Services, principal: Principal, body: ScheduleIn) -> ScheduleOut:
    require(svc, principal, RIGHT)
    require(svc, principal, "runs:start")
    check_start(svc, StartRun(pipeline=body.pipeline, input=body.input, budget_usd=body.budget_usd))
    if len(await _listed(svc, principal.tenant)) >= MAX_SCHEDULES:
        raise Conflict(f"a tenant may have at most {MAX_SCHEDULES} schedules")
    schedule_id = _new_id()
    full_id = workflow_schedule_id(principal.tenant, schedule_id)
    action = ScheduledRun(
        tenant=principal.tenant,
        schedule_id=schedule_id,
        owner=principal.id,
        pipeline=body.pipeline,
        watch=body.overlap != "allow_all",
        watch_max_seconds=svc.settings.schedule_watch_max_seconds,
    )
    async with svc.pool.acquire() as conn:
        await store.insert_schedule(
            conn,
            principal.tenant,
            schedule_id,
            input_sealer(svc.settings),
            store.Definition(principal.id, body.pipeline, body.input, body.budget_usd),
        )
    try:
        await svc.temporal.create_schedule(
            full_id,
            Schedule(
                action=ScheduleActionStartWorkflow(
                    ScheduledRunWorkflow.run,
                    action,
                    id=f"{full_id}:run",
                    task_queue=svc.settings.task_queue,
                ),
                spec=_spec(body),
                policy=SchedulePolicy(
                    overlap=_OVERLAP[body.overlap],
                    catchup_window=timedelta(seconds=body.catchup_window_seconds),
                ),
                state=ScheduleState(paused=body.paused, note=body.note),
            ),
            memo={
                "cron": body.cron,
                "every_seconds": body.every_seconds,
                "timezone": body.timezone,
            },
            search_attributes=TypedSearchAttributes(
                [
                    SearchAttributePair(search.CUSTOMER, principal.tenant),
                    SearchAttributePair(search.REQUESTED_BY, principal.id),
                    SearchAttributePair(search.PIPELINE, body.pipeline),
                ]
            ),
        )
    except RPCError as exc:
        async with svc.pool.acquire() as conn:
            await store.forget(conn, principal.tenant, schedule_id)
        if exc.status is RPCStatusCode.INVALID_ARGUMENT:
            raise Invalid(f"schedule: {exc.message}") from None
        raise
    data = {"pipeline": body.pipeline, "cron": body.cron, "every_seconds": body.every_seconds}
    await _audit(svc, principal, schedule_id, "schedule.created", {**data, "overlap": body.overlap})
    return await describe(svc, principal, schedule_id)


async def _listed(svc: Services, tenant: str) -> list[ScheduleListDescription]:
    found = await svc.temporal.list_schedules(
        query=f"CustomerId = '{tenant}'", page_size=MAX_SCHEDULES
    )
    listed: list[ScheduleListDescription] = []
    async for entry in found:
        listed.append(entry)
        if len(listed) >= MAX_SCHEDULES:
            break
    return listed


async def list_schedules(svc: Services, principal: Principal) -> list[ScheduleSummary]:
    """The tenant's schedules, from Temporal's visibility (a schedule created a moment ago may
    be missing for that moment; `GET /v1/schedules/{id}` reads it directly)."""
    require(svc, principal, RIGHT)
    return [await _summary(entry) for entry in await _listed(svc, principal.tenant)]


async def _summary(entry: ScheduleListDescription) -> ScheduleSummary:
    memo = await entry.memo()
    attrs = entry.typed_search_attributes
    state = entry.schedule.state if entry.schedule else None
    paused = bool(state and state.paused)
    return ScheduleSummary(
        schedule_id=entry.id.split(":", 1)[1],
        pipeline=attrs.get(search.PIPELINE) or "",
        owner=attrs.get(search.REQUESTED_BY) or "",
        cron=memo.get("cron"),
        every_seconds=memo.get("every_seconds"),
        timezone=memo.get("timezone"),
        paused=paused,
        note=(state.note if state else "") or "",
        next_runs=list(entry.info.next_action_times[:5]) if entry.info and not paused else [],
    )


async def _handle(
    svc: Services, principal: Principal, schedule_id: str
) -> tuple[ScheduleHandle, ScheduleDescription]:
    if not SCHEDULE_ID.match(schedule_id):
        raise NotFound("no such schedule")
    handle = svc.temporal.get_schedule_handle(workflow_schedule_id(principal.tenant, schedule_id))
    try:
        described = await handle.describe()
    except RPCError as exc:
        if exc.status is RPCStatusCode.NOT_FOUND:
            raise NotFound("no such schedule") from None
        raise
    if described.typed_search_attributes.get(search.CUSTOMER) != principal.tenant:
        raise NotFound("no such schedule")
    return handle, described


async def describe(svc: Services, principal: Principal, schedule_id: str) -> ScheduleOut:
    require(svc, principal, RIGHT)
    _, described = await _handle(svc, principal, schedule_id)
    memo = await described.memo()
    state, info = described.schedule.state, described.info
    async with svc.pool.acquire() as conn:
        try:
            defined = await store.definition(
                conn, principal.tenant, schedule_id, input_sealer(svc.settings)
            )
        except SealError as exc:
            raise Unavailable(f"the schedule's input cannot be opened: {exc}") from None
        recent = await store.recent_starts(conn, principal.tenant, schedule_id)
    if defined is None:
        raise NotFound("no such schedule")
    overlap = next(k for k, v in _OVERLAP.items() if v == described.schedule.policy.overlap)
    return ScheduleOut(
        schedule_id=schedule_id,
        pipeline=defined.pipeline,
        owner=defined.owner,
        cron=memo.get("cron"),
        every_seconds=memo.get("every_seconds"),
        timezone=memo.get("timezone"),
        overlap=overlap,
        paused=state.paused,
        note=state.note or "",
        input=defined.input,
        budget_usd=defined.budget_usd,
        created_at=info.created_at,
        next_runs=list(info.next_action_times[:5]) if not state.paused else [],
        skipped_overlapping=info.num_actions_skipped_overlap,
        recent_starts=[ScheduleStartOut.model_validate(dict(r)) for r in recent],
    )


def _own_or_admin(svc: Services, principal: Principal, described: ScheduleDescription) -> None:
    owner = described.typed_search_attributes.get(search.REQUESTED_BY)
    if owner != principal.id and not svc.permissions.has_right(principal.roles, "runs:manage"):
        raise Forbidden("only the schedule's owner or an admin may do this")


async def _changeable(svc: Services, principal: Principal, schedule_id: str) -> ScheduleHandle:
    require(svc, principal, RIGHT)
    handle, described = await _handle(svc, principal, schedule_id)
    _own_or_admin(svc, principal, described)
    return handle


async def set_paused(
    svc: Services, principal: Principal, schedule_id: str, *, paused: bool, note: str
) -> ScheduleOut:
    """Pause or resume. Resuming one Stead paused because its owner could not start runs is
    safe: each firing checks the owner's rights again."""
    handle = await _changeable(svc, principal, schedule_id)
    if paused:
        await handle.pause(note=note or f"paused by {principal.id}")
    else:
        await handle.unpause(note=note or f"resumed by {principal.id}")
    action = "schedule.paused" if paused else "schedule.resumed"
    await _audit(svc, principal, schedule_id, action, {"note": note})
    return await describe(svc, principal, schedule_id)


async def delete(svc: Services, principal: Principal, schedule_id: str) -> None:
    """Delete the schedule; a run it started goes on."""
    handle = await _changeable(svc, principal, schedule_id)
    await handle.delete()
    async with svc.pool.acquire() as conn:
        await store.forget(conn, principal.tenant, schedule_id)
    await _audit(svc, principal, schedule_id, "schedule.deleted", {})


async def _audit(
    svc: Services, principal: Principal, schedule_id: str, action: str, data: dict[str, Any]
) -> None:
    event = by_caller(principal, action, {"schedule_id": schedule_id, **data})
    await svc.audit.record(svc.pool, [event])
