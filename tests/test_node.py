"""Origin, relays and tracker in one trio process over loopback QUIC."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import trio

from meshd.node.relay import Relay
from protocol import VerifiedChunk, encode_message
from tests.room import TONE, assert_gap_free_tail, open_room, packets_of


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
    # The origin fed only its 3 children: its egress is 3 copies, not 30.
    per_copy = sum(relay.stats.bytes_in for relay in room.relays) / 30
    assert room.origin.stats.bytes_out < 3.5 * per_copy


class TamperingRelay(Relay):
    """Plays what it gets, but forwards altered audio under the origin's signature."""

    def on_chunk(self, item: VerifiedChunk) -> None:
        packets = tuple(packet[:-1] + b"\x00" for packet in item.chunk.packets)
        forged = dataclasses.replace(item.chunk, packets=packets)
        original_forward = self.fanout.forward
        self.fanout.forward = lambda _: original_forward(  # type: ignore[method-assign]
            VerifiedChunk(forged, encode_message(forged))
        )
        try:
            super().on_chunk(item)
        finally:
            self.fanout.forward = original_forward  # type: ignore[method-assign]


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
            assert relay.current is None or relay.current.peer.node != evil.node_id
