"""Policies from a search path: Stead's defaults, then the application's files, then a
deployment's (`STEAD_POLICY_PATH`, directories separated by `:`), each merged over the last.

Each directory may hold any of `permissions.yaml`, `approvals.yaml`, `routing.yaml`,
`prices.yaml`, `redaction.yaml` and `limits.yaml`. Merging, so that a file says only what it
adds or changes:

- permissions: a role or agent named again keeps what it had; its `rights` are added to and
  its `grants` appended to (a tenant override, not a file, takes a grant away);
- approvals: a pipeline's step named again is replaced;
- routing: a task class's plan named again is replaced;
- prices: a model named again is replaced; `as_of`, `sources` and `unknown_model_rates` too;
- redaction: `drop` and `mask` fields are added to; a pattern named again is replaced;
- limits: a plan's action named again is replaced (`STEAD_LIMITS_FILE`, when set, replaces
  the limits outright).

Every file is validated as it is merged: the first problem stops the process with one line
naming the file and the field.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import TypeAdapter, ValidationError

from stead.contract import ApprovalPolicy
from stead.policy.limits import LimitPolicy
from stead.policy.models import PriceTable, RoutingPolicy
from stead.policy.permissions import PermissionPolicy
from stead.policy.redaction import RedactionPolicy

DEFAULTS = Path(__file__).parent / "defaults"
T = TypeVar("T")
Merge = Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]
_APPROVALS = TypeAdapter(dict[str, dict[str, ApprovalPolicy]])


class PolicyError(Exception):
    """A policy file that does not load: one line naming the file and the field."""


@dataclass(frozen=True)
class PolicySet:
    permissions: PermissionPolicy
    approvals: dict[str, dict[str, ApprovalPolicy]]
    routing: RoutingPolicy
    prices: PriceTable
    redaction: RedactionPolicy
    limits: LimitPolicy
    files: tuple[Path, ...] = ()

    @staticmethod
    def load(search: Sequence[Path] = (), *, limits_file: Path | None = None) -> PolicySet:
        dirs = [DEFAULTS, *search]
        files: list[Path] = []

        def load_kind(name: str, merge: Merge, build: Callable[[dict[str, Any]], T]) -> T:
            merged: dict[str, Any] = {}
            built: T | None = None
            for directory in dirs:
                path = directory / f"{name}.yaml"
                if not path.is_file():
                    if directory == DEFAULTS:
                        raise PolicyError(f"{path}: Stead's default policy is missing")
                    continue
                files.append(path)
                merged = merge(merged, _read(path))
                built = _validated(path, merged, build)
            assert built is not None
            return built

        limits = load_kind("limits", _merge_limits, LimitPolicy.model_validate)
        if limits_file is not None:
            files.append(limits_file)
            limits = _validated(limits_file, _read(limits_file), LimitPolicy.model_validate)
        return PolicySet(
            permissions=load_kind(
                "permissions",
                _merge_permissions,
                lambda raw: PermissionPolicy.model_validate(raw).with_rules(),
            ),
            approvals=load_kind("approvals", _merge_two_levels, _APPROVALS.validate_python),
            routing=load_kind(
                "routing", _under("routes", _merge_two_levels), RoutingPolicy.model_validate
            ),
            prices=load_kind("prices", _merge_prices, PriceTable.model_validate),
            redaction=load_kind("redaction", _merge_redaction, RedactionPolicy.model_validate),
            limits=limits,
            files=tuple(files),
        )


def _read(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PolicyError(f"{path}: not readable YAML ({first})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise PolicyError(f"{path}: must be a mapping at the top")
    return raw


def _validated(path: Path, raw: dict[str, Any], build: Callable[[dict[str, Any]], T]) -> T:
    try:
        return build(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top)"
        raise PolicyError(f"{path}: {where}: {first['msg']}") from None
    except ValueError as exc:
        raise PolicyError(f"{path}: {exc}") from None


def _merge_two_levels(base: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in more.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _under(key: str, merge: Merge) -> Merge:
    def merged(base: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
        out = {**base, **{k: v for k, v in more.items() if k != key}}
        out[key] = merge(base.get(key) or {}, more.get(key) or {})
        return out

    return merged


def _merge_permissions(base: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for section in ("roles", "agents"):
        into: dict[str, Any] = merged.setdefault(section, {})
        for name, given in (more.get(section) or {}).items():
            entry = dict(given or {})
            known = into.get(name)
            if not isinstance(known, dict):
                into[name] = entry
                continue
            rights = [*known.get("rights", []), *entry.pop("rights", [])]
            grants = [*known.get("grants", []), *entry.pop("grants", [])]
            into[name] = {**known, **entry, "grants": grants}
            if section == "roles":
                into[name]["rights"] = list(dict.fromkeys(rights))
    for key, value in more.items():
        if key not in ("roles", "agents"):
            merged[key] = value
    return merged


def _merge_prices(base: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    return {
        **base,
        **{k: v for k, v in more.items() if k != "models"},
        "models": {
            **(base.get("models") or {}),
            **(more.get("models") or {}),
        },
    }


def _merge_redaction(base: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    fields = dict(base.get("fields") or {})
    for kind in ("drop", "mask"):
        added = (more.get("fields") or {}).get(kind) or []
        fields[kind] = list(dict.fromkeys([*fields.get(kind, []), *added]))
    patterns = {p["name"]: p for p in base.get("patterns") or [] if isinstance(p, dict)}
    for pattern in more.get("patterns") or []:
        if isinstance(pattern, dict):
            patterns[pattern.get("name", "")] = pattern
    rest = {k: v for k, v in more.items() if k not in ("fields", "patterns")}
    return {**base, **rest, "fields": fields, "patterns": list(patterns.values())}


def _merge_limits(base: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    plans = dict(base.get("plans") or {})
    for plan, actions in (more.get("plans") or {}).items():
        plans[plan] = {**(plans.get(plan) or {}), **(actions or {})}
    return {**base, **{k: v for k, v in more.items() if k != "plans"}, "plans": plans}


@cache
def load_defaults() -> PolicySet:
    """Stead's own policies alone (tools and tests that need no application)."""
    return PolicySet.load()
