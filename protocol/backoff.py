"""Jittered exponential backoff, so that thousands of clients never retry in step."""

from __future__ import annotations

import random


class Backoff:
    """Delays of `uniform(0.5, 1.0) * min(cap, base * 2**attempt)` ("equal jitter").

    Half the delay is fixed so a retry never comes at once, half is random so retries
    after a common failure (a tracker restart, a relay dying) spread out.
    """

    def __init__(self, rng: random.Random, *, base: float = 0.1, cap: float = 30.0) -> None:
        self._rng = rng
        self._base = base
        self._cap = cap
        self.attempt = 0

    def next_delay(self, floor: float = 0.0) -> float:
        """The next delay in seconds; at least `floor` (a RETRY_AFTER) plus jitter."""
        ceiling = min(self._cap, self._base * 2.0**self.attempt)
        self.attempt += 1
        delay = ceiling * self._rng.uniform(0.5, 1.0)
        if floor > 0:
            delay = max(delay, floor * self._rng.uniform(1.0, 1.5))
        return delay

    def reset(self) -> None:
        self.attempt = 0
