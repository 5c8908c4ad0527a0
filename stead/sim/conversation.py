"""What the simulator reads from a conversation, so that its agent behaves plausibly.

A model working a ticket calls tools with arguments it took from what it has read: the
customer's email from the lookup's result, the amount from the ticket's text, a reply that
says what it found. `Learned` gathers those facts from the request (user text, tool results)
deterministically, and answers for one tool property at a time; hints (`key: value` lines,
see `stead.sim.messages`) still win over anything learned, so tests can script exact or
hostile behaviour.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

HINT_LINE = re.compile(r"^\s*([A-Za-z0-9_][\w.-]*)\s*[:=]\s*(.*?)\s*$")
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
_SYMBOLS = {"$": "USD", "€": "EUR", "£": "GBP"}
_WORDS = {"usd": "USD", "dollars": "USD", "eur": "EUR", "euros": "EUR", "gbp": "GBP"}
# "$40", "$ 40.00", "€12,50", "40 USD", "40.00 dollars"
_AMOUNT = re.compile(
    r"(?P<sym>[$€£])\s?(?P<a>\d{1,9}(?:[.,]\d{1,2})?)"
    r"|(?P<b>\d{1,9}(?:[.,]\d{1,2})?)\s?(?P<word>USD|EUR|GBP|dollars|euros)\b",
    re.IGNORECASE,
)
_AMOUNT_NAMES = frozenset({"amount", "total", "price", "refund_amount", "value"})
_EMAIL_NAMES = frozenset({"to", "email", "recipient", "email_address", "address_to"})
_BODY_NAMES = frozenset({"body", "message", "text", "content", "reply"})
_SUBJECT_NAMES = frozenset({"subject", "title"})
_REASON_NAMES = frozenset({"reason", "note", "notes", "description", "summary", "comment"})
_FACT_KEYS = ("name", "email", "id", "status", "amount", "currency", "plan")


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def dicts(value: Any) -> list[dict[str, Any]]:
    return [item for item in as_list(value) if isinstance(item, dict)]


def content_blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return dicts(content)


def tool_result_texts(block: dict[str, Any]) -> list[str]:
    content = block.get("content")
    if isinstance(content, str):
        return [content]
    return [str(part.get("text", "")) for part in dicts(content) if part.get("type") == "text"]


def is_hint_line(line: str) -> bool:
    return HINT_LINE.match(line) is not None


@dataclass(frozen=True)
class ToolOutcome:
    """One tool call of the conversation and what came back for it."""

    name: str
    arguments: dict[str, Any]
    text: str
    is_error: bool
    data: dict[str, Any]


@dataclass(frozen=True)
class Amount:
    value: Decimal
    currency: str | None

    def shown(self) -> str:
        return f"{self.value:.2f}" + (f" {self.currency}" if self.currency else "")


@dataclass
class Learned:
    """Facts from the conversation: the ticket's prose, amounts and emails it mentions, and
    every tool call with its result, in order."""

    prose: list[str] = field(default_factory=list)
    amounts: list[Amount] = field(default_factory=list)
    emails: list[str] = field(default_factory=list)
    outcomes: list[ToolOutcome] = field(default_factory=list)

    @staticmethod
    def of(messages: list[dict[str, Any]]) -> Learned:
        learned = Learned()
        calls: dict[str, dict[str, Any]] = {}
        for message in messages:
            for block in content_blocks(message.get("content")):
                kind = block.get("type")
                if message.get("role") == "assistant" and kind == "tool_use":
                    calls[str(block.get("id"))] = block
                elif message.get("role") != "user":
                    continue
                elif kind == "text":
                    learned._read_user_text(str(block.get("text", "")))
                elif kind == "tool_result":
                    learned._read_result(block, calls.get(str(block.get("tool_use_id"))))
        return learned

    def _read_user_text(self, text: str) -> None:
        for line in text.splitlines():
            if line.strip() and not is_hint_line(line):
                self.prose.append(line.strip())
        for match in _AMOUNT.finditer(text):
            amount = _amount(match)
            if amount is not None:
                self.amounts.append(amount)
        self.emails += [e for e in _EMAIL.findall(text) if e not in self.emails]

    def _read_result(self, block: dict[str, Any], call: dict[str, Any] | None) -> None:
        text = "\n".join(tool_result_texts(block))
        data = _record(text)
        is_error = block.get("is_error") is True
        if not is_error:
            # What a tool found is better evidence than what the ticket says.
            found = [e for e in _EMAIL.findall(text) if e not in self.emails]
            self.emails = found + self.emails
        self.outcomes.append(
            ToolOutcome(
                name=str(call.get("name", "")) if call else "",
                arguments=dict(call.get("input") or {}) if call else {},
                text=text,
                is_error=is_error,
                data=data,
            )
        )

    # --- answers for tool properties ---------------------------------------------------------

    def value_for(self, name: str, schema: dict[str, Any]) -> Any:
        """A plausible value for property `name`, or None when nothing read supports one."""
        key = name.lower()
        types = _schema_types(schema)
        if _is_email(key, schema):
            return self.emails[0] if self.emails else None
        if key in _AMOUNT_NAMES and types & {"number", "integer"}:
            return _number(self.amounts[0].value, schema) if self.amounts else None
        if key == "currency":
            return self._currency(schema)
        writer = _WRITERS.get(key) if "string" in types and "enum" not in schema else None
        return writer(self) if writer is not None else self._fact(key)

    def missing_required(self, tool: dict[str, Any], hints: dict[str, str]) -> bool:
        """Whether a required email or amount has no source at all: a careful agent does not
        email nobody or refund nothing, it leaves that tool alone."""
        schema = tool.get("input_schema")
        if not isinstance(schema, dict) or not isinstance(schema.get("properties"), dict):
            return False
        properties: dict[str, Any] = schema["properties"]
        tool_name = str(tool.get("name", ""))
        for name in as_list(schema.get("required")):
            prop = properties.get(name)
            if not isinstance(prop, dict) or f"{tool_name}.{name}" in hints or name in hints:
                continue
            key = str(name).lower()
            if _is_email(key, prop) and not self.emails:
                return True
            is_amount = key in _AMOUNT_NAMES and _schema_types(prop) & {"number", "integer"}
            if is_amount and not self.amounts:
                return True
        return False

    def _currency(self, schema: dict[str, Any]) -> Any:
        found = next((a.currency for a in self.amounts if a.currency), None)
        allowed = as_list(schema.get("enum"))
        if found and (not allowed or found in allowed):
            return found
        return None

    def _fact(self, key: str) -> Any:
        """A value a tool returned under this very key (the newest first)."""
        for outcome in reversed(self.outcomes):
            if not outcome.is_error and key in outcome.data:
                value = outcome.data[key]
                if isinstance(value, str | int | float | bool):
                    return value
        return None

    def _customer_name(self) -> str | None:
        name = self._fact("name")
        return name if isinstance(name, str) and name else None

    def subject(self) -> str | None:
        first = next((line for line in self.prose if not line.lower().startswith("ticket")), None)
        return f"Re: {first[:80]}" if first else None

    def gist(self) -> str | None:
        text = " ".join(line for line in self.prose if not line.lower().startswith("ticket"))
        sentence = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0].strip()
        return sentence[:300] or None

    def reply_body(self) -> str:
        """A reply to the customer that says what the agent found and did."""
        name = self._customer_name()
        lines = [f"Hello {name}," if name else "Hello,", ""]
        gist = self.gist()
        if gist:
            lines.append(f'Thank you for writing to us about this: "{gist}"')
        done = [o for o in self.outcomes if o.name and not _is_read(o)]
        for outcome in done:
            lines.append(_what_happened(outcome))
        if self.amounts and not any(o.data.get("amount") for o in done):
            lines.append(f"We are looking at the {self.amounts[0].shown()} you mention.")
        lines += ["", "Best regards,", "Customer support"]
        return "\n".join(lines)

    def final_text(self) -> str:
        """The agent's closing message: each tool it used and what it learned from it."""
        if not self.outcomes:
            return ""
        parts = [f"{o.name or 'a tool'}: {_gist_of(o)}" for o in self.outcomes]
        errors = sum(1 for o in self.outcomes if o.is_error)
        tally = f"{len(self.outcomes)} tool result{'s' if len(self.outcomes) != 1 else ''}"
        failed = f"{errors} error{'s' if errors != 1 else ''}" if errors else "no errors"
        return f"Summary: {tally}, {failed}. " + "; ".join(parts) + "."


# Properties the agent writes itself (a subject line, a reply, a reason) from what it read.
_WRITERS: dict[str, Callable[[Learned], str | None]] = {
    **dict.fromkeys(_SUBJECT_NAMES, Learned.subject),
    **dict.fromkeys(_BODY_NAMES, Learned.reply_body),
    **dict.fromkeys(_REASON_NAMES, Learned.gist),
}


def _amount(match: re.Match[str]) -> Amount | None:
    raw = match.group("a") or match.group("b")
    try:
        value = Decimal(raw.replace(",", "."))
    except InvalidOperation:
        return None
    if value <= 0:
        return None
    symbol, word = match.group("sym"), match.group("word")
    currency = _SYMBOLS.get(symbol) if symbol else _WORDS.get(str(word).lower())
    return Amount(value, currency)


def _record(text: str) -> dict[str, Any]:
    """A tool result's fields: a JSON object, or `key: value` lines."""
    try:
        parsed = json.loads(text)
    except ValueError:
        lines = (HINT_LINE.match(line) for line in text.splitlines())
        return {m.group(1): m.group(2) for m in lines if m is not None}
    return parsed if isinstance(parsed, dict) else {}


def _schema_types(schema: dict[str, Any]) -> set[str]:
    declared = schema.get("type")
    if isinstance(declared, list):
        return {str(t) for t in declared}
    return {declared} if isinstance(declared, str) else {"string"}


def _is_email(key: str, schema: dict[str, Any]) -> bool:
    if schema.get("format") == "email":
        return True
    pattern = schema.get("pattern")
    return key in _EMAIL_NAMES or (isinstance(pattern, str) and "@" in pattern)


def _number(value: Decimal, schema: dict[str, Any]) -> int | float:
    if "integer" in _schema_types(schema) and "number" not in _schema_types(schema):
        return int(value)
    return float(value)


def _is_read(outcome: ToolOutcome) -> bool:
    return outcome.name.startswith(("lookup", "get", "find", "search", "read"))


def _facts(data: dict[str, Any]) -> Iterator[str]:
    for key in _FACT_KEYS:
        value = data.get(key)
        if isinstance(value, str | int | float) and str(value):
            yield f"{key} {value}"


def _gist_of(outcome: ToolOutcome) -> str:
    facts = ", ".join(_facts(outcome.data))
    words = " ".join(outcome.text.split()[:16])
    said = facts or words or "(empty)"
    return f"refused ({said})" if outcome.is_error else said


def _what_happened(outcome: ToolOutcome) -> str:
    verb = outcome.name.replace("_", " ")
    if outcome.is_error:
        return f"We could not {verb}: {' '.join(outcome.text.split()[:24])}."
    amount = outcome.data.get("amount")
    if amount:
        currency = outcome.data.get("currency", "")
        return f"Done: {verb} of {amount} {currency}".rstrip() + "."
    return f"Done: {verb}."
