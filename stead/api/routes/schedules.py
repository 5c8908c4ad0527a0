"""/v1/schedules: pipeline runs on a cron or an interval (stead.service.schedules).

Writes count against the plan's `admin.write` limit; each scheduled run's start counts against
`runs.start`, as the schedule's own key and the tenant's.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response, status

from stead.api.deps import CurrentPrincipal, ServicesDep, limited
from stead.api.errors import RATE_LIMITED
from stead.gateway.schedules import RIGHT
from stead.service import schedules
from stead.service.schedules import NoteIn, ScheduleIn, ScheduleOut, ScheduleSummary

router = APIRouter(
    prefix="/v1/schedules",
    tags=["schedules"],
    dependencies=[limited("admin.write", RIGHT)],  # writes only
    responses=RATE_LIMITED,
)
ScheduleId = Annotated[str, Path(max_length=100)]


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_schedule(
    body: ScheduleIn, svc: ServicesDep, principal: CurrentPrincipal
) -> ScheduleOut:
    """Schedule a pipeline's runs; each is started as you, with your rights at that time."""
    return await schedules.create(svc, principal, body)


@router.get("")
async def list_schedules(svc: ServicesDep, principal: CurrentPrincipal) -> list[ScheduleSummary]:
    return await schedules.list_schedules(svc, principal)


@router.get("/{schedule_id}")
async def get_schedule(
    schedule_id: ScheduleId, svc: ServicesDep, principal: CurrentPrincipal
) -> ScheduleOut:
    """The schedule, its next firings and what its recent firings started (or why not)."""
    return await schedules.describe(svc, principal, schedule_id)


@router.post("/{schedule_id}/pause")
async def pause_schedule(
    schedule_id: ScheduleId,
    svc: ServicesDep,
    principal: CurrentPrincipal,
    body: NoteIn | None = None,
) -> ScheduleOut:
    note = body.note if body else ""
    return await schedules.set_paused(svc, principal, schedule_id, paused=True, note=note)


@router.post("/{schedule_id}/resume")
async def resume_schedule(
    schedule_id: ScheduleId,
    svc: ServicesDep,
    principal: CurrentPrincipal,
    body: NoteIn | None = None,
) -> ScheduleOut:
    note = body.note if body else ""
    return await schedules.set_paused(svc, principal, schedule_id, paused=False, note=note)


@router.delete("/{schedule_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_schedule(
    schedule_id: ScheduleId, svc: ServicesDep, principal: CurrentPrincipal
) -> Response:
    await schedules.delete(svc, principal, schedule_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
