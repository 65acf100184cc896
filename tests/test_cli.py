"""The `meshd` command as users run it: help, errors, and a whole room of real processes."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.procs import MESHD, cluster
from tests.room import DATA, assert_gap_free_tail, packets_of

TONE = DATA / "tone12.opus"  # long enough for ten processes to start and join

COMMANDS = ["keygen", "tracker", "origin", "listen", "status", "token", "demo"]


def meshd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MESHD, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_command_has_help(command: str | None) -> None:
    result = meshd(*([command] if command else []), "--help")
    assert result.returncode == 0
    assert "usage: meshd" in result.stdout
    if command is None:
        assert all(name in result.stdout for name in COMMANDS)


def test_keygen_writes_a_private_key_file_and_prints_its_id(tmp_path: Path) -> None:
    key = tmp_path / "origin.key"
    result = meshd("keygen", "--out", str(key))
    assert result.returncode == 0
    assert len(result.stdout.strip()) == 52 and result.stdout.count("\n") == 1
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    again = meshd("keygen", "--out", str(key))
    assert again.returncode == 1 and "--force" in again.stderr


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["listen", "--tracker", "nowhere", "--stream", "x", "--output", "-"], 2, "HOST:PORT"),
        (["listen", "--tracker", "127.0.0.1:1", "--stream", "short", "--output", "-"], 2, "52"),
        (
            ["origin", "--tracker", "127.0.0.1:1", "--key", "/nonexistent.key", "--input", "-"],
            1,
            "meshd keygen",
        ),
        (["status", "--tracker", "127.0.0.1:1"], 2, "--stream"),
        (
            [
                "listen",
                "--tracker",
                "127.0.0.1:9",
                "--stream",
                "a" * 52,
                "--output",
                os.devnull,
                "--join-timeout",
                "1",
            ],
            1,
            "is the tracker at 127.0.0.1:9 up",
        ),
    ],
)
def test_errors_are_one_clear_line_and_a_nonzero_exit(
    args: list[str], code: int, message: str
) -> None:
    result = meshd(*args)
    assert result.returncode == code
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_room_of_processes_delivers_every_packet(tmp_path: Path) -> None:
    """Tracker, origin and 10 listeners as real processes; every output is complete."""
    source = packets_of(TONE)
    with cluster(tmp_path) as room:
        _, tracker = room.tracker()
        key, stream = room.keygen("origin")
        origin = room.start(
            "origin", "origin", "--tracker", tracker, "--key", str(key),
            "--input", str(TONE), "--capacity", "2",
        )  # fmt: skip
        origin.wait_for_output("registered")
        listeners = [
            room.listener(f"listener{i}", tracker, stream, "--max-children", "2") for i in range(10)
        ]
        for listener in listeners:
            assert listener.wait(30) == 0, listener.tail()
        assert origin.wait(30) == 0, origin.tail()
        status_after = meshd("status", "--tracker", tracker, "--stream", stream)
    for index in range(10):
        assert_gap_free_tail(tmp_path / f"listener{index}.opus", source)
        stats = room.stats(f"listener{index}")
        assert stats["ended"] and stats["lost"] == 0
    assert status_after.returncode == 1 and "STREAM_ENDED" in status_after.stderr


def test_status_shows_the_tree(tmp_path: Path) -> None:
    with cluster(tmp_path) as room:
        _, tracker = room.tracker()
        key, stream = room.keygen("origin")
        origin = room.start(
            "origin", "origin", "--tracker", tracker, "--key", str(key), "--input", str(TONE)
        )
        origin.wait_for_output("registered")
        listener = room.listener("listener", tracker, stream)
        listener.wait_for_output("receiving from")
        result = meshd("status", "--tracker", tracker, "--stream", stream)
        as_json = meshd("status", "--tracker", tracker, "--stream", stream, "--json")
    assert result.returncode == 0, result.stderr
    assert "audience        1" in result.stdout and "origin children 1/4" in result.stdout
    assert '"audience": 1' in as_json.stdout


def test_demo_runs_a_room_and_sums_it_up() -> None:
    result = meshd("-q", "demo", "--listeners", "5", "--duration", "4", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "origin egress" in result.stdout
    assert "listeners that got the end of the stream: 5/5" in result.stdout
    assert "lost chunks: 0" in result.stdout
