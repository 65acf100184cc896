"""Media: signing chunks at the origin, verifying them everywhere, buffering them in order.

A chunk is verified once, when it arrives; from then on it travels as a `VerifiedChunk`
holding its encoded bytes, so relays forward exactly what the origin signed without
re-encoding it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.codec import decode_message, encode_message
from protocol.errors import ErrorCode, RemoteProtocolError
from protocol.identity import key_id, public_key_from_id
from protocol.limits import MAX_SEQS_PER_MESSAGE
from protocol.messages import Chunk, StreamInfo
from protocol.signing import sign_message, verify_message

OPUS_RATE = 48_000  # granule positions count 48 kHz samples (RFC 7845)


@dataclass(frozen=True, slots=True)
class VerifiedChunk:
    """A chunk whose origin signature has been checked, with its encoded form for forwarding."""

    chunk: Chunk
    raw: bytes

    @property
    def seq(self) -> int:
        return self.chunk.seq


class ChunkSigner:
    """The origin's side: numbers chunks consecutively from 0 and signs them."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.stream_id = key_id(key)
        self.next_seq = 0
        self.last_granule = 0

    def stream_info(self, head: bytes, codec: str = "opus") -> StreamInfo:
        return sign_message(StreamInfo(codec, head), self._key, self.stream_id)

    def sign(
        self, packets: Sequence[bytes], granule: int, *, end: bool = False, announce: bool = False
    ) -> VerifiedChunk:
        flags = (Chunk.FLAG_END if end else 0) | (Chunk.FLAG_ANNOUNCE if announce else 0)
        chunk = Chunk(self.next_seq, granule, flags, tuple(packets))
        chunk = sign_message(chunk, self._key, self.stream_id)
        self.next_seq += 1
        self.last_granule = granule
        return VerifiedChunk(chunk, encode_message(chunk))


class StreamVerifier:
    """Checks that chunks and stream headers were signed by the stream's origin."""

    def __init__(self, stream_id: bytes) -> None:
        self.stream_id = stream_id
        self._key = public_key_from_id(stream_id)

    def verify_info(self, info: StreamInfo) -> None:
        verify_message(info, self._key, self.stream_id)

    def verify_chunk(self, chunk: Chunk, raw: bytes) -> VerifiedChunk:
        verify_message(chunk, self._key, self.stream_id)
        return VerifiedChunk(chunk, raw)

    def verify_datagram(self, data: bytes) -> VerifiedChunk:
        """A datagram carries exactly one encoded CHUNK and nothing else."""
        chunk = decode_message(data)
        if not isinstance(chunk, Chunk):
            raise RemoteProtocolError(
                f"a datagram must carry a CHUNK, not {type(chunk).__name__}",
                ErrorCode.UNEXPECTED_MESSAGE,
            )
        return self.verify_chunk(chunk, data)


class ChunkRing:
    """The last `span_samples` of audio (by granule), for resuming children and repairs."""

    def __init__(self, span_samples: int) -> None:
        self._span = span_samples
        self._chunks: dict[int, VerifiedChunk] = {}
        self._oldest: int | None = None
        self.latest_seq: int | None = None

    def __len__(self) -> int:
        return len(self._chunks)

    def add(self, item: VerifiedChunk) -> None:
        seq = item.seq
        if seq in self._chunks or (self._oldest is not None and seq < self._oldest):
            return
        self._chunks[seq] = item
        if self.latest_seq is None or seq > self.latest_seq:
            self.latest_seq = seq
        if self._oldest is None or seq < self._oldest:
            self._oldest = seq
        self._evict(item.chunk.granule)

    def _evict(self, newest_granule: int) -> None:
        assert self._oldest is not None and self.latest_seq is not None
        while self._oldest < self.latest_seq:
            oldest = self._chunks.get(self._oldest)
            if oldest is not None and newest_granule - oldest.chunk.granule <= self._span:
                break
            self._chunks.pop(self._oldest, None)
            self._oldest += 1

    def get(self, seq: int) -> VerifiedChunk | None:
        return self._chunks.get(seq)

    def since(self, seq: int | None) -> Iterator[VerifiedChunk]:
        """Chunks held from `seq` on, in order (None: only the newest, the live edge)."""
        if self.latest_seq is None or self._oldest is None:
            return
        start = self.latest_seq if seq is None else max(seq, self._oldest)
        for number in range(start, self.latest_seq + 1):
            item = self._chunks.get(number)
            if item is not None:
                yield item


class ReorderBuffer:
    """Puts verified chunks back in sequence order and says which sequence numbers to repair.

    Chunks may arrive out of order (datagrams, repairs, a parent switch). Every sequence
    number at or below the highest announced one (by a chunk or a HEARTBEAT) that has not
    arrived is a gap: asked for after `repair_delay` (reordering settles first) and again
    every `repair_timeout` until it arrives. A MISSING answer does not give a gap up (the
    parent may not have it *yet*); a gap is skipped, and counted lost, only once the audio
    received is more than `span_samples` past it, so no ring buffer can still hold it.
    """

    def __init__(
        self,
        next_seq: int | None = None,
        *,
        span_samples: int,
        repair_delay: float = 0.05,
        repair_timeout: float = 0.5,
        window: int = 4096,
    ) -> None:
        self.next_seq = next_seq
        self._span = span_samples
        self._repair_delay = repair_delay
        self._repair_timeout = repair_timeout
        self._window = window
        self._pending: dict[int, VerifiedChunk] = {}
        self._gaps: dict[int, float] = {}  # seq -> when to ask for it (again)
        self._played_granule: int | None = None
        self._newest_granule = 0
        self.highest_seen: int | None = None
        self.lost_count = 0

    def add(self, item: VerifiedChunk, now: float) -> bool:
        """Take a chunk; False if it is a duplicate, already played, or absurdly far ahead."""
        seq = item.seq
        if self.next_seq is None:
            self.next_seq = seq
        if seq >= self.next_seq + self._window:
            self._resync(seq)
        if seq < self.next_seq or seq in self._pending:
            return False
        self._pending[seq] = item
        self._gaps.pop(seq, None)
        self._newest_granule = max(self._newest_granule, item.chunk.granule)
        self.note_latest(seq, now)
        return True

    def _resync(self, seq: int) -> None:
        """We fell further behind than the window (a long outage): what lies between is
        gone, so count it lost and start again at `seq` rather than wait forever."""
        assert self.next_seq is not None
        if self._played_granule is not None:  # before the first chunk played, nothing is lost
            self.lost_count += seq - self.next_seq - len(self._pending)
        self._pending.clear()
        self._gaps.clear()
        self.next_seq = seq
        self.highest_seen = None

    def note_latest(self, seq: int, now: float) -> None:
        """The parent has chunks up to and including `seq`: any of them we lack is a gap
        (`seq` itself too: its datagram may be the one that was lost)."""
        if self.next_seq is None or seq >= self.next_seq + self._window:
            return
        start = self.next_seq if self.highest_seen is None else self.highest_seen + 1
        for missing in range(max(start, self.next_seq), seq + 1):
            if missing not in self._pending:
                self._gaps[missing] = now + self._repair_delay
        if self.highest_seen is None or seq > self.highest_seen:
            self.highest_seen = seq

    def pop_ready(self) -> list[VerifiedChunk]:
        """Chunks now playable in order (gaps beyond every ring's horizon skipped)."""
        ready: list[VerifiedChunk] = []
        while self.next_seq is not None:
            item = self._pending.pop(self.next_seq, None)
            if item is not None:
                ready.append(item)
                self._played_granule = item.chunk.granule
            elif self._beyond_horizon():
                del self._gaps[self.next_seq]
                self.lost_count += 1
            else:
                break
            self.next_seq += 1
        return ready

    def skip_start(self, unavailable: Iterable[int]) -> bool:
        """Before anything was played, start after the leading sequence numbers the parent
        says it does not hold (we asked from the stream's first chunk, and its ring has
        moved on). They are not counted lost: they were never ours to miss. Returns
        whether the start moved."""
        if self._played_granule is not None or self.next_seq is None:
            return False
        gone = set(unavailable)
        start = self.next_seq
        while self.next_seq in gone and self._gaps.pop(self.next_seq, None) is not None:
            self.next_seq += 1
        return self.next_seq != start

    def _beyond_horizon(self) -> bool:
        """Whether the gap at `next_seq` is older than any ring buffer keeps: the audio
        received since the last chunk played spans more than `span_samples`."""
        return (
            self.next_seq in self._gaps
            and self._played_granule is not None
            and self._newest_granule - self._played_granule > self._span
        )

    def due_repairs(self, now: float) -> list[int]:
        """Gaps to ask for now (at most one REPAIR's worth); each is re-armed for a retry."""
        due = sorted(seq for seq, when in self._gaps.items() if when <= now)
        due = due[:MAX_SEQS_PER_MESSAGE]
        for seq in due:
            self._gaps[seq] = now + self._repair_timeout
        return due

    def retry_gaps_now(self, now: float) -> None:
        """After switching parent, ask the new one for every gap at once."""
        for seq in self._gaps:
            self._gaps[seq] = now

    def get_timer(self) -> float | None:
        return min(self._gaps.values(), default=None)

    @property
    def gaps(self) -> int:
        return len(self._gaps)
