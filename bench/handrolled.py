"""Hand-rolled: what a team would write on plain Temporal instead of Stead, as a baseline.

The same workflow shapes as Stead's `triage` and reviewed `summarize`, each model step one
activity making one real `AsyncAnthropic(max_retries=0).messages.create` call to the same
simulator with the same model, system prompt and `max_tokens` (from `bench.shape`), and
nothing else: the default data converter, no interceptors, no database, no budget, usage or
audit records, default worker settings. Run as its own process, like Stead's worker:

    python -m bench.handrolled   # polls STEAD_TASK_QUEUE on STEAD_TEMPORAL_ADDRESS until SIGTERM

- `hand-triage`: classify, draft, check (three sequential model calls).
- `hand-approval`: one model call (the summary), then waits for the `confirm` update.

Configuration comes from the environment the benchmark sets (`STEAD_TEMPORAL_ADDRESS`,
`STEAD_TASK_QUEUE`, `STEAD_MODEL_BASE_URL`, `BENCH_SHAPE`) and is read with `os.environ`:
Stead's settings loader is part of what this baseline leaves out.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.client import Client

with workflow.unsafe.imports_passed_through():
    import anthropic

    from bench.serve import configure_logging, serve_until_stopped
    from bench.shape import HAND_APPROVAL, HAND_TRIAGE, Shape, check_text

_TIMEOUT = timedelta(seconds=60)
SIM_KEY = "bench"  # the simulator wants a key; any will do


@dataclass(frozen=True)
class HandInput:
    text: str


@dataclass(frozen=True)
class StepInput:
    step: str
    text: str


@dataclass(frozen=True)
class HandTriage:
    label: str
    draft: str
    check: str


@dataclass(frozen=True)
class HandDecision:
    approve: bool


@dataclass(frozen=True)
class HandSummary:
    summary: str
    outcome: str


class ModelSteps:
    """The one activity: a model step by name, its request taken from the shape."""

    def __init__(self, client: anthropic.AsyncAnthropic, shape: Shape) -> None:
        self._client = client
        self._shape = shape

    @activity.defn(name="hand.model_step")
    async def model_step(self, params: StepInput) -> str:
        step = self._shape.step(params.step)
        message = await self._client.messages.create(
            model=step.model,
            max_tokens=step.max_tokens,
            system=step.system,
            messages=[{"role": "user", "content": params.text}],
        )
        return "".join(block.text for block in message.content if block.type == "text")


async def _step(name: str, text: str) -> str:
    return await workflow.execute_activity_method(
        ModelSteps.model_step, StepInput(name, text), start_to_close_timeout=_TIMEOUT
    )


@workflow.defn(name=HAND_TRIAGE)
class HandTriageWorkflow:
    @workflow.run
    async def run(self, task: HandInput) -> HandTriage:
        label = await _step("classify", task.text)
        draft = await _step("draft", task.text)
        verdict = await _step("check", check_text(task.text, draft))
        return HandTriage(label=label, draft=draft, check=verdict)


@workflow.defn(name=HAND_APPROVAL)
class HandApprovalWorkflow:
    def __init__(self) -> None:
        self._decision: HandDecision | None = None

    @workflow.update
    def confirm(self, decision: HandDecision) -> str:
        self._decision = decision
        return "accepted"

    @workflow.run
    async def run(self, task: HandInput) -> HandSummary:
        summary = await _step("summarize", task.text)
        await workflow.wait_condition(lambda: self._decision is not None)
        assert self._decision is not None
        outcome = "approved" if self._decision.approve else "rejected"
        return HandSummary(summary=summary, outcome=outcome)


async def serve(target: str, queue: str, model_url: str, shape: Shape) -> None:
    client = await Client.connect(target)
    model = anthropic.AsyncAnthropic(base_url=model_url, api_key=SIM_KEY, max_retries=0)
    await serve_until_stopped(
        client,
        queue,
        "hand-rolled",
        workflows=[HandTriageWorkflow, HandApprovalWorkflow],
        activities=[ModelSteps(model, shape).model_step],
    )


def main() -> None:
    configure_logging()
    asyncio.run(
        serve(
            os.environ["STEAD_TEMPORAL_ADDRESS"],
            os.environ["STEAD_TASK_QUEUE"],
            os.environ["STEAD_MODEL_BASE_URL"],
            Shape.from_env(),
        )
    )


if __name__ == "__main__":
    main()
