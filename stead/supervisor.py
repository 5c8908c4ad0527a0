"""Restarting what crashed, for `stead dev`: back-off, dependencies, and when to give up.

A `Unit` is anything the supervisor keeps running: a child process, or the embedded
PostgreSQL (a daemon started by pg_ctl, not a child). `Supervisor.tend()` is called in a loop;
each call notices units that went down, restarts the ones whose back-off has passed and whose
dependencies are up again, and raises `GiveUp` when one unit crashed too often within the
window: a crash loop is a problem for a person (a port taken, a broken setting), not for more
restarts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol


class GiveUp(Exception):
    """A unit crashed too often; the message says which, how often and how it ended."""

    def __init__(self, unit: str, message: str) -> None:
        super().__init__(message)
        self.unit = unit


class Unit(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def needs(self) -> tuple[str, ...]:
        """Units that must be up before this one is restarted."""
        ...

    def failure(self) -> str | None:
        """How the unit ended ("exited with code -9 (SIGKILL)"), or None while it runs."""
        ...

    async def restart(self) -> None:
        """Start it again; raise if it could not be started."""
        ...

    async def ready(self) -> bool:
        """Whether a restarted unit serves again (its dependents wait for this)."""
        ...


@dataclass(frozen=True)
class RestartPolicy:
    # Five crashes of one unit within a minute, with back-off 0.5, 1, 2 and 4 s between them:
    # about ten seconds of trying before giving up, and a crash a minute is restarted forever.
    max_crashes: int = 5
    window_seconds: float = 60.0
    first_delay: float = 0.5
    max_delay: float = 8.0
    # A restarted unit that does not serve within this long is a failure of its own.
    ready_within: float = 60.0


@dataclass
class _State:
    crashes: deque[float] = field(default_factory=deque)
    restart_at: float | None = None  # down, to be started at this time
    ready_by: float | None = None  # restarted, not serving yet
    last_failure: str = ""

    @property
    def up(self) -> bool:
        return self.restart_at is None and self.ready_by is None


@dataclass
class Supervisor:
    units: Sequence[Unit]
    say: Callable[[str], None]
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    states: dict[str, _State] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.states = {unit.name: _State() for unit in self.units}

    def _up(self, name: str) -> bool:
        # A dependency stead dev does not run (an external database) is always up.
        state = self.states.get(name)
        return state is None or state.up

    async def tend(self, now: float) -> None:
        for unit in self.units:
            state = self.states[unit.name]
            if state.up:
                if (how := unit.failure()) is not None:
                    self._crashed(unit, state, how, now)
            elif state.ready_by is not None:
                await self._await_ready(unit, state, now)
            elif now >= (state.restart_at or 0) and all(self._up(n) for n in unit.needs):
                await self._restart(unit, state, now)

    async def _restart(self, unit: Unit, state: _State, now: float) -> None:
        try:
            await unit.restart()
        except Exception as exc:  # any failed start counts as a crash, with its reason
            self._crashed(unit, state, f"did not start: {exc}", now)
            return
        state.restart_at = None
        state.ready_by = now + self.policy.ready_within

    async def _await_ready(self, unit: Unit, state: _State, now: float) -> None:
        if (how := unit.failure()) is not None:
            state.ready_by = None
            self._crashed(unit, state, how, now)
        elif await unit.ready():
            state.ready_by = None
            self.say(f"{unit.name} is back")
        elif state.ready_by is not None and now > state.ready_by:
            raise GiveUp(
                unit.name,
                f"{unit.name} did not serve within {self.policy.ready_within:.0f}s of a restart",
            )

    def _crashed(self, unit: Unit, state: _State, how: str, now: float) -> None:
        policy = self.policy
        state.crashes.append(now)
        while now - state.crashes[0] > policy.window_seconds:
            state.crashes.popleft()
        state.last_failure = how
        count = len(state.crashes)
        if count >= policy.max_crashes:
            raise GiveUp(
                unit.name,
                f"giving up on {unit.name}: {count} crashes within {policy.window_seconds:.0f}s,"
                f" the last: {how}",
            )
        delay = min(policy.first_delay * 2 ** (count - 1), policy.max_delay)
        state.restart_at = now + delay
        self.say(
            f"{unit.name} {how}; restarting in {delay:.1f}s"
            f" (crash {count}; giving up at {policy.max_crashes}"
            f" within {policy.window_seconds:.0f}s)"
        )
