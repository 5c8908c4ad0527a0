"""`triage`: classify an incoming message, draft a reply, check the draft: three model steps.

The cheap model classifies and checks; the drafting model writes. If the check finds the
draft unfit (its verdict does not start with "ok"), the draft is rewritten once by the
route's stronger model (a declared escalation condition). Stages: intake → model_call →
completed.
"""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    import stead
    from stead import Stage
    from workflows.inputs import Triage, TriageInput


CLASSIFY = (
    "Classify the customer message as one of: billing, bug, question, other. Answer with the label."
)
DRAFT = "Draft a short, polite reply to the customer message. Do not promise refunds."
CHECK = "Check the draft reply against the message. Answer 'ok' if it is fit to send, else say why."


class TriageWorkflow(
    stead.Pipeline[TriageInput, Triage],
    name="triage",
    stages=(Stage.MODEL_CALL,),
    tasks=("classify", "draft"),
):
    """Classify a message, draft a reply, check the draft (a rejected draft is rewritten by a
    stronger model)."""

    async def steps(self, params: TriageInput) -> stead.Outcome[Triage]:
        label = await self._ask("classify", "classify", CLASSIFY, params.message)
        draft = await self._ask("draft", "draft", DRAFT, params.message)
        verdict = await self._ask("check", "classify", CHECK, f"{params.message}\n\n---\n{draft}")
        if not verdict.strip().lower().startswith("ok"):
            self.audit("model.escalated", {"step": "draft", "reason": "the check rejected it"})
            draft = await self._ask("redraft", "draft", DRAFT, params.message, escalate=True)
        return stead.Completed(Triage(label=label, draft=draft, check=verdict))

    async def _ask(
        self, step: str, task: str, system: str, text: str, *, escalate: bool = False
    ) -> str:
        reply = await self.call_model(
            step=step, task=task, system=system, messages=text, max_tokens=400, escalate=escalate
        )
        return reply.text
