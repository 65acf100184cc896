"""The stats line and stats file of a running node: every few seconds, and once at the end."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import trio

from meshd.node.stats import NodeStats

logger = logging.getLogger("meshd.node")


class StatsReporter:
    """Logs the stats line when it changed (an idle node does not repeat itself, and the
    last line is never printed twice) and rewrites the stats file."""

    def __init__(
        self,
        stats: NodeStats,
        interval: float,
        path: Path | None,
        update: Callable[[], None] = lambda: None,
    ) -> None:
        self.stats = stats
        self.interval = interval
        self.path = path
        self.update = update
        """Brings the time-dependent figures up to date before each report."""
        self._last = ""

    async def run(self) -> None:
        while True:
            await trio.sleep(self.interval)
            self.report()

    def report(self) -> None:
        self.update()
        line = self.stats.line()
        if line != self._last:
            logger.info("%s", line)
            self._last = line
        if self.path is not None:
            self.stats.write_json(self.path)
