"""One QUIC stream as a trio ``HalfCloseableStream``.

The connection feeds received data and resets in synchronously; the stream
only parks until the connection has something for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio
from aioquic.quic.connection import stream_is_client_initiated, stream_is_unidirectional

from meshd.quic.errors import StreamReset

if TYPE_CHECKING:
    from meshd.quic.connection import QuicConn


class QuicStream(trio.abc.HalfCloseableStream):
    """A bidirectional or unidirectional QUIC stream.

    A unidirectional stream has only the direction its opener gave it; using
    the other one raises ``trio.ClosedResourceError``.
    """

    def __init__(self, conn: QuicConn, stream_id: int, *, is_client: bool) -> None:
        self._conn = conn
        self.stream_id = stream_id
        local = stream_is_client_initiated(stream_id) == is_client
        uni = stream_is_unidirectional(stream_id)
        self.can_send = local or not uni
        self.can_receive = not local or not uni
        self._received = bytearray()
        self._eof_received = False
        self._reset_code: int | None = None
        self._stop_sending_code: int | None = None
        self._eof_sent = False
        self._closed = False
        self._sending = False
        self._receiving = False
        self._readable = trio.lowlevel.ParkingLot()

    @property
    def is_unidirectional(self) -> bool:
        return stream_is_unidirectional(self.stream_id)

    @property
    def early_data_end(self) -> int:
        """The offset up to which the peer's data on this stream came in 0-RTT packets,
        which can be replayed (0: none did); what follows came once the handshake was done."""
        return self._conn._early_data_end(self.stream_id)

    @property
    def unacknowledged(self) -> int:
        """Bytes written to this stream that the peer has not acknowledged yet."""
        return self._conn._unacknowledged(self.stream_id)

    # Fed by the connection.

    def _on_data(self, data: bytes, end_stream: bool) -> None:
        if self._closed:
            return
        self._received += data
        self._eof_received = self._eof_received or end_stream
        self._readable.unpark_all()

    def _on_reset(self, error_code: int) -> None:
        self._reset_code = error_code
        self._readable.unpark_all()

    def _on_stop_sending(self, error_code: int) -> None:
        self._stop_sending_code = error_code

    def _wake(self) -> None:
        self._readable.unpark_all()

    # trio.abc.ReceiveStream

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Bytes in order; b"" at end of stream; StreamReset if the peer reset it."""
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        await trio.lowlevel.checkpoint_if_cancelled()
        self._receiving = True
        try:
            while True:
                self._check_usable()
                if not self.can_receive:
                    raise trio.ClosedResourceError(
                        f"stream {self.stream_id} is unidirectional and send-only here"
                    )
                if self._received:
                    size = len(self._received) if max_bytes is None else max_bytes
                    data = bytes(self._received[:size])
                    del self._received[:size]
                    self._conn._consumed(self.stream_id, len(data))
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return data
                if self._reset_code is not None:
                    raise StreamReset(self.stream_id, self._reset_code, stop_sending=False)
                if self._eof_received:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return b""
                self._conn._check()
                await self._readable.park()
        finally:
            self._receiving = False

    # trio.abc.SendStream

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data``; wait while this stream's unacknowledged bytes exceed the bound.

        The bound covers both a slow network and a peer whose flow control
        window is full: in either case aioquic's send buffer stops draining.
        """
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        await trio.lowlevel.checkpoint_if_cancelled()
        self._sending = True
        try:
            view = memoryview(data).cast("B")
            self._check_send()
            while view:
                room = self._conn._send_room(self.stream_id)
                if room <= 0:
                    await self._conn._wait_send_progress()
                    self._check_send()
                    continue
                self._conn._send_stream_data(self.stream_id, bytes(view[:room]), end=False)
                view = view[room:]
        finally:
            self._sending = False
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        while self._conn._send_room(self.stream_id) <= 0:
            self._check_send()
            await self._conn._wait_send_progress()
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def send_eof(self) -> None:
        """Send FIN; later ``send_all`` calls raise ``trio.ClosedResourceError``."""
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._eof_sent:
            self._check_send()
            self._eof_sent = True
            self._conn._send_stream_data(self.stream_id, b"", end=True)
        await trio.lowlevel.cancel_shielded_checkpoint()

    def reset(self, error_code: int = 0) -> None:
        """Abort both directions at once: RESET_STREAM and STOP_SENDING with ``error_code``."""
        if self._closed:
            return
        self._abort(error_code)

    async def aclose(self) -> None:
        """Finish sending (FIN) and tell the peer we will read no more."""
        if not self._closed and not self._conn.is_closed:
            if self.can_send and not self._eof_sent and self._stop_sending_code is None:
                self._eof_sent = True
                self._conn._send_stream_data(self.stream_id, b"", end=True)
            self._abort(0, reset_send=False)
        self._closed = True
        self._wake()
        await trio.lowlevel.checkpoint()

    def _abort(self, error_code: int, *, reset_send: bool = True) -> None:
        self._closed = True
        reset = reset_send and self.can_send and self._stop_sending_code is None
        stop = self.can_receive and not self._eof_received and self._reset_code is None
        self._conn._abort_stream(self.stream_id, error_code, reset=reset, stop=stop)
        self._received.clear()
        self._wake()

    def _check_usable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError(f"stream {self.stream_id} was closed")
        if self._conn._closed_locally:
            raise trio.ClosedResourceError("the connection was closed")

    def _check_send(self) -> None:
        self._check_usable()
        if not self.can_send:
            raise trio.ClosedResourceError(
                f"stream {self.stream_id} is unidirectional and receive-only here"
            )
        if self._eof_sent:
            raise trio.ClosedResourceError(f"EOF already sent on stream {self.stream_id}")
        if self._stop_sending_code is not None:
            raise StreamReset(self.stream_id, self._stop_sending_code, stop_sending=True)
        self._conn._check()
