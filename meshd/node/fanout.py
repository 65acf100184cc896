"""Serving children over QUIC: the trio driver of a sans-I/O `Children`.

Each child is one QUIC connection. Live chunks leave as datagrams straight from `flush`
(no task hop on the hot path); stream bytes go through the child's writer task, so a
child that reads slowly stalls only itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from meshd.networks import network_of
from meshd.node.children import Children
from meshd.quic import DatagramTooLarge, EndpointConfig, QuicConn, QuicStream
from meshd.tracker_client import now_ms
from protocol import ErrorCode

logger = logging.getLogger(__name__)

SPARE_CONNECTIONS = 32
"""Connections a parent takes from one source network beyond its child slots: children
waiting to subscribe or leaving, the tracker's probes."""


def node_endpoint(capacity: int) -> EndpointConfig:
    """A node's endpoint, for a node with `capacity` child slots.

    A child never sends datagrams to its parent (docs/spec.md §10). The node acknowledges
    every second live chunk, or a lone one within 250 ms: a parent counts ACKs as life
    (§6.6), and it sends something at least every heartbeat interval, so it hears a live
    child at least every 2 heartbeat intervals; the ACKs were a quarter of a relay's CPU
    when each chunk was acknowledged. A child proves its node key with its certificate
    (§3), which its SUBSCRIBE must name. One source network holds at most the node's
    slots and a few more connections (§2)."""
    return EndpointConfig(
        client_datagram_error=ErrorCode.UNEXPECTED_MESSAGE,
        max_ack_delay=0.25,
        request_client_certificate=True,
        max_connections_per_network=capacity + SPARE_CONNECTIONS,
    )


SUBSCRIBE_TIMEOUT = 5.0


class _Session:
    """One child connection: its control stream and a writer task."""

    def __init__(self, conn: QuicConn, stream: QuicStream) -> None:
        self.conn = conn
        self.stream = stream
        self.wakeup = trio.Event()
        self.pending = bytearray()
        self.close_code: int | None = None
        self.cancel = trio.CancelScope()


class Fanout:
    """All child connections of one node; decisions are `children`'s."""

    def __init__(
        self,
        children: Children,
        after_input: Callable[[], None],
        on_closed: Callable[[int], None] | None = None,
    ) -> None:
        self.children = children
        self._after_input = after_input
        """The owner's pump: takes the core's actions, flushes, re-arms its timer."""
        self._on_closed = on_closed or children.closed
        """Told when a child connection is gone (a relay's core, which may be draining
        and then be done; by default just `children`)."""
        self._sessions: dict[int, _Session] = {}
        self._next_id = 0
        self._no_sessions = trio.Event()
        self._no_sessions.set()
        children.last_heard = self._last_heard
        children.wall_ms = now_ms

    async def handle_connection(self, conn: QuicConn) -> None:
        """`endpoint.serve` handler: one child per connection."""
        with trio.move_on_after(SUBSCRIBE_TIMEOUT) as scope:
            stream = await conn.accept_stream()
        if scope.cancelled_caught:
            await conn.aclose(ErrorCode.UNEXPECTED_MESSAGE, "no SUBSCRIBE")
            return
        self._next_id += 1
        child = self._next_id
        session = _Session(conn, stream)
        self._sessions[child] = session
        self._no_sessions = trio.Event()
        network = network_of(conn.remote_address[0])
        self.children.open(
            child, conn.max_datagram_payload, trio.current_time(), network, conn.peer_key
        )
        try:
            with session.cancel:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write_loop, session)
                    await self._read_loop(child, session)
                    if session.close_code is None:
                        session.cancel.cancel()  # the connection broke: nothing to flush
            await conn.aclose(session.close_code or ErrorCode.NO_ERROR)
        finally:
            del self._sessions[child]
            self._on_closed(child)
            if not self._sessions:
                self._no_sessions.set()
            self._after_input()

    def _last_heard(self, child: int) -> float | None:
        session = self._sessions.get(child)
        return None if session is None else session.conn.last_received_at

    def flush(self) -> None:
        """Send what the children core queued: datagrams now, stream bytes via writers."""
        for close in self.children.take_closes():
            session = self._sessions.get(close.child)
            if session is not None:
                session.close_code = close.code
                session.wakeup.set()
        for child in self.children.take_dirty():
            session = self._sessions.get(child)
            if session is None:
                continue
            data, datagrams = self.children.take_output(child)
            try:
                for datagram in datagrams:
                    session.conn.send_datagram(datagram)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the reader notices the dead connection and ends the session
            except DatagramTooLarge:
                pass  # the path's limit shrank: the child sees a gap and repairs it
            if data:
                session.pending += data
                session.wakeup.set()

    async def wait_until_empty(self, grace: float) -> bool:
        """Wait (at most `grace` seconds) for every child to go; True if they all did."""
        with trio.move_on_after(grace):
            await self._no_sessions.wait()
            return True
        return False

    async def _read_loop(self, child: int, session: _Session) -> None:
        while True:
            try:
                data = await session.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            self.children.receive_data(child, data, trio.current_time())
            self._after_input()
            if not data:
                return

    async def _write_loop(self, session: _Session) -> None:
        """Send stream bytes as they are queued; after the last ones of a close, end the
        session (the reader too)."""
        while True:
            await session.wakeup.wait()
            session.wakeup = trio.Event()
            data = bytes(session.pending)
            session.pending.clear()
            if data:
                try:
                    await session.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    session.cancel.cancel()
                    return
            if session.close_code is not None:
                session.cancel.cancel()
                return
