"""The payments and email simulators, exercised over real HTTP on loopback.

What matters most is exactly-once: replays, concurrent duplicates, faults after commit and
restarts must never produce a second effect for one idempotency key.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from stead.sim.integrations import create_email_app, create_payments_app
from tests.servers import serve_app

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REFUND: dict[str, Any] = {
    "customer_id": "cus_1",
    "amount": "40.00",
    "currency": "USD",
    "reason": "damaged item",
}
MESSAGE: dict[str, Any] = {
    "to": "ada@example.com",
    "subject": "Your refund",
    "body": "We refunded 40.00 USD.",
}


def key(name: str) -> dict[str, str]:
    return {"Idempotency-Key": name}


@pytest.fixture
async def payments() -> AsyncIterator[httpx.AsyncClient]:
    async with (
        serve_app(create_payments_app(TOKEN)) as url,
        httpx.AsyncClient(base_url=url, headers=AUTH) as client,
    ):
        yield client


@pytest.fixture
async def email() -> AsyncIterator[httpx.AsyncClient]:
    async with (
        serve_app(create_email_app(TOKEN)) as url,
        httpx.AsyncClient(base_url=url, headers=AUTH) as client,
    ):
        yield client


async def refunds(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    response = await client.get("/v1/refunds")
    assert response.status_code == 200
    result: list[dict[str, Any]] = response.json()
    return result


async def calls(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    response = await client.get("/v1/calls")
    assert response.status_code == 200
    result: list[dict[str, Any]] = response.json()
    return result


async def test_refund_is_created_and_listed(payments: httpx.AsyncClient) -> None:
    response = await payments.post("/v1/refunds", json=REFUND, headers=key("run-1:act-1"))

    assert response.status_code == 201
    refund = response.json()
    assert re.fullmatch(r"re_[0-9a-f]{24}", refund["id"])
    assert refund["status"] == "succeeded"
    assert {k: refund[k] for k in ("customer_id", "amount", "currency")} == {
        "customer_id": "cus_1",
        "amount": "40.00",
        "currency": "USD",
    }
    assert refund["created_at"].endswith("Z")
    assert "Idempotent-Replayed" not in response.headers
    assert await refunds(payments) == [refund]
    assert [(c["key"], c["path"], c["status"], c["replayed"]) for c in await calls(payments)] == [
        ("run-1:act-1", "/v1/refunds", 201, False)
    ]


async def test_refund_id_is_deterministic_from_the_key(payments: httpx.AsyncClient) -> None:
    first = await payments.post("/v1/refunds", json=REFUND, headers=key("k-1"))
    await payments.post("/_control/reset")
    again = await payments.post("/v1/refunds", json=REFUND, headers=key("k-1"))
    other = await payments.post("/v1/refunds", json=REFUND, headers=key("k-2"))

    assert first.json()["id"] == again.json()["id"]
    assert other.json()["id"] != first.json()["id"]


async def test_replay_returns_the_original_without_a_second_refund(
    payments: httpx.AsyncClient,
) -> None:
    first = await payments.post("/v1/refunds", json=REFUND, headers=key("k"))
    # "40" normalises to "40.00": the same refund, so a replay rather than a conflict.
    replay = await payments.post("/v1/refunds", json={**REFUND, "amount": "40"}, headers=key("k"))

    assert first.status_code == 201
    assert replay.status_code == 200
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json() == first.json()
    assert len(await refunds(payments)) == 1
    assert [(c["status"], c["replayed"]) for c in await calls(payments)] == [
        (201, False),
        (200, True),
    ]


async def test_same_key_with_a_different_body_conflicts(payments: httpx.AsyncClient) -> None:
    first = await payments.post("/v1/refunds", json=REFUND, headers=key("k"))
    reused = await payments.post(
        "/v1/refunds", json={**REFUND, "amount": "41.00"}, headers=key("k")
    )

    assert reused.status_code == 409
    assert reused.json() == {"error": "idempotency key reused with a different request"}
    assert await refunds(payments) == [first.json()]


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "missing Idempotency-Key header"),
        (key(""), "missing Idempotency-Key header"),
        (key("k" * 201), "Idempotency-Key longer than 200 characters"),
    ],
)
async def test_idempotency_key_is_required_and_bounded(
    payments: httpx.AsyncClient, headers: dict[str, str], reason: str
) -> None:
    response = await payments.post("/v1/refunds", json=REFUND, headers=headers)

    assert response.status_code == 400
    assert response.json() == {"error": reason}
    assert await refunds(payments) == []
    assert [c["status"] for c in await calls(payments)] == [400]


async def test_a_200_character_key_is_accepted(payments: httpx.AsyncClient) -> None:
    response = await payments.post("/v1/refunds", json=REFUND, headers=key("k" * 200))

    assert response.status_code == 201


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-token", f"Basic {TOKEN}", TOKEN, "Bearer", f"Bearer {TOKEN}x"],
)
async def test_bad_token_is_rejected_everywhere(
    payments: httpx.AsyncClient, authorization: str | None
) -> None:
    headers = {"Idempotency-Key": "k"}
    if authorization is not None:
        headers["Authorization"] = authorization
    async with httpx.AsyncClient(base_url=payments.base_url, headers=headers) as anonymous:
        created = await anonymous.post("/v1/refunds", json=REFUND)
        listed = await anonymous.get("/v1/refunds")
        faulted = await anonymous.post("/_control/faults", json={"status": 500, "count": 1})
        reset = await anonymous.post("/_control/reset")

    for response in (created, listed, faulted, reset):
        assert response.status_code == 401
        assert response.json() == {"error": "missing or invalid bearer token"}
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert await refunds(payments) == []
    # The rejected POST is still on the record; the fault was never armed.
    assert [c["status"] for c in await calls(payments)] == [401]
    assert (await payments.post("/v1/refunds", json=REFUND, headers=key("k"))).status_code == 201


async def test_bearer_scheme_is_case_insensitive(payments: httpx.AsyncClient) -> None:
    response = await payments.post(
        "/v1/refunds",
        json=REFUND,
        headers={**key("k"), "Authorization": f"bearer {TOKEN}"},
    )

    assert response.status_code == 201


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"amount": "0.00"}, "amount"),
        ({"amount": "-5.00"}, "amount"),
        ({"amount": "1.001"}, "amount"),
        ({"amount": "1e3"}, "amount"),
        ({"amount": 40}, "amount"),
        ({"amount": 40.0}, "amount"),
        ({"currency": "usd"}, "currency"),
        ({"currency": "USDT"}, "currency"),
        ({"customer_id": ""}, "customer_id"),
        ({"surprise": True}, "surprise"),
    ],
)
async def test_invalid_refund_is_rejected(
    payments: httpx.AsyncClient, change: dict[str, Any], field: str
) -> None:
    response = await payments.post("/v1/refunds", json={**REFUND, **change}, headers=key("k"))

    assert response.status_code == 422
    body = response.json()
    assert body["error"].startswith("invalid request body:")
    assert field in [detail["loc"] for detail in body["details"]]
    assert await refunds(payments) == []
    # A rejected request does not claim the key.
    assert (await payments.post("/v1/refunds", json=REFUND, headers=key("k"))).status_code == 201


async def test_missing_field_and_non_json_are_rejected(payments: httpx.AsyncClient) -> None:
    missing = await payments.post(
        "/v1/refunds", json={k: v for k, v in REFUND.items() if k != "reason"}, headers=key("a")
    )
    garbage = await payments.post("/v1/refunds", content=b"{not json", headers=key("b"))

    assert missing.status_code == 422
    assert "reason" in missing.json()["error"]
    assert garbage.status_code == 422
    assert await refunds(payments) == []


@pytest.mark.parametrize("persisted", [False, True], ids=["in-memory", "persisted"])
async def test_concurrent_duplicates_produce_exactly_one_refund(
    tmp_path: Path, persisted: bool
) -> None:
    # Persisted, the commit awaits an fsync in a thread, so the duplicates really interleave.
    state_file = tmp_path / "payments.jsonl" if persisted else None
    async with (
        serve_app(create_payments_app(TOKEN, state_file)) as url,
        httpx.AsyncClient(base_url=url, headers=AUTH) as client,
    ):
        responses = await asyncio.gather(
            *(client.post("/v1/refunds", json=REFUND, headers=key("dup")) for _ in range(20))
        )
        listed = await refunds(client)
        recorded = await calls(client)

    assert sorted(r.status_code for r in responses) == [200] * 19 + [201]
    assert len({r.json()["id"] for r in responses}) == 1
    assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in responses) == 19
    assert len(listed) == 1
    assert len(recorded) == 20
    if state_file is not None:
        assert len(state_file.read_text().splitlines()) == 1


async def test_fault_after_commit_is_resolved_by_the_retry(payments: httpx.AsyncClient) -> None:
    armed = await payments.post(
        "/_control/faults", json={"status": 503, "count": 1, "after_commit": True}
    )
    failed = await payments.post("/v1/refunds", json=REFUND, headers=key("k"))
    committed = await refunds(payments)
    retried = await payments.post("/v1/refunds", json=REFUND, headers=key("k"))

    assert armed.status_code == 200
    assert failed.status_code == 503
    assert failed.json() == {"error": "injected fault: 503"}
    # The side effect happened even though the caller saw an error.
    assert len(committed) == 1
    assert retried.status_code == 200
    assert retried.headers["Idempotent-Replayed"] == "true"
    assert retried.json() == committed[0]
    assert await refunds(payments) == committed
    assert [(c["status"], c["replayed"]) for c in await calls(payments)] == [
        (503, False),
        (200, True),
    ]


async def test_fault_before_commit_performs_nothing(payments: httpx.AsyncClient) -> None:
    await payments.post("/_control/faults", json={"status": 500, "count": 2})
    statuses = [
        (await payments.post("/v1/refunds", json=REFUND, headers=key("k"))).status_code
        for _ in range(3)
    ]

    assert statuses == [500, 500, 201]
    assert len(await refunds(payments)) == 1


async def test_faults_skip_unauthenticated_and_unkeyed_posts(payments: httpx.AsyncClient) -> None:
    await payments.post("/_control/faults", json={"status": 500, "count": 1})
    unkeyed = await payments.post("/v1/refunds", json=REFUND)
    faulted = await payments.post("/v1/refunds", json=REFUND, headers=key("k"))

    assert (unkeyed.status_code, faulted.status_code) == (400, 500)


async def test_zero_count_disarms_faults(payments: httpx.AsyncClient) -> None:
    await payments.post("/_control/faults", json={"status": 500, "count": 5})
    await payments.post("/_control/faults", json={"status": 500, "count": 0})

    response = await payments.post("/v1/refunds", json=REFUND, headers=key("k"))

    assert response.status_code == 201


@pytest.mark.parametrize(
    "spec",
    [{"status": 200, "count": 1}, {"status": 500, "count": -1}, {"status": "500", "count": 1}],
)
async def test_invalid_fault_spec_is_rejected(
    payments: httpx.AsyncClient, spec: dict[str, Any]
) -> None:
    response = await payments.post("/_control/faults", json=spec)
    created = await payments.post("/v1/refunds", json=REFUND, headers=key("k"))

    assert response.status_code == 422
    assert created.status_code == 201


async def test_reset_clears_refunds_calls_keys_and_faults(payments: httpx.AsyncClient) -> None:
    await payments.post("/v1/refunds", json=REFUND, headers=key("k"))
    await payments.post("/_control/faults", json={"status": 500, "count": 3})

    reset = await payments.post("/_control/reset")

    assert reset.status_code == 200
    assert await refunds(payments) == []
    assert await calls(payments) == []
    # The key is free again and no fault remains armed.
    reused = await payments.post("/v1/refunds", json={**REFUND, "amount": "1.00"}, headers=key("k"))
    assert reused.status_code == 201


async def serve_payments_once(state_file: Path, request: dict[str, Any]) -> httpx.Response:
    async with (
        serve_app(create_payments_app(TOKEN, state_file)) as url,
        httpx.AsyncClient(base_url=url, headers=AUTH) as client,
    ):
        return await client.post("/v1/refunds", json=request, headers=key("k"))


async def test_keys_survive_a_restart(tmp_path: Path) -> None:
    state_file = tmp_path / "state" / "payments.jsonl"
    first = await serve_payments_once(state_file, REFUND)

    async with (
        serve_app(create_payments_app(TOKEN, state_file)) as url,
        httpx.AsyncClient(base_url=url, headers=AUTH) as client,
    ):
        listed = await refunds(client)
        replay = await client.post("/v1/refunds", json=REFUND, headers=key("k"))
        reused = await client.post(
            "/v1/refunds", json={**REFUND, "amount": "2.00"}, headers=key("k")
        )
        other = await client.post("/v1/refunds", json=REFUND, headers=key("k2"))

    assert first.status_code == 201
    assert listed == [first.json()]
    assert (replay.status_code, replay.json()) == (200, first.json())
    assert reused.status_code == 409
    assert other.status_code == 201
    assert len(state_file.read_text().splitlines()) == 2


async def test_a_torn_last_line_is_dropped_and_the_file_stays_appendable(tmp_path: Path) -> None:
    state_file = tmp_path / "payments.jsonl"
    first = await serve_payments_once(state_file, REFUND)
    with state_file.open("ab") as file:
        file.write(b'{"key": "torn", "fingerpr')  # a crash in the middle of a write

    app = create_payments_app(TOKEN, state_file)
    async with serve_app(app) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as client:
        listed = await refunds(client)
        torn = await client.post("/v1/refunds", json=REFUND, headers=key("torn"))

    assert listed == [first.json()]
    assert torn.status_code == 201
    lines = [json.loads(line) for line in state_file.read_text().splitlines()]
    assert [line["key"] for line in lines] == ["k", "torn"]


def test_a_corrupt_middle_line_refuses_to_start(tmp_path: Path) -> None:
    state_file = tmp_path / "payments.jsonl"
    state_file.write_text("garbage\n{}\n")

    with pytest.raises(ValueError, match=r"payments\.jsonl:1: corrupt ledger line"):
        create_payments_app(TOKEN, state_file)


async def test_reset_empties_the_state_file(tmp_path: Path) -> None:
    state_file = tmp_path / "payments.jsonl"
    async with (
        serve_app(create_payments_app(TOKEN, state_file)) as url,
        httpx.AsyncClient(base_url=url, headers=AUTH) as client,
    ):
        await client.post("/v1/refunds", json=REFUND, headers=key("k"))
        await client.post("/_control/reset")

    assert state_file.read_bytes() == b""
    second = await serve_payments_once(state_file, {**REFUND, "amount": "3.00"})
    assert second.status_code == 201


def test_empty_token_is_refused() -> None:
    with pytest.raises(ValueError, match="token"):
        create_payments_app("")


async def test_apps_do_not_share_state() -> None:
    apps: list[FastAPI] = [create_payments_app(TOKEN), create_payments_app(TOKEN)]
    async with (
        serve_app(apps[0]) as first_url,
        serve_app(apps[1]) as second_url,
        httpx.AsyncClient(headers=AUTH) as client,
    ):
        await client.post(f"{first_url}/v1/refunds", json=REFUND, headers=key("k"))
        second = await client.get(f"{second_url}/v1/refunds")

    assert second.json() == []


async def test_message_is_queued_replayed_and_listed(email: httpx.AsyncClient) -> None:
    sent = await email.post("/v1/messages", json=MESSAGE, headers=key("run-1:notify"))
    replay = await email.post("/v1/messages", json=MESSAGE, headers=key("run-1:notify"))
    reused = await email.post(
        "/v1/messages", json={**MESSAGE, "subject": "Other"}, headers=key("run-1:notify")
    )
    listed = await email.get("/v1/messages")

    assert sent.status_code == 201
    message = sent.json()
    assert re.fullmatch(r"em_[0-9a-f]{24}", message["id"])
    assert message["status"] == "queued"
    assert {k: message[k] for k in MESSAGE} == MESSAGE
    assert replay.status_code == 200
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json() == message
    assert reused.status_code == 409
    assert listed.json() == [message]
    assert [(c["path"], c["status"]) for c in (await email.get("/v1/calls")).json()] == [
        ("/v1/messages", 201),
        ("/v1/messages", 200),
        ("/v1/messages", 409),
    ]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"to": "not-an-address"}, "to"),
        ({"subject": "Hi\r\nBcc: everyone@example.com"}, "subject"),
        ({"subject": ""}, "subject"),
        ({"cc": "x@example.com"}, "cc"),
    ],
)
async def test_invalid_message_is_rejected(
    email: httpx.AsyncClient, change: dict[str, Any], field: str
) -> None:
    response = await email.post("/v1/messages", json={**MESSAGE, **change}, headers=key("k"))

    assert response.status_code == 422
    assert field in [detail["loc"] for detail in response.json()["details"]]
    assert (await email.get("/v1/messages")).json() == []


async def test_email_requires_token_and_key(email: httpx.AsyncClient) -> None:
    unkeyed = await email.post("/v1/messages", json=MESSAGE)
    async with httpx.AsyncClient(base_url=email.base_url) as anonymous:
        anonymous_post = await anonymous.post("/v1/messages", json=MESSAGE, headers=key("k"))

    assert unkeyed.status_code == 400
    assert anonymous_post.status_code == 401
    assert (await email.get("/v1/messages")).json() == []


async def test_email_concurrent_duplicates_and_fault_after_commit(
    email: httpx.AsyncClient,
) -> None:
    await email.post("/_control/faults", json={"status": 502, "count": 1, "after_commit": True})
    responses = await asyncio.gather(
        *(email.post("/v1/messages", json=MESSAGE, headers=key("k")) for _ in range(10))
    )

    assert sorted(r.status_code for r in responses) == [200] * 9 + [502]
    assert len((await email.get("/v1/messages")).json()) == 1


async def test_email_keys_survive_a_restart(tmp_path: Path) -> None:
    state_file = tmp_path / "email.jsonl"
    async with (
        serve_app(create_email_app(TOKEN, state_file)) as url,
        httpx.AsyncClient(base_url=url, headers=AUTH) as client,
    ):
        sent = await client.post("/v1/messages", json=MESSAGE, headers=key("k"))
    async with (
        serve_app(create_email_app(TOKEN, state_file)) as url,
        httpx.AsyncClient(base_url=url, headers=AUTH) as client,
    ):
        replay = await client.post("/v1/messages", json=MESSAGE, headers=key("k"))
        listed = (await client.get("/v1/messages")).json()

    assert (replay.status_code, replay.json()) == (200, sent.json())
    assert listed == [sent.json()]


RUNNER = """
import logging, sys
from pathlib import Path
from stead.sim.integrations import create_email_app, create_payments_app, serve_apps
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
token, state = sys.argv[1], Path(sys.argv[2])
serve_apps("127.0.0.1", [
    ("payments", create_payments_app(token, state / "payments.jsonl"), 0),
    ("email", create_email_app(token, state / "email.jsonl"), 0),
])
"""


async def test_serve_apps_serves_both_and_stops_on_sigterm(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", RUNNER, TOKEN, str(tmp_path), stderr=asyncio.subprocess.PIPE
    )
    assert process.stderr is not None
    try:
        ready = None
        async with asyncio.timeout(30):
            while ready is None:
                line = (await process.stderr.readline()).decode()
                assert line, "serve_apps exited before it was ready"
                ready = re.search(r"integrations ready: payments=(\S+) email=(\S+)", line)
        payments_url, email_url = ready.groups()
        async with httpx.AsyncClient(headers=AUTH) as client:
            refund = await client.post(f"{payments_url}/v1/refunds", json=REFUND, headers=key("k"))
            message = await client.post(f"{email_url}/v1/messages", json=MESSAGE, headers=key("k"))
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert (refund.status_code, message.status_code) == (201, 201)
    assert process.returncode == 0
    assert json.loads((tmp_path / "payments.jsonl").read_text())["response"] == refund.json()
    assert json.loads((tmp_path / "email.jsonl").read_text())["response"] == message.json()
