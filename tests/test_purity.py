"""The sans-I/O cores stay sans-I/O: importing them pulls in no event loop and no sockets.

That is what lets the simulator (meshd/sim) drive thousands of real node cores."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_cores_imports_no_io() -> None:
    code = (
        "import sys, protocol, protocol.link, protocol.tracker, protocol.tokens\n"
        "import meshd.node.core, meshd.node.children, meshd.node.source\n"
        "bad = [m for m in ('trio', 'asyncio', 'aioquic', 'socket') if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""
