"""`summarize`: summarize a text with a model, then a human approves (or edits) the summary.

Stages: intake → model_call → review → completed. The approval may be skipped with
`review: false`. A rejected summary completes the run with outcome `rejected`.
"""

from __future__ import annotations

from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from stead.calls import ModelCall
    from stead.contract import Proposal, RunInput, RunResult, Stage
    from stead.pipeline.base import PipelineWorkflow
    from workflows.inputs import SummarizeInput


SYSTEM = (
    "You summarize documents for a business audience in at most {max_words} words. Keep facts,"
    " names and figures; never add information that is not in the text."
)


@workflow.defn(name="summarize")
class SummarizeWorkflow(PipelineWorkflow):
    pipeline = "summarize"
    input_model = SummarizeInput
    stages = (Stage.INTAKE, Stage.MODEL_CALL, Stage.REVIEW, Stage.COMPLETED)

    @workflow.run
    async def run(self, run: RunInput) -> RunResult:
        return await self.drive(self._steps)

    async def _steps(self) -> tuple[str, dict[str, Any]]:
        params: SummarizeInput = self.parse_input()
        reply = await self.call_model(
            ModelCall(
                context=self._ctx,
                step="summarize",
                task="draft",
                system=SYSTEM.format(max_words=params.max_words),
                messages=[{"role": "user", "content": params.text}],
                max_tokens=min(4 * params.max_words, 4096),
            )
        )
        summary = {"summary": reply.text}
        if not params.review:
            return "completed", {**summary, "model": reply.model}
        outcome = await self.request_approval(
            Proposal(
                kind="summary",
                title="Approve summary",
                schema_name="summary",
                data=summary,
                editable=("summary",),
            ),
            self.approval_policy("review"),
        )
        result = {**outcome.data, "model": reply.model, "approval": outcome.status.value}
        return ("completed" if outcome.approved else "rejected"), result
