"""`support-agent`: a tool-use agent that works a support ticket.

The model proposes tool calls; every call goes through the tool gateway (`use_tool`), which
decides from grants, not from the prompt: the agent may read the customer, draft a reply,
email the customer's own domain, and only *propose* a refund, which runs after a finance user
approves it. Parallel tool calls may wait on several approvals at once. A refused call goes
back to the model as a `tool_result` error and the loop continues.

Stages: intake → model_call ⇄ tool_execution (⇄ review) → completed. A budget exhausted
mid-conversation parks the run for an approval to raise it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from policies.tools import TOOLS
    from stead.calls import ModelCall
    from stead.contract import RunInput, RunResult, Stage
    from stead.pipeline.base import PipelineWorkflow
    from workflows.inputs import SupportTicket


SYSTEM = (
    "You are a support agent. Work the ticket with the tools you are given: look up the"
    " customer, draft a reply, refund when the ticket warrants it, and email the customer."
    " Tools may refuse a call; a refusal is final, so explain it to the customer instead of"
    " retrying. Finish with a one-paragraph summary of what you did."
)
OFFERED = ("lookup_customer", "draft_reply", "issue_refund", "send_email")


@workflow.defn(name="support-agent")
class SupportAgentWorkflow(PipelineWorkflow):
    pipeline = "support-agent"
    input_model = SupportTicket
    stages = (
        Stage.INTAKE,
        Stage.MODEL_CALL,
        Stage.TOOL_EXECUTION,
        Stage.REVIEW,
        Stage.COMPLETED,
    )
    on_budget_exhausted = "approval"

    @workflow.run
    async def run(self, run: RunInput) -> RunResult:
        return await self.drive(self._steps)

    async def _steps(self) -> tuple[str, dict[str, Any]]:
        ticket: SupportTicket = self.parse_input()
        tools = [TOOLS[name].schema() for name in OFFERED]
        facts = {"customer_id": ticket.customer_id, "ticket_id": ticket.ticket_id}
        messages: list[dict[str, Any]] = [
            {
                "role": "user",
                "content": f"Ticket {ticket.ticket_id}\ncustomer_id: {ticket.customer_id}\n"
                f"subject: {ticket.subject}\n\n{ticket.body}",
            }
        ]
        final = ""
        for turn in range(1, ticket.max_turns + 1):
            reply = await self.call_model(
                ModelCall(
                    context=self._ctx,
                    step=f"turn-{turn}",
                    task="agent",
                    system=SYSTEM,
                    messages=messages,
                    tools=tools,
                    max_tokens=1024,
                    cache=False,  # a conversation turn is never worth caching
                )
            )
            messages.append({"role": "assistant", "content": reply.content})
            if not reply.tool_uses:
                final = reply.text
                break
            results = await asyncio.gather(*(self.use_tool(t, facts) for t in reply.tool_uses))
            messages.append({"role": "user", "content": list(results)})
        else:
            final = "Stopped: the conversation reached its turn limit."
        return "completed", {"reply": final, "actions": list(self._actions)}
