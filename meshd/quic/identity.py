"""TLS identity: a self-signed certificate that carries the node's Ed25519 key.

No CA is involved: a node is its key. The handshake's CertificateVerify proves
the peer holds the private key of the certificate's public key, so checking
that public key against an expected one is enough to authenticate the peer.
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.x509.oid import NameOID

RAW_KEY_SIZE = 32
_VALIDITY = datetime.timedelta(days=3650)


def raw_public_key(key: Ed25519PublicKey) -> bytes:
    """The 32-byte raw encoding used as a node id everywhere in meshd."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def self_signed_certificate(private_key: Ed25519PrivateKey) -> x509.Certificate:
    """A long-lived self-signed certificate; validity dates are not what we trust."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshd")])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + _VALIDITY)
        .sign(private_key, None)
    )


def certificate_raw_key(certificate: x509.Certificate | None) -> bytes | None:
    """The raw Ed25519 key of a certificate, or None if it carries another kind of key."""
    if certificate is None:
        return None
    try:
        key = certificate.public_key()
    except ValueError:
        return None
    if not isinstance(key, Ed25519PublicKey):
        return None
    return raw_public_key(key)
