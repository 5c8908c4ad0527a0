"""`GET /v1/pipelines` and the OpenAPI document's typed start body, from the loaded app."""

from __future__ import annotations

from typing import Any

import httpx

from tests.conftest import Tenant, TenantFactory


async def test_the_catalog_lists_what_the_caller_may_start(
    api: httpx.AsyncClient, tenant: Tenant
) -> None:
    answer = await api.get("/v1/pipelines", headers=tenant.auth("requester"))
    assert answer.status_code == 200, answer.text
    listed = {p["name"]: p for p in answer.json()["pipelines"]}
    assert "ingest" not in listed  # started by POST /v1/documents, not /v1/runs
    summarize = listed["summarize"]
    assert summarize["approval_steps"] == ["review"]
    assert summarize["stream_steps"] == ["summarize"]
    assert "review" in summarize["stages"]
    assert "text" in summarize["input_schema"]["properties"]
    assert summarize["input_schema"]["required"] == ["text"]
    assert summarize["output_schema"]["properties"]


async def test_a_caller_who_may_not_start_runs_is_offered_none(
    api: httpx.AsyncClient, tenant: Tenant
) -> None:
    answer = await api.get("/v1/pipelines", headers=tenant.auth("approver"))
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"pipelines": []}


async def test_a_caller_without_run_rights_is_refused_the_catalog(
    api: httpx.AsyncClient, make_tenant: TenantFactory
) -> None:
    nobody = await make_tenant({"nobody": []})
    answer = await api.get("/v1/pipelines", headers=nobody.auth("nobody"))
    assert answer.status_code == 403
    assert "runs:read" in answer.json()["detail"]


async def test_openapi_types_the_start_body_per_pipeline(
    api: httpx.AsyncClient, tenant: Tenant
) -> None:
    document = (await api.get("/openapi.json")).json()
    body = document["paths"]["/v1/runs"]["post"]["requestBody"]["content"]["application/json"]
    mapping = body["schema"]["discriminator"]["mapping"]
    listed = (await api.get("/v1/pipelines", headers=tenant.auth("requester"))).json()
    assert set(mapping) == {p["name"] for p in listed["pipelines"]}
    summarize = resolve(document, mapping["summarize"])
    assert summarize["properties"]["pipeline"]["const"] == "summarize"
    assert summarize["additionalProperties"] is False  # as StartRun refuses unknown fields
    text_input = resolve(document, summarize["properties"]["input"]["$ref"])
    assert text_input["required"] == ["text"]


async def test_a_bad_input_is_still_refused_naming_its_field(
    api: httpx.AsyncClient, tenant: Tenant
) -> None:
    answer = await api.post(
        "/v1/runs",
        json={"pipeline": "summarize", "input": {"txt": "x"}},
        headers=tenant.auth("requester"),
    )
    assert answer.status_code == 422, answer.text
    assert "input.text" in answer.json()["detail"]


def resolve(document: dict[str, Any], ref: str) -> dict[str, Any]:
    name = ref.removeprefix("#/components/schemas/")
    schema: dict[str, Any] = document["components"]["schemas"][name]
    return schema


async def test_an_input_the_schema_refuses_is_refused(
    api: httpx.AsyncClient, tenant: Tenant
) -> None:
    # Found by the fuzz drill once the body was typed: `review` is a boolean, and lax
    # validation took 0 for false and started the run.
    answer = await api.post(
        "/v1/runs",
        json={"pipeline": "summarize", "input": {"text": "x", "review": 0}},
        headers=tenant.auth("requester"),
    )
    assert answer.status_code == 422, answer.text
    assert "input.review" in answer.json()["detail"]


async def test_a_budget_must_be_a_number(api: httpx.AsyncClient, tenant: Tenant) -> None:
    answer = await api.post(
        "/v1/runs",
        json={"pipeline": "summarize", "input": {"text": "x"}, "budget_usd": True},
        headers=tenant.auth("requester"),
    )
    assert answer.status_code == 422, answer.text
    fine = await api.post(
        "/v1/runs",
        json={"pipeline": "summarize", "input": {"text": "x", "review": False}, "budget_usd": 2},
        headers=tenant.auth("requester"),
    )
    assert fine.status_code == 201, fine.text
