"""The periodic stats line and stats file of a running node."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import trio

from meshd.node.stats import NodeStats

logger = logging.getLogger("meshd.node")


async def report_periodically(
    stats: NodeStats,
    interval: float,
    path: Path | None,
    update: Callable[[], None] = lambda: None,
) -> None:
    """Log the stats line, and rewrite the stats file, every `interval` seconds
    (`update` first brings time-dependent figures up to date)."""
    while True:
        await trio.sleep(interval)
        update()
        logger.info("%s", stats.line())
        if path is not None:
            stats.write_json(path)
