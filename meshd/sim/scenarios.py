"""The named scenarios: who comes when, who goes how, and what hits the room.

A scenario turns (size, seed, duration) into a `Plan`, the same at both levels: the
listeners (drawn from `meshd.sim.population`) with their arrival and session, the
`initial` ones present from the start (the room is built before the clock starts), and
the shocks. Times are seconds from the start of the scenario.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from meshd.sim.population import Audience, Listener, draw

FOREVER = math.inf
SHOCK_AT = 30.0  # seconds into a steady scenario when its shock hits
RETURN_WITHIN = 60.0  # seconds after the melt within which half the leavers come back
RESTART_DOWN = 1.0  # seconds the tracker is away when it restarts
NEWCOMERS = 0.1
"""Newcomers of `restart`, as a share of the room, over the minute after the restart."""
CHURN_MEAN_STAY = 600.0
QUIET = 15.0
"""Nobody comes or goes in a run's last seconds, so that its end state is a settled one
whose invariants can be checked."""


class ShockKind(Enum):
    MELT = "melt"
    """`fraction` of the audience vanishes at once (no LEAVE): the worst way to go."""
    TOP_KILL = "top-kill"
    """The origin's children and the backups they were given die together."""
    TRACKER_RESTART = "restart"
    """The tracker is killed and started again on its address, knowing nothing."""


@dataclass(frozen=True)
class Shock:
    at: float
    kind: ShockKind
    fraction: float = 0.0


@dataclass(frozen=True)
class Plan:
    scenario: str
    seed: int
    listeners: tuple[Listener, ...]
    """Everyone who ever comes, by arrival time."""
    initial: int
    """The first `initial` listeners make up the room when the scenario starts."""
    shocks: tuple[Shock, ...]
    duration: float

    def departure(self, listener: Listener) -> float | None:
        """When the listener leaves, if within the run (None: it stays)."""
        at = listener.depart_at
        return at if at <= self.duration - QUIET else None


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    story: str
    duration: float
    """Default length of the run, in seconds."""
    min_duration: float
    sizes: dict[str, int]
    """Default listeners per level."""
    make: Callable[[int, float, random.Random, Audience], tuple[list[Listener], int, list[Shock]]]

    def plan(
        self, size: int, seed: int, duration: float | None = None, audience: Audience | None = None
    ) -> Plan:
        duration = self.duration if duration is None else duration
        if size < 1:
            raise ValueError("a room needs at least one listener")
        if duration < self.min_duration:
            raise ValueError(f"{self.name} needs a run of at least {self.min_duration:.0f} s")
        rng = random.Random(f"{self.name}/{size}/{seed}")
        listeners, initial, shocks = self.make(size, duration, rng, audience or Audience())
        listeners.sort(key=lambda listener: listener.arrive_at)
        return Plan(self.name, seed, tuple(listeners), initial, tuple(shocks), duration)


def _launch(
    size: int, duration: float, rng: random.Random, audience: Audience
) -> tuple[list[Listener], int, list[Shock]]:
    ramp = min(duration * 5 / 6, duration - QUIET)
    times = sorted(rng.uniform(0, ramp) for _ in range(size))
    return [draw(rng, i, at, audience) for i, at in enumerate(times)], 0, []


def _steady(size: int, rng: random.Random, audience: Audience) -> list[Listener]:
    return [draw(rng, i, 0.0, audience, session=FOREVER) for i in range(size)]


def _after_the_shock(
    size: int, count: int, duration: float, rng: random.Random, audience: Audience
) -> list[Listener]:
    """A built room of `size`, then `count` newcomers within `RETURN_WITHIN` of the shock."""
    listeners = _steady(size, rng, audience)
    within = min(RETURN_WITHIN, duration - QUIET - SHOCK_AT)
    for i in range(count):
        at = SHOCK_AT + rng.uniform(0, within)
        listeners.append(draw(rng, size + i, at, audience, session=FOREVER))
    return listeners


def _melt(
    size: int, duration: float, rng: random.Random, audience: Audience
) -> tuple[list[Listener], int, list[Shock]]:
    fraction = 0.5
    listeners = _after_the_shock(size, round(size * fraction / 2), duration, rng, audience)
    return listeners, size, [Shock(SHOCK_AT, ShockKind.MELT, fraction)]


def _churn(
    size: int, duration: float, rng: random.Random, audience: Audience
) -> tuple[list[Listener], int, list[Shock]]:
    # Exponential stays make departures Poisson; arrivals at the same rate keep the size.
    mean_stay = CHURN_MEAN_STAY
    listeners = [
        draw(rng, i, 0.0, audience, session=rng.expovariate(1 / mean_stay)) for i in range(size)
    ]
    at = rng.expovariate(size / mean_stay)
    while at < duration - QUIET:
        index = len(listeners)
        listeners.append(draw(rng, index, at, audience, session=rng.expovariate(1 / mean_stay)))
        at += rng.expovariate(size / mean_stay)
    return listeners, size, []


def _restart(
    size: int, duration: float, rng: random.Random, audience: Audience
) -> tuple[list[Listener], int, list[Shock]]:
    listeners = _after_the_shock(size, max(1, round(size * NEWCOMERS)), duration, rng, audience)
    return listeners, size, [Shock(SHOCK_AT, ShockKind.TRACKER_RESTART)]


def _top_kill(
    size: int, duration: float, rng: random.Random, audience: Audience
) -> tuple[list[Listener], int, list[Shock]]:
    return _steady(size, rng, audience), size, [Shock(SHOCK_AT, ShockKind.TOP_KILL)]


SCENARIOS: dict[str, Scenario] = {
    scenario.name: scenario
    for scenario in (
        Scenario(
            "launch",
            "the seed's night: everyone joins in the first 5/6 of the run",
            "Listeners arrive at random over the first 5/6 of the run (300 s of the default "
            "360 s: 1,667 JOINs/s at 500,000). About 40 % can relay; the rest are leaves. "
            "Sessions are heavy-tailed (lognormal, median 20 min), so some leave during "
            "the ramp: half with LEAVE, half by vanishing.",
            duration=360.0,
            min_duration=QUIET + 15,
            sizes={"chunk": 200, "flow": 100_000},
            make=_launch,
        ),
        Scenario(
            "melt",
            "half the audience vanishes at once; half of those come back within a minute",
            f"A built room; at {SHOCK_AT:.0f} s half the listeners (relays and leaves alike) "
            "vanish without LEAVE. A quarter of the original audience then joins again, "
            f"as new listeners, over the next {RETURN_WITHIN:.0f} s.",
            duration=120.0,
            min_duration=SHOCK_AT + QUIET + 15,
            sizes={"chunk": 200, "flow": 100_000},
            make=_melt,
        ),
        Scenario(
            "churn",
            "steady state: Poisson arrivals and departures at the same rate",
            f"A built room where each listener stays {CHURN_MEAN_STAY / 60:.0f} min on "
            "average (exponential), and newcomers arrive at the rate others leave, so the "
            "size holds; half leave with LEAVE, half vanish.",
            duration=600.0,
            min_duration=QUIET + 15,
            sizes={"chunk": 200, "flow": 100_000},
            make=_churn,
        ),
        Scenario(
            "top-kill",
            "the origin's children and their backups die together",
            f"A built room; at {SHOCK_AT:.0f} s every child of the origin dies, and with "
            "them every backup parent the tracker gave those children.",
            duration=60.0,
            min_duration=SHOCK_AT + QUIET + 5,
            sizes={"chunk": 200, "flow": 100_000},
            make=_top_kill,
        ),
        Scenario(
            "restart",
            "the tracker restarts and knows nothing; newcomers keep coming",
            f"A built room; at {SHOCK_AT:.0f} s the tracker is killed and started again on "
            f"its address {RESTART_DOWN:.0f} s later, knowing nothing. The origin notices "
            "(REGISTER every 2 s, then TREE) and its chunks ask every node to REFRESH "
            f"(ANNOUNCE). Newcomers, {NEWCOMERS:.0%} of the room, join over the next "
            f"{RETURN_WITHIN:.0f} s. Nobody should lose a chunk, and newcomers should play "
            "within seconds.",
            duration=120.0,
            min_duration=SHOCK_AT + QUIET + 15,
            sizes={"chunk": 200, "flow": 100_000},
            make=_restart,
        ),
    )
}
