"""One QUIC connection: drives an aioquic ``QuicConnection`` from trio.

Everything that touches aioquic runs synchronously: the endpoint feeds
received datagrams in, the application's calls queue data, and each of those
ends with ``_pump()`` (process events, transmit, re-arm the timer). A single
task per connection sleeps in a cancel scope whose deadline is the next timer
of aioquic, of the handshake or of keep-alive; moving that deadline is how new
work re-arms it, so nothing ever polls.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from functools import partial
from types import TracebackType
from typing import Protocol

import trio
from aioquic.quic import events
from aioquic.quic.connection import stream_is_client_initiated
from aioquic.quic.packet import QuicErrorCode, QuicFrameType
from cryptography import x509

from meshd.quic import _aioquic
from meshd.quic.config import EndpointConfig
from meshd.quic.errors import (
    ConnectionLost,
    DatagramTooLarge,
    HandshakeFailed,
    PeerKeyMismatch,
)
from meshd.quic.identity import certificate_raw_key
from meshd.quic.stream import QuicStream
from meshd.quic.transport import Address

# TLS alert bad_certificate (42) as a QUIC CRYPTO_ERROR, RFC 9001 section 4.8.
_BAD_CERTIFICATE = QuicErrorCode.CRYPTO_ERROR + 42
# Peer streams waiting for accept_stream(); more are refused with STOP_SENDING.
_MAX_UNACCEPTED_STREAMS = 64
_STREAM_REFUSED = 0
# aioquic's loss timer is sent_time + delay, but detect_loss() checks
# sent_time <= now - delay: at exactly the deadline, rounding can leave the
# packet undetected and the timer in the past forever. Handling timers a
# microsecond late avoids that spin (it shows up with trio's mock clocks).
_TIMER_SLACK = 1e-6


class ConnectionOwner(Protocol):
    """What a connection needs from its endpoint."""

    config: EndpointConfig

    def send_datagram(self, data: bytes, address: Address) -> None: ...

    def register_cid(self, cid: bytes, conn: QuicConn) -> None: ...

    def unregister_cid(self, cid: bytes) -> None: ...

    def connection_established(self, conn: QuicConn) -> None: ...

    def connection_finished(self, conn: QuicConn) -> None: ...


class QuicConn:
    """A QUIC connection with streams and datagrams; use as an async context manager."""

    def __init__(
        self,
        owner: ConnectionOwner,
        quic: _aioquic.MeshQuicConnection,
        *,
        is_client: bool,
        expected_peer_key: bytes | None = None,
        early_data: bytes | None = None,
        resumed_peer_key: bytes | None = None,
    ) -> None:
        self._owner = owner
        self._config = owner.config
        self._quic = quic
        self.is_client = is_client
        self._expected_peer_key = expected_peer_key
        self._resumed_peer_key = resumed_peer_key
        self.peer_key: bytes | None = None
        """The peer's raw Ed25519 key once the handshake is complete: the server's, or on
        a server that asked for it (`request_client_certificate`), the client's; None if
        the peer presented no Ed25519 certificate."""
        self.session_resumed = False
        """Whether the handshake resumed a TLS session (no certificate was sent)."""
        self._early_data = early_data
        self.first_stream: QuicStream | None = None
        """The stream that carries ``early_data`` (see ``QuicEndpoint.connect``)."""
        self.close_code: int | None = None
        self.close_reason = ""
        self.closed_by_peer = False
        self.datagrams_dropped = 0
        """Received datagrams dropped because the application did not keep up."""
        self.datagrams_dropped_outgoing = 0
        """Queued datagrams dropped because the network did not keep up."""
        self.last_received_at = trio.current_time()
        """When a packet from the peer last arrived (ACKs count): is the peer still there?"""

        self._cids: set[bytes] = set()
        self._handshake_complete = False
        self._handshake_deadline = trio.current_time() + self._config.handshake_timeout
        self._next_keepalive = math.inf
        self._ping_uid = 0
        self._closed_locally = False
        self._error: Callable[[], ConnectionLost] | None = None
        self._done = False
        self._established = trio.Event()
        self._closed = trio.Event()
        self._timer_scope = trio.CancelScope()

        self._streams: dict[int, QuicStream] = {}
        self._sweep_at = 64
        self._incoming_streams: deque[QuicStream] = deque()
        self._stream_arrived = trio.lowlevel.ParkingLot()
        self._datagrams: deque[bytes] = deque()
        self._datagram_arrived = trio.lowlevel.ParkingLot()
        self._on_datagram: Callable[[bytes], None] | None = None
        self._send_progress = trio.lowlevel.ParkingLot()
        self._hold_until = math.inf
        if early_data is not None:
            stream_id = quic.get_next_available_stream_id()
            self.first_stream = self._streams[stream_id] = QuicStream(
                self, stream_id, is_client=is_client
            )

    # Public API

    @property
    def remote_address(self) -> Address:
        address = self._quic.get_peer_address()
        assert address is not None, "connections always have a peer address"
        return tuple(address)

    @property
    def rtt(self) -> float | None:
        """The smoothed round-trip time in seconds (None before it was measured)."""
        return _aioquic.smoothed_rtt(self._quic)

    @property
    def max_datagram_payload(self) -> int:
        """The largest payload ``send_datagram`` accepts (fits one QUIC packet)."""
        return _aioquic.max_datagram_payload(self._quic)

    @property
    def peer_max_datagram_frame_size(self) -> int | None:
        """The peer's ``max_datagram_frame_size`` transport parameter (None: not sent)."""
        return _aioquic.remote_max_datagram_frame_size(self._quic)

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        """The leaf certificate the peer presented (client side)."""
        return _aioquic.peer_certificate(self._quic)

    async def open_stream(self, unidirectional: bool = False) -> QuicStream:
        """A new stream; the peer sees it when the first data (or FIN) arrives."""
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check()
        stream_id = self._quic.get_next_available_stream_id(is_unidirectional=unidirectional)
        self._quic.send_stream_data(stream_id, b"")  # makes aioquic allocate the id
        self._sweep_streams()
        stream = self._streams[stream_id] = QuicStream(self, stream_id, is_client=self.is_client)
        await trio.lowlevel.cancel_shielded_checkpoint()
        return stream

    async def accept_stream(self) -> QuicStream:
        """The next stream the peer opened."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            self._check_not_closed_locally()
            if self._incoming_streams:
                stream = self._incoming_streams.popleft()
                await trio.lowlevel.cancel_shielded_checkpoint()
                return stream
            self._check()
            await self._stream_arrived.park()

    def send_datagram(self, data: bytes) -> None:
        """Queue an unreliable datagram; drops the oldest queued one if the queue is full.

        Raises DatagramTooLarge at once when ``data`` exceeds ``max_datagram_payload``.
        """
        self._check()
        limit = self.max_datagram_payload
        if len(data) > limit:
            raise DatagramTooLarge(len(data), limit)
        queue = _aioquic.pending_datagrams(self._quic)
        while len(queue) >= self._config.datagram_send_queue:
            queue.popleft()
            self.datagrams_dropped_outgoing += 1
        self._quic.send_datagram_frame(bytes(data))
        self._pump()

    def deliver_datagrams(self, callback: Callable[[bytes], None]) -> None:
        """From now on hand each datagram to ``callback`` as it arrives, in the endpoint's
        receive loop, instead of queueing it for ``receive_datagram``; the queued ones go
        first. A relay forwards a chunk from there without a task switch (two scheduler
        passes per chunk, a real part of its CPU). An exception in ``callback`` for a
        queued datagram reaches the caller; for a later one it closes this connection
        (INTERNAL_ERROR), as any failure while the connection processes input."""
        while self._datagrams:
            callback(self._datagrams.popleft())
        self._on_datagram = callback

    async def receive_datagram(self) -> bytes:
        """The next datagram; datagrams that arrived before a close are still delivered."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            self._check_not_closed_locally()
            if self._datagrams:
                data = self._datagrams.popleft()
                await trio.lowlevel.cancel_shielded_checkpoint()
                return data
            self._check()
            await self._datagram_arrived.park()

    async def aclose(self, error_code: int = 0, reason: str = "") -> None:
        """Close with an application error code and reason the peer will see."""
        if not self.is_closed:
            self._close(error_code, reason)
            self._pump()
        await trio.lowlevel.checkpoint()

    async def wait_closed(self) -> None:
        """Return once the connection is closed, by either side or by a timeout."""
        await self._closed.wait()

    @property
    def is_closed(self) -> bool:
        return self._closed_locally or self._error is not None

    async def __aenter__(self) -> QuicConn:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        role = "client" if self.is_client else "server"
        return f"<QuicConn {role} peer={self.remote_address} closed={self.is_closed}>"

    # Driven by the endpoint

    def _receive(self, data: bytes, address: Address, now: float) -> None:
        """Feed one datagram; the caller pumps once per batch, which coalesces replies."""
        self._quic.receive_datagram(data, address, now)
        self.last_received_at = now
        if self._handshake_complete and self._config.keepalive_interval is not None:
            self._next_keepalive = now + self._config.keepalive_interval

    def _register_cid(self, cid: bytes) -> None:
        self._cids.add(cid)
        self._owner.register_cid(cid, self)

    async def _run_timer(self) -> None:
        """Sleep until the next deadline; ``_pump`` moves it when new work arrives."""
        while not self._done:
            with trio.CancelScope(deadline=self._deadline()) as self._timer_scope:
                await trio.sleep_forever()
            if not self._done:
                self._on_timer(trio.current_time())

    async def _wait_established(self) -> None:
        """Wait for the handshake; on cancellation close the half-open connection."""
        try:
            await self._established.wait()
        except BaseException:
            self._abandon(0, "cancelled")
            raise
        self._check()

    def _abandon(self, error_code: int = 0, reason: str = "") -> None:
        """Close and forget at once (endpoint shutdown): no draining period."""
        if not self.is_closed:
            self._close(error_code, reason)
            self._transmit()
        self._finish()

    def _close(self, error_code: int, reason: str) -> None:
        """Queue our CONNECTION_CLOSE and wake every waiter; the caller transmits."""
        self._closed_locally = True
        self.close_code = error_code
        self.close_reason = reason
        self._quic.close(error_code=error_code, reason_phrase=reason)
        self._wake_all()
        self._closed.set()

    # Internals

    def _check_not_closed_locally(self) -> None:
        if self._closed_locally:
            raise trio.ClosedResourceError("the connection was closed")

    def _check(self) -> None:
        """Raise ClosedResourceError after our close, ConnectionLost after theirs."""
        self._check_not_closed_locally()
        if self._error is not None:
            raise self._error()

    def _deadline(self) -> float:
        timer = self._quic.get_timer()
        deadline = min(self._hold_until, math.inf if timer is None else timer)
        if not self._handshake_complete:
            return min(deadline, self._handshake_deadline)
        if not self.is_closed:
            return min(deadline, self._next_keepalive)
        return deadline

    def _on_timer(self, now: float) -> None:
        timer = self._quic.get_timer()
        if timer is not None and now >= timer:
            self._quic.handle_timer(max(now, timer + _TIMER_SLACK))
        if not self._handshake_complete and now >= self._handshake_deadline:
            if self._error is None and not self._closed_locally:
                self._fail(partial(HandshakeFailed, None, "handshake timed out", by_peer=False))
            self._finish()
            return
        interval = self._config.keepalive_interval
        if interval is not None and now >= self._next_keepalive and not self.is_closed:
            self._quic.send_ping(self._ping_uid)
            self._ping_uid += 1
            self._next_keepalive = now + interval
        self._pump()

    def _send_early_data(self) -> None:
        """Queue ``early_data`` once it can go: 0-RTT keys, or the handshake done."""
        if self._early_data is None or self.first_stream is None:
            return
        if self._handshake_complete or _aioquic.can_send_0rtt(self._quic):
            self._quic.send_stream_data(self.first_stream.stream_id, self._early_data)
            self._early_data = None

    def _pump_received(self) -> None:
        """``_pump`` after datagrams arrived; with ``reply_delay`` a server connection
        with stream data it has not read yet holds its output (at most that long) for the
        reply: stream data that came in 0-RTT is read only once the handshake is done."""
        self._process_events()
        self._detect_close()
        delay = self._config.reply_delay
        if delay and not self.is_client and not self.is_closed and self._has_unread_data():
            self._hold_until = min(self._hold_until, trio.current_time() + delay)
            self._send_progress.unpark_all()
            self._rearm_timer()
            return
        self._pump()

    def _has_unread_data(self) -> bool:
        return any(stream._received for stream in self._streams.values())

    def _pump(self) -> int:
        """Process events, transmit, detect a close, re-arm the timer."""
        self._process_events()
        sent = self._transmit()
        self._detect_close()
        if self._send_progress:
            self._send_progress.unpark_all()
        if not self._done:
            self._rearm_timer()
        return sent

    def _rearm_timer(self) -> None:
        deadline = self._deadline()
        if deadline != self._timer_scope.deadline:  # trio's setter costs, even unchanged
            self._timer_scope.deadline = deadline

    def _transmit(self) -> int:
        self._hold_until = math.inf
        datagrams = self._quic.datagrams_to_send(trio.current_time())
        for data, address in datagrams:
            self._owner.send_datagram(data, address)
        return len(datagrams)

    def _process_events(self) -> None:
        while (event := self._quic.next_event()) is not None:
            if isinstance(event, events.StreamDataReceived):
                stream = self._stream_for_event(event.stream_id)
                if stream is not None:
                    stream._on_data(event.data, event.end_stream)
            elif isinstance(event, events.DatagramFrameReceived):
                refusal = self._config.client_datagram_error
                if refusal is not None and not self.is_client:
                    if not self.is_closed:
                        self._close(refusal, "a datagram from a client")
                    continue
                if self._on_datagram is not None:
                    self._on_datagram(event.data)
                    continue
                if len(self._datagrams) >= self._config.datagram_receive_queue:
                    self._datagrams.popleft()
                    self.datagrams_dropped += 1
                self._datagrams.append(event.data)
                self._datagram_arrived.unpark_all()
            elif isinstance(event, events.StreamReset):
                stream = self._stream_for_event(event.stream_id)
                if stream is not None:
                    stream._on_reset(event.error_code)
            elif isinstance(event, events.StopSendingReceived):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream._on_stop_sending(event.error_code)
                    self._send_progress.unpark_all()
            elif isinstance(event, events.ConnectionIdIssued):
                self._register_cid(event.connection_id)
            elif isinstance(event, events.ConnectionIdRetired):
                self._cids.discard(event.connection_id)
                self._owner.unregister_cid(event.connection_id)
            elif isinstance(event, events.HandshakeCompleted):
                self._on_handshake_completed(event)
            elif isinstance(event, events.ConnectionTerminated):
                self._on_terminated(event)

    def _on_handshake_completed(self, event: events.HandshakeCompleted) -> None:
        self._handshake_complete = True
        if self._config.keepalive_interval is not None:
            self._next_keepalive = trio.current_time() + self._config.keepalive_interval
        if self.is_client:
            # A resumed session sends no certificate: the ticket stands for the key
            # its server proved when it issued it.
            self.session_resumed = event.session_resumed
            self.peer_key = (
                self._resumed_peer_key
                if event.session_resumed
                else certificate_raw_key(_aioquic.peer_certificate(self._quic))
            )
            expected = self._expected_peer_key
            if expected is not None and self.peer_key != expected:
                self._quic.close(
                    error_code=_BAD_CERTIFICATE,
                    frame_type=QuicFrameType.CRYPTO,
                    reason_phrase="peer key mismatch",
                )
                self._fail(partial(PeerKeyMismatch, expected, self.peer_key))
                return
            self._send_early_data()  # 1-RTT keys are here: it leaves with our Finished
        else:
            self.peer_key = certificate_raw_key(_aioquic.peer_certificate(self._quic))
        self._established.set()
        self._owner.connection_established(self)

    def _on_terminated(self, event: events.ConnectionTerminated) -> None:
        if not self.is_closed:
            # Only a timeout ends a connection without a close frame first.
            reason = event.reason_phrase
            code: int | None = event.error_code
            if reason == "Idle timeout" and event.frame_type == QuicFrameType.PADDING:
                code, reason = None, "idle timeout"
            kind = ConnectionLost if self._handshake_complete else HandshakeFailed
            self._fail(partial(kind, code, reason, by_peer=False))
        self._finish()

    def _detect_close(self) -> None:
        """Report a peer's close now rather than after aioquic's draining period."""
        if self.is_closed:
            return
        state = _aioquic.close_state(self._quic)
        if state is None:
            return
        event, by_peer = state
        kind = ConnectionLost if self._handshake_complete else HandshakeFailed
        self._fail(partial(kind, event.error_code, event.reason_phrase, by_peer=by_peer))

    def _fail(self, error: Callable[[], ConnectionLost]) -> None:
        exc = error()
        self._error = error
        self.close_code = exc.error_code
        self.close_reason = exc.reason
        self.closed_by_peer = exc.by_peer
        self._wake_all()
        self._closed.set()

    def _finish(self) -> None:
        """aioquic is done with this connection: release its ids and its timer task."""
        if self._done:
            return
        self._done = True
        for cid in self._cids:
            self._owner.unregister_cid(cid)
        self._cids.clear()
        self._timer_scope.cancel()
        self._owner.connection_finished(self)
        self._wake_all()
        self._closed.set()
        # Past here no stream waits on this connection (every operation raises), so
        # drop what points back to it: refcounting frees it, not the cyclic collector.
        self._streams.clear()
        _aioquic.release(self._quic)

    def _wake_all(self) -> None:
        self._established.set()
        self._stream_arrived.unpark_all()
        self._datagram_arrived.unpark_all()
        self._send_progress.unpark_all()
        for stream in self._streams.values():
            stream._wake()

    def _stream_for_event(self, stream_id: int) -> QuicStream | None:
        """The wrapper for an event's stream, creating it for a new peer stream."""
        stream = self._streams.get(stream_id)
        if stream is not None:
            return None if stream._closed else stream
        if stream_is_client_initiated(stream_id) == self.is_client:
            return None  # one of ours that the application closed and we forgot
        self._sweep_streams()
        stream = self._streams[stream_id] = QuicStream(self, stream_id, is_client=self.is_client)
        if len(self._incoming_streams) >= _MAX_UNACCEPTED_STREAMS:
            stream.reset(_STREAM_REFUSED)
            return None
        self._incoming_streams.append(stream)
        self._stream_arrived.unpark_all()
        return stream

    def _sweep_streams(self) -> None:
        """Forget closed streams aioquic is done with; amortised over stream creation."""
        if len(self._streams) < self._sweep_at:
            return
        for stream_id, stream in list(self._streams.items()):
            if stream._closed and _aioquic.stream_is_discarded(self._quic, stream_id):
                del self._streams[stream_id]
                self._quic.forget_stream(stream_id)
        self._sweep_at = max(64, 2 * len(self._streams))

    # Called by QuicStream

    def _early_data_end(self, stream_id: int) -> int:
        return self._quic.early_data_end.get(stream_id, 0)

    def _unacknowledged(self, stream_id: int) -> int:
        return _aioquic.unacked_send_bytes(self._quic, stream_id)

    def _send_room(self, stream_id: int) -> int:
        return self._config.stream_send_buffer - self._unacknowledged(stream_id)

    async def _wait_send_progress(self) -> None:
        await self._send_progress.park()

    def _send_stream_data(self, stream_id: int, data: bytes, *, end: bool) -> None:
        self._quic.send_stream_data(stream_id, data, end_stream=end)
        self._pump()

    def _consumed(self, stream_id: int, size: int) -> None:
        if self._quic.stream_consumed(stream_id, size):
            self._pump()

    def _abort_stream(self, stream_id: int, error_code: int, *, reset: bool, stop: bool) -> None:
        if self.is_closed:
            return
        if reset:
            self._quic.reset_stream(stream_id, error_code)
        if stop and not _aioquic.stream_is_discarded(self._quic, stream_id):
            self._quic.stop_stream(stream_id, error_code)
        self._pump()
