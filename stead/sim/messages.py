"""A deterministic local stand-in for the subset of the Anthropic Messages API that Stead uses.

Dev, tests and CI point the real `anthropic.AsyncAnthropic` SDK at this server through
`base_url`, so every model call crosses the same wire protocol as in production while the
answers stay reproducible: the same request body always yields the same response body, ids
included (only the prompt-cache usage split depends on what came before; where the cache
breakpoints sit never changes the answer).

Endpoints (all require a key in `x-api-key` or `Authorization: Bearer KEY`):

- `POST /v1/messages`: message creation; with `stream: true`, the same message as Server-Sent
  Events (`stead.sim.streaming`).
- `POST /v1/messages/count_tokens`: `{"input_tokens": N}` from `count_tokens`.
- `POST /v1/messages/batches`, `GET .../{id}`, `GET .../{id}/results`, `POST .../{id}/cancel`:
  Message Batches (see `stead.sim.batches`), processed after `batch_delay_seconds`.
- `POST /_sim/faults`, `DELETE /_sim/faults`: queue or clear injected failures (a batch
  request takes one too, and errors with it).
- `GET /_sim/stats`, `GET /_sim/requests` (the latest bodies received), `POST /_sim/config`,
  `POST /_sim/reset`: observe and steer the simulator.

The model reads the conversation like an agent would (`stead.sim.conversation`): it calls
each offered tool once, in order, with arguments taken from what it has read (the email from
a tool's result, the amount from the ticket's text, a reply that says what it found), leaves
out a tool whose required email or amount nothing supplies, and ends with a summary of what
each call returned. With `thinking`, it starts with a thinking block (billed as output, more
of it at higher `output_config.effort`). Prompt caching is upstream's: prefixes up to each
`cache_control` breakpoint (at most 4, 1-hour ones first), a minimum cacheable length, reads
found up to 20 blocks back, 5m/1h TTLs refreshed on read, the writes split by TTL.

Behaviour is scripted from inside the prompt by *hints*, which win over anything read: lines
`key: value` or `key=value` in the system prompt or user turns (tool results included); the
latest occurrence of a key wins.
`sim_reply` forces the final text, `sim_skip_tools: a,b` keeps tools from being called,
`sim_parallel_tools: true` calls every remaining tool in one response,
`sim_tool_turns: N` keeps calling tools (cycling through the allowed ones) until the
conversation has N tool-calling turns (long agent loops for benchmarks),
`sim_batch_result: errored|expired|canceled` is a batch request's outcome,
`sim_stream_chunk_ms: N` paces a streamed reply's deltas, and any other key
names a tool input property (`city: Paris`, or `get_weather.city: Paris` for one tool only).

Errors always use Anthropic's body shape: `{"type": "error", "error": {"type", "message"}}`.
"""

import asyncio
import contextlib
import enum
import hashlib
import hmac
import itertools
import json
import math
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, NoReturn, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from stead.sim.batches import Batch, BatchRefused, BatchStore
from stead.sim.conversation import HINT_LINE as _HINT_LINE
from stead.sim.conversation import Learned
from stead.sim.conversation import as_list as _as_list
from stead.sim.conversation import content_blocks as _content_blocks
from stead.sim.conversation import dicts as _dicts
from stead.sim.conversation import tool_result_texts as _tool_result_texts
from stead.sim.streaming import StreamCut, message_events

__all__ = ["SimConfig", "SimState", "count_tokens", "create_app", "create_message"]

MAX_BODY_BYTES = 8 * 1024 * 1024
RECENT_REQUESTS = 64
HANG_CAP_SECONDS = 3600.0
SUMMARY_WORDS = 40
BYTES_PER_TOKEN = 4
MESSAGE_OVERHEAD_TOKENS = 4
TOOL_OVERHEAD_TOKENS = 8
CACHE_TTL_SECONDS = {"5m": 300.0, "1h": 3600.0}
DEFAULT_CACHE_TTL = "5m"
MAX_BREAKPOINTS = 4
LOOKBACK_BLOCKS = 20
# The shortest cacheable prefix: the simulator's own choice per model family (upstream's
# figures differ by model and change), configurable with SimConfig.min_cacheable_tokens.
MIN_CACHEABLE_TOKENS = 1024
MIN_CACHEABLE_BY_FAMILY = (("claude-haiku", 2048),)

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
_FALSE_WORDS = frozenset({"false", "no", "off", "0"})
_BLOCKS_BY_ROLE = {
    "user": frozenset({"text", "tool_result"}),
    "assistant": frozenset({"text", "tool_use", "thinking", "redacted_thinking"}),
}
_KNOWN_BLOCKS = frozenset({"text", "tool_use", "tool_result", "thinking", "redacted_thinking"})
_TOOL_CHOICES = frozenset({"auto", "any", "tool", "none"})
_THINKING_TYPES = frozenset({"enabled", "disabled", "adaptive", "between_tools"})
_EFFORTS = frozenset({"low", "medium", "high", "xhigh", "max"})
# Raw reasoning tokens a thinking response spends by effort (before its budget caps it): the
# visible thinking text is a summary, the billed tokens are more.
_THINKING_BY_EFFORT = {"low": 64, "medium": 256, "high": 512, "xhigh": 1024, "max": 2048}
MIN_THINKING_BUDGET = 1024


# --------------------------------------------------------------------------- configuration


@dataclass
class SimConfig:
    """How a simulator app behaves; `create_app` copies it, so later edits do not leak in."""

    api_key: str | None = None
    """When set, every request must present exactly this key; otherwise any non-empty key works."""
    latency_ms: float = 0.0
    """Delay added before every authenticated `/v1/messages` response (not count_tokens)."""
    min_cacheable_tokens: int | None = None
    """The shortest prefix a cache breakpoint caches; None: per model family (1,024 tokens,
    Haiku 2,048)."""
    batch_delay_seconds: float = 1.0
    """How long a Message Batch stays `in_progress` before its requests are processed."""


@dataclass(frozen=True)
class _Fault:
    status: int
    model: str | None
    retry_after: float | None
    hang: bool
    # Streamed requests only: the stream starts and breaks off after this many deltas.
    after_chunks: int | None = None


@dataclass
class _CacheEntry:
    expires_at: float
    ttl: float


@dataclass
class _Stats:
    requests_by_model: Counter[str] = field(default_factory=Counter)
    requests_total: int = 0
    faults_served: int = 0
    count_tokens_calls: int = 0
    # Requests whose client went away before its body was in (a killed worker, a timeout).
    client_disconnects: int = 0


@dataclass
class SimState:
    """Everything one simulator app mutates; lives on `app.state.sim` so apps never share it.

    `clock` is monotonic seconds and drives prompt-cache expiry and batch processing; tests
    may replace it.
    """

    config: SimConfig
    faults: deque[_Fault] = field(default_factory=deque)
    stats: _Stats = field(default_factory=_Stats)
    cache: dict[str, _CacheEntry] = field(default_factory=dict)
    batches: BatchStore = field(default_factory=BatchStore)
    # The latest /v1/messages bodies, newest last: what a client really sent (breakpoints,
    # thinking), for tests to look at.
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT_REQUESTS))
    clock: Callable[[], float] = time.monotonic

    def take_fault(self, model: str | None) -> _Fault | None:
        """Remove and return the oldest queued fault that applies to `model`, if any."""
        for index, fault in enumerate(self.faults):
            if fault.model is None or fault.model == model:
                del self.faults[index]
                self.stats.faults_served += 1
                return fault
        return None

    def record_request(self, model: object) -> None:
        self.stats.requests_total += 1
        if isinstance(model, str) and model:
            self.stats.requests_by_model[model] += 1

    def reset(self) -> None:
        """Forget faults, stats, the prompt cache and batches; configuration is kept."""
        self.faults.clear()
        self.stats = _Stats()
        self.cache.clear()
        self.batches.clear()
        self.recent.clear()


# --------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answered in Anthropic's shape; raising it anywhere in a handler ends the request."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}

    def to_response(self) -> JSONResponse:
        body = {
            "type": "error",
            "error": {"type": _error_type(self.status), "message": self.message},
        }
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _error_type(status: int) -> str:
    known = _ERROR_TYPES.get(status)
    if known is not None:
        return known
    return "api_error" if status >= 500 else "invalid_request_error"


def _invalid(message: str) -> ApiError:
    return ApiError(400, message)


# --------------------------------------------------------------------------- tokens


def _text_tokens(text: str) -> int:
    return -(-len(text.encode()) // BYTES_PER_TOKEN)


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _block_tokens(block: dict[str, Any]) -> int:
    """Tokens of one content block; used for prompts and for produced output alike."""
    kind = block.get("type")
    if kind == "text":
        return _text_tokens(str(block.get("text", "")))
    if kind == "tool_use":
        return _text_tokens(str(block.get("name", "")) + _compact(block.get("input", {})))
    if kind == "tool_result":
        return sum(_text_tokens(text) for text in _tool_result_texts(block))
    if kind == "thinking":
        return _text_tokens(str(block.get("thinking", "")))
    return _text_tokens(_compact(block))


def _without_cache_control(value: Any) -> Any:
    # Moving a cache breakpoint must not change the identity of the content before it.
    if isinstance(value, dict):
        return {k: _without_cache_control(v) for k, v in value.items() if k != "cache_control"}
    if isinstance(value, list):
        return [_without_cache_control(item) for item in value]
    return value


def _cache_control_of(block: dict[str, Any]) -> Any:
    marker = block.get("cache_control")
    if marker is None and block.get("type") == "tool_result":
        nested = (part.get("cache_control") for part in _dicts(block.get("content")))
        marker = next((m for m in nested if m is not None), None)
    return marker


@dataclass(frozen=True)
class _Unit:
    """One cacheable position of the prompt: a tool, a system block or a message block."""

    tokens: int
    identity: str
    cache_control: Any


def _tool_unit(tool: dict[str, Any]) -> _Unit:
    described = str(tool.get("name", "")) + str(tool.get("description", ""))
    tokens = TOOL_OVERHEAD_TOKENS + _text_tokens(described + _compact(tool.get("input_schema", {})))
    identity = _compact({"tool": _without_cache_control(tool)})
    return _Unit(tokens, identity, tool.get("cache_control"))


def _system_blocks(system: Any) -> list[dict[str, Any]]:
    if isinstance(system, str):
        return [{"type": "text", "text": system}] if system else []
    return _dicts(system)


def _system_unit(block: dict[str, Any]) -> _Unit:
    identity = _compact({"system": _without_cache_control(block)})
    return _Unit(_text_tokens(str(block.get("text", ""))), identity, block.get("cache_control"))


def _message_units(index: int, message: dict[str, Any]) -> list[_Unit]:
    role = message.get("role")
    blocks = _content_blocks(message.get("content"))
    if not blocks:
        return [_Unit(MESSAGE_OVERHEAD_TOKENS, _compact({"message": index, "role": role}), None)]
    units = []
    for position, block in enumerate(blocks):
        # The per-message overhead rides on the first block so that every prefix sums exactly.
        overhead = MESSAGE_OVERHEAD_TOKENS if position == 0 else 0
        identity = _compact(
            {"message": index, "role": role, "block": _without_cache_control(block)}
        )
        units.append(_Unit(overhead + _block_tokens(block), identity, _cache_control_of(block)))
    return units


def _prompt_units(request: dict[str, Any]) -> list[_Unit]:
    units = [_tool_unit(tool) for tool in _dicts(request.get("tools"))]
    units += [_system_unit(block) for block in _system_blocks(request.get("system"))]
    for index, message in enumerate(_dicts(request.get("messages"))):
        units += _message_units(index, message)
    return units


def count_tokens(request: dict[str, Any]) -> int:
    """Deterministic input-token count of a Messages request body.

    Every text piece costs ceil(utf-8 bytes / 4): system text, message text, tool_use name plus
    compact JSON input, tool_result text, and each tool's name + description + compact JSON
    schema. Each message adds 4 tokens and each tool 8. Malformed parts are counted leniently
    rather than rejected; validation is the HTTP layer's job. A `/v1/messages` call for the same
    body reports input + cache creation + cache read tokens equal to this number.
    """
    return sum(unit.tokens for unit in _prompt_units(request))


# --------------------------------------------------------------------------- prompt cache


def _ttl_of(marker: Any) -> str:
    ttl = marker.get("ttl", DEFAULT_CACHE_TTL) if isinstance(marker, dict) else DEFAULT_CACHE_TTL
    return str(ttl) if str(ttl) in CACHE_TTL_SECONDS else DEFAULT_CACHE_TTL


def _breakpoints(units: list[_Unit], automatic: Any) -> dict[int, str]:
    """Breakpoint positions and their TTLs ("5m" or "1h")."""
    points = {i: _ttl_of(u.cache_control) for i, u in enumerate(units) if u.cache_control}
    if automatic and units:
        # A top-level cache_control marks the end of the prompt, as the real API does.
        points.setdefault(len(units) - 1, _ttl_of(automatic))
    return points


def _prefix_keys(scope: str, units: list[_Unit]) -> list[str]:
    keys, current = [], _digest(scope)
    for unit in units:
        current = _digest(current + unit.identity)
        keys.append(current)
    return keys


def min_cacheable_tokens(config: SimConfig, model: str) -> int:
    """The shortest prefix a breakpoint caches for `model`; a shorter one is processed
    without caching (no write, no read, no error), as upstream does."""
    if config.min_cacheable_tokens is not None:
        return config.min_cacheable_tokens
    family = next((n for prefix, n in MIN_CACHEABLE_BY_FAMILY if model.startswith(prefix)), None)
    return family or MIN_CACHEABLE_TOKENS


@dataclass(frozen=True)
class _CacheUse:
    write_5m: int = 0
    write_1h: int = 0
    read: int = 0

    @property
    def written(self) -> int:
        return self.write_5m + self.write_1h


def _lookup_positions(points: dict[int, str]) -> list[int]:
    """Where a read may hit: each breakpoint and the block boundaries up to
    LOOKBACK_BLOCKS before it (upstream checks no further back)."""
    found = {i for p in points for i in range(max(0, p - LOOKBACK_BLOCKS), p + 1)}
    return sorted(found, reverse=True)


def _cache_usage(state: SimState, scope: str, request: dict[str, Any], minimum: int) -> _CacheUse:
    """The prompt-cache usage of `request`, recording its breakpoints.

    Breakpoints whose prefix is shorter than `minimum` tokens are ignored. The longest prefix
    already written at a position the lookback reaches is read; the rest of the cacheable
    prefix (up to the last breakpoint) is written, each token with the TTL of the first
    breakpoint at or after it (the API's `cache_creation` split).
    """
    units = _prompt_units(request)
    cumulative = list(itertools.accumulate(unit.tokens for unit in units))
    points = {
        i: ttl
        for i, ttl in _breakpoints(units, request.get("cache_control")).items()
        if cumulative[i] >= minimum
    }
    if not points:
        return _CacheUse()
    last = max(points)
    keys = _prefix_keys(scope, units[: last + 1])
    now = state.clock()
    for key in [k for k, entry in state.cache.items() if entry.expires_at <= now]:
        del state.cache[key]
    hit = next((i for i in _lookup_positions(points) if keys[i] in state.cache), None)
    read = 0
    if hit is not None:
        entry = state.cache[keys[hit]]
        entry.expires_at = now + entry.ttl  # reading refreshes the entry, as upstream does
        read = cumulative[hit]
    for index, ttl_name in points.items():
        ttl = CACHE_TTL_SECONDS[ttl_name]
        previous = state.cache.get(keys[index])
        expires_at = max(now + ttl, previous.expires_at if previous else 0.0)
        state.cache[keys[index]] = _CacheEntry(
            expires_at, max(ttl, previous.ttl if previous else 0)
        )
    split = {"5m": 0, "1h": 0}
    ordered = sorted(points)
    for index in range((hit + 1) if hit is not None else 0, last + 1):
        covering = next(p for p in ordered if p >= index)
        split[points[covering]] += units[index].tokens
    return _CacheUse(write_5m=split["5m"], write_1h=split["1h"], read=read)


def _check_breakpoints(request: dict[str, Any]) -> None:
    """At most MAX_BREAKPOINTS, and a 1-hour one never after a 5-minute one (upstream
    refuses both)."""
    points = _breakpoints(_prompt_units(request), request.get("cache_control"))
    if len(points) > MAX_BREAKPOINTS:
        raise _invalid(
            f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided."
            f" Found {len(points)}."
        )
    ttls = [points[i] for i in sorted(points)]
    if "5m" in ttls and "1h" in ttls[ttls.index("5m") :]:
        raise _invalid("cache_control: a ttl='1h' entry must come before any ttl='5m' entry")


# --------------------------------------------------------------------------- validation


def _is_one_of(value: Any, options: Collection[str]) -> bool:
    # Membership tests on JSON values must not trip over unhashable lists and objects.
    return isinstance(value, str) and value in options


def _validate_cache_control(marker: Any, where: str) -> None:
    if marker is None:
        return
    if not isinstance(marker, dict) or marker.get("type") != "ephemeral":
        raise _invalid(f"{where}.cache_control: must be {{'type': 'ephemeral'}}")
    if not _is_one_of(marker.get("ttl", DEFAULT_CACHE_TTL), CACHE_TTL_SECONDS):
        raise _invalid(f"{where}.cache_control.ttl: must be one of {sorted(CACHE_TTL_SECONDS)}")


def _validate_model(model: Any) -> str:
    if not isinstance(model, str) or not model.strip():
        raise _invalid("model: field required (a non-empty string)")
    if not model.startswith("claude-"):
        raise ApiError(404, f"model: {model}")
    return model


def _validate_max_tokens(value: Any) -> None:
    if value is None:
        raise _invalid("max_tokens: field required")
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _invalid(f"max_tokens: must be an integer >= 1, got {value!r}")


def _validate_text_block(block: dict[str, Any], where: str) -> None:
    if not isinstance(block.get("text"), str):
        raise _invalid(f"{where}.text: field required (a string)")
    _validate_cache_control(block.get("cache_control"), where)


def _validate_system(system: Any) -> None:
    if system is None or isinstance(system, str):
        return
    if not isinstance(system, list):
        raise _invalid("system: must be a string or a list of text blocks")
    for index, block in enumerate(system):
        where = f"system.{index}"
        if not isinstance(block, dict) or block.get("type") != "text":
            raise _invalid(f"{where}.type: system blocks must be text blocks")
        _validate_text_block(block, where)


def _validate_tool(tool: Any, where: str) -> str:
    if not isinstance(tool, dict):
        raise _invalid(f"{where}: must be an object")
    if tool.get("type") not in (None, "custom"):
        raise _invalid(
            f"{where}.type: unsupported tool type {tool.get('type')!r}; only custom tools"
        )
    name = tool.get("name")
    if not isinstance(name, str) or not _TOOL_NAME.match(name):
        raise _invalid(f"{where}.name: must match {_TOOL_NAME.pattern}")
    if not isinstance(tool.get("input_schema"), dict):
        raise _invalid(f"{where}.input_schema: field required (a JSON schema object)")
    if not isinstance(tool.get("description", ""), str):
        raise _invalid(f"{where}.description: must be a string")
    _validate_cache_control(tool.get("cache_control"), where)
    return name


def _validate_tools(tools: Any) -> list[str]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _invalid("tools: must be a list")
    names = [_validate_tool(tool, f"tools.{index}") for index, tool in enumerate(tools)]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise _invalid(f"tools: tool names must be unique; repeated: {', '.join(duplicates)}")
    return names


def _validate_tool_choice(choice: Any, tool_names: list[str]) -> None:
    if choice is None:
        return
    if not isinstance(choice, dict) or not _is_one_of(choice.get("type"), _TOOL_CHOICES):
        raise _invalid(f"tool_choice.type: must be one of {sorted(_TOOL_CHOICES)}")
    kind = choice["type"]
    if kind in ("any", "tool") and not tool_names:
        raise _invalid(f"tool_choice: type {kind!r} requires tools")
    if kind == "tool" and choice.get("name") not in tool_names:
        raise _invalid(f"tool_choice.name: {choice.get('name')!r} is not one of the offered tools")


def _validate_tool_result(block: dict[str, Any], where: str) -> None:
    if not isinstance(block.get("tool_use_id"), str):
        raise _invalid(f"{where}.tool_use_id: field required (a string)")
    if not isinstance(block.get("is_error", False), bool):
        raise _invalid(f"{where}.is_error: must be a boolean")
    content = block.get("content")
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise _invalid(f"{where}.content: must be a string or a list of text blocks")
    for index, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            raise _invalid(f"{where}.content.{index}.type: only text blocks are supported here")
        _validate_text_block(part, f"{where}.content.{index}")


def _validate_tool_use(block: dict[str, Any], where: str) -> None:
    for key in ("id", "name"):
        if not isinstance(block.get(key), str) or not block[key]:
            raise _invalid(f"{where}.{key}: field required (a non-empty string)")
    if not isinstance(block.get("input"), dict):
        raise _invalid(f"{where}.input: field required (an object)")


def _validate_thinking_block(block: dict[str, Any], where: str) -> None:
    fields = ("thinking", "signature") if block.get("type") == "thinking" else ("data",)
    for key in fields:
        if not isinstance(block.get(key), str):
            raise _invalid(f"{where}.{key}: field required (a string)")


def _validate_thinking(body: dict[str, Any]) -> None:
    """`thinking` and `output_config.effort` as upstream checks them: a budget of at least
    1,024 tokens below max_tokens, and no thinking when tool_choice forces a tool."""
    thinking = body.get("thinking")
    if thinking is not None:
        if not isinstance(thinking, dict) or not _is_one_of(thinking.get("type"), _THINKING_TYPES):
            raise _invalid(f"thinking.type: must be one of {sorted(_THINKING_TYPES)}")
        if thinking["type"] == "enabled":
            budget = thinking.get("budget_tokens")
            max_tokens = body.get("max_tokens")
            if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1024:
                raise _invalid("thinking.budget_tokens: must be an integer >= 1024")
            if isinstance(max_tokens, int) and budget >= max_tokens:
                raise _invalid("max_tokens: must be greater than thinking.budget_tokens")
        choice = body.get("tool_choice")
        forced = isinstance(choice, dict) and choice.get("type") in ("any", "tool")
        if thinking["type"] != "disabled" and forced:
            raise _invalid("Thinking may not be enabled when tool_choice forces tool use.")
    config = body.get("output_config")
    if config is None:
        return
    if not isinstance(config, dict) or set(config) - {"effort", "format"}:
        raise _invalid("output_config: only `effort` and `format` are supported")
    effort = config.get("effort")
    if effort is not None and not _is_one_of(effort, _EFFORTS):
        raise _invalid(f"output_config.effort: must be one of {sorted(_EFFORTS)}")


def _validate_block(block: Any, role: str, where: str) -> dict[str, Any]:
    if not isinstance(block, dict):
        raise _invalid(f"{where}: must be an object")
    kind = block.get("type")
    if not _is_one_of(kind, _KNOWN_BLOCKS):
        supported = ", ".join(sorted(_KNOWN_BLOCKS))
        raise _invalid(
            f"{where}.type: unknown content block type {kind!r} (supported: {supported})"
        )
    if kind not in _BLOCKS_BY_ROLE[role]:
        raise _invalid(f"{where}.type: {kind!r} blocks are not allowed in {role} messages")
    if kind == "text":
        _validate_text_block(block, where)
    elif kind == "tool_use":
        _validate_tool_use(block, where)
    elif kind == "tool_result":
        _validate_tool_result(block, where)
    else:
        _validate_thinking_block(block, where)
    _validate_cache_control(block.get("cache_control"), where)
    return block


def _validate_content(content: Any, role: str, where: str, *, may_be_empty: bool) -> list[Any]:
    if isinstance(content, str):
        blocks: list[Any] = [{"type": "text", "text": content}] if content else []
    elif isinstance(content, list):
        blocks = [_validate_block(b, role, f"{where}.content.{i}") for i, b in enumerate(content)]
    else:
        raise _invalid(f"{where}.content: must be a string or a list of content blocks")
    if not blocks and not may_be_empty:
        raise _invalid(f"{where}.content: must not be empty")
    return blocks


def _validate_role(message: Any, index: int) -> str:
    where = f"messages.{index}"
    if not isinstance(message, dict):
        raise _invalid(f"{where}: must be an object")
    role = message.get("role")
    if not _is_one_of(role, _BLOCKS_BY_ROLE):
        raise _invalid(f"{where}.role: must be 'user' or 'assistant', got {role!r}")
    if index == 0 and role != "user":
        raise _invalid("messages.0.role: the first message must use the 'user' role")
    if role != ("user", "assistant")[index % 2]:
        raise _invalid(f"{where}.role: roles must alternate user/assistant; two {role!r} in a row")
    return str(role)


def _check_tool_pairing(awaited: set[str], blocks: list[Any], index: int) -> None:
    answered = {b["tool_use_id"] for b in blocks if b.get("type") == "tool_result"}
    unexpected = sorted(answered - awaited)
    if unexpected:
        raise _invalid(
            f"messages.{index}: tool_result blocks reference ids that the previous assistant "
            f"message did not use: {', '.join(unexpected)}"
        )
    missing = sorted(awaited - answered)
    if missing:
        raise _invalid(
            f"messages.{index - 1}: tool_use ids without a tool_result in the next message: "
            f"{', '.join(missing)}"
        )


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages: field required (a non-empty list)")
    awaited: set[str] = set()
    for index, message in enumerate(messages):
        role = _validate_role(message, index)
        # An empty final assistant turn is a valid (empty) prefill.
        final_assistant = role == "assistant" and index == len(messages) - 1
        where = f"messages.{index}"
        blocks = _validate_content(
            message.get("content"), role, where, may_be_empty=final_assistant
        )
        if role == "user":
            _check_tool_pairing(awaited, blocks, index)
        awaited = {b["id"] for b in blocks if b.get("type") == "tool_use"}


def _validate_request(body: dict[str, Any], *, creating: bool) -> None:
    """Raise ApiError (400, or 404 for a non-Claude model) unless `body` is a request we serve."""
    _validate_model(body.get("model"))
    if creating:
        _validate_max_tokens(body.get("max_tokens"))
        if not isinstance(body.get("stream", False), bool):
            raise _invalid("stream: must be a boolean")
    _validate_system(body.get("system"))
    _validate_tool_choice(body.get("tool_choice"), _validate_tools(body.get("tools")))
    _validate_cache_control(body.get("cache_control"), "request")
    _validate_messages(body.get("messages"))
    _validate_thinking(body)
    _check_breakpoints(body)


# --------------------------------------------------------------------------- hints


def _user_texts(message: dict[str, Any]) -> Iterator[str]:
    for block in _content_blocks(message.get("content")):
        if block.get("type") == "text":
            yield str(block.get("text", ""))
        elif block.get("type") == "tool_result":
            yield from _tool_result_texts(block)


def _hint_texts(body: dict[str, Any]) -> Iterator[str]:
    for block in _system_blocks(body.get("system")):
        yield str(block.get("text", ""))
    for message in _dicts(body.get("messages")):
        if message.get("role") == "user":
            yield from _user_texts(message)


def _collect_hints(body: dict[str, Any]) -> dict[str, str]:
    """Map each hint key to the value of its latest occurrence in system and user text."""
    hints: dict[str, str] = {}
    for text in _hint_texts(body):
        for line in text.splitlines():
            match = _HINT_LINE.match(line)
            if match:
                hints[match.group(1)] = match.group(2)
    return hints


def _parse_bool(raw: str) -> bool | None:
    word = raw.strip().lower()
    if word in _TRUE_WORDS:
        return True
    return False if word in _FALSE_WORDS else None


def _is_control_line(line: str) -> bool:
    match = _HINT_LINE.match(line)
    return bool(match and match.group(1).startswith("sim_"))


# --------------------------------------------------------------------------- tool inputs


class _Missing(enum.Enum):
    VALUE = enum.auto()


_MISSING = _Missing.VALUE


def _schema_type(schema: dict[str, Any]) -> str:
    declared = schema.get("type")
    if isinstance(declared, list):
        declared = next((t for t in declared if t != "null"), "null")
    return declared if isinstance(declared, str) else "string"


def _coerce_integer(raw: str, _schema: dict[str, Any]) -> Any:
    number = _coerce_number(raw, _schema)
    if isinstance(number, float) and number.is_integer():
        return int(number)
    return number if isinstance(number, int) else _MISSING


def _coerce_number(raw: str, _schema: dict[str, Any]) -> Any:
    text = raw.strip()
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    try:
        number = float(text)
    except ValueError:
        return _MISSING
    return number if math.isfinite(number) else _MISSING


def _coerce_boolean(raw: str, _schema: dict[str, Any]) -> Any:
    parsed = _parse_bool(raw)
    return _MISSING if parsed is None else parsed


def _coerce_array(raw: str, schema: dict[str, Any]) -> Any:
    try:
        parsed = json.loads(raw)
    except ValueError:
        # Not JSON: a comma-separated list, each item coerced to the `items` schema.
        items = schema.get("items")
        items = items if isinstance(items, dict) else {}
        values = [_coerce(part.strip(), items) for part in raw.split(",") if part.strip()]
        return _MISSING if _MISSING in values else values
    return parsed if isinstance(parsed, list) else _MISSING


def _coerce_object(raw: str, _schema: dict[str, Any]) -> Any:
    try:
        parsed = json.loads(raw)
    except ValueError:
        return _MISSING
    return parsed if isinstance(parsed, dict) else _MISSING


def _coerce_null(raw: str, _schema: dict[str, Any]) -> Any:
    return None if raw.strip().lower() in ("", "null", "none") else _MISSING


_COERCERS: dict[str, Callable[[str, dict[str, Any]], Any]] = {
    "string": lambda raw, _schema: raw,
    "integer": _coerce_integer,
    "number": _coerce_number,
    "boolean": _coerce_boolean,
    "array": _coerce_array,
    "object": _coerce_object,
    "null": _coerce_null,
}


def _coerce(raw: str, schema: dict[str, Any]) -> Any:
    """`raw` converted to the schema's type, or _MISSING when it cannot be."""
    coercer = _COERCERS.get(_schema_type(schema), _COERCERS["string"])
    return coercer(raw, schema)


def _type_default(name: str, schema: dict[str, Any]) -> Any:
    kind = _schema_type(schema)
    if kind == "object":
        # Nested objects take defaults only: hints name top-level properties.
        return _build_object(schema, lambda _name: None)
    defaults: dict[str, Any] = {
        "integer": 0,
        "number": 0,
        "boolean": False,
        "array": [],
        "null": None,
    }
    return defaults.get(kind, f"sim-{name}")


def _inferred(name: str, schema: dict[str, Any], learned: Learned | None) -> Any:
    """What the conversation suggests for the property, fitted to its schema, or _MISSING."""
    value = learned.value_for(name, schema) if learned is not None else None
    if value is None:
        return _MISSING
    fitted = value if isinstance(value, str | int | float | bool) else _MISSING
    if fitted is not _MISSING and _schema_type(schema) != "string":
        fitted = _coerce(str(value), schema) if isinstance(value, str) else value
    enum_values = schema.get("enum")
    if isinstance(enum_values, list) and fitted not in enum_values:
        return _MISSING
    return fitted


def _property_value(
    name: str,
    schema: dict[str, Any],
    hint: str | None,
    required: bool,
    learned: Learned | None = None,
) -> Any:
    hinted = _coerce(hint, schema) if hint is not None else _MISSING
    if hinted is not _MISSING:
        return hinted
    # What the conversation says beats a schema default; optional properties without one
    # stay out, as a careful model leaves them.
    inferred = _inferred(name, schema, learned) if required or "default" in schema else _MISSING
    if inferred is not _MISSING:
        return inferred
    if "default" in schema:
        return schema["default"]
    return _required_default(name, schema) if required else _MISSING


def _required_default(name: str, schema: dict[str, Any]) -> Any:
    if "const" in schema:
        return schema["const"]
    enum_values = schema.get("enum")
    if isinstance(enum_values, list) and enum_values:
        return enum_values[0]
    return _type_default(name, schema)


def _build_object(
    schema: dict[str, Any],
    hint_for: Callable[[str], str | None],
    learned: Learned | None = None,
) -> dict[str, Any]:
    """An object satisfying `schema`'s properties, filled from hints, what the conversation
    says (`learned`), defaults and types."""
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        return {}
    required = set(_as_list(schema.get("required")))
    built: dict[str, Any] = {}
    for name, prop in properties.items():
        prop_schema = prop if isinstance(prop, dict) else {}
        value = _property_value(name, prop_schema, hint_for(name), name in required, learned)
        if value is not _MISSING:
            built[name] = value
    return built


def _tool_input(tool: dict[str, Any], hints: dict[str, str], learned: Learned) -> dict[str, Any]:
    tool_name = tool["name"]

    def hint_for(prop: str) -> str | None:
        return hints.get(f"{tool_name}.{prop}", hints.get(prop))

    return _build_object(tool["input_schema"], hint_for, learned)


# --------------------------------------------------------------------------- replies


def _called_tools(messages: list[dict[str, Any]]) -> set[str]:
    return {
        str(block.get("name"))
        for message in messages
        if message.get("role") == "assistant"
        for block in _content_blocks(message.get("content"))
        if block.get("type") == "tool_use"
    }


def _tool_turns(messages: list[dict[str, Any]]) -> int:
    return sum(
        1
        for message in messages
        if message.get("role") == "assistant"
        and any(b.get("type") == "tool_use" for b in _content_blocks(message.get("content")))
    )


def _parse_int(value: str) -> int | None:
    try:
        return int(value.strip())
    except ValueError:
        return None


def _tools_to_call(
    body: dict[str, Any], hints: dict[str, str], learned: Learned
) -> list[dict[str, Any]]:
    """The offered tools this response calls, in offered order; empty for a text reply.

    Left to itself (no scripting hint), the agent leaves out a tool whose required email or
    amount nothing in the conversation supplies: it does not email nobody or refund nothing.
    """
    tools = _dicts(body.get("tools"))
    choice = body.get("tool_choice") or {"type": "auto"}
    if not tools or choice["type"] == "none":
        return []
    if choice["type"] == "tool":
        return [tool for tool in tools if tool["name"] == choice["name"]]
    skipped = {name.strip() for name in hints.get("sim_skip_tools", "").split(",")}
    turns = _tool_turns(body["messages"])
    wanted = _parse_int(hints.get("sim_tool_turns", ""))
    if wanted is not None and turns < wanted:
        allowed = [tool for tool in tools if tool["name"] not in skipped]
        if allowed:
            return [allowed[turns % len(allowed)]]
    uncalled = [tool for tool in tools if tool["name"] not in _called_tools(body["messages"])]
    remaining = [tool for tool in uncalled if tool["name"] not in skipped]
    parallel = _parse_bool(hints.get("sim_parallel_tools", "")) is True
    if not parallel and wanted is None:
        remaining = [tool for tool in remaining if not learned.missing_required(tool, hints)]
    if choice["type"] == "any" and not remaining:
        remaining = uncalled  # `any` obliges a call, so skip hints yield to it
    if choice.get("disable_parallel_tool_use") is True:
        parallel = False
    return remaining if parallel else remaining[:1]


def _fit_text(text: str, max_tokens: int) -> tuple[str, bool]:
    """`text` cut at a character boundary to at most `max_tokens`; whether it was cut."""
    data = text.encode()
    limit = max_tokens * BYTES_PER_TOKEN
    if len(data) <= limit:
        return text, False
    return data[:limit].decode(errors="ignore"), True


def _text_reply(text: str, max_tokens: int) -> tuple[list[dict[str, Any]], str]:
    fitted, truncated = _fit_text(text, max_tokens)
    return [{"type": "text", "text": fitted}], "max_tokens" if truncated else "end_turn"


def _tool_reply(
    tools: list[dict[str, Any]],
    request_hash: str,
    hints: dict[str, str],
    learned: Learned,
    max_tokens: int,
) -> tuple[list[dict[str, Any]], str]:
    uses = [
        {
            "type": "tool_use",
            "id": "toolu_sim_" + _digest(f"{request_hash}:{tool['name']}")[:24],
            "name": tool["name"],
            "input": _tool_input(tool, hints, learned),
        }
        for tool in tools
    ]
    preamble: dict[str, Any] = {
        "type": "text",
        "text": f"Calling {', '.join(t['name'] for t in tools)}.",
    }
    budget = max_tokens - sum(_block_tokens(use) for use in uses)
    if budget < 0:
        # Never hand back a partial set of calls: the caller could not run them safely.
        return _text_reply(preamble["text"], max_tokens)[0], "max_tokens"
    return ([preamble, *uses] if _block_tokens(preamble) <= budget else uses), "tool_use"


def _summary(messages: list[dict[str, Any]], learned: Learned) -> str:
    """`Summary: ` + the first words of the latest user turn; once tools have answered, what
    each tool call returned (the agent's closing message)."""
    if learned.outcomes:
        return learned.final_text()
    latest = next(m for m in reversed(messages) if m.get("role") == "user")
    lines = (line for text in _user_texts(latest) for line in text.splitlines())
    words = " ".join(line for line in lines if not _is_control_line(line)).split()
    gist = " ".join(words[:SUMMARY_WORDS]) or "(no text)"
    return f"Summary: {gist}"


@dataclass(frozen=True)
class _Thought:
    """The thinking block a response starts with, and the raw tokens it is billed for."""

    block: dict[str, Any]
    tokens: int


def _think(body: dict[str, Any], request_hash: str, learned: Learned, plan: str) -> _Thought | None:
    thinking = body.get("thinking")
    if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "adaptive"):
        return None
    config = body.get("output_config")
    effort = config.get("effort") if isinstance(config, dict) else None
    asked = " ".join(learned.prose)[:200] or "(no text)"
    known = "; ".join(o.name for o in learned.outcomes if o.name)
    text = f"The request: {asked}" + (f" Tools so far: {known}." if known else "") + f" {plan}"
    budget = thinking.get("budget_tokens")
    limit = budget if isinstance(budget, int) else max(body["max_tokens"] // 2, 1)
    raw = _THINKING_BY_EFFORT.get(str(effort), _THINKING_BY_EFFORT["medium"]) + _text_tokens(text)
    tokens = min(raw, limit, body["max_tokens"] - 1)
    text, _ = _fit_text(text, tokens)
    signature = "sig_sim_" + _digest(f"{request_hash}:thinking")[:32]
    return _Thought({"type": "thinking", "thinking": text, "signature": signature}, tokens)


@dataclass(frozen=True)
class _Generated:
    content: list[dict[str, Any]]
    stop_reason: str
    thinking_tokens: int = 0

    @property
    def output_tokens(self) -> int:
        visible = sum(_block_tokens(b) for b in self.content if b.get("type") != "thinking")
        return visible + self.thinking_tokens


def _generate(body: dict[str, Any], request_hash: str) -> _Generated:
    hints = _collect_hints(body)
    learned = Learned.of(body["messages"])
    tools = _tools_to_call(body, hints, learned)
    plan = f"Next: call {', '.join(t['name'] for t in tools)}." if tools else "Next: answer."
    thought = _think(body, request_hash, learned, plan)
    room = body["max_tokens"] - (thought.tokens if thought else 0)
    if tools:
        content, stop = _tool_reply(tools, request_hash, hints, learned, room)
    else:
        text = hints["sim_reply"] if "sim_reply" in hints else _summary(body["messages"], learned)
        content, stop = _text_reply(text, room)
    if thought is None:
        return _Generated(content, stop)
    return _Generated([thought.block, *content], stop, thought.tokens)


def create_message(
    state: SimState, api_key: str, body: dict[str, Any], *, service_tier: str = "standard"
) -> dict[str, Any]:
    """The Message for `body` (raises ApiError for a request upstream would refuse)."""
    _validate_request(body, creating=True)
    # Where the breakpoints sit changes what is cached, never what the model answers.
    # Streamed or not, a request gets the same message (ids included).
    unstreamed = {k: v for k, v in _without_cache_control(body).items() if k != "stream"}
    request_hash = _digest(_compact(unstreamed))
    generated = _generate(body, request_hash)
    minimum = min_cacheable_tokens(state.config, body["model"])
    cached = _cache_usage(state, f"{api_key}\0{body['model']}", body, minimum)
    usage = {
        "input_tokens": count_tokens(body) - cached.written - cached.read,
        "output_tokens": generated.output_tokens,
        "cache_creation_input_tokens": cached.written,
        "cache_read_input_tokens": cached.read,
        "cache_creation": {
            "ephemeral_5m_input_tokens": cached.write_5m,
            "ephemeral_1h_input_tokens": cached.write_1h,
        },
        "service_tier": service_tier,
    }
    if generated.thinking_tokens:
        usage["output_tokens_details"] = {"thinking_tokens": generated.thinking_tokens}
    return {
        "id": f"msg_sim_{request_hash[:24]}",
        "type": "message",
        "role": "assistant",
        "model": body["model"],
        "content": generated.content,
        "stop_reason": generated.stop_reason,
        "stop_sequence": None,
        "usage": usage,
    }


def _respond(body: dict[str, Any], message: dict[str, Any], fault: _Fault | None) -> Response:
    """The message as JSON, or as Server-Sent Events when the request asked to stream."""
    headers = {"request-id": message["id"].replace("msg_", "req_", 1)}
    if body.get("stream") is not True:
        return JSONResponse(message, headers=headers)
    pace = _parse_int(_collect_hints(body).get("sim_stream_chunk_ms", "")) or 0
    cut = None
    if fault is not None and fault.after_chunks is not None:
        error = _error_type(fault.status)
        cut = StreamCut(fault.after_chunks, error, f"simulated fault: {error}")
    events = message_events(message, chunk_seconds=min(max(pace, 0), 10_000) / 1000, cut=cut)
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


# --------------------------------------------------------------------------- HTTP plumbing


def _state(request: Request) -> SimState:
    state: SimState = request.app.state.sim
    return state


def _presented_key(request: Request) -> str | None:
    key = request.headers.get("x-api-key", "").strip()
    if key:
        return key
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return None


def _authenticate(request: Request) -> str:
    """Dependency: the caller's key; 401 if absent, or if it differs from the configured key."""
    key = _presented_key(request)
    if key is None:
        raise ApiError(401, "missing API key: send x-api-key or Authorization: Bearer <key>")
    expected = _state(request).config.api_key
    if expected is not None and not hmac.compare_digest(key.encode(), expected.encode()):
        raise ApiError(401, "invalid x-api-key")
    return key


ApiKey = Annotated[str, Depends(_authenticate)]


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body exceeds {MAX_BODY_BYTES} bytes")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise ApiError(413, f"request body exceeds {MAX_BODY_BYTES} bytes")
    except ClientDisconnect:
        # A client that goes away mid-request (a killed worker) is ordinary, not a crash: an
        # ApiError ends the request without the traceback the catch-all handler would log.
        _state(request).stats.client_disconnects += 1
        raise ApiError(499, "the client closed the connection before its body was in") from None
    return bytes(body)


async def _read_json(request: Request) -> dict[str, Any]:
    raw = await _read_body(request)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _invalid(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise _invalid("request body must be a JSON object")
    return body


async def _wait_for_disconnect(request: Request, cap_seconds: float) -> None:
    """Return once the client has closed the connection, or after `cap_seconds`."""
    # The body is fully read, so the next ASGI message is the disconnect itself.
    async with asyncio.timeout(cap_seconds):
        while (await request.receive())["type"] != "http.disconnect":
            pass


async def _serve_fault(request: Request, fault: _Fault) -> NoReturn:
    if fault.hang:
        # Past the cap, with the client still waiting, the fault is answered normally.
        with contextlib.suppress(TimeoutError):
            await _wait_for_disconnect(request, HANG_CAP_SECONDS)
    headers = {}
    if fault.retry_after is not None:
        seconds = fault.retry_after
        headers["retry-after"] = str(int(seconds)) if seconds.is_integer() else str(seconds)
    raise ApiError(fault.status, f"simulated fault: HTTP {fault.status}", headers=headers)


async def _post_messages(request: Request, api_key: ApiKey) -> Response:
    state = _state(request)
    response: Response
    try:
        body = await _read_json(request)
        state.record_request(body.get("model"))
        state.recent.append(body)
        model = body.get("model")
        fault = state.take_fault(model if isinstance(model, str) else None)
        streamed = body.get("stream") is True
        if fault is not None and not (streamed and fault.after_chunks is not None):
            await _serve_fault(request, fault)
        response = _respond(body, create_message(state, api_key, body), fault)
    except ApiError as error:
        response = error.to_response()
    await asyncio.sleep(state.config.latency_ms / 1000)
    return response


async def _post_count_tokens(request: Request, _api_key: ApiKey) -> dict[str, int]:
    state = _state(request)
    state.stats.count_tokens_calls += 1
    body = await _read_json(request)
    _validate_request(body, creating=False)
    return {"input_tokens": count_tokens(body)}


# --------------------------------------------------------------------------- control endpoints


class FaultSpec(BaseModel):
    """Body of `POST /_sim/faults`: `count` copies of one failure, served FIFO."""

    model_config = ConfigDict(extra="forbid")

    status: int = Field(ge=400, le=599)
    count: int = Field(default=1, ge=1, le=10_000)
    model: str | None = None
    retry_after: float | None = Field(default=None, ge=0, le=86_400)
    hang: bool = False
    after_chunks: int | None = Field(
        default=None, ge=0, le=100_000, description="streamed requests: break off after N deltas"
    )


class ConfigUpdate(BaseModel):
    """Body of `POST /_sim/config`: the settings to change."""

    model_config = ConfigDict(extra="forbid")

    latency_ms: float | None = Field(None, ge=0, le=600_000)
    batch_delay_seconds: float | None = Field(None, ge=0, le=86_400)
    min_cacheable_tokens: int | None = Field(None, ge=0, le=1_000_000)


_M = TypeVar("_M", bound=BaseModel)


def _parse_model(model: type[_M], body: dict[str, Any]) -> _M:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'body'}: {error['msg']}"
            for error in exc.errors()
        )
        raise _invalid(problems) from exc


async def _post_faults(request: Request, _api_key: ApiKey) -> dict[str, int]:
    state = _state(request)
    spec = _parse_model(FaultSpec, await _read_json(request))
    fault = _Fault(spec.status, spec.model, spec.retry_after, spec.hang, spec.after_chunks)
    state.faults.extend(itertools.repeat(fault, spec.count))
    return {"queued": spec.count, "pending": len(state.faults)}


async def _delete_faults(request: Request, _api_key: ApiKey) -> dict[str, int]:
    state = _state(request)
    cleared = len(state.faults)
    state.faults.clear()
    return {"cleared": cleared}


async def _get_stats(request: Request, _api_key: ApiKey) -> dict[str, Any]:
    state = _state(request)
    return {
        "requests": dict(state.stats.requests_by_model),
        "requests_total": state.stats.requests_total,
        "faults_served": state.stats.faults_served,
        "faults_pending": len(state.faults),
        "count_tokens_calls": state.stats.count_tokens_calls,
        "client_disconnects": state.stats.client_disconnects,
        "cache_entries": len(state.cache),
        "batches_created": state.batches.created,
        "batch_requests": state.batches.requests,
        "batches_canceled": state.batches.canceled,
    }


async def _post_config(request: Request, _api_key: ApiKey) -> dict[str, Any]:
    state = _state(request)
    update = _parse_model(ConfigUpdate, await _read_json(request))
    state.config = replace(state.config, **update.model_dump(exclude_unset=True))
    return {name: getattr(state.config, name) for name in ConfigUpdate.model_fields}


async def _get_requests(request: Request, _api_key: ApiKey) -> list[dict[str, Any]]:
    return list(_state(request).recent)


async def _post_reset(request: Request, _api_key: ApiKey) -> dict[str, bool]:
    _state(request).reset()
    return {"reset": True}


# --------------------------------------------------------------------------- batches


def _batch_error(status: int, message: str) -> dict[str, Any]:
    error = {"type": _error_type(status), "message": message}
    return {"type": "errored", "error": {"type": "error", "error": error}}


def _batch_result(state: SimState, api_key: str, params: dict[str, Any]) -> dict[str, Any]:
    """One batch request's result. A `sim_batch_result: errored|expired|canceled` hint forces
    that outcome; a queued fault (`/_sim/faults`) errors it; otherwise it is answered as
    `/v1/messages` would answer it, at batch usage."""
    forced = _collect_hints(params).get("sim_batch_result", "").strip()
    if forced == "errored":
        return _batch_error(500, "simulated batch request error")
    if forced in ("expired", "canceled"):
        return {"type": forced}
    model = params.get("model")
    state.record_request(model)
    fault = state.take_fault(model if isinstance(model, str) else None)
    if fault is not None:
        return _batch_error(fault.status, f"simulated fault: HTTP {fault.status}")
    try:
        message = create_message(state, api_key, params, service_tier="batch")
    except ApiError as error:
        return _batch_error(error.status, error.message)
    return {"type": "succeeded", "message": message}


def _batch(request: Request, api_key: str, batch_id: str) -> Batch:
    state = _state(request)
    batch = state.batches.find(api_key, batch_id)
    if batch is None:
        raise ApiError(404, f"message batch {batch_id!r} not found")
    state.batches.advance(batch, state.clock(), lambda p: _batch_result(state, api_key, p))
    return batch


async def _post_batches(request: Request, api_key: ApiKey) -> dict[str, Any]:
    state = _state(request)
    body = await _read_json(request)
    try:
        batch = state.batches.create(api_key, body, state.clock(), state.config.batch_delay_seconds)
    except BatchRefused as exc:
        raise _invalid(str(exc)) from None
    return batch.view(str(request.base_url))


async def _get_batch(request: Request, api_key: ApiKey, batch_id: str) -> dict[str, Any]:
    return _batch(request, api_key, batch_id).view(str(request.base_url))


async def _cancel_batch(request: Request, api_key: ApiKey, batch_id: str) -> dict[str, Any]:
    batch = _batch(request, api_key, batch_id)
    _state(request).batches.cancel(batch)
    return batch.view(str(request.base_url))


async def _batch_results(request: Request, api_key: ApiKey, batch_id: str) -> Response:
    batch = _batch(request, api_key, batch_id)
    if batch.results is None:
        raise _invalid(f"message batch {batch_id!r} has not ended ({batch.status})")
    lines = "".join(json.dumps(result) + "\n" for result in batch.results)
    return Response(lines, media_type="application/binary")


# --------------------------------------------------------------------------- app


async def _handle_error(request: Request, exc: Exception) -> Response:
    """Answer every failure in Anthropic's error shape, including unknown routes and crashes."""
    if isinstance(exc, ApiError):
        return exc.to_response()
    if isinstance(exc, StarletteHTTPException):
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return ApiError(exc.status_code, message, headers=dict(exc.headers or {})).to_response()
    return ApiError(500, "internal simulator error").to_response()


def _routes() -> Iterable[tuple[str, str, Callable[..., Any]]]:
    yield "POST", "/v1/messages", _post_messages
    yield "POST", "/v1/messages/count_tokens", _post_count_tokens
    yield "POST", "/v1/messages/batches", _post_batches
    yield "GET", "/v1/messages/batches/{batch_id}", _get_batch
    yield "POST", "/v1/messages/batches/{batch_id}/cancel", _cancel_batch
    yield "GET", "/v1/messages/batches/{batch_id}/results", _batch_results
    yield "POST", "/_sim/faults", _post_faults
    yield "DELETE", "/_sim/faults", _delete_faults
    yield "GET", "/_sim/stats", _get_stats
    yield "GET", "/_sim/requests", _get_requests
    yield "POST", "/_sim/config", _post_config
    yield "POST", "/_sim/reset", _post_reset


def create_app(config: SimConfig | None = None) -> FastAPI:
    """A fresh simulator app with its own state (faults, stats, prompt cache) on `app.state.sim`."""
    app = FastAPI(
        title="Stead Messages API simulator", docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.sim = SimState(config=replace(config or SimConfig()))
    for method, path, endpoint in _routes():
        app.add_api_route(path, endpoint, methods=[method])
    for exc_class in (ApiError, StarletteHTTPException, Exception):
        app.add_exception_handler(exc_class, _handle_error)
    return app
