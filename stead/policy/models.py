"""Model routing and prices, loaded from `routing.yaml` and `prices.yaml` and checked at load.

Costs are integers in nano-USD (1e-9 USD): every listed price has at most three decimals per
million tokens, so `price * 1000 * tokens` is exact and sums never drift.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from functools import cache
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

HERE = Path(__file__).parent / "defaults"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rates(_Strict):
    input: Decimal = Field(ge=0)
    output: Decimal = Field(ge=0)
    cache_write: Decimal = Field(ge=0)
    cache_read: Decimal = Field(ge=0)


class LongPromptRates(Rates):
    threshold_tokens: int = Field(gt=0)


class ModelPrice(Rates):
    long_prompt: LongPromptRates | None = None


class TokenCounts(_Strict):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0


class PriceTable(_Strict):
    as_of: date
    sources: str
    unknown_model_rates: str
    models: dict[str, ModelPrice]

    @model_validator(mode="after")
    def _fallback_listed(self) -> PriceTable:
        if self.unknown_model_rates not in self.models:
            raise ValueError("unknown_model_rates must name a listed model")
        return self

    def rates(self, model: str, prompt_tokens: int) -> Rates:
        price = self.models.get(model) or self.models[self.unknown_model_rates]
        if price.long_prompt and prompt_tokens > price.long_prompt.threshold_tokens:
            return price.long_prompt
        return price

    def cost_nusd(self, model: str, usage: TokenCounts) -> int:
        prompt = usage.input_tokens + usage.cache_read_tokens + usage.cache_write_tokens
        rates = self.rates(model, prompt)
        total = (
            rates.input * usage.input_tokens
            + rates.output * usage.output_tokens
            + rates.cache_write * usage.cache_write_tokens
            + rates.cache_read * usage.cache_read_tokens
        )
        return int(total * 1000)

    def worst_case_nusd(self, model: str, input_tokens: int, max_tokens: int) -> int:
        """The most a call can cost: every prompt token uncached (writes cost more than
        reads but a request cannot write more than it sends), plus max_tokens of output."""
        rates = self.rates(model, input_tokens)
        per_input = max(rates.input, rates.cache_write)
        return int((per_input * input_tokens + rates.output * max_tokens) * 1000)


class Route(_Strict):
    models: tuple[str, ...] = Field(min_length=1)
    escalate: str | None = None

    def candidates(self, escalate: bool) -> tuple[str, ...]:
        if escalate and self.escalate:
            return (self.escalate, *(m for m in self.models if m != self.escalate))
        return self.models


class RoutingPolicy(_Strict):
    routes: dict[str, dict[str, Route]]

    @model_validator(mode="after")
    def _defaults_present(self) -> RoutingPolicy:
        for task, plans in self.routes.items():
            if "default" not in plans:
                raise ValueError(f"route {task!r} has no default plan")
        return self

    def route(self, task: str, plan: str) -> Route:
        plans = self.routes.get(task)
        if plans is None:
            raise KeyError(f"no route for task class {task!r}")
        return plans.get(plan) or plans["default"]


@cache
def load_prices(path: Path = HERE / "prices.yaml") -> PriceTable:
    return PriceTable.model_validate(yaml.safe_load(path.read_text()))


@cache
def load_routing(path: Path = HERE / "routing.yaml") -> RoutingPolicy:
    return RoutingPolicy.model_validate(yaml.safe_load(path.read_text()))
