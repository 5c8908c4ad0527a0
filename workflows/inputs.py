"""What each pipeline takes, returns and puts to people: validated by the API before a run
starts, by the workflow, and (proposals) when an approver edits one.

Kept out of the workflow modules on purpose: the workflow sandbox re-imports a workflow's own
module for every run, and rebuilding pydantic models each time cost measurable worker CPU and
memory per run. Imported pass-through, these are built once per process.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class SummarizeInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=200_000)
    review: bool = True
    max_words: int = Field(120, ge=5, le=2000)


class TriageInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: str = Field(min_length=1, max_length=20_000)


class SupportTicket(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ticket_id: str = Field(min_length=1, max_length=128)
    customer_id: str = Field(min_length=1, max_length=128)
    subject: str = Field(min_length=1, max_length=300)
    body: str = Field(min_length=1, max_length=20_000)
    max_turns: int = Field(8, ge=1, le=200)


class DocQaInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1, max_length=4000)
    top_k: int = Field(5, ge=1, le=20)
    review: bool = False


# --- what the pipelines return ---------------------------------------------------------------


class Summary(BaseModel):
    summary: str
    model: str
    approval: str | None = Field(None, description="the review's outcome, with review")


class Triage(BaseModel):
    label: str
    draft: str
    check: str


class SupportOutcome(BaseModel):
    reply: str
    actions: list[dict[str, Any]] = Field(description="each tool call: tool, status, rule")


class Citation(BaseModel):
    ref: int
    document_id: str
    chunk_no: int
    title: str


class Answer(BaseModel):
    answer: str
    citations: list[Citation]
    passages: int
    model: str | None = None
    approval: str | None = None


# --- what people approve ---------------------------------------------------------------------


class SummaryProposal(BaseModel):
    model_config = ConfigDict(extra="forbid")

    summary: str = Field(min_length=1, max_length=20_000)


class AnswerProposal(BaseModel):
    model_config = ConfigDict(extra="forbid")

    answer: str = Field(min_length=1, max_length=20_000)
    citations: list[dict[str, Any]] = Field(default_factory=list)
