"""Stead's own pipelines, registered with every application: document ingestion."""

from __future__ import annotations

from stead.builtin.ingest import IngestWorkflow

BUILTIN_PIPELINES = (IngestWorkflow,)
# Pipelines only their own route starts (it prepares what the run needs first), with that
# route: `POST /v1/runs` refuses them.
STARTED_BY_ROUTE = {IngestWorkflow.pipeline: "POST /v1/documents"}
