"""Origin, relays and tracker in one trio process over loopback QUIC."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import trio

from meshd.node.relay import Relay
from protocol import VerifiedChunk, encode_message
from tests.room import SAMPLE, TONE, assert_gap_free_tail, open_room, packets_of


async def test_thirty_listeners_get_every_packet_from_their_join_on(tmp_path: Path) -> None:
    source = packets_of(TONE)
    with trio.fail_after(40):
        async with open_room(tmp_path) as room:
            for index in range(30):
                await room.add(capacity=0 if index % 5 == 4 else 3)
            await room.wait_all_receiving()
            snapshot = room.tracker.streams[room.origin.stream_id].tree.snapshot()
            assert snapshot.audience == 30 and snapshot.max_depth <= 5
            assert room.origin.stats.children <= 3
            await room.wait_all_ended()
    for index, relay in enumerate(room.relays):
        assert_gap_free_tail(tmp_path / f"listener{index}.opus", source)
        assert relay.stats.lost == 0
    # The origin fed only its 3 children: its egress is 3 copies, not 30. (A copy is what
    # the listener that got the most received: the origin's children get all of it; an
    # average over listeners that joined later would make this depend on the join speed.)
    full_copy = max(relay.stats.bytes_in for relay in room.relays)
    assert room.origin.stats.bytes_out <= 3 * full_copy


class TamperingRelay(Relay):
    """Plays what it gets, but forwards altered audio under the origin's signature."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        forward = self.core.children.forward

        def forward_forged(item: VerifiedChunk, now: float) -> None:
            packets = tuple(packet[:-1] + b"\x00" for packet in item.chunk.packets)
            forged = dataclasses.replace(item.chunk, packets=packets)
            forward(VerifiedChunk(forged, encode_message(forged)), now)

        self.core.children.forward = forward_forged  # type: ignore[method-assign]


async def test_children_of_a_tampering_relay_reject_it_and_still_get_everything(
    tmp_path: Path,
) -> None:
    source = packets_of(TONE)
    with trio.fail_after(40):
        async with open_room(tmp_path, origin_capacity=2) as room:
            evil = await room.add(capacity=3, relay_class=TamperingRelay)
            honest = [await room.add(capacity=3) for _ in range(8)]
            await room.wait_all_ended(honest)
    assert sum(relay.stats.bad_peers for relay in honest) >= 1
    for index, relay in enumerate(room.relays):
        if relay is not evil:
            assert_gap_free_tail(tmp_path / f"listener{index}.opus", source)
            assert relay.stats.lost == 0
            current = relay.core.current
            assert current is None or current.peer.node != evil.node_id


class StepCounter(trio.abc.Instrument):
    """Counts how often each kind of task runs: a busy loop shows up as thousands."""

    def __init__(self) -> None:
        self.steps: dict[str, int] = {}

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[task.name] = self.steps.get(task.name, 0) + 1


async def test_relays_sleep_between_chunks(tmp_path: Path) -> None:
    """A relay wakes for chunks, heartbeats and timers, not in a loop (it must idle)."""
    counter = StepCounter()
    with trio.fail_after(40):
        async with open_room(tmp_path) as room:
            for _ in range(3):
                await room.add(capacity=2)
            await room.wait_all_receiving()
            trio.lowlevel.add_instrument(counter)
            await trio.sleep(2.0)
            trio.lowlevel.remove_instrument(counter)
            await room.wait_all_ended()
    node_tasks = {name: n for name, n in counter.steps.items() if name.startswith("meshd.node")}
    busiest = max(node_tasks.items(), key=lambda item: item[1])
    # Summed over every task of that kind (up to 6 links): chunks, timers and heartbeats
    # make ~150 steps in 2 s; a busy loop makes ~100,000.
    assert busiest[1] < 1000, busiest


async def test_a_tracker_that_lost_the_tree_knows_it_again_within_seconds(tmp_path: Path) -> None:
    """The tracker's state is lost, as by a restart, while the nodes REFRESH only every
    3 minutes: the origin sees the tracker no longer lists its children (TREE), its
    chunks carry ANNOUNCE, and every relay REFRESHes at once. The origin has more slots
    than a TREE_REPORT holds: it asks for at most 256 nodes (more cannot be encoded)."""
    with trio.fail_after(40):
        async with open_room(tmp_path, 300, source=SAMPLE, refresh_s=180) as room:
            for _ in range(4):
                await room.add(capacity=2)
            await room.wait_all_receiving()
            await trio.sleep(5)  # the origin looked after a REGISTER: these are its children
            room.tracker.streams.clear()
            lost = trio.current_time()
            while True:
                state = room.tracker.streams.get(room.origin.stream_id)
                if state is not None and len(state.tree) == 5:
                    break
                await trio.sleep(0.05)
            assert trio.current_time() - lost < 5
            assert all(relay.stats.lost == 0 for relay in room.relays)
            assert set(state.tree.children_of(room.origin.stream_id)) == {
                relay.node_id for relay in room.relays
            }
            room.origin.stop()
            await room.wait_all_ended()
