"""Pydantic AI on Temporal: the same workflow shapes as Stead's, with `TemporalAgent`s.

What a team would write with `pydantic_ai.durable_exec.temporal`: each model step is one
agent run (`bench.pydantic_ai_agents`), whose model request Pydantic AI makes a Temporal
activity; Pydantic AI's plugin brings its data converter and sandbox settings. Runs only in
the peers' virtualenv (`.bench-venv`), as its own process:

    .bench-venv/bin/python -m bench.pydantic_ai_peer   # polls STEAD_TASK_QUEUE until SIGTERM

- `pai-triage`: classify, draft, check, as `triage`;
- `pai-approval`: the summary, then waits for the `confirm` update, as reviewed `summarize`.

The driver starts these by name (`bench.shape`): it runs in Stead's venv, which has no
Pydantic AI to import them from. Inputs and results are plain strings and booleans, which
the driver's default converter and Pydantic AI's read alike.
"""

from __future__ import annotations

import asyncio
import os

from temporalio import workflow
from temporalio.client import Client

with workflow.unsafe.imports_passed_through():
    from pydantic_ai.durable_exec.temporal import PydanticAIPlugin

    from bench import pydantic_ai_agents as agents
    from bench.serve import configure_logging, serve_until_stopped
    from bench.shape import PAI_APPROVAL, PAI_CONFIRM, PAI_TRIAGE, check_text


@workflow.defn(name=PAI_TRIAGE)
class PaiTriage:
    __pydantic_ai_agents__ = (agents.CLASSIFY, agents.DRAFT, agents.CHECK)

    @workflow.run
    async def run(self, message: str) -> list[str]:
        label = (await agents.CLASSIFY.run(message)).output
        draft = (await agents.DRAFT.run(message)).output
        verdict = (await agents.CHECK.run(check_text(message, draft))).output
        return [label, draft, verdict]


@workflow.defn(name=PAI_APPROVAL)
class PaiApproval:
    __pydantic_ai_agents__ = (agents.SUMMARIZE,)

    def __init__(self) -> None:
        self._approve: bool | None = None

    @workflow.update(name=PAI_CONFIRM)
    def confirm(self, approve: bool) -> str:
        self._approve = approve
        return "accepted"

    @workflow.run
    async def run(self, text: str) -> list[str]:
        summary = (await agents.SUMMARIZE.run(text)).output
        await workflow.wait_condition(lambda: self._approve is not None)
        return [summary, "approved" if self._approve else "rejected"]


async def serve(target: str, queue: str) -> None:
    client = await Client.connect(target, plugins=[PydanticAIPlugin()])
    await serve_until_stopped(client, queue, "pydantic-ai", workflows=[PaiTriage, PaiApproval])


def main() -> None:
    configure_logging()
    asyncio.run(serve(os.environ["STEAD_TEMPORAL_ADDRESS"], os.environ["STEAD_TASK_QUEUE"]))


if __name__ == "__main__":
    main()
