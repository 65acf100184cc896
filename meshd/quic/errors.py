"""Exceptions raised by the QUIC layer.

"Closed by us" raises ``trio.ClosedResourceError``; everything the peer or the
network did to us raises a ``trio.BrokenResourceError`` subclass from here, so
callers can tell a bug in their own code from a peer going away.
"""

from __future__ import annotations

import trio
from aioquic.quic.packet import QuicErrorCode
from aioquic.tls import AlertDescription

from meshd.quic.config import DEFAULT_ALPN

NO_APPLICATION_PROTOCOL = QuicErrorCode.CRYPTO_ERROR + AlertDescription.no_application_protocol
"""The TLS alert a peer sends when no ALPN (protocol version) is common to both."""


class ConnectionLost(trio.BrokenResourceError):
    """The connection was closed by the peer, timed out or failed its handshake.

    ``error_code`` is the peer's close code (``None`` for a local timeout),
    ``reason`` its reason phrase, ``by_peer`` whether the peer sent the close.
    """

    def __init__(self, error_code: int | None, reason: str, *, by_peer: bool) -> None:
        self.error_code = error_code
        self.reason = reason
        self.by_peer = by_peer
        who = "peer closed the connection" if by_peer else "connection lost"
        code = "" if error_code is None else f" with code {error_code:#x}"
        super().__init__(f"{who}{code}: {reason or 'no reason given'}")


class HandshakeFailed(ConnectionLost):
    """The QUIC/TLS handshake did not complete (timeout, refusal, TLS alert)."""

    def __init__(self, error_code: int | None, reason: str, *, by_peer: bool) -> None:
        if error_code == NO_APPLICATION_PROTOCOL:
            reason = f"{reason or 'no common ALPN'} (it speaks another version than {DEFAULT_ALPN})"
        super().__init__(error_code, reason, by_peer=by_peer)


class PeerKeyMismatch(HandshakeFailed):
    """The peer's certificate does not carry the Ed25519 key we were told to expect."""

    def __init__(self, expected: bytes, actual: bytes | None) -> None:
        self.expected = expected
        self.actual = actual
        got = actual.hex() if actual is not None else "no Ed25519 key"
        super().__init__(
            None, f"peer key mismatch: expected {expected.hex()}, got {got}", by_peer=False
        )


class StreamReset(trio.BrokenResourceError):
    """The peer reset its sending side, or asked us to stop sending (STOP_SENDING)."""

    def __init__(self, stream_id: int, error_code: int, *, stop_sending: bool) -> None:
        self.stream_id = stream_id
        self.error_code = error_code
        what = "asked us to stop sending on" if stop_sending else "reset"
        super().__init__(f"peer {what} stream {stream_id} with code {error_code:#x}")


class DatagramTooLarge(ValueError):
    """A datagram payload does not fit in one QUIC DATAGRAM frame.

    Raised at once instead of queueing: an oversize frame would sit at the head
    of aioquic's queue forever and stall every datagram behind it.
    """

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"datagram of {size} bytes exceeds the limit of {limit} bytes")
