"""A proposal as a form: its fields from the proposal's schema, and edits back from the form.

Fields the proposal declares editable become inputs of the kind their JSON Schema type asks
for; the rest are shown as they are. What comes back is turned into typed edits of the changed
fields only, and then validated by the service layer exactly as an API decision's edits are
(`stead.pipeline.proposals.apply_edits`): a form can submit nothing the API would accept
differently.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from pydantic import BaseModel

from stead.service.errors import Invalid

Kind = Literal["text", "textarea", "number", "integer", "select", "checkbox", "json"]
# Longer text than this is edited in a textarea.
_LONG_TEXT = 200
PREFIX = "edit."
_SCALARS: tuple[tuple[str, Kind], ...] = (
    ("boolean", "checkbox"),
    ("integer", "integer"),
    ("number", "number"),
)


@dataclass(frozen=True)
class FormField:
    name: str
    label: str
    kind: Kind
    value: str
    editable: bool
    required: bool = False
    help: str = ""
    options: list[str] = field(default_factory=list)
    max_length: int | None = None

    @property
    def input_name(self) -> str:
        return PREFIX + self.name

    @property
    def input_id(self) -> str:
        return "f-" + "".join(c if c.isalnum() else "-" for c in self.name)


def proposal_fields(
    schema: type[BaseModel] | None, data: dict[str, Any], editable: list[str]
) -> list[FormField]:
    """The proposal's fields in the schema's order (then any it does not name)."""
    props: dict[str, Any] = {}
    required: set[str] = set()
    if schema is not None:
        described = schema.model_json_schema()
        props = described.get("properties", {})
        required = set(described.get("required", []))
    names = [n for n in props if n in data] + [n for n in data if n not in props]
    return [
        _field(name, props.get(name, {}), data[name], name in editable, name in required)
        for name in names
    ]


def _field(
    name: str, prop: dict[str, Any], value: Any, editable: bool, required: bool
) -> FormField:
    kind = _kind(prop, value)
    return FormField(
        name=name,
        label=str(prop.get("title") or name.replace("_", " ").capitalize()),
        kind=kind,
        value=display(value),
        editable=editable,
        required=required,
        help=str(prop.get("description") or ""),
        options=[str(o) for o in prop.get("enum", [])],
        max_length=prop.get("maxLength"),
    )


def _kind(prop: dict[str, Any], value: Any) -> Kind:
    if "enum" in prop:
        return "select"
    types = {prop.get("type")} | {p.get("type") for p in prop.get("anyOf", [])}
    for json_type, kind in _SCALARS:
        if json_type in types:
            return kind
    if "object" in types or "array" in types or isinstance(value, dict | list):
        return "json"
    if isinstance(value, str) and (len(value) > _LONG_TEXT or "\n" in value):
        return "textarea"
    if (prop.get("maxLength") or 0) > _LONG_TEXT:
        return "textarea"
    return "text"


def display(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return json.dumps(value, indent=2, ensure_ascii=False)
    return str(value)


def edits_from_form(fields: list[FormField], form: dict[str, str]) -> dict[str, Any]:
    """Typed edits of the editable fields whose submitted value differs from the proposal's.
    A value that is not of its field's type is Invalid (a 422 naming the field)."""
    edits: dict[str, Any] = {}
    for f in fields:
        if not f.editable:
            continue
        if f.kind == "checkbox":
            submitted = "true" if f.input_name in form else "false"
        elif f.input_name in form:
            submitted = form[f.input_name].replace("\r\n", "\n")
        else:
            continue
        if submitted == f.value or (f.kind != "textarea" and submitted.strip() == f.value):
            continue
        edits[f.name] = _typed(f, submitted)
    return edits


def _typed(f: FormField, raw: str) -> Any:
    text = raw.strip()
    if f.kind == "checkbox":
        return text == "true"
    if f.kind == "integer":
        if not text.lstrip("-").isdigit():
            raise Invalid(f"{f.label}: must be a whole number")
        return int(text)
    if f.kind == "number":
        try:
            number = Decimal(text)
        except InvalidOperation:
            raise Invalid(f"{f.label}: must be a number, e.g. 40.00") from None
        if not number.is_finite() or not math.isfinite(float(number)):
            raise Invalid(f"{f.label}: must be a finite number")
        # As written: a decimal amount keeps its digits (40.10 stays 40.10, no float between).
        return text
    if f.kind == "json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise Invalid(f"{f.label}: not valid JSON ({exc.msg})") from None
    return raw if f.kind == "textarea" else text
