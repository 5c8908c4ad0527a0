"""The Pydantic AI baseline's agents: one `TemporalAgent` per model step of `bench.shape`.

Runs only in the peers' virtualenv (`.bench-venv`, from `bench/peers-requirements.txt`),
never in Stead's. The worker module imports this one through the workflow sandbox
(`imports_passed_through`), so the agents and their Anthropic client are built once per
process, as Pydantic AI's own examples define agents at module level beside the workflow.

Each agent talks to the simulator through a real `AsyncAnthropic(max_retries=0)` (Temporal
retries, as in Stead and the hand-rolled baseline) with the step's model, system prompt and
`max_tokens`.
"""

from __future__ import annotations

import os
import warnings

import anthropic
from pydantic_ai import Agent
from pydantic_ai.durable_exec.temporal import TemporalAgent
from pydantic_ai.models.anthropic import AnthropicModel
from pydantic_ai.providers.anthropic import AnthropicProvider

from bench.shape import Shape, Step

SIM_KEY = "bench"  # the simulator wants a key; any will do
SHAPE = Shape.from_env()
_CLIENT = anthropic.AsyncAnthropic(
    base_url=os.environ["STEAD_MODEL_BASE_URL"], api_key=SIM_KEY, max_retries=0
)
_PROVIDER = AnthropicProvider(anthropic_client=_CLIENT)


def _agent(step: Step) -> TemporalAgent[None, str]:
    agent: Agent[None, str] = Agent(
        AnthropicModel(step.model, provider=_PROVIDER),
        name=f"bench_{step.name}",
        instructions=step.system,
        model_settings={"max_tokens": step.max_tokens},
    )
    # TemporalAgent is what the benchmark's brief names; 2.68 prefers a capability on a plain
    # Agent (TemporalDurability) and warns, which would only clutter the worker's log.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return TemporalAgent(agent)


CLASSIFY, DRAFT, CHECK = (_agent(step) for step in SHAPE.triage)
SUMMARIZE = _agent(SHAPE.summarize)
