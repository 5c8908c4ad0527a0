"""The tool gateway (`tools.invoke`) called directly, on the real PostgreSQL and the loopback
payments and email services: what it reads, refuses, asks approval for, executes and audits.

Two tenants hold different customers under the same id, so a lookup, a trusted fact or an
email check that forgot the tenant reads the other tenant's record and fails here. The gateway
is built as a worker builds it, from the reference application's `Runtime` (`App.load`), its
integrations configured by a file: the session's loopback services, or a test's own. The
workflow-level behaviour (the model proposing calls, approvals in the inbox) is in
tests/test_support_agent.py and tests/test_trusted_facts.py; these run in milliseconds, which
is what `make mutants` needs.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities import support_desk
from stead.app import AppError
from stead.calls import ApprovalGrant, ToolInvocation, ToolOutcome
from stead.config import Settings
from stead.contract import RunContext
from stead.errors import ErrorType
from stead.gateway.tools import ToolActivities
from stead.sim.integrations import create_payments_app
from stead.store import policy as policy_store
from stead.store import principals
from stead.store.audit import audit_writer
from stead.store.db import Pool
from tests.conftest import Integrations, Tenant, TenantFactory, app_runtime
from tests.helpers import free_ports
from tests.servers import serve_app

REFUND = {"customer_id": "cus_1", "amount": "40", "currency": "USD", "reason": "charged twice"}


@dataclass(frozen=True)
class Customer:
    name: str
    email: str


# The same id in both tenants, different people; `cus_only_b` exists in tenant B alone.
CUSTOMERS = {
    "a": {"cus_1": Customer("Ann Alpha", "ann@alpha.test")},
    "b": {
        "cus_1": Customer("Bert Beta", "bert@beta.test"),
        "cus_only_b": Customer("Bea Beta", "bea@beta.test"),
    },
}


@pytest.fixture
async def tenants(make_tenant: TenantFactory, pool: Pool) -> dict[str, Tenant]:
    made = {"a": await make_tenant(), "b": await make_tenant()}
    async with pool.acquire() as conn:
        for side, customers in CUSTOMERS.items():
            for customer_id, c in customers.items():
                await support_desk.upsert_customer(
                    conn, made[side].id, customer_id, c.name, c.email
                )
            await support_desk.upsert_customer(
                conn, made[side].id, "cus_vip", "Vera Important", "vera@vip.test", restricted=True
            )
    return made


def tool_activities(pool: Pool, settings: Settings, http: httpx.AsyncClient) -> ToolActivities:
    """The gateway as a worker builds it for `settings` (its integrations file included)."""
    runtime = app_runtime(settings)
    audit = audit_writer(settings, runtime.policies.redaction)
    return ToolActivities(pool, runtime, audit, http, heartbeat_every=0.2)


def configured(settings: Settings, path: Path, **integrations: dict[str, Any]) -> Settings:
    """`settings` with an integrations file of exactly these entries (`{url, token, scopes}`
    each, as `STEAD_INTEGRATIONS_FILE` holds them)."""
    path.write_text(yaml.safe_dump(integrations))
    path.chmod(0o600)
    return settings.model_copy(update={"integrations_file": path})


@pytest.fixture
async def gateway(pool: Pool, test_settings: Settings) -> AsyncIterator[ToolActivities]:
    async with httpx.AsyncClient(timeout=10) as http:
        yield tool_activities(pool, test_settings, http)


def call(
    tenant: Tenant,
    tool: str,
    arguments: dict[str, Any],
    *,
    customer: str = "cus_1",
    user: str = "requester",
    approval: ApprovalGrant | None = None,
) -> ToolInvocation:
    run_id = f"r_{uuid.uuid4().hex[:12]}"
    context = RunContext(
        tenant=tenant.id, run_id=run_id, pipeline="support-agent", requested_by=user
    )
    return ToolInvocation(
        context=context,
        agent="support-agent",
        call_id=f"toolu_{uuid.uuid4().hex[:8]}",
        tool=tool,
        arguments=arguments,
        op_key=f"{tenant.id}:{run_id}:tool:1",
        facts={"customer_id": customer, "ticket_id": "T-1"},
        approval=approval,
    )


async def invoke(gateway: ToolActivities, invocation: ToolInvocation) -> ToolOutcome:
    return await ActivityEnvironment().run(gateway.invoke, invocation)


async def decided(pool: Pool, invocation: ToolInvocation) -> list[dict[str, Any]]:
    """The run's audit entries as (action, data), in chain order."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT action, actor, data FROM audit_log WHERE tenant_id = $1 AND run_id = $2"
            " ORDER BY seq",
            invocation.context.tenant,
            invocation.context.run_id,
        )
    return [{"action": r["action"], "actor": r["actor"], **json.loads(r["data"])} for r in rows]


# --- tenant scoping ---------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["a", "b"])
async def test_a_lookup_reads_the_runs_own_tenants_record(
    gateway: ToolActivities, tenants: dict[str, Tenant], side: str
) -> None:
    outcome = await invoke(
        gateway, call(tenants[side], "lookup_customer", {"customer_id": "cus_1"})
    )
    expected = CUSTOMERS[side]["cus_1"]
    assert outcome.status == "executed", outcome
    assert (outcome.data["name"], outcome.data["email"]) == (expected.name, expected.email)
    assert f"email: {expected.email}" in outcome.content.splitlines()


async def test_another_tenants_customer_does_not_exist_here(
    gateway: ToolActivities, tenants: dict[str, Tenant], pool: Pool
) -> None:
    invocation = call(
        tenants["a"], "lookup_customer", {"customer_id": "cus_only_b"}, customer="cus_only_b"
    )
    outcome = await invoke(gateway, invocation)
    assert (outcome.status, outcome.rule, outcome.is_error) == ("denied", "subject-unknown", True)
    assert outcome.reason == "no customer 'cus_only_b' in this tenant"
    assert "Bea" not in outcome.content
    # The refusal carries what was asked and what the run knew, for the workflow's record.
    assert outcome.arguments == {"customer_id": "cus_only_b"}
    assert outcome.facts == {"customer_id": "cus_only_b", "ticket_id": "T-1"}
    [entry] = await decided(pool, invocation)
    assert (entry["action"], entry["effect"], entry["rule"], entry["reason"]) == (
        "tool.decided",
        "denied",
        "subject-unknown",
        outcome.reason,
    )


@pytest.mark.parametrize("side", ["a", "b"])
async def test_email_goes_only_to_the_own_tenants_customer(
    gateway: ToolActivities, tenants: dict[str, Tenant], side: str
) -> None:
    """The recipient is checked against the customer's email as the run's tenant records it
    (a trusted fact), not as any other tenant does under the same id."""
    other = "b" if side == "a" else "a"
    message = {"subject": "Your refund", "body": "Done."}
    own = CUSTOMERS[side]["cus_1"].email
    sent = await invoke(gateway, call(tenants[side], "send_email", {**message, "to": own}))
    assert sent.status == "executed", sent
    assert sent.facts["customer_email"] == own
    foreign = CUSTOMERS[other]["cus_1"].email
    refused = await invoke(gateway, call(tenants[side], "send_email", {**message, "to": foreign}))
    assert (refused.status, refused.rule) == ("denied", "agent:support-agent/execute:email#2")
    assert (refused.is_error, refused.content) == (
        True,
        "permission denied: agent: to must be the run's own customer_email",
    )
    assert refused.arguments == {**message, "to": foreign}
    assert refused.facts == {"customer_id": "cus_1", "ticket_id": "T-1", "customer_email": own}


# --- refusals ---------------------------------------------------------------------------------


async def test_unknown_tools_and_bad_arguments_are_refused_to_the_model(
    gateway: ToolActivities, tenants: dict[str, Tenant]
) -> None:
    tenant = tenants["a"]
    unknown = await invoke(gateway, call(tenant, "delete_customer", {"customer_id": "cus_1"}))
    assert (unknown.status, unknown.rule, unknown.is_error) == ("denied", "unknown-tool", True)
    assert unknown.content == "refused: unknown tool 'delete_customer'"
    bad = await invoke(gateway, call(tenant, "issue_refund", {**REFUND, "amount": "-5"}))
    assert (bad.status, bad.rule) == ("denied", "input-schema")
    assert bad.reason.startswith("invalid arguments: amount: ")
    extra = await invoke(gateway, call(tenant, "lookup_customer", {"customer_id": "cus_1", "x": 1}))
    assert (extra.status, extra.rule) == ("denied", "input-schema")
    assert extra.reason.startswith("invalid arguments: x: ")


async def test_a_restricted_customer_is_read_only_by_roles_that_may(
    gateway: ToolActivities, tenants: dict[str, Tenant]
) -> None:
    tenant = tenants["a"]
    lookup = {"customer_id": "cus_vip"}
    as_requester = await invoke(
        gateway, call(tenant, "lookup_customer", lookup, customer="cus_vip")
    )
    assert (as_requester.status, as_requester.rule) == ("denied", "role:requester/read:customer#1")
    assert as_requester.reason == "user: restricted must be False"
    as_admin = call(tenant, "lookup_customer", lookup, customer="cus_vip", user="admin")
    assert (await invoke(gateway, as_admin)).status == "executed"
    # A refund about that customer needs the right to read them first.
    refund = {**REFUND, "customer_id": "cus_vip"}
    paying = await invoke(gateway, call(tenant, "issue_refund", refund, customer="cus_vip"))
    assert (paying.status, paying.rule) == ("denied", "role:requester/read:customer#1")
    assert paying.reason.startswith("may not read this customer (user: ")


async def test_a_disabled_user_gets_nothing(
    gateway: ToolActivities, tenants: dict[str, Tenant], pool: Pool
) -> None:
    tenant = tenants["a"]
    async with pool.acquire() as conn:
        await principals.disable_principal(conn, tenant.id, "requester")
    outcome = await invoke(gateway, call(tenant, "lookup_customer", {"customer_id": "cus_1"}))
    assert (outcome.status, outcome.rule) == ("denied", "principal-disabled")


async def test_a_tenant_deny_override_wins(
    gateway: ToolActivities, tenants: dict[str, Tenant], pool: Pool
) -> None:
    tenant = tenants["a"]
    override = {
        "subject_kind": "agent",
        "subject": "support-agent",
        "effect": "deny",
        "action": "draft",
        "resource": "reply",
    }
    async with pool.acquire() as conn:
        override_id = await policy_store.add_override(conn, tenant.id, override, by="admin")
    draft = {"subject": "Hello", "body": "A draft."}
    outcome = await invoke(gateway, call(tenant, "draft_reply", draft))
    assert (outcome.status, outcome.rule) == ("denied", f"override:{override_id}")
    assert outcome.reason == "agent: denied by override"
    # The other tenant's agent is not affected.
    assert (await invoke(gateway, call(tenants["b"], "draft_reply", draft))).status == "executed"


# --- approvals and execution ------------------------------------------------------------------


async def refunds_of(services: Integrations, invocation: ToolInvocation) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {services.token}"}
    async with httpx.AsyncClient(headers=headers) as http:
        refunds = (await http.get(f"{services.payments}/v1/refunds")).json()
    run_id = invocation.context.run_id
    return [r for r in refunds if r.get("metadata", {}).get("run_id") == run_id]


async def test_a_refund_waits_for_approval_then_pays_once(
    gateway: ToolActivities, tenants: dict[str, Tenant], pool: Pool, integrations: Integrations
) -> None:
    tenant = tenants["a"]
    first = call(tenant, "issue_refund", REFUND)
    waiting = await invoke(gateway, first)
    assert (waiting.status, waiting.is_error) == ("needs_approval", False)
    assert (waiting.content, waiting.reason) == ("waiting for approval", "requires approval")
    assert waiting.rule == "agent:support-agent/execute:refund#3"
    assert waiting.approver_roles == ("finance", "admin")
    assert waiting.facts == {
        "customer_id": "cus_1",
        "ticket_id": "T-1",
        "customer_email": CUSTOMERS["a"]["cus_1"].email,
    }
    assert waiting.arguments["amount"] == "40.00"  # money stays a decimal string
    assert await refunds_of(integrations, first) == []

    edited = {**REFUND, "amount": "35.50"}
    grant = ApprovalGrant(approval_id="ap_1", decided_by=("finance",), arguments=edited)
    approved = first.model_copy(update={"approval": grant})
    for _ in range(2):  # a retried activity: the provider's idempotency key holds
        paid = await invoke(gateway, approved)
        assert paid.status == "executed", paid
        assert paid.arguments["amount"] == "35.50"
    [refund] = await refunds_of(integrations, first)
    assert (refund["amount"], refund["customer_id"]) == ("35.50", "cus_1")
    assert refund["metadata"] == {
        "tenant": tenant.id,
        "run_id": first.context.run_id,
        "op_key": first.op_key,
    }

    entries = await decided(pool, first)
    effects = [(e["action"], e.get("effect")) for e in entries]
    assert effects == [
        ("tool.decided", "approval_required"),
        ("tool.decided", "allowed"),
        ("tool.executed", None),
    ]
    allowed = entries[1]
    assert allowed["approved_by"] == ["finance"]
    assert allowed["approval_id"] == "ap_1"
    assert allowed["on_behalf_of"] == "requester"
    assert {e["actor"] for e in entries} == {"agent:support-agent"}


async def test_an_approval_is_checked_again_with_the_approved_arguments(
    gateway: ToolActivities, tenants: dict[str, Tenant], integrations: Integrations
) -> None:
    tenant = tenants["a"]
    first = call(tenant, "issue_refund", REFUND)
    over = {**REFUND, "amount": "150"}  # edited past the requester's limit of 100
    grant = ApprovalGrant(approval_id="ap_1", decided_by=("finance",), arguments=over)
    outcome = await invoke(gateway, first.model_copy(update={"approval": grant}))
    assert (outcome.status, outcome.rule) == ("denied", "agent:support-agent/execute:refund#3")
    assert outcome.reason == "agent: amount 150.00 exceeds the limit 100"
    assert await refunds_of(integrations, first) == []


async def test_a_refund_for_another_customer_than_the_tickets_is_refused(
    gateway: ToolActivities, tenants: dict[str, Tenant]
) -> None:
    tenant = tenants["b"]
    other = {**REFUND, "customer_id": "cus_only_b"}
    outcome = await invoke(gateway, call(tenant, "issue_refund", other, customer="cus_1"))
    # The agent may read only the ticket's own customer, so it may not pay another one.
    assert (outcome.status, outcome.rule) == ("denied", "agent:support-agent/read:customer#0")
    assert outcome.reason == (
        "may not read this customer (agent: customer_id must be the run's own customer_id)"
    )


async def test_a_draft_is_saved_once(
    gateway: ToolActivities, tenants: dict[str, Tenant], pool: Pool
) -> None:
    invocation = call(tenants["a"], "draft_reply", {"subject": "Hello", "body": "A draft."})
    for _ in range(2):
        outcome = await invoke(gateway, invocation)
        assert (outcome.status, outcome.content) == ("executed", "draft saved: Hello")
        assert outcome.data == {"draft": invocation.op_key}
    async with pool.acquire() as conn:
        drafts = await conn.fetch(
            "SELECT subject, body, run_id FROM drafts WHERE tenant_id = $1", tenants["a"].id
        )
    assert [tuple(d) for d in drafts] == [("Hello", "A draft.", invocation.context.run_id)]


# --- integrations -----------------------------------------------------------------------------


def approved_refund(tenant: Tenant) -> ToolInvocation:
    grant = ApprovalGrant(approval_id="ap_1", decided_by=("finance",), arguments=REFUND)
    return call(tenant, "issue_refund", REFUND, approval=grant)


PayWith = Callable[[dict[str, Any]], Awaitable[tuple[ToolInvocation, ToolOutcome]]]


@pytest.fixture
async def pay_with(
    pool: Pool, test_settings: Settings, tenants: dict[str, Tenant], tmp_path: Path
) -> AsyncIterator[PayWith]:
    """An approved refund in tenant A, through the payments integration configured as given."""
    async with httpx.AsyncClient(timeout=5) as http:

        async def pay(entry: dict[str, Any]) -> tuple[ToolInvocation, ToolOutcome]:
            settings = configured(test_settings, tmp_path / "i.yaml", payments=entry)
            invocation = approved_refund(tenants["a"])
            return invocation, await invoke(tool_activities(pool, settings, http), invocation)

        yield pay


async def test_a_refusing_provider_is_reported_to_the_model(
    pay_with: PayWith, integrations: Integrations
) -> None:
    _, outcome = await pay_with({"url": integrations.payments, "token": "not-the-token"})
    assert (outcome.status, outcome.is_error) == ("failed", True)
    assert outcome.content == "payments refused the request (401)"
    assert "not-the-token" not in outcome.content


@dataclass
class PrivatePayments:
    """A payments service of the test's own, so that its faults touch no other test."""

    url: str
    http: httpx.AsyncClient
    settings: Settings
    token: str = "private-payments-token"

    async def fault(self, **spec: Any) -> None:
        auth = {"Authorization": f"Bearer {self.token}"}
        armed = await self.http.post(f"{self.url}/_control/faults", json=spec, headers=auth)
        assert armed.status_code == 200, armed.text

    def gateway(self, pool: Pool) -> ToolActivities:
        return tool_activities(pool, self.settings, self.http)


@pytest.fixture
async def payments(test_settings: Settings, tmp_path: Path) -> AsyncIterator[PrivatePayments]:
    async with (
        serve_app(create_payments_app(PrivatePayments.token)) as url,
        httpx.AsyncClient(timeout=10) as http,
    ):
        entry = {"url": url, "token": PrivatePayments.token}
        yield PrivatePayments(
            url, http, configured(test_settings, tmp_path / "i.yaml", payments=entry)
        )


@pytest.mark.parametrize("status", [500, 503, 599, 429])
async def test_a_failing_provider_is_a_retryable_activity_error(
    pool: Pool, payments: PrivatePayments, tenants: dict[str, Tenant], status: int
) -> None:
    await payments.fault(status=status, count=1)
    with pytest.raises(ApplicationError) as failed:
        await invoke(payments.gateway(pool), approved_refund(tenants["a"]))
    assert (failed.value.type, failed.value.non_retryable) == (ErrorType.TOOL_FAILED, False)
    assert failed.value.message == f"payments answered {status}"


@pytest.mark.parametrize("status", [400, 409, 422, 428, 430, 499])
async def test_a_provider_refusal_goes_back_to_the_model(
    pool: Pool, payments: PrivatePayments, tenants: dict[str, Tenant], status: int
) -> None:
    await payments.fault(status=status, count=1)
    outcome = await invoke(payments.gateway(pool), approved_refund(tenants["a"]))
    assert (outcome.status, outcome.is_error) == ("failed", True)
    assert outcome.content == f"payments refused the request ({status})"


async def test_an_unreachable_provider_is_a_retryable_activity_error(pay_with: PayWith) -> None:
    [port] = free_ports(1)  # nothing listens there
    with pytest.raises(ApplicationError) as failed:
        await pay_with({"url": f"http://127.0.0.1:{port}", "token": "t"})
    assert (failed.value.type, failed.value.non_retryable) == (ErrorType.TOOL_FAILED, False)
    assert failed.value.message == "payments unreachable: ConnectError"


async def test_an_unconfigured_integration_fails_its_tools_for_good(
    pool: Pool, payments: PrivatePayments, tenants: dict[str, Tenant]
) -> None:
    """Not configured is not a scope the credential lacks: no retry can help, and the error
    names the setting to set."""
    message = {"to": CUSTOMERS["a"]["cus_1"].email, "subject": "Hi", "body": "Done."}
    with pytest.raises(ApplicationError) as missing:
        await invoke(payments.gateway(pool), call(tenants["a"], "send_email", message))
    assert (missing.value.type, missing.value.non_retryable) == (
        ErrorType.INTEGRATION_MISSING,
        True,
    )
    assert missing.value.message == (
        "the email integration is not configured (STEAD_INTEGRATION_EMAIL_URL)"
    )


@pytest.mark.parametrize(
    ("entry", "setting"),
    [
        ({"token": "half-secret"}, "STEAD_INTEGRATION_EMAIL_URL"),
        ({"url": "http://127.0.0.1:9"}, "STEAD_INTEGRATION_EMAIL_TOKEN"),
    ],
    ids=["no-url", "no-token"],
)
def test_a_half_configured_integration_stops_the_process_at_start(
    test_settings: Settings, tmp_path: Path, entry: dict[str, str], setting: str
) -> None:
    settings = configured(test_settings, tmp_path / "i.yaml", email=entry)
    with pytest.raises(AppError) as refused:
        app_runtime(settings)
    assert str(refused.value).startswith(f"integration email: {setting}: ")
    assert "half-secret" not in str(refused.value)


async def test_a_credential_without_the_tools_scope_is_refused(
    pay_with: PayWith, integrations: Integrations
) -> None:
    """Whatever the user's and the agent's grants, a tool needs its scope on the credential."""
    narrow = {"url": integrations.payments, "token": integrations.token, "scopes": ["refunds:read"]}
    invocation, outcome = await pay_with(narrow)
    assert (outcome.status, outcome.rule) == ("denied", "integration-scope")
    assert outcome.reason == "payments lacks refunds:create"
    assert await refunds_of(integrations, invocation) == []


async def test_a_slow_provider_call_heartbeats(
    pool: Pool, payments: PrivatePayments, tenants: dict[str, Tenant]
) -> None:
    """Cancellation and a dead worker are noticed through heartbeats, so they go on while
    the activity waits on the provider."""
    await payments.fault(status=503, count=1, after_commit=True, hold_seconds=0.7)
    beats: list[Any] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: beats.append(details)
    with pytest.raises(ApplicationError):
        await env.run(payments.gateway(pool).invoke, approved_refund(tenants["a"]))
    assert len(beats) >= 2  # every 0.2 s for 0.7 s
