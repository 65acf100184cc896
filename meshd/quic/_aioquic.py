"""Every use of aioquic internals lives here, so an aioquic upgrade breaks one file.

aioquic's public sans-I/O API has no way to ask how much of a stream is still
unacknowledged, whether the peer has already closed (it reports that only after
the draining period), which certificate the peer presented, to grant flow
control credit as the application reads rather than as bytes arrive, to choose the
key exchange group, to ask a client for its certificate, to tell 0-RTT stream data
from 1-RTT, to delay ACKs longer, to acknowledge less often than once per packet, or to
let a finished connection be freed without the cyclic garbage collector.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from aioquic import tls
from aioquic.buffer import Buffer  # type: ignore[attr-defined]  # re-exported from _buffer
from aioquic.quic.connection import QuicConnection, QuicConnectionState, QuicReceiveContext
from aioquic.quic.events import ConnectionTerminated
from aioquic.quic.packet import pull_quic_transport_parameters, push_quic_transport_parameters
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketSpace
from aioquic.quic.stream import QuicStream as _AioStream
from cryptography import x509

# Short header byte + packet number (aioquic may use up to 4 bytes) + AEAD tag,
# then the DATAGRAM frame's type byte and a 2-byte length varint.
_ONE_RTT_OVERHEAD = 1 + 4 + 16
_DATAGRAM_FRAME_OVERHEAD = 1 + 2


class MeshQuicConnection(QuicConnection):
    """A QuicConnection whose per-stream receive credit follows what was consumed.

    Stock aioquic doubles a stream's credit as soon as data arrives, whether or
    not anyone reads it, so a peer can fill our memory through a stream nobody
    reads. Here the credit is ``consumed + window``, refreshed once half the
    window has been read.

    With ``max_ack_delay`` (seconds) it acknowledges every second ack-eliciting 1-RTT
    packet at once and a lone one after that delay, which it advertises as its
    ``max_ack_delay`` transport parameter; stock aioquic acknowledges each packet after
    1 ms. A receiver of a steady flow of datagrams then sends half the ACKs, from the
    receive path rather than from a timer of its own.
    """

    def __init__(
        self,
        *,
        max_ack_delay: float | None = None,
        request_client_certificate: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._request_client_certificate = request_client_certificate
        self._max_ack_delay = max_ack_delay
        if max_ack_delay is not None:
            self._ack_delay = max_ack_delay
        self._consumed: dict[int, int] = {}
        self.early_data_end: dict[int, int] = {}
        """Per stream, the offset up to which data came in 0-RTT packets (an attacker can
        replay those); streams without 0-RTT data are absent."""

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        # Only X25519 (docs/spec.md §2): a client makes one key share instead of four
        # (P-256, P-384, X25519, X448), and no client can make a server do a costlier ECDH.
        self.tls._supported_groups = [tls.Group.X25519]
        if self._request_client_certificate:
            # A server asks for the client's certificate (docs/spec.md §3, child check):
            # aioquic supports it, but only behind this attribute.
            self.tls._request_client_certificate = True

    def _handle_stream_frame(
        self, context: QuicReceiveContext, frame_type: int, buf: Buffer
    ) -> None:
        if context.epoch is tls.Epoch.ZERO_RTT:
            # STREAM frame: id, then offset and length if their type bits say so (RFC 9000
            # §19.8); without a length the data runs to the end of the packet.
            start = buf.tell()
            stream_id = buf.pull_uint_var()
            offset = buf.pull_uint_var() if frame_type & 0x04 else 0
            length = buf.pull_uint_var() if frame_type & 0x02 else buf.capacity - buf.tell()
            buf.seek(start)
            end = max(self.early_data_end.get(stream_id, 0), offset + length)
            self.early_data_end[stream_id] = end
        super()._handle_stream_frame(context, frame_type, buf)

    def _serialize_transport_parameters(self) -> bytes:
        data: bytes = super()._serialize_transport_parameters()
        if self._max_ack_delay is None:
            return data
        # aioquic always advertises 25 ms; the peer's loss recovery must wait for ours.
        parameters = pull_quic_transport_parameters(Buffer(data=data))
        parameters.max_ack_delay = round(self._max_ack_delay * 1000)
        buf = Buffer(capacity=len(data) + 8)
        push_quic_transport_parameters(buf, parameters)
        return bytes(buf.data)

    def _payload_received(
        self, context: QuicReceiveContext, plain: bytes, crypto_frame_required: bool = False
    ) -> tuple[bool, bool]:
        is_ack_eliciting, is_probing = super()._payload_received(
            context, plain, crypto_frame_required
        )
        if (
            is_ack_eliciting
            and self._max_ack_delay is not None
            and context.epoch is tls.Epoch.ONE_RTT
        ):
            # An ACK is already due later for an earlier packet: this is the second
            # unacknowledged one, so the ACK leaves with the reply to this datagram.
            space = self._spaces[tls.Epoch.ONE_RTT]
            if space.ack_at is not None:
                space.ack_at = context.time
        return is_ack_eliciting, is_probing

    def stream_consumed(self, stream_id: int, size: int) -> bool:
        """Record that the application read ``size`` bytes; True if credit is due."""
        consumed = self._consumed.get(stream_id, 0) + size
        self._consumed[stream_id] = consumed
        stream = self._streams.get(stream_id)
        if stream is None:
            return False
        window = self._configuration.max_stream_data
        return consumed + window - stream.max_stream_data_local >= window // 2

    def forget_stream(self, stream_id: int) -> None:
        """Drop the consumption record of a stream the application has finished with."""
        self._consumed.pop(stream_id, None)

    def _write_stream_limits(
        self, builder: QuicPacketBuilder, space: QuicPacketSpace, stream: _AioStream
    ) -> None:
        if stream.max_stream_data_local and stream.stream_id is not None:
            window = self._configuration.max_stream_data
            target = self._consumed.get(stream.stream_id, 0) + window
            if target - stream.max_stream_data_local >= window // 2:
                stream.max_stream_data_local = target
        # aioquic doubles the credit when highest_offset passes half of it; hide
        # the offset for the duration of the call so that only our rule applies.
        highest = stream.receiver.highest_offset
        stream.receiver.highest_offset = 0
        try:
            super()._write_stream_limits(builder, space, stream)
        finally:
            stream.receiver.highest_offset = highest


def unacked_send_bytes(quic: QuicConnection, stream_id: int) -> int:
    """Bytes written to a stream and not yet acknowledged (0 once aioquic dropped it)."""
    stream = quic._streams.get(stream_id)
    if stream is None or stream.sender._reset_error_code is not None:
        return 0
    return len(stream.sender._buffer)


def stream_is_discarded(quic: QuicConnection, stream_id: int) -> bool:
    """Whether aioquic has finished with a stream and will report nothing more on it."""
    return stream_id not in quic._streams


def pending_datagrams(quic: QuicConnection) -> deque[bytes]:
    """aioquic's outgoing DATAGRAM queue, which it never trims on its own."""
    return quic._datagrams_pending


def peer_certificate(quic: QuicConnection) -> x509.Certificate | None:
    """The leaf certificate the peer presented; aioquic keeps it on its TLS context."""
    tls = getattr(quic, "tls", None)
    return None if tls is None else tls._peer_certificate


def close_state(quic: QuicConnection) -> tuple[ConnectionTerminated, bool] | None:
    """(close event, closed by peer) as soon as a close is known, before draining ends."""
    event = quic._close_event
    if event is None:
        return None
    return event, quic._state is QuicConnectionState.DRAINING


def remote_max_datagram_frame_size(quic: QuicConnection) -> int | None:
    """The peer's max_datagram_frame_size transport parameter, once the handshake has it."""
    size: int | None = quic._remote_max_datagram_frame_size
    return size


def max_datagram_payload(quic: QuicConnection) -> int:
    """The largest DATAGRAM payload that fits one packet and the peer's limit."""
    in_packet = (
        quic._max_datagram_size
        - _ONE_RTT_OVERHEAD
        - len(quic._peer_cid.cid)
        - _DATAGRAM_FRAME_OVERHEAD
    )
    remote = quic._remote_max_datagram_frame_size
    if remote is None:
        return 0
    return max(0, min(in_packet, remote - _DATAGRAM_FRAME_OVERHEAD))


def smoothed_rtt(quic: QuicConnection) -> float | None:
    """aioquic's smoothed round-trip time in seconds; None before the first sample."""
    loss = quic._loss
    return loss._rtt_smoothed if loss._rtt_initialized else None


def can_send_0rtt(quic: QuicConnection) -> bool:
    """Whether a client connection resumed a session that lets it send 0-RTT data now."""
    return bool(quic._cryptos[tls.Epoch.ZERO_RTT].send.is_valid())


def set_ack_delay(quic: QuicConnection, seconds: float) -> None:
    """Acknowledge received packets after this long (aioquic: 1 ms; the peer allows 25)."""
    quic._ack_delay = seconds


def _ignore(*args: object) -> None:
    """A callback for a connection that is done: nothing happens any more."""


def release(quic: QuicConnection) -> None:
    """Break the reference cycles of a connection aioquic is done with (its callbacks are
    bound methods of itself), so it is freed as soon as nobody holds it.

    Left to the cyclic garbage collector, each one (hundreds of objects) lives long enough
    to reach the oldest generation, and a tracker, which makes a connection per request,
    spent about a sixth of its CPU in full collections.
    """
    vars(quic)["_QuicConnection__frame_handlers"] = {}
    quic._loss._send_probe = _ignore
    quic._session_ticket_fetcher = quic._session_ticket_handler = None
    context = getattr(quic, "tls", None)  # made by the first packet
    if context is not None:
        context.alpn_cb = context.get_session_ticket_cb = context.new_session_ticket_cb = None
        context.update_traffic_key_cb = _ignore
    for pair in quic._cryptos.values():
        for crypto in (pair.recv, pair.send):
            crypto._setup_cb = crypto._teardown_cb = _ignore
