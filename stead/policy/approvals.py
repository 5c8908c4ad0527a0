"""Approval policies per pipeline step, from `approvals.yaml` plus tenant overrides."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from pathlib import Path

import yaml
from pydantic import TypeAdapter

from stead.contract import ApprovalPolicy

POLICY_FILE = Path(__file__).parent / "defaults" / "approvals.yaml"
_FILE = TypeAdapter(dict[str, dict[str, ApprovalPolicy]])


@cache
def load_policies(path: Path = POLICY_FILE) -> dict[str, dict[str, ApprovalPolicy]]:
    return _FILE.validate_python(yaml.safe_load(path.read_text()))


def resolve(
    pipeline: str,
    overrides: Mapping[str, ApprovalPolicy] | None = None,
    policies: Mapping[str, Mapping[str, ApprovalPolicy]] | None = None,
) -> dict[str, ApprovalPolicy]:
    """The policies a new run of `pipeline` uses: shared steps, then the pipeline's own, then
    the tenant's overrides."""
    policies = policies if policies is not None else load_policies()
    resolved = {**policies.get("*", {}), **policies.get(pipeline, {})}
    resolved.update(overrides or {})
    return resolved
