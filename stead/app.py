"""An application built on Stead: its pipelines, tools, integrations, policies and data.

    APP = stead.App(
        "support-desk",
        pipelines=[Summarize, SupportAgent],
        records={"customer": load_customer},
        facts=customer_facts,
        policies=Path(__file__).parent / "policies",
        migrations=Path(__file__).parent / "migrations",
    )

`stead worker`, `stead api` and `stead dev` load it by `--app module:attr` (or `STEAD_APP`, or
the `stead.apps` entry point of an installed package) and build every registry from it at
start, never at import: `App.load(settings)` returns the `Runtime` the worker and the API
share, and fails with one line naming what is wrong (a duplicated pipeline, a tool with no
record loader for its subject, a policy file that does not validate, a missing integration).

Tools come from the pipelines that offer them (and `tools=` for ones no pipeline offers);
integrations from the tools that act through them. Stead's own pipelines (document ingest)
are always there.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stead.integrations import (
    Integration,
    IntegrationConfig,
    IntegrationConfigError,
    configure,
)
from stead.tools import Tool

if TYPE_CHECKING:
    import httpx
    from fastapi import APIRouter

    from stead.config import Settings
    from stead.pipeline.base import Pipeline
    from stead.policy.loader import PolicySet


class AppError(Exception):
    """The application cannot be loaded as declared: one line saying why."""


@dataclass(frozen=True)
class RecordContext:
    """What a record loader or the facts hook gets: the tenant, and the platform's pool."""

    tenant: str
    db: Any


# `async def load_customer(ctx, customer_id) -> {"restricted": False, ...} | None`: a record
# a tool's subject names, with the attributes read grants check (None: no such record).
RecordLoader = Callable[[RecordContext, str], Awaitable[Mapping[str, Any] | None]]
# `async def facts(ctx, given) -> more`: trusted facts derived from the run's own (e.g. the
# customer's email from the ticket's customer id), never from anything a model wrote.
FactsHook = Callable[[RecordContext, Mapping[str, Any]], Awaitable[Mapping[str, Any]]]
# `async def seed(conn) -> None`: demo data `stead dev` writes (idempotently) at start.
SeedHook = Callable[[Any], Awaitable[None]]
# `async def demo(api, keys) -> None`: what `stead dev` does once the API answers, through it
# like any client (e.g. send a ticket, so a reviewer finds something to decide): `api` is an
# HTTP client on the API, `keys` the demo API keys by label ("acme/requester"). It runs at
# every start, so it must be idempotent (an Idempotency-Key on what it starts).
DemoHook = Callable[["httpx.AsyncClient", Mapping[str, str]], Awaitable[None]]


@dataclass(frozen=True)
class App:
    name: str
    pipelines: Sequence[type[Pipeline[Any, Any]]] = ()
    tools: Sequence[Tool[Any]] = ()
    integrations: Sequence[Integration] = ()
    records: Mapping[str, RecordLoader] = field(default_factory=dict)
    facts: FactsHook | None = None
    policies: Path | None = None
    migrations: Path | None = None
    seed: SeedHook | None = None
    demo: DemoHook | None = None
    routers: Sequence[APIRouter] = ()

    def load(self, settings: Settings) -> Runtime:
        """Build every registry; raise AppError with one line naming the problem."""
        from stead.builtin import BUILTIN_PIPELINES  # noqa: PLC0415  # imports the pipeline base
        from stead.policy.loader import PolicyError, PolicySet  # noqa: PLC0415

        pipelines: dict[str, type[Pipeline[Any, Any]]] = {}
        declared: tuple[type[Pipeline[Any, Any]], ...] = (*BUILTIN_PIPELINES, *self.pipelines)
        for cls in declared:
            if not getattr(cls, "declared", False):
                raise AppError(f"{cls.__qualname__} is not a declared pipeline (name=...)")
            if cls.pipeline in pipelines:
                raise AppError(f"two pipelines are named {cls.pipeline!r}")
            pipelines[cls.pipeline] = cls
        tools = _collect_tools(self.tools, pipelines.values())
        integrations = _collect_integrations(self.integrations, tools.values())
        for tool in tools.values():
            if tool.subject is not None and tool.subject.resource not in self.records:
                raise AppError(
                    f"tool {tool.name} names a {tool.subject.resource} but the app has no"
                    f" records[{tool.subject.resource!r}] loader"
                )
        search = [p for p in (self.policies,) if p is not None] + settings.policy_path
        try:
            policies = PolicySet.load(search, limits_file=settings.limits_file)
        except PolicyError as exc:
            raise AppError(str(exc)) from None
        try:
            file = settings.integrations_file
            configs = configure(integrations, os.environ, file)
        except IntegrationConfigError as exc:
            raise AppError(str(exc)) from None
        runtime = Runtime(self, pipelines, tools, integrations, configs, policies)
        runtime.check()
        return runtime


@dataclass(frozen=True)
class Runtime:
    """An application's registries, built at start and shared by the worker and the API."""

    app: App
    pipelines: Mapping[str, type[Pipeline[Any, Any]]]
    tools: Mapping[str, Tool[Any]]
    integrations: Mapping[str, Integration]
    configs: Mapping[str, IntegrationConfig]
    policies: PolicySet

    @property
    def workflows(self) -> list[type[Any]]:
        return list(self.pipelines.values())

    def pipeline(self, name: str) -> type[Pipeline[Any, Any]] | None:
        return self.pipelines.get(name)

    def unconfigured(self) -> list[Integration]:
        return [i for name, i in self.integrations.items() if name not in self.configs]

    def check(self) -> None:
        """What only the whole can tell: every task class a pipeline uses has a route, and
        every approval policy step names a step some pipeline asks for."""
        routes = self.policies.routing.routes
        for pipeline in self.pipelines.values():
            for task in pipeline.tasks:
                if task not in routes:
                    raise AppError(
                        f"pipeline {pipeline.pipeline} uses task class {task!r}, which no"
                        f" routing policy defines (known: {', '.join(sorted(routes))})"
                    )
        asked = {name: set(p.approval_steps) for name, p in self.pipelines.items()}
        for name, steps in self.policies.approvals.items():
            if name == "*":
                continue
            if name not in asked:
                raise AppError(f"approval policy for unknown pipeline {name!r}")
            extra = sorted(set(steps) - asked[name])
            if extra:
                raise AppError(
                    f"approval policy {name}/{extra[0]}: the pipeline asks for no such step"
                    f" (its steps: {', '.join(sorted(asked[name])) or 'none'})"
                )


def _collect_tools(
    extra: Sequence[Tool[Any]], pipelines: Sequence[type[Pipeline[Any, Any]]] | Any
) -> dict[str, Tool[Any]]:
    found: dict[str, Tool[Any]] = {}
    for tool in (*extra, *(t for p in pipelines for t in p.tools)):
        known = found.get(tool.name)
        if known is not None and known is not tool:
            raise AppError(f"two different tools are named {tool.name!r}")
        found[tool.name] = tool
    return found


def _collect_integrations(
    extra: Sequence[Integration], tools: Sequence[Tool[Any]] | Any
) -> dict[str, Integration]:
    found: dict[str, Integration] = {}
    for integration in (*extra, *(t.integration for t in tools if t.integration is not None)):
        known = found.get(integration.name)
        if known is not None and known != integration:
            raise AppError(f"two different integrations are named {integration.name!r}")
        found[integration.name] = integration
    return found
