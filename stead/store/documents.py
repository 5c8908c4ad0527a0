"""Documents, their stored source text, their chunks and full-text search over them.

Tenant isolation is a WHERE clause: every function takes the tenant and every query filters on
it, so a document id from another tenant behaves exactly like one that does not exist.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import asyncpg

from stead.store.db import Conn

DocumentStatus = Literal["pending", "indexing", "ready", "failed"]

# Words of a question, for the any-word query (websearch syntax characters dropped).
_WORD_SPLIT = re.compile(r"\w+")


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    content_sha256: str
    status: DocumentStatus
    chunk_count: int
    run_id: str
    created_by: str
    created_at: datetime


@dataclass(frozen=True)
class Hit:
    """One passage found by `search`, ranked."""

    document_id: str
    chunk_no: int
    title: str
    text: str
    rank: float


def _document(row: asyncpg.Record) -> Document:
    return Document(
        id=row["id"],
        title=row["title"],
        content_sha256=bytes(row["content_sha256"]).hex(),
        status=row["status"],
        chunk_count=row["chunk_count"],
        run_id=row["run_id"],
        created_by=row["created_by"],
        created_at=row["created_at"],
    )


async def create(
    conn: Conn,
    tenant: str,
    document_id: str,
    title: str,
    text: str,
    created_by: str,
    run_id: str,
) -> tuple[Document, bool]:
    """Store a new document and its source text (status `pending`) in one transaction;
    `run_id` names the ingest run that will index it. An id already stored (a retried upload
    with the same idempotency key) stores nothing: (the stored document, False)."""
    async with conn.transaction():
        row = await conn.fetchrow(
            "INSERT INTO documents (tenant_id, id, title, content_sha256, created_by, run_id)"
            " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant_id, id) DO NOTHING"
            " RETURNING id, title, content_sha256, status, chunk_count, run_id, created_by,"
            " created_at",
            tenant,
            document_id,
            title,
            hashlib.sha256(text.encode()).digest(),
            created_by,
            run_id,
        )
        if row is not None:
            await conn.execute(
                "INSERT INTO document_sources (tenant_id, document_id, text) VALUES ($1, $2, $3)",
                tenant,
                document_id,
                text,
            )
    if row is not None:
        return _document(row), True
    existing = await get(conn, tenant, document_id)
    if existing is None:  # unreachable: the conflicting row exists and rows are never deleted
        raise RuntimeError("document vanished after a conflicting insert")
    return existing, False


async def get(conn: Conn, tenant: str, document_id: str) -> Document | None:
    row = await conn.fetchrow(
        "SELECT id, title, content_sha256, status, chunk_count, run_id, created_by, created_at"
        " FROM documents WHERE tenant_id = $1 AND id = $2",
        tenant,
        document_id,
    )
    return _document(row) if row is not None else None


async def list_recent(
    conn: Conn, tenant: str, *, limit: int, before: tuple[datetime, str] | None = None
) -> list[Document]:
    """The tenant's documents, newest first; `before` is the (created_at, id) to continue after."""
    after_at, after_id = before or (None, "")
    rows = await conn.fetch(
        "SELECT id, title, content_sha256, status, chunk_count, run_id, created_by, created_at"
        " FROM documents WHERE tenant_id = $1"
        " AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3))"
        " ORDER BY created_at DESC, id DESC LIMIT $4",
        tenant,
        after_at,
        after_id,
        limit,
    )
    return [_document(r) for r in rows]


async def source_text(conn: Conn, tenant: str, document_id: str) -> str | None:
    text: str | None = await conn.fetchval(
        "SELECT text FROM document_sources WHERE tenant_id = $1 AND document_id = $2",
        tenant,
        document_id,
    )
    return text


async def mark(
    conn: Conn,
    tenant: str,
    document_id: str,
    status: DocumentStatus,
    *,
    chunk_count: int | None = None,
) -> None:
    """Set the status (and the chunk count, when given).

    A `ready` document stays ready: a late retry of an earlier step cannot demote it.
    """
    await conn.execute(
        "UPDATE documents SET status = $3, chunk_count = coalesce($4, chunk_count),"
        " updated_at = now() WHERE tenant_id = $1 AND id = $2"
        " AND (status <> 'ready' OR $3 = 'ready')",
        tenant,
        document_id,
        status,
        chunk_count,
    )


async def write_chunks(
    conn: Conn, tenant: str, document_id: str, chunks: Sequence[tuple[int, str]]
) -> int:
    """Insert (chunk_no, text) pairs not stored yet; return how many were new."""
    if not chunks:
        return 0
    inserted: int = await conn.fetchval(
        "WITH new AS ("
        " INSERT INTO document_chunks (tenant_id, document_id, chunk_no, text)"
        " SELECT $1, $2, n, t FROM unnest($3::integer[], $4::text[]) AS c (n, t)"
        " ON CONFLICT (tenant_id, document_id, chunk_no) DO NOTHING RETURNING 1)"
        " SELECT count(*) FROM new",
        tenant,
        document_id,
        [n for n, _ in chunks],
        [t for _, t in chunks],
    )
    return inserted


async def search(conn: Conn, tenant: str, query: str, limit: int) -> list[Hit]:
    """The tenant's best-matching chunks of ready documents.

    `websearch_to_tsquery` alone ANDs every word, which a question phrased in full sentences
    rarely satisfies in one chunk. So a chunk matches if it has any of the question's words
    (the words joined with `or`), and chunks that match the whole question (the AND query,
    which also honours quotes and `-word`) rank above the rest; `ts_rank` orders within each.
    """
    any_words = " or ".join(_WORD_SPLIT.findall(query))
    if not any_words:
        return []
    # The tsquery expressions are inline (constant-folded) so the GIN index serves the match.
    rows = await conn.fetch(
        """
        SELECT c.document_id, c.chunk_no, d.title, c.text,
               ts_rank(c.tsv, websearch_to_tsquery('english', $3)) AS rank
        FROM document_chunks AS c
        JOIN documents AS d ON d.tenant_id = c.tenant_id AND d.id = c.document_id
        WHERE c.tenant_id = $1 AND d.tenant_id = $1 AND d.status = 'ready'
          AND c.tsv @@ websearch_to_tsquery('english', $3)
        ORDER BY c.tsv @@ websearch_to_tsquery('english', $2) DESC, rank DESC,
                 c.document_id, c.chunk_no
        LIMIT $4
        """,
        tenant,
        query,
        any_words,
        limit,
    )
    return [
        Hit(
            document_id=r["document_id"],
            chunk_no=r["chunk_no"],
            title=r["title"],
            text=r["text"],
            rank=float(r["rank"]),
        )
        for r in rows
    ]
