"""Redaction applied to audit content before it is stored.

`Redactor.apply(data)` returns what the audit entry shows to everyone, and the private part
(masked originals) that is stored encrypted for viewers with the `audit:read_sensitive` right.
Dropped content (secrets, card numbers) is in neither. Control characters in every string are
neutralized, so a logged value cannot forge lines in an export or a terminal.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

POLICY_FILE = Path(__file__).parent / "defaults" / "redaction.yaml"
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


# Card numbers are 13-19 digits long (ISO/IEC 7812), however they are grouped.
_CARD_DIGITS = range(13, 20)
_DIGIT_GROUP = re.compile(r"[0-9]+")


def luhn_spans(text: str) -> list[tuple[int, int]]:
    """Where `text` (digit groups and separators) holds a card number: stretches of 13-19
    digits that start and end on a group boundary and pass the Luhn check, the longest first
    from each group on. Other numbers around a card ("ref 12 4111 1111 1111 1111") neither
    hide it nor are dropped with it."""
    groups = [(m.start(), m.end()) for m in _DIGIT_GROUP.finditer(text)]
    spans: list[tuple[int, int]] = []
    first = 0
    while first < len(groups):
        digits, candidates = "", []
        for last in range(first, len(groups)):
            digits += text[groups[last][0] : groups[last][1]]
            if len(digits) > _CARD_DIGITS[-1]:
                break
            if len(digits) in _CARD_DIGITS and _luhn_ok(digits):
                candidates.append(last)
        if candidates:
            spans.append((groups[first][0], groups[candidates[-1]][1]))
            first = candidates[-1] + 1
        else:
            first += 1
    return spans


def neutralize(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _as_is(text: str) -> str:
    return text


_MARKER = re.compile(r"\[(?:redacted|masked)(?::[a-z0-9_]+)?\]")


class Redactor:
    """Applies one policy. Field rules match key names anywhere (case-insensitive); pattern
    rules match inside strings. A pattern with a group named `value` replaces only that group
    (`password: [redacted:credential]` keeps its label); a `luhn` pattern only the stretches
    `luhn_spans` finds in each match."""

    def __init__(self, policy: RedactionPolicy) -> None:
        self._drop = {f.lower() for f in policy.fields.drop}
        self._mask = {f.lower() for f in policy.fields.mask}
        self._patterns = [(rule, re.compile(rule.regex)) for rule in policy.patterns]

    def apply(self, data: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[PathKey, Any]]]:
        """For storage: the visible entry, and the masked originals (drop rules applied) to
        seal. Control characters are neutralized in both."""
        private: list[tuple[PathKey, Any]] = []
        visible = self._walk(data, [], private, neutralize)
        assert isinstance(visible, dict)
        return visible, private

    def scrub(self, value: Any) -> Any:
        """Drop-rules only (secrets, cards) and neutralized text: safe to keep, encrypted."""
        return self._scrub(value, neutralize)

    def view(self, data: dict[str, Any], *, reveal_masked: bool) -> dict[str, Any]:
        """For a reader through the API: drop rules always; masked fields and text as markers
        unless `reveal_masked`. Text stays as written (JSON carries control characters
        safely, and an email body shown for approval must read as it will be sent)."""
        shown = self._scrub(data, _as_is) if reveal_masked else self._walk(data, [], None, _as_is)
        assert isinstance(shown, dict)
        return shown

    def drop_text(self, text: str) -> str:
        """A string with the drop patterns applied (a title, a label), as written otherwise."""
        return self._text(text, masks=False)[0]

    def _scrub(self, value: Any, clean: Callable[[str], str]) -> Any:
        if isinstance(value, str):
            return clean(self._text(value, masks=False)[0])
        if isinstance(value, dict):
            return {
                clean(str(k)): (
                    "[redacted]" if str(k).lower() in self._drop else self._scrub(v, clean)
                )
                for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self._scrub(v, clean) for v in value]
        return value

    def _walk(
        self,
        value: Any,
        path: PathKey,
        private: list[tuple[PathKey, Any]] | None,
        clean: Callable[[str], str],
    ) -> Any:
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            for raw_key, item in value.items():
                key = clean(str(raw_key))
                lowered = key.lower()
                if lowered in self._drop:
                    out[key] = "[redacted]"
                elif lowered in self._mask and item not in (None, "", [], {}):
                    if private is not None:
                        private.append(([*path, key], self._scrub(item, clean)))
                    out[key] = "[masked]"
                else:
                    out[key] = self._walk(item, [*path, key], private, clean)
            return out
        if isinstance(value, list | tuple):
            return [self._walk(item, [*path, i], private, clean) for i, item in enumerate(value)]
        if isinstance(value, str):
            text, masked = self._text(value, masks=True)
            if masked and private is not None:
                private.append((path, self._scrub(value, clean)))
            return clean(text)
        return value

    def _text(self, text: str, *, masks: bool) -> tuple[str, bool]:
        masked = False
        for rule, pattern in self._patterns:
            if rule.action == "mask" and not masks:
                continue
            marker = f"[{'masked' if rule.action == 'mask' else 'redacted'}:{rule.name}]"
            replaced = pattern.sub(functools.partial(_replace, rule, marker=marker), text)
            masked = masked or (rule.action == "mask" and replaced != text)
            text = replaced
        return text, masked


def _replace(rule: PatternRule, match: re.Match[str], *, marker: str) -> str:
    """The match with the marker over what the rule redacts in it."""
    found = match.group()
    if rule.luhn:
        if len(found) < _CARD_DIGITS[0]:
            return found  # the common case: a short number
        spans = luhn_spans(found)
    elif "value" in match.re.groupindex and match.group("value") is not None:
        start, end = match.span("value")
        spans = [(start - match.start(), end - match.start())]
    else:
        spans = [(0, len(found))]
    for start, end in reversed(spans):
        # A marker an earlier rule left is not a secret to redact again.
        if not _MARKER.fullmatch(found[start:end]):
            found = found[:start] + marker + found[end:]
    return found


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


@functools.cache
def default_redactor() -> Redactor:
    return Redactor(load_policy())


@functools.lru_cache(maxsize=256)
def tenant_redactor(
    policy: RedactionPolicy, drop: tuple[str, ...], mask: tuple[str, ...]
) -> Redactor:
    """The policy with a tenant's additions, compiled once per distinct field set."""
    return Redactor(policy.with_fields(drop=drop, mask=mask))
