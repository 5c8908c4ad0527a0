"""Stead: durable execution for AI products, on Temporal and PostgreSQL.

The public API, for building an application on Stead (see "Build your own pipeline" in the
README):

- `App`: an application's pipelines, tools, integrations, records, policies and migrations;
- `Pipeline`, `Completed`, `Rejected`, `Outcome`, `Parsed`, `Stage`, `Proposal`: pipelines;
- `tool`, `Tool`, `ToolContext`, `ToolResult`, `ToolRefused`, `Subject`: tools;
- `Integration`, `IntegrationClient`: the third-party APIs tools act through;
- `RecordContext`: what record loaders and the facts hook get;
- `ModelReply`, `Passage`, `ToolOutcome`, `ApprovalOutcome`: what steps return.

Everything else is Stead's own (the HTTP API, the store, the gateways, the CLI) and may
change between releases. Names load on first use, so `stead --help` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stead.app import App, RecordContext
    from stead.calls import ModelReply, Passage, ToolOutcome
    from stead.contract import ApprovalOutcome, Proposal, Stage
    from stead.integrations import Integration, IntegrationClient
    from stead.loader import load_app
    from stead.pipeline.base import Completed, Outcome, Parsed, Pipeline, Rejected
    from stead.tools import Subject, Tool, ToolContext, ToolRefused, ToolResult, tool

__all__ = [
    "App",
    "ApprovalOutcome",
    "Completed",
    "Integration",
    "IntegrationClient",
    "ModelReply",
    "Outcome",
    "Parsed",
    "Passage",
    "Pipeline",
    "Proposal",
    "RecordContext",
    "Rejected",
    "Stage",
    "Subject",
    "Tool",
    "ToolContext",
    "ToolOutcome",
    "ToolRefused",
    "ToolResult",
    "load_app",
    "tool",
]

_WHERE = {
    "App": "stead.app",
    "RecordContext": "stead.app",
    "ModelReply": "stead.calls",
    "Passage": "stead.calls",
    "ToolOutcome": "stead.calls",
    "ApprovalOutcome": "stead.contract",
    "Proposal": "stead.contract",
    "Stage": "stead.contract",
    "Integration": "stead.integrations",
    "IntegrationClient": "stead.integrations",
    "load_app": "stead.loader",
    "Completed": "stead.pipeline.base",
    "Outcome": "stead.pipeline.base",
    "Parsed": "stead.pipeline.base",
    "Pipeline": "stead.pipeline.base",
    "Rejected": "stead.pipeline.base",
    "Subject": "stead.tools",
    "Tool": "stead.tools",
    "ToolContext": "stead.tools",
    "ToolRefused": "stead.tools",
    "ToolResult": "stead.tools",
    "tool": "stead.tools",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'stead' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
