"""The peers Stead is compared with, from the driver's side: what a user would pick instead.

- **hand-rolled** (`bench.handrolled`, in Stead's venv but using none of Stead): the same
  workflow shapes on plain Temporal, each model step one real `AsyncAnthropic` call;
- **Pydantic AI** (`bench.pydantic_ai_peer`, in its own venv `.bench-venv`, which `make
  bench` builds from `bench/peers-requirements.txt`): the same shapes with `TemporalAgent`s.

Both send the simulator the requests Stead's pipelines send: the model each step's route
tries first for a tenant on the standard plan, the pipelines' own system prompts and
`max_tokens` (`shape()` reads them from Stead's sources). Both start with `start_workflow` on
a client with the default converter, as a user of either would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from temporalio.client import Client, WorkflowHandle

import workflows.summarize
import workflows.triage
from bench.handrolled import (
    HandApprovalWorkflow,
    HandDecision,
    HandInput,
    HandTriageWorkflow,
)
from bench.report import REPO
from bench.shape import (
    HAND_QUEUE,
    HAND_TRIAGE,
    PAI_APPROVAL,
    PAI_CONFIRM,
    PAI_QUEUE,
    PAI_TRIAGE,
    Shape,
    Step,
)
from stead.policy.models import load_routing
from workflows.inputs import SummarizeInput

Handle = WorkflowHandle[Any, Any]
PEERS_PYTHON = REPO / ".bench-venv" / "bin" / "python"
PLAN = "standard"  # every benchmark tenant's plan
TRIAGE_MAX_TOKENS = 400  # what `triage` asks for on every step


def shape() -> Shape:
    """Stead's `triage` and reviewed `summarize` as the model requests they make."""
    routing = load_routing()

    def step(name: str, task: str, system: str, max_tokens: int) -> Step:
        return Step(name, routing.route(task, PLAN).models[0], system, max_tokens)

    words = SummarizeInput(text="-").max_words
    return Shape(
        triage=(
            step("classify", "classify", workflows.triage.CLASSIFY, TRIAGE_MAX_TOKENS),
            step("draft", "draft", workflows.triage.DRAFT, TRIAGE_MAX_TOKENS),
            step("check", "classify", workflows.triage.CHECK, TRIAGE_MAX_TOKENS),
        ),
        summarize=step(
            "summarize",
            "draft",
            workflows.summarize.SYSTEM.format(max_words=words),
            min(4 * words, 4096),
        ),
    )


def pydantic_ai_command() -> tuple[str, ...]:
    if not PEERS_PYTHON.exists():
        raise RuntimeError(
            f"{PEERS_PYTHON} is missing: `make bench` builds the peers' venv"
            " (or: make .bench-venv/.installed)"
        )
    return (str(PEERS_PYTHON), "-m", "bench.pydantic_ai_peer")


@dataclass(frozen=True)
class Peer:
    """One peer's workflows, started and decided the way its users would."""

    name: str
    queue: str
    triage_type: str

    async def start_triage(self, client: Client, text: str, run_id: str) -> Handle:
        raise NotImplementedError

    async def start_approval(self, client: Client, text: str, run_id: str) -> Handle:
        raise NotImplementedError

    async def approve(self, handle: Handle) -> None:
        raise NotImplementedError


class HandRolled(Peer):
    async def start_triage(self, client: Client, text: str, run_id: str) -> Handle:
        return await client.start_workflow(
            HandTriageWorkflow.run, HandInput(text), id=run_id, task_queue=self.queue
        )

    async def start_approval(self, client: Client, text: str, run_id: str) -> Handle:
        return await client.start_workflow(
            HandApprovalWorkflow.run, HandInput(text), id=run_id, task_queue=self.queue
        )

    async def approve(self, handle: Handle) -> None:
        await handle.execute_update(HandApprovalWorkflow.confirm, HandDecision(approve=True))


class PydanticAI(Peer):
    """Started by name: the workflows live in another venv (see `bench.shape`)."""

    async def start_triage(self, client: Client, text: str, run_id: str) -> Handle:
        return await client.start_workflow(PAI_TRIAGE, text, id=run_id, task_queue=self.queue)

    async def start_approval(self, client: Client, text: str, run_id: str) -> Handle:
        return await client.start_workflow(PAI_APPROVAL, text, id=run_id, task_queue=self.queue)

    async def approve(self, handle: Handle) -> None:
        await handle.execute_update(PAI_CONFIRM, True)


HAND = HandRolled("hand-rolled", HAND_QUEUE, HAND_TRIAGE)
PYDANTIC_AI = PydanticAI("pydantic-ai", PAI_QUEUE, PAI_TRIAGE)
PEERS = (HAND, PYDANTIC_AI)
