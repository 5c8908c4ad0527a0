"""`ingest`: chunk and index an uploaded document for retrieval.

Started by `POST /v1/documents` (never directly through `POST /v1/runs`) with only the
document id; the text stays in PostgreSQL. Stages: intake → enrichment → completed. Chunks are
written in batches, and after each batch the `state` query's progress shows `chunks` stored of
`total`. On failure the document is marked `failed` before the run ends.
"""

from __future__ import annotations

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from pydantic import BaseModel

    from stead import retries
    from stead.builtin.inputs import IngestInput
    from stead.calls import ChunkDocument, ChunkedDocument, MarkDocument
    from stead.contract import Stage
    from stead.gateway.retrieval import RetrievalActivities
    from stead.pipeline.base import Completed, Outcome, Pipeline


# Chunks per activity call: bounds one attempt's work and is the grain of visible progress.
BATCH_CHUNKS = 256


class Indexed(BaseModel):
    document_id: str
    chunks: int


class IngestWorkflow(
    Pipeline[IngestInput, Indexed],
    name="ingest",
    temporal_name="ingest-document",
    stages=(Stage.ENRICHMENT,),
):
    """Chunk and index an uploaded document for retrieval."""

    async def steps(self, params: IngestInput) -> Outcome[Indexed]:
        self.enter(Stage.ENRICHMENT)
        try:
            chunked = await self._chunk_all(params.document_id)
        except (ActivityError, ApplicationError):
            await self._mark_failed(params.document_id)
            raise
        self.audit("document.indexed", {"document_id": params.document_id, "chunks": chunked})
        return Completed(Indexed(document_id=params.document_id, chunks=chunked))

    async def _chunk_all(self, document_id: str) -> int:
        done, total = 0, None
        while total is None or done < total:
            batch = await self._chunk_batch(document_id, done)
            done, total = batch.done, batch.total
            self.set_progress(chunks=done, total=total)
        return total

    async def _chunk_batch(self, document_id: str, first: int) -> ChunkedDocument:
        policy = retries.INGEST
        return await workflow.execute_activity_method(
            RetrievalActivities.chunk_document,
            ChunkDocument(
                tenant=self._ctx.tenant,
                document_id=document_id,
                first_chunk=first,
                max_chunks=BATCH_CHUNKS,
            ),
            start_to_close_timeout=policy.start_to_close,
            heartbeat_timeout=policy.heartbeat,
            retry_policy=policy.retry,
        )

    async def _mark_failed(self, document_id: str) -> None:
        policy = retries.RETRIEVAL
        await workflow.execute_activity_method(
            RetrievalActivities.mark_document,
            MarkDocument(tenant=self._ctx.tenant, document_id=document_id, status="failed"),
            start_to_close_timeout=policy.start_to_close,
            retry_policy=policy.retry,
        )
