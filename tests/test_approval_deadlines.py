"""Approval deadlines, escalation, reminders and quorum, under the time-skipping server."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment

from stead.attest import Attestor, derive_keys
from stead.config import Settings, parse_payload_keys
from stead.contract import (
    ApprovalPolicy,
    ApprovalStatus,
    DecideInput,
    OnDeadline,
    RunContext,
    RunInput,
    RunView,
)
from stead.pipeline.base import Pipeline
from stead.store.db import Pool
from tests.conftest import PAYLOAD_KEYS, Tenant
from tests.helpers import eventually, record_history
from workflows.summarize import SummarizeWorkflow

pytestmark = pytest.mark.usefixtures("time_worker")


async def start(
    env: WorkflowEnvironment, settings: Settings, tenant: Tenant, policy: ApprovalPolicy
) -> WorkflowHandle[Any, Any]:
    run_id = f"r_{uuid.uuid4().hex[:26]}"
    context = RunContext(
        tenant=tenant.id,
        run_id=run_id,
        pipeline="summarize",
        requested_by="requester",
        approvals={"review": policy},
    )
    return await env.client.start_workflow(
        SummarizeWorkflow.run,
        RunInput(context=context, input={"text": "Deadlines are enforced by the workflow."}),
        id=f"{tenant.id}:{run_id}",
        task_queue=settings.task_queue,
    )


async def pending(handle: WorkflowHandle[Any, Any]) -> RunView:
    async def probe() -> RunView:
        view: RunView = await handle.query(Pipeline.state)
        return view

    return await eventually(probe, lambda v: bool(v.pending_approvals))


async def decide(
    env: WorkflowEnvironment,
    handle: WorkflowHandle[Any, Any],
    approval_id: str,
    who: str,
    roles: tuple[str, ...],
    decision: str = "approve",
) -> None:
    """A decision as the API sends it: attested, at the (skipped) time of the server."""
    message = DecideInput(
        approval_id=approval_id,
        principal=who,
        roles=roles,
        decision=decision,
        attested_at=await env.get_current_time(),
    )
    attestor = Attestor(derive_keys(parse_payload_keys(PAYLOAD_KEYS)))
    signed = message.model_copy(update={"attestation": attestor.sign(handle.id, message.claim())})
    await handle.execute_update(Pipeline.decide, signed)


async def refused(env: WorkflowEnvironment, handle: WorkflowHandle[Any, Any], *args: Any) -> str:
    with pytest.raises(WorkflowUpdateFailedError) as caught:
        await decide(env, handle, *args)
    cause = caught.value.cause
    assert isinstance(cause, ApplicationError)
    return str(cause.type)


async def actions(pool: Pool, tenant: Tenant) -> list[str]:
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT action FROM audit_log WHERE tenant_id = $1 ORDER BY seq", tenant.id
        )
    return [r["action"] for r in rows]


async def test_escalates_to_the_next_role(
    time_env: WorkflowEnvironment, test_settings: Settings, tenant: Tenant, pool: Pool
) -> None:
    policy = ApprovalPolicy(
        roles=("approver", "admin"), timeout_seconds=3600, on_deadline=OnDeadline.ESCALATE
    )
    handle = await start(time_env, test_settings, tenant, policy)
    approval = (await pending(handle)).pending_approvals[0]
    assert approval.eligible_roles == ("approver",)
    assert (
        await refused(time_env, handle, approval.approval_id, "boss", ("admin",)) == "NotEligible"
    )

    await time_env.sleep(3601)
    view: RunView = await handle.query(Pipeline.state)
    assert view.approvals[0].eligible_roles == ("approver", "admin")
    assert view.approvals[0].level == 1
    await decide(time_env, handle, approval.approval_id, "boss", ("admin",))
    result = await handle.result()
    assert result.outcome == "completed"
    assert "approval.escalated" in await actions(pool, tenant)
    await record_history(handle, "summarize_escalated")


async def test_expires_after_the_last_escalation(
    time_env: WorkflowEnvironment, test_settings: Settings, tenant: Tenant, pool: Pool
) -> None:
    policy = ApprovalPolicy(
        roles=("approver", "admin"), timeout_seconds=600, on_deadline=OnDeadline.ESCALATE
    )
    handle = await start(time_env, test_settings, tenant, policy)
    await pending(handle)
    result = await handle.result()  # time skips through both deadlines
    assert result.outcome == "rejected"
    view: RunView = await handle.query(Pipeline.state)
    assert view.approvals[0].status is ApprovalStatus.EXPIRED
    assert (await actions(pool, tenant)).count("approval.escalated") == 1


async def test_reminds_then_expires(
    time_env: WorkflowEnvironment, test_settings: Settings, tenant: Tenant, pool: Pool
) -> None:
    policy = ApprovalPolicy(timeout_seconds=900, on_deadline=OnDeadline.REMIND, max_reminders=2)
    handle = await start(time_env, test_settings, tenant, policy)
    await pending(handle)
    await time_env.sleep(901)
    view: RunView = await handle.query(Pipeline.state)
    assert view.approvals[0].reminders == 1
    assert view.approvals[0].status is ApprovalStatus.PENDING
    result = await handle.result()
    assert result.outcome == "rejected"
    audit = await actions(pool, tenant)
    assert audit.count("approval.reminded") == 2
    assert audit.count("approval.expired") == 1
    await record_history(handle, "summarize_reminded")


async def test_auto_reject_at_deadline(
    time_env: WorkflowEnvironment, test_settings: Settings, tenant: Tenant
) -> None:
    policy = ApprovalPolicy(timeout_seconds=60, on_deadline=OnDeadline.REJECT)
    handle = await start(time_env, test_settings, tenant, policy)
    approval = (await pending(handle)).pending_approvals[0]
    result = await handle.result()
    assert result.outcome == "rejected"
    assert result.output["approval"] == "expired"
    with pytest.raises(Exception):  # noqa: B017, PT011  # the run is closed: any refusal will do
        await decide(time_env, handle, approval.approval_id, "approver", ("approver",))


async def test_quorum_needs_distinct_principals(
    time_env: WorkflowEnvironment, test_settings: Settings, tenant: Tenant
) -> None:
    policy = ApprovalPolicy(roles=("approver",), quorum=2, principals=("auditor",))
    handle = await start(time_env, test_settings, tenant, policy)
    approval = (await pending(handle)).pending_approvals[0]
    approval_id = approval.approval_id
    assert (
        await refused(time_env, handle, approval_id, "requester", ("approver",)) == "SelfApproval"
    )
    await decide(time_env, handle, approval_id, "ann", ("approver",))
    view: RunView = await handle.query(Pipeline.state)
    assert view.approvals[0].status is ApprovalStatus.PENDING
    assert view.approvals[0].approve_count == 1
    assert await refused(time_env, handle, approval_id, "ann", ("approver",)) == "AlreadyDecided"
    # A named principal may decide without the role.
    await decide(time_env, handle, approval_id, "auditor", ())
    result = await handle.result()
    assert result.outcome == "completed"
    final: RunView = await handle.query(Pipeline.state)
    assert [d.principal for d in final.approvals[0].decisions] == ["ann", "auditor"]
    await record_history(handle, "summarize_quorum")
