"""Error codes (mirroring docs/spec.md) and the exceptions raised by the protocol core."""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Application error codes carried in GOODBYE messages and QUIC CONNECTION_CLOSE frames."""

    NO_ERROR = 0x00
    INTERNAL_ERROR = 0x01
    MALFORMED_MESSAGE = 0x02
    UNKNOWN_MESSAGE = 0x03
    MESSAGE_TOO_LARGE = 0x04
    UNEXPECTED_MESSAGE = 0x05
    BAD_SIGNATURE = 0x06
    UNKNOWN_STREAM = 0x07
    NO_CAPACITY = 0x08
    TOKEN_REQUIRED = 0x09
    TOKEN_INVALID = 0x0A
    TOKEN_EXPIRED = 0x0B
    OVERLOADED = 0x0C
    STALE_REQUEST = 0x0D
    UNKNOWN_PEER = 0x0E
    GOING_AWAY = 0x0F
    STREAM_ENDED = 0x10
    PARENT_TIMEOUT = 0x11
    NOT_AVAILABLE = 0x12
    WRONG_PEER = 0x13
    BAD_PATH = 0x14
    PARENT_STALLED = 0x15
    CHILD_TIMEOUT = 0x16
    BAD_REPAIR = 0x17


class ProtocolError(Exception):
    """Anything that violates docs/spec.md; `code` says which GOODBYE/close code to send."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.MALFORMED_MESSAGE) -> None:
        super().__init__(message)
        self.code = code


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids (a bug on our side, or misuse of the API)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids."""
