"""Schedule activities: start a scheduled run as the schedule's owner, watch it, cancel it.

`start_run` re-reads the owner from PostgreSQL at every firing and starts the run through the
service layer's own start path (`stead.service.runs.start_run`) in the owner's name: their
rights now, their plan's limits (a schedule is its own key: `schedule:<id>`), their budgets in
the run. An owner who is disabled, or no longer holds `schedules:manage` and `runs:start`, gets
no run: the schedule is paused with a note saying why (visible on `GET /v1/schedules/{id}`),
and the refusal is audited. The run id derives from the schedule and the scheduled time (an
idempotency key), so a retried firing starts one run.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory
from temporalio.service import RPCError, RPCStatusCode

from stead.app import Runtime
from stead.config import Settings
from stead.contract import AuditEvent, Frozen, RunStatus
from stead.crypto import Sealer, SealError
from stead.service import runs
from stead.service.access import Services, require
from stead.service.errors import Conflict, Forbidden, Invalid, RateLimited, ServiceError
from stead.service.schemas import StartRun
from stead.store import principals
from stead.store import schedules as store
from stead.store.audit import AuditWriter
from stead.store.db import Pool

RIGHT = "schedules:manage"
# Attempts at one firing's start, while the plan's rate limit or an outage refuses it; the
# last one records the refusal instead of failing.
START_ATTEMPTS = 6
RUN_STILL_RUNNING = "RunStillRunning"


class ScheduledRun(Frozen):
    """A schedule's action, fixed when the schedule is created. The run's input and budget
    are read from PostgreSQL at each firing (see migrations/0012_schedules.sql for why they
    are not in here)."""

    tenant: str
    schedule_id: str
    owner: str
    pipeline: str
    # Watch the run to its end, so the schedule's overlap policy sees it running.
    watch: bool = True
    watch_max_seconds: float = 60.0


class StartScheduled(Frozen):
    run: ScheduledRun
    scheduled_at: datetime


class ScheduledStart(Frozen):
    run_id: str | None = None
    refused: str = ""
    paused: bool = False


class WatchRun(Frozen):
    tenant: str
    run_id: str


class CancelScheduled(Frozen):
    run: ScheduledRun
    run_id: str


def schedule_key(schedule_id: str) -> str:
    """The API-key id a schedule's starts are limited under (its own bucket of the plan's
    per-key limit; the tenant's bucket is shared with every other start)."""
    return f"schedule:{schedule_id}"


def workflow_schedule_id(tenant: str, schedule_id: str) -> str:
    return f"{tenant}:{schedule_id}"


def input_sealer(settings: Settings) -> Sealer | None:
    """What seals a schedule's stored input: the payload keys, when there are any."""
    keys = settings.encryption_keys
    return Sealer(keys) if keys else None


class ScheduleActivities:
    def __init__(self, runtime: Runtime, settings: Settings, pool: Pool, audit: AuditWriter):
        self._runtime = runtime
        self._settings = settings
        self._pool = pool
        self._audit = audit

    def _services(self) -> Services:
        return Services(self._settings, activity.client(), self._pool, self._runtime, self._audit)

    @activity.defn(name="schedules.start_run")
    async def start_run(self, job: StartScheduled) -> ScheduledStart:
        svc = self._services()
        run = job.run
        try:
            started = await self._start_as_owner(svc, job)
        except (Forbidden, Invalid) as exc:
            # Waiting will not fix it: an admin (or the owner, restored) must act.
            return await self._refuse(svc, job, exc.detail, pause=True)
        except Conflict as exc:  # the approval backlog's cap: this firing is skipped
            return await self._refuse(svc, job, exc.detail, pause=False)
        except Exception as exc:  # a rate limit or an outage: retried, then recorded
            reason = exc.detail if isinstance(exc, ServiceError) else f"{type(exc).__name__}: {exc}"
            if activity.info().attempt >= START_ATTEMPTS:
                return await self._refuse(svc, job, reason, pause=False)
            wait = (
                float(exc.headers["Retry-After"])
                if isinstance(exc, RateLimited) and exc.headers
                else None
            )
            raise ApplicationError(
                reason,
                type="ScheduledStartDeferred",
                next_retry_delay=timedelta(seconds=wait) if wait is not None else None,
            ) from None
        async with self._pool.acquire() as conn, conn.transaction():
            await store.record_start(
                conn, run.tenant, run.schedule_id, job.scheduled_at, run_id=started, refused=None
            )
            await self._audit.append(
                conn,
                [_event(job, "schedule.run_started", {"pipeline": run.pipeline}, run_id=started)],
            )
        return ScheduledStart(run_id=started)

    async def _start_as_owner(self, svc: Services, job: StartScheduled) -> str:
        run = job.run
        async with self._pool.acquire() as conn:
            owner = await principals.get_principal(conn, run.tenant, run.owner)
            try:
                defined = await store.definition(
                    conn, run.tenant, run.schedule_id, input_sealer(self._settings)
                )
            except SealError as exc:
                raise Invalid(f"the schedule's input cannot be opened: {exc}") from None
        if owner is None:
            raise Forbidden(f"the schedule's owner {run.owner} is disabled or no longer exists")
        if defined is None:
            raise Invalid("the schedule's definition is gone (deleted meanwhile?)")
        require(svc, owner, RIGHT)
        body = StartRun(pipeline=run.pipeline, input=defined.input, budget_usd=defined.budget_usd)
        started = await runs.start_run(
            svc,
            owner,
            schedule_key(run.schedule_id),
            body,
            idempotency_key=f"{schedule_key(run.schedule_id)}:{job.scheduled_at.isoformat()}",
        )
        return started.run_id

    async def _refuse(
        self, svc: Services, job: StartScheduled, reason: str, *, pause: bool
    ) -> ScheduledStart:
        run = job.run
        due = job.scheduled_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        why = f"the run due at {due} was not started as {run.owner}: {reason}"
        if pause:
            handle = svc.temporal.get_schedule_handle(
                workflow_schedule_id(run.tenant, run.schedule_id)
            )
            try:
                await handle.pause(note=f"paused by Stead: {why}"[:1000])
            except RPCError as exc:
                if exc.status is not RPCStatusCode.NOT_FOUND:  # deleted meanwhile: no matter
                    raise
        async with self._pool.acquire() as conn, conn.transaction():
            await store.record_start(
                conn, run.tenant, run.schedule_id, job.scheduled_at, run_id=None, refused=why
            )
            await self._audit.append(
                conn,
                [_event(job, "schedule.start_refused", {"reason": reason, "paused": pause})],
            )
        return ScheduledStart(refused=why, paused=pause)

    @activity.defn(name="schedules.watch_run")
    async def watch_run(self, job: WatchRun) -> str:
        """The run's final status once it has ended; while it runs, a benign failure that
        Temporal retries with back-off (no history event per look, no log line per look)."""
        handle = activity.client().get_workflow_handle(runs.workflow_id(job.tenant, job.run_id))
        try:
            described = await handle.describe()
        except RPCError as exc:
            if exc.status is RPCStatusCode.NOT_FOUND:
                return "gone"
            raise
        status = runs.run_status(described.status)
        if status is RunStatus.RUNNING:
            raise ApplicationError(
                "the run is still running",
                type=RUN_STILL_RUNNING,
                category=ApplicationErrorCategory.BENIGN,
            )
        return status.value

    @activity.defn(name="schedules.cancel_run")
    async def cancel_run(self, job: CancelScheduled) -> str:
        """The schedule's overlap policy (`cancel_other`) cancels its previous run: done in the
        owner's name, through the service layer, like a cancel over the API."""
        svc = self._services()
        async with self._pool.acquire() as conn:
            owner = await principals.get_principal(conn, job.run.tenant, job.run.owner)
        if owner is None:
            return "the owner is disabled: the run was left running"
        try:
            await runs.cancel_run(svc, owner, job.run_id)
        except ServiceError as exc:
            return exc.detail
        return "cancelled"


def _event(
    job: StartScheduled, action: str, data: dict[str, Any], run_id: str | None = None
) -> AuditEvent:
    run = job.run
    at = job.scheduled_at.astimezone(UTC).isoformat()
    return AuditEvent(
        # One entry per firing and outcome, however often the activity is retried.
        key=f"{action}:{run.schedule_id}:{at}",
        tenant=run.tenant,
        actor=f"schedule:{run.schedule_id}",
        actor_kind="system",
        action=action,
        run_id=run_id,
        at=datetime.now(UTC),
        data={"schedule_id": run.schedule_id, "scheduled_at": at, "owner": run.owner, **data},
    )
