"""The origin's decisions, sans-I/O: sign each chunk, keep it in the ring, feed children.

The driver (meshd/node/origin.py reading Ogg Opus in real time, or the simulator) pushes
packets as they are due; children are served by the `Children` this owns, exactly as a
relay serves its own. No I/O and no clock reads here.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.node.children import Children
from meshd.node.config import NodeConfig
from meshd.node.stats import NodeStats
from protocol import ChunkRing, ChunkSigner, VerifiedChunk, key_to_text
from protocol.media import OPUS_RATE

KEEPALIVE = 1.0
"""While live, the origin sends a chunk at least this often: an empty one when its input
has nothing. Sequence numbers that keep advancing, signed by the origin, are how every
node tells a live stream from a stalled parent; no unsigned HEARTBEAT can fake them."""
ANNOUNCE_FOR = 2.0
"""How long the chunks carry ANNOUNCE once the tracker lost its view (docs/spec.md §7.2):
ten chunks, so that losses and late subscribers do not keep a node from seeing one."""


class OriginCore:
    """The root of a stream's tree."""

    def __init__(self, key: Ed25519PrivateKey, capacity: int, config: NodeConfig) -> None:
        self.signer = ChunkSigner(key)
        self.stream_id = self.signer.stream_id
        text_id = key_to_text(self.stream_id)
        self.stats = NodeStats("origin", text_id, text_id, depth=0)
        self.ring = ChunkRing(int(config.buffer_seconds * OPUS_RATE))
        self.children = Children(self.stream_id, self.ring, capacity, config, self.stats)
        self._gone: list[bytes] = []
        self.children.on_gone = self._gone.append
        self.ended = False
        self._last_push: float | None = None
        self._announce_until: float | None = None

    def take_gone(self) -> list[bytes]:
        """Children let go for silence since the last call, for the driver to tell the
        tracker (CHILD_GONE): a dead child of the origin with no child of its own has
        nobody to report it, and its slot would look taken for the tracker's peer_ttl."""
        gone = list(self._gone)
        self._gone.clear()
        return gone

    def set_head(self, head: bytes, now: float) -> None:
        """The codec header (OpusHead): children can be accepted from now on."""
        self.children.set_info(self.signer.stream_info(head), now)
        self.children.set_path((self.stream_id,), now)

    def announce(self, now: float) -> None:
        """The tracker lost its view of the tree (it restarted): the chunks of the next
        `ANNOUNCE_FOR` seconds ask every node to REFRESH, parents before children."""
        self._announce_until = now + ANNOUNCE_FOR

    def push(
        self, packets: Sequence[bytes], granule: int, now: float, *, end: bool = False
    ) -> VerifiedChunk:
        """Sign the next chunk, keep it for repairs and resumption, send it to children."""
        until = self._announce_until
        announce = until is not None and now < until
        item = self.signer.sign(packets, granule, end=end, announce=announce)
        self.ring.add(item)
        self.children.forward(item, now)
        self.stats.chunks_in += 1
        self.stats.packets_played += len(packets)
        self.stats.last_seq = item.seq
        self.stats.ended = self.ended = end
        self._last_push = now
        return item

    def _keepalive_at(self) -> float | None:
        if self._last_push is None or self.ended:
            return None
        return self._last_push + KEEPALIVE

    def get_timer(self) -> float | None:
        deadlines = [self.children.get_timer(), self._keepalive_at()]
        return min((d for d in deadlines if d is not None), default=None)

    def handle_timer(self, now: float) -> None:
        self.children.handle_timer(now)
        keepalive = self._keepalive_at()
        if keepalive is not None and now >= keepalive:
            self.push([], self.signer.last_granule, now)
