"""The tool gateway: every tool call by an agent passes here, and only here.

One activity, `tools.invoke`, does in order: validate the arguments against the tool's input
model; load the requesting user (a disabled user's agent gets nothing) and the tenant's
overrides; evaluate the agent's grants and the user's grants (the intersection), with the
arguments and trusted facts; check the integration's scopes; then either refuse (a
`tool_result` error the model can read, not a crash), ask for approval, or execute with the
integration's own scoped credentials. Every decision, with the rule that made it, is audited.

After an approval the workflow calls again with the approval attached: the permissions of the
user and the agent are evaluated again at that moment, with the approved (possibly edited)
arguments. Side effects carry `op_key` as their idempotency key, so a retried or re-driven
activity never pays or emails twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
from pydantic import BaseModel, ValidationError
from temporalio import activity

from policies.tools import INTEGRATION_SCOPES, TOOLS, ToolSpec
from stead import metrics
from stead.calls import ToolInvocation, ToolOutcome
from stead.contract import AuditEvent
from stead.errors import ErrorType, failure
from stead.gateway.heartbeat import heartbeating
from stead.policy.permissions import PermissionPolicy, Verdict, combine, evaluate
from stead.store import crm, principals
from stead.store import policy as policy_store
from stead.store.audit import AuditWriter, run_event
from stead.store.db import Conn, Pool
from stead.telemetry import set_attributes, span


@dataclass(frozen=True)
class HttpIntegration:
    """A third-party HTTP API reached with its own scoped bearer token."""

    name: str
    base_url: str | None
    token: str | None

    async def post(
        self, http: httpx.AsyncClient, path: str, body: dict[str, Any], key: str
    ) -> dict[str, Any]:
        if not self.base_url or not self.token:
            raise failure(
                ErrorType.INTEGRATION_MISSING, f"the {self.name} integration is not configured"
            )
        try:
            response = await http.post(
                f"{self.base_url}{path}",
                json=body,
                headers={"Authorization": f"Bearer {self.token}", "Idempotency-Key": key},
            )
        except httpx.HTTPError as exc:
            raise failure(
                ErrorType.TOOL_FAILED, f"{self.name} unreachable: {type(exc).__name__}"
            ) from None
        if response.status_code >= 500 or response.status_code == 429:
            raise failure(ErrorType.TOOL_FAILED, f"{self.name} answered {response.status_code}")
        if response.status_code >= 400:
            raise _Refused(f"{self.name} refused the request ({response.status_code})")
        data: dict[str, Any] = response.json()
        return data


class _Refused(Exception):
    """The integration refused the call itself (4xx): report to the model, don't retry."""


@dataclass
class Integrations:
    payments: HttpIntegration
    email: HttpIntegration
    http: httpx.AsyncClient


class _Decision:
    def __init__(
        self,
        outcome: ToolOutcome | None,
        verdict: Verdict,
        arguments: dict[str, Any],
        facts: dict[str, Any],
    ) -> None:
        self.outcome, self.verdict, self.arguments, self.facts = outcome, verdict, arguments, facts


class ToolActivities:
    def __init__(
        self,
        pool: Pool,
        policy: PermissionPolicy,
        audit: AuditWriter,
        integrations: Integrations,
        *,
        heartbeat_every: float = 5.0,
    ) -> None:
        self._heartbeat_every = heartbeat_every
        self._pool = pool
        self._policy = policy
        self._audit = audit
        self._integrations = integrations

    @activity.defn(name="tools.invoke")
    async def invoke(self, call: ToolInvocation) -> ToolOutcome:
        with span(
            "tool.call",
            tool=call.tool,
            tenant=call.context.tenant,
            pipeline=call.context.pipeline,
            approved=call.approval is not None,
        ) as current:
            outcome = await self._invoke(call)
            set_attributes(current, status=outcome.status, rule=outcome.rule)
            return outcome

    async def _invoke(self, call: ToolInvocation) -> ToolOutcome:
        spec = TOOLS.get(call.tool)
        async with self._pool.acquire() as conn:
            decision = await self._decide(conn, call, spec)
        phase = "approved" if call.approval else "initial"
        decided = self._event(
            call,
            f"{call.op_key}:decided:{phase}",
            "tool.decided",
            {
                "tool": call.tool,
                "call_id": call.call_id,
                "arguments": decision.arguments,
                "effect": _effect(decision),
                "rule": decision.verdict.rule,
                "reason": decision.verdict.reason,
                "on_behalf_of": call.context.requested_by,
                **(
                    {
                        "approval_id": call.approval.approval_id,
                        "approved_by": list(call.approval.decided_by),
                    }
                    if call.approval
                    else {}
                ),
            },
        )
        metrics.TOOL_CALLS.labels(call.tool, _effect(decision)).inc()
        if decision.outcome is not None:
            if decision.outcome.status == "denied":
                metrics.PERMISSION_DENIALS.labels("tool", call.tool).inc()
            await self._record([*call.events, decided])
            return decision.outcome
        assert spec is not None
        try:
            content, data = await self._execute(spec, call, decision)
            outcome = ToolOutcome(
                status="executed",
                content=content,
                rule=decision.verdict.rule,
                arguments=decision.arguments,
                facts=decision.facts,
                data=data,
            )
        except _Refused as exc:
            outcome = ToolOutcome(
                status="failed",
                content=str(exc),
                is_error=True,
                rule=decision.verdict.rule,
                arguments=decision.arguments,
            )
        executed = self._event(
            call,
            f"{call.op_key}:executed",
            "tool.executed",
            {
                "tool": call.tool,
                "call_id": call.call_id,
                "status": "ok" if outcome.status == "executed" else "error",
                "result": outcome.data or {"message": outcome.content},
            },
        )
        await self._record([*call.events, decided, executed])
        return outcome

    # --- deciding --------------------------------------------------------------------------

    async def _decide(self, conn: Conn, call: ToolInvocation, spec: ToolSpec | None) -> _Decision:
        raw = call.approval.arguments if call.approval else call.arguments
        if spec is None:
            return _deny(f"unknown tool {call.tool!r}", "unknown-tool", raw, call.facts)
        try:
            arguments = _plain(spec.input_model.model_validate(raw))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "arguments"
            return _deny(
                f"invalid arguments: {where}: {first['msg']}", "input-schema", raw, call.facts
            )
        tenant = call.context.tenant
        user = await principals.get_principal(conn, tenant, call.context.requested_by)
        if user is None:
            return _deny(
                "the requesting user no longer has access",
                "principal-disabled",
                arguments,
                call.facts,
            )
        facts = await self._facts(conn, tenant, call.facts)
        checked = dict(arguments)
        if spec.subject is not None:
            # The record the call names must exist in this tenant, and the acting user (and
            # the agent) must be allowed to read it: a call about a customer they may not see,
            # or one that does not exist, is refused whatever else it would be allowed.
            subject_id = str(arguments[spec.subject])
            record = await crm.customer(conn, tenant, subject_id)
            if record is None:
                return _deny(
                    f"no customer {subject_id!r} in this tenant",
                    "subject-unknown",
                    arguments,
                    facts,
                )
            seen = {spec.subject: record["id"], "restricted": record["restricted"]}
            if spec.resource == "customer":
                checked.update(seen)
            else:
                read = await self._verdict(conn, call, "read", "customer", user.roles, seen, facts)
                if not read.allowed:
                    return _deny(
                        f"may not read this customer ({read.reason})", read.rule, arguments, facts
                    )
        if spec.scope not in INTEGRATION_SCOPES.get(spec.integration, frozenset()):
            verdict = Verdict(
                effect="deny",
                rule="integration-scope",
                reason=f"{spec.integration} lacks {spec.scope}",
            )
        else:
            verdict = await self._verdict(
                conn, call, spec.action, spec.resource, user.roles, checked, facts
            )
        return _decision_for(verdict, call, arguments, facts)

    async def _verdict(
        self,
        conn: Conn,
        call: ToolInvocation,
        action: str,
        resource: str,
        roles: tuple[str, ...],
        checked: dict[str, Any],
        facts: dict[str, Any],
    ) -> Verdict:
        overrides = await policy_store.overrides(conn, call.context.tenant)
        agent = self._policy.agent_grants(call.agent, overrides)
        user = self._policy.user_grants(roles, call.context.requested_by, overrides)
        return combine(
            evaluate(agent, action, resource, checked, facts),
            evaluate(user, action, resource, checked, facts),
        )

    async def _facts(self, conn: Conn, tenant: str, given: dict[str, Any]) -> dict[str, Any]:
        """Trusted facts: what the run says, completed from the store (never from the model)."""
        facts = dict(given)
        customer_id = facts.get("customer_id")
        if isinstance(customer_id, str):
            record = await crm.customer(conn, tenant, customer_id)
            if record is not None:
                facts["customer_email"] = record["email"]
        return facts

    # --- executing -------------------------------------------------------------------------

    async def _execute(
        self, spec: ToolSpec, call: ToolInvocation, decision: _Decision
    ) -> tuple[str, dict[str, Any]]:
        args, tenant = decision.arguments, call.context.tenant
        if spec.integration == "crm":
            async with self._pool.acquire() as conn:
                record = await crm.customer(conn, tenant, str(args["customer_id"]))
            assert record is not None
            return _lines(record), record
        if spec.integration == "drafts":
            async with self._pool.acquire() as conn:
                await crm.save_draft(
                    conn, tenant, call.op_key, call.context.run_id, args["subject"], args["body"]
                )
            return f"draft saved: {args['subject']}", {"draft": call.op_key}
        integration = (
            self._integrations.payments
            if spec.integration == "payments"
            else self._integrations.email
        )
        path = "/v1/refunds" if spec.integration == "payments" else "/v1/messages"
        # References let the provider's records be traced back to the run and the step.
        metadata = {"tenant": tenant, "run_id": call.context.run_id, "op_key": call.op_key}
        result = await heartbeating(
            integration.post(
                self._integrations.http, path, {**args, "metadata": metadata}, call.op_key
            ),
            self._heartbeat_every,
        )
        return _lines(result), result

    async def _record(self, events: list[AuditEvent]) -> None:
        await self._audit.record(self._pool, events)

    @staticmethod
    def _event(call: ToolInvocation, key: str, action: str, data: dict[str, Any]) -> AuditEvent:
        actor = f"agent:{call.agent}"
        return run_event(call.context, key, action, data, actor=actor, actor_kind="agent")


def _deny(reason: str, rule: str, arguments: dict[str, Any], facts: dict[str, Any]) -> _Decision:
    verdict = Verdict(effect="deny", rule=rule, reason=reason)
    outcome = ToolOutcome(
        status="denied",
        content=f"refused: {reason}",
        is_error=True,
        rule=rule,
        reason=reason,
        arguments=arguments,
        facts=facts,
    )
    return _Decision(outcome, verdict, arguments, facts)


def _decision_for(
    verdict: Verdict, call: ToolInvocation, arguments: dict[str, Any], facts: dict[str, Any]
) -> _Decision:
    if verdict.effect == "deny":
        outcome = ToolOutcome(
            status="denied",
            content=f"permission denied: {verdict.reason}",
            is_error=True,
            rule=verdict.rule,
            reason=verdict.reason,
            arguments=arguments,
            facts=facts,
        )
        return _Decision(outcome, verdict, arguments, facts)
    if verdict.effect == "approval" and call.approval is None:
        outcome = ToolOutcome(
            status="needs_approval",
            content="waiting for approval",
            rule=verdict.rule,
            reason=verdict.reason,
            approver_roles=verdict.approver_roles,
            arguments=arguments,
            facts=facts,
        )
        return _Decision(outcome, verdict, arguments, facts)
    return _Decision(None, verdict, arguments, facts)


def _effect(decision: _Decision) -> str:
    if decision.outcome is None:
        return "allowed"
    return {"denied": "denied", "needs_approval": "approval_required"}.get(
        decision.outcome.status, "allowed"
    )


def _plain(model: BaseModel) -> dict[str, Any]:
    """JSON-safe arguments; money stays a decimal string, never a float."""
    return {k: (f"{v:.2f}" if isinstance(v, Decimal) else v) for k, v in model.model_dump().items()}


def _lines(record: dict[str, Any]) -> str:
    """A tool result the model (and the simulator's hints) can read: `key: value` lines."""
    return "\n".join(f"{k}: {v}" for k, v in record.items())
