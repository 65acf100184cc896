"""Faults with real processes: relays killed or stopped mid-stream, the tracker restarted."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from tests.procs import Cluster, Proc, cluster, wait_until
from tests.room import DATA, assert_gap_free_tail, packets_of

LONG_TONE = DATA / "tone12.opus"  # 12 s: room to join, break things, and recover


def start_room(room: Cluster, listeners: int, *tracker_args: str) -> tuple[Proc, str, list[Proc]]:
    _, tracker = room.tracker(*tracker_args)
    key, stream = room.keygen("origin")
    origin = room.start(
        "origin", "origin", "--tracker", tracker, "--key", str(key),
        "--input", str(LONG_TONE), "--capacity", "2",
    )  # fmt: skip
    origin.wait_for_output("registered")
    procs = [
        room.listener(f"listener{i}", tracker, stream, "--max-children", "2",
                      "--silence-timeout", "600")
        for i in range(listeners)
    ]  # fmt: skip
    wait_until(lambda: all(room.stats(f"listener{i}").get("first_seq") is not None
                           for i in range(listeners)), "every listener plays")  # fmt: skip
    return origin, tracker, procs


def relays_with_children(room: Cluster, count: int) -> list[int]:
    """Indexes of listeners that feed others, deepest first (mid-tree, not the leaves)."""
    stats = {i: room.stats(f"listener{i}") for i in range(count)}
    feeding = [i for i, s in stats.items() if s.get("children", 0) > 0]
    return sorted(feeding, key=lambda i: -(stats[i].get("depth") or 0))


def check_complete(room: Cluster, indexes: list[int]) -> list[dict[str, Any]]:
    source = packets_of(LONG_TONE)
    results = []
    for index in indexes:
        stats = room.stats(f"listener{index}")
        assert stats.get("ended"), f"listener{index} did not reach the end"
        assert stats["lost"] == 0, f"listener{index} lost {stats['lost']} chunks"
        assert_gap_free_tail(room.workdir / f"listener{index}.opus", source)
        results.append(stats)
    return results


def test_sigkill_of_two_mid_tree_relays_costs_no_listener_a_packet(tmp_path: Path) -> None:
    with cluster(tmp_path) as room:
        origin, _, procs = start_room(room, 10)
        wait_until(lambda: len(relays_with_children(room, 10)) >= 2, "two relays feed others")
        victims = relays_with_children(room, 10)[:2]
        for victim in victims:
            procs[victim].signal(signal.SIGKILL)
        survivors = [i for i in range(10) if i not in victims]
        for index in survivors:
            assert procs[index].wait(40) == 0, procs[index].tail()
        assert origin.wait(30) == 0, origin.tail()
        results = check_complete(room, survivors)
    assert sum(stats["failovers"] for stats in results) >= 1  # someone really lost a parent


def test_sigterm_moves_children_first_without_a_failover(tmp_path: Path) -> None:
    with cluster(tmp_path) as room:
        origin, _, procs = start_room(room, 6)
        wait_until(lambda: relays_with_children(room, 6), "a relay feeds others")
        leaver = relays_with_children(room, 6)[0]
        leaver_id = room.stats(f"listener{leaver}")["node"]
        children = [i for i in range(6) if room.stats(f"listener{i}").get("parent") == leaver_id]
        assert children
        procs[leaver].signal(signal.SIGTERM)
        assert procs[leaver].wait(15) == 0, procs[leaver].tail()
        for index in range(6):
            if index != leaver:
                assert procs[index].wait(40) == 0, procs[index].tail()
        assert origin.wait(30) == 0
        results = check_complete(room, children)
    for stats in results:
        assert stats["failovers"] == 0, "a child had to detect a dead parent"
        assert stats["parent_switches"] >= 1 and stats["parent"] != leaver_id


def restart_tracker_then_join_two(room: Cluster, *tracker_args: str) -> tuple[Proc, Proc]:
    """Four listeners play; the tracker is SIGKILLed and started again on its address
    (it knows nothing), two newcomers join; all six must play to the end, complete.
    Returns the origin and the restarted tracker."""
    origin, tracker, procs = start_room(room, 4, *tracker_args)
    first_tracker = room.procs[0]
    first_tracker.signal(signal.SIGKILL)
    first_tracker.wait(10)
    again = room.start("tracker-again", "tracker", "--listen", tracker, *tracker_args)
    again.wait_for_output("listening on")
    stream = room.stats("listener0")["stream"]
    late = [room.listener(f"listener{i}", tracker, stream) for i in (4, 5)]
    for proc in procs + late:
        assert proc.wait(40) == 0, proc.tail()
    assert origin.wait(30) == 0
    check_complete(room, list(range(6)))
    return origin, again


def test_tracker_restart_keeps_audio_flowing_and_joins_work_again(tmp_path: Path) -> None:
    with cluster(tmp_path) as room:
        _, again = restart_tracker_then_join_two(room, "--refresh", "1")
        assert "register stream=" in again.log.read_text()


def test_a_restarted_tracker_knows_the_tree_again_within_seconds_at_the_default_refresh(
    tmp_path: Path,
) -> None:
    """Listeners REFRESH every few minutes by default. A restarted tracker used to know
    only the origin until then: it seated newcomers under the origin (full) and under
    each other, and none of them got a chunk for minutes. The origin notices (TREE) and
    its chunks ask every node to REFRESH (ANNOUNCE), parents first."""
    with cluster(tmp_path) as room:
        origin, _ = restart_tracker_then_join_two(room)
        assert "lost the stream's tree" in origin.log.read_text()
