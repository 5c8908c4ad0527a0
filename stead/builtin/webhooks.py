"""`stead.webhook-delivery`: one event to one endpoint, retried with back-off, then given up.

Started by the webhook dispatcher (stead/webhooks/dispatch.py) with workflow id
`<tenant>:<delivery id>`, so each delivery runs once however often it is dispatched. Its one
activity posts the event (every attempt recorded in the delivery log); Temporal retries it on
the job's schedule. When the last attempt fails, `give_up` ends the delivery `failed` and
disables an endpoint that has had no success since the delivery began. Not a pipeline: it
has no stages, no approvals and no run of its own, and never appears in `GET /v1/runs`.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from stead import retries
    from stead.webhooks.delivery import DeliveryJob, DeliveryOutcome, GiveUp, WebhookActivities

# Time for the attempt's own bound, and for reading the job and recording its result.
_SLACK = timedelta(seconds=15)
_BACKOFF = 3.0


@workflow.defn(name="stead.webhook-delivery")
class WebhookDelivery:
    @workflow.run
    async def run(self, job: DeliveryJob) -> DeliveryOutcome:
        try:
            return await workflow.execute_activity_method(
                WebhookActivities.deliver,
                job,
                start_to_close_timeout=timedelta(seconds=job.timeout_seconds) + _SLACK,
                # A worker that dies mid-attempt is noticed within this, and the attempt retried.
                heartbeat_timeout=timedelta(seconds=5),
                retry_policy=RetryPolicy(
                    initial_interval=timedelta(seconds=job.retry_first_seconds),
                    backoff_coefficient=_BACKOFF,
                    # Temporal refuses a maximum below the first interval (and the workflow
                    # task would fail on it for good): settings that say so mean "constant".
                    maximum_interval=timedelta(
                        seconds=max(job.retry_first_seconds, job.retry_max_seconds)
                    ),
                    maximum_attempts=job.attempts,
                ),
            )
        except ActivityError as exc:
            cause = exc.cause
            error = cause.message if isinstance(cause, ApplicationError) else str(exc)
        return await workflow.execute_activity_method(
            WebhookActivities.give_up,
            GiveUp(job=job, error=error),
            start_to_close_timeout=retries.LEDGER.start_to_close,
            retry_policy=retries.LEDGER.retry,
        )
