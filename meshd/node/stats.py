"""Per-node counters, as a readable log line and as JSON for machines."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class NodeStats:
    role: str
    node: str
    stream: str
    parent: str | None = None
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
    gaps: int = 0
    repairs_requested: int = 0
    lost: int = 0
    parent_switches: int = 0
    failovers: int = 0
    """Switches forced by a failed or silent parent (the rest were redirects)."""
    longest_stall_ms: float = 0.0
    """The longest wait between two chunks played in order, after the first."""
    bad_peers: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    joined_at: float | None = None
    join_to_audio_ms: float | None = None
    """From sending JOIN to playing the first chunk."""
    first_audio_at: float | None = None
    ended: bool = False

    def line(self) -> str:
        parent = self.parent[:8] if self.parent else "-"
        return (
            f"{self.role} {self.node[:8]} parent={parent} depth={self.depth} "
            f"children={self.children} in={self.chunks_in}/{self.bytes_in}B "
            f"out={self.chunks_out}/{self.bytes_out}B played={self.packets_played} "
            f"gaps={self.gaps} repairs={self.repairs_requested} lost={self.lost} "
            f"switches={self.parent_switches}"
        )

    def write_json(self, path: Path) -> None:
        """Atomically replace `path` so a reader never sees half a file."""
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(dataclasses.asdict(self), indent=1))
        os.replace(temporary, path)


class ChunkTrace:
    """`seq unix_time_us` per chunk as it first arrives (or, at the origin, leaves):
    comparing a parent's and a child's trace gives the latency a hop adds."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("w", buffering=64 * 1024)

    def record(self, seq: int) -> None:
        self._file.write(f"{seq} {time.time_ns() // 1000}\n")

    def close(self) -> None:
        self._file.close()
