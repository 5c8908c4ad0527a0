"""The web app's pure parts: a proposal's schema as form fields and the form back as typed
edits, and the usage charts' layout."""

from __future__ import annotations

import itertools
from datetime import date
from decimal import Decimal
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from stead.service import feed
from stead.service.errors import Invalid
from stead.service.usage import DailyUsage
from stead.web.charts import PALETTE, days_between, stacked_by_day
from stead.web.forms import edits_from_form, proposal_fields
from tests.web_support import live_script_events


class Refund(BaseModel):
    customer_id: str = Field(max_length=128)
    amount: Decimal = Field(gt=0, description="amount, e.g. 40.00")
    currency: Literal["USD", "EUR"] = "USD"
    notify: bool = True
    attempts: int = 1
    note: str = Field("", max_length=2000)
    extra: dict[str, int] = Field(default_factory=dict)


DATA = {
    "customer_id": "cus_1",
    "amount": "40.00",
    "currency": "USD",
    "notify": True,
    "attempts": 1,
    "note": "hi",
    "extra": {"a": 1},
}
EDITABLE = ["amount", "currency", "notify", "attempts", "note", "extra"]


def test_fields_follow_the_schema() -> None:
    fields = {f.name: f for f in proposal_fields(Refund, DATA, EDITABLE)}
    assert [f.kind for f in fields.values()] == [
        "text",
        "number",
        "select",
        "checkbox",
        "integer",
        "textarea",
        "json",
    ]
    assert not fields["customer_id"].editable
    assert fields["amount"].help == "amount, e.g. 40.00"
    assert fields["currency"].options == ["USD", "EUR"]
    assert fields["amount"].value == "40.00"
    assert fields["notify"].value == "true"


def test_only_changed_editable_fields_become_typed_edits() -> None:
    fields = proposal_fields(Refund, DATA, EDITABLE)
    unchanged = {
        "edit.customer_id": "cus_EVIL",  # not editable: ignored, never an edit
        "edit.amount": " 40.00 ",
        "edit.currency": "USD",
        "edit.notify": "true",
        "edit.attempts": "1",
        "edit.note": "hi",
        "edit.extra": '{\n  "a": 1\n}',
    }
    assert edits_from_form(fields, unchanged) == {}
    changed = {
        **unchanged,
        "edit.amount": "25.10",
        "edit.attempts": "3",
        "edit.note": "line one\r\nline two",
        "edit.extra": '{"a": 2}',
    }
    del changed["edit.notify"]  # an unticked checkbox is not sent at all
    assert edits_from_form(fields, changed) == {
        "amount": "25.10",  # as written: exact decimals, no float in between
        "notify": False,
        "attempts": 3,
        "note": "line one\nline two",
        "extra": {"a": 2},
    }


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("edit.amount", "twelve", "must be a number"),
        ("edit.amount", "NaN", "finite"),
        ("edit.amount", "1e999", "finite"),
        ("edit.attempts", "2.5", "whole number"),
        ("edit.extra", "{", "not valid JSON"),
    ],
)
def test_a_value_not_of_its_fields_type_is_refused(field: str, value: str, reason: str) -> None:
    fields = proposal_fields(Refund, DATA, EDITABLE)
    with pytest.raises(Invalid, match=reason):
        edits_from_form(fields, {field: value, "edit.notify": "true"})


def test_days_stack_by_series_with_the_rest_as_other() -> None:
    days = days_between(date(2026, 11, 1), date(2026, 11, 3))
    assert days == ["2026-11-01", "2026-11-02", "2026-11-03"]
    rows = [
        DailyUsage(day="2026-11-01", key=f"m{i}", calls=1, tokens=10, cost_usd=i + 1.0)
        for i in range(PALETTE + 2)
    ]
    rows.append(DailyUsage(day="2026-11-03", key="m0", calls=1, tokens=5, cost_usd=0.5))
    chart = stacked_by_day(rows, days, "cost_usd", "Cost by model")
    legend = [s.key for s in chart.legend]
    assert legend[:2] == ["m8", "m7"]  # biggest first
    assert legend[-1] == "other"
    assert len(legend) == PALETTE + 1
    day_one = [b for b in chart.bars if b.label.startswith("2026-11-01")]
    assert len(day_one) == PALETTE + 1  # one segment per series, the two smallest summed
    # Stacked: each segment starts where the one below it ends.
    for lower, upper in itertools.pairwise(day_one):
        assert upper.y + upper.height == pytest.approx(lower.y)
    assert not [b for b in chart.bars if b.label.startswith("2026-11-02")]
    assert chart.table == [
        ("2026-11-01", [f"${v:g}" for v in (9, 8, 7, 6, 5, 4, 3)] + ["$3"]),
        ("2026-11-03", ["$0"] * PALETTE + ["$0.5"]),  # m0's 1.5 in all is among "other"
    ]
    # The axis reaches a round number above the tallest day (45 USD: 50).
    assert chart.y_ticks[-1].text == "$50"


def test_an_empty_range_draws_no_bars() -> None:
    chart = stacked_by_day([], days_between(date(2026, 11, 1), date(2026, 11, 7)), "calls", "x")
    assert chart.empty
    assert len(chart.x_ticks) == 7


def test_the_live_script_refreshes_on_every_event_of_the_tenant_feed() -> None:
    assert set(feed.APPROVAL_ACTIONS + feed.RUN_ACTIONS) <= live_script_events()
