"""Usage over time as stacked bar charts, drawn on the server as SVG (no script, no library).

`stacked_by_day` lays out one bar per day, stacked by model or pipeline, in a fixed viewBox;
the template draws the rectangles, axes and legend, and a table with the same numbers for
readers who cannot see the chart.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Literal

from stead.service.usage import DailyUsage

Metric = Literal["cost_usd", "tokens", "calls"]
METRICS: dict[str, str] = {"cost_usd": "Cost (USD)", "tokens": "Tokens", "calls": "Model calls"}
# Series beyond the palette are summed as "other".
PALETTE = 7
WIDTH, HEIGHT = 720, 260
LEFT, RIGHT, TOP, BOTTOM = 64, 8, 12, 36


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    series: int
    label: str


@dataclass(frozen=True)
class Tick:
    at: float
    text: str


@dataclass(frozen=True)
class Series:
    index: int
    key: str
    total: str


@dataclass(frozen=True)
class Chart:
    title: str
    metric: str
    width: int
    height: int
    plot_left: int
    plot_bottom: float
    bars: list[Bar]
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    legend: list[Series]
    days: list[str]
    table: list[tuple[str, list[str]]]

    @property
    def empty(self) -> bool:
        return not self.bars


def days_between(first: date, last: date) -> list[str]:
    count = (last - first).days + 1
    return [(first + timedelta(days=i)).isoformat() for i in range(max(count, 0))]


def stacked_by_day(rows: list[DailyUsage], days: list[str], metric: Metric, title: str) -> Chart:
    values: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    totals: dict[str, float] = defaultdict(float)
    for row in rows:
        value = float(getattr(row, metric))
        values[row.day][row.key] += value
        totals[row.key] += value
    ranked = sorted(totals, key=lambda k: (-totals[k], k))
    keys = ranked[:PALETTE] + (["other"] if len(ranked) > PALETTE else [])
    index = {k: min(i, PALETTE) for i, k in enumerate(ranked)}
    per_day = {
        day: [sum(v for k, v in values[day].items() if index[k] == i) for i in range(len(keys))]
        for day in days
    }
    top = _nice(max((sum(v) for v in per_day.values()), default=0.0))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = plot_w / max(len(days), 1)
    bars: list[Bar] = []
    for d, day in enumerate(days):
        base = 0.0
        for i, value in enumerate(per_day[day]):
            if value <= 0:
                continue
            h = value / top * plot_h
            y = TOP + plot_h - base - h
            bars.append(
                Bar(
                    LEFT + d * step + step * 0.15,
                    y,
                    step * 0.7,
                    h,
                    i,
                    f"{day} {keys[i]}: {_fmt(value, metric)}",
                )
            )
            base += h
    every = max(1, math.ceil(len(days) / 8))
    return Chart(
        title=title,
        metric=METRICS[metric],
        width=WIDTH,
        height=HEIGHT,
        plot_left=LEFT,
        plot_bottom=TOP + plot_h,
        bars=bars,
        x_ticks=[Tick(LEFT + d * step + step / 2, day[5:]) for d, day in enumerate(days)][::every],
        y_ticks=[
            Tick(TOP + plot_h - plot_h * f / 4, _tick(top * f / 4, top / 4, metric))
            for f in range(5)
        ],
        legend=[
            Series(i, k, _fmt(sum(per_day[d][i] for d in days), metric)) for i, k in enumerate(keys)
        ],
        days=days,
        table=[(day, [_fmt(v, metric) for v in per_day[day]]) for day in days if any(per_day[day])],
    )


def _nice(value: float) -> float:
    """A round axis maximum at or above `value` (1, 2 or 5 times a power of ten)."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    return next(m * power for m in (1.0, 2.0, 5.0, 10.0) if m * power >= value)


def _fmt(value: float, metric: Metric) -> str:
    if metric == "cost_usd":
        return f"${value:,.6f}".rstrip("0").rstrip(".") if value else "$0"
    return f"{value:,.0f}"


def _tick(value: float, step: float, metric: Metric) -> str:
    """An axis label with as many decimals as the step between labels needs."""
    decimals = max(0, -math.floor(math.log10(step))) if step < 1 else 0
    text = f"{value:,.{decimals}f}"
    return f"${text}" if metric == "cost_usd" else text
