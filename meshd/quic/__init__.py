"""meshd's QUIC endpoint: aioquic's sans-I/O connection driven from trio.

One UDP socket per node serves and dials; connections carry trio-style
streams and bounded unreliable datagrams; peers are authenticated by the
Ed25519 key in their self-signed certificate.
"""

from meshd.quic.config import DEFAULT_ALPN, EndpointConfig
from meshd.quic.connection import QuicConn
from meshd.quic.endpoint import EndpointStats, QuicEndpoint, open_quic_endpoint, serve_quic
from meshd.quic.errors import (
    ConnectionLost,
    DatagramTooLarge,
    HandshakeFailed,
    PeerKeyMismatch,
    StreamReset,
)
from meshd.quic.identity import raw_public_key, self_signed_certificate
from meshd.quic.stream import QuicStream
from meshd.quic.transport import DatagramTransport, UdpTransport

__all__ = [
    "DEFAULT_ALPN",
    "ConnectionLost",
    "DatagramTooLarge",
    "DatagramTransport",
    "EndpointConfig",
    "EndpointStats",
    "HandshakeFailed",
    "PeerKeyMismatch",
    "QuicConn",
    "QuicEndpoint",
    "QuicStream",
    "StreamReset",
    "UdpTransport",
    "open_quic_endpoint",
    "raw_public_key",
    "self_signed_certificate",
    "serve_quic",
]
