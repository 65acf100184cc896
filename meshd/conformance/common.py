"""What every target shares: the connection settings, and the cases that hold for any
QUIC server speaking meshd/2 (handshake, framing, decoding).

Each common case is added to a target's case list by `add_common_cases`; `first` is a
valid first message for that target, used where a case needs one (trailing bytes,
non-canonical encodings).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

import trio
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.conformance.report import Level, Outcome, Verdict
from meshd.conformance.suite import CaseList, Reply, judge_error, read_reply
from meshd.conformance.wire import Link, framed, open_link, packb
from meshd.quic import HandshakeFailed, QuicEndpoint, open_quic_endpoint
from meshd.quic.identity import certificate_raw_key
from protocol import ErrorCode
from protocol.identity import key_to_text

MIN_DATAGRAM_FRAME_SIZE = 1200


@dataclass
class Target:
    """An implementation under test that serves QUIC at `address`."""

    endpoint: QuicEndpoint
    address: tuple[str, int]
    peer_key: bytes | None
    """The node id its certificate must carry, if the user gave it."""
    timeout: float = 3.0
    """How long to wait for any answer."""
    close_wait: float = 1.0
    """How long after a GOODBYE to wait for the connection's close."""

    @asynccontextmanager
    async def link(self) -> AsyncIterator[Link]:
        async with open_link(
            self.endpoint, self.address, peer_key=self.peer_key, within=self.timeout
        ) as link:
            yield link

    async def send_and_read(self, data: bytes, *, eof: bool = False) -> Reply:
        """Open a link, write `data` on its stream, and read the reply."""
        async with self.link() as link:
            await link.send(data, eof=eof)
            return await read_reply(link, self.timeout, self.close_wait)

    async def expect_error(
        self,
        data: bytes,
        codes: Collection[ErrorCode],
        sent: str,
        *,
        eof: bool = False,
        refusal: bool = False,
        note: str = "",
    ) -> Outcome:
        """Write `data` as the first bytes of a link and judge the error that comes back."""
        reply = await self.send_and_read(data, eof=eof)
        return judge_error(reply, sent, codes, refusal=refusal, note=note)


T = TypeVar("T", bound=Target)


def add_common_cases(cases: CaseList[T], first: bytes, first_name: str) -> None:
    """Register the handshake, framing and decoding cases; `first` is the encoding of a
    valid first message for this target (named `first_name` in reports)."""

    def error_case(
        case_id: str,
        section: str,
        title: str,
        data: bytes,
        sent: str,
        codes: Collection[ErrorCode],
        *,
        eof: bool = False,
        level: Level = Level.MUST,
        note: str = "",
    ) -> None:
        async def run(target: T) -> Outcome:
            return await target.expect_error(data, codes, sent, eof=eof, note=note)

        cases.case(case_id, section, level, title)(run)

    cases.case("2-alpn-refused", "2", Level.MUST, "a client offering another ALPN is refused")(
        _alpn_refused
    )
    cases.case(
        "2-datagram-parameter",
        "2",
        Level.MUST,
        f"max_datagram_frame_size is advertised and at least {MIN_DATAGRAM_FRAME_SIZE}",
    )(_datagram_parameter)
    cases.case(
        "3-certificate",
        "3",
        Level.MUST,
        "the certificate is self-signed with the server's Ed25519 key (its node id)",
    )(_certificate)

    error_case(
        "4.2-zero-length",
        "4.2",
        "a frame of length 0 is MALFORMED_MESSAGE",
        bytes(4),
        "00000000",
        {ErrorCode.MALFORMED_MESSAGE},
    )
    error_case(
        "4.2-over-length",
        "4.2",
        "a length prefix above 65,536 is MESSAGE_TOO_LARGE, rejected before the body",
        (65_537).to_bytes(4, "big"),
        "00010001 (no body follows, the stream stays open)",
        {ErrorCode.MESSAGE_TOO_LARGE},
    )
    error_case(
        "4.2-truncated",
        "4.2",
        "a stream that ends inside a frame is MALFORMED_MESSAGE",
        (10).to_bytes(4, "big") + b"\x92\x15",
        "0000000a 9215, then FIN",
        {ErrorCode.MALFORMED_MESSAGE},
        eof=True,
    )
    error_case(
        "4.1-not-msgpack",
        "4.1",
        "bytes that are not MessagePack are MALFORMED_MESSAGE",
        framed(b"\xc1"),
        "00000001 c1 (a byte MessagePack never uses)",
        {ErrorCode.MALFORMED_MESSAGE},
    )
    error_case(
        "4.1-trailing-bytes",
        "4.1",
        "a frame holding more than one MessagePack value is MALFORMED_MESSAGE",
        framed(first + b"\xc0"),
        f"{first_name} followed by c0 in the same frame",
        {ErrorCode.MALFORMED_MESSAGE},
    )
    error_case(
        "4.1-not-an-array",
        "4.1",
        "a value that is not an array is MALFORMED_MESSAGE",
        framed(packb({1: 2})),
        "81 01 02 (a map)",
        {ErrorCode.MALFORMED_MESSAGE},
    )
    error_case(
        "4.1-empty-array",
        "4.1",
        "an array without a type code is MALFORMED_MESSAGE",
        framed(packb([])),
        "90 (an empty array)",
        {ErrorCode.MALFORMED_MESSAGE},
    )
    error_case(
        "4.1-type-not-integer",
        "4.1",
        "an array whose first item is not an integer is MALFORMED_MESSAGE",
        framed(packb(["x"])),
        '91 a1 78 (["x"])',
        {ErrorCode.MALFORMED_MESSAGE},
    )
    error_case(
        "8-chunk-packet-bytes",
        "8",
        "a CHUNK whose packets hold more than 16,384 bytes in all is MALFORMED_MESSAGE",
        framed(packb([0x03, 0, 0, 0, [bytes(4000)] * 5, bytes(64)])),
        "CHUNK with 5 packets of 4,000 bytes (each within its limit, 20,000 in all)",
        {ErrorCode.MALFORMED_MESSAGE},
    )
    error_case(
        "4.1-unknown-type",
        "4.1",
        "an unknown type code is UNKNOWN_MESSAGE",
        framed(packb([0x7F])),
        "91 7f ([0x7f])",
        {ErrorCode.UNKNOWN_MESSAGE},
    )
    error_case(
        "4.1-negative-type",
        "4.1",
        "a negative type code is UNKNOWN_MESSAGE",
        framed(packb([-1])),
        "91 ff ([-1])",
        {ErrorCode.UNKNOWN_MESSAGE},
    )

    async def non_canonical(target: T) -> Outcome:
        # The type code as `cc XX` (uint 8) instead of a positive fixint.
        data = first[:1] + b"\xcc" + first[1:]
        reply = await target.send_and_read(framed(data))
        sent = f"{first_name} with its type code as cc {first[1]:02x} (uint 8)"
        expected = f"the answer to {first_name}, as if it were in its shortest form"
        codes = [event.code for event in (reply.goodbye, reply.closed) if event is not None]
        refused = any(code in _FORM_ERRORS for code in codes)
        answered = reply.first_message() is not None
        verdict = Verdict.PASS if answered and not refused else Verdict.FAIL
        return Outcome(verdict, sent, expected, reply.describe())

    cases.case(
        "4.1-non-canonical",
        "4.1",
        Level.MUST,
        "a message whose type code is not in its shortest form is accepted",
    )(non_canonical)


_FORM_ERRORS = frozenset({ErrorCode.MALFORMED_MESSAGE, ErrorCode.UNKNOWN_MESSAGE})
"""What a receiver that refuses a longer (valid) form answers."""


async def _alpn_refused(target: Target) -> Outcome:
    sent = "a QUIC handshake offering only ALPN meshd/0"
    expected = "the handshake refused (TLS no_application_protocol)"
    config = dataclasses.replace(target.endpoint.config, alpn="meshd/0")
    async with open_quic_endpoint(Ed25519PrivateKey.generate(), config=config) as endpoint:
        try:
            with trio.fail_after(target.timeout):
                conn = await endpoint.connect(target.address)
        except HandshakeFailed as exc:
            return Outcome(Verdict.PASS, sent, expected, f"handshake failed: {exc}")
        await conn.aclose()
    return Outcome(Verdict.FAIL, sent, expected, "the handshake completed")


async def _datagram_parameter(target: Target) -> Outcome:
    async with target.link() as link:
        size = link.conn.peer_max_datagram_frame_size
    sent = "a QUIC handshake"
    expected = f"max_datagram_frame_size >= {MIN_DATAGRAM_FRAME_SIZE}"
    got = "not advertised" if size is None else f"max_datagram_frame_size = {size}"
    ok = size is not None and size >= MIN_DATAGRAM_FRAME_SIZE
    return Outcome(Verdict.PASS if ok else Verdict.FAIL, sent, expected, got)


async def _certificate(target: Target) -> Outcome:
    sent = "a QUIC handshake"
    wanted = "" if target.peer_key is None else f" {key_to_text(target.peer_key)}"
    expected = f"a certificate with the Ed25519 key{wanted}, signed by that key"
    # A fresh endpoint holds no session ticket: a resumed handshake shows no certificate.
    config = target.endpoint.config
    async with (
        open_quic_endpoint(Ed25519PrivateKey.generate(), config=config) as endpoint,
        open_link(endpoint, target.address, peer_key=None, within=target.timeout) as link,
    ):
        certificate = link.conn.peer_certificate
    if certificate is None:
        return Outcome(Verdict.FAIL, sent, expected, "no certificate")
    key = certificate_raw_key(certificate)
    if key is None:
        got = f"a certificate with a {type(certificate.public_key()).__name__}"
        return Outcome(Verdict.FAIL, sent, expected, got)
    got = f"Ed25519 key {key_to_text(key)}"
    if target.peer_key is not None and key != target.peer_key:
        return Outcome(Verdict.FAIL, sent, expected, got)
    try:
        certificate.verify_directly_issued_by(certificate)
    except (InvalidSignature, ValueError, TypeError) as exc:
        got += f", but not self-signed: {type(exc).__name__}"
        return Outcome(Verdict.FAIL, sent, expected, got)
    return Outcome(Verdict.PASS, sent, expected, got + ", self-signed")
