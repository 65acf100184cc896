"""Real `meshd` processes for end-to-end tests, each with a deadline so nothing hangs."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
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

    def signal(self, signum: signal.Signals) -> None:
        self.popen.send_signal(signum)

    def wait_for_output(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait until stdout+stderr match `pattern` (the process must still be running)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.out.read_text(errors="replace") + self.log.read_text(errors="replace")
            if match := re.search(pattern, text):
                return match
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{self.name}: no {pattern!r} in its output:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

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
        proc = self.start(f"tracker{len(self.procs)}", "tracker", "--listen", "127.0.0.1:0", *extra)
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
        return self.start(
            name, "listen", "--tracker", tracker, "--stream", stream,
            "--output", str(self.workdir / f"{name}.opus"),
            "--stats-file", str(self.workdir / f"{name}.json"), "--stats-interval", "0.3",
            *extra,
        )  # fmt: skip

    def stats(self, name: str) -> dict[str, Any]:
        path = self.workdir / f"{name}.json"
        if not path.exists():
            return {}
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except json.JSONDecodeError:
            return {}
        return data

    def kill_all(self) -> None:
        for proc in self.procs:
            proc.close()


@contextmanager
def cluster(workdir: Path) -> Iterator[Cluster]:
    running = Cluster(workdir)
    try:
        yield running
    finally:
        running.kill_all()
