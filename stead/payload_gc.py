"""`stead payloads gc`: delete claim-checked payloads that no history can reference any more,
and the stored conversation messages of workflows none of whose histories is kept.

A stored payload is kept while any history that Temporal can still replay references it, or
a parked run could never be approved and its state would be unreadable. What can reference a
payload last stored (`created_at`) before the cutoff:

- an open run, however old (a review parked for months);
- a closed run still within the namespace's retention that started before the cutoff (it
  lived long and closed lately);
- a closed run started later by resetting an older one (a re-drive): its history begins with
  a copy of its base's events, references included. While its base is retained, the base
  holds the same references; once the base is gone (it closed at the reset, more than the
  retention ago), the reset run started more than the retention ago too.

A run started after that stored its payloads after it, since a payload stored again restarts
its age. So gc refuses a cutoff younger than the namespace's retention plus a day's margin (for
clock skew and histories Temporal is still deleting), walks the histories of every open run
and of every run started more than the retention ago, collects their claim-check references,
and deletes only payloads older than the cutoff that none of them holds. A history it cannot
read completely stops it before anything is deleted.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
from temporalio.client import Client

from stead.store import conversations
from stead.store.db import Conn
from stead.store.payloads import collect, referenced

MARGIN = timedelta(days=1)
MAX_DAYS = 36_500
# Bounds on one walk: past either, gc stops without deleting anything.
MAX_HISTORIES = 1_000_000
MAX_SECONDS = 6 * 3600
_RPC_TIMEOUT = timedelta(seconds=30)


class GcRefused(Exception):
    """gc will not run as asked. The message is one line."""


@dataclass(frozen=True)
class GcResult:
    removed: int
    kept: int  # payloads past the age, kept because a history still references them
    histories: int
    retention: timedelta
    messages_removed: int = 0  # stored conversation messages (stead.store.conversations)


async def namespace_retention(client: Client) -> timedelta:
    described = await client.workflow_service.describe_namespace(
        DescribeNamespaceRequest(namespace=client.namespace), timeout=_RPC_TIMEOUT
    )
    return described.config.workflow_execution_retention_ttl.ToTimedelta()


def minimum_days(retention: timedelta) -> int:
    return math.ceil((retention + MARGIN) / timedelta(days=1))


async def check_age(client: Client, older_than_days: int) -> timedelta:
    """The namespace's retention, if `older_than_days` is a safe age; GcRefused otherwise."""
    if not 0 < older_than_days <= MAX_DAYS:
        raise GcRefused(f"--older-than-days must be a whole number of days, 1 to {MAX_DAYS}")
    retention = await namespace_retention(client)
    if retention <= timedelta(0):
        raise GcRefused(
            f"namespace {client.namespace} keeps closed runs' histories indefinitely:"
            " no stored payload is safe to delete by age"
        )
    least = minimum_days(retention)
    if older_than_days < least:
        raise GcRefused(
            f"--older-than-days must be at least {least}: namespace {client.namespace} keeps"
            f" closed runs' histories for {retention / timedelta(days=1):g} days, plus"
            f" {MARGIN.days} day of margin"
        )
    return retention


async def referencing_histories(
    client: Client, started_before: datetime
) -> tuple[set[bytes], set[str], int]:
    """Claim-check digests held by every open run and every run started before
    `started_before`, those runs' workflow ids, and how many histories were read."""
    query = f'ExecutionStatus = "Running" OR StartTime < "{started_before:%Y-%m-%dT%H:%M:%SZ}"'
    deadline = time.monotonic() + MAX_SECONDS
    digests: set[bytes] = set()
    seen: set[tuple[str, str]] = set()
    async for execution in client.list_workflows(query, rpc_timeout=_RPC_TIMEOUT):
        if (execution.id, execution.run_id) in seen:
            continue
        seen.add((execution.id, execution.run_id))
        if len(seen) > MAX_HISTORIES or time.monotonic() > deadline:
            raise GcRefused(
                f"more than {MAX_HISTORIES} histories or {MAX_SECONDS} s to read: nothing deleted"
            )
        handle = client.get_workflow_handle(execution.id, run_id=execution.run_id)
        try:
            async for event in handle.fetch_history_events(rpc_timeout=_RPC_TIMEOUT):
                digests |= referenced(event)
        except ValueError as exc:
            raise GcRefused(f"workflow {execution.id}: {exc}: nothing deleted") from None
    return digests, {workflow for workflow, _ in seen}, len(seen)


async def collect_unreferenced(client: Client, conn: Conn, older_than_days: int) -> GcResult:
    """Delete stored payloads older than `older_than_days` that no readable history holds."""
    retention = await check_age(client, older_than_days)
    age = timedelta(days=older_than_days)
    keep, workflows, histories = await referencing_histories(client, datetime.now(UTC) - retention)
    removed = await collect(conn, age, keep)
    # A conversation's messages belong to its workflow id: kept while any of its runs' histories
    # is, by the same argument as a payload (what a younger run stored is younger).
    messages = await conversations.collect(conn, age, sorted(workflows))
    kept = await conn.fetchval(
        "SELECT count(*) FROM payload_store WHERE sha256 = ANY($1::bytea[])"
        " AND created_at < now() - $2::interval",
        list(keep),
        age,
    )
    return GcResult(
        removed=removed,
        kept=int(kept),
        histories=histories,
        retention=retention,
        messages_removed=messages,
    )
