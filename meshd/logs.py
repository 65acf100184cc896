"""Log lines that say which node and role they come from, for people or (JSON) machines.

A role's `run()` calls `log_as(role, node)`: trio tasks inherit the context of the task
that started them, so every line logged on that node's behalf names it, even when a
tracker, an origin and a dozen listeners share one process (`meshd demo`).
"""

from __future__ import annotations

import json
import logging
import time
from contextvars import ContextVar
from typing import TextIO

LOG_FORMATS = ("text", "json")

_CONTEXT: ContextVar[tuple[str, str]] = ContextVar("meshd_log_context", default=("meshd", "-"))


def log_as(role: str, node: str) -> None:
    """Name the role ("tracker", "origin", "relay", "listener") and node id of this task
    and every task it starts from now on."""
    _CONTEXT.set((role, node))


class _Context(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.role, record.node = _CONTEXT.get()
        return True


def _who(record: logging.LogRecord) -> tuple[str, str]:
    return getattr(record, "role", "meshd"), getattr(record, "node", "-")


class TextFormatter(logging.Formatter):
    """`12:00:01.234 listener 4s5uvcok: message`, with the level when it is not info."""

    def __init__(self) -> None:
        super().__init__(datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        stamp = f"{self.formatTime(record, self.datefmt)}.{int(record.msecs):03d}"
        role, node = _who(record)
        who = role if node == "-" else f"{role} {node}"
        line = f"{stamp} {who}: {level}{record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, role, node, logger, message."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        role, node = _who(record)
        entry = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "role": role,
            "node": node,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: int, log_format: str, stream: TextIO) -> None:
    """Send meshd's log lines to `stream` in `log_format` ("text" or "json")."""
    handler = logging.StreamHandler(stream)
    handler.addFilter(_Context())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("quic").setLevel(logging.DEBUG if level <= logging.DEBUG else logging.WARNING)
