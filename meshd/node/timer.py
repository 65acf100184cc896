"""The one task that wakes a sans-I/O core at its deadlines (origin and relay drivers).

The driver calls `rearm` after every input it fed the core. That moves the deadline of
the cancel scope the task sleeps in, so an input that leaves the core's earliest
deadline where it was wakes nothing (a wake-up per chunk was a real part of a relay's
CPU).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import trio


class CoreTimer:
    """Sleeps until `get_timer()`, the core's earliest deadline (None: none)."""

    def __init__(self, get_timer: Callable[[], float | None]) -> None:
        self._get_timer = get_timer
        self._scope = trio.CancelScope()

    def rearm(self) -> None:
        deadline = self._deadline()
        if deadline != self._scope.deadline:  # trio's setter costs, even unchanged
            self._scope.deadline = deadline

    async def wait(self) -> float | None:
        """Return once the deadline passed or moved; the core's deadline now (it may still
        be ahead: the caller checks)."""
        with trio.CancelScope(deadline=self._deadline()) as self._scope:
            await trio.sleep_forever()
        return self._get_timer()

    def _deadline(self) -> float:
        deadline = self._get_timer()
        return math.inf if deadline is None else deadline
