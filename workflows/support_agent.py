"""`support-agent`: a tool-use agent that works a support ticket.

The model proposes tool calls; every call goes through the tool gateway (`use_tool`), which
decides from grants, not from the prompt: the agent may read the ticket's customer, draft a
reply, email the customer's own address, and only *propose* a refund, which runs after a
finance user approves it. Parallel tool calls may wait on several approvals at once. A refused
call goes back to the model as a `tool_result` error and the loop continues.

Stages: intake → model_call ⇄ tool_execution (⇄ review) → completed. A budget exhausted
mid-conversation parks the run for an approval to raise it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    import stead
    from activities.support_desk import TOOLS
    from stead import Stage
    from workflows.inputs import SupportOutcome, SupportTicket


SYSTEM = (
    "You are a support agent. Work the ticket with the tools you are given: look up the"
    " customer, draft a reply, refund when the ticket warrants it, and email the customer."
    " Tools may refuse a call; a refusal is final, so explain it to the customer instead of"
    " retrying. Finish with a one-paragraph summary of what you did."
)


class SupportAgentWorkflow(
    stead.Pipeline[SupportTicket, SupportOutcome],
    name="support-agent",
    stages=(Stage.MODEL_CALL, Stage.TOOL_EXECUTION, Stage.REVIEW),
    approvals=("tool_call",),
    tasks=("agent",),
    tools=TOOLS,
    on_budget_exhausted="approval",
):
    """A tool-use agent working a ticket: look up the customer, draft a reply, propose a
    refund (a finance user approves it), email the customer."""

    async def steps(self, ticket: SupportTicket) -> stead.Outcome[SupportOutcome]:
        # What the run itself knows and trusts: tool arguments are checked against these.
        facts = {"customer_id": ticket.customer_id, "ticket_id": ticket.ticket_id}
        messages: list[dict[str, Any]] = [
            {
                "role": "user",
                "content": f"Ticket {ticket.ticket_id}\ncustomer_id: {ticket.customer_id}\n"
                f"subject: {ticket.subject}\n\n{ticket.body}",
            }
        ]
        final = "Stopped: the conversation reached its turn limit."
        for turn in range(1, ticket.max_turns + 1):
            reply = await self.call_model(
                step=f"turn-{turn}",
                task="agent",
                system=SYSTEM,
                messages=messages,
                tools=self.tools,
                max_tokens=1024,
                cache=False,  # a conversation turn is never worth caching
            )
            messages.append({"role": "assistant", "content": reply.content})
            if not reply.tool_uses:
                final = reply.text
                break
            results = await asyncio.gather(*(self.use_tool(t, facts) for t in reply.tool_uses))
            messages.append({"role": "user", "content": list(results)})
        return stead.Completed(SupportOutcome(reply=final, actions=self.actions))
