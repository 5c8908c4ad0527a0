"""The delivery activities: post one event to one endpoint, signed; give up, and say why.

Each attempt of `deliver` is one Temporal activity attempt: Temporal owns the retries and
their back-off (the schedule travels in the job, from the settings at dispatch). An attempt
reads everything from PostgreSQL (so a re-enabled, rotated or deleted endpoint is seen at
once), records what happened in the delivery log, and fails (retryably) unless the receiver
answered 2xx. A delivery already marked succeeded is not posted again: an attempt whose worker
died after recording its success returns at once on the retry.

What a receiver can rely on: every event reaches it at least once, always with the same
`webhook-id` and body; a retry after a lost answer is a second request with that id. Events
are not ordered (each delivery retries on its own).

Never followed: redirects (a 3xx is a failed attempt naming where it pointed). Bounded: the
whole attempt by `STEAD_WEBHOOK_TIMEOUT_SECONDS`, the answer read to its first 2 KiB. Each
attempt connects to the address its check resolved (stead/webhooks/urls.py), on a connection
of its own: a kept-alive connection is keyed by address, and one opened for another host's
name there must not carry this host's request.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

import asyncpg
import httpx
from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from stead.contract import AuditEvent, Frozen
from stead.crypto import Sealer, SealError
from stead.gateway.heartbeat import heartbeating
from stead.policy.redaction import neutralize
from stead.store import webhooks as store
from stead.store.audit import AuditWriter
from stead.store.db import Pool
from stead.store.text import storable
from stead.webhooks import payloads, signing
from stead.webhooks.urls import (
    Pinned,
    Reach,
    Resolver,
    UnsafeUrl,
    check_destination,
    pinned,
    resolve,
)

RESPONSE_EXCERPT_BYTES = 2048
DELIVERY_FAILED = "WebhookDeliveryFailed"


class DeliveryJob(Frozen):
    """One delivery to make, with the retry schedule it was dispatched with."""

    tenant: str
    delivery_id: str
    attempts: int = 12
    retry_first_seconds: float = 5.0
    retry_max_seconds: float = 36_000.0
    timeout_seconds: float = 10.0


class DeliveryOutcome(Frozen):
    delivery_id: str
    status: Literal["succeeded", "failed", "skipped"]
    detail: str = ""


class GiveUp(Frozen):
    job: DeliveryJob
    error: str


@dataclass(frozen=True)
class Answer:
    """What one attempt got: a status code, or an error saying why there was none."""

    status: int | None
    error: str | None
    response: str = ""
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def delivery_client() -> httpx.AsyncClient:
    """Redirects are never followed (httpx's default, stated); a proxy in the environment is
    not used: deliveries go where the URL says; no connection is kept for another attempt."""
    return httpx.AsyncClient(
        follow_redirects=False,
        trust_env=False,
        limits=httpx.Limits(max_keepalive_connections=0),
    )


class WebhookActivities:
    def __init__(
        self,
        pool: Pool,
        audit: AuditWriter,
        sealer: Sealer | None,
        reach: Reach,
        http: httpx.AsyncClient | None = None,
        resolver: Resolver = resolve,
    ) -> None:
        self._pool = pool
        self._audit = audit
        self._sealer = sealer
        self._reach = reach
        self._http = http or delivery_client()
        self._resolver = resolver

    async def close(self) -> None:
        await self._http.aclose()

    @activity.defn(name="webhooks.deliver")
    async def deliver(self, job: DeliveryJob) -> DeliveryOutcome:
        async with self._pool.acquire() as conn:
            row = await store.delivery_job(conn, job.tenant, job.delivery_id)
            if row is None:
                return DeliveryOutcome(
                    delivery_id=job.delivery_id, status="skipped", detail="endpoint deleted"
                )
            if row["status"] != "pending":
                return DeliveryOutcome(delivery_id=job.delivery_id, status=row["status"])
            if not row["enabled"]:
                await store.finish_delivery(
                    conn, job.tenant, job.delivery_id, "skipped", "the endpoint is disabled"
                )
                return DeliveryOutcome(
                    delivery_id=job.delivery_id, status="skipped", detail="endpoint disabled"
                )
        keys = self._secrets(job.tenant, row)
        body = payloads.body(
            row["type"], row["at"], row["run_id"], row["actor"], row["data"], row["started"]
        )
        at = datetime.now(UTC)
        started = time.monotonic()
        answer = await heartbeating(
            self._post(row["url"], signing.headers(keys, row["event_id"], at, body), body, job),
            every=1.0,
        )
        attempt = activity.info().attempt
        async with self._pool.acquire() as conn, conn.transaction():
            await store.record_attempt(
                conn,
                job.tenant,
                job.delivery_id,
                attempt,
                at=at,
                status_code=answer.status,
                error=answer.error,
                duration_ms=round((time.monotonic() - started) * 1000),
                response=answer.response,
                succeeded=answer.ok,
            )
        if answer.ok:
            return DeliveryOutcome(delivery_id=job.delivery_id, status="succeeded")
        delay = (
            timedelta(seconds=min(answer.retry_after, job.retry_max_seconds))
            if answer.retry_after is not None
            else None
        )
        # Benign: a tenant's receiver being down is the delivery log's news, not the worker's.
        raise ApplicationError(
            f"attempt {attempt}: {answer.error or f'HTTP {answer.status}'}",
            type=DELIVERY_FAILED,
            next_retry_delay=delay,
            category=ApplicationErrorCategory.BENIGN,
        )

    @activity.defn(name="webhooks.give_up")
    async def give_up(self, request: GiveUp) -> DeliveryOutcome:
        """The last attempt failed: the delivery ends `failed`, and its endpoint is disabled
        if it has had no success since this delivery's first attempt."""
        job = request.job
        async with self._pool.acquire() as conn, conn.transaction():
            ended = await store.finish_delivery(conn, job.tenant, job.delivery_id, "failed", None)
            if ended is None or ended["first_attempt_at"] is None:
                return DeliveryOutcome(delivery_id=job.delivery_id, status="failed")
            last = ended["last_error"] or f"HTTP {ended['last_status']}"
            reason = (
                f"every attempt failed since {ended['first_attempt_at']:%Y-%m-%d %H:%M:%S} UTC:"
                f" delivery {job.delivery_id} gave up after {ended['attempts']} attempts"
                f" (last: {last})"
            )
            disabled = await store.disable_if_failing(
                conn, job.tenant, ended["endpoint_id"], ended["first_attempt_at"], reason
            )
            if disabled:
                await self._audit.append(conn, [_disabled_event(job, ended["endpoint_id"], reason)])
        return DeliveryOutcome(delivery_id=job.delivery_id, status="failed", detail=reason)

    def _secrets(self, tenant: str, row: asyncpg.Record) -> list[str]:
        if self._sealer is None:
            raise ApplicationError(
                "this worker has no payload keys to open webhook secrets", type="NoPayloadKeys"
            )
        try:
            keys = [signing.unseal(self._sealer, tenant, row["endpoint_id"], row["secret"])]
            if row["previous_secret"] is not None and row["previous_valid"]:
                keys.append(
                    signing.unseal(self._sealer, tenant, row["endpoint_id"], row["previous_secret"])
                )
        except SealError as exc:
            raise ApplicationError(
                f"the endpoint's signing secret cannot be opened: {exc}", type="SealError"
            ) from None
        return keys

    async def _post(self, url: str, headers: dict[str, str], body: str, job: DeliveryJob) -> Answer:
        try:
            async with asyncio.timeout(job.timeout_seconds):
                address = await check_destination(url, self._reach, self._resolver)
                return await self._send(pinned(url, address), headers, body)
        except UnsafeUrl as exc:
            return Answer(None, f"destination refused: {exc}")
        except TimeoutError:
            return Answer(None, f"no answer within {job.timeout_seconds:g} s")
        except OSError as exc:
            return Answer(None, f"cannot resolve the host: {exc.strerror or exc}")
        except httpx.HTTPError as exc:
            return Answer(None, f"{type(exc).__name__}: {exc}"[:300])

    async def _send(self, to: Pinned, headers: dict[str, str], body: str) -> Answer:
        async with self._http.stream(
            "POST",
            to.url,
            content=body.encode(),
            headers={**headers, "host": to.host},
            extensions={"sni_hostname": to.sni},
        ) as got:
            excerpt = bytearray()
            async for chunk in got.aiter_bytes():
                excerpt += chunk
                if len(excerpt) >= RESPONSE_EXCERPT_BYTES:
                    break
        text = neutralize(
            storable(bytes(excerpt[:RESPONSE_EXCERPT_BYTES]).decode(errors="replace"))
        )
        error = None
        if got.is_redirect:
            where = got.headers.get("location", "?")[:200]
            error = f"HTTP {got.status_code}: redirect to {where} not followed"
        return Answer(got.status_code, error, text, _retry_after(got))


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds from a 429's or 503's `Retry-After` (the seconds form; a date is ignored)."""
    if response.status_code not in (429, 503):
        return None
    raw = response.headers.get("retry-after", "")
    return float(raw) if raw.isdigit() else None


def _disabled_event(job: DeliveryJob, endpoint_id: str, reason: str) -> AuditEvent:
    return AuditEvent(
        key=f"webhook.disabled:{endpoint_id}:{job.delivery_id}",
        tenant=job.tenant,
        actor="stead:webhooks",
        actor_kind="system",
        action="webhook.disabled",
        run_id=None,
        at=datetime.now(UTC),
        data={"endpoint_id": endpoint_id, "reason": reason},
    )
