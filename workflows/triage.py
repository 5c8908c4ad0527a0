"""`triage`: classify an incoming message, draft a reply, check the draft: three model steps.

The cheap model classifies and checks; the drafting model writes. If the check finds the
draft unfit (its verdict does not start with "ok"), the draft is rewritten once by the
route's stronger model (a declared escalation condition). Stages: intake → model_call →
completed.
"""

from __future__ import annotations

from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from stead.calls import ModelCall, TaskClass
    from stead.contract import RunInput, RunResult, Stage
    from stead.pipeline.base import PipelineWorkflow
    from workflows.inputs import TriageInput


CLASSIFY = (
    "Classify the customer message as one of: billing, bug, question, other. Answer with the label."
)
DRAFT = "Draft a short, polite reply to the customer message. Do not promise refunds."
CHECK = "Check the draft reply against the message. Answer 'ok' if it is fit to send, else say why."


@workflow.defn(name="triage")
class TriageWorkflow(PipelineWorkflow):
    pipeline = "triage"
    input_model = TriageInput
    stages = (Stage.INTAKE, Stage.MODEL_CALL, Stage.COMPLETED)

    @workflow.run
    async def run(self, run: RunInput) -> RunResult:
        return await self.drive(self._steps)

    async def _steps(self) -> tuple[str, dict[str, Any]]:
        params: TriageInput = self.parse_input()
        label = await self._ask("classify", "classify", CLASSIFY, params.message)
        draft = await self._ask("draft", "draft", DRAFT, params.message)
        verdict = await self._ask("check", "classify", CHECK, f"{params.message}\n\n---\n{draft}")
        if not verdict.strip().lower().startswith("ok"):
            self.audit("model.escalated", {"step": "draft", "reason": "the check rejected it"})
            draft = await self._ask("redraft", "draft", DRAFT, params.message, escalate=True)
        return "completed", {"label": label, "draft": draft, "check": verdict}

    async def _ask(
        self, step: str, task: TaskClass, system: str, text: str, *, escalate: bool = False
    ) -> str:
        reply = await self.call_model(
            ModelCall(
                context=self._ctx,
                step=step,
                task=task,
                system=system,
                messages=[{"role": "user", "content": text}],
                max_tokens=400,
                escalate=escalate,
            )
        )
        return reply.text
