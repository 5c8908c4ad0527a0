"""Retry and timeout policy per activity class.

Temporal owns retries: the anthropic SDK runs with `max_retries=0`, tools and retrieval do not
retry internally. Errors that retrying cannot fix (bad request, permission denied, budget
exhausted) are non-retryable everywhere. The ledger (audit and approval projection) retries
without limit: a run must not fail because its record could not be written yet.

Non-retryable errors are marked so by the activity that raises them (`stead.errors.failure`),
not listed here: a list in the policy travels in every scheduled step's history event.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from temporalio.common import RetryPolicy


@dataclass(frozen=True)
class ActivityPolicy:
    retry: RetryPolicy
    start_to_close: timedelta
    heartbeat: timedelta | None = None
    schedule_to_close: timedelta | None = None


MODEL = ActivityPolicy(
    retry=RetryPolicy(
        initial_interval=timedelta(seconds=1),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(seconds=60),
        maximum_attempts=5,
    ),
    # Covers one pass over a route's models (each bounded by the SDK timeout).
    start_to_close=timedelta(minutes=5),
    heartbeat=timedelta(seconds=20),
)

TOOL = ActivityPolicy(
    retry=RetryPolicy(
        initial_interval=timedelta(seconds=1),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(seconds=30),
        maximum_attempts=6,
    ),
    start_to_close=timedelta(seconds=60),
    # Tools heartbeat every STEAD_HEARTBEAT_SECONDS while waiting on an integration: a worker
    # that dies mid-call is noticed within this, and the call is retried with the same key.
    heartbeat=timedelta(seconds=10),
)

RETRIEVAL = ActivityPolicy(
    retry=RetryPolicy(
        initial_interval=timedelta(milliseconds=500),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(seconds=10),
        maximum_attempts=5,
    ),
    start_to_close=timedelta(seconds=30),
)

LEDGER = ActivityPolicy(
    retry=RetryPolicy(
        initial_interval=timedelta(milliseconds=200),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(seconds=10),
        maximum_attempts=0,  # unlimited
    ),
    start_to_close=timedelta(seconds=15),
)

INGEST = ActivityPolicy(
    retry=RetryPolicy(
        initial_interval=timedelta(seconds=1),
        maximum_interval=timedelta(seconds=30),
        maximum_attempts=5,
    ),
    start_to_close=timedelta(minutes=2),
    heartbeat=timedelta(seconds=20),
)
