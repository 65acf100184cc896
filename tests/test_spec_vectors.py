"""docs/spec.md Appendix A: every test vector there is checked against the reference codec.

The document is what is tested: the appendix's ```key, ```vector and ```reject blocks are
parsed out of docs/spec.md (their format is described in its §A.1). The messages they
must hold are built here, independently of the document, from the same fixed seeds, times
and Opus packets, and each vector must decode to its message, encode back to the same bytes,
sign the stated bytes and verify with the stated key and context. Negative vectors must be
refused with the stated error code.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from protocol import (
    Ack,
    Admit,
    Assigned,
    ChildGone,
    Chunk,
    ErrorCode,
    Goodbye,
    Heartbeat,
    Join,
    Leave,
    Message,
    MessageReader,
    Missing,
    Move,
    Moved,
    PathUpdate,
    Peer,
    ProtocolError,
    Redirect,
    Refresh,
    Register,
    Rejoin,
    Repair,
    RetryAfter,
    StatusReport,
    StatusRequest,
    StreamInfo,
    StreamVerifier,
    Subscribe,
    Token,
    TreeNode,
    TreeReport,
    TreeRequest,
    decode_message,
    encode_message,
    encode_unsigned,
    frame,
    key_from_text,
    key_to_text,
    verify_message,
)
from protocol.codec import SCHEMA

SPEC_PATH = Path(__file__).parent.parent / "docs" / "spec.md"
APPENDIX_TITLE = "## Appendix A. Test vectors"
BLOCK = re.compile(r"^```(key|vector|reject)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
HEX_LINE = re.compile(r"(?:[0-9a-f]{2})+")
HEX_WIDTH = 64  # hex digits per line: 32 bytes
DOMAIN = b"meshd/1\x00"

# -- what the vectors must hold, built without reading the document ---------------------

SEEDS = {label: bytes([n]) * 32 for n, label in enumerate("SNHPB", start=1)}
"""S: the stream key (origin), N: a listener's node key, H: the host key (tokens),
P: a relay (a parent), B: another relay (a backup)."""
TIME_MS = 1_700_000_000_000  # 2023-11-14T22:13:20Z, every request's time_ms
EXPIRES_MS = TIME_MS + 3_600_000  # the token's expires_ms: an hour later

SPEC_NAMES: dict[type[Any], str] = {
    Subscribe: "SUBSCRIBE",
    Admit: "ADMIT",
    StreamInfo: "STREAM_INFO",
    Chunk: "CHUNK",
    Heartbeat: "HEARTBEAT",
    Repair: "REPAIR",
    Missing: "MISSING",
    Redirect: "REDIRECT",
    Goodbye: "GOODBYE",
    PathUpdate: "PATH",
    Register: "REGISTER",
    Join: "JOIN",
    Rejoin: "REJOIN",
    Leave: "LEAVE",
    Refresh: "REFRESH",
    StatusRequest: "STATUS",
    TreeRequest: "TREE",
    ChildGone: "CHILD_GONE",
    Assigned: "ASSIGNED",
    Moved: "MOVED",
    Ack: "ACK",
    RetryAfter: "RETRY_AFTER",
    StatusReport: "STATUS_REPORT",
    TreeReport: "TREE_REPORT",
    Token: "TOKEN",
}
SIGNED_BY_STREAM_KEY_IN_STREAM_CONTEXT = (Chunk, StreamInfo)  # §4.3: context = stream id
SIGNED = (StreamInfo, Chunk, Register, Join, Rejoin, Leave, Refresh, ChildGone, Token)

# The OpusHead and audio packets of tests/data/tone.opus (a mono test tone, pre-skip 312):
# packets 3, 4 and 5, and the last one (packet 300), whose granule position 288,312 is
# 648 samples short of the 301 x 960 the packets add up to (the input's end trim).
OPUS_HEAD = bytes.fromhex("4f707573486561640101380180bb0000000000")
PACKETS_3_TO_5 = tuple(
    bytes.fromhex(packet)
    for packet in (
        "f8849c76240d2f63e5ea20d6ac7919b7d0f51eb21e7f7c1ba26b58a69c4bbffbe23fee179db17b0d"
        "025ffbd577e773eedabce8c461f8c769db75e6b21c141ef732f078b5165fe1c3d477608fb050",
        "f8847795b909e5dc8f00552554f1c7d8c29a185b189ed0f3682a7429f5f5539077c39b6e4e16fe54"
        "1f0ef6c0680780c2405d531b92f2684e88bd3ad149ad521a57dd43acc5f7c71a50677630ccea8f3c"
        "b98ca72539071ea25cd0",
        "f8814632dc82f3830f78ea9ef87f0a7430ea67a5d457ab3cc395387892e7646c1e60173bc82e2bc6"
        "6e2d6db5a62faa639cad928359b0cc8b7e47e702337454119bd5734f46517e8209db22b8dd32a0fb"
        "4e477392ad44d0",
    )
)
LAST_PACKET = bytes.fromhex(
    "f89fc1c504914c418e38a28288fa80d132110ffda8b5907c0737c15a606a27356f9ccf7ccab50e051f"
    "80c18d91d0c83a7cee4ff3bea0dc368c169368dd08768783f33ac1ef01d1d73802de74cdef69e672"
)


def private_key(label: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(SEEDS[label])


def public_bytes(label: str) -> bytes:
    return private_key(label).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


S, N, H, P, B = (public_bytes(label) for label in "SNHPB")
ORIGIN_ADDRESS = "192.0.2.1:4433"  # RFC 5737 and RFC 3849 documentation addresses
NODE_ADDRESS = "192.0.2.2:4433"
RELAY_ADDRESS = "192.0.2.4:4433"
BACKUP_ADDRESS = "[2001:db8::5]:4433"


def signer_of(msg: Message) -> str | None:
    """Which key signs `msg` in the vectors (§4.3), by label; None for unsigned messages."""
    if isinstance(msg, StreamInfo | Chunk | Register):
        return "S"
    if isinstance(msg, Join | Rejoin | Leave | Refresh):
        return "N"
    if isinstance(msg, ChildGone):
        return "P"  # the parent reports its child N
    if isinstance(msg, Token):
        return "H"
    return None


def context_of(msg: Message) -> bytes:
    return S if isinstance(msg, SIGNED_BY_STREAM_KEY_IN_STREAM_CONTEXT) else b""


def signed(msg: Any) -> Any:
    """`msg` with its signature, computed with `cryptography` directly (Ed25519 is
    deterministic, so this is the one signature the vector may hold)."""
    label = signer_of(msg)
    assert label is not None
    payload = DOMAIN + context_of(msg) + encode_unsigned(msg)
    return dataclasses.replace(msg, sig=private_key(label).sign(payload))


TOKEN = signed(Token(S, N, EXPIRES_MS))
TOKEN_BYTES = encode_message(TOKEN)

EXPECTED: dict[str, Message] = {
    "subscribe-live": Subscribe(S, None, N),
    "subscribe-resume": Subscribe(S, 41, N),
    "stream-info": signed(StreamInfo("opus", OPUS_HEAD)),
    "chunk": signed(Chunk(1, 5760, 0, PACKETS_3_TO_5)),
    "chunk-end": signed(Chunk(100, 288_312, Chunk.FLAG_END, (LAST_PACKET,))),
    "chunk-keepalive": signed(Chunk(2, 5760, 0, ())),
    "heartbeat": Heartbeat(7, 0),
    "heartbeat-stalled": Heartbeat(None, 1500),
    "repair": Repair((38, 40, 41)),
    "missing": Missing((38,)),
    "redirect": Redirect(Peer(P, RELAY_ADDRESS), (Peer(B, BACKUP_ADDRESS),)),
    "goodbye": Goodbye(ErrorCode.GOING_AWAY, "shutting down"),
    "path": PathUpdate((S, P)),
    "admit": Admit(TOKEN_BYTES),
    "register": signed(Register(S, ORIGIN_ADDRESS, 8, TIME_MS, 576_000)),
    "join": signed(Join(S, N, 4, NODE_ADDRESS, TOKEN_BYTES, TIME_MS)),
    "join-open": signed(Join(S, N, 0, "", None, TIME_MS)),
    "rejoin": signed(Rejoin(S, N, P, B, 4, NODE_ADDRESS, None, TIME_MS)),
    "leave": signed(Leave(S, N, TIME_MS)),
    "refresh": signed(Refresh(S, N, P, 4, NODE_ADDRESS, TIME_MS)),
    "status": StatusRequest(S),
    "tree": TreeRequest(S, 16),
    "child-gone": signed(ChildGone(S, P, N, TIME_MS)),
    "assigned": Assigned(Peer(P, RELAY_ADDRESS), (Peer(B, BACKUP_ADDRESS),), 2, 180, 576_000),
    "moved": Moved((Move(N, Peer(B, BACKUP_ADDRESS), (Peer(S, ORIGIN_ADDRESS),)),)),
    "ack": Ack(180),
    "retry-after": RetryAfter(250, "overloaded"),
    "status-report": StatusReport(S, 3, 1, 8, (1, 1, 2), 0.5, 0.0, 4, 1, 1, 1, 0),
    "tree-report": TreeReport(
        S,
        3,
        (
            TreeNode(S, None, ORIGIN_ADDRESS, 8, 1, 0, 600),
            TreeNode(P, S, RELAY_ADDRESS, 4, 2, 1, 540),
            TreeNode(B, P, BACKUP_ADDRESS, 4, 0, 2, 300),
            TreeNode(N, P, "", 0, 0, 2, 60),
        ),
    ),
    "token": TOKEN,
}
FRAMED = {"heartbeat", "goodbye"}  # vectors that also show the stream framing
DATAGRAMS = {"chunk-end"}  # vectors that also show a datagram

# -- reading the appendix --------------------------------------------------------------


def appendix(spec: str) -> str:
    start = spec.index(APPENDIX_TITLE)
    end = spec.find("\n## ", start + 1)
    return spec[start : end if end != -1 else None]


def parse_block(body: str) -> dict[str, str]:
    """`label: value` lines; lines indented by two spaces continue the previous label."""
    entries: dict[str, str] = {}
    label = ""
    for line in body.splitlines():
        if not line.strip():
            continue
        if line.startswith("  "):
            assert label, f"a continuation line before any label: {line!r}"
            entries[label] = (entries[label] + "\n" + line.strip()).strip()
            continue
        label, colon, value = line.partition(":")
        assert colon, f"not a `label: value` line: {line!r}"
        assert label not in entries, f"{label} given twice"
        entries[label] = value.strip()
    return entries


def blocks(spec: str, kind: str) -> dict[str, dict[str, str]]:
    """The appendix's blocks of one kind, by name (the value of their first label)."""
    found: dict[str, dict[str, str]] = {}
    for block_kind, body in BLOCK.findall(appendix(spec)):
        if block_kind != kind:
            continue
        entries = parse_block(body)
        name = entries[kind]
        assert name not in found, f"two {kind} blocks named {name}"
        found[name] = entries
    return found


def hex_lines(value: str) -> list[str]:
    lines = value.split()
    for line in lines:
        assert HEX_LINE.fullmatch(line), f"not lowercase hex bytes: {line!r}"
        assert len(line) <= HEX_WIDTH, f"a hex line over {HEX_WIDTH} digits: {line!r}"
    return lines


def wrapped_hex(value: str) -> bytes:
    """Hex wrapped at the fixed width: every line but the last is full."""
    lines = hex_lines(value)
    assert lines, "no bytes"
    assert all(len(line) == HEX_WIDTH for line in lines[:-1]), f"not wrapped at {HEX_WIDTH}"
    return bytes.fromhex("".join(lines))


SPEC = SPEC_PATH.read_text(encoding="utf-8")
KEYS = blocks(SPEC, "key")
VECTORS = blocks(SPEC, "vector")
REJECTS = blocks(SPEC, "reject")


def stated_key(label: str) -> bytes:
    """The public key the document states for a key label."""
    return bytes.fromhex(KEYS[label]["public"])


def stated_context(value: str) -> bytes:
    return b"" if value == "empty" else stated_key(value)


# -- the readable field values --------------------------------------------------------


def render(value: Any, name: str = "") -> str:
    """A field value as the appendix writes it (§A.1)."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        raise TypeError("meshd has no booleans")
    if name == "code":
        return f"{int(value)} ({ErrorCode(value).name})"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bytes):
        labels = [label for label in SEEDS if public_bytes(label) == value]
        return labels[0] if labels else f"x'{value.hex()}'"
    if isinstance(value, tuple):
        return "[" + ", ".join(render(item) for item in value) + "]"
    if isinstance(value, Peer | Move | TreeNode):
        inner = (render(getattr(value, f.name)) for f in dataclasses.fields(value))
        return f"{type(value).__name__}({', '.join(inner)})"
    raise TypeError(f"cannot render {value!r}")


def render_fields(msg: Message) -> Iterator[str]:
    for field in dataclasses.fields(msg):
        if field.name != "sig":
            yield f"{field.name} = {render(getattr(msg, field.name), field.name)}"


def without_whitespace(text: str) -> str:
    return "".join(text.split())


# -- the checks (raising AssertionError, so a changed document can be shown to fail) ----


def check_key(label: str, entries: dict[str, str]) -> None:
    seed = bytes.fromhex(entries["seed"])
    assert seed == SEEDS[label]
    public = Ed25519PrivateKey.from_private_bytes(seed).public_key()
    raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert bytes.fromhex(entries["public"]) == raw
    text = base64.b32encode(raw).decode("ascii").rstrip("=").lower()
    assert entries["text"] == text == key_to_text(raw)
    assert len(text) == 52
    assert key_from_text(entries["text"]) == raw


def check_vector(name: str, entries: dict[str, str]) -> None:
    expected = EXPECTED[name]
    cls = type(expected)
    assert entries["type"] == f"{SPEC_NAMES[cls]} 0x{cls.TYPE:02x}"
    assert without_whitespace(entries["fields"]) == without_whitespace(
        "\n".join(render_fields(expected))
    )
    encoding = wrapped_hex(entries["encoding"])
    assert decode_message(encoding) == expected
    assert encode_message(expected) == encoding
    if name in FRAMED:
        length, *body = hex_lines(entries["framed"])
        assert length == f"{len(encoding):08x}"
        framed = bytes.fromhex(length) + wrapped_hex("\n".join(body))
        assert framed == frame(expected)
        reader = MessageReader()
        reader.receive_data(framed)
        assert reader.next_message() == expected
    else:
        assert "framed" not in entries
    if name in DATAGRAMS:
        datagram = wrapped_hex(entries["datagram"])
        assert datagram == encoding
        assert StreamVerifier(stated_key("S")).verify_datagram(datagram).chunk == expected
    else:
        assert "datagram" not in entries
    if isinstance(expected, SIGNED):
        check_signature(expected, entries, encoding)
    else:
        assert not {"signer", "context", "signed", "signature"} & set(entries)


def check_signature(expected: Any, entries: dict[str, str], encoding: bytes) -> None:
    assert entries["signer"] == signer_of(expected)
    context = stated_context(entries["context"])
    assert context == context_of(expected)
    prefix, *rest = hex_lines(entries["signed"])
    assert prefix == DOMAIN.hex()
    if context:
        stated, *rest = rest
        assert stated == context.hex()
    fields_part = wrapped_hex("\n".join(rest))
    signed_bytes = DOMAIN + context + fields_part
    assert signed_bytes == DOMAIN + context_of(expected) + encode_unsigned(expected)
    # The signed part is the encoding without its last item, the sig (msgpack itself says so).
    items = msgpack.unpackb(encoding)
    assert msgpack.packb(items[:-1], use_bin_type=True) == fields_part
    signature = wrapped_hex(entries["signature"])
    assert len(signature) == 64
    assert items[-1] == signature == expected.sig
    public = Ed25519PublicKey.from_public_bytes(stated_key(entries["signer"]))
    public.verify(signature, signed_bytes)  # raises InvalidSignature
    assert private_key(entries["signer"]).sign(signed_bytes) == signature  # deterministic
    decoded = decode_message(encoding)
    assert isinstance(decoded, SIGNED)
    verify_message(decoded, public, context)
    other_context = b"" if context else stated_key("S")
    with pytest.raises(ProtocolError) as refused:
        verify_message(decoded, public, other_context)
    assert refused.value.code == ErrorCode.BAD_SIGNATURE


def check_reject(entries: dict[str, str]) -> None:
    error_name, _, error_value = entries["error"].partition(" ")
    code = ErrorCode[error_name]
    assert error_value == f"0x{code:02x}"
    data = bytes.fromhex("".join(hex_lines(entries["bytes"])))
    with pytest.raises(ProtocolError) as refused:
        if entries["on"] == "stream":
            reader = MessageReader()
            for part in (data, b""):  # these bytes, then the end of the stream
                reader.receive_data(part)
                while reader.next_message() is not None:
                    pass
        elif entries["on"] == "message":
            decode_message(data)
        else:
            assert entries["on"] == "datagram of S"
            StreamVerifier(stated_key("S")).verify_datagram(data)
    assert refused.value.code == code


# -- the tests -------------------------------------------------------------------------


@pytest.mark.parametrize("label", sorted(SEEDS))
def test_key(label: str) -> None:
    check_key(label, KEYS[label])


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_vector(name: str) -> None:
    check_vector(name, VECTORS[name])


@pytest.mark.parametrize("name", sorted(REJECTS))
def test_reject(name: str) -> None:
    check_reject(REJECTS[name])


def test_the_appendix_holds_exactly_the_vectors_built_here() -> None:
    assert set(KEYS) == set(SEEDS)
    assert set(VECTORS) == set(EXPECTED)
    assert len(REJECTS) >= 10


def test_every_message_type_has_a_vector() -> None:
    """A message type added to the codec without a vector in the appendix fails here."""
    stated = {int(entries["type"].split()[-1], 16) for entries in VECTORS.values()}
    assert stated == {cls.TYPE for cls in SCHEMA}
    assert set(SPEC_NAMES) == set(SCHEMA)


def test_the_vectors_cover_the_cases_the_appendix_promises() -> None:
    chunks = [msg for msg in EXPECTED.values() if isinstance(msg, Chunk)]
    assert any(chunk.is_end and chunk.packets for chunk in chunks)
    assert any(not chunk.packets for chunk in chunks)
    joins = [msg for msg in EXPECTED.values() if isinstance(msg, Join)]
    assert any(join.token == encode_message(EXPECTED["token"]) for join in joins)
    assert FRAMED and DATAGRAMS
    codes = {ErrorCode[entries["error"].split()[0]] for entries in REJECTS.values()}
    assert {
        ErrorCode.MALFORMED_MESSAGE,
        ErrorCode.UNKNOWN_MESSAGE,
        ErrorCode.MESSAGE_TOO_LARGE,
        ErrorCode.UNEXPECTED_MESSAGE,
        ErrorCode.BAD_SIGNATURE,
    } <= codes


def test_the_intro_and_the_framing_example_agree_with_the_appendix() -> None:
    intro = SPEC[: SPEC.index("## 1. Roles")]
    assert "Appendix A" in intro
    example = re.search(
        r"HEARTBEAT\(latest_seq=7, stalled_ms=0\) on a stream is `([0-9a-f ]+)`", SPEC
    )
    assert example is not None
    assert bytes.fromhex(example.group(1)) == frame(EXPECTED["heartbeat"])


def changed_digit(spec: str, vector: str, label: str) -> str:
    """`spec` with the last hex digit of one vector's `label` value changed."""
    body = next(body for _, body in BLOCK.findall(spec) if f"vector: {vector}\n" in body)
    value = re.search(rf"^{label}:.*(?:\n  .*)*", body, re.MULTILINE)
    assert value is not None
    text = value.group()
    last = max(text.rfind(digit) for digit in "0123456789abcdef")
    text = text[:last] + ("1" if text[last] == "0" else "0") + text[last + 1 :]
    return spec.replace(body, body[: value.start()] + text + body[value.end() :])


@pytest.mark.parametrize(
    "vector, label",
    [("chunk", "encoding"), ("token", "signature"), ("stream-info", "signed"), ("ack", "fields")],
)
def test_a_changed_byte_in_the_document_fails(vector: str, label: str) -> None:
    changed = blocks(changed_digit(SPEC, vector, label), "vector")[vector]
    assert changed != VECTORS[vector]
    with pytest.raises((AssertionError, ProtocolError)):
        check_vector(vector, changed)
