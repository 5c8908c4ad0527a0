"""The input of each pipeline: validated by the API before a run starts, and by the workflow.

Kept out of the workflow modules on purpose: the workflow sandbox re-imports a workflow's own
module for every run, and rebuilding pydantic models each time cost measurable worker CPU and
memory per run. Imported pass-through, these are built once per process.
"""

from __future__ import annotations

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
