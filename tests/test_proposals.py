"""Approval proposals in the inbox and in run views, redacted for the viewer (api/proposals.py).

Secrets are shown to no one; masked content only to the approval's deciders and to holders of
`audit:read_sensitive`; the run keeps, and the decision applies to, the proposal as proposed.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import Tenant
from tests.helpers import wait_json

GITHUB = "ghp_" + "R8fQ2kLm9ZxW4vT7bN1cY6sH3jD5gA0eU2iO"
SLACK = "xoxb-1234567890-0987654321-AbCdEfGhIjKlMnOpQrStUvWx"
CARD = "4111_1111_1111_1111"
EMAIL = "bob@example.com"
# The simulator's summary repeats the first words of the text, secrets included.
TEXT = f"Deploy with {GITHUB} and {SLACK}, card {CARD}, password: hunter2, mail {EMAIL} today."
SECRETS = (GITHUB, SLACK, CARD, "hunter2")


def summary_of(approval: dict[str, Any]) -> str:
    return str(approval["proposal"]["summary"])


def no_secrets(body: dict[str, Any]) -> None:
    text = str(body)
    for secret in SECRETS:
        assert secret not in text


@pytest.mark.usefixtures("worker")
async def test_proposals_are_redacted_for_each_viewer(
    api: httpx.AsyncClient, tenant: Tenant
) -> None:
    started = await api.post(
        "/v1/runs",
        json={"pipeline": "summarize", "input": {"text": TEXT}},
        headers=tenant.auth("requester"),
    )
    assert started.status_code == 201, started.text
    run_id = started.json()["run_id"]
    inbox = await wait_json(
        api,
        "/v1/approvals",
        tenant.auth("approver"),
        lambda b: any(a["run_id"] == run_id for a in b["items"]),
    )
    (approval,) = [a for a in inbox["items"] if a["run_id"] == run_id]
    path = f"/v1/approvals/{approval['approval_id']}"

    # The decider reads what they approve, secrets dropped, in the inbox, the approval and
    # the run alike.
    as_approver = [
        approval,
        (await api.get(path, headers=tenant.auth("approver"))).json(),
        (await api.get(f"/v1/runs/{run_id}", headers=tenant.auth("approver"))).json()[
            "pending_approvals"
        ][0],
    ]
    for seen in as_approver:
        no_secrets(seen)
        assert summary_of(seen) == (
            "Summary: Deploy with [redacted:github_token] and [redacted:slack_token], card"
            " [redacted:card_number], password: [redacted:credential], mail"
            f" {EMAIL} today."
        )

    # Someone the approval does not wait for sees it masked, as in the audit views.
    run = (await api.get(f"/v1/runs/{run_id}", headers=tenant.auth("requester"))).json()
    no_secrets(run["approvals"])
    for seen in (
        run["approvals"][0],
        run["pending_approvals"][0],
        (await api.get(path, headers=tenant.auth("requester"))).json(),
    ):
        assert seen["proposal"] == {"summary": "[masked]"}

    # audit:read_sensitive shows masked content; secrets stay dropped even for an admin.
    admin = (await api.get(path, headers=tenant.auth("admin"))).json()
    no_secrets(admin)
    assert summary_of(admin) == summary_of(approval)

    # The tenant's own fields apply too.
    declared = await api.put(
        "/v1/admin/redaction", json={"drop": ["summary"]}, headers=tenant.auth("admin")
    )
    assert declared.status_code == 200, declared.text
    assert (await api.get(path, headers=tenant.auth("approver"))).json()["proposal"] == {
        "summary": "[redacted]"
    }

    # The decision applies to the proposal as proposed: the run's result holds the summary
    # the model wrote, not the view of it.
    decided = await api.post(
        f"{path}/decision", json={"decision": "approve"}, headers=tenant.auth("approver")
    )
    assert decided.status_code == 200, decided.text
    run_path, requester = f"/v1/runs/{run_id}", tenant.auth("requester")
    done = await wait_json(api, run_path, requester, lambda b: b["status"] == "completed")
    assert GITHUB in done["result"]["summary"]
    assert done["approvals"][0]["proposal"] == {"summary": "[redacted]"}
