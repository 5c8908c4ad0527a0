"""An application's own routes (`App(routers=...)`): the support desk's helpdesk intake.

The route runs operations in the caller's name through `stead.api.Runs`, so it is refused
exactly where `POST /v1/runs` would be, and a helpdesk's repeated webhook starts one run.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import Tenant
from tests.helpers import wait_json


def ticket(ticket_id: str = "HD-1001", **changes: Any) -> dict[str, Any]:
    return {
        "id": ticket_id,
        "subject": "Charged twice",
        "description": "I was charged twice for order 1188, please refund 30 USD.",
        "requester": {"customer_id": "cus_1", "email": "ignored@example.com"},
        "via": "web",  # the helpdesk sends more than the route reads
        **changes,
    }


@pytest.mark.usefixtures("worker")
async def test_the_intake_starts_one_run_per_helpdesk_ticket(
    api: httpx.AsyncClient, tenant: Tenant
) -> None:
    first = await api.post("/v1/support/intake", json=ticket(), headers=tenant.auth("requester"))
    assert first.status_code == 202, first.text
    assert first.json()["created"] is True
    again = await api.post("/v1/support/intake", json=ticket(), headers=tenant.auth("requester"))
    assert again.json()["run_id"] == first.json()["run_id"]
    assert again.json()["created"] is False

    run_id = first.json()["run_id"]
    run = await wait_json(
        api, f"/v1/runs/{run_id}", tenant.auth("requester"), lambda b: b["state_available"]
    )
    assert run["pipeline"] == "support-agent"
    assert run["requested_by"] == "requester"


async def test_the_intake_is_refused_like_the_runs_api(
    api: httpx.AsyncClient, tenant: Tenant
) -> None:
    anonymous = await api.post("/v1/support/intake", json=ticket())
    assert anonymous.status_code == 401
    no_right = await api.post("/v1/support/intake", json=ticket(), headers=tenant.auth("approver"))
    assert no_right.status_code == 403
    assert "runs:start" in no_right.json()["detail"]
    broken = await api.post(
        "/v1/support/intake",
        json=ticket(requester={"customer_id": ""}),
        headers=tenant.auth("requester"),
    )
    assert broken.status_code == 422
    spaced = await api.post(
        "/v1/support/intake", json=ticket("HD 1"), headers=tenant.auth("requester")
    )
    assert spaced.status_code == 422


async def test_the_intake_is_in_the_api_schema(api: httpx.AsyncClient) -> None:
    schema = (await api.get("/openapi.json")).json()
    assert "/v1/support/intake" in schema["paths"]
