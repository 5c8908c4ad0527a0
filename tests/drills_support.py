"""What the reliability drills share: worker processes to kill, probes of in-flight activities,
the ledger checks that prove exactly-once, and the figures each drill records.

The drills themselves are in `tests/test_drills.py`; they run only with `-m drill`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import schemathesis
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from temporalio.api.enums.v1 import PendingActivityState
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError

from stead.config import Settings
from stead.service.runs import workflow_id
from stead.store import budgets
from stead.store.audit import verify
from stead.store.db import Pool
from tests.conftest import Integrations, Tenant, spawn_worker
from tests.helpers import eventually

RESULTS = Path(__file__).parent / "drills-results.json"
CUSTOMER, CUSTOMER_EMAIL = "cus_1", "jane@initech.test"
_SESSION_FIGURES: dict[str, dict[str, Any]] = {}


def record(drill: str, figures: dict[str, Any]) -> None:
    """Print a drill's figures and write every figure of this session to `RESULTS` (the file
    is rewritten by each session: it holds the last run of the drills that ran)."""
    _SESSION_FIGURES[drill] = figures
    RESULTS.write_text(json.dumps(_SESSION_FIGURES, indent=2, sort_keys=True, default=str) + "\n")
    print(f"\n[drill] {drill}: {json.dumps(figures, sort_keys=True, default=str)}")


def unique_text(label: str) -> str:
    """Input text no other run shares: an exact-match cache hit would skip the model call."""
    return f"{label} {uuid.uuid4().hex}. Revenue grew 12% in Q3. Costs fell 3%."


def summarize(label: str, *, review: bool) -> dict[str, Any]:
    return {"pipeline": "summarize", "input": {"text": unique_text(label), "review": review}}


# --- worker processes ------------------------------------------------------------------------


@dataclass
class WorkerProcesses:
    """Real `python worker.py` processes, one alive at a time, to SIGKILL mid-work.

    A spawned worker counts as ready once it logs that it polls its queues. Its Temporal
    identity is `<pid>@<host>`: that is how a probe tells which process runs an activity.
    """

    client: Client
    settings: Settings
    logs: Path
    spawned: int = 0
    kills: int = 0
    current: subprocess.Popen[bytes] | None = None
    _all: list[subprocess.Popen[bytes]] = field(default_factory=list)

    async def spawn(self, *, within: float = 90) -> subprocess.Popen[bytes]:
        assert self.current is None or self.current.poll() is not None, "one worker at a time"
        self.spawned += 1
        log = self.logs / f"worker-{self.spawned}.log"
        process = spawn_worker(self.client, self.settings, log)
        self._all.append(process)
        self.current = process
        deadline = time.monotonic() + within
        while " ready: " not in (log.read_text() if log.exists() else ""):
            if process.poll() is not None:
                raise AssertionError(f"worker exited with {process.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker not polling after {within}s:\n{log.read_text()}")
            await asyncio.sleep(0.05)
        return process

    @property
    def identity_prefix(self) -> str:
        assert self.current is not None
        return f"{self.current.pid}@"

    def kill(self) -> None:
        """SIGKILL the current worker: no cleanup, no goodbye to the server."""
        assert self.current is not None
        self.current.send_signal(signal.SIGKILL)
        self.current.wait()
        self.kills += 1

    async def stop(self) -> None:
        """SIGTERM the current worker and wait for its clean exit (it releases its sticky
        queues, so the next worker gets those runs' tasks at once)."""
        assert self.current is not None
        self.current.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(self.current.wait, 60)
        assert code == 0, f"worker exited with {code}"

    def close(self) -> None:
        for process in self._all:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()


@dataclass(frozen=True)
class InFlight:
    workflow_id: str
    activity: str
    attempt: int
    identity: str


async def in_flight(client: Client, workflow_ids: list[str]) -> list[InFlight]:
    """Activities that a worker has started and not finished, as the server sees them now (a
    running activity is in the mutable state, not yet in the history)."""

    async def pending(wf: str) -> list[InFlight]:
        try:
            described = await client.get_workflow_handle(wf).describe()
        except RPCError:
            return []  # the server is busy or restarting: the next probe sees it
        return [
            InFlight(wf, a.activity_type.name, a.attempt, a.last_worker_identity)
            for a in described.raw_description.pending_activities
            if a.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
        ]

    found = await asyncio.gather(*(pending(wf) for wf in workflow_ids))
    return [a for group in found for a in group]


async def statuses(client: Client, workflow_ids: list[str]) -> Counter[str]:
    async def one(wf: str) -> str:
        status = (await client.get_workflow_handle(wf).describe()).status
        return status.name if status else "UNKNOWN"

    return Counter(await asyncio.gather(*(one(wf) for wf in workflow_ids)))


async def all_closed(
    client: Client, tenant: Tenant, run_ids: list[str], *, within: float
) -> Counter[str]:
    """Wait until no run is RUNNING; return how many ended in each Temporal status."""
    ids = [workflow_id(tenant.id, r) for r in run_ids]
    return await eventually(
        lambda: statuses(client, ids),
        lambda c: WorkflowExecutionStatus.RUNNING.name not in c,
        within=within,
    )


# --- ledger checks -----------------------------------------------------------------------------


async def expire_dead_reservations(pool: Pool, tenant: str) -> int:
    """Charge in full the tenant's reservations still open after every run ended: attempts
    killed mid-call. This is what the worker's sweeper does after ten minutes; the drill does
    it now, for this tenant only, so the budget can be checked exactly."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT call_key, attempt, amount_nusd FROM budget_reservations"
            " WHERE tenant_id = $1 AND status = 'reserved'",
            tenant,
        )
        for row in rows:
            async with conn.transaction():
                await budgets.settle(
                    conn, row["call_key"], row["attempt"], row["amount_nusd"], status="expired"
                )
    return len(rows)


async def ledger_figures(pool: Pool, tenant: str, run_ids: list[str]) -> dict[str, Any]:
    """Exactly-once evidence from PostgreSQL for one tenant: audit entries per run, charges
    per model call, budget counters against the usage ledger, and the audit chain."""
    async with pool.acquire() as conn:
        per_run = {
            (r["run_id"], r["action"]): r["n"]
            for r in await conn.fetch(
                "SELECT run_id, action, count(*) AS n FROM audit_log WHERE tenant_id = $1"
                " AND action IN ('run.started', 'run.completed', 'run.failed')"
                " GROUP BY run_id, action",
                tenant,
            )
        }
        # One event recorded twice under different keys: a run ended twice, an approval asked
        # or decided twice. (Stages may repeat: an agent alternates model and tool turns.)
        duplicate_events = Counter(
            r["action"]
            for r in await conn.fetch(
                "SELECT action FROM audit_log WHERE tenant_id = $1"
                " AND action IN ('run.started', 'run.completed', 'run.failed',"
                " 'approval.requested', 'approval.decided')"
                " GROUP BY run_id, action, data::jsonb->>'approval_id', actor"
                " HAVING count(*) > 1",
                tenant,
            )
        )
        duplicate_audit_keys = await conn.fetchval(
            "SELECT count(*) FROM (SELECT event_key FROM audit_log WHERE tenant_id = $1"
            " GROUP BY event_key HAVING count(*) > 1) d",
            tenant,
        )
        duplicate_usage_rows = await conn.fetchval(
            "SELECT count(*) FROM (SELECT 1 FROM model_usage WHERE tenant_id = $1"
            " GROUP BY call_key, attempt HAVING count(*) > 1) d",
            tenant,
        )
        # A model call paid for twice: two attempts of one call both reached the provider
        # and were both charged (the memo should return the first reply to the second).
        calls_charged_twice = await conn.fetchval(
            "SELECT count(*) FROM (SELECT 1 FROM model_usage WHERE tenant_id = $1"
            " GROUP BY call_key HAVING count(*) > 1) d",
            tenant,
        )
        usage = await conn.fetchrow(
            "SELECT count(*) AS rows, coalesce(sum(cost_nusd), 0)::bigint AS cost,"
            " coalesce(sum(fallbacks), 0)::bigint AS fallbacks"
            " FROM model_usage WHERE tenant_id = $1",
            tenant,
        )
        models = {
            r["model"]: r["n"]
            for r in await conn.fetch(
                "SELECT model, count(*) AS n FROM model_usage WHERE tenant_id = $1 GROUP BY model",
                tenant,
            )
        }
        reservations = {
            r["status"]: (r["n"], r["charged"], r["amount"])
            for r in await conn.fetch(
                "SELECT status, count(*) AS n, coalesce(sum(charged_nusd), 0)::bigint AS charged,"
                " coalesce(sum(amount_nusd), 0)::bigint AS amount FROM budget_reservations"
                " WHERE tenant_id = $1 GROUP BY status",
                tenant,
            )
        }
        counter = await conn.fetchrow(
            "SELECT coalesce(sum(spent_nusd), 0)::bigint AS spent,"
            " coalesce(sum(reserved_nusd), 0)::bigint AS reserved FROM budget_counters"
            " WHERE tenant_id = $1 AND scope = 'customer'",
            tenant,
        )
        chain = await verify(conn, tenant)
    # Aggregates always return a row.
    assert usage is not None
    assert counter is not None
    settled = reservations.get("settled", (0, 0, 0))
    expired = reservations.get("expired", (0, 0, 0))
    open_ = reservations.get("reserved", (0, 0, 0))
    return {
        "runs": len(run_ids),
        "runs_started_once": sum(per_run.get((r, "run.started"), 0) == 1 for r in run_ids),
        "runs_completed_once": sum(per_run.get((r, "run.completed"), 0) == 1 for r in run_ids),
        "runs_completed_more_than_once": sum(
            per_run.get((r, "run.completed"), 0) > 1 for r in run_ids
        ),
        "runs_failed": sum(per_run.get((r, "run.failed"), 0) > 0 for r in run_ids),
        "duplicate_audit_keys": duplicate_audit_keys,
        "duplicate_audit_events": dict(duplicate_events),
        "duplicate_usage_rows": duplicate_usage_rows,
        "model_calls_charged_twice": calls_charged_twice,
        "usage_rows": usage["rows"],
        "usage_cost_nusd": usage["cost"],
        "usage_fallbacks": usage["fallbacks"],
        "models_used": models,
        "reservations_settled": settled[0],
        "reservations_settled_charged_nusd": settled[1],
        "reservations_expired": expired[0],
        "reservations_expired_charged_nusd": expired[1],
        "reservations_open": open_[0],
        "budget_spent_nusd": counter["spent"],
        "budget_reserved_nusd": counter["reserved"],
        "audit_entries": chain.entries,
        "audit_chain_ok": chain.ok,
    }


def assert_exactly_once(figures: dict[str, Any], *, budget: bool) -> None:
    """The invariants every drill shares (figures from `ledger_figures`)."""
    runs = figures["runs"]
    assert figures["runs_started_once"] == runs, figures
    assert figures["runs_completed_once"] == runs, figures
    assert figures["runs_completed_more_than_once"] == 0, figures
    assert figures["runs_failed"] == 0, figures
    assert figures["duplicate_audit_keys"] == 0, figures
    assert figures["duplicate_audit_events"] == {}, figures
    assert figures["duplicate_usage_rows"] == 0, figures
    assert figures["model_calls_charged_twice"] == 0, figures
    assert figures["audit_chain_ok"], figures
    if budget:
        # Every attempt that reached the provider is in the usage ledger and settled at its
        # cost (without a budget the gateway reserves nothing).
        assert figures["usage_cost_nusd"] == figures["reservations_settled_charged_nusd"], figures
        # The customer budget counted exactly what was charged: usage, plus attempts killed
        # mid-call charged in full (the provider may have billed them); nothing left reserved.
        assert figures["reservations_open"] == 0, figures
        assert figures["budget_reserved_nusd"] == 0, figures
        assert figures["budget_spent_nusd"] == (
            figures["usage_cost_nusd"] + figures["reservations_expired_charged_nusd"]
        ), figures


# --- the loopback integrations -----------------------------------------------------------------


@dataclass
class Effects:
    """What the payment and email services performed, per run."""

    refunds: Counter[str]
    emails: Counter[str]
    refund_posts: int
    refund_replays: int


async def effects(integrations: Integrations, run_ids: list[str]) -> Effects:
    wanted = set(run_ids)
    headers = {"Authorization": f"Bearer {integrations.token}"}
    async with httpx.AsyncClient(headers=headers, timeout=30) as http:
        refunds = (await http.get(f"{integrations.payments}/v1/refunds")).json()
        emails = (await http.get(f"{integrations.email}/v1/messages")).json()
        calls = (await http.get(f"{integrations.payments}/v1/calls")).json()

    def by_run(items: list[dict[str, Any]]) -> Counter[str]:
        return Counter(run for i in items if (run := i.get("metadata", {}).get("run_id")) in wanted)

    keys = {
        r["metadata"]["op_key"] for r in refunds if r.get("metadata", {}).get("run_id") in wanted
    }
    ours = [c for c in calls if c["key"] in keys]
    return Effects(
        refunds=by_run(refunds),
        emails=by_run(emails),
        refund_posts=len(ours),
        refund_replays=sum(1 for c in ours if c["replayed"]),
    )


class HoldFirstAnswers:
    """ASGI wrapper for the loopback payment service: the first POST of each idempotency key
    is performed and committed, then its answer is held for `hold` seconds (a provider that
    charged the card and went quiet); a repeat of a key is answered at once.

    So every tool call that makes a payment waits on it while the drill kills its worker, and
    the retry, with the same key, gets the recorded refund back without paying again.
    """

    def __init__(self, app: ASGIApp, hold: float) -> None:
        self.app, self.hold = app, hold
        self.seen: set[bytes] = set()
        self.holding: set[str] = set()  # run ids whose payment answer is being held
        self.held = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = dict(scope.get("headers", [])).get(b"idempotency-key")
        if scope["type"] != "http" or scope["method"] != "POST" or key is None:
            await self.app(scope, receive, send)
            return
        if key in self.seen:
            await self.app(scope, receive, send)
            return
        self.seen.add(key)
        answer: list[Message] = []

        async def keep(message: Message) -> None:
            answer.append(message)

        await self.app(scope, receive, keep)
        body = b"".join(m.get("body", b"") for m in answer if m["type"] == "http.response.body")
        run_id = str(json.loads(body or b"{}").get("metadata", {}).get("run_id", ""))
        self.held += 1
        self.holding.add(run_id)
        try:
            await asyncio.sleep(self.hold)
        finally:
            self.holding.discard(run_id)
        for message in answer:
            await send(message)


# --- approvals ---------------------------------------------------------------------------------


async def inbox_by_run(
    api: httpx.AsyncClient, tenant: Tenant, user: str, run_ids: list[str], *, within: float
) -> dict[str, str]:
    """Wait until every run has a pending approval in `user`'s inbox; return run → approval."""
    wanted = set(run_ids)

    async def probe() -> dict[str, str]:
        response = await api.get(
            "/v1/approvals", params={"limit": 500}, headers=tenant.auth(user), timeout=60
        )
        assert response.status_code == 200, response.text
        return {
            a["run_id"]: a["approval_id"] for a in response.json()["items"] if a["run_id"] in wanted
        }

    return await eventually(probe, lambda found: set(found) == wanted, within=within)


async def decide(
    api: httpx.AsyncClient,
    tenant: Tenant,
    user: str,
    approval_id: str,
    decision: str,
    answers: Counter[str],
) -> None:
    """Decide an approval as a careful client would, counting every answer.

    - 503: the run did not answer within the API's 30 s (its worker was killed). The update
      stays admitted at the server and is applied when a worker takes the run: wait for
      that before deciding again.
    - another 5xx or no answer (PostgreSQL or Temporal restarting): decide again shortly.
    - 409 after such a failure: an earlier attempt was applied; check it was this decision.
    """
    path = f"/v1/approvals/{approval_id}"
    wanted = "approved" if decision == "approve" else "rejected"

    async def status() -> str:
        try:
            got = await api.get(path, headers=tenant.auth(user), timeout=60)
        except httpx.HTTPError:
            return "unknown"
        return str(got.json()["status"]) if got.status_code == 200 else "unknown"

    failed = False
    for _ in range(20):
        try:
            response = await api.post(
                f"{path}/decision",
                json={"decision": decision},
                headers=tenant.auth(user),
                timeout=120,
            )
            code = response.status_code
        except httpx.HTTPError:
            code = 0
        answers[str(code)] += 1
        if code == 200:
            return
        if code == 409 and failed:
            assert await status() == wanted
            answers["applied_before_a_failed_answer"] += 1
            return
        assert code == 0 or code >= 500, response.text
        failed = True
        if code != 503:
            await asyncio.sleep(1)
            continue
        try:
            final = await eventually(status, lambda s: s not in ("pending", "unknown"), within=90)
        except AssertionError:
            continue  # still pending after all: decide again
        assert final == wanted, final
        answers["applied_after_503"] += 1
        return
    raise AssertionError(f"approval {approval_id} was never decided: {dict(answers)}")


def ticket(label: str, amount: str = "40") -> dict[str, Any]:
    """A support-agent run that looks the customer up, drafts a reply, proposes a refund
    (finance approves it) and emails the customer."""
    hints = {
        "amount": amount,
        "reason": "charged twice",
        "subject": "About your refund",
        "body": "We refunded the duplicate charge.",
        "send_email.to": CUSTOMER_EMAIL,
    }
    body = "I was charged twice.\n" + "\n".join(f"{k}: {v}" for k, v in hints.items())
    return {
        "pipeline": "support-agent",
        "input": {
            "ticket_id": f"T-{label}-{uuid.uuid4().hex[:8]}",
            "customer_id": CUSTOMER,
            "subject": "Double charge",
            "body": body,
        },
    }


# --- servers the restart drill owns ------------------------------------------------------------


@dataclass
class TemporalServer:
    """A file-backed Temporal dev server started exactly as `stead dev` starts it, so that it
    can be stopped and started again on the same database."""

    args: list[str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.args, stdout=self.log.open("ab"), stderr=subprocess.STDOUT
        )

    async def stop(self) -> None:
        """SIGTERM: a clean shutdown, as an operator's restart does."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(self.process.wait, 60)

    @contextlib.asynccontextmanager
    async def stopped(self) -> AsyncIterator[None]:
        """Stopped for the duration of the block, then started again on the same database."""
        await self.stop()
        try:
            yield
        finally:
            self.start()
            self.restarts += 1

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGKILL)
                self.process.wait()


async def healthy(client: Client, *, within: float = 90) -> None:
    async def probe() -> bool:
        try:
            await client.service_client.check_health(timeout=timedelta(seconds=2))
        except RPCError:
            return False
        return True

    await eventually(probe, bool, within=within)


async def start_acknowledged(
    api: httpx.AsyncClient, tenant: Tenant, body: dict[str, Any], answers: Counter[str]
) -> str:
    """Start a run as a careful client does while servers restart: retry failures with one
    `Idempotency-Key`, so a start whose answer was lost is not started twice."""
    headers = {**tenant.auth("requester"), "Idempotency-Key": uuid.uuid4().hex}

    async def attempt() -> httpx.Response | None:
        answers["sent"] += 1
        try:
            response = await api.post("/v1/runs", json=body, headers=headers, timeout=60)
        except httpx.HTTPError:
            answers["no answer"] += 1
            return None
        answers[str(response.status_code)] += 1
        return response

    def acknowledged(response: httpx.Response | None) -> bool:
        if response is not None and response.status_code < 500:
            assert response.status_code in (200, 201), response.text
            return True
        return False

    response = await eventually(attempt, acknowledged, within=120)
    assert response is not None
    return str(response.json()["run_id"])


async def until(condition: Callable[[], bool], *, within: float = 30) -> None:
    """Poll a condition on this process's own state (what a background task has done)."""

    async def check() -> bool:
        return condition()

    await eventually(check, bool, within=within)


# --- schemathesis --------------------------------------------------------------------------------


# pydantic error types raised by a model's own validators: rules no JSON schema can state.
_RULE_ERRORS = frozenset({"value_error", "assertion_error"})


@schemathesis.check
def refused_only_for_what_it_asks(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case[Any]
) -> bool | None:
    """The fuzzing drill lets a schema-valid request be refused with 422 for what it asks when
    no schema can say so: the API's own refusal (`{"detail": reason, "code": name}`: a cursor
    it never issued, input a pipeline does not take, a role nobody defined) or a model's own
    validator (`value_error`: a regex that does not compile). Any other validation error for
    a schema-valid request means the schema promises what validation refuses.

    Loaded into the schemathesis CLI as a hooks module (`hooks` in its configuration)."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 422:
        return None
    body = response.json()
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, str) and isinstance(body.get("code"), str):
        return None
    if isinstance(detail, list) and all(
        isinstance(e, dict) and e.get("type") in _RULE_ERRORS for e in detail
    ):
        return None
    raise AssertionError(f"a schema-valid request failed request validation: {body}")


def fuzzing_figures(report: Path) -> dict[str, Any]:
    """Figures from a schemathesis NDJSON report: cases, responses by status, failures by
    code and operation, and the 422 refusals of schema-valid requests by operation."""
    cases = 0
    statuses: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    refused: Counter[str] = Counter()
    for line in report.read_text().splitlines():
        event = json.loads(line)
        finished = event.get("ScenarioFinished")
        if not finished:
            continue
        recorder = finished["recorder"]
        for case_id, interaction in recorder.get("interactions", {}).items():
            cases += 1
            status = (interaction.get("response") or {}).get("status_code")
            statuses[str(status)] += 1
            meta = recorder["cases"][case_id]["value"].get("meta") or {}
            if status == 422 and meta.get("generation", {}).get("mode") == "positive":
                refused[recorder["label"]] += 1
        for checks in recorder.get("checks", {}).values():
            for check in checks:
                if check["status"] == "failure":
                    failure = check["failure_info"]["failure"]
                    failures[f"{failure['code']} {failure['operation']}"] += 1
    return {
        "cases": cases,
        "responses_by_status": dict(sorted(statuses.items())),
        "server_errors": sum(n for s, n in statuses.items() if s.startswith("5")),
        "failures": dict(sorted(failures.items())),
        "schema_valid_requests_refused_422": dict(sorted(refused.items())),
    }
