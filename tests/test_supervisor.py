"""The restart policy of `stead dev` on its own: the clock is a parameter, so back-off, the
crash window and dependency order are checked exactly, without waiting for them. (The real
processes, killed with SIGKILL, are in tests/test_dev.py.)"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from stead.supervisor import GiveUp, RestartPolicy, Supervisor


@dataclass
class Unit:
    """A unit whose state the test sets: down or up, serving or not, startable or not."""

    name: str
    needs: tuple[str, ...] = ()
    down: str | None = None
    serving: bool = True
    start_fails: bool = False
    starts: list[float] = field(default_factory=list)
    clock: list[float] = field(default_factory=lambda: [0.0])

    def failure(self) -> str | None:
        return self.down

    async def restart(self) -> None:
        if self.start_fails:
            raise RuntimeError("port taken")
        self.starts.append(self.clock[0])
        self.down = None

    async def ready(self) -> bool:
        return self.serving


def supervisor(*units: Unit) -> tuple[Supervisor, list[str]]:
    said: list[str] = []
    return Supervisor(units, said.append, RestartPolicy()), said


async def tend_until(sup: Supervisor, units: tuple[Unit, ...], until: float) -> None:
    """Tend every 0.25 s of simulated time, as `stead dev` does."""
    now = units[0].clock[0]
    while now <= until:
        for unit in units:
            unit.clock[0] = now
        await sup.tend(now)
        now += 0.25


async def test_back_off_doubles_and_a_crash_loop_gives_up() -> None:
    sim = Unit("sim", down="exited with code 1")
    sim.start_fails = True
    sup, said = supervisor(sim)
    with pytest.raises(GiveUp) as raised:
        await tend_until(sup, (sim,), until=30)
    assert raised.value.unit == "sim"
    assert str(raised.value) == (
        "giving up on sim: 5 crashes within 60s, the last: did not start: port taken"
    )
    delays = [line.split("restarting in ")[1].split("s ")[0] for line in said]
    assert delays == ["0.5", "1.0", "2.0", "4.0"]
    assert said[0] == (
        "sim exited with code 1; restarting in 0.5s (crash 1; giving up at 5 within 60s)"
    )


async def test_crashes_older_than_the_window_are_forgotten() -> None:
    worker = Unit("worker")
    sup, said = supervisor(worker)
    for minute in range(8):  # one crash a minute, forever: never a crash loop
        worker.down = "exited with code -9 (SIGKILL)"
        await tend_until(sup, (worker,), until=minute * 61 + 5)
        worker.clock[0] = (minute + 1) * 61
    assert len(worker.starts) == 8
    assert all("restarting in 0.5s (crash 1;" in line for line in said if "restarting" in line)


async def test_dependents_wait_until_their_servers_serve_again() -> None:
    temporal = Unit("temporal", down="exited with code -9 (SIGKILL)", serving=False)
    worker = Unit("worker", needs=("temporal", "postgres"), down="exited with code 1")
    units = (temporal, worker)
    sup, said = supervisor(*units)
    await tend_until(sup, units, until=10)
    assert temporal.starts == [0.5]
    assert worker.starts == []  # Temporal runs, but does not serve yet
    temporal.serving = True
    await tend_until(sup, units, until=11)
    assert "temporal is back" in said
    assert len(worker.starts) == 1  # "postgres" is not supervised here: an external server
    assert worker.starts[0] >= 10


async def test_a_restart_that_never_serves_gives_up() -> None:
    api = Unit("api", down="exited with code -9 (SIGKILL)", serving=False)
    sup, _ = supervisor(api)
    with pytest.raises(GiveUp, match="api did not serve within 60s of a restart"):
        await tend_until(sup, (api,), until=70)
