"""Per-node counters, as a readable log line and as JSON for machines."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO


@dataclass
class NodeStats:
    role: str
    node: str
    stream: str
    parent: str | None = None
    path: list[str] = dataclasses.field(default_factory=list)
    """The node ids from the origin down to this node, as its parent last said."""
    backups: list[str] = dataclasses.field(default_factory=list)
    """The backup parents of the last assignment, in the tracker's order."""
    depth: int | None = None
    children: int = 0
    chunks_in: int = 0
    bytes_in: int = 0
    chunks_out: int = 0
    bytes_out: int = 0
    packets_played: int = 0
    duplicates: int = 0
    too_old: int = 0
    """Chunks a parent offered before our first audio from further behind the live edge
    than a newcomer may start (docs/spec.md §6.3): not played, not counted as progress."""
    gaps: int = 0
    repairs_requested: int = 0
    repairs_refused: int = 0
    """Chunks children asked for again beyond their repair budget (answered MISSING)."""
    lost: int = 0
    parent_switches: int = 0
    failovers: int = 0
    """Switches forced by a failed or silent parent (the rest were redirects)."""
    stall_ms: float = 0.0
    """The longest time audio would have stopped for a player that starts at the first
    chunk with no extra buffer: how far playback fell behind real time at worst, an
    ongoing freeze included (see `PlayoutMeter`)."""
    bad_peers: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    joined_at: float | None = None
    join_to_audio_ms: float | None = None
    """From sending JOIN to playing the first chunk."""
    first_audio_at: float | None = None
    ended: bool = False

    def line(self) -> str:
        """The figures as one log line (the log line itself names the node)."""
        parent = self.parent[:8] if self.parent else "-"
        depth = "-" if self.depth is None else self.depth
        return (
            f"stats parent={parent} depth={depth} "
            f"children={self.children} in={self.chunks_in}/{self.bytes_in}B "
            f"out={self.chunks_out}/{self.bytes_out}B played={self.packets_played} "
            f"gaps={self.gaps} repairs={self.repairs_requested} lost={self.lost} "
            f"switches={self.parent_switches} stall={self.stall_ms:.0f}ms"
        )

    def write_json(self, path: Path) -> None:
        """Atomically replace `path` so a reader never sees half a file.

        One line: `indent` would switch json to its pure-Python encoder, and with
        `dataclasses.asdict` (a deep copy) that made a listener's stats file a sixth of
        its CPU at 2 updates a second. Every field is a number, string, bool, None or
        list of strings, so the instance's own dict serialises as it is."""
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(vars(self)) + "\n")
        os.replace(temporary, path)


class PlayoutMeter:
    """How far playback falls behind real time: the stall a listener hears.

    A player that starts at the first chunk plays audio at real speed and must stop
    whenever the next chunk is not there yet. Just before each chunk is played, `lag` is
    the real time elapsed minus the audio played until then; in steady flow it is the
    same each time (one chunk's length). Its rise above its lowest value so far is the
    silence such a player would have had. A frozen node's stall keeps growing.
    """

    def __init__(self, rate: int) -> None:
        self._rate = rate
        self._start: tuple[float, int] | None = None  # (time, granule) of the first chunk
        self._played = 0  # granule at the end of the newest chunk played
        self._lowest = math.inf
        self.worst = 0.0

    def played(self, granule: int, now: float) -> None:
        if self._start is None:
            self._start = (now, granule)
        else:
            lag = self._lag(now)
            self._lowest = min(self._lowest, lag)
            self.worst = max(self.worst, lag - self._lowest)
        self._played = max(self._played, granule)

    def stall(self, now: float, *, live: bool) -> float:
        """The worst stall so far, counting the current one while the stream is live."""
        if self._start is None or not live or self._lowest == math.inf:
            return self.worst
        return max(self.worst, self._lag(now) - self._lowest)

    def _lag(self, now: float) -> float:
        assert self._start is not None
        started, first = self._start
        return (now - started) - (self._played - first) / self._rate


class ChunkTrace:
    """`seq unix_time_us` per chunk as it first arrives (or, at the origin, leaves):
    comparing a parent's and a child's trace gives the latency a hop adds."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._file: TextIO | None = None  # created with the first chunk: no empty files

    def record(self, seq: int) -> None:
        if self._file is None:
            self._file = self._path.open("w", buffering=64 * 1024)
        self._file.write(f"{seq} {time.time_ns() // 1000}\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
