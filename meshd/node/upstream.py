"""One connection to a (candidate) parent over QUIC: the bytes of one `NodeCore` link.

`ParentConnection.run` connects (pinning the parent's key), opens the control stream,
and then feeds the core everything that arrives, stream bytes and datagrams alike, until
the core closes the link or the connection breaks. It makes no decisions: what to
subscribe, when to give up and what a message means are the core's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from meshd.addresses import parse_address
from meshd.node.core import NodeCore
from meshd.quic import QuicConn, QuicEndpoint, QuicStream
from protocol import ErrorCode, Peer

logger = logging.getLogger(__name__)


class ParentConnection:
    def __init__(
        self, core: NodeCore, link: int, peer: Peer, after_input: Callable[[], None]
    ) -> None:
        self.core = core
        self.link = link
        self.peer = peer
        self._after_input = after_input
        """The relay's pump: takes the core's actions, flushes, re-arms its timer."""
        self._conn: QuicConn | None = None
        self._stream: QuicStream | None = None
        self._wakeup = trio.Event()
        self._close: tuple[int, str] | None = None
        self._last_data = b""
        self._cancel = trio.CancelScope()
        self._accepted = trio.Event()

    @property
    def rtt(self) -> float | None:
        """The connection's smoothed round-trip time in seconds, once measured."""
        return None if self._conn is None else self._conn.rtt

    def wake(self) -> None:
        """The core queued bytes for this link."""
        self._wakeup.set()

    def close(self, code: int, reason: str, data: bytes) -> None:
        """The core is done with this link: send its last bytes, then close."""
        self._close = (code, reason)
        self._last_data = data
        if self._stream is None:
            self._cancel.cancel()  # still connecting: nothing to say
        self._wakeup.set()

    async def run(self, endpoint: QuicEndpoint) -> None:
        with self._cancel:
            try:
                await self._connect(endpoint)
            except (OSError, ValueError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._failed(str(exc) or type(exc).__name__)
            else:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write_loop)
                    nursery.start_soon(self._stream_loop)
                    nursery.start_soon(self._take_datagrams)
        if self._conn is not None:
            code, reason = self._close or (ErrorCode.GOING_AWAY, "")
            with trio.CancelScope(shield=True):
                await self._conn.aclose(code, reason)

    async def _connect(self, endpoint: QuicEndpoint) -> None:
        self._conn = await endpoint.connect(
            parse_address(self.peer.address), expected_peer_key=self.peer.node
        )
        self._stream = await self._conn.open_stream()
        self.core.link_opened(self.link, trio.current_time())
        self._after_input()

    async def _stream_loop(self) -> None:
        assert self._stream is not None
        while True:
            try:
                data = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._failed(f"connection lost: {exc}")
                return
            self.core.link_data(self.link, data, trio.current_time())
            self._after_input()
            if self.core.is_attached(self.link):
                self._accepted.set()
            if not data:
                return  # the stream ended; the core decided what that means

    async def _take_datagrams(self) -> None:
        """Datagrams are taken once the parent accepted us: the connection queues those
        that overtake STREAM_INFO, rather than the link dropping them. From then on the
        connection hands each one over as it arrives (a lost connection is the stream
        loop's to notice)."""
        assert self._conn is not None
        await self._accepted.wait()
        self._conn.deliver_datagrams(self._datagram)

    def _datagram(self, data: bytes) -> None:
        self.core.link_datagram(self.link, data, trio.current_time())
        self._after_input()

    async def _write_loop(self) -> None:
        assert self._stream is not None
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            data = self._last_data if self._close else self.core.take_link_output(self.link)
            if data:
                try:
                    await self._stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self._failed(f"connection lost: {exc}")
            if self._close is not None:
                self._cancel.cancel()
                return

    def _failed(self, reason: str) -> None:
        """Tell the core, unless it closed the link itself."""
        if self._close is None:
            self.core.link_failed(self.link, reason, trio.current_time())
            self._after_input()
        self._cancel.cancel()
