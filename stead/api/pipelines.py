"""The pipelines the API can start: name → workflow class (and through it, its input model)."""

from __future__ import annotations

from stead.builtin.ingest import IngestWorkflow
from stead.pipeline.base import PipelineWorkflow
from workflows.doc_qa import DocQaWorkflow
from workflows.summarize import SummarizeWorkflow
from workflows.support_agent import SupportAgentWorkflow
from workflows.triage import TriageWorkflow

PIPELINES: dict[str, type[PipelineWorkflow]] = {
    SummarizeWorkflow.pipeline: SummarizeWorkflow,
    SupportAgentWorkflow.pipeline: SupportAgentWorkflow,
    IngestWorkflow.pipeline: IngestWorkflow,
    DocQaWorkflow.pipeline: DocQaWorkflow,
    TriageWorkflow.pipeline: TriageWorkflow,
}

# Pipelines that only their own route starts (it prepares what the run needs first), with
# that route: `POST /v1/runs` refuses them.
STARTED_BY_ROUTE: dict[str, str] = {IngestWorkflow.pipeline: "POST /v1/documents"}
