"""`stead runs ...` and `stead approvals ...` as a user runs them: the real `stead` command in
a process of its own, against the API on a loopback server."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from temporalio.worker import Worker

from tests.conftest import Tenant
from tests.events_support import LiveApi, served
from tests.helpers import eventually

__all__ = ["served"]  # the fixture, used by name

STEAD = Path(sys.executable).parent / "stead"
TEXT = "Revenue grew 12% in Q3. Costs fell 3%."


@dataclass
class Done:
    code: int
    out: str
    err: str


def environment(served: LiveApi, key: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEAD_")}
    env["STEAD_URL"] = served.url
    if key is not None:
        env["STEAD_API_KEY"] = key
    return env


async def stead(served: LiveApi, key: str | None, *args: str) -> Done:
    process = await asyncio.create_subprocess_exec(
        str(STEAD),
        *args,
        env=environment(served, key),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return Done(process.returncode, out.decode(), err.decode())


async def test_a_run_is_started_watched_and_approved_from_the_terminal(
    served: LiveApi, worker: list[Worker], tenant: Tenant
) -> None:
    requester, approver = tenant.keys["requester"], tenant.keys["approver"]
    body = json.dumps({"text": TEXT})
    key = uuid.uuid4().hex
    started = await stead(
        served, requester, "runs", "start", "summarize", "--input", body, "--key", key
    )
    assert started.code == 0, started.err
    run_id = started.out.strip()
    again = await stead(
        served, requester, "runs", "start", "summarize", "--input", body, "--key", key
    )
    assert again.out.strip() == f"{run_id} (existing run, same key)"

    # An admin watches: they may read content (the reply as it streams, the output).
    admin = tenant.keys["admin"]
    watching = asyncio.create_task(stead(served, admin, "runs", "watch", run_id))

    inbox = await eventually(
        lambda: stead(served, approver, "approvals", "list"), lambda d: run_id in d.out, within=60
    )
    (line,) = [row for row in inbox.out.splitlines() if run_id in row]
    approval_id = line.split()[0]
    decided = await stead(
        served, approver, "approvals", "decide", approval_id, "approve", "--edit", "summary=Short."
    )
    assert decided.out.strip() == f"{approval_id} approved (1/1)", decided
    watched = await asyncio.wait_for(watching, 120)

    assert watched.code == 0, watched.err
    lines = watched.out.splitlines()
    kinds = [row.split()[1] for row in lines if row[:2].isdigit()]
    assert kinds[0] == "run.started"
    assert {"stage.entered", "model.called", "approval.requested", "approval.decided"} <= set(kinds)
    assert kinds[-1] == "run.completed"
    assert '"summary": "Short."' in lines[-1]
    assert any(row.startswith("  Summary:") for row in lines)  # the streamed text
    for output in (started, watched, decided):
        for secret in (requester, approver, admin):
            assert secret not in output.out + output.err

    masked = await stead(served, requester, "runs", "watch", run_id)  # replayed, redacted
    assert masked.out.splitlines()[-1].endswith('run.completed        "[masked]"')
    assert not any(row.startswith("  ") for row in masked.out.splitlines())

    shown = await stead(served, requester, "runs", "show", run_id)
    assert json.loads(shown.out)["status"] == "completed"
    listed = await stead(served, requester, "runs", "list", "--pipeline", "summarize")
    assert any(row.startswith(run_id) and "completed" in row for row in listed.out.splitlines())


async def test_cancel_and_retry_from_the_terminal(
    served: LiveApi, worker: list[Worker], tenant: Tenant
) -> None:
    key = tenant.keys["requester"]
    started = await stead(
        served, key, "runs", "start", "summarize", "--input", json.dumps({"text": TEXT})
    )
    run_id = started.out.strip()
    cancelled = await stead(served, key, "runs", "cancel", run_id)
    assert cancelled.out.strip() == f"{run_id} cancelling", cancelled

    await eventually(
        lambda: stead(served, key, "runs", "show", run_id),
        lambda d: json.loads(d.out)["status"] == "cancelled",
        within=60,
    )
    again = await stead(served, key, "runs", "retry", run_id, "--mode", "restart")
    assert again.code == 0, again.err
    assert again.out.strip().startswith("r_")
    assert again.out.strip() != run_id


async def test_refusals_are_one_line_with_the_apis_code(
    served: LiveApi, worker: list[Worker], tenant: Tenant
) -> None:
    missing = await stead(served, tenant.keys["requester"], "runs", "show", "r_" + "a" * 26)
    assert (missing.code, missing.out) == (1, "")
    assert missing.err.startswith("stead: 404 not_found:"), missing.err
    assert len(missing.err.splitlines()) == 1

    bad = await stead(
        served, tenant.keys["requester"], "runs", "start", "summarize", "--input", "{"
    )
    assert bad.code == 2
    assert "--input is not JSON" in bad.err

    keyless = await stead(served, None, "runs", "list")
    assert keyless.code == 2
    assert "STEAD_API_KEY" in keyless.err
