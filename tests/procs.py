"""Real `meshd` processes for end-to-end tests, each with a deadline so nothing hangs."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MESHD = [sys.executable, "-m", "meshd"]


class Proc:
    def __init__(self, name: str, args: list[str], workdir: Path) -> None:
        self.name = name
        self.log = workdir / f"{name}.log"
        self.out = workdir / f"{name}.out"
        self._log_file = self.log.open("wb")
        self._out_file = self.out.open("wb")
        self.popen = subprocess.Popen(
            [*MESHD, *args], stdout=self._out_file, stderr=self._log_file, stdin=subprocess.DEVNULL
        )

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise AssertionError(
                f"{self.name} did not exit in {timeout}s:\n{self.tail()}"
            ) from None

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def exit_code(self, deadline: float) -> int | None:
        """Its exit status, or None if it is still running at `deadline` (monotonic)."""
        try:
            return self.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return None

    def signal(self, signum: signal.Signals) -> None:
        self.popen.send_signal(signum)

    def pause(self) -> None:
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def find_output(self, pattern: str) -> re.Match[str] | None:
        """The first match of `pattern` in stdout+stderr so far."""
        text = self.out.read_text(errors="replace") + self.log.read_text(errors="replace")
        return re.search(pattern, text)

    def wait_for_output(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait until stdout+stderr match `pattern` (the process must still be running)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if match := self.find_output(pattern):
                return match
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{self.name}: no {pattern!r} in its output:\n{self.tail()}")

    def tail(self, lines: int = 30, skip: str | None = None) -> str:
        """The last `lines` lines of its log, leaving out those that match `skip`."""
        text = self.log.read_text(errors="replace").splitlines()
        kept = [line for line in text if skip is None or not re.search(skip, line)]
        return "\n".join(kept[-lines:])

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        self._log_file.close()
        self._out_file.close()


class Cluster:
    """Starts processes in `workdir` and kills whatever is left at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []

    def start(self, name: str, *args: str) -> Proc:
        proc = Proc(name, list(args), self.workdir)
        self.procs.append(proc)
        return proc

    def tracker(self, *extra: str) -> tuple[Proc, str]:
        # One process: these rooms test the nodes, and worker processes starting beside
        # a dozen listeners slow the room's start on 2 cores (test_tracker_workers.py
        # and test_faults.py's restarted tracker run workers).
        proc = self.start(
            f"tracker{len(self.procs)}", "tracker", "--listen", "127.0.0.1:0", "--workers", "0",
            *extra,
        )  # fmt: skip
        address = proc.wait_for_output(r"listening on (\S+)").group(1)
        return proc, address

    def keygen(self, name: str) -> tuple[Path, str]:
        path = self.workdir / f"{name}.key"
        result = subprocess.run(
            [*MESHD, "keygen", "--out", str(path)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        return path, result.stdout.strip()

    def listener(self, name: str, tracker: str, stream: str, *extra: str) -> Proc:
        return self.start(name, *self.listener_args(name, tracker, stream), *extra)

    def listener_args(self, name: str, tracker: str, stream: str) -> list[str]:
        """`meshd listen` writing its audio and stats files as `name` in the workdir."""
        return [
            "listen", "--tracker", tracker, "--stream", stream,
            "--output", str(self.workdir / f"{name}.opus"),
            "--stats-file", str(self.workdir / f"{name}.json"), "--stats-interval", "0.3",
        ]  # fmt: skip

    def stats(self, name: str) -> dict[str, Any]:
        path = self.workdir / f"{name}.json"
        if not path.exists():
            return {}
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except json.JSONDecodeError:
            return {}
        return data

    def by_node(self, node_id: str) -> Proc | None:
        """The process whose stats file names `node_id` as its node."""
        return next((p for p in self.procs if self.stats(p.name).get("node") == node_id), None)

    def kill_all(self) -> None:
        for proc in self.procs:
            proc.close()


def wait_until(condition: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.1)


@contextmanager
def cluster(workdir: Path) -> Iterator[Cluster]:
    running = Cluster(workdir)
    try:
        yield running
    finally:
        running.kill_all()
