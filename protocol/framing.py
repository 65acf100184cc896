"""Message framing on QUIC streams: a 4-byte big-endian length, then one encoded message.

`MessageReader` is sans-I/O in the h11 style: feed it bytes with `receive_data`, take
messages out with `next_message`. The length is checked before any body is buffered.
"""

from __future__ import annotations

from protocol import limits
from protocol.codec import decode_message, encode_message
from protocol.errors import ErrorCode, RemoteProtocolError
from protocol.messages import Message

LENGTH_SIZE = 4


def frame_bytes(encoded: bytes) -> bytes:
    """Prefix an already encoded message with its length (relays forward chunks this way)."""
    return len(encoded).to_bytes(LENGTH_SIZE, "big") + encoded


def frame(msg: Message) -> bytes:
    """Encode `msg` and prefix it with its length."""
    return frame_bytes(encode_message(msg))


class MessageReader:
    """Splits a byte stream into messages; raises RemoteProtocolError on any violation."""

    def __init__(self, max_size: int = limits.MAX_MESSAGE_SIZE) -> None:
        self._buffer = bytearray()
        self._max_size = max_size
        self._eof = False
        self.last_raw: bytes = b""
        """The encoded bytes of the message `next_message` returned last (to forward as is)."""

    @property
    def at_eof(self) -> bool:
        """True once the peer finished its side and every complete message was taken out."""
        return self._eof and not self._buffer

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the stream; b"" means the peer ended its side of the stream."""
        if self._eof and data:
            raise RemoteProtocolError("data after end of stream", ErrorCode.UNEXPECTED_MESSAGE)
        if not data:
            self._eof = True
        self._buffer += data

    def next_message(self) -> Message | None:
        """The next complete message, or None until more data arrives."""
        if len(self._buffer) < LENGTH_SIZE:
            self._check_truncated()
            return None
        length = int.from_bytes(self._buffer[:LENGTH_SIZE], "big")
        if length == 0 or length > self._max_size:
            raise RemoteProtocolError(
                f"frame length {length} is outside 1..{self._max_size}",
                ErrorCode.MESSAGE_TOO_LARGE if length else ErrorCode.MALFORMED_MESSAGE,
            )
        end = LENGTH_SIZE + length
        if len(self._buffer) < end:
            self._check_truncated()
            return None
        raw = bytes(self._buffer[LENGTH_SIZE:end])
        del self._buffer[:end]
        self.last_raw = raw
        return decode_message(raw)

    def _check_truncated(self) -> None:
        if self._eof and self._buffer:
            raise RemoteProtocolError(
                f"stream ended inside a frame ({len(self._buffer)} bytes left)",
                ErrorCode.MALFORMED_MESSAGE,
            )
