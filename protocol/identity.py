"""Ed25519 identities: node ids and stream ids, their text form, and signing helpers.

A node id is the node's raw 32-byte Ed25519 public key; a stream id is the origin's.
Their text form is lowercase RFC 4648 base32 without padding (52 characters).
"""

from __future__ import annotations

import base64
import binascii

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from protocol.errors import ErrorCode, RemoteProtocolError

KEY_SIZE = 32
SIGNATURE_SIZE = 64
KEY_TEXT_LENGTH = 52
SIGNATURE_DOMAIN = b"meshd/1\x00"


def key_id(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The raw 32-byte public key that names a node or a stream."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_to_text(raw: bytes) -> str:
    """Text form of a node or stream id."""
    if len(raw) != KEY_SIZE:
        raise ValueError(f"a key id is {KEY_SIZE} bytes, got {len(raw)}")
    return base64.b32encode(raw).decode("ascii").rstrip("=").lower()


def key_from_text(text: str) -> bytes:
    """Parse the text form; raises ValueError with a hint on anything else."""
    cleaned = text.strip()
    if len(cleaned) != KEY_TEXT_LENGTH:
        raise ValueError(
            f"a stream or node id is {KEY_TEXT_LENGTH} base32 characters, got {len(cleaned)} "
            "(copy the line that `meshd keygen` printed)"
        )
    try:
        return base64.b32decode(cleaned.upper() + "====")
    except binascii.Error as exc:
        raise ValueError(f"not a base32 id: {cleaned!r}") from exc


def short_id(raw: bytes) -> str:
    """First 8 characters of the text form, for log lines: those its first 5 bytes
    encode (the tracker formats a few per request, logged or not)."""
    return base64.b32encode(raw[:5]).decode("ascii").lower()


def public_key_from_id(raw: bytes) -> Ed25519PublicKey:
    """Load a key id as a public key; a malformed id is the remote's fault."""
    if len(raw) != KEY_SIZE:
        raise RemoteProtocolError("key id must be 32 bytes", ErrorCode.MALFORMED_MESSAGE)
    return Ed25519PublicKey.from_public_bytes(raw)


def sign(key: Ed25519PrivateKey, context: bytes, payload: bytes) -> bytes:
    """Sign `payload` under meshd's domain tag and a context (e.g. the stream id)."""
    return key.sign(SIGNATURE_DOMAIN + context + payload)


def verify(key: Ed25519PublicKey, signature: bytes, context: bytes, payload: bytes) -> None:
    """Raise RemoteProtocolError(BAD_SIGNATURE) unless `signature` is valid."""
    try:
        key.verify(signature, SIGNATURE_DOMAIN + context + payload)
    except InvalidSignature:
        raise RemoteProtocolError("bad signature", ErrorCode.BAD_SIGNATURE) from None
