"""Talking to the implementation under test: raw bytes out, everything that comes back in.

A `Link` is one QUIC connection (meshd's own endpoint) and the first bidirectional
stream on it. The suite writes whatever bytes a case needs, valid or not, and reads
back, in arrival order, the messages on the stream, the datagrams, the end of the
stream and the connection's close with its code. Nothing is interpreted here beyond
framing and decoding: judging is the cases' job.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from typing import Any

import msgpack
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.quic import ConnectionLost, QuicConn, QuicEndpoint, QuicStream, StreamReset
from protocol import ErrorCode, Goodbye, Message, MessageReader, ProtocolError, decode_message
from protocol.framing import frame_bytes
from protocol.identity import sign


@dataclass(frozen=True)
class Received:
    """A message from the implementation; `raw` is its encoding (without a length prefix)."""

    message: Message
    raw: bytes
    datagram: bool


@dataclass(frozen=True)
class Undecodable:
    """Bytes from the implementation that are not a valid meshd/2 message (or frame)."""

    error: str
    datagram: bool


@dataclass(frozen=True)
class StreamEnded:
    """The implementation finished (FIN) or reset its side of the stream."""

    reset_code: int | None = None


@dataclass(frozen=True)
class Closed:
    """The connection is closed: `code` is the application close code (None: timed out)."""

    code: int | None
    reason: str
    by_peer: bool


Event = Received | Undecodable | StreamEnded | Closed


def code_name(code: int | None) -> str:
    if code is None:
        return "no code"
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"code {code:#x}"


def describe(msg: Message) -> str:
    """A one-line rendering of a message: `GOODBYE(MALFORMED_MESSAGE, 'why')`."""
    name = _SPEC_NAMES.get(type(msg).__name__, type(msg).__name__.upper())
    if isinstance(msg, Goodbye):
        return f"GOODBYE({code_name(msg.code)}, {msg.reason[:60]!r})"
    parts = [f"{field.name}={_short(getattr(msg, field.name))}" for field in fields(msg)]
    return f"{name}({', '.join(parts)})"


_SPEC_NAMES = {
    "StatusRequest": "STATUS",
    "StatusReport": "STATUS_REPORT",
    "PathUpdate": "PATH",
    "StreamInfo": "STREAM_INFO",
    "RetryAfter": "RETRY_AFTER",
}


def _short(value: Any) -> str:
    if isinstance(value, bytes):
        return value[:4].hex() + "…" if len(value) > 8 else value.hex()
    if isinstance(value, tuple):
        if len(value) > 6:
            return f"[{len(value)} items]"
        return "[" + ", ".join(_short(item) for item in value) + "]"
    if hasattr(value, "__dataclass_fields__"):
        return "(" + ", ".join(_short(getattr(value, f.name)) for f in fields(value)) + ")"
    return repr(value)


def describe_event(event: Event) -> str:
    if isinstance(event, Received):
        return describe(event.message) + (" as a datagram" if event.datagram else "")
    if isinstance(event, Undecodable):
        return f"undecodable {'datagram' if event.datagram else 'bytes'}: {event.error}"
    if isinstance(event, StreamEnded):
        if event.reset_code is None:
            return "end of stream"
        return f"stream reset ({code_name(event.reset_code)})"
    if event.code is None:
        return "connection lost (timed out)"
    who = "by the implementation" if event.by_peer else "by the suite"
    return f"connection closed {who} with {code_name(event.code)}"


# -- building raw messages -------------------------------------------------------------


def packb(items: Any) -> bytes:
    """msgpack as the reference encoder writes it (canonical: shortest forms, bin for bytes)."""
    packed: bytes = msgpack.packb(items, use_bin_type=True)
    return packed


def signed(items: Sequence[Any], key: Ed25519PrivateKey, context: bytes = b"") -> bytes:
    """`items` (type code and every field but sig) encoded with a signature appended."""
    return packb([*items, sign(key, context, packb(list(items)))])


def framed(encoded: bytes) -> bytes:
    return frame_bytes(encoded)


# -- one connection ----------------------------------------------------------------------


class Link:
    """A connection to the implementation with its control stream (stream id 0)."""

    def __init__(self, conn: QuicConn, stream: QuicStream, nursery: trio.Nursery) -> None:
        self.conn = conn
        self.stream = stream
        self.events: list[Event] = []
        """Everything received so far, in order (also those `next_event` returned)."""
        self._send_events, self._receive_events = trio.open_memory_channel[Event](math.inf)
        nursery.start_soon(self._pump_stream)
        nursery.start_soon(self._pump_datagrams)

    async def send(self, data: bytes, *, eof: bool = False) -> None:
        await self.stream.send_all(data)
        if eof:
            await self.stream.send_eof()

    def send_datagram(self, data: bytes) -> None:
        self.conn.send_datagram(data)

    async def next_event(self, within: float) -> Event | None:
        """The next thing the implementation did, or None if it did nothing `within` s
        (callers pass what is left of a deadline: it may already have passed)."""
        with trio.move_on_after(max(0.0, within)):
            return await self._receive_events.receive()
        return None

    async def next_message(self, within: float) -> Received | Event | None:
        """Like `next_event`, but skips datagrams (live chunks) to the next stream event."""
        deadline = trio.current_time() + within
        while (event := await self.next_event(deadline - trio.current_time())) is not None:
            if not (isinstance(event, Received) and event.datagram):
                return event
        return None

    async def _pump_stream(self) -> None:
        reader = MessageReader()
        try:
            while True:
                data = await self.stream.receive_some(65536)
                try:
                    reader.receive_data(data)
                    while (msg := reader.next_message()) is not None:
                        self._emit(Received(msg, reader.last_raw, datagram=False))
                except ProtocolError as exc:
                    self._emit(Undecodable(f"{code_name(exc.code)}: {exc}", datagram=False))
                    break
                if not data:
                    self._emit(StreamEnded())
                    break
        except StreamReset as exc:
            self._emit(StreamEnded(exc.error_code))
        except ConnectionLost as exc:
            self._emit(Closed(exc.error_code, exc.reason, exc.by_peer))
            return
        except trio.ClosedResourceError:
            return
        await self.conn.wait_closed()
        self._emit(Closed(self.conn.close_code, self.conn.close_reason, self.conn.closed_by_peer))

    async def _pump_datagrams(self) -> None:
        while True:
            try:
                data = await self.conn.receive_datagram()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            try:
                self._emit(Received(decode_message(data), data, datagram=True))
            except ProtocolError as exc:
                self._emit(Undecodable(f"{code_name(exc.code)}: {exc}", datagram=True))

    def _emit(self, event: Event) -> None:
        self.events.append(event)
        self._send_events.send_nowait(event)


@asynccontextmanager
async def open_link(
    endpoint: QuicEndpoint,
    address: tuple[str, int],
    *,
    peer_key: bytes | None,
    within: float,
) -> AsyncIterator[Link]:
    """Connect (pinning `peer_key` if given), open the control stream, and close the
    connection with NO_ERROR at the end unless the implementation closed it first."""
    with trio.fail_after(within):
        conn = await endpoint.connect(address, expected_peer_key=peer_key)
    async with conn, trio.open_nursery() as nursery:
        stream = await conn.open_stream()
        link = Link(conn, stream, nursery)
        try:
            yield link
        finally:
            nursery.cancel_scope.cancel()
