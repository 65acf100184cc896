"""The errors that end a meshd command, each with the exit status a person or script sees."""

from __future__ import annotations

import errno

EXIT_FAILED = 1
"""It ran but achieved nothing: no tracker, refused, no audio."""
EXIT_USAGE = 2
"""The command line names something unusable: an option's value, a file, an address."""


class NodeError(Exception):
    """The node cannot go on (e.g. the tracker refused our token); the message says why,
    `exit_status` what the process should exit with."""

    def __init__(self, message: str, exit_status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_status = exit_status


class UsageError(NodeError):
    """A bad option value, file or address, found before anything ran; the message names
    the option and says what would work."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_USAGE)


class BindError(UsageError):
    """A --listen or --metrics address this machine cannot serve on."""

    def __init__(self, address: str, exc: OSError) -> None:
        hint = _BIND_HINTS.get(exc.errno or 0, "")
        reason = (exc.strerror or str(exc)).lower()
        super().__init__(f"cannot listen on {address}: {reason}{hint}")


_BIND_HINTS = {
    errno.EADDRINUSE: " (is another meshd running there? pick another port, or 0 for any)",
    errno.EADDRNOTAVAIL: " (no network interface of this machine has that address)",
    errno.EACCES: " (ports below 1024 need privileges; pick another)",
}
