"""A steered model cannot act on another customer: tool arguments are bound to the run's facts.

Before: a model told (by the ticket's text) to refund some other customer proposed
`issue_refund` for them, and after one approval the refund was paid; email could go anywhere
at the customer's domain. Now every tool that names a subject is bound to the run's trusted
facts (`{field: customer_id, fact: customer_id}`), the gateway checks the named record exists
in the tenant and that the acting user may read it, and email goes to the customer's own
address unless the tenant widens it.
"""

from __future__ import annotations

import httpx
import pytest

from activities import support_desk
from stead.store.db import Pool
from tests.conftest import Integrations, Tenant
from tests.helpers import start_run as start
from tests.test_support_agent import (
    CUSTOMER_EMAIL,
    actions,
    customers,  # noqa: F401  # a fixture, used by name
    decisions,
    finished,
    refunds_for,
    ticket,
)

pytestmark = pytest.mark.usefixtures("worker", "customers")


@pytest.fixture
async def other_customer(tenant: Tenant, pool: Pool) -> str:
    async with pool.acquire() as conn:
        await support_desk.upsert_customer(conn, tenant.id, "cus_2", "Bob Other", "bob@other.test")
    return "cus_2"


@pytest.mark.parametrize(
    "target", ["cus_2", "cus_vip", "cus_nowhere"], ids=["another", "restricted", "unknown"]
)
async def test_a_refund_for_anyone_but_the_tickets_customer_is_refused(
    api: httpx.AsyncClient,
    tenant: Tenant,
    pool: Pool,
    integrations: Integrations,
    other_customer: str,
    target: str,
) -> None:
    run_id = await start(
        api,
        tenant,
        ticket(**{"issue_refund.customer_id": target, "sim_skip_tools": "send_email"}),
    )
    run = await finished(api, tenant, run_id)
    assert run["status"] == "completed"
    assert actions(run)["issue_refund"] == "denied"
    assert run["approvals"] == []  # refused outright, never put to a reviewer
    assert await refunds_for(integrations, run_id) == []
    refund = [d for d in await decisions(pool, tenant, run_id) if d[0] == "issue_refund"]
    assert [effect for _, effect, _ in refund] == ["denied"]


async def test_no_refund_for_a_customer_the_user_may_not_read(
    api: httpx.AsyncClient, tenant: Tenant, pool: Pool, integrations: Integrations
) -> None:
    """The ticket's own customer is restricted: the requester may not read them, so their
    agent may not pay them either (an admin could)."""
    run_id = await start(
        api, tenant, ticket("cus_vip", **{"sim_skip_tools": "lookup_customer,send_email"})
    )
    run = await finished(api, tenant, run_id)
    assert actions(run)["issue_refund"] == "denied"
    assert await refunds_for(integrations, run_id) == []
    refund = [d for d in await decisions(pool, tenant, run_id) if d[0] == "issue_refund"]
    assert refund[0][2] == "role:requester/read:customer#1"


async def test_email_goes_to_the_customers_own_address_unless_the_tenant_widens_it(
    api: httpx.AsyncClient, tenant: Tenant
) -> None:
    colleague = "boss@" + CUSTOMER_EMAIL.split("@")[1]
    hints = {"send_email.to": colleague, "sim_skip_tools": "issue_refund"}
    run = await finished(api, tenant, await start(api, tenant, ticket(**hints)))
    assert actions(run)["send_email"] == "denied"

    own = await finished(
        api, tenant, await start(api, tenant, ticket(**{"sim_skip_tools": "issue_refund"}))
    )
    assert actions(own)["send_email"] == "executed"

    # The tenant opts into the whole domain, for its requesters and for the agent.
    for kind, subject in (("role", "requester"), ("agent", "support-agent")):
        widened = await api.post(
            "/v1/admin/grants",
            json={
                "subject_kind": kind,
                "subject": subject,
                "effect": "allow",
                "action": "execute",
                "resource": "email",
                "constraints": [{"field": "to", "domain_of": "customer_email"}],
            },
            headers=tenant.auth("admin"),
        )
        assert widened.status_code == 201, widened.text
    run = await finished(api, tenant, await start(api, tenant, ticket(**hints)))
    assert actions(run)["send_email"] == "executed"
