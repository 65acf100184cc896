"""`protocol` stays sans-I/O: importing it pulls in no event loop and no sockets."""

from __future__ import annotations

import subprocess
import sys


def test_importing_protocol_imports_no_io() -> None:
    code = (
        "import sys, protocol, protocol.link, protocol.tracker, protocol.tokens\n"
        "bad = [m for m in ('trio', 'asyncio', 'aioquic', 'socket') if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""
