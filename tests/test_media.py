"""Media integrity: only the origin's chunks, unaltered, in their place, are accepted."""

from __future__ import annotations

import dataclasses

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import (
    Chunk,
    ChunkRing,
    ChunkSigner,
    ErrorCode,
    Heartbeat,
    ProtocolError,
    ReorderBuffer,
    StreamVerifier,
    encode_message,
    encode_unsigned,
    sign_message,
)

SPAN = 10 * 48_000  # a 10 s ring buffer, in samples
PACKET = b"\xfc" + b"\x55" * 79  # a 20 ms Opus packet at 32 kbps: 80 bytes


@pytest.fixture
def signer() -> ChunkSigner:
    return ChunkSigner(Ed25519PrivateKey.generate())


def test_a_signed_chunk_verifies(signer: ChunkSigner) -> None:
    item = signer.sign([PACKET] * 10, 9600)
    verifier = StreamVerifier(signer.stream_id)
    assert verifier.verify_datagram(item.raw) == item
    assert item.seq == 0 and signer.sign([PACKET], 10560).seq == 1


def _rejected(verifier: StreamVerifier, chunk: Chunk) -> ErrorCode:
    with pytest.raises(ProtocolError) as caught:
        verifier.verify_datagram(encode_message(chunk))
    return caught.value.code


def test_altered_audio_is_rejected(signer: ChunkSigner) -> None:
    chunk = signer.sign([PACKET] * 3, 2880).chunk
    altered = dataclasses.replace(chunk, packets=(PACKET, PACKET, PACKET[:-1] + b"\x00"))
    assert _rejected(StreamVerifier(signer.stream_id), altered) == ErrorCode.BAD_SIGNATURE


def test_reordered_chunk_is_rejected(signer: ChunkSigner) -> None:
    """A relay cannot renumber a chunk to play it in another place."""
    first = signer.sign([PACKET], 960).chunk
    signer.sign([PACKET], 1920)
    moved = dataclasses.replace(first, seq=1)
    assert _rejected(StreamVerifier(signer.stream_id), moved) == ErrorCode.BAD_SIGNATURE


def test_forged_chunk_is_rejected(signer: ChunkSigner) -> None:
    forger = ChunkSigner(Ed25519PrivateKey.generate())
    forged = forger.sign([PACKET], 960).chunk
    assert _rejected(StreamVerifier(signer.stream_id), forged) == ErrorCode.BAD_SIGNATURE


def test_chunk_from_another_stream_is_rejected() -> None:
    """The stream id is signed too, so one stream's chunks cannot be replayed into another."""
    key = Ed25519PrivateKey.generate()
    other = ChunkSigner(Ed25519PrivateKey.generate())
    chunk = sign_message(Chunk(0, 960, 0, (PACKET,)), key, other.stream_id)
    assert _rejected(StreamVerifier(ChunkSigner(key).stream_id), chunk) == ErrorCode.BAD_SIGNATURE


def test_end_flag_cannot_be_forged(signer: ChunkSigner) -> None:
    chunk = signer.sign([PACKET], 960).chunk
    ended = dataclasses.replace(chunk, flags=Chunk.FLAG_END)
    assert _rejected(StreamVerifier(signer.stream_id), ended) == ErrorCode.BAD_SIGNATURE


def test_a_datagram_must_hold_a_chunk(signer: ChunkSigner) -> None:
    with pytest.raises(ProtocolError) as caught:
        StreamVerifier(signer.stream_id).verify_datagram(encode_message(Heartbeat(1)))
    assert caught.value.code == ErrorCode.UNEXPECTED_MESSAGE


def test_replayed_chunks_are_dropped_once_played(signer: ChunkSigner) -> None:
    items = [signer.sign([PACKET], 960 * (n + 1)) for n in range(3)]
    buffer = ReorderBuffer(span_samples=SPAN)
    for item in items:
        assert buffer.add(item, now=0.0)
    assert [i.seq for i in buffer.pop_ready()] == [0, 1, 2]
    assert not buffer.add(items[1], now=0.0)  # replay of an already played chunk
    assert buffer.pop_ready() == []


def test_reorder_buffer_restores_order_and_asks_for_gaps(signer: ChunkSigner) -> None:
    items = [signer.sign([PACKET], 960 * (n + 1)) for n in range(6)]
    buffer = ReorderBuffer(span_samples=SPAN, repair_delay=0.05, repair_timeout=0.5)
    for index in (0, 1, 4, 3):
        buffer.add(items[index], now=1.0)
    assert [i.seq for i in buffer.pop_ready()] == [0, 1]
    assert buffer.get_timer() == pytest.approx(1.05)
    assert buffer.due_repairs(now=1.01) == []  # reordering gets time to settle
    assert buffer.due_repairs(now=1.06) == [2]
    assert buffer.due_repairs(now=1.2) == []
    assert buffer.due_repairs(now=1.6) == [2]  # asked again after the repair timeout
    buffer.add(items[2], now=1.7)
    assert [i.seq for i in buffer.pop_ready()] == [2, 3, 4]
    assert buffer.gaps == 0


def test_heartbeat_reveals_a_lost_tail(signer: ChunkSigner) -> None:
    items = [signer.sign([PACKET], 960 * (n + 1)) for n in range(3)]
    buffer = ReorderBuffer(span_samples=SPAN, repair_delay=0.0)
    buffer.add(items[0], now=0.0)
    buffer.note_latest(2, now=0.0)
    assert buffer.due_repairs(now=0.0) == [1, 2]  # 2 itself may be the lost one


def test_a_heartbeat_that_overtakes_the_lost_chunk_still_gets_it_repaired(
    signer: ChunkSigner,
) -> None:
    """The freeze from the field: chunk 5's datagram is lost, and the heartbeat that names
    5 as the latest arrives before chunk 6. Chunk 5 must still be asked for."""
    items = [signer.sign([PACKET], 9600 * (n + 1)) for n in range(12)]
    buffer = ReorderBuffer(span_samples=SPAN, repair_delay=0.05)
    for item in items[:5]:
        buffer.add(item, now=0.0)
    assert [i.seq for i in buffer.pop_ready()] == [0, 1, 2, 3, 4]
    buffer.note_latest(5, now=0.2)  # HEARTBEAT(latest_seq=5); chunk 5 never came
    for item in items[6:]:
        buffer.add(item, now=0.3)
    assert buffer.pop_ready() == []
    assert buffer.due_repairs(now=0.3) == [5]
    buffer.add(items[5], now=0.4)
    assert [i.seq for i in buffer.pop_ready()] == list(range(5, 12))


def test_missing_answers_never_give_a_gap_up_inside_the_horizon(signer: ChunkSigner) -> None:
    """A parent may not have a chunk *yet*: MISSING costs a retry, not the audio."""
    items = [signer.sign([PACKET], 9600 * (n + 1)) for n in range(60)]
    buffer = ReorderBuffer(span_samples=SPAN, repair_delay=0.0, repair_timeout=0.5)
    buffer.add(items[0], now=0.0)
    buffer.pop_ready()
    for item in items[2:51]:  # 10 s of audio past the gap: a 10 s ring may still hold it
        buffer.add(item, now=0.1)
    assert buffer.pop_ready() == []
    for step in range(1, 20):  # MISSING after MISSING: it is asked for again and again
        assert buffer.due_repairs(now=step * 0.5) == [1]
    assert buffer.lost_count == 0
    buffer.add(items[51], now=10.0)  # now the gap is more than 10 s old: no ring holds it
    assert [i.seq for i in buffer.pop_ready()] == list(range(2, 52))
    assert buffer.lost_count == 1 and buffer.gaps == 0


def test_ring_keeps_the_configured_span(signer: ChunkSigner) -> None:
    ring = ChunkRing(span_samples=48_000)  # one second
    for n in range(30):
        ring.add(signer.sign([PACKET] * 10, 9600 * (n + 1)))  # 200 ms each
    assert ring.latest_seq == 29
    held = [item.seq for item in ring.since(0)]
    assert held == list(range(24, 30))
    assert [item.seq for item in ring.since(None)] == [29]
    assert ring.get(10) is None and ring.get(27) is not None


def test_signature_overhead_at_32_kbps_is_within_budget(signer: ChunkSigner) -> None:
    """200 ms chunks of 80-byte packets: the signature adds 66 of 100 bytes/s overhead."""
    item = signer.sign([PACKET] * 10, 9600)
    signature_bytes = len(item.raw) - len(encode_unsigned(item.chunk))
    assert signature_bytes == 66
    assert signature_bytes * 5 / 4000 <= 0.10


def test_falling_behind_the_window_resyncs_instead_of_stalling(signer: ChunkSigner) -> None:
    """After a very long outage the old gap is unrecoverable: skip it, count it, go on."""
    items = [signer.sign([PACKET], 960 * (n + 1)) for n in range(3)]
    buffer = ReorderBuffer(span_samples=SPAN, window=100)
    buffer.add(items[0], now=0.0)
    assert [i.seq for i in buffer.pop_ready()] == [0]
    signer.next_seq = 500
    late = [signer.sign([PACKET], 960 * (n + 600)) for n in range(3)]
    assert all(buffer.add(item, now=1.0) for item in late)
    assert [i.seq for i in buffer.pop_ready()] == [500, 501, 502]
    assert buffer.lost_count == 499 and buffer.gaps == 0


def test_a_start_the_parent_no_longer_holds_is_skipped_not_lost(signer: ChunkSigner) -> None:
    """A listener that asked from the stream's first chunk, when its parent's ring has
    moved on, starts at the oldest chunk there is and counts nothing lost."""
    items = [signer.sign([PACKET], 960 * (n + 1)) for n in range(8)]
    buffer = ReorderBuffer(span_samples=SPAN, repair_delay=0.0)
    buffer.next_seq = 0
    for item in items[3:]:
        buffer.add(item, now=0.0)
    assert buffer.pop_ready() == []
    assert buffer.due_repairs(now=0.0) == [0, 1, 2]
    assert buffer.skip_start([0, 1])  # chunk 2 may still come: only 0 and 1 are skipped
    assert buffer.next_seq == 2 and not buffer.skip_start([5])
    buffer.add(items[2], now=0.1)
    assert [i.seq for i in buffer.pop_ready()] == [2, 3, 4, 5, 6, 7]
    assert buffer.lost_count == 0
    assert not buffer.skip_start([8])  # once playing, a missing chunk is a gap to repair
