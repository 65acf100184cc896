"""Endpoint settings, and the aioquic configurations derived from them."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

DEFAULT_ALPN = "meshd/2"
# Large enough that the packet size, not the peer's limit, bounds a datagram.
MAX_DATAGRAM_FRAME_SIZE = 65536
# Below the 25 ms max_ack_delay aioquic advertises: holding a reply delays an ACK.
MAX_REPLY_DELAY = 0.02


@dataclass(frozen=True)
class EndpointConfig:
    """Tunables of one endpoint; the defaults suit a relay with a handful of peers.

    ``stream_send_buffer`` bounds the unacknowledged bytes per stream before
    ``send_all`` waits; ``stream_receive_window`` is the credit granted to a
    peer beyond what the application has read, so a reader that stalls stalls
    its sender instead of growing our memory.

    ``session_tickets`` is how many TLS session tickets a server keeps so that clients
    can resume (0: it issues none). ``reply_delay`` is how long a server connection
    that was handed stream data holds what it has to send (ACKs, HANDSHAKE_DONE), so
    that the application's reply leaves in the same packet: a request/response server
    (the tracker) then sends one packet per request instead of three.

    ``max_ack_delay``, when set, is how long a connection may hold the ACK of a lone
    packet (seconds; it advertises that as its ``max_ack_delay``); every second
    ack-eliciting packet is acknowledged at once. None: aioquic's ACK after 1 ms.

    Admission (what a flood of connections from one place can take): once
    ``retry_above`` handshakes are pending, a new connection must first prove it owns its
    source address with a QUIC Retry (RFC 9000 §8.1.2; 0: always, None: never), so
    Initials from spoofed or never-answering sources create no state. A source network
    (IPv4 /24, IPv6 /48) may hold ``max_connections_per_network`` server connections
    (handshaking or open), have ``max_pending_per_network`` handshakes pending, and
    start ``handshakes_per_network`` handshakes a second after a burst of
    ``handshake_burst`` (0: no rate limit); Initials beyond any are dropped, which
    slows an honest client behind that network (it sends its Initial again) and costs a
    flood nothing.

    With ``request_client_certificate`` a server asks every client for its certificate
    (TLS client authentication), and ``QuicConn.peer_key`` is then the client's key on
    the server side too (None if it presented none). A resumed session carries none.

    ``client_datagram_error``, when set, is the application error code a server
    connection closes with when its client sends a DATAGRAM frame (None: datagrams are
    delivered). In meshd datagrams flow only from a parent to its child.
    """

    alpn: str = DEFAULT_ALPN
    max_connections: int = 1024
    max_pending_handshakes: int = 128
    handshake_timeout: float = 10.0
    idle_timeout: float = 10.0
    keepalive_interval: float | None = 3.0
    retry_above: int | None = 16
    max_connections_per_network: int = 64
    max_pending_per_network: int = 8
    handshakes_per_network: float = 8.0
    handshake_burst: int = 32
    stream_send_buffer: int = 256 * 1024
    stream_receive_window: int = 1024 * 1024
    connection_receive_window: int = 4 * 1024 * 1024
    datagram_send_queue: int = 64
    datagram_receive_queue: int = 256
    session_tickets: int = 0
    reply_delay: float = 0.0
    max_ack_delay: float | None = None
    client_datagram_error: int | None = None
    request_client_certificate: bool = False

    def __post_init__(self) -> None:
        if self.keepalive_interval is not None and not (
            0 < self.keepalive_interval < self.idle_timeout
        ):
            raise ValueError("keepalive_interval must be positive and below idle_timeout")
        for name in (
            "max_connections",
            "max_pending_handshakes",
            "max_connections_per_network",
            "max_pending_per_network",
            "handshake_burst",
            "stream_send_buffer",
            "stream_receive_window",
            "connection_receive_window",
            "datagram_send_queue",
            "datagram_receive_queue",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.retry_above is not None and self.retry_above < 0:
            raise ValueError("retry_above must be 0 (always retry), more, or None (never)")
        if self.handshakes_per_network < 0:
            raise ValueError("handshakes_per_network must be 0 (no limit) or more")
        if self.session_tickets < 0:
            raise ValueError("session_tickets must be 0 (none) or more")
        if not 0 <= self.reply_delay <= MAX_REPLY_DELAY:
            raise ValueError(f"reply_delay must be from 0 to {MAX_REPLY_DELAY} s")
        if self.max_ack_delay is not None and not 0.001 <= self.max_ack_delay < 2**14 / 1000:
            raise ValueError("max_ack_delay must be from 1 ms to 16.383 s (RFC 9000 §18.2)")

    def quic_configuration(
        self,
        *,
        is_client: bool,
        certificate: x509.Certificate,
        private_key: Ed25519PrivateKey,
    ) -> QuicConfiguration:
        """Both sides present a certificate; nobody verifies chains (keys are pinned)."""
        return QuicConfiguration(
            alpn_protocols=[self.alpn],
            is_client=is_client,
            idle_timeout=self.idle_timeout,
            max_data=self.connection_receive_window,
            max_stream_data=self.stream_receive_window,
            max_datagram_frame_size=MAX_DATAGRAM_FRAME_SIZE,
            certificate=certificate,
            private_key=private_key,
            verify_mode=ssl.CERT_NONE,
        )
