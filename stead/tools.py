"""Tools: what an agent (or a pipeline itself) may do to the world, declared in one place.

A tool is its input model, the action and resource the permission model decides on, the
integration it acts through and the scopes it needs there, the fields an approver may edit,
the argument that names the record it is about, and its handler:

    payments = stead.Integration("payments", scopes=("refunds:create",))

    @stead.tool(action="execute", resource="refund", integration=payments,
                scopes=("refunds:create",), editable=("amount", "reason"),
                subject=stead.Subject("customer", "customer_id"))
    async def issue_refund(ctx: stead.ToolContext, args: IssueRefund) -> stead.ToolResult:
        \"\"\"Refund the customer. A payment: it may need a human's approval first.\"\"\"
        refund = await ctx.http.post("/v1/refunds", args.model_dump(mode="json"),
                                     idempotency_key=ctx.op_key)
        return stead.ToolResult.of(refund)

The tool gateway (`stead.gateway.tools`) does the rest, in one order for every tool: validate
the arguments, load the user's and the agent's grants, check the arguments against the run's
trusted facts and the named record, check the integration's scopes, ask for approval when a
grant requires it, then call the handler with an idempotency key, and audit every decision.
A handler never checks permissions itself: by the time it runs, the call is allowed.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Generic, Literal, TypeVar, cast, get_type_hints

from pydantic import BaseModel

from stead.integrations import Integration, IntegrationClient

ArgsT = TypeVar("ArgsT", bound=BaseModel)
Action = Literal["read", "draft", "execute"]
_TOOL_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


class ToolRefused(Exception):
    """The call cannot be done as asked (the integration refused it, the record is gone):
    reported to the model as a `tool_result` error, never retried."""


@dataclass(frozen=True)
class Subject:
    """The record a tool's call is about: `argument` holds its id, `resource` names the kind
    of record (the application's `records` loader for it, and the `read` grant checked)."""

    resource: str
    argument: str


@dataclass(frozen=True)
class ToolResult:
    """What the model reads (`content`) and what the run and the audit log keep (`data`)."""

    content: str
    data: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def of(data: Mapping[str, Any]) -> ToolResult:
        """A result whose content is the data as `key: value` lines."""
        plain = dict(data)
        return ToolResult("\n".join(f"{k}: {v}" for k, v in plain.items()), plain)


@dataclass(frozen=True)
class ToolContext:
    """What a handler gets besides its arguments. `op_key` is the call's idempotency key:
    stable across retries of this call, new for every other call; pass it to every side
    effect. `db` is the platform's connection pool, for the application's own tables."""

    tenant: str
    run_id: str
    requested_by: str
    pipeline: str
    op_key: str
    http: IntegrationClient | None
    db: Any
    facts: Mapping[str, Any]

    @property
    def metadata(self) -> dict[str, str]:
        """References for a provider's records, tracing them back to the run and the step."""
        return {"tenant": self.tenant, "run_id": self.run_id, "op_key": self.op_key}


Handler = Callable[[ToolContext, Any], Awaitable[ToolResult | Mapping[str, Any]]]


@dataclass(frozen=True)
class Tool(Generic[ArgsT]):
    name: str
    description: str
    input_model: type[ArgsT]
    action: Action
    resource: str
    handler: Handler = field(compare=False, repr=False)
    integration: Integration | None = None
    scopes: tuple[str, ...] = ()
    editable: tuple[str, ...] = ()
    subject: Subject | None = None

    def __post_init__(self) -> None:
        if not _TOOL_NAME.fullmatch(self.name):
            raise ValueError(f"tool name {self.name!r}: letters, digits, _ and -")
        unknown = sorted(set(self.editable) - set(self.input_model.model_fields))
        if unknown:
            raise ValueError(f"tool {self.name}: editable fields not in its input: {unknown}")
        if self.subject is not None and self.subject.argument not in self.input_model.model_fields:
            raise ValueError(f"tool {self.name}: subject argument {self.subject.argument!r}")
        if self.scopes and self.integration is None:
            raise ValueError(f"tool {self.name}: scopes need an integration")

    def schema(self) -> dict[str, Any]:
        """The tool as offered to the model (Anthropic tool-use format)."""
        return {
            "name": self.name,
            "description": self.description,
            "input_schema": self.input_model.model_json_schema(),
        }

    def arguments(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """Validated, JSON-safe arguments; money stays a decimal string, never a float.
        Raises pydantic's ValidationError."""
        model = self.input_model.model_validate(dict(raw))
        return {
            k: (f"{v:.2f}" if isinstance(v, Decimal) else v) for k, v in model.model_dump().items()
        }


def tool(
    *,
    action: Action,
    resource: str,
    name: str | None = None,
    description: str | None = None,
    integration: Integration | None = None,
    scopes: tuple[str, ...] = (),
    editable: tuple[str, ...] = (),
    subject: Subject | None = None,
) -> Callable[[Callable[[ToolContext, ArgsT], Awaitable[Any]]], Tool[ArgsT]]:
    """Declare a tool from its handler: the name defaults to the function's, the description
    to its docstring, the input model to the type of its `args` parameter."""

    def declare(handler: Callable[[ToolContext, ArgsT], Awaitable[Any]]) -> Tool[ArgsT]:
        if not inspect.iscoroutinefunction(handler):
            raise TypeError(f"tool handler {handler.__qualname__} must be async")
        params = list(inspect.signature(handler).parameters)
        if len(params) != 2:
            raise TypeError(f"tool handler {handler.__qualname__} takes (ctx, args)")
        model = get_type_hints(handler).get(params[1])
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise TypeError(f"tool handler {handler.__qualname__}: annotate args with a model")
        return Tool(
            name=name or handler.__name__,
            description=description or inspect.getdoc(handler) or "",
            input_model=cast(type[ArgsT], model),
            action=action,
            resource=resource,
            handler=handler,
            integration=integration,
            scopes=scopes,
            editable=editable,
            subject=subject,
        )

    return declare
