"""A room of real `meshd` processes to attack, and what the honest side of it went through.

Shared by tests/test_attacks.py and bench/bench_attacks.py. The room is a tracker, an
origin and honest `meshd listen` processes (tests/procs.py); the attacker runs in the
caller's trio run (tests/attackers.py). Everything here is driven from trio: waits are
`trio.sleep` polls, so attacker tasks keep running meanwhile.
"""

from __future__ import annotations

import math
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.addresses import parse_address
from meshd.keys import write_new_key
from meshd.ogg import read_ogg_opus
from meshd.quic import open_quic_endpoint
from protocol import StatusRequest, issue_token, key_from_text, key_id, key_to_text, token_to_text
from tests.attackers import ask
from tests.procs import MESHD, Cluster, Proc
from tests.room import packets_of


def rss_mb(proc: Proc) -> float | None:
    try:
        for line in Path(f"/proc/{proc.popen.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


async def wait_output(proc: Proc, pattern: str, within: float = 20.0) -> str:
    deadline = trio.current_time() + within
    while trio.current_time() < deadline:
        if match := proc.find_output(pattern):
            return match.group(1) if match.groups() else match.group(0)
        if not proc.running:
            break
        await trio.sleep(0.05)
    raise AssertionError(f"{proc.name}: no {pattern!r} in its output:\n{proc.tail()}")


@dataclass
class Honest:
    """How the honest listeners fared (those started; the figures of those that ran)."""

    started: int = 0
    intact: int = 0
    """Exited 0, lost nothing, and wrote a gap-free tail of the input."""
    gaps_ms: list[float] = field(default_factory=list)
    first_audio_ms: list[float] = field(default_factory=list)
    """JOIN to first audio; inf for a listener that never played."""
    problems: dict[str, str] = field(default_factory=dict)


@dataclass
class Health:
    """The tracker's answers to STATUS while the attack ran, and memory."""

    asked: int = 0
    answered: int = 0
    slowest_ms: float = 0.0
    tracker_rss_mb: list[float] = field(default_factory=list)
    target_rss_mb: list[float] = field(default_factory=list)


class AttackRoom:
    nursery: trio.Nursery
    """Where attacker tasks run while the honest listeners play (set by the caller)."""

    def __init__(
        self, cluster: Cluster, audio: Path, *, admission: bool = False, spread: bool = False
    ) -> None:
        self.cluster = cluster
        self.audio = audio
        self.spread = spread
        """Each honest listener from a loopback network of its own (127.1.k.0/24), as an
        audience on the Internet is, rather than all from 127.0.0.0/24 as one campus."""
        self.host_key = Ed25519PrivateKey.generate() if admission else None
        """With admission, the host's key: the tracker and every parent (the origin and
        the honest listeners) take only children holding a token it signed."""
        self.tracker_proc: Proc | None = None
        self.tracker = ""
        self.origin: Proc | None = None
        self.stream = ""
        self.listeners: list[Proc] = []
        self.health = Health()
        self.streaming_since: float | None = None
        """When the origin registered (trio clock): the stream plays from then on."""
        self.last_listener_at: float | None = None
        self.target: Proc | None = None
        """The server whose memory is watched besides the tracker's (default the origin)."""

    @property
    def seconds(self) -> float:
        """The input's length in seconds."""
        with self.audio.open("rb") as file:
            return sum(p.samples for p in read_ogg_opus(file)[1]) / 48_000

    @property
    def tracker_address(self) -> tuple[str, int]:
        return parse_address(self.tracker)

    @property
    def stream_id(self) -> bytes:
        return key_from_text(self.stream)

    def _host_args(self) -> list[str]:
        return [] if self.host_key is None else ["--host-id", key_to_text(key_id(self.host_key))]

    async def open(self, origin_capacity: int = 2, *tracker_args: str) -> None:
        """Tracker and origin, registered (the stream starts playing now)."""
        self.tracker_proc = self.cluster.start(
            "tracker", "tracker", "--listen", "127.0.0.1:0", "--workers", "0",
            *self._host_args(), *tracker_args,
        )  # fmt: skip
        self.tracker = await wait_output(self.tracker_proc, r"listening on (\S+)")
        self.stream, self.origin = await self.start_origin("origin", origin_capacity)
        self.target = self.origin

    async def restart_tracker(self) -> None:
        """SIGKILL the tracker and start a new one on its address: it knows nothing."""
        assert self.tracker_proc is not None
        self.tracker_proc.signal(signal.SIGKILL)
        await trio.to_thread.run_sync(self.tracker_proc.wait, 10)
        self.tracker_proc = self.cluster.start(
            "tracker-again", "tracker", "--listen", self.tracker, "--workers", "0",
            *self._host_args(),
        )  # fmt: skip
        await wait_output(self.tracker_proc, r"listening on (\S+)")

    async def start_origin(self, name: str, capacity: int) -> tuple[str, Proc]:
        key = self.cluster.workdir / f"{name}.key"
        result = await trio.to_thread.run_sync(
            lambda: subprocess.run(
                [*MESHD, "keygen", "--out", str(key)], capture_output=True, text=True, timeout=60
            )
        )
        stream = result.stdout.strip()
        origin = self.cluster.start(
            name, "origin", "--tracker", self.tracker, "--key", str(key),
            "--input", str(self.audio), "--capacity", str(capacity),
            "--stats-file", str(self.cluster.workdir / f"{name}.json"), "--stats-interval", "0.3",
            *self._host_args(),
        )  # fmt: skip
        await wait_output(origin, "registered")
        if self.streaming_since is None:
            self.streaming_since = trio.current_time()
        return stream, origin

    async def origin_address(self) -> tuple[str, int]:
        assert self.origin is not None
        text = await wait_output(self.origin, r"streaming \S+ from (\S+)")
        return parse_address(text)

    async def add_listeners(self, count: int, stagger: float = 0.15, max_children: int = 2) -> None:
        for _ in range(count):
            name = f"listener{len(self.listeners)}"
            args = ["--max-children", str(max_children), *self._admitted_args(name)]
            if self.spread:
                args += ["--listen", f"127.1.{len(self.listeners) + 1}.1:0"]
            self.listeners.append(self.cluster.listener(name, self.tracker, self.stream, *args))
            self.last_listener_at = trio.current_time()
            await trio.sleep(stagger)

    def _admitted_args(self, name: str) -> list[str]:
        """A listener's key, its token from the host, and the host id it checks its own
        children against (nothing without admission)."""
        if self.host_key is None:
            return []
        path = self.cluster.workdir / f"{name}.key"
        token = issue_token(self.host_key, self.stream_id, key_id(write_new_key(path)), 2**42)
        return ["--key", str(path), "--token", token_to_text(token), *self._host_args()]

    async def watch(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Ask the tracker for STATUS and sample memory every second, until cancelled."""
        task_status.started()
        while True:
            self.sample_memory()
            self.health.asked += 1
            began = time.monotonic()
            async with open_quic_endpoint(Ed25519PrivateKey.generate()) as endpoint:
                request = StatusRequest(self.stream_id)
                (answer,) = await ask(endpoint, self.tracker_address, [request], within=3.0)
            if answer is not None:  # a report, or GOODBYE once the stream has ended
                self.health.answered += 1
                took = (time.monotonic() - began) * 1000
                self.health.slowest_ms = max(self.health.slowest_ms, took)
            await trio.sleep(1.0)

    def sample_memory(self) -> None:
        for proc, into in (
            (self.tracker_proc, self.health.tracker_rss_mb),
            (self.target, self.health.target_rss_mb),
        ):
            if proc is not None and (mb := rss_mb(proc)) is not None:
                into.append(mb)

    async def wait_playing(self, within: float = 30.0) -> bool:
        deadline = trio.current_time() + within
        while trio.current_time() < deadline:
            if all(self.cluster.stats(p.name).get("first_seq") is not None for p in self.listeners):
                return True
            await trio.sleep(0.2)
        return False

    async def finish(self, within: float = 60.0) -> Honest:
        """Wait (up to `within` s) for every honest listener to exit, then judge each."""
        deadline = trio.current_time() + within
        for proc in self.listeners:
            while trio.current_time() < deadline:
                if not proc.running:
                    break
                await trio.sleep(0.2)
        source = packets_of(self.audio)
        honest = Honest(started=len(self.listeners))
        for proc in self.listeners:
            stats = self.cluster.stats(proc.name)
            problem = _problem(proc, stats, source, self.cluster.workdir / f"{proc.name}.opus")
            if problem:
                honest.problems[proc.name] = problem
            else:
                honest.intact += 1
            joined = stats.get("join_to_audio_ms")
            honest.first_audio_ms.append(math.inf if joined is None else float(joined))
            honest.gaps_ms.append(float(stats.get("stall_ms", math.inf)) if stats else math.inf)
        return honest


def _problem(proc: Proc, stats: dict[str, object], source: list[bytes], output: Path) -> str:
    code = proc.popen.poll()
    if code is None:
        return "still running"
    if code != 0:
        return f"exit status {code}"
    if stats.get("lost"):
        return f"lost {stats['lost']} chunks"
    try:
        got = packets_of(output)
    except Exception as exc:  # an unreadable output is the finding
        return f"unreadable output: {exc!r}"
    if not got:
        return "no audio"
    if got != source[-len(got) :]:
        return f"output ({len(got)} packets) is not a gap-free tail of the input"
    return ""


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]
