"""Redaction applied to audit content before it is stored.

`Redactor.apply(data)` returns what the audit entry shows to everyone, and the private part
(masked originals) that is stored encrypted for viewers with the `audit:read_sensitive` right.
Dropped content (secrets, card numbers) is in neither. Control characters in every string are
neutralized, so a logged value cannot forge lines in an export or a terminal.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

POLICY_FILE = Path(__file__).with_name("redaction.yaml")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u0085\u2028\u2029]")

PathKey = list[str | int]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FieldRules(_Strict):
    drop: tuple[str, ...] = ()
    mask: tuple[str, ...] = ()


class PatternRule(_Strict):
    name: str = Field(pattern=r"^[a-z0-9_]+$")
    action: Literal["drop", "mask"]
    regex: str
    luhn: bool = False

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str) -> str:
        re.compile(value)
        return value


class RedactionPolicy(_Strict):
    fields: FieldRules = FieldRules()
    patterns: tuple[PatternRule, ...] = ()

    def with_fields(self, drop: Iterable[str] = (), mask: Iterable[str] = ()) -> RedactionPolicy:
        """A tenant's additions: more fields to drop or mask (never fewer)."""
        return RedactionPolicy(
            fields=FieldRules(
                drop=tuple(dict.fromkeys((*self.fields.drop, *drop))),
                mask=tuple(dict.fromkeys((*self.fields.mask, *mask))),
            ),
            patterns=self.patterns,
        )


def load_policy(path: Path = POLICY_FILE) -> RedactionPolicy:
    return RedactionPolicy.model_validate(yaml.safe_load(path.read_text()))


def _luhn_ok(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def neutralize(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class Redactor:
    def __init__(self, policy: RedactionPolicy) -> None:
        self._drop = {f.lower() for f in policy.fields.drop}
        self._mask = {f.lower() for f in policy.fields.mask}
        self._patterns = [(rule, re.compile(rule.regex)) for rule in policy.patterns]

    def apply(self, data: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[PathKey, Any]]]:
        private: list[tuple[PathKey, Any]] = []
        visible = self._walk(data, [], private)
        assert isinstance(visible, dict)
        return visible, private

    def scrub(self, value: Any) -> Any:
        """Drop-rules only (secrets, cards) and neutralized text: safe to keep, encrypted."""
        if isinstance(value, str):
            return neutralize(self._text(value, masks=False)[0])
        if isinstance(value, dict):
            return {
                neutralize(str(k)): (
                    "[redacted]" if str(k).lower() in self._drop else self.scrub(v)
                )
                for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self.scrub(v) for v in value]
        return value

    def _walk(self, value: Any, path: PathKey, private: list[tuple[PathKey, Any]]) -> Any:
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            for raw_key, item in value.items():
                key = neutralize(str(raw_key))
                lowered = key.lower()
                if lowered in self._drop:
                    out[key] = "[redacted]"
                elif lowered in self._mask and item not in (None, "", [], {}):
                    private.append(([*path, key], self.scrub(item)))
                    out[key] = "[masked]"
                else:
                    out[key] = self._walk(item, [*path, key], private)
            return out
        if isinstance(value, list | tuple):
            return [self._walk(item, [*path, i], private) for i, item in enumerate(value)]
        if isinstance(value, str):
            text, masked = self._text(value, masks=True)
            if masked:
                private.append((path, self.scrub(value)))
            return neutralize(text)
        return value

    def _text(self, text: str, *, masks: bool) -> tuple[str, bool]:
        masked = False
        for rule, pattern in self._patterns:
            if rule.action == "mask" and not masks:
                continue

            def replace(match: re.Match[str], rule: PatternRule = rule) -> str:
                nonlocal masked
                if rule.luhn and not _luhn_ok(re.sub(r"\D", "", match.group())):
                    return match.group()
                if rule.action == "mask":
                    masked = True
                    return f"[masked:{rule.name}]"
                return f"[redacted:{rule.name}]"

            text = pattern.sub(replace, text)
        return text, masked


def reveal(visible: dict[str, Any], private: list[tuple[PathKey, Any]]) -> dict[str, Any]:
    """Put masked originals back into a copy of the visible data (for authorized viewers)."""
    full = copy.deepcopy(visible)
    for path, original in private:
        if not path:
            continue
        target: Any = full
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = original
    return full


@cache
def default_redactor() -> Redactor:
    return Redactor(load_policy())
