"""Serving children: accept links, send the backlog, forward chunks, repair, redirect.

Both the origin and relays feed children the same way. Each child is one QUIC
connection with a `protocol.ParentLink`; live chunks leave as datagrams straight from
`forward` (no task hop on the hot path), everything else through the child's writer task.
"""

from __future__ import annotations

import logging
import math

import trio

from meshd.node.config import NodeConfig
from meshd.node.stats import NodeStats
from meshd.quic import DatagramTooLarge, QuicConn, QuicStream
from protocol import (
    ChunkRing,
    ErrorCode,
    LinkState,
    ParentLink,
    Peer,
    ProtocolError,
    StreamInfo,
    VerifiedChunk,
    short_id,
)
from protocol.events import LinkClosed, RepairRequested, SubscribeRequested

logger = logging.getLogger(__name__)

SUBSCRIBE_TIMEOUT = 5.0
INFO_WAIT = 1.0  # a relay that only just joined gets its first audio in milliseconds


class ChildSession:
    """One child: its connection, its control stream and the link state machine."""

    def __init__(self, fanout: Fanout, conn: QuicConn, stream: QuicStream, link: ParentLink):
        self.fanout = fanout
        self.conn = conn
        self.stream = stream
        self.link = link
        self._wakeup = trio.Event()
        self._send_lock = trio.Lock()

    @property
    def node(self) -> bytes | None:
        return self.link.child

    def wake(self) -> None:
        self._wakeup.set()

    def send_chunk(self, item: VerifiedChunk) -> None:
        """Forward one live chunk now; stream-bound data goes via the writer task."""
        self.link.send_chunk(item, trio.current_time())
        self.fanout.stats.chunks_out += 1
        self.fanout.stats.bytes_out += len(item.raw)
        try:
            for datagram in self.link.datagrams_to_send():
                self.conn.send_datagram(datagram)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the reader notices the dead connection and ends the session
        except DatagramTooLarge:
            pass  # the path's limit shrank: the child sees a gap and repairs it on the stream
        if self.link.buffered:
            self.wake()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_loop)
            await self._read_loop()
            if self.link.state is not LinkState.CLOSED:
                nursery.cancel_scope.cancel()  # the connection broke: nothing left to flush
            self.wake()
        await self.conn.aclose(self.link.goodbye_code or ErrorCode.NO_ERROR)

    def _name(self) -> str:
        return short_id(self.node) if self.node else str(self.conn.remote_address)

    async def _read_loop(self) -> None:
        while self.link.state is not LinkState.CLOSED:
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            try:
                await self._handle(data)
                if self.link.buffered > self.fanout.config.max_child_backlog:
                    logger.warning("child %s is not reading; dropping it", self._name())
                    self.link.goodbye(ErrorCode.GOING_AWAY, "too slow")
                    return
            except ProtocolError as exc:
                logger.warning("child %s broke the protocol: %s", self._name(), exc)
                self.fanout.stats.bad_peers += 1
                self.link.goodbye(exc.code, str(exc))
                return
            self.wake()
            if not data:
                return

    async def _handle(self, data: bytes) -> None:
        self.link.receive_data(data, trio.current_time())
        while (event := self.link.next_event()) is not None:
            if isinstance(event, SubscribeRequested):
                await self.fanout.admit(self, event)
            elif isinstance(event, RepairRequested):
                self.fanout.repair(self, event.seqs)
            elif isinstance(event, LinkClosed):
                logger.info("child %s left: %s", self._name(), event.reason or event.code)

    async def _write_loop(self) -> None:
        while True:
            deadline = self.link.get_timer()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await self._wakeup.wait()
            self._wakeup = trio.Event()
            self.link.handle_timer(trio.current_time())
            if self.link.buffered > self.fanout.config.max_child_backlog:
                logger.warning("child %s is too slow; dropping it", self._name())
                self.link.goodbye(ErrorCode.GOING_AWAY, "too slow")
            if not await self._flush() or self.link.state is LinkState.CLOSED:
                return

    async def _flush(self) -> bool:
        """Send what the link queued for the stream; False once the connection is gone."""
        async with self._send_lock:
            data = self.link.data_to_send()
            if not data:
                return True
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return False
            return True


class Fanout:
    """All of a node's children, up to `capacity`."""

    def __init__(
        self,
        stream: bytes,
        ring: ChunkRing,
        capacity: int,
        config: NodeConfig,
        stats: NodeStats,
    ) -> None:
        self.stream = stream
        self.ring = ring
        self.capacity = capacity
        self.config = config
        self.stats = stats
        self.info: StreamInfo | None = None
        self._info_known = trio.Event()
        self.children: set[ChildSession] = set()
        self._sessions: set[ChildSession] = set()
        self._no_sessions = trio.Event()
        self._no_sessions.set()
        self.leaving = False

    def set_info(self, info: StreamInfo) -> None:
        if self.info is None:
            self.info = info
            self._info_known.set()

    def forward(self, item: VerifiedChunk) -> None:
        for child in self.children:
            child.send_chunk(item)

    async def handle_connection(self, conn: QuicConn) -> None:
        """`endpoint.serve` handler: one child per connection."""
        with trio.move_on_after(SUBSCRIBE_TIMEOUT) as scope:
            stream = await conn.accept_stream()
        if scope.cancelled_caught:
            await conn.aclose(ErrorCode.UNEXPECTED_MESSAGE, "no SUBSCRIBE")
            return
        link = ParentLink(
            self.stream,
            now=trio.current_time(),
            max_datagram=conn.max_datagram_payload,
            heartbeat_interval=self.config.heartbeat_interval,
        )
        session = ChildSession(self, conn, stream, link)
        self._sessions.add(session)
        self._no_sessions = trio.Event()
        try:
            await session.run()
        finally:
            self._sessions.discard(session)
            if session in self.children:
                self.children.discard(session)
                self.stats.children = len(self.children)
            if not self._sessions:
                self._no_sessions.set()

    async def admit(self, session: ChildSession, request: SubscribeRequested) -> None:
        """Accept a SUBSCRIBE (header + backlog) or refuse it with the reason."""
        link = session.link
        with trio.move_on_after(INFO_WAIT):
            await self._info_known.wait()  # a relay that only just joined has no header yet
        if session.conn.is_closed:
            return
        if self.info is None:
            link.goodbye(ErrorCode.NOT_AVAILABLE, "no audio yet; try again")
            return
        if self.leaving:
            link.goodbye(ErrorCode.GOING_AWAY, "this node is leaving")
            return
        if len(self.children) >= self.capacity:
            link.goodbye(ErrorCode.NO_CAPACITY, f"all {self.capacity} child slots are taken")
            return
        self.children.add(session)
        self.stats.children = len(self.children)
        backlog = list(self.ring.since(request.from_seq))
        link.accept(self.info, backlog, trio.current_time())
        self.stats.chunks_out += len(backlog)
        self.stats.bytes_out += sum(len(item.raw) for item in backlog)
        logger.info(
            "child %s subscribed from %s (%d chunks of backlog)",
            short_id(request.node),
            request.from_seq,
            len(backlog),
        )

    def repair(self, session: ChildSession, seqs: tuple[int, ...]) -> None:
        found = [item for seq in seqs if (item := self.ring.get(seq)) is not None]
        held = {item.seq for item in found}
        session.link.answer_repair(found, [seq for seq in seqs if seq not in held])
        self.stats.chunks_out += len(found)
        self.stats.bytes_out += sum(len(item.raw) for item in found)

    def redirect_all(self, moves: dict[bytes, tuple[Peer, tuple[Peer, ...]]]) -> None:
        """Graceful leave: tell every child where to go (children the tracker did not
        place are sent to `moves[b""]`, our own parent, if given)."""
        self.leaving = True
        fallback = moves.get(b"")
        for child in list(self.children):
            target = moves.get(child.node or b"", fallback)
            if target is not None:
                child.link.redirect(*target)
                child.wake()

    async def wait_until_empty(self, grace: float) -> bool:
        """Wait (at most `grace` seconds) for every child to go; True if they all did."""
        with trio.move_on_after(grace):
            await self._no_sessions.wait()
            return True
        return False
