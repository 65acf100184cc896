"""What a scenario run measured, the same figures at either level."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

REBUILT_SHARE = 0.99
"""A restarted tracker knows the tree again once its view holds this share of the
listeners playing."""


class Rebuild:
    """When a restarted tracker's view held `REBUILT_SHARE` of the listeners playing."""

    def __init__(self) -> None:
        self.restarted_at: float | None = None
        self._rebuilt_at: float | None = None

    def sample(self, now: float, known: int, playing: int) -> None:
        """Once a second: `known` listeners in the tracker's view, `playing` playing."""
        waiting = self.restarted_at is not None and self._rebuilt_at is None
        if waiting and known >= REBUILT_SHARE * playing:
            self._rebuilt_at = now

    def record(self, results: Results) -> None:
        if self.restarted_at is None:
            return
        results.restarted = True
        if self._rebuilt_at is not None:
            results.rebuilt_after = self._rebuilt_at - self.restarted_at


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def depth_bound(audience: int, capacity: float) -> int:
    """The depth the tree should stay within: ceil(log_k N) + 2 (the tree core's bound
    for a uniform capacity k), with k the mean capacity of the relays."""
    k = max(capacity, 2.0)
    return math.ceil(math.log(max(audience, 1), k) - 1e-9) + 2


@dataclass(frozen=True)
class EgressSample:
    at: float
    listening: int
    """Listeners receiving the stream at that moment: a central server's fan-out."""
    origin_streams: float
    """The origin's egress that second, in copies of the stream."""


class TrackerLoad:
    """Per-second counts of what reaches the tracker: requests by type (answered or
    shed), decisions taken (requests that reached the tree), and the host's probes."""

    def __init__(self) -> None:
        self.arrived: dict[int, Counter[str]] = {}
        self.decided: Counter[int] = Counter()
        self.totals: Counter[str] = Counter()

    def request(self, now: float, kind: str) -> None:
        second = int(now)
        counts = self.arrived.get(second)
        if counts is None:
            counts = self.arrived[second] = Counter()
        counts[kind] += 1
        self.totals[kind] += 1

    def decision(self, now: float) -> None:
        self.decided[int(now)] += 1
        self.totals["decisions"] += 1

    def peak(self, since: float = 0.0) -> TrackerPeak:
        """The busiest second from `since` on (times are relative to `since`)."""
        first = int(since)
        messages, second = max(
            (
                (sum(counts.values()), second)
                for second, counts in self.arrived.items()
                if second >= first
            ),
            default=(0, first),
        )
        return TrackerPeak(
            messages_per_s=messages,
            decisions_per_s=max(
                (n for second, n in self.decided.items() if second >= first), default=0
            ),
            at=second - first,
            mix=dict(self.arrived.get(second, Counter()).most_common()),
        )


@dataclass(frozen=True)
class TrackerPeak:
    messages_per_s: int
    """The busiest second's requests (refreshes, probes and shed ones included)."""
    decisions_per_s: int
    at: int
    mix: dict[str, int]


@dataclass
class Results:
    scenario: str
    level: str
    seed: int
    origin_capacity: int
    tracker_rate: float | None
    """Requests per second the modelled tracker serves (None: unlimited)."""
    listeners: int = 0
    """Listeners that took part (arrived) in the run."""
    peak_audience: int = 0
    egress: list[EgressSample] = field(default_factory=list)
    depth_histogram: list[int] = field(default_factory=list)
    """Listeners per depth at the end, along the links that carry the stream (index 0:
    the origin)."""
    depth_max_seen: int = 0
    tracker_depth_max: int = 0
    relay_capacity: float = 0.0
    join_times: list[float] = field(default_factory=list)
    never_played: int = 0
    stalls: list[float] = field(default_factory=list)
    """Per listener that played: seconds of silence after its first audio."""
    lost: list[int] = field(default_factory=list)
    """Per listener that played: chunks skipped."""
    outages: list[float] = field(default_factory=list)
    """Every gap a listener heard, in seconds."""
    shocked: int = 0
    """Survivors of the shock that were listening when it hit."""
    recovery: list[float] = field(default_factory=list)
    """Per survivor that lost the stream in the shock: seconds until it played again."""
    unrecovered: int = 0
    shock_lost: list[int] = field(default_factory=list)
    """Per survivor of the shock: chunks it skipped after the shock."""
    restarted: bool = False
    """The tracker restarted during the run (the `restart` scenario)."""
    rebuilt_after: float | None = None
    """Seconds from the restart until the tracker's view held `REBUILT_SHARE` of the
    listeners then playing (None: not within the run)."""
    tracker: TrackerPeak = field(default_factory=lambda: TrackerPeak(0, 0, 0, {}))
    tracker_totals: dict[str, int] = field(default_factory=dict)
    problems: dict[str, int] = field(default_factory=dict)
    """Broken promises at the end, by kind: "cycle", "cut off"."""
    wall_s: float = 0.0
    rss_mb: float = 0.0
    events: int = 0

    @property
    def bound(self) -> int:
        return depth_bound(self.peak_audience, self.relay_capacity)

    @property
    def depth_max(self) -> int:
        return len(self.depth_histogram) - 1

    @property
    def depth_mean(self) -> float:
        total = sum(self.depth_histogram[1:])
        weighted = sum(d * n for d, n in enumerate(self.depth_histogram) if d)
        return weighted / total if total else 0.0

    def egress_max(self, window: int) -> float:
        """The origin's highest mean egress over `window` consecutive seconds, in copies
        of the stream."""
        values = [sample.origin_streams for sample in self.egress]
        if len(values) < window:
            return max(values, default=0.0)
        total = sum(values[:window])
        best = total
        for i in range(window, len(values)):
            total += values[i] - values[i - window]
            best = max(best, total)
        return best / window
