"""The work the peer baselines do, shared by the driver and the peers' workers.

Stead's `triage` (three model steps) and `summarize` with a review (one model step, then a
human decision), as model requests: the model each step's route picks first, its system prompt
and its `max_tokens`. The driver builds the shape from Stead's own sources (`bench.peers`) and
hands it to each peer worker in the `BENCH_SHAPE` environment variable, so the peers send the
same requests without importing Stead: the Pydantic AI worker runs in a virtualenv that has
no Stead in it. Only the standard library here, for the same reason.

The peers' Temporal names live here too: the driver cannot import the Pydantic AI worker's
module (its venv is not the driver's), so it starts those workflows by these names.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

ENV = "BENCH_SHAPE"
HAND_QUEUE = "hand-rolled"
PAI_QUEUE = "pydantic-ai"
HAND_TRIAGE = "hand-triage"
HAND_APPROVAL = "hand-approval"
# Temporal names of the Pydantic AI worker's workflows and of its approval's update.
PAI_TRIAGE = "pai-triage"
PAI_APPROVAL = "pai-approval"
PAI_CONFIRM = "confirm"


@dataclass(frozen=True)
class Step:
    name: str
    model: str
    system: str
    max_tokens: int


@dataclass(frozen=True)
class Shape:
    triage: tuple[Step, ...]  # classify, draft, check: the check's text is message + draft
    summarize: Step

    def step(self, name: str) -> Step:
        for step in (*self.triage, self.summarize):
            if step.name == name:
                return step
        raise KeyError(f"no step {name!r} in the benchmark's shape")

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_env() -> Shape:
        raw = json.loads(os.environ[ENV])
        return Shape(
            triage=tuple(Step(**step) for step in raw["triage"]),
            summarize=Step(**raw["summarize"]),
        )


def check_text(message: str, draft: str) -> str:
    """What the check step reads, as Stead's `triage` builds it."""
    return f"{message}\n\n---\n{draft}"
