"""Every workflow replays its committed histories with today's code.

A failure here means a change would break running workflows (non-determinism). Histories are
recorded by the scenario tests: `STEAD_RECORD_HISTORIES=1 make unit`. Record new ones when a
workflow changes on purpose, and keep the old ones while runs of that shape may still be open
(or gate the change with `workflow.patched`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import stead
from stead import testing
from stead.builtin import BUILTIN_PIPELINES
from stead.config import Settings
from stead.worker import PLATFORM_WORKFLOWS
from tests.helpers import HISTORIES
from worker import APP
from workflows.inputs import SummarizeInput, Summary
from workflows.summarize import SummarizeWorkflow

# Every pipeline the reference application runs, Stead's own included.
WORKFLOWS: list[type[Any]] = [*BUILTIN_PIPELINES, *APP.pipelines]

# Current recordings, plus earlier generations (v1/, ...) kept to prove that runs started by
# older code still replay: a change that breaks them must be gated with `workflow.patched`.
FILES = testing.histories(HISTORIES)


def test_every_workflow_has_a_history() -> None:
    recorded = {f.name.split("_")[0] for f in FILES}
    expected = {w.pipeline.replace("-", "") for w in WORKFLOWS}
    expected |= {w.__name__.lower().removesuffix("workflow") for w in PLATFORM_WORKFLOWS}
    assert expected <= recorded, f"no committed history for {sorted(expected - recorded)}"


@pytest.mark.parametrize("path", FILES, ids=[str(f.relative_to(HISTORIES)) for f in FILES])
async def test_replays(path: Path, settings: Settings) -> None:
    await testing.replay_history(path, APP, settings)


class SummarizeWithoutModel(SummarizeWorkflow, name="summarize", sandboxed=False):
    """Today's summarize minus its model call: what a careless edit would look like."""

    async def steps(self, params: SummarizeInput) -> stead.Outcome[Summary]:
        return stead.Completed(Summary(summary="skipped", model="none"))


async def test_a_changed_workflow_fails_replay(settings: Settings) -> None:
    """The guard works: a summarize that no longer calls the model cannot replay old runs."""
    path = HISTORIES / "summarize_approved.json"
    assert await testing.replay_failure(path, [SummarizeWithoutModel], settings) is not None
