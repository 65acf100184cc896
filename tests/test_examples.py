"""The embedding examples run, serve real QUIC (and metrics), and stop cleanly, on their
own or on Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
import urllib.request
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


@pytest.mark.parametrize("example", ["embed_trio.py", "embed_asyncio.py"])
def test_ctrl_c_stops_an_embedded_tracker_cleanly(example: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / example), "--seconds", "600"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("tracker listening on ")
        if example == "embed_trio.py":
            metrics = proc.stdout.readline().split()[-1]
            with urllib.request.urlopen(metrics, timeout=10) as response:
                assert b"meshd_tracker_streams 0.0" in response.read()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert out.rstrip().endswith("tracker stopped")
