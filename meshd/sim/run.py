"""One scenario run, at the level its size calls for: what `meshd sim` does."""

from __future__ import annotations

from dataclasses import dataclass

from meshd.sim.chunk import ChunkOptions, ChunkRun
from meshd.sim.flow import FlowOptions, FlowRoom
from meshd.sim.metrics import Results
from meshd.sim.scenarios import SCENARIOS

LEVELS = ("chunk", "flow")
CHUNK_LIMIT = 1000
"""The largest room `auto` plays at the chunk level (about a minute of wall time per
virtual minute at this size)."""


@dataclass(frozen=True)
class RunSpec:
    scenario: str
    level: str = "auto"
    """"chunk", "flow", or "auto": chunk up to `CHUNK_LIMIT` listeners, flow above."""
    listeners: int | None = None
    """None: the scenario's default size for the level."""
    seed: int = 1
    duration: float | None = None
    """Virtual seconds (None: the scenario's default)."""
    origin_capacity: int = 4
    tracker_rate: float | None = 4000.0
    """Requests per second the flow level's tracker serves (None: unlimited). The chunk
    level's tracker answers at once."""
    refresh_s: int = 180


def resolve(spec: RunSpec) -> tuple[str, int]:
    """The level and size a spec runs at."""
    scenario = SCENARIOS[spec.scenario]
    level = spec.level
    if level == "auto":
        size = spec.listeners or scenario.sizes["flow"]
        level = "chunk" if size <= CHUNK_LIMIT else "flow"
    elif level not in LEVELS:
        raise ValueError(f"unknown level {level!r}")
    return level, spec.listeners or scenario.sizes[level]


def run(spec: RunSpec) -> Results:
    level, size = resolve(spec)
    plan = SCENARIOS[spec.scenario].plan(size, spec.seed, spec.duration)
    if level == "chunk":
        options = ChunkOptions(origin_capacity=spec.origin_capacity, refresh_s=spec.refresh_s)
        return ChunkRun(plan, options).run()
    flow = FlowOptions(
        origin_capacity=spec.origin_capacity,
        tracker_rate=spec.tracker_rate,
        refresh_s=spec.refresh_s,
    )
    return FlowRoom(plan, flow).run()
