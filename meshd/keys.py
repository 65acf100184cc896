"""Key files: an Ed25519 private key in PEM (PKCS#8), readable by its owner only."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from meshd.errors import UsageError


class KeyFileError(UsageError):
    """A key file is missing, unreadable, or not an Ed25519 key; the message says what to do."""


def write_new_key(path: Path, *, overwrite: bool = False) -> Ed25519PrivateKey:
    """Generate a key and write it with mode 0600 (never clobbering one unless told to)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists (use --force to replace it)") from None
    except OSError as exc:
        raise KeyFileError(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    os.chmod(path, 0o600)
    return key


def load_key(path: Path) -> Ed25519PrivateKey:
    """Read a key written by `meshd keygen`."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{path} does not exist (create one with `meshd keygen`)") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror}") from None
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise KeyFileError(
            f"{path} is not a key file (meshd reads the PEM files `meshd keygen` writes)"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, meshd needs an Ed25519 key")
    return key
