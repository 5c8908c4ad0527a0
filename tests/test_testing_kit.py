"""The testing kit as an application's tests use it: the scripted model answers a pipeline's
calls (text, in order, structured, a repair), workers and API clients for another
application, and which integrations get stand-ins."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field
from temporalio.client import Client

import stead
from stead import testing
from stead.config import Settings
from stead.store.db import Pool
from tests.helpers import audit_actions


class Ticket(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1)


class Verdict(BaseModel):
    category: Literal["billing", "bug", "other"]
    urgent: bool


class Sorted(BaseModel):
    category: str
    urgent: bool


class SortTicket(
    stead.Pipeline[Ticket, Sorted],
    name="kit-sort-ticket",
    stages=(stead.Stage.MODEL_CALL,),
    tasks=("classify",),
    sandboxed=False,  # defined in a test module, which the sandbox would re-import per run
):
    """Sort a ticket with one structured model call."""

    async def steps(self, params: Ticket) -> stead.Outcome[Sorted]:
        verdict = await self.call_model(
            step="sort", task="classify", messages=params.text, output=Verdict
        )
        return stead.Completed(Sorted(**verdict.value.model_dump()))


KIT_APP = stead.App("kit-test", pipelines=[SortTicket])


@pytest.fixture
async def kit_api(
    client: Client, test_settings: Settings, pool: Pool
) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        testing.running_workers(KIT_APP, client, test_settings, pool),
        testing.api_client(KIT_APP, test_settings, client, pool) as http,
    ):
        yield http


@pytest.mark.usefixtures("worker")
async def test_a_scripted_reply_answers_the_model_call(
    api: httpx.AsyncClient, tenant: testing.Tenant, scripted_model: testing.ScriptedModel
) -> None:
    scripted_model.reply("Scripted: revenue up, costs down.")
    run_id = await testing.start_run(
        api, tenant, "summarize", {"text": "Revenue grew 12%. Costs fell 3%.", "review": False}
    )
    run = await testing.wait_for_run(api, tenant, run_id)
    assert run["status"] == "completed", run
    assert run["result"]["summary"] == "Scripted: revenue up, costs down."
    assert scripted_model.pending == []
    assert len(scripted_model.calls) == 1


@pytest.mark.usefixtures("worker")
async def test_scripted_replies_answer_in_order(
    api: httpx.AsyncClient, tenant: testing.Tenant, scripted_model: testing.ScriptedModel
) -> None:
    scripted_model.reply("billing").reply("We are sorry; a refund is on its way.").reply("ok")
    run_id = await testing.start_run(api, tenant, "triage", {"message": "I was charged twice."})
    run = await testing.wait_for_run(api, tenant, run_id)
    assert run["result"] == {
        "label": "billing",
        "draft": "We are sorry; a refund is on its way.",
        "check": "ok",
    }
    # An unfit verdict would have asked for a redraft, which no entry answers.
    assert len(scripted_model.calls) == 3


async def test_a_scripted_structured_answer_is_the_pipelines_value(
    kit_api: httpx.AsyncClient, tenant: testing.Tenant, scripted_model: testing.ScriptedModel
) -> None:
    scripted_model.answer(Verdict(category="bug", urgent=True))
    run_id = await testing.start_run(kit_api, tenant, "kit-sort-ticket", Ticket(text="It crashes"))
    run = await testing.wait_for_run(kit_api, tenant, run_id)
    assert run["result"] == {"category": "bug", "urgent": True}


async def test_an_invalid_scripted_answer_is_repaired(
    kit_api: httpx.AsyncClient,
    tenant: testing.Tenant,
    scripted_model: testing.ScriptedModel,
    pool: Pool,
) -> None:
    scripted_model.answer({"category": "spam", "urgent": "maybe"})
    scripted_model.answer(Verdict(category="billing", urgent=False), when="Invalid")
    run_id = await testing.start_run(kit_api, tenant, "kit-sort-ticket", {"text": "Charged twice"})
    run = await testing.wait_for_run(kit_api, tenant, run_id)
    assert run["result"] == {"category": "billing", "urgent": False}
    assert "model.repaired" in await audit_actions(pool, tenant, run_id)
    # The repair went to the route's stronger model.
    assert [c["model"] for c in scripted_model.calls] == ["claude-haiku-5-5", "claude-sonnet-5-5"]


async def test_entries_no_call_fits_stay_pending(
    kit_api: httpx.AsyncClient, tenant: testing.Tenant, scripted_model: testing.ScriptedModel
) -> None:
    scripted_model.reply("never asked for").answer(
        Verdict(category="other", urgent=False), when="a text the prompt never holds"
    )
    run_id = await testing.start_run(kit_api, tenant, "kit-sort-ticket", {"text": "Hello"})
    run = await testing.wait_for_run(kit_api, tenant, run_id)
    # The simulator answered instead: the schema's first allowed value, its boolean default.
    assert run["result"] == {"category": "billing", "urgent": False}
    assert scripted_model.pending == [
        "a reply",
        "a structured answer when 'a text the prompt never holds'",
    ]


def test_integrations_get_their_own_stand_in_or_the_one_given(tmp_path: Path) -> None:
    from worker import APP  # noqa: PLC0415  # the reference application, for its integrations

    def given(token: str, state: Path) -> FastAPI:
        return FastAPI()

    found = testing.stand_ins(APP, {"email": given})
    assert sorted(found) == ["email", "payments"]
    assert found["email"] is given
    with pytest.raises(ValueError, match="sms"):
        testing.stand_ins(APP, {"sms": given})
