"""Stateless answers to Initial packets: retry, refusal, version negotiation.

None of these creates connection state, which is the point: they are what a
server can afford to send to a flood of Initials from spoofed addresses.
"""

from __future__ import annotations

import os

from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE
from aioquic.quic.connection import TRANSPORT_CLOSE_FRAME_CAPACITY
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import (
    QuicErrorCode,
    QuicFrameType,
    QuicHeader,
    QuicPacketType,
    encode_quic_retry,
    encode_quic_version_negotiation,
)
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.retry import QuicRetryTokenHandler

from meshd.quic.transport import Address

_RETRY_CID_LENGTH = 8


def version_negotiation(header: QuicHeader, supported_versions: list[int]) -> bytes:
    """Tell a client which versions we speak (RFC 9000 section 6)."""
    return encode_quic_version_negotiation(
        source_cid=header.destination_cid,
        destination_cid=header.source_cid,
        supported_versions=supported_versions,
    )


def initial_close(header: QuicHeader, error_code: int) -> bytes:
    """A server Initial carrying CONNECTION_CLOSE, keyed from the client's chosen DCID."""
    assert header.version is not None, "only long-header packets are answered"
    crypto = CryptoPair()
    crypto.setup_initial(cid=header.destination_cid, is_client=False, version=header.version)
    builder = QuicPacketBuilder(
        host_cid=header.destination_cid,
        is_client=False,
        max_datagram_size=SMALLEST_MAX_DATAGRAM_SIZE,
        peer_cid=header.source_cid,
        version=header.version,
    )
    builder.start_packet(QuicPacketType.INITIAL, crypto)
    buf = builder.start_frame(
        QuicFrameType.TRANSPORT_CLOSE, capacity=TRANSPORT_CLOSE_FRAME_CAPACITY
    )
    buf.push_uint_var(error_code)
    buf.push_uint_var(QuicFrameType.PADDING)
    buf.push_uint_var(0)
    datagrams, _ = builder.flush()
    return datagrams[0]


def refusal(header: QuicHeader) -> bytes:
    """Refuse a connection (server full) so the client fails fast instead of timing out."""
    return initial_close(header, QuicErrorCode.CONNECTION_REFUSED)


class RetryGate:
    """Address validation with Retry tokens (RFC 9000 section 8.1.2)."""

    def __init__(self) -> None:
        self._tokens = QuicRetryTokenHandler()

    def challenge(self, header: QuicHeader, address: Address, now: float) -> bytes:
        """A Retry packet whose token the client must echo from ``address``."""
        assert header.version is not None, "only long-header packets are answered"
        source_cid = os.urandom(_RETRY_CID_LENGTH)
        return encode_quic_retry(
            version=header.version,
            source_cid=source_cid,
            destination_cid=header.source_cid,
            original_destination_cid=header.destination_cid,
            retry_token=self._tokens.create_token(
                address=address,
                original_destination_connection_id=header.destination_cid,
                retry_source_connection_id=source_cid,
                now=now,
            ),
        )

    def validate(self, header: QuicHeader, address: Address, now: float) -> bytes | None:
        """The original destination CID the token vouches for, or None if it is invalid."""
        try:
            return self._tokens.validate_token(
                address=address,
                destination_cid=header.destination_cid,
                token=header.token,
                now=now,
            )
        except ValueError:
            return None
