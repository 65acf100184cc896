"""Admission tokens: the host signs "node N may join stream S until T"; the tracker checks.

A token is an encoded TOKEN message carried as bytes inside JOIN/REJOIN. A tracker
configured with no host keys runs in open mode and ignores tokens.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.codec import decode_message, encode_message
from protocol.errors import ErrorCode, ProtocolError, RemoteProtocolError
from protocol.messages import Token
from protocol.signing import sign_message, verify_message


def issue_token(host_key: Ed25519PrivateKey, stream: bytes, node: bytes, expires_ms: int) -> bytes:
    """What the host hands a listener it admits (e.g. in its web page or API response)."""
    return encode_message(sign_message(Token(stream, node, expires_ms), host_key))


def token_to_text(data: bytes) -> str:
    """A token as it travels out of band (docs/spec.md §5.4): URL-safe base64, no padding."""
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def token_from_text(text: str) -> bytes:
    """The bytes of a token given as `token_to_text` writes it; ValueError if not base64."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def check_token(
    data: bytes | None,
    host_keys: Sequence[Ed25519PublicKey],
    *,
    stream: bytes,
    node: bytes,
    now_ms: int,
) -> None:
    """Raise RemoteProtocolError with TOKEN_REQUIRED/INVALID/EXPIRED unless `data` admits."""
    if not host_keys:
        return
    if data is None:
        raise RemoteProtocolError("this stream needs an admission token", ErrorCode.TOKEN_REQUIRED)
    try:
        token = decode_message(data)
    except ProtocolError as exc:
        raise RemoteProtocolError(f"token: {exc}", ErrorCode.TOKEN_INVALID) from None
    if not isinstance(token, Token):
        raise RemoteProtocolError("token: not a TOKEN", ErrorCode.TOKEN_INVALID)
    if token.stream != stream or token.node != node:
        raise RemoteProtocolError("token is for another stream or node", ErrorCode.TOKEN_INVALID)
    if not _signed_by_any(token, host_keys):
        raise RemoteProtocolError("token is not signed by the host", ErrorCode.TOKEN_INVALID)
    if token.expires_ms <= now_ms:
        raise RemoteProtocolError("token has expired", ErrorCode.TOKEN_EXPIRED)


def _signed_by_any(token: Token, host_keys: Sequence[Ed25519PublicKey]) -> bool:
    for key in host_keys:
        try:
            verify_message(token, key)
        except ProtocolError:
            continue
        return True
    return False
