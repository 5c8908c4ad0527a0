"""The pipeline catalog: which pipelines a caller may start, with what input, giving what.

`GET /v1/pipelines` lists them from the loaded application's runtime (its pipeline classes'
keywords: stages, approval steps, tools, streamed steps; their input and output models'
JSON Schemas). The same runtime makes the OpenAPI document's body of `POST /v1/runs` a union
discriminated on `pipeline` (`start_run_schema`), so a client generated from it is typed per
pipeline. The API still validates a start as before (a 422 naming the input field): the union
is documentation, built when the app is created, not a second validator.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, create_model

from stead.app import Runtime
from stead.builtin import STARTED_BY_ROUTE
from stead.contract import MAX_BUDGET_USD
from stead.pipeline.base import Pipeline
from stead.service.access import Services, require
from stead.store.principals import Principal

REF_TEMPLATE = "#/components/schemas/{model}"


class PipelineOut(BaseModel):
    name: str = Field(description="what `POST /v1/runs` takes as `pipeline`")
    description: str
    stages: list[str] = Field(description="the stages its runs may enter, besides every run's")
    approval_steps: list[str] = Field(description="the human approvals it may ask for")
    tools: list[str]
    stream_steps: list[str] = Field(description="model steps whose text streams to live events")
    input_schema: dict[str, Any] = Field(description="JSON Schema of `input`")
    output_schema: dict[str, Any] = Field(description="JSON Schema of a completed run's output")


class Catalog(BaseModel):
    pipelines: list[PipelineOut]


def startable(runtime: Runtime) -> list[type[Pipeline[Any, Any]]]:
    """The pipelines `POST /v1/runs` starts (not those their own route starts), by name."""
    return [runtime.pipelines[n] for n in sorted(runtime.pipelines) if n not in STARTED_BY_ROUTE]


def catalog(svc: Services, principal: Principal) -> Catalog:
    """What the caller may start: every startable pipeline with `runs:start`, none for one who
    may only read runs, and a refusal for a caller who may do neither (as every route refuses
    a caller without the rights it serves)."""
    if not svc.permissions.has_right(principal.roles, "runs:start"):
        require(svc, principal, "runs:read")
        return Catalog(pipelines=[])
    return Catalog(pipelines=[_entry(cls) for cls in startable(svc.runtime)])


def _entry(cls: type[Pipeline[Any, Any]]) -> PipelineOut:
    return PipelineOut(
        name=cls.pipeline,
        description=cls.description,
        stages=list(cls.stages),
        approval_steps=list(cls.approval_steps),
        tools=[tool.name for tool in cls.tools],
        stream_steps=sorted(cls.stream_steps),
        input_schema=cls.input_model.model_json_schema(),
        output_schema=cls.output_model.model_json_schema(),
    )


def start_run_schema(runtime: Runtime) -> tuple[dict[str, Any], dict[str, Any]]:
    """The body of `POST /v1/runs` as a union discriminated on `pipeline` over the runtime's
    startable pipelines: (its schema, the component schemas it refers to)."""
    variants = tuple(_start_model(cls) for cls in startable(runtime))
    if not variants:
        return {}, {}
    body: Any = variants[0]
    if len(variants) > 1:
        body = Annotated[Union[variants], Field(discriminator="pipeline")]  # noqa: UP007  # a tuple of types made at run time has no `|` spelling
    schema = TypeAdapter(body).json_schema(ref_template=REF_TEMPLATE)
    defs = schema.pop("$defs", {})
    return schema, defs


def _start_model(cls: type[Pipeline[Any, Any]]) -> type[BaseModel]:
    title = "".join(part.capitalize() for part in cls.pipeline.replace("-", "_").split("_"))
    fields: Any = {
        "pipeline": (Literal[cls.pipeline], ...),
        "input": (cls.input_model, ...),
        "budget_usd": (
            float | None,
            Field(None, gt=0, le=MAX_BUDGET_USD, strict=True, description="cap for this run"),
        ),
    }
    # Unknown fields are refused (as `StartRun` refuses them), so the schema says so too.
    config = ConfigDict(extra="forbid")
    return create_model(f"StartRun{title}", __config__=config, **fields)
