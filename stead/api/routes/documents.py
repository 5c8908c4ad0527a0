"""Documents: upload (which starts an `ingest` run), list, inspect.

The text is stored in PostgreSQL at upload; the ingest run receives only the document id, so
the text never enters Temporal history. Every query is scoped to the caller's tenant: another
tenant's document is a 404, the same as one that never existed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import secrets
from datetime import datetime

from fastapi import APIRouter, Query, Response, status
from pydantic import BaseModel, Field, field_validator
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from stead import metrics
from stead.api.deps import ApiKeyId, CurrentPrincipal, ServicesDep
from stead.api.errors import RATE_LIMITED
from stead.api.routes.runs import IdempotencyKey
from stead.builtin.ingest import IngestWorkflow
from stead.contract import RunContext, RunInput
from stead.service.access import Services, admit_start, require
from stead.service.errors import Conflict, Invalid, NotFound, ServiceError, Unavailable
from stead.service.runs import input_digest, launch, new_run_id
from stead.service.schemas import Page, Request, StartRun
from stead.store import documents
from stead.store.principals import Principal

router = APIRouter(prefix="/v1/documents", tags=["documents"])

# UTF-8 bytes of one document's text. Larger documents should be split before upload.
MAX_TEXT_BYTES = 1_000_000
DOCUMENT_ID = re.compile(r"^d_[a-z2-7]{26}$")


class DocumentIn(Request):
    title: str = Field(min_length=1, max_length=300)
    text: str = Field(min_length=1, description=f"plain text, at most {MAX_TEXT_BYTES} bytes")

    @field_validator("title", "text")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must contain more than whitespace")
        return value


class DocumentCreated(BaseModel):
    document_id: str
    run_id: str = Field(description="the ingest run; its progress shows chunks indexed")
    status: documents.DocumentStatus


class DocumentOut(BaseModel):
    document_id: str
    title: str
    status: documents.DocumentStatus
    chunk_count: int
    content_sha256: str
    run_id: str
    created_by: str
    created_at: datetime

    @staticmethod
    def of(doc: documents.Document) -> DocumentOut:
        return DocumentOut(
            document_id=doc.id,
            title=doc.title,
            status=doc.status,
            chunk_count=doc.chunk_count,
            content_sha256=doc.content_sha256,
            run_id=doc.run_id,
            created_by=doc.created_by,
            created_at=doc.created_at,
        )


class TooLarge(ServiceError):
    status, code = 413, "too_large"


def new_document_id(tenant: str, idempotency_key: str | None) -> str:
    raw = (
        hashlib.sha256(f"document\0{tenant}\0{idempotency_key}".encode()).digest()
        if idempotency_key is not None
        else secrets.token_bytes(20)
    )
    return "d_" + base64.b32encode(raw).decode().lower()[:26]


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={
        **RATE_LIMITED,
        200: {"model": DocumentCreated, "description": "an existing upload (same Idempotency-Key)"},
    },
)
async def upload(
    body: DocumentIn,
    response: Response,
    svc: ServicesDep,
    principal: CurrentPrincipal,
    key_id: ApiKeyId,
    idempotency_key: IdempotencyKey = None,
) -> DocumentCreated:
    """Store a document and start its ingest run (chunking and indexing). 413 when the text
    is over the size limit; follow `GET /v1/runs/{run_id}` for progress. Repeating the upload
    with the same `Idempotency-Key` returns the same document (200) instead of storing it
    again; the same key with another title or text is a 409."""
    require(svc, principal, "documents:write")
    size = len(body.text.encode())
    if size > MAX_TEXT_BYTES:
        raise TooLarge(f"text is {size} bytes; the limit is {MAX_TEXT_BYTES}")
    document_id = new_document_id(principal.tenant, idempotency_key)
    run_id = new_run_id(
        principal.tenant, None if idempotency_key is None else f"doc\0{idempotency_key}"
    )
    # Ingestion never waits for a person: not held back by the approval backlog.
    plan, _ = await admit_start(svc, principal, key_id, IngestWorkflow.pipeline, with_cap=False)
    async with svc.pool.acquire() as conn:
        doc, created = await documents.create(
            conn, principal.tenant, document_id, body.title, body.text, principal.id, run_id
        )
    if not created:
        same = doc.title == body.title and doc.content_sha256 == _sha256(body.text)
        if not same:
            raise Conflict("Idempotency-Key was already used with a different document")
        response.status_code = status.HTTP_200_OK
    # Started again on a retry too: the first attempt may have died before starting it, and a
    # second start of the same run id is refused by Temporal, not repeated.
    await _start_ingest(svc, principal, document_id, run_id, plan)
    return DocumentCreated(document_id=document_id, run_id=run_id, status=doc.status)


async def _start_ingest(
    svc: Services, principal: Principal, document_id: str, run_id: str, plan: str
) -> None:
    """Start the ingest run after the document is committed, so the run always finds it."""
    pipeline = IngestWorkflow.pipeline
    run_input = {"document_id": document_id}
    context = RunContext(
        tenant=principal.tenant,
        run_id=run_id,
        pipeline=pipeline,
        requested_by=principal.id,
        plan=plan,
    )
    try:
        await launch(
            svc,
            RunInput(context=context, input=run_input),
            input_digest(StartRun(pipeline=pipeline, input=run_input)),
        )
    except WorkflowAlreadyStartedError:
        return  # a retried upload: the ingest run exists
    except RPCError:
        async with svc.pool.acquire() as conn:
            await documents.mark(conn, principal.tenant, document_id, "failed")
        raise Unavailable("could not start indexing; upload the document again") from None
    metrics.RUNS_STARTED.labels(pipeline).inc()


@router.get("")
async def list_documents(
    svc: ServicesDep,
    principal: CurrentPrincipal,
    limit: int = Query(50, ge=1, le=500),
    cursor: str | None = Query(None, max_length=1000),
) -> Page[DocumentOut]:
    """The caller's tenant's documents, newest first."""
    require(svc, principal, "documents:read")
    async with svc.pool.acquire() as conn:
        found = await documents.list_recent(
            conn, principal.tenant, limit=limit + 1, before=_after(cursor)
        )
    items = [DocumentOut.of(d) for d in found[:limit]]
    return Page(items=items, next_cursor=_cursor(found[limit - 1]) if len(found) > limit else None)


@router.get("/{document_id}")
async def get_document(
    document_id: str, svc: ServicesDep, principal: CurrentPrincipal
) -> DocumentOut:
    """A document's status and chunk count."""
    require(svc, principal, "documents:read")
    if not DOCUMENT_ID.match(document_id):
        raise NotFound("no such document")
    async with svc.pool.acquire() as conn:
        doc = await documents.get(conn, principal.tenant, document_id)
    if doc is None:
        raise NotFound("no such document")
    return DocumentOut.of(doc)


def _cursor(doc: documents.Document) -> str:
    return base64.urlsafe_b64encode(f"{doc.created_at.isoformat()}|{doc.id}".encode()).decode()


def _after(cursor: str | None) -> tuple[datetime, str] | None:
    if cursor is None:
        return None
    try:
        when, document_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        return datetime.fromisoformat(when), document_id
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise Invalid("cursor is not one this API returned") from None
