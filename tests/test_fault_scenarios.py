"""Issue 8's fault scenarios with real `meshd` processes, through the public CLI.

Each test builds the issue's room, `meshd origin --capacity 2` and 14 `meshd listen
--max-children 2` started 0.15 s apart, but on the bundled 24 s sample rather than the
issue's 12 s tone: starting 14 Pythons on 2 busy cores can take 10 s, and a fault needs
stream left after it to show recovery. About 3 s after the last listener plays it breaks
something; then every surviving listener's output must be a gap-free tail of the input
with nothing lost, and every process still there (the origin too) must exit 0 at the end
of the stream.

The loss scenario runs at MESHD_TEST_LOSS (default 0.03, for CI); by hand, e.g.
`MESHD_TEST_LOSS=0.10 .venv/bin/python -m pytest tests/test_fault_scenarios.py -k loss`.
"""

from __future__ import annotations

import math
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import meshd
from tests.procs import Cluster, Proc, cluster, wait_until
from tests.room import packets_of
from tests.scenarios import (
    Stats,
    by_id,
    mid_tree_relay,
    origin_children,
    parent_and_first_backup,
    path_problem,
    random_relays,
)
from tests.udp_proxy import DIRECTIONS, Address, UdpProxy, bound_udp_port

INPUT = Path(meshd.__file__).parent / "data" / "sample.opus"
INPUT_SECONDS = 24.0
MIN_LEFT = 5.0  # seconds of stream that must be left at the fault
LISTENERS = 14
STAGGER = 0.15  # seconds between two listeners' starts
SETTLE = 3.0  # seconds from the last listener playing to the fault
ORIGIN_EXIT = 30.0  # seconds from the fault: the rest of the stream, and the grace
SURVIVOR_EXIT = 20.0  # seconds from the origin's exit
LOSS = float(os.environ.get("MESHD_TEST_LOSS", "0.03"))
SERVING = r"serving children on ([\d.]+):(\d+) "
STATS_LINE = r": stats parent="  # logged every --stats-interval


@dataclass
class FaultRoom:
    cluster: Cluster
    origin: Proc
    stream: str
    listeners: list[Proc]
    proxy: UdpProxy | None

    def snapshot(self) -> list[Stats]:
        return [self.cluster.stats(proc.name) for proc in self.listeners]

    def proc(self, node: str) -> Proc:
        found = self.cluster.by_node(node)
        assert found is not None, f"no process has node id {node}"
        return found


def open_fault_room(room: Cluster, proxy: UdpProxy | None = None) -> FaultRoom:
    """Tracker, origin and staggered listeners, all playing for SETTLE seconds. With a
    proxy, every node serves children behind a front of its own."""
    _, tracker = room.tracker()
    key, stream = room.keygen("origin")
    fronts: dict[Proc, Address] = {}

    def start(name: str, *args: str) -> Proc:
        if proxy is None:
            return room.start(name, *args)
        front = proxy.add_front()
        proc = room.start(
            name, *args, "--listen", "127.0.0.1:0", "--advertise", f"127.0.0.1:{front[1]}"
        )
        fronts[proc] = front
        return proc

    origin = start(
        "origin", "origin", "--tracker", tracker, "--key", str(key),
        "--input", str(INPUT), "--capacity", "2",
    )  # fmt: skip
    streaming_since = time.monotonic()
    origin.wait_for_output("registered")
    listeners = []
    for index in range(LISTENERS):
        name = f"listener{index}"
        listeners.append(start(name, *room.listener_args(name, tracker, stream),
                               "--max-children", "2"))  # fmt: skip
        if proxy is not None:
            _route(proxy, fronts, origin)
        time.sleep(STAGGER)
    if proxy is not None:
        _route(proxy, fronts, origin, timeout=20.0)

    names = [proc.name for proc in listeners]

    def playing() -> bool:
        return all(room.stats(name).get("first_seq") is not None for name in names)

    try:
        wait_until(playing, "every listener plays")
    except AssertionError:
        silent = [p for p in listeners if room.stats(p.name).get("first_seq") is None]
        tails = "\n".join(f"--- {p.name}\n{p.tail(8)}" for p in silent)
        raise AssertionError(f"{len(silent)} listeners never played:\n{tails}") from None
    time.sleep(SETTLE)
    left = INPUT_SECONDS - (time.monotonic() - streaming_since)
    assert left >= MIN_LEFT, f"the room took so long to start that only {left:.1f} s are left"
    return FaultRoom(room, origin, stream, listeners, proxy)


def _route(
    proxy: UdpProxy, fronts: dict[Proc, Address], origin: Proc, timeout: float = 0.0
) -> None:
    """Tell the proxy where the nodes behind its fronts really listen (and forget them),
    waiting up to `timeout` for all. Relays log it; the origin logs only its advertised
    address, so its port comes from /proc. All are polled each round: a node that starts
    late must not hold up the routes of those already serving children."""
    deadline = time.monotonic() + timeout
    while True:
        for proc, front in list(fronts.items()):
            if proc is origin:
                port = bound_udp_port(proc.popen.pid)
            elif match := proc.find_output(SERVING):
                port = int(match.group(2))
            else:
                continue
            proxy.set_backend(front, ("127.0.0.1", port))
            del fronts[proc]
        if not fronts or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    assert not timeout or not fronts, f"no {SERVING!r} from {[p.name for p in fronts]}"


def finish(
    room: FaultRoom, survivors: list[Proc], before: list[Stats], what: str, *, failover: bool
) -> None:
    """Every survivor and the origin exit 0 at the end of the stream; every survivor's
    output is a gap-free tail of the input and it lost nothing. On failure, says for
    each survivor what went wrong, where it is in the tree, and how its log ends.
    With `failover`, some survivor must also have had to replace a silent parent (so
    the fault really cut someone off)."""
    origin_code = room.origin.exit_code(time.monotonic() + ORIGIN_EXIT)
    deadline = time.monotonic() + SURVIVOR_EXIT
    codes = {proc: proc.exit_code(deadline) for proc in survivors}
    source = packets_of(INPUT)
    final = {proc: room.cluster.stats(proc.name) for proc in room.listeners}
    stats_by_id = by_id(list(final.values()))
    names = {s["node"]: proc.name for proc, s in final.items() if "node" in s}
    names[room.stream] = "origin"
    # Where each survivor ended up in the tree: the origin counts, listeners if running.
    alive = {s["node"] for proc, s in final.items() if proc.running and "node" in s}
    alive.add(room.stream)
    earlier = {s["node"]: s for s in before if "node" in s}

    failed: dict[Proc, list[str]] = {}
    for proc in survivors:
        stats, problems = final[proc], []
        if codes[proc] is None:
            problems.append(f"still running {SURVIVOR_EXIT:g} s after the origin exited")
        elif codes[proc] != 0:
            problems.append(f"exit status {codes[proc]}")
        if stats.get("lost"):
            problems.append(f"lost {stats['lost']} chunks")
        if output := _output_problem(room.cluster.workdir / f"{proc.name}.opus", source):
            problems.append(output)
        if problems:
            node = stats.get("node", "")
            gained = stats.get("chunks_in", 0) - earlier.get(node, {}).get("chunks_in", 0)
            tree = path_problem(node, stats_by_id, room.stream, alive, names) or "path ok"
            problems.append(
                f"{gained} chunks since the fault; parent {names.get(stats.get('parent'), '-')}"
                f" ({tree}); played seq {stats.get('first_seq')}..{stats.get('last_seq')},"
                f" ended={stats.get('ended')} lost={stats.get('lost')}"
                f" failovers={stats.get('failovers')}"
                f" stall_ms={stats.get('stall_ms', 0):.0f}"
            )
            failed[proc] = problems
    if origin_code == 0 and not failed:
        failovers = sum(final[p].get("failovers", 0) for p in survivors) - sum(
            earlier.get(final[p].get("node"), {}).get("failovers", 0) for p in survivors
        )
        assert failovers > 0 or not failover, f"{what}: no survivor had to fail over"
        return
    lines = [
        f"{what}: {len(failed)} of {len(survivors)} survivors failed;"
        f" the origin's exit status: {origin_code} (None: still running)"
    ]
    if room.proxy is not None:
        lines.append(f"  proxy: {room.proxy.summary()}")
    lines += [f"  {proc.name}: {'; '.join(problems)}" for proc, problems in failed.items()]
    for proc in [room.origin, room.cluster.procs[0], *list(failed)[:4]]:
        lines.append(f"--- {proc.name} log tail (stats lines left out)")
        lines.append(proc.tail(12, skip=STATS_LINE))
    raise AssertionError("\n".join(lines))


def _output_problem(path: Path, source: list[bytes]) -> str | None:
    try:
        got = packets_of(path)
    except Exception as exc:  # an unreadable output is the finding, not a test error
        return f"unreadable output: {exc!r}"
    if not got:
        return "no audio in its output"
    if got != source[-len(got) :]:
        return f"output ({len(got)} packets) is not a gap-free tail of the input"
    return None


def kill(room: FaultRoom, nodes: list[str]) -> list[Proc]:
    """SIGKILL these nodes at the same moment; returns the listeners left."""
    victims = [room.proc(node) for node in nodes]
    for victim in victims:
        victim.signal(signal.SIGKILL)
    return [proc for proc in room.listeners if proc not in victims]


@pytest.mark.timeout(150)
def test_sigkill_of_both_children_of_the_origin(tmp_path: Path) -> None:
    with cluster(tmp_path) as procs:
        room = open_fault_room(procs)
        before = room.snapshot()
        victims = origin_children(before, room.stream)
        assert len(victims) == 2, f"the origin feeds {len(victims)} listeners, not 2"
        survivors = kill(room, victims)
        finish(
            room, survivors, before, "after SIGKILL of both of the origin's children", failover=True
        )


@pytest.mark.timeout(150)
def test_sigkill_of_forty_percent_of_the_relays(tmp_path: Path) -> None:
    with cluster(tmp_path) as procs:
        room = open_fault_room(procs)
        before = room.snapshot()
        victims = random_relays(before, 0.4, random.Random(8))
        assert victims, "no listener feeds another"
        survivors = kill(room, victims)
        finish(room, survivors, before, f"after SIGKILL of {len(victims)} relays", failover=True)


@pytest.mark.timeout(150)
def test_sigkill_of_a_parent_and_its_childs_first_backup(tmp_path: Path) -> None:
    with cluster(tmp_path) as procs:
        room = open_fault_room(procs)
        before = room.snapshot()
        chosen = parent_and_first_backup(before)
        assert chosen is not None, "no listener has listeners as parent and first backup"
        listener, parent, backup = chosen
        survivors = kill(room, [parent, backup])
        what = (
            f"after SIGKILL of {room.proc(listener).name}'s parent {room.proc(parent).name}"
            f" and first backup {room.proc(backup).name}"
        )
        finish(room, survivors, before, what, failover=True)


@pytest.mark.timeout(150)
def test_sigstop_of_a_mid_tree_relay_for_five_seconds(tmp_path: Path) -> None:
    with cluster(tmp_path) as procs:
        room = open_fault_room(procs)
        before = room.snapshot()
        node = mid_tree_relay(before)
        assert node is not None, "no relay between two listeners"
        relay = room.proc(node)
        relay.pause()
        time.sleep(5.0)
        relay.resume()
        what = f"after SIGSTOP of {relay.name} for 5 s"
        finish(room, room.listeners, before, what, failover=True)


@pytest.mark.timeout(150)
def test_datagram_loss_on_every_link_costs_no_packet(tmp_path: Path) -> None:
    with cluster(tmp_path) as procs, UdpProxy(loss=LOSS, seed=8) as proxy:
        room = open_fault_room(procs, proxy)
        what = f"under {LOSS:.0%} datagram loss"
        finish(room, room.listeners, room.snapshot(), what, failover=False)
        assert proxy.clients >= LISTENERS, "not every listener's parent link was proxied"
    # The proxy draws one number per datagram from its seeded RNG, so its drops over n
    # datagrams are a fixed function of n: with seed 8 the rate over any n >= 300 stays
    # within 2.8 standard deviations of 3 % and of 10 %. 3 of them never trip by chance,
    # and from n = 500 on they exclude no loss at all.
    seen = sum(proxy.forwarded.values()) + sum(proxy.dropped.values())
    assert seen >= 500, f"too little traffic to measure the loss: {proxy.summary()}"
    rate = sum(proxy.dropped.values()) / seen
    assert abs(rate - LOSS) <= 3 * math.sqrt(LOSS * (1 - LOSS) / seen), proxy.summary()
    assert all(proxy.dropped[d] for d in DIRECTIONS), f"a direction lost nothing: {proxy.summary()}"
