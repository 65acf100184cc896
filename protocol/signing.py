"""Signing and verifying messages: the origin signs media, nodes sign tracker requests.

A signature covers `"meshd/1\\0" || context || encode_unsigned(msg)`. Media (CHUNK,
STREAM_INFO) uses the stream id as context, so a chunk cannot be replayed into another
stream; everything else uses an empty context (its fields already name stream and node).
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.codec import encode_unsigned
from protocol.identity import sign, verify
from protocol.messages import SignedMessage

S = TypeVar("S", bound=SignedMessage)


def sign_message(msg: S, key: Ed25519PrivateKey, context: bytes = b"") -> S:
    """Return `msg` with its `sig` field set."""
    return dataclasses.replace(msg, sig=sign(key, context, encode_unsigned(msg)))


def verify_message(msg: SignedMessage, key: Ed25519PublicKey, context: bytes = b"") -> None:
    """Raise RemoteProtocolError(BAD_SIGNATURE) unless `key` signed exactly this message."""
    verify(key, msg.sig, context, encode_unsigned(msg))
