"""Documents and the doc-qa pipeline over the API, on the real worker, Temporal and PostgreSQL:
ingestion with progress, cited answers, escalation, not-found, tenant isolation, review, and
upload validation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from stead.calls import ChunkDocument, Passage
from stead.gateway.retrieval import RetrievalActivities, chunk_text
from stead.pipeline.base import Pipeline
from stead.service.runs import workflow_id
from stead.store import documents
from stead.store.db import Pool
from tests.conftest import Tenant, TenantFactory
from tests.helpers import audit_actions, record_history, start_run, wait_json
from workflows.doc_qa import NOT_FOUND, cited

# Ten words that share none with the questions below, repeated to make a document long enough
# for several chunks (200 words each, 40 overlapping: chunks start at words 0, 160, 320).
FILLER = "The quarterly newsletter covers office events and team updates. "
FACT = "Customers on annual plans may request a full refund within 45 days of purchase. "
# The fact sits at words 400..414: only in chunk 2 (words 320..444).
REFUNDS = FILLER * 40 + FACT + FILLER * 3
TRAVEL = (
    "Employees book flights through the travel desk. Hotel stays are capped at 200 euros per"
    " night. Taxi receipts are due after one week."
)
QUESTION = "How many days do customers have to request a refund on annual plans?"
ESCALATE_MODEL = "claude-sonnet-5-5"  # the `answer` route's `escalate` (policies/routing.yaml)


@dataclass(frozen=True)
class Library:
    refunds: str
    travel: str


async def upload(api: httpx.AsyncClient, tenant: Tenant, title: str, text: str) -> dict[str, Any]:
    response = await api.post(
        "/v1/documents", json={"title": title, "text": text}, headers=tenant.auth("requester")
    )
    assert response.status_code == 201, response.text
    created = dict(response.json())
    assert created["status"] == "pending"
    return created


async def finished(api: httpx.AsyncClient, tenant: Tenant, run_id: str) -> dict[str, Any]:
    return await wait_json(
        api, f"/v1/runs/{run_id}", tenant.auth("requester"), lambda b: b["status"] != "running"
    )


async def ingest(
    api: httpx.AsyncClient, client: Client, tenant: Tenant, title: str, text: str, chunks: int
) -> tuple[str, str]:
    """Upload, wait for the ingest run, check its result and progress; (document id, run id)."""
    created = await upload(api, tenant, title, text)
    run = await finished(api, tenant, created["run_id"])
    assert run["status"] == "completed", run
    assert run["pipeline"] == "ingest"
    assert [s["stage"] for s in run["stages"]] == ["intake", "enrichment", "completed"]
    assert run["result"] == {"document_id": created["document_id"], "chunks": chunks}
    handle = client.get_workflow_handle(workflow_id(tenant.id, created["run_id"]))
    state = await handle.query(Pipeline.state)
    assert state.progress == {"chunks": chunks, "total": chunks}
    return created["document_id"], created["run_id"]


async def make_library(api: httpx.AsyncClient, client: Client, tenant: Tenant) -> Library:
    refunds, run_id = await ingest(api, client, tenant, "Refund policy", REFUNDS, chunks=3)
    travel, _ = await ingest(api, client, tenant, "Travel policy", TRAVEL, chunks=1)
    await record_history(
        client.get_workflow_handle(workflow_id(tenant.id, run_id)), "ingest_completed"
    )
    return Library(refunds=refunds, travel=travel)


@pytest.fixture
async def library(
    api: httpx.AsyncClient, client: Client, tenant: Tenant, worker: object
) -> Library:
    return await make_library(api, client, tenant)


async def ask(api: httpx.AsyncClient, tenant: Tenant, question: str, **options: Any) -> str:
    body = {"pipeline": "doc-qa", "input": {"question": question, **options}}
    return await start_run(api, tenant, body)


def stages(run: dict[str, Any]) -> list[str]:
    return [s["stage"] for s in run["stages"]]


async def test_documents_are_listed_with_status(
    api: httpx.AsyncClient, tenant: Tenant, library: Library
) -> None:
    listed = await api.get("/v1/documents", headers=tenant.auth("approver"))
    assert listed.status_code == 200, listed.text
    by_id = {d["document_id"]: d for d in listed.json()["items"]}
    assert set(by_id) == {library.refunds, library.travel}
    assert by_id[library.refunds]["status"] == "ready"
    assert by_id[library.refunds]["chunk_count"] == 3
    assert by_id[library.travel]["chunk_count"] == 1
    one = await api.get(f"/v1/documents/{library.refunds}", headers=tenant.auth("requester"))
    assert one.json()["title"] == "Refund policy"
    assert one.json()["created_by"] == "requester"

    page = await api.get("/v1/documents?limit=1", headers=tenant.auth("requester"))
    rest = await api.get(
        f"/v1/documents?limit=1&cursor={page.json()['next_cursor']}",
        headers=tenant.auth("requester"),
    )
    assert page.json()["items"][0]["document_id"] == library.travel  # newest first
    assert rest.json()["items"][0]["document_id"] == library.refunds
    assert rest.json()["next_cursor"] is None


async def test_cited_answer(
    api: httpx.AsyncClient, tenant: Tenant, library: Library, client: Client
) -> None:
    reply = "Annual plans can be refunded within 45 days of purchase [1]."
    run_id = await ask(api, tenant, f"{QUESTION}\nsim_reply: {reply}")
    run = await finished(api, tenant, run_id)
    assert run["status"] == "completed", run
    assert stages(run) == ["intake", "retrieval", "model_call", "completed"]
    assert run["result"]["answer"] == reply
    # [1] is the chunk that holds the fact: the refund document's third chunk.
    assert run["result"]["citations"] == [
        {"ref": 1, "document_id": library.refunds, "chunk_no": 2, "title": "Refund policy"}
    ]
    assert run["usage"]["model_calls"] == 1
    await record_history(client.get_workflow_handle(workflow_id(tenant.id, run_id)), "docqa_cited")


async def test_uncited_answer_escalates_once(
    api: httpx.AsyncClient, tenant: Tenant, library: Library, client: Client, pool: Pool
) -> None:
    run_id = await ask(api, tenant, f"{QUESTION}\nsim_reply: About six weeks.")
    run = await finished(api, tenant, run_id)
    assert run["status"] == "completed", run
    assert run["usage"]["model_calls"] == 2
    assert run["attempts"] == {"answer": 1, "answer-escalated": 1}
    assert run["result"]["model"] == ESCALATE_MODEL
    # The stronger model did no better here (the simulator's reply is forced): no third call,
    # and the answer goes out without citations rather than with invented ones.
    assert run["result"]["citations"] == []
    actions = await audit_actions(pool, tenant, run_id)
    model_steps = [a for a in actions if a.startswith("model.")]
    assert model_steps == ["model.called", "model.escalated", "model.called"]
    await record_history(
        client.get_workflow_handle(workflow_id(tenant.id, run_id)), "docqa_escalated"
    )


async def test_no_match_answers_without_model(
    api: httpx.AsyncClient, tenant: Tenant, library: Library, client: Client
) -> None:
    run_id = await ask(api, tenant, "What is the boiling point of mercury?")
    run = await finished(api, tenant, run_id)
    assert run["status"] == "completed", run
    assert run["result"]["answer"] == NOT_FOUND
    assert run["result"]["citations"] == []
    assert run["usage"]["model_calls"] == 0
    assert stages(run) == ["intake", "retrieval", "completed"]
    await record_history(
        client.get_workflow_handle(workflow_id(tenant.id, run_id)), "docqa_not_found"
    )


async def test_other_tenant_never_retrieves_my_documents(
    api: httpx.AsyncClient,
    tenant: Tenant,
    library: Library,
    make_tenant: TenantFactory,
    client: Client,
) -> None:
    other = await make_tenant()
    await ingest(api, client, other, "Travel policy", TRAVEL, chunks=1)
    question = f"{QUESTION}\nsim_reply: Within 45 days [1]."

    run_id = await ask(api, other, question)
    run = await finished(api, other, run_id)
    assert run["result"]["answer"] == NOT_FOUND
    assert run["usage"]["model_calls"] == 0
    # The same question from the owner finds the passage.
    mine = await finished(api, tenant, await ask(api, tenant, question))
    assert mine["result"]["citations"][0]["document_id"] == library.refunds

    theirs = await api.get(f"/v1/documents/{library.refunds}", headers=other.auth("requester"))
    missing = await api.get(f"/v1/documents/d_{'a' * 26}", headers=other.auth("requester"))
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json() == missing.json()
    listed = await api.get("/v1/documents", headers=other.auth("requester"))
    assert library.refunds not in {d["document_id"] for d in listed.json()["items"]}


async def test_review_parks_and_approval_completes_with_edits(
    api: httpx.AsyncClient, tenant: Tenant, library: Library, client: Client
) -> None:
    run_id = await ask(api, tenant, f"{QUESTION}\nsim_reply: 45 days [1].", review=True)
    parked = await wait_json(  # the approver reads the proposal in clear (others: masked)
        api, f"/v1/runs/{run_id}", tenant.auth("approver"), lambda b: b["stage"] == "review"
    )
    approval = parked["pending_approvals"][0]
    assert approval["kind"] == "answer"
    assert approval["editable"] == ["answer"]
    assert approval["proposal"]["answer"] == "45 days [1]."
    assert approval["proposal"]["citations"][0]["document_id"] == library.refunds

    decided = await api.post(
        f"/v1/approvals/{approval['approval_id']}/decision",
        json={"decision": "approve", "edits": {"answer": "Within 45 days of purchase [1]."}},
        headers=tenant.auth("approver"),
    )
    assert decided.status_code == 200, decided.text
    done = await finished(api, tenant, run_id)
    assert done["status"] == "completed"
    assert stages(done) == ["intake", "retrieval", "model_call", "review", "completed"]
    assert done["result"]["answer"] == "Within 45 days of purchase [1]."
    assert done["result"]["citations"] == approval["proposal"]["citations"]
    assert done["result"]["approval"] == "approved"
    await record_history(
        client.get_workflow_handle(workflow_id(tenant.id, run_id)), "docqa_reviewed"
    )


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"title": "t"}, "Field required"),
        ({"title": "t", "text": "x", "tenant": "other"}, "Extra inputs are not permitted"),
        ({"title": "   ", "text": "x"}, "more than whitespace"),
        ({"title": "t", "text": "\n\t "}, "more than whitespace"),
        ({"title": "t" * 301, "text": "x"}, "at most 300 characters"),
    ],
)
async def test_upload_validation(
    api: httpx.AsyncClient, tenant: Tenant, body: dict[str, Any], reason: str
) -> None:
    response = await api.post("/v1/documents", json=body, headers=tenant.auth("requester"))
    assert response.status_code == 422
    assert reason in response.text


async def test_upload_limits_and_rights(api: httpx.AsyncClient, tenant: Tenant) -> None:
    big = await api.post(
        "/v1/documents",
        json={"title": "big", "text": "word " * 200_001},
        headers=tenant.auth("requester"),
    )
    assert big.status_code == 413
    assert big.json() == {
        "detail": "text is 1000005 bytes; the limit is 1000000",
        "code": "too_large",
    }
    denied = await api.post(
        "/v1/documents", json={"title": "t", "text": "x"}, headers=tenant.auth("approver")
    )
    assert denied.status_code == 403
    assert (await api.get("/v1/documents")).status_code == 401


async def test_ingest_starts_only_through_documents(api: httpx.AsyncClient, tenant: Tenant) -> None:
    response = await api.post(
        "/v1/runs",
        json={"pipeline": "ingest", "input": {"document_id": f"d_{'a' * 26}"}},
        headers=tenant.auth("requester"),
    )
    assert response.status_code == 422
    assert "POST /v1/documents" in response.json()["detail"]
    bad = await api.post(
        "/v1/runs",
        json={"pipeline": "doc-qa", "input": {"question": "q", "top_k": 0}},
        headers=tenant.auth("requester"),
    )
    assert bad.status_code == 422
    assert "top_k" in bad.json()["detail"]


# --- the pieces, without a workflow ----------------------------------------------------------


def test_chunks_overlap_and_cover_every_word() -> None:
    text = " ".join(f"w{i}" for i in range(450))
    chunks = chunk_text(text, chunk_words=200, overlap_words=40)
    assert [c.split()[0] for c in chunks] == ["w0", "w160", "w320"]
    assert [len(c.split()) for c in chunks] == [200, 200, 130]
    assert chunks[0].split()[-40:] == chunks[1].split()[:40]
    assert chunks[-1].split()[-1] == "w449"
    assert chunk_text("  one\ntwo  ", 200, 40) == ["one\ntwo"]  # kept as written, trimmed
    assert chunk_text(" \n ", 200, 40) == []


def test_citations_map_to_passages() -> None:
    passages = [
        Passage(document_id=f"d{i}", chunk_no=i, title=f"T{i}", text="...", rank=0.1)
        for i in range(3)
    ]
    found = cited("A [2]. B [1, 3][2]. Not a source: [7], [0], [x].", passages)
    assert [c.ref for c in found] == [2, 1, 3]
    assert found[0].model_dump() == {"ref": 2, "document_id": "d1", "chunk_no": 1, "title": "T1"}
    assert cited("no citations", passages) == []


async def test_chunking_is_idempotent_and_batched(pool: Pool, tenant: Tenant) -> None:
    async with pool.acquire() as conn:
        await documents.create(conn, tenant.id, "d_test", "Refunds", REFUNDS, "requester", "r_x")
    activities = RetrievalActivities(pool)
    env = ActivityEnvironment()
    beats: list[Any] = []
    env.on_heartbeat = lambda *details: beats.extend(details)
    job = ChunkDocument(tenant=tenant.id, document_id="d_test", max_chunks=2)

    first = await env.run(activities.chunk_document, job)
    assert (first.total, first.done, first.written) == (3, 2, 2)
    assert beats == [{"done": 2, "total": 3}]
    async with pool.acquire() as conn:
        midway = await documents.get(conn, tenant.id, "d_test")
    assert midway is not None
    assert midway.status == "indexing"
    rest = await env.run(activities.chunk_document, job.model_copy(update={"first_chunk": 2}))
    assert (rest.done, rest.written) == (3, 1)
    again = await env.run(activities.chunk_document, job.model_copy(update={"max_chunks": 10}))
    assert (again.total, again.done, again.written) == (3, 3, 0)
    async with pool.acquire() as conn:
        doc = await documents.get(conn, tenant.id, "d_test")
        stored = await conn.fetchval(
            "SELECT count(*) FROM document_chunks WHERE tenant_id = $1", tenant.id
        )
    assert doc is not None
    assert (doc.status, doc.chunk_count, stored) == ("ready", 3, 3)


async def test_chunking_another_tenants_document_fails(pool: Pool, tenant: Tenant) -> None:
    async with pool.acquire() as conn:
        await documents.create(conn, tenant.id, "d_mine", "Mine", TRAVEL, "requester", "r_x")
    job = ChunkDocument(tenant="someone-else", document_id="d_mine")
    with pytest.raises(ApplicationError) as raised:
        await ActivityEnvironment().run(RetrievalActivities(pool).chunk_document, job)
    assert raised.value.non_retryable


async def test_search_takes_any_question_text(pool: Pool, tenant: Tenant) -> None:
    async with pool.acquire() as conn:
        await documents.create(conn, tenant.id, "d_q", "Refunds", REFUNDS, "requester", "r_x")
    await ActivityEnvironment().run(
        RetrievalActivities(pool).chunk_document,
        ChunkDocument(tenant=tenant.id, document_id="d_q"),
    )
    async with pool.acquire() as conn:
        odd = await documents.search(conn, tenant.id, 'refund -- or "annual & | ! plans:*', 5)
        stopwords_only = await documents.search(conn, tenant.id, "what is the or and", 5)
        partial = await documents.search(conn, tenant.id, "refund for zebras", 5)
    assert [(h.document_id, h.chunk_no) for h in odd] == [("d_q", 2)]
    assert stopwords_only == []
    # Any word matches: one word of three is enough to find the passage.
    assert [h.chunk_no for h in partial] == [2]
