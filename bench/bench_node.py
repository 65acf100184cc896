"""Whole-room figures with real `meshd` processes on loopback.

Run: .venv/bin/python bench/bench_node.py [--sizes 10,50,100,200] [--quick] [--keep]
     .venv/bin/python bench/bench_node.py --cpu-only [--baseline main]
     .venv/bin/python bench/bench_node.py --faults [--listeners 20] [--loss 0.03]

For each N it starts a tracker, an origin (--capacity 4) and N `meshd listen` processes
(--max-children 4, --silence-timeout 600), staggered, waits until all play, and measures a
steady-state window: origin egress (its stats bytes_out) against what a central server
would send (the listeners' bytes_in), added latency per relay hop (each listener's
--trace against its parent's), and join to first audio. For N >= 50 it then SIGKILLs a
few relays that feed others and reports their former children's gap, lost chunks and
whether everyone reached the end. Last, relay CPU and RSS: origin (capacity 1) -> one
relay -> exactly 4 leaves, sampled from /proc for 20 s, the nodes run as a listener runs
them (no --trace, stats file at the default interval).

--faults runs issue 8's five fault scenarios instead (the ones tests/test_fault_scenarios.py
checks), each in a fresh room of --listeners listeners (origin --capacity 2, --max-children
2): SIGKILL of both of the origin's children; of a seeded 40 % of the relays; of a
listener's parent and its first backup; SIGSTOP of a mid-tree relay for 5 s; datagram
loss (--loss) on every parent<->child link through tests/udp_proxy.py. For each: the
affected listeners' gap, chunks lost, and the time until every survivor is again on a
loop-free path to the origin.

The input is a 64 kbps CBR Ogg Opus tone made with ffmpeg in a temp dir. It is longer than
any run; the bench ends the stream when it is done measuring (SIGINT to the origin sends
END), so the stream lasts as long as each size needs. Budgets: the README.
Every process is killed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from meshd.addresses import parse_address
from meshd.ogg import read_ogg_opus

# The fault scenarios' choices and the lossy proxy live with the tests, which check the
# same scenarios; the repository root is not on the path of a script in bench/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests import scenarios
from tests.udp_proxy import Address, UdpProxy, bound_udp_port

MESHD = [sys.executable, "-m", "meshd"]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

BITRATE = 64_000  # bit/s of the input
INPUT_SECONDS = 900  # longer than any run: the bench ends the stream itself
ORIGIN_CAPACITY = 4
MAX_CHILDREN = 4
SILENCE_TIMEOUT_MS = 600  # the default
STATS_INTERVAL = 0.5
LAUNCH_RATE = 25.0  # listeners started per second at most
MAX_STARTING = 24  # started but not yet playing, at most (2 cores start ~5 Pythons/s)
WINDOW_SECONDS = 8.0  # the steady-state measuring window
KILL_FROM_SIZE = 50  # SIGKILL relays in runs with at least this many listeners
VICTIMS = 3
RECOVERY_SECONDS = 6.0
CPU_SECONDS = 20.0

EGRESS_SLACK = 1.15
HOP_BUDGET_MS = (2.0, 10.0)  # p50, p99
JOIN_BUDGET_MS = 300.0  # p50
GAP_BUDGET_MS = 1000.0  # p99
CPU_BUDGET_PERCENT = 3.0
LEAF_BUDGET_PERCENT = 1.5
RSS_BUDGET_MB = 60.0
SERVING = "serving children on "  # a relay's log line, with its real address

Stats = dict[str, Any]


def log(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def read_stats(path: Path) -> tuple[Stats, float] | None:
    """A node's stats file and when it was written (it is replaced atomically)."""
    try:
        with path.open() as file:
            written = os.fstat(file.fileno()).st_mtime
            data: Stats = json.loads(file.read())
    except (OSError, json.JSONDecodeError):
        return None
    return data, written


def read_trace(path: Path) -> dict[int, int]:
    """seq -> unix time in µs; a killed node's last line may be cut, so skip bad lines."""
    trace: dict[int, int] = {}
    try:
        text = path.read_text()
    except OSError:
        return trace
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            trace.setdefault(int(parts[0]), int(parts[1]))
    return trace


class Node:
    """One meshd process; its stats file, trace and log live in the room's directory."""

    def __init__(
        self,
        name: str,
        args: list[str],
        workdir: Path,
        *,
        node: bool = True,
        source: Path | None = None,
        instrumented: bool = True,
    ) -> None:
        self.name = name
        self.stats_path = workdir / f"{name}.json"
        self.trace_path = workdir / f"{name}.trace"
        self.log_path = workdir / f"{name}.log"
        self.out_path = workdir / f"{name}.out"
        if node:
            args = [*args, "--stats-file", str(self.stats_path)]
        if node and instrumented:
            args = [*args, "--trace", str(self.trace_path), "--stats-interval", str(STATS_INTERVAL)]
        with self.log_path.open("wb") as log_file, self.out_path.open("wb") as out_file:
            # Own process group: a Ctrl-C on the terminal reaches only the bench, which
            # then kills everything. Same session, so the kernel's autogroup keeps the
            # whole room to one fair share beside other work on the machine.
            env = dict(os.environ)
            if source is not None:  # a --baseline checkout: run from there, or `-m meshd`
                env["PYTHONPATH"] = str(source)  # finds this tree's meshd first
            self.popen = subprocess.Popen(
                [*MESHD, *args], stdin=subprocess.DEVNULL, stdout=out_file, stderr=log_file,
                process_group=0, env=env, cwd=source,
            )  # fmt: skip
        self.playing = False
        self.killed = False
        self.stopped = False

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def stats(self) -> Stats:
        found = read_stats(self.stats_path)
        return found[0] if found else {}

    def is_playing(self) -> bool:
        if not self.playing:
            self.playing = self.stats().get("first_seq") is not None
        return self.playing

    def find_output(self, pattern: str) -> str | None:
        """The first line of its output so far that holds `pattern`."""
        text = self.out_path.read_text(errors="replace") + self.log_path.read_text(errors="replace")
        return next((line for line in text.splitlines() if pattern in line), None)

    def wait_for_output(self, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if line := self.find_output(pattern):
                return line
            if not self.running:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: no {pattern!r} in its output:\n{self.tail()}")

    def cpu_ticks(self) -> int | None:
        try:
            fields = Path(f"/proc/{self.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return int(fields[11]) + int(fields[12])  # utime + stime (fields 14, 15)

    def rss_kb(self) -> int | None:
        try:
            for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return None

    def tail(self, lines: int = 5) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def sigkill(self) -> None:
        self.killed = True
        self.popen.kill()

    def sigstop(self) -> None:
        self.stopped = True
        self.popen.send_signal(signal.SIGSTOP)

    def sigcont(self) -> None:
        self.stopped = False
        self.popen.send_signal(signal.SIGCONT)

    def close(self) -> None:
        if self.running:
            self.popen.kill()
        self.popen.wait()


class Room:
    """Starts meshd processes in `workdir`; `close` kills whatever is still running.

    With a proxy, every node that serves children does so behind a front of its own on
    it: the node advertises the front, and `route` tells the proxy the node's real port.
    """

    def __init__(
        self,
        workdir: Path,
        audio: Path,
        proxy: UdpProxy | None = None,
        source: Path | None = None,
        instrumented: bool = True,
    ) -> None:
        self.source = source
        self.instrumented = instrumented
        """Nodes write a trace and their stats every STATS_INTERVAL; else as deployed."""
        self.workdir = workdir
        self.audio = audio
        self.proxy = proxy
        self.nodes: list[Node] = []
        self.tracker = ""
        self.stream = ""
        self.unrouted: dict[Node, Address] = {}  # nodes whose real port the proxy lacks

    def start(self, name: str, args: list[str], *, node: bool = True) -> Node:
        front = None
        if self.proxy is not None and node:
            front = self.proxy.add_front()
            args = [*args, "--listen", "127.0.0.1:0", "--advertise", f"127.0.0.1:{front[1]}"]
        proc = Node(
            name, args, self.workdir, node=node, source=self.source, instrumented=self.instrumented
        )
        self.nodes.append(proc)
        if front is not None:
            self.unrouted[proc] = front
        return proc

    def route(self, timeout: float = 0.0) -> None:
        """Give the proxy the real port of each node started behind it, waiting up to
        `timeout` for all; relays log theirs, the origin only its advertised address, so
        its port comes from /proc. All are polled each round: a node that starts late
        must not hold up the routes of those already serving children."""
        deadline = time.monotonic() + timeout
        while self.proxy is not None:
            for proc, front in list(self.unrouted.items()):
                if proc.name == "origin":
                    port = bound_udp_port(proc.popen.pid)
                elif line := proc.find_output(SERVING):
                    port = parse_address(line.split(SERVING)[1].split()[0])[1]
                else:
                    continue
                self.proxy.set_backend(front, ("127.0.0.1", port))
                del self.unrouted[proc]
            if not self.unrouted:
                return
            if time.monotonic() >= deadline:
                if timeout:
                    raise RuntimeError(f"no {SERVING!r} from {[n.name for n in self.unrouted]}")
                return
            time.sleep(0.05)

    def open(self, origin_capacity: int, tracker_args: tuple[str, ...] = ()) -> Node:
        """Tracker, stream key and origin; returns the origin once it is registered."""
        tracker = self.start(
            "tracker", ["tracker", "--listen", "127.0.0.1:0", *tracker_args], node=False
        )
        self.tracker = tracker.wait_for_output("listening on", 20).split()[-1]
        key = self.workdir / "origin.key"
        self.stream = subprocess.run(
            [*MESHD, "keygen", "--out", str(key)], capture_output=True, text=True, check=True
        ).stdout.strip()
        origin = self.start("origin", [
            "origin", "--tracker", self.tracker, "--key", str(key), "--input", str(self.audio),
            "--capacity", str(origin_capacity),
        ])  # fmt: skip
        origin.wait_for_output("registered", 20)
        self.route()
        return origin

    def listener(self, name: str, max_children: int) -> Node:
        return self.start(name, [
            "listen", "--tracker", self.tracker, "--stream", self.stream,
            "--output", str(self.workdir / f"{name}.opus"), "--max-children", str(max_children),
            "--silence-timeout", str(SILENCE_TIMEOUT_MS),
        ])  # fmt: skip

    def close(self) -> None:
        for proc in self.nodes:
            if proc.running:
                proc.popen.kill()
        for proc in self.nodes:
            proc.close()


@contextmanager
def room(
    workdir: Path,
    audio: Path,
    proxy: UdpProxy | None = None,
    source: Path | None = None,
    instrumented: bool = True,
) -> Iterator[Room]:
    workdir.mkdir()
    running = Room(workdir, audio, proxy, source, instrumented)
    try:
        yield running
    finally:
        running.close()


def wait_until(condition: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


# -- the input --------------------------------------------------------------------------


def make_input(path: Path, seconds: int) -> float:
    """A CBR Ogg Opus tone of `seconds`; returns its audio bitrate (payload bit/s)."""
    subprocess.run(
        ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-f", "lavfi",
         "-i", f"sine=f=440:d={seconds}", "-c:a", "libopus", "-b:a", str(BITRATE),
         "-vbr", "off", "-frame_duration", "20", "-ac", "1", "-f", "ogg", str(path)],
        check=True,
    )  # fmt: skip
    with path.open("rb") as file:
        _, packets = read_ogg_opus(file)
        size = samples = 0
        for packet in packets:
            size += len(packet.data)
            samples += packet.samples
    return size * 8 / (samples / 48_000)


ALARMS = re.compile(
    r"traceback|error|fail|silent|broke|could not|refused|unreachable|slow|drop", re.IGNORECASE
)


def alarming_lines(nodes: list[Node]) -> Counter[str]:
    """Log lines that smell of trouble, counted with ids, addresses and numbers blanked."""
    found: Counter[str] = Counter()
    for node in nodes:
        for line in node.log_path.read_text(errors="replace").splitlines():
            if ALARMS.search(line):
                line = re.sub(r"\b(parent|child|node=) ?[a-z2-7]{8,}\b", r"\1 ID", line)
                found[re.sub(r"\d+(\.\d+)*(:\d+)?", "#", line)] += 1
    return found


# -- one room of N listeners -------------------------------------------------------------


@dataclass
class Snapshot:
    at: float  # unix time
    stats: dict[str, tuple[Stats, float]]  # node name -> (stats, written at)
    ticks: dict[str, int]


def snapshot(nodes: list[Node]) -> Snapshot:
    stats: dict[str, tuple[Stats, float]] = {}
    ticks: dict[str, int] = {}
    for node in nodes:
        if (found := read_stats(node.stats_path)) is not None:
            stats[node.name] = found
        if (count := node.cpu_ticks()) is not None:
            ticks[node.name] = count
    return Snapshot(time.time(), stats, ticks)


def rate(before: Snapshot, after: Snapshot, name: str, key: str) -> float | None:
    """bytes/s of a stats counter between two snapshots, by the stats files' write times."""
    if name not in before.stats or name not in after.stats:
        return None
    (old, old_at), (new, new_at) = before.stats[name], after.stats[name]
    if new_at <= old_at:
        return None
    return float(new[key] - old[key]) / (new_at - old_at)


@dataclass
class KillResult:
    victims: list[str]
    orphans: list[str]
    gaps_ms: list[float]
    orphans_lost: int
    others_stall_ms: list[float]
    others_failovers: int


@dataclass
class ScaleResult:
    size: int
    started: int
    played: int
    launch_seconds: float
    egress: float  # origin bytes_out per second
    central: float  # sum of the listeners' bytes_in per second
    hops_ms: list[float]
    hops_used: int
    hops_excluded: int
    join_ms: list[float]
    max_depth: int
    listener_cpu: float  # mean % of one core per listener in the window
    ended: int  # listeners (not killed) that played the end and exited 0
    failovers: int  # by all listeners, orphans included
    survivors: int
    lost: int  # chunks lost by all survivors
    kill: KillResult | None
    notes: list[str] = field(default_factory=list)


def launch(room: Room, size: int, timeout: float, max_children: int = MAX_CHILDREN) -> list[Node]:
    """Start `size` listeners, at most LAUNCH_RATE/s and MAX_STARTING not yet playing."""
    listeners: list[Node] = []
    starting: list[Node] = []
    deadline = time.monotonic() + timeout
    next_at = time.monotonic()
    while len(listeners) < size and time.monotonic() < deadline:
        starting = [node for node in starting if node.running and not node.is_playing()]
        if len(starting) >= MAX_STARTING:
            time.sleep(0.05)
            continue
        time.sleep(max(0.0, next_at - time.monotonic()))
        node = room.listener(f"listener{len(listeners)}", max_children)
        listeners.append(node)
        starting.append(node)
        room.route()
        next_at = time.monotonic() + 1 / LAUNCH_RATE
    room.route(timeout=20)
    return listeners


def pick_victims(listeners: list[Node], count: int) -> list[Node]:
    """Relays that feed others at different depths, none feeding another victim."""
    stats = {node.name: node.stats() for node in listeners if node.running}
    feeding = [
        node
        for node in listeners
        if stats.get(node.name, {}).get("children", 0) > 0
        and (stats[node.name].get("depth") or 0) >= 1
    ]
    feeding.sort(key=lambda node: -(stats[node.name].get("depth") or 0))
    if not feeding:
        return []
    spread = [feeding[0], feeding[len(feeding) // 2], feeding[-1], *feeding]  # deep, mid, top
    victims: list[Node] = []
    for node in spread:
        ids = {stats[v.name]["node"] for v in victims}
        related = stats[node.name].get("parent") in ids or any(
            stats[v.name].get("parent") == stats[node.name]["node"] for v in victims
        )
        if node not in victims and not related:
            victims.append(node)
        if len(victims) == count:
            break
    return victims


def kill_relays(listeners: list[Node]) -> tuple[list[Node], list[Node]]:
    """SIGKILL a few relays mid-stream; returns them and their children at that moment."""
    victims = pick_victims(listeners, VICTIMS)
    ids = {victim.stats()["node"] for victim in victims}
    orphans = [
        node
        for node in listeners
        if node not in victims and node.running and node.stats().get("parent") in ids
    ]
    for victim in victims:
        victim.sigkill()
    log(f"SIGKILLed {len(victims)} relays feeding {len(orphans)} listeners")
    time.sleep(RECOVERY_SECONDS)
    return victims, orphans


def hop_latencies(
    origin: Node, listeners: list[Node], final: dict[str, Stats], window: tuple[float, float]
) -> tuple[list[float], int, int]:
    """ms each hop adds, for chunks its parent got (or the origin sent) within `window`.

    A listener whose parent changed (failover or redirect) is left out: its trace mixes
    parents, and chunks resent on reconnect would count the outage as latency. So is one
    whose own or parent's trace is missing (killed processes lose their buffered trace).
    """
    by_id = {final[origin.name]["node"]: origin} if origin.name in final else {}
    by_id |= {final[node.name]["node"]: node for node in listeners if node.name in final}
    traces: dict[str, dict[int, int]] = {}

    def trace_of(node: Node) -> dict[int, int]:
        if node.name not in traces:
            traces[node.name] = read_trace(node.trace_path)
        return traces[node.name]

    start_us, end_us = window[0] * 1e6, window[1] * 1e6
    samples: list[float] = []
    used = excluded = 0
    for node in listeners:
        stats = final.get(node.name)
        if not stats or stats.get("parent") not in by_id or node.killed:
            continue
        parent = by_id[stats["parent"]]
        mine, theirs = trace_of(node), trace_of(parent)
        if stats.get("parent_switches", 0) > 0 or not mine or not theirs:
            excluded += 1
            continue
        used += 1
        for seq, sent in theirs.items():
            if start_us <= sent <= end_us and seq in mine:
                samples.append((mine[seq] - sent) / 1000)
    return samples, used, excluded


def run_size(workdir: Path, audio: Path, size: int) -> ScaleResult:
    log(f"N={size}: starting tracker, origin and {size} listeners")
    with room(workdir, audio) as r:
        origin = r.open(ORIGIN_CAPACITY)
        began = time.monotonic()
        listeners = launch(r, size, timeout=max(60.0, size * 0.6))
        wait_until(lambda: all(n.is_playing() for n in listeners if n.running), 30)
        launch_seconds = time.monotonic() - began
        played = sum(node.is_playing() for node in listeners)
        log(f"N={size}: {played}/{len(listeners)} playing after {launch_seconds:.1f} s")

        time.sleep(1.0 + STATS_INTERVAL)  # past everyone's first second, fresh stats files
        load = os.getloadavg()[0]
        before = snapshot([origin, *listeners])
        time.sleep(WINDOW_SECONDS)
        after = snapshot([origin, *listeners])
        at_kill = {node.name: node.stats() for node in listeners}

        kill = None
        victims: list[Node] = []
        orphans: list[Node] = []
        if size >= KILL_FROM_SIZE:
            victims, orphans = kill_relays(listeners)

        log(f"N={size}: ending the stream")
        origin.popen.send_signal(signal.SIGINT)
        alive = [node for node in listeners if not node.killed]
        wait_until(lambda: not any(node.running for node in [origin, *alive]), 30, 0.2)
        codes = {node.name: node.popen.poll() for node in alive}
        r.close()
        final = {node.name: node.stats() for node in [origin, *listeners]}

    notes = [f"load average (1 min) at the window: {load:.1f} on {os.cpu_count()} cores"]
    egress = rate(before, after, origin.name, "bytes_out") or math.nan
    central = sum(
        value
        for node in listeners
        if (value := rate(before, after, node.name, "bytes_in")) is not None
    )
    cpu = [
        (after.ticks[node.name] - before.ticks[node.name]) / CLOCK_TICKS / (after.at - before.at)
        for node in listeners
        if node.name in before.ticks and node.name in after.ticks
    ]
    hops, used, excluded = hop_latencies(origin, listeners, final, (before.at, after.at))
    if negative := sum(hop < 0 for hop in hops):
        notes.append(f"{negative} hop samples were negative")
    joins = [s["join_to_audio_ms"] for s in final.values() if s.get("join_to_audio_ms")]
    survivors = [node for node in listeners if not node.killed]
    ended = [n for n in survivors if final[n.name].get("ended") and codes.get(n.name) == 0]
    unfinished = [node for node in survivors if node not in ended]
    if unfinished:
        exits = Counter(codes.get(node.name) for node in unfinished)
        notes.append(
            f"{len(unfinished)} survivors did not play the end and exit 0 (exit codes, None ="
            f" still running when killed: {dict(exits)}), e.g.:"
        )
        notes.extend(f"  {node.name}: {node.tail(1)}" for node in unfinished[:3])
    for line, count in alarming_lines([origin, *listeners]).most_common(6):
        notes.append(f"log x{count}: {line}")
    if played < len(listeners):
        notes.append(f"{len(listeners) - played} listeners never played in the launch phase")
    orphan_names = {node.name for node in orphans}
    if victims:
        others = [n for n in survivors if n.name not in orphan_names]
        kill = KillResult(
            victims=[f"{v.name}(depth {at_kill[v.name].get('depth')}, "
                     f"{at_kill[v.name].get('children')} children)" for v in victims],
            orphans=[node.name for node in orphans],
            gaps_ms=[final[node.name].get("stall_ms", math.nan) for node in orphans],
            orphans_lost=sum(final[node.name].get("lost", 0) for node in orphans),
            others_stall_ms=[final[node.name].get("stall_ms", 0.0) for node in others],
            others_failovers=sum(final[node.name].get("failovers", 0) for node in others),
        )  # fmt: skip
    return ScaleResult(
        size=size,
        started=len(listeners),
        played=played,
        launch_seconds=launch_seconds,
        egress=egress,
        central=central,
        hops_ms=hops,
        hops_used=used,
        hops_excluded=excluded,
        join_ms=joins,
        max_depth=max((s.get("depth") or 0 for s in at_kill.values()), default=0),
        listener_cpu=100 * statistics.fmean(cpu) if cpu else math.nan,
        ended=len(ended),
        failovers=sum(final[node.name].get("failovers", 0) for node in listeners),
        survivors=len(survivors),
        lost=sum(final[node.name].get("lost", 0) for node in survivors),
        kill=kill,
        notes=notes,
    )


# -- relay CPU and memory ------------------------------------------------------------------


@dataclass
class CpuResult:
    children: int
    relay_cpu: float
    relay_rss_mb: float
    leaf_cpu: float
    origin_cpu: float


def run_cpu(workdir: Path, audio: Path, source: Path | None = None) -> CpuResult:
    """origin (capacity 1) -> relay -> 4 leaves; the relay's CPU and RSS in steady state.

    The relay declares one slot more than it will use: the tracker keeps a tree's last
    free slot for a relay, so a fifth slot is what lets the fourth leaf in. The tracker
    takes capacity as declared (--initial-capacity 0): a fresh relay would otherwise have
    only 4 slots, the last kept for a relay, and the fourth leaf would never get in.

    The nodes run as a listener runs them: no trace, and the stats file at the default
    interval (5 s). The trace and 2 stats updates a second that the other runs need cost
    a leaf about a fifth of its CPU and a relay about a tenth: the bench's cost, not the
    listener's.
    """
    log(f"relay CPU: origin -> relay -> 4 leaves ({source or 'this tree'})")
    with room(workdir, audio, source=source, instrumented=False) as r:
        origin = r.open(1, ("--initial-capacity", "0"))
        relay = r.listener("relay", MAX_CHILDREN + 1)
        if not wait_until(relay.is_playing, 20):
            raise RuntimeError(f"the relay does not play:\n{relay.tail()}")
        leaves = [r.listener(f"leaf{i}", 0) for i in range(MAX_CHILDREN)]
        if not wait_until(lambda: all(leaf.is_playing() for leaf in leaves), 30):
            raise RuntimeError("not every leaf plays")
        wait_until(lambda: relay.stats().get("children") == MAX_CHILDREN, 12)
        time.sleep(2.0)
        watched = [relay, origin, *leaves]
        first = snapshot(watched)
        rss: list[int] = []
        while time.time() - first.at < CPU_SECONDS:
            time.sleep(1.0)
            rss.append(relay.rss_kb() or 0)
        last = snapshot(watched)
        children = relay.stats().get("children", 0)
        origin.popen.send_signal(signal.SIGINT)
        wait_until(lambda: not any(node.running for node in watched), 20, 0.2)

    def cpu(node: Node) -> float:
        ticks = last.ticks[node.name] - first.ticks[node.name]
        return 100 * ticks / CLOCK_TICKS / (last.at - first.at)

    return CpuResult(
        children=children,
        relay_cpu=cpu(relay),
        relay_rss_mb=max(rss) / 1024,
        leaf_cpu=statistics.fmean(cpu(leaf) for leaf in leaves),
        origin_cpu=cpu(origin),
    )


# -- fault scenarios ------------------------------------------------------------------------


FAULT_CAPACITY = 2  # origin --capacity and --max-children: issue 8's room
FAULT_SETTLE = 3.0  # seconds from the last listener playing to the fault
KILL_FRACTION = 0.4
STOP_SECONDS = 5.0
HEAL_TIMEOUT = 20.0  # seconds after the fault to wait for every survivor's path
AFTER_HEAL = 3.0  # seconds of stream after healing, before the bench ends it
LOSS_SECONDS = 15.0  # how long the loss scenario streams after everyone plays
SCENARIOS = ("origin-children", "40%-relays", "parent+backup", "sigstop-5s", "loss")


@dataclass
class FaultResult:
    scenario: str
    fault: str  # what was done
    affected: list[str]  # survivors below the fault (everyone, for loss)
    gaps_ms: list[float]  # affected listeners' longest stall; inf if they never ended
    lost: int  # chunks lost by all survivors
    ended: int  # survivors that played END and exited 0
    survivors: int
    heal_s: float | None  # None: not healed within HEAL_TIMEOUT; nan: not measured
    by_path: bool  # healing judged from stats "path" (else from "parent" fields)
    notes: list[str] = field(default_factory=list)


def below(stats: dict[str, Stats], roots: set[str]) -> set[str]:
    """Nodes (ids) whose parent chain, in `stats` by id, runs through one of `roots`."""
    found = set()
    for node in stats:
        chain = [node]
        while (parent := stats.get(chain[-1], {}).get("parent")) in stats and parent not in chain:
            if parent in roots:
                found.add(node)
                break
            chain.append(parent)
    return found


def heal(r: Room, listeners: list[Node], started: float) -> tuple[float | None, bool, list[str]]:
    """Seconds from `started` until every running listener is on a complete, loop-free
    path from the origin through running nodes, by their stats files (a stopped node is
    not running: it is SIGCONTed STOP_SECONDS after `started`); None if that does not
    happen within HEAL_TIMEOUT. Also whether the stats had "path" (else healing is judged
    by following "parent" fields), and what was still wrong at the last look."""
    by_path = False
    problems: list[str] = []
    while (now := time.monotonic()) < started + HEAL_TIMEOUT:
        if now >= started + STOP_SECONDS:
            for node in listeners:
                if node.stopped:
                    node.sigcont()
        present = [n for n in listeners if n.running and not (n.killed or n.stopped)]
        found = {node.name: node.stats() for node in present}
        stats = scenarios.by_id(list(found.values()))
        names = {s["node"]: name for name, s in found.items() if "node" in s}
        by_path = by_path or any("path" in s for s in stats.values())
        alive = {*stats, r.stream}
        problems = [
            f"{names[n]}: {problem}"
            for n in stats
            if (problem := scenarios.path_problem(n, stats, r.stream, alive, names))
        ]
        if not problems:
            return now - started, by_path, []
        time.sleep(0.1)
    return None, by_path, problems


def choose(scenario: str, before: list[Stats], stream: str, rng: random.Random) -> list[str]:
    """The node ids the scenario kills (or, for sigstop-5s, stops)."""
    if scenario == "origin-children":
        return scenarios.origin_children(before, stream)
    if scenario == "40%-relays":
        return scenarios.random_relays(before, KILL_FRACTION, rng)
    if scenario == "parent+backup":
        chosen = scenarios.parent_and_first_backup(before)
        if chosen is None:
            raise RuntimeError("no listener has listeners as parent and first backup")
        return list(chosen[1:])
    if scenario == "sigstop-5s":
        relay = scenarios.mid_tree_relay(before)
        if relay is None:
            raise RuntimeError("no relay between two listeners")
        return [relay]
    return []  # loss: the proxy does the damage


def run_fault(
    workdir: Path, audio: Path, size: int, scenario: str, loss: float, seed: int
) -> FaultResult:
    log(f"{scenario}: starting a room of {size} listeners")
    proxy = UdpProxy(loss=loss, seed=seed).start() if scenario == "loss" else None
    try:
        with room(workdir, audio, proxy) as r:
            origin = r.open(FAULT_CAPACITY)
            listeners = launch(r, size, max(60.0, size * 0.6), max_children=FAULT_CAPACITY)
            if not wait_until(lambda: all(node.is_playing() for node in listeners), 30):
                raise RuntimeError(f"{scenario}: not every listener plays")
            time.sleep(FAULT_SETTLE)
            before = {node.name: node.stats() for node in listeners}
            targets = choose(scenario, list(before.values()), r.stream, random.Random(seed))
            hit = [node for node in listeners if before[node.name].get("node") in targets]

            started = time.monotonic()
            for node in hit:
                if scenario == "sigstop-5s":
                    node.sigstop()
                else:
                    node.sigkill()
            heal_s: float | None = math.nan
            by_path = False
            unhealed: list[str] = []
            if scenario == "loss":
                time.sleep(LOSS_SECONDS)
            else:
                heal_s, by_path, unhealed = heal(r, listeners, started)
                time.sleep(max(0.0, started + STOP_SECONDS - time.monotonic()))
                for node in hit:
                    if node.stopped:  # healed before its time was up
                        node.sigcont()
                time.sleep(AFTER_HEAL)

            log(f"{scenario}: ending the stream")
            origin.popen.send_signal(signal.SIGINT)
            survivors = [node for node in listeners if not node.killed]
            wait_until(lambda: not any(node.running for node in [origin, *survivors]), 30, 0.2)
            codes = {node.name: node.popen.poll() for node in survivors}
            r.close()
            final = {node.name: node.stats() for node in listeners}
    finally:
        if proxy is not None:
            proxy.stop()

    ended = [n for n in survivors if final[n.name].get("ended") and codes[n.name] == 0]
    by_id = scenarios.by_id(list(before.values()))
    affected_ids = below(by_id, set(targets)) if targets else set(by_id)
    affected = [node for node in survivors if before[node.name].get("node") in affected_ids]
    verb = "SIGSTOP" if scenario == "sigstop-5s" else "SIGKILL"
    notes = [f"proxy: {proxy.summary()}"] if proxy is not None else []
    if unhealed:
        notes.append(f"not healed after {HEAL_TIMEOUT:g} s, e.g. {'; '.join(unhealed[:3])}")
    for node in [node for node in survivors if node not in ended][:3]:
        notes.append(f"{node.name} did not end (exit {codes[node.name]}): {node.tail(1)}")
    return FaultResult(
        scenario=scenario,
        fault=f"{loss:.0%} loss" if proxy else f"{verb} {', '.join(n.name for n in hit)}",
        affected=[node.name for node in affected],
        # A listener that never played END has a gap that never closed.
        gaps_ms=[
            final[n.name].get("stall_ms", math.nan) if n in ended else math.inf for n in affected
        ],
        lost=sum(final[node.name].get("lost", 0) for node in survivors),
        ended=len(ended),
        survivors=len(survivors),
        heal_s=heal_s,
        by_path=by_path,
        notes=notes,
    )


# -- the report ----------------------------------------------------------------------------


def ms(values: list[float], q: float) -> str:
    value = percentile(values, q)
    return "-" if math.isnan(value) else f"{value:.1f}"


def checkout(workdir: Path, ref: str) -> Path:
    """meshd and protocol as they are at git `ref`, to run today's code beside this tree's."""
    root = Path(__file__).resolve().parents[1]
    target = workdir / "baseline"
    target.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", ref, "meshd", "protocol"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def report_cpu(label: str, cpu: CpuResult) -> None:
    print(
        f"relay at {BITRATE // 1000} kbps with {cpu.children} children ({label}):"
        f" CPU {cpu.relay_cpu:.2f}% of one core (budget {CPU_BUDGET_PERCENT:g}%),"
        f" RSS {cpu.relay_rss_mb:.1f} MB (budget {RSS_BUDGET_MB:g} MB);"
        f" a leaf {cpu.leaf_cpu:.2f}% (budget {LEAF_BUDGET_PERCENT:g}%),"
        f" the origin {cpu.origin_cpu:.2f}%"
    )


def report(results: list[ScaleResult], cpu: CpuResult | None, bitrate: float) -> None:
    budget = ORIGIN_CAPACITY * bitrate / 8 * EGRESS_SLACK
    print(f"\ninput: {bitrate / 1000:.1f} kbit/s Opus payload ({BITRATE // 1000} kbps CBR tone)")
    print(
        f"origin egress budget: capacity {ORIGIN_CAPACITY} x {bitrate / 8000:.2f} kB/s"
        f" x {EGRESS_SLACK} = {budget / 1000:.1f} kB/s"
    )
    print(
        f"budgets: hop p50 <= {HOP_BUDGET_MS[0]:g} ms, p99 <= {HOP_BUDGET_MS[1]:g} ms;"
        f" join p50 <= {JOIN_BUDGET_MS:g} ms; gap p99 <= {GAP_BUDGET_MS:g} ms, 0 lost;"
        f" relay <= {CPU_BUDGET_PERCENT:g}% CPU, <= {RSS_BUDGET_MB:g} MB RSS\n"
    )
    header = (
        f"{'N':>4} {'played':>7} {'origin kB/s':>11} {'central kB/s':>12}"
        f" {'hop p50/p99 ms':>15} {'hops':>8} {'join p50/p99 ms':>16} {'depth':>5}"
        f" {'cpu%/node':>9} {'ended':>7} {'lost':>4} {'failovers':>9}"
    )
    print(header)
    print("-" * len(header))
    for res in results:
        print(
            f"{res.size:>4} {f'{res.played}/{res.started}':>7} {res.egress / 1000:>11.1f}"
            f" {res.central / 1000:>12.1f} {f'{ms(res.hops_ms, 50)}/{ms(res.hops_ms, 99)}':>15}"
            f" {f'{res.hops_used}/{res.hops_used + res.hops_excluded}':>8}"
            f" {f'{ms(res.join_ms, 50)}/{ms(res.join_ms, 99)}':>16} {res.max_depth:>5}"
            f" {res.listener_cpu:>9.1f} {f'{res.ended}/{res.survivors}':>7} {res.lost:>4}"
            f" {res.failovers:>9}"
        )
    egresses = [res.egress for res in results if not math.isnan(res.egress)]
    if egresses:
        verdict = "within" if max(egresses) <= budget else "OVER"
        print(
            f"origin egress across N: {min(egresses) / 1000:.1f}..{max(egresses) / 1000:.1f}"
            f" kB/s (max/min {max(egresses) / min(egresses):.2f}), {verdict} budget"
        )
    print(
        "(played: listeners playing after the launch; depth: the deepest listener; cpu%/node:"
        " a listener's mean CPU in the window; ended: survivors that played END and exited 0;"
        " lost: chunks lost by survivors; failovers: parent changes forced by a silent or"
        " failed parent, all listeners.)"
    )
    print(
        "(hops: listeners used/with a parent; those whose parent changed are left out."
        " Hop samples: chunks the parent got in the steady-state window, which starts"
        " >= 1 s after the last listener began playing and ends before any kill.)"
    )

    killed = [res for res in results if res.kill is not None]
    if killed:
        print(
            f"\n{'N':>4} {'killed':>6} {'orphans':>7} {'gap p50/p99/max ms':>20}"
            f" {'orphans lost':>12} {'others stall p99/max ms':>23}"
            f" {'others failovers':>16}"
        )
        for res in killed:
            k = res.kill
            assert k is not None
            gap = f"{ms(k.gaps_ms, 50)}/{ms(k.gaps_ms, 99)}/{ms(k.gaps_ms, 100)}"
            others = f"{ms(k.others_stall_ms, 99)}/{ms(k.others_stall_ms, 100)}"
            print(
                f"{res.size:>4} {len(k.victims):>6} {len(k.orphans):>7} {gap:>20}"
                f" {k.orphans_lost:>12} {others:>23} {k.others_failovers:>16}"
            )
        for res in killed:
            assert res.kill is not None
            print(f"  N={res.size} killed: {', '.join(res.kill.victims)}")
        print(
            "(gap: the orphans' stall_ms, the longest time playback fell behind real time;"
            " 'others': survivors that were not orphaned, for comparison)"
        )

    if cpu is not None:
        print()
        report_cpu("this tree", cpu)


def report_faults(results: list[FaultResult], size: int, bitrate: float) -> None:
    print(
        f"\ninput: {bitrate / 1000:.1f} kbit/s Opus payload ({BITRATE // 1000} kbps CBR tone);"
        f" {size} listeners, origin --capacity {FAULT_CAPACITY},"
        f" --max-children {FAULT_CAPACITY}, --silence-timeout {SILENCE_TIMEOUT_MS}"
    )
    print(f"budgets: gap p99 <= {GAP_BUDGET_MS:g} ms, 0 lost (and every survivor ends)\n")
    header = (
        f"{'scenario':<16} {'affected':>8} {'gap p50/p99 ms':>16} {'lost':>4} {'ended':>7}"
        f" {'heal s':>6}  budget"
    )
    print(header)
    print("-" * len(header))
    for res in results:
        gap = f"{ms(res.gaps_ms, 50)}/{ms(res.gaps_ms, 99)}"
        heal = "never" if res.heal_s is None else ms([res.heal_s], 50)  # "-": not measured
        within = (
            not percentile(res.gaps_ms, 99) > GAP_BUDGET_MS  # nan: nobody was affected
            and res.lost == 0
            and res.ended == res.survivors
        )
        print(
            f"{res.scenario:<16} {len(res.affected):>8} {gap:>16} {res.lost:>4}"
            f" {f'{res.ended}/{res.survivors}':>7} {heal:>6}  {'within' if within else 'OVER'}"
        )
    for res in results:
        print(f"  {res.scenario}: {res.fault}")
    by_path = any(res.by_path for res in results)
    print(
        "(affected: survivors below the fault when it struck, everyone for loss; gap: their"
        " stall_ms, the longest time playback fell behind real time, inf if they never"
        " played END; lost: chunks lost by all survivors; ended: survivors that played END"
        " and exited 0; heal: seconds from the fault until every running listener was on a"
        " complete, loop-free path from the origin through running nodes, by stats files"
        f" written every {STATS_INTERVAL:g} s; never: not within {HEAL_TIMEOUT:g} s;"
        " -: not measured)"
    )
    print(
        "(paths from the stats 'path' field)"
        if by_path
        else "(the stats have no 'path' field: paths were found by following 'parent' fields)"
    )
    notes = [f"{res.scenario}: {note}" for res in results for note in res.notes]
    if notes:
        print("\nnotes:")
        for note in notes:
            print(f"  {note}")


def on_sigterm(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,50,100,200", help="listener counts")
    parser.add_argument("--quick", action="store_true", help="only N = 10 and 50")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, traces)")
    parser.add_argument("--no-cpu", action="store_true", help="skip the relay CPU run")
    parser.add_argument("--cpu-only", action="store_true", help="only the relay CPU run")
    parser.add_argument(
        "--baseline", metavar="REF", help="relay CPU of this git ref too (today's code)"
    )
    parser.add_argument(
        "--faults", action="store_true", help="run the five fault scenarios instead"
    )
    parser.add_argument(
        "--listeners", type=int, default=20, help="listeners per fault room (default 20)"
    )
    parser.add_argument(
        "--loss", type=float, default=0.03, help="the loss scenario's rate (default 0.03)"
    )
    parser.add_argument("--seed", type=int, default=8, help="for the victims and the losses")
    args = parser.parse_args()
    sizes = [10, 50] if args.quick else [int(size) for size in args.sizes.split(",")]
    signal.signal(signal.SIGTERM, on_sigterm)
    print("command:", shlex.join([sys.executable, *sys.argv]), flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="bench_node_"))
    started = time.monotonic()
    try:
        audio = workdir / "input.opus"
        bitrate = make_input(audio, INPUT_SECONDS)
        if args.faults:
            faults = [
                run_fault(workdir / f"fault{i}", audio, args.listeners, name, args.loss, args.seed)
                for i, name in enumerate(SCENARIOS)
            ]
            report_faults(faults, args.listeners, bitrate)
        else:
            sizes = [] if args.cpu_only else sizes
            results = [run_size(workdir / f"n{size}", audio, size) for size in sizes]
            before = None
            if args.baseline and not args.no_cpu:
                source = checkout(workdir, args.baseline)
                before = run_cpu(workdir / "cpu-baseline", audio, source)
            cpu = None if args.no_cpu else run_cpu(workdir / "cpu", audio)
            if results:
                report(results, cpu, bitrate)
            elif cpu is not None:
                print()
                report_cpu("this tree", cpu)
            if before is not None:
                report_cpu(f"{args.baseline}, today's code, same run", before)
        print(f"\ntotal {time.monotonic() - started:.0f} s")
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
