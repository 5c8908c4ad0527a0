"""Model routing and prices, loaded from `routing.yaml` and `prices.yaml` and checked at load.

Costs are integers in nano-USD (1e-9 USD): a price with at most three decimals per million
tokens makes `price * 1000 * tokens` exact. Batch cache rates (half of a 0.125 rate) can have
four; a call's cost is then rounded down to the whole nano-USD, once per call.

What the provider bills, per request (and so what `cost_nusd` computes):
- uncached input at `input`, output (thinking included: it is output) at `output`;
- prompt-cache reads at `cache_read`, writes at `cache_write_5m` or `cache_write_1h` by the
  TTL the breakpoint asked for (the API reports the split in `usage.cache_creation`);
- in a Message Batch, input and output at `batch_input` / `batch_output`, cache reads and
  writes at `batch_cache_factor` of their rates;
- a banded model (`long_prompt`) bills the whole request at the band's rates once the prompt
  (input + cache reads + cache writes) passes `threshold_tokens`.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

HERE = Path(__file__).parent / "defaults"

CacheTtl = Literal["5m", "1h"]
PromptCache = Literal["5m", "1h", "off"]
Effort = Literal["low", "medium", "high", "xhigh", "max"]
# The Messages API's own bounds: thinking needs at least 1,024 tokens of budget.
MIN_THINKING_BUDGET = 1024
MAX_THINKING_BUDGET = 64_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rates(_Strict):
    """USD per million tokens."""

    input: Decimal = Field(ge=0)
    output: Decimal = Field(ge=0)
    cache_read: Decimal = Field(ge=0)
    cache_write_5m: Decimal = Field(ge=0)
    cache_write_1h: Decimal = Field(ge=0)
    batch_input: Decimal = Field(ge=0)
    batch_output: Decimal = Field(ge=0)

    def cache_write(self, ttl: CacheTtl) -> Decimal:
        return self.cache_write_1h if ttl == "1h" else self.cache_write_5m


class LongPromptRates(Rates):
    threshold_tokens: int = Field(gt=0)


class ModelPrice(Rates):
    long_prompt: LongPromptRates | None = None
    source: str = ""


class TokenCounts(_Strict):
    """A call's usage as the provider reports it. `cache_write_tokens` is every prompt-cache
    write, `cache_write_1h_tokens` the part of it written with the 1-hour TTL; the output
    includes `thinking_tokens`."""

    input_tokens: int = Field(0, ge=0)
    output_tokens: int = Field(0, ge=0)
    cache_read_tokens: int = Field(0, ge=0)
    cache_write_tokens: int = Field(0, ge=0)
    cache_write_1h_tokens: int = Field(0, ge=0)
    thinking_tokens: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _parts_within_totals(self) -> TokenCounts:
        if self.cache_write_1h_tokens > self.cache_write_tokens:
            raise ValueError("cache_write_1h_tokens exceeds cache_write_tokens")
        if self.thinking_tokens > self.output_tokens:
            raise ValueError("thinking_tokens exceeds output_tokens")
        return self

    @property
    def cache_write_5m_tokens(self) -> int:
        return self.cache_write_tokens - self.cache_write_1h_tokens

    @property
    def prompt_tokens(self) -> int:
        return self.input_tokens + self.cache_read_tokens + self.cache_write_tokens


class PriceTable(_Strict):
    as_of: date
    sources: str
    unknown_model_rates: str
    # Cache reads and writes inside a Message Batch, as a share of their direct rates.
    batch_cache_factor: Decimal = Field(Decimal("0.5"), ge=0, le=1)
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

    def cost_nusd(self, model: str, usage: TokenCounts, *, batch: bool = False) -> int:
        rates = self.rates(model, usage.prompt_tokens)
        factor = self.batch_cache_factor if batch else Decimal(1)
        total = (
            (rates.batch_input if batch else rates.input) * usage.input_tokens
            + (rates.batch_output if batch else rates.output) * usage.output_tokens
            + factor * rates.cache_write_5m * usage.cache_write_5m_tokens
            + factor * rates.cache_write_1h * usage.cache_write_1h_tokens
            + factor * rates.cache_read * usage.cache_read_tokens
        )
        return int(total * 1000)

    def cache_saved_nusd(self, model: str, usage: TokenCounts, *, batch: bool = False) -> int:
        """What prompt caching saved on this call: its cached tokens (read or written) at the
        uncached input rate, less what they cost. Negative for a call that only wrote."""
        cached = usage.cache_read_tokens + usage.cache_write_tokens
        if not cached:
            return 0
        uncached = usage.model_copy(
            update={
                "input_tokens": usage.input_tokens + cached,
                "cache_read_tokens": 0,
                "cache_write_tokens": 0,
                "cache_write_1h_tokens": 0,
            }
        )
        return self.cost_nusd(model, uncached, batch=batch) - self.cost_nusd(
            model, usage, batch=batch
        )

    def worst_case_nusd(
        self,
        model: str,
        input_tokens: int,
        max_tokens: int,
        *,
        cache_ttl: CacheTtl | None = "5m",
        batch: bool = False,
    ) -> int:
        """The most a call can cost: every prompt token billed at the dearest rate it can be
        (uncached input, or a cache write at the TTL's rate when caching is on: a request
        cannot write more than it sends), plus `max_tokens` of output (thinking included)."""
        rates = self.rates(model, input_tokens)
        per_input = rates.batch_input if batch else rates.input
        if cache_ttl is not None:
            write = rates.cache_write(cache_ttl) * (self.batch_cache_factor if batch else 1)
            per_input = max(per_input, write)
        per_output = rates.batch_output if batch else rates.output
        return int((per_input * input_tokens + per_output * max_tokens) * 1000)


class Thinking(_Strict):
    """Extended thinking for a route: a token budget (billed as output, and counted in the
    call's worst case on top of the step's own `max_tokens`), or `adaptive`: the model
    decides, within the budget."""

    type: Literal["enabled", "adaptive"] = "enabled"
    budget_tokens: int = Field(MIN_THINKING_BUDGET, ge=MIN_THINKING_BUDGET, le=MAX_THINKING_BUDGET)

    def request(self) -> dict[str, object]:
        if self.type == "adaptive":
            return {"type": "adaptive"}
        return {"type": "enabled", "budget_tokens": self.budget_tokens}


class Route(_Strict):
    models: tuple[str, ...] = Field(min_length=1)
    escalate: str | None = None
    # The TTL of the breakpoints the gateway places (tools, system, the conversation so far),
    # or `off`: no breakpoints for this task class.
    prompt_cache: PromptCache = "5m"
    thinking: Thinking | None = None
    effort: Effort | None = None

    def candidates(self, escalate: bool) -> tuple[str, ...]:
        if escalate and self.escalate:
            return (self.escalate, *(m for m in self.models if m != self.escalate))
        return self.models

    @property
    def cache_ttl(self) -> CacheTtl | None:
        return None if self.prompt_cache == "off" else self.prompt_cache


class BatchPolicy(_Strict):
    """How deferred model calls are gathered into Message Batches (see stead/gateway/batches).

    A tenant's batcher submits when `max_requests` are waiting or the oldest has waited
    `max_age_seconds`, checks a submitted batch every `poll_seconds` (a durable timer), and a
    deferred call falls back to a direct one when its result is not in after
    `deadline_seconds` (the Batches API's own limit is 24 hours).
    """

    max_requests: int = Field(500, ge=1, le=100_000)
    max_age_seconds: float = Field(30.0, ge=0.1, le=3600)
    poll_seconds: float = Field(30.0, ge=0.1, le=3600)
    deadline_seconds: float = Field(86_400.0, ge=1, le=7 * 86_400)


class RoutingPolicy(_Strict):
    routes: dict[str, dict[str, Route]]
    batches: BatchPolicy = BatchPolicy()

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
