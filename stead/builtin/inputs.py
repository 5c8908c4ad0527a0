"""The input of Stead's own pipelines (ingest), built once per process (see workflows/inputs.py
of the reference application for why inputs live outside workflow modules)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class IngestInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    document_id: str = Field(pattern=r"^d_[a-z2-7]{26}$")
