"""The embedding examples run, serve real QUIC, and stop cleanly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.procs import MESHD

EXAMPLES = Path(__file__).parent.parent / "examples"
STREAM = "a" * 52


@pytest.mark.parametrize("example", ["embed_trio.py", "embed_asyncio.py"])
def test_embedded_tracker_serves_and_stops(example: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / example), "--seconds", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first.startswith("tracker listening on "), first
    address = first.split()[-1]
    status = subprocess.run(
        [*MESHD, "status", "--tracker", address, "--stream", STREAM],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 1 and "UNKNOWN_STREAM" in status.stderr  # it answered
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.rstrip().endswith("tracker stopped")
