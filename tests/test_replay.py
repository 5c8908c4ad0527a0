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
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

import stead
from stead.builtin import BUILTIN_PIPELINES
from stead.config import Settings
from stead.gateway.batcher import ModelBatcher
from stead.temporal import data_converter
from stead.worker import sandbox
from tests.helpers import HISTORIES
from worker import APP
from workflows.inputs import SummarizeInput, Summary
from workflows.summarize import SummarizeWorkflow

# Every pipeline the reference application runs, Stead's own included.
PIPELINES: list[type[Any]] = [*BUILTIN_PIPELINES, *APP.pipelines]
# ...and every other workflow a worker runs.
WORKFLOWS: list[type[Any]] = [*PIPELINES, ModelBatcher]

# Current recordings, plus earlier generations (v1/, ...) kept to prove that runs started by
# older code still replay: a change that breaks them must be gated with `workflow.patched`.
FILES = sorted(HISTORIES.rglob("*.json"))


def test_every_workflow_has_a_history() -> None:
    recorded = {f.name.split("_")[0] for f in FILES}
    expected = {w.pipeline.replace("-", "") for w in PIPELINES} | {"batcher"}
    assert expected <= recorded, f"no committed history for {sorted(expected - recorded)}"


@pytest.mark.parametrize("path", FILES, ids=[str(f.relative_to(HISTORIES)) for f in FILES])
async def test_replays(path: Path, settings: Settings) -> None:
    history = WorkflowHistory.from_json(path.stem, path.read_text())  # noqa: ASYNC240  # a small fixture file
    replayer = Replayer(
        workflows=WORKFLOWS, data_converter=data_converter(settings), workflow_runner=sandbox()
    )
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None, f"{path.name}: {result.replay_failure}"


class SummarizeWithoutModel(SummarizeWorkflow, name="summarize", sandboxed=False):
    """Today's summarize minus its model call: what a careless edit would look like."""

    async def steps(self, params: SummarizeInput) -> stead.Outcome[Summary]:
        return stead.Completed(Summary(summary="skipped", model="none"))


async def test_a_changed_workflow_fails_replay(settings: Settings) -> None:
    """The guard works: a summarize that no longer calls the model cannot replay old runs."""
    path = HISTORIES / "summarize_approved.json"
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    replayer = Replayer(workflows=[SummarizeWithoutModel], data_converter=data_converter(settings))
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is not None
