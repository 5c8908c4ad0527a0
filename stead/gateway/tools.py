"""The tool gateway: every tool call by an agent passes here, and only here.

One activity, `tools.invoke`, does in order, for every tool an application declares
(`stead.tools`): validate the arguments against the tool's input model; load the requesting
user (a disabled user's agent gets nothing) and the tenant's overrides; load the record the
call names (it must exist in the tenant, and the acting user and agent must be allowed to read
it); complete the run's trusted facts (the application's `facts` hook); evaluate the agent's
grants and the user's grants (the intersection) with the arguments and facts; check the
integration's scopes; then either refuse (a `tool_result` error the model can read, not a
crash), ask for approval, or call the tool's handler with the integration's own scoped
credentials. Every decision, with the rule that made it, is audited.

After an approval the workflow calls again with the approval attached: the permissions of the
user and the agent are evaluated again at that moment, with the approved (possibly edited)
arguments. Side effects carry `op_key` as their idempotency key, so a retried or re-driven
activity never pays or emails twice.
"""

from __future__ import annotations

from typing import Any

import httpx
from pydantic import ValidationError
from temporalio import activity

from stead import metrics
from stead.app import RecordContext, Runtime
from stead.calls import ToolInvocation, ToolOutcome
from stead.contract import AuditEvent
from stead.gateway.heartbeat import heartbeating
from stead.integrations import IntegrationClient
from stead.policy.permissions import Verdict, combine, evaluate
from stead.store import policy as policy_store
from stead.store import principals
from stead.store.audit import AuditWriter, run_event
from stead.store.db import Conn, Pool
from stead.telemetry import set_attributes, span
from stead.tools import Tool, ToolContext, ToolRefused, ToolResult


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
        runtime: Runtime,
        audit: AuditWriter,
        http: httpx.AsyncClient,
        *,
        heartbeat_every: float = 5.0,
    ) -> None:
        self._heartbeat_every = heartbeat_every
        self._pool = pool
        self._runtime = runtime
        self._policy = runtime.policies.permissions
        self._audit = audit
        self._clients = {
            name: IntegrationClient(integration, runtime.configs.get(name), http)
            for name, integration in runtime.integrations.items()
        }

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
        spec = self._runtime.tools.get(call.tool)
        if spec is not None and call.offered and spec.name not in call.offered:
            spec = None  # the pipeline does not offer it: as good as unknown
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
            result = await self._execute(spec, call, decision)
            outcome = ToolOutcome(
                status="executed",
                content=result.content,
                rule=decision.verdict.rule,
                arguments=decision.arguments,
                facts=decision.facts,
                data=result.data,
            )
        except ToolRefused as exc:
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

    async def _decide(self, conn: Conn, call: ToolInvocation, spec: Tool[Any] | None) -> _Decision:
        raw = call.approval.arguments if call.approval else call.arguments
        if spec is None:
            return _deny(f"unknown tool {call.tool!r}", "unknown-tool", raw, call.facts)
        try:
            arguments = spec.arguments(raw)
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
        context = RecordContext(tenant=tenant, db=self._pool)
        facts = await self._facts(context, call.facts)
        checked = dict(arguments)
        if spec.subject is not None:
            # The record the call names must exist in this tenant, and the acting user (and
            # the agent) must be allowed to read it: a call about a record they may not see,
            # or one that does not exist, is refused whatever else it would be allowed.
            kind, subject_id = spec.subject.resource, str(arguments[spec.subject.argument])
            record = await self._runtime.app.records[kind](context, subject_id)
            if record is None:
                unknown = f"no {kind} {subject_id!r} in this tenant"
                return _deny(unknown, "subject-unknown", arguments, facts)
            seen = {**record, spec.subject.argument: subject_id}
            if spec.resource == kind and spec.action == "read":
                checked.update(seen)
            else:
                read = await self._verdict(conn, call, "read", kind, user.roles, seen, facts)
                if not read.allowed:
                    why = f"may not read this {kind} ({read.reason})"
                    return _deny(why, read.rule, arguments, facts)
        lacking = self._lacking_scopes(spec)
        if lacking:
            verdict = Verdict(
                effect="deny",
                rule="integration-scope",
                reason=f"{spec.integration.name if spec.integration else '?'} lacks"
                f" {', '.join(lacking)}",
            )
        else:
            verdict = await self._verdict(
                conn, call, spec.action, spec.resource, user.roles, checked, facts
            )
        return _decision_for(verdict, call, arguments, facts)

    def _lacking_scopes(self, spec: Tool[Any]) -> list[str]:
        """The scopes the tool needs that its integration's credential is not scoped to."""
        if spec.integration is None or not spec.scopes:
            return []
        client = self._clients[spec.integration.name]
        # Not configured: the handler's call says so (IntegrationNotConfigured), not a denial.
        held = set(client.scopes) if client.configured else set(spec.integration.scopes)
        return [scope for scope in spec.scopes if scope not in held]

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

    async def _facts(self, context: RecordContext, given: dict[str, Any]) -> dict[str, Any]:
        """Trusted facts: what the run says, completed by the application's `facts` hook from
        its own records (never from the model)."""
        hook = self._runtime.app.facts
        if hook is None:
            return dict(given)
        return {**given, **(await hook(context, given))}

    # --- executing -------------------------------------------------------------------------

    async def _execute(
        self, spec: Tool[Any], call: ToolInvocation, decision: _Decision
    ) -> ToolResult:
        context = ToolContext(
            tenant=call.context.tenant,
            run_id=call.context.run_id,
            requested_by=call.context.requested_by,
            pipeline=call.context.pipeline,
            op_key=call.op_key,
            http=self._clients[spec.integration.name] if spec.integration else None,
            db=self._pool,
            facts=decision.facts,
        )
        args = spec.input_model.model_validate(decision.arguments)
        result = await heartbeating(spec.handler(context, args), self._heartbeat_every)
        if isinstance(result, ToolResult):
            return result
        return ToolResult.of(result)

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
