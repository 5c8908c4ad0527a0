"""Committed histories: record a finished run's history, replay it against today's code.

A worker replays a run's history whenever it picks the run up again, so a pipeline edited
while runs of it are open must still replay what they recorded. Record a history per shape
of run a test drives (`STEAD_RECORD_HISTORIES=1 pytest`), commit it, and replay every
committed one in the suite: an edit that changes what a run does fails there, before it
reaches a running workflow (gate such a change with `workflow.patched`).

While recording, the kit's settings keep every payload in the history (no claim-check), so
a committed history replays without the database it was recorded with.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from temporalio.client import WorkflowHandle, WorkflowHistory
from temporalio.worker import Replayer

from stead.app import App
from stead.builtin import BUILTIN_PIPELINES
from stead.config import Settings
from stead.temporal import data_converter
from stead.worker import PLATFORM_WORKFLOWS, sandbox

RECORD_VARIABLE = "STEAD_RECORD_HISTORIES"


def recording() -> bool:
    """Whether this test session records histories (`STEAD_RECORD_HISTORIES=1`)."""
    return os.environ.get(RECORD_VARIABLE) == "1"


async def record_history(handle: WorkflowHandle[Any, Any], path: Path) -> bool:
    """While recording, write the run's history to `path` (JSON); whether it did."""
    if not recording():
        return False
    history = await handle.fetch_history()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(history.to_json())  # noqa: ASYNC240  # once per recorded test
    return True


def histories(directory: Path) -> list[Path]:
    """Every committed history under `directory` (`*.json`, subdirectories included)."""
    return sorted(directory.rglob("*.json"))


def _workflows(of: App | Sequence[type[Any]]) -> list[type[Any]]:
    """An application's pipelines with every workflow Stead's worker runs beside them."""
    if isinstance(of, App):
        return [*BUILTIN_PIPELINES, *of.pipelines, *PLATFORM_WORKFLOWS]
    return list(of)


async def replay_failure(
    path: Path, workflows: App | Sequence[type[Any]], settings: Settings
) -> BaseException | None:
    """Replay the history at `path` with `workflows` (an application: its pipelines and
    Stead's own workflows) and `settings`' payload keys; why it does not replay, or None."""
    text = path.read_text()  # noqa: ASYNC240  # a small committed file
    history = WorkflowHistory.from_json(path.stem, text)
    replayer = Replayer(
        workflows=_workflows(workflows),
        data_converter=data_converter(settings),
        workflow_runner=sandbox(),
    )
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    return result.replay_failure


async def replay_history(
    path: Path, workflows: App | Sequence[type[Any]], settings: Settings
) -> None:
    """Assert that the history at `path` replays (see `replay_failure`)."""
    failure = await replay_failure(path, workflows, settings)
    assert failure is None, f"{path.name} no longer replays: {failure}"
