"""The pipelines the API can start: name → workflow class (and through it, its input model)."""

from __future__ import annotations

from workflows.base import PipelineWorkflow
from workflows.summarize import SummarizeWorkflow

PIPELINES: dict[str, type[PipelineWorkflow]] = {
    SummarizeWorkflow.pipeline: SummarizeWorkflow,
}
