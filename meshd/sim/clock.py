"""A virtual clock: callbacks run in time order, and time jumps from one to the next."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable


class Scheduler:
    """Deterministic event loop: equal times run in the order they were scheduled."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self.events_run = 0

    def at(self, when: float, callback: Callable[[], None]) -> None:
        """Run `callback` at `when` (at once, in order, if that is in the past)."""
        if when < self.now:
            when = self.now
        heapq.heappush(self._queue, (when, next(self._order), callback))

    def after(self, delay: float, callback: Callable[[], None]) -> None:
        self.at(self.now + delay, callback)

    def run_until(self, until: float) -> None:
        """Run every event due up to `until`, then leave the clock there."""
        queue = self._queue
        pop = heapq.heappop
        while queue and queue[0][0] <= until:
            when, _, callback = pop(queue)
            self.now = when
            callback()
            self.events_run += 1
        self.now = max(self.now, until)

    def run_for(self, seconds: float) -> None:
        self.run_until(self.now + seconds)
