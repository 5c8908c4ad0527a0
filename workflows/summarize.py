"""`summarize`: summarize a text with a model, then a human approves (or edits) the summary.

Stages: intake → model_call → review → completed. The approval may be skipped with
`review: false`. A rejected summary completes the run with outcome `rejected`.
"""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    import stead
    from stead import Stage
    from workflows.inputs import SummarizeInput, Summary, SummaryProposal


SYSTEM = (
    "You summarize documents for a business audience in at most {max_words} words. Keep facts,"
    " names and figures; never add information that is not in the text."
)


class SummarizeWorkflow(
    stead.Pipeline[SummarizeInput, Summary],
    name="summarize",
    stages=(Stage.MODEL_CALL, Stage.REVIEW),
    approvals=("review",),
    tasks=("draft",),
    proposals={"summary": SummaryProposal},
    # Its reply streams to the run's live events as the model writes it.
    stream_steps=("summarize",),
):
    """Summarize a text; a human approves, edits or rejects the summary."""

    async def steps(self, params: SummarizeInput) -> stead.Outcome[Summary]:
        reply = await self.call_model(
            step="summarize",
            task="draft",
            system=SYSTEM.format(max_words=params.max_words),
            messages=params.text,
            max_tokens=min(4 * params.max_words, 4096),
        )
        if not params.review:
            return stead.Completed(Summary(summary=reply.text, model=reply.model))
        decided = await self.request_approval(
            stead.Proposal(
                kind="summary",
                title="Approve summary",
                schema_name="summary",
                data={"summary": reply.text},
                editable=("summary",),
            ),
            step="review",
        )
        summary = Summary(
            summary=decided.data["summary"], model=reply.model, approval=decided.status.value
        )
        return stead.Completed(summary) if decided.approved else stead.Rejected(summary)
