"""Nobody who merely reaches Temporal can decide, or cancel, in someone's name.

Before: anyone reaching Temporal's frontend could send a plaintext `decide` update naming any
principal and roles; the run counted it toward quorum and audited it as that approver. Now the
workers refuse plaintext payloads, and a decision or cancel must carry the API's attestation,
checked in the update's validator, so a forged one is refused and leaves no trace in history.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from temporalio.client import (
    Client,
    WorkflowHandle,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError

from stead.attest import Attestor, derive_keys
from stead.config import Settings
from stead.contract import CancelInput, DecideInput
from stead.errors import ErrorType
from stead.pipeline.base import Pipeline
from stead.service.runs import workflow_id
from stead.store.db import Pool
from tests.conftest import Tenant, running_workers
from tests.helpers import audit_actions, eventually, wait_json

TEXT = {"pipeline": "summarize", "input": {"text": "Revenue grew 12% in Q3. Costs fell 3%."}}


async def parked(api: httpx.AsyncClient, tenant: Tenant) -> tuple[str, str]:
    """A summarize run waiting for review: (run id, approval id)."""
    started = await api.post("/v1/runs", json=TEXT, headers=tenant.auth("requester"))
    assert started.status_code == 201, started.text
    run_id = started.json()["run_id"]
    run = await wait_json(
        api, f"/v1/runs/{run_id}", tenant.auth("requester"), lambda b: b["stage"] == "review"
    )
    return run_id, run["pending_approvals"][0]["approval_id"]


def forged(approval_id: str, **changes: Any) -> DecideInput:
    """What an attacker writes: an admin's name and roles, approving."""
    fields: dict[str, Any] = {
        "approval_id": approval_id,
        "principal": "admin",
        "roles": ("admin", "approver"),
        "decision": "approve",
        "attested_at": datetime.now(UTC),
        **changes,
    }
    return DecideInput(**fields)


async def update_events(handle: WorkflowHandle[Any, Any]) -> int:
    return len(
        [
            e
            async for e in handle.fetch_history_events()
            if e.HasField("workflow_execution_update_accepted_event_attributes")
            or e.HasField("workflow_execution_update_completed_event_attributes")
        ]
    )


async def refused(handle: WorkflowHandle[Any, Any], message: DecideInput) -> str:
    with pytest.raises(WorkflowUpdateFailedError) as caught:
        await handle.execute_update(Pipeline.decide, message, rpc_timeout=timedelta(seconds=10))
    cause = caught.value.cause
    assert isinstance(cause, ApplicationError)
    assert cause.type == ErrorType.NOT_ATTESTED
    return cause.message


@pytest.mark.usefixtures("worker")
async def test_forged_decisions_are_refused_without_a_trace(
    api: httpx.AsyncClient, tenant: Tenant, client: Client, pool: Pool, test_settings: Settings
) -> None:
    run_id, approval_id = await parked(api, tenant)
    handle = client.get_workflow_handle(workflow_id(tenant.id, run_id))
    attestor = test_settings.attestor
    assert attestor is not None
    other_run = workflow_id(tenant.id, "r_" + "a" * 26)

    # Encrypted like the API's own messages (through the codec, say), but not attested by it:
    reasons = [
        await refused(handle, forged(approval_id)),  # no attestation at all
        await refused(handle, forged(approval_id, attestation="k:" + "A" * 43 + "=")),
    ]
    # A genuine attestation, for another run:
    genuine = forged(approval_id)
    for_other = genuine.model_copy(
        update={"attestation": attestor.sign(other_run, genuine.claim())}
    )
    reasons.append(await refused(handle, for_other))
    # A genuine attestation for a requester's approval, with the roles raised afterwards:
    signed = forged(approval_id, principal="approver", roles=("requester",))
    signed = signed.model_copy(update={"attestation": attestor.sign(handle.id, signed.claim())})
    reasons.append(await refused(handle, signed.model_copy(update={"roles": ("admin",)})))
    # A genuine attestation, an hour old:
    old = forged(approval_id, attested_at=datetime.now(UTC) - timedelta(hours=1))
    old = old.model_copy(update={"attestation": attestor.sign(handle.id, old.claim())})
    reasons.append(await refused(handle, old))
    # Signed with a key the workers do not hold:
    stranger = Attestor(derive_keys([("test1", b"x" * 32)]))
    foreign = forged(approval_id)
    foreign = foreign.model_copy(update={"attestation": stranger.sign(handle.id, foreign.claim())})
    reasons.append(await refused(handle, foreign))
    mismatch = "the attestation does not match this message and run"
    assert reasons == [
        "the message carries no attestation: send it through the Stead API",
        mismatch,
        mismatch,
        mismatch,
        "the attestation is stale: send the request again",
        mismatch,
    ]

    assert await update_events(handle) == 0, "a refused update left events in the history"
    run = (await api.get(f"/v1/runs/{run_id}", headers=tenant.auth("requester"))).json()
    assert run["pending_approvals"][0]["approvals"] == 0
    assert "approval.decided" not in await audit_actions(pool, tenant, run_id)

    # The API's own decision, for the same approval, goes through.
    decided = await api.post(
        f"/v1/approvals/{approval_id}/decision",
        json={"decision": "approve"},
        headers=tenant.auth("approver"),
    )
    assert decided.status_code == 200, decided.text
    assert decided.json()["status"] == "approved"


@pytest.mark.usefixtures("worker")
async def test_plaintext_messages_change_nothing(
    api: httpx.AsyncClient, tenant: Tenant, client: Client, pool: Pool
) -> None:
    """Without the payload keys, a sender can only write plaintext, which workers refuse."""
    run_id, approval_id = await parked(api, tenant)
    plain = await Client.connect(
        client.service_client.config.target_host,
        namespace=client.namespace,
        data_converter=dataclasses.replace(pydantic_data_converter),
    )
    handle = plain.get_workflow_handle(workflow_id(tenant.id, run_id))
    with pytest.raises((WorkflowUpdateFailedError, WorkflowUpdateRPCTimeoutOrCancelledError)):
        await handle.execute_update(
            Pipeline.decide, forged(approval_id), rpc_timeout=timedelta(seconds=10)
        )
    assert await update_events(client.get_workflow_handle(handle.id)) == 0
    assert "approval.decided" not in await audit_actions(pool, tenant, run_id)
    # The run still works: the real decision completes it.
    decided = await api.post(
        f"/v1/approvals/{approval_id}/decision",
        json={"decision": "reject", "comment": "no"},
        headers=tenant.auth("approver"),
    )
    assert decided.status_code == 200, decided.text
    await wait_json(
        api,
        f"/v1/runs/{run_id}",
        tenant.auth("requester"),
        lambda b: b["status"] == "completed",
    )


@pytest.mark.usefixtures("worker")
async def test_cancel_is_attributed_only_when_it_came_through_the_api(
    api: httpx.AsyncClient, make_tenant: Any, client: Client, pool: Pool
) -> None:
    tenant = await make_tenant()
    through_api, _ = await parked(api, tenant)
    direct, _ = await parked(api, tenant)
    forged_cancel, _ = await parked(api, tenant)

    # A cancel update naming someone, without the API's attestation: refused, no trace.
    handle = client.get_workflow_handle(workflow_id(tenant.id, forged_cancel))
    with pytest.raises(WorkflowUpdateFailedError):
        await handle.execute_update(
            Pipeline.request_cancel,
            CancelInput(principal="admin", attested_at=datetime.now(UTC)),
            rpc_timeout=timedelta(seconds=10),
        )
    assert await update_events(handle) == 0

    cancelled = await api.post(f"/v1/runs/{through_api}/cancel", headers=tenant.auth("requester"))
    assert cancelled.status_code == 202, cancelled.text
    await client.get_workflow_handle(workflow_id(tenant.id, direct)).cancel()

    async def cancelled_entry(run_id: str) -> dict[str, Any]:
        async with pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT actor, data FROM audit_log WHERE tenant_id = $1 AND run_id = $2"
                " AND action = 'run.cancelled'",
                tenant.id,
                run_id,
            )
        return dict(row) if row else {}

    by_api = await eventually(lambda: cancelled_entry(through_api), bool, within=20)
    by_temporal = await eventually(lambda: cancelled_entry(direct), bool, within=20)
    assert by_api["actor"] == "requester"
    assert '"requested_through":"api"' in by_api["data"]
    assert by_temporal["actor"] == "workflow:summarize"
    assert '"requested_through":"temporal"' in by_temporal["data"]


async def test_a_worker_without_keys_accepts_no_decision(
    api_for: Any, make_tenant: Any, client: Client, pool: Pool, test_settings: Settings
) -> None:
    """Fail closed: a worker that cannot verify attestations refuses every decision, and the
    API says the deployment is misconfigured (503), not that the caller was wrong."""
    tenant = await make_tenant()
    keyless = test_settings.model_copy(update={"attestation_keys": None})
    # model_copy keeps cached properties: build the worker's own view of its keys instead.
    object.__setattr__(keyless, "__dict__", {**keyless.__dict__, "attestor": None})
    api = api_for(test_settings)
    async with running_workers(client, keyless, pool):
        _, approval_id = await parked(api, tenant)
        decided = await api.post(
            f"/v1/approvals/{approval_id}/decision",
            json={"decision": "approve"},
            headers=tenant.auth("approver"),
        )
    assert decided.status_code == 503, decided.text
    assert "attestation" in decided.json()["detail"]
