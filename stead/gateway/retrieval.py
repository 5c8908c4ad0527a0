"""Retrieval activities: chunk stored documents into passages, and search them.

Both are idempotent. Chunking is a pure function of the stored text and the chunk sizes, and
chunk writes skip chunks already stored, so a retry or a second ingest run of the same
document writes nothing new. Search only reads. Neither retries internally: Temporal does.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from temporalio import activity

from stead.calls import (
    ChunkDocument,
    ChunkedDocument,
    FoundPassages,
    MarkDocument,
    Passage,
    SearchPassages,
)
from stead.errors import ErrorType, failure
from stead.store import documents
from stead.store.db import Pool

_WORD = re.compile(r"\S+")
# Chunks written per statement; the activity heartbeats after each, so a long document keeps
# proving it is alive and reports how far it got.
_WRITE_BATCH = 64


def chunk_spans(text: str, chunk_words: int, overlap_words: int) -> list[tuple[int, int]]:
    """Character spans of passages of `chunk_words` words, each overlapping the previous one
    by `overlap_words` words, so a fact that straddles a boundary is whole in one passage.

    Spans cut at word boundaries and keep the text between words as written (newlines
    included). The last passage ends at the last word; no passage is a mere tail of the
    previous one.
    """
    words = [(m.start(), m.end()) for m in _WORD.finditer(text)]
    step = max(chunk_words - overlap_words, 1)
    spans: list[tuple[int, int]] = []
    for first in range(0, len(words), step):
        last = min(first + chunk_words, len(words)) - 1
        spans.append((words[first][0], words[last][1]))
        if last == len(words) - 1:
            break
    return spans


def chunk_text(text: str, chunk_words: int, overlap_words: int) -> list[str]:
    return [text[start:end] for start, end in chunk_spans(text, chunk_words, overlap_words)]


class RetrievalActivities:
    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    @activity.defn(name="retrieval.chunk_document")
    async def chunk_document(self, job: ChunkDocument) -> ChunkedDocument:
        """Store one batch of the document's chunks; the last batch marks it `ready`."""
        text = await self._source(job)
        chunks = chunk_text(text, job.chunk_words, job.overlap_words)
        end = min(job.first_chunk + job.max_chunks, len(chunks))
        written = 0
        async with self._pool.acquire() as conn:
            if job.first_chunk == 0:
                await documents.mark(conn, job.tenant, job.document_id, "indexing")
            for batch in _batches(job.first_chunk, end):
                async with conn.transaction():
                    written += await documents.write_chunks(
                        conn, job.tenant, job.document_id, [(n, chunks[n]) for n in batch]
                    )
                    if batch.stop == len(chunks):
                        await documents.mark(
                            conn, job.tenant, job.document_id, "ready", chunk_count=len(chunks)
                        )
                activity.heartbeat({"done": batch.stop, "total": len(chunks)})
            if not chunks:
                await documents.mark(conn, job.tenant, job.document_id, "ready", chunk_count=0)
        return ChunkedDocument(
            document_id=job.document_id, total=len(chunks), done=end, written=written
        )

    @activity.defn(name="retrieval.search")
    async def search(self, request: SearchPassages) -> FoundPassages:
        async with self._pool.acquire() as conn:
            hits = await documents.search(conn, request.tenant, request.query, request.limit)
        return FoundPassages(
            passages=[
                Passage(
                    document_id=h.document_id,
                    chunk_no=h.chunk_no,
                    title=h.title,
                    text=h.text,
                    rank=h.rank,
                )
                for h in hits
            ]
        )

    @activity.defn(name="retrieval.mark_document")
    async def mark_document(self, change: MarkDocument) -> None:
        async with self._pool.acquire() as conn:
            await documents.mark(conn, change.tenant, change.document_id, change.status)

    async def _source(self, job: ChunkDocument) -> str:
        async with self._pool.acquire() as conn:
            text = await documents.source_text(conn, job.tenant, job.document_id)
        if text is None:
            # The id came from the run's own input and the tenant from its context: retrying
            # cannot make another tenant's (or a missing) document appear.
            raise failure(
                ErrorType.INVALID_INPUT, f"no document {job.document_id!r} in this tenant"
            )
        return text


def _batches(start: int, end: int) -> Iterator[range]:
    for first in range(start, end, _WRITE_BATCH):
        yield range(first, min(first + _WRITE_BATCH, end))
