"""Bare Temporal: the baselines every benchmark compares Stead against.

The same shapes as Stead's pipelines with nothing of Stead in them: the default data
converter (no pydantic, no encryption, no claim-check), no interceptors, no database, no
model, default worker settings. Run as its own process, like Stead's worker:

    python -m bench.bare      # polls STEAD_TASK_QUEUE on STEAD_TEMPORAL_ADDRESS until SIGTERM

- `bare-three-steps`: three sequential no-op activities (Stead's `triage`: three model steps).
- `bare-approval`: one no-op activity, then waits for a decision (Stead's `summarize` with
  `review: true`: one model step, then a human decision), sent either as the `decide` signal
  or as the `confirm` update (Stead's decisions are updates: the caller waits for the worker).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.client import Client

from bench.serve import configure_logging, serve_until_stopped

with workflow.unsafe.imports_passed_through():
    from stead.config import load_settings

STEPS = ("classify", "draft", "check")
_TIMEOUT = timedelta(seconds=30)


@dataclass(frozen=True)
class BareInput:
    text: str


@dataclass(frozen=True)
class BareDecision:
    approve: bool


@dataclass(frozen=True)
class BareResult:
    outcome: str


@activity.defn(name="bare.noop")
async def noop(step: str) -> str:
    return step


@workflow.defn(name="bare-three-steps")
class BareThreeSteps:
    @workflow.run
    async def run(self, task: BareInput) -> BareResult:
        for step in STEPS:
            await workflow.execute_activity(noop, step, start_to_close_timeout=_TIMEOUT)
        return BareResult(outcome="completed")


@workflow.defn(name="bare-approval")
class BareApproval:
    def __init__(self) -> None:
        self._decision: BareDecision | None = None

    @workflow.signal
    def decide(self, decision: BareDecision) -> None:
        self._decision = decision

    @workflow.update
    def confirm(self, decision: BareDecision) -> BareResult:
        self._decision = decision
        return BareResult(outcome="accepted")

    @workflow.run
    async def run(self, task: BareInput) -> BareResult:
        await workflow.execute_activity(noop, "summarize", start_to_close_timeout=_TIMEOUT)
        await workflow.wait_condition(lambda: self._decision is not None)
        assert self._decision is not None
        return BareResult(outcome="approved" if self._decision.approve else "rejected")


async def serve(target: str, queue: str) -> None:
    client = await Client.connect(target)
    await serve_until_stopped(
        client, queue, "bare", workflows=[BareThreeSteps, BareApproval], activities=[noop]
    )


def main() -> None:
    configure_logging()
    settings = load_settings()
    asyncio.run(serve(settings.temporal_target, settings.task_queue))


if __name__ == "__main__":
    main()
