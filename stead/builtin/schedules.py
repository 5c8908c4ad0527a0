"""`stead.scheduled-run`: what a schedule's every firing runs (a Temporal Schedule's action).

It starts the pipeline run as the schedule's owner (`ScheduleActivities.start_run`, through the
service layer's start path), then, unless the schedule allows any overlap, watches that run to
its end: Temporal applies the schedule's overlap policy to this workflow, so while it lives,
the run counts as running (`skip` skips the next firing, `buffer_one` holds it, `cancel_other`
cancels this workflow, which then cancels the run in the owner's name). The watch is one
activity whose retries are the polling, with back-off up to the schedule's
`watch_max_seconds`: no history event per look.

Workflow id: `<tenant>:<schedule id>:run-<scheduled time>` (Temporal appends the time). Not a
pipeline: it never appears in `GET /v1/runs`; the run it started does.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey
from temporalio.exceptions import is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from stead.gateway.schedules import (
        START_ATTEMPTS,
        CancelScheduled,
        ScheduleActivities,
        ScheduledRun,
        ScheduledStart,
        StartScheduled,
        WatchRun,
    )

# Set by Temporal on every workflow a schedule starts: the time the firing was due.
SCHEDULED_AT = SearchAttributeKey.for_datetime("TemporalScheduledStartTime")
_STEP = timedelta(seconds=30)
_FIRST_LOOK = timedelta(seconds=1)


@workflow.defn(name="stead.scheduled-run")
class ScheduledRunWorkflow:
    @workflow.run
    async def run(self, job: ScheduledRun) -> ScheduledStart:
        info = workflow.info()
        due = info.typed_search_attributes.get(SCHEDULED_AT) or info.start_time
        started: ScheduledStart = await workflow.execute_activity_method(
            ScheduleActivities.start_run,
            StartScheduled(run=job, scheduled_at=due),
            start_to_close_timeout=timedelta(seconds=60),
            retry_policy=RetryPolicy(
                initial_interval=timedelta(seconds=1),
                maximum_interval=timedelta(seconds=30),
                maximum_attempts=START_ATTEMPTS,
            ),
        )
        if started.run_id is None or not job.watch:
            return started
        longest = timedelta(seconds=job.watch_max_seconds)
        try:
            await workflow.execute_activity_method(
                ScheduleActivities.watch_run,
                WatchRun(tenant=job.tenant, run_id=started.run_id),
                start_to_close_timeout=_STEP,
                retry_policy=RetryPolicy(
                    initial_interval=min(_FIRST_LOOK, longest),
                    backoff_coefficient=2.0,
                    maximum_interval=longest,
                    maximum_attempts=0,
                ),
            )
        except BaseException as exc:
            if is_cancelled_exception(exc):
                await workflow.execute_activity_method(
                    ScheduleActivities.cancel_run,
                    CancelScheduled(run=job, run_id=started.run_id),
                    start_to_close_timeout=_STEP,
                    retry_policy=RetryPolicy(maximum_attempts=3),
                )
            raise
        return started
