"""The codec: every message round-trips; untrusted bytes only ever raise ProtocolError."""

from __future__ import annotations

import contextlib
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    Chunk,
    ErrorCode,
    Goodbye,
    Heartbeat,
    Join,
    LocalProtocolError,
    PathUpdate,
    Peer,
    ProtocolError,
    Redirect,
    StatusRequest,
    Subscribe,
    TreeNode,
    TreeReport,
    TreeRequest,
    decode_message,
    encode_message,
)
from protocol.codec import SCHEMA, TYPES
from protocol.limits import MAX_MESSAGE_SIZE, MAX_TREE_NODES
from tests.strategies import MESSAGES, any_message

KEY = bytes(range(32))


def test_every_message_type_has_a_strategy() -> None:
    assert set(MESSAGES) == set(SCHEMA)


@pytest.mark.parametrize("cls", list(SCHEMA), ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_round_trip(cls: type[Any], data: st.DataObject) -> None:
    msg = data.draw(MESSAGES[cls])
    encoded = encode_message(msg)
    assert decode_message(encoded) == msg
    assert encode_message(decode_message(encoded)) == encoded  # canonical: one encoding only


def test_known_encodings() -> None:
    """The hex examples in docs/spec.md §5."""
    assert encode_message(Heartbeat(7, 0)).hex() == "93040700"
    assert encode_message(Heartbeat(None, 1500)).hex() == "9304c0cd05dc"
    assert encode_message(PathUpdate((KEY,))).hex() == "920991c420" + KEY.hex()
    assert encode_message(Goodbye(0x0F, "bye")).hex() == "93080fa3627965"
    assert encode_message(Subscribe(KEY, None, KEY)).hex() == (
        "9401c420" + KEY.hex() + "c0c420" + KEY.hex()
    )
    chunk = Chunk(5, 960, 0, (b"\xfc\x01",), bytes(64))
    assert encode_message(chunk).hex() == ("960305cd03c00091c402fc01c440" + "00" * 64)
    assert encode_message(TreeRequest(KEY, 16)).hex() == "9316c420" + KEY.hex() + "10"
    report = TreeReport(KEY, 0, (TreeNode(KEY, None, "", 4, 0, 0, 5),))
    assert encode_message(report).hex() == (
        "941dc420" + KEY.hex() + "009197c420" + KEY.hex() + "c0a004000005"
    )


def test_the_largest_tree_report_fits_one_message() -> None:
    record = TreeNode(KEY, KEY, "x" * 122 + ":65535", 1024, 1024, 0xFFFF, 0xFFFFFFFF)
    report = TreeReport(KEY, 2**64 - 1, (record,) * MAX_TREE_NODES)
    assert decode_message(encode_message(report)) == report


@pytest.mark.parametrize(
    "items, code",
    [
        ([], ErrorCode.MALFORMED_MESSAGE),
        ([0x7F], ErrorCode.UNKNOWN_MESSAGE),
        ([0x04, 1], ErrorCode.MALFORMED_MESSAGE),  # a field missing
        ([0x04, 1, 2, 3], ErrorCode.MALFORMED_MESSAGE),  # a field too many
        ([0x04, -1, 0], ErrorCode.MALFORMED_MESSAGE),
        ([0x04, True, 0], ErrorCode.MALFORMED_MESSAGE),  # bool is not an int
        ([0x04, 1.5, 0], ErrorCode.MALFORMED_MESSAGE),
        ([0x04, 1, 2**32], ErrorCode.MALFORMED_MESSAGE),  # stalled_ms over 32 bits
        ([0x09, []], ErrorCode.MALFORMED_MESSAGE),  # a path names at least the origin
        ([0x09, [KEY] * 65], ErrorCode.MALFORMED_MESSAGE),  # longer than 64
        ([0x09, [b"short"]], ErrorCode.MALFORMED_MESSAGE),
        ([0x01, b"short", None, KEY], ErrorCode.MALFORMED_MESSAGE),
        ([0x08, 0, b"bytes-not-str"], ErrorCode.MALFORMED_MESSAGE),
        ([0x08, 0, "x" * 300], ErrorCode.MALFORMED_MESSAGE),
        ([0x05, []], ErrorCode.MALFORMED_MESSAGE),  # REPAIR needs at least one seq
        ([0x05, list(range(65))], ErrorCode.MALFORMED_MESSAGE),
        ([0x03, 1, 1, 0, [b"x" * 4001], bytes(64)], ErrorCode.MALFORMED_MESSAGE),
        ([0x03, 1, 1, 0, [b"x" * 4000] * 5, bytes(64)], ErrorCode.MALFORMED_MESSAGE),
        ([0x03, 1, 1, 0, [], bytes(63)], ErrorCode.MALFORMED_MESSAGE),
        ([0x07, [KEY], []], ErrorCode.MALFORMED_MESSAGE),
        ([0x16, KEY, 257], ErrorCode.MALFORMED_MESSAGE),  # TREE: at most 256 nodes
        ([0x1D, KEY, 1, [[KEY, None, "", 1, 0, 0]]], ErrorCode.MALFORMED_MESSAGE),  # 6 fields
        ([0x1D, KEY, 1, [[KEY, b"x", "", 1, 0, 0, 0]]], ErrorCode.MALFORMED_MESSAGE),
        ([0x1D, KEY, 1, [[KEY, None, "", 1, 1025, 0, 0]]], ErrorCode.MALFORMED_MESSAGE),
        ([0x1D, KEY, 1, [[KEY, None, "", 1, 0, 0, 2**32]]], ErrorCode.MALFORMED_MESSAGE),
        ([0x1D, KEY, 1, [[KEY, None, "", 1, 0, 0, 0]] * 257], ErrorCode.MALFORMED_MESSAGE),
        ([-1], ErrorCode.UNKNOWN_MESSAGE),  # an integer type code, just not one of §5
        *(
            ([0x11, KEY, KEY, 2, address, None, 0, bytes(64)], ErrorCode.MALFORMED_MESSAGE)
            for address in ("garbage", "host", ":80", "h:0", "h:65536", "h:+1", "::1:80", "[::1")
        ),
        ([0x11, KEY, KEY, 2, "", None, 0, bytes(64)], ErrorCode.MALFORMED_MESSAGE),  # serves
        ([0x10, KEY, "", 4, 0, bytes(64)], ErrorCode.MALFORMED_MESSAGE),  # an origin serves
        ([0x18, [KEY, "x"], [], 1, 1], ErrorCode.MALFORMED_MESSAGE),  # a parent's address
        ("not an array", ErrorCode.MALFORMED_MESSAGE),
        ({"a": 1}, ErrorCode.MALFORMED_MESSAGE),
    ],
)
def test_invalid_messages_are_rejected_with_a_code(items: Any, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_message(msgpack.packb(items, use_bin_type=True))
    assert caught.value.code == code


def decode_join(items: list[Any]) -> Join:
    """Decode msgpack'd `items`, which must come out a JOIN."""
    decoded = decode_message(msgpack.packb(items, use_bin_type=True))
    assert isinstance(decoded, Join), decoded
    return decoded


@pytest.mark.parametrize(
    "address", ["127.0.0.1:4433", "[::1]:9", "[fe80::1%eth0]:4433", "relay.example:65535"]
)
def test_addresses_that_name_a_host_and_port_are_accepted(address: str) -> None:
    assert decode_join([0x11, KEY, KEY, 2, address, None, 0, bytes(64)]).address == address


def test_a_leaf_may_leave_its_address_empty() -> None:
    assert decode_join([0x11, KEY, KEY, 0, "", None, 0, bytes(64)]).address == ""


def test_non_shortest_encodings_are_accepted() -> None:
    """§4.1: only senders must be canonical; a receiver verifies signatures over its own
    canonical re-encoding, so a longer form changes nothing it checks."""
    assert decode_message(bytes.fromhex("93 cc04 cd0007 00")) == Heartbeat(7, 0)
    status = bytes.fromhex("92 15 c50020") + KEY  # the key with a bin 16 header
    assert decode_message(status) == StatusRequest(KEY)


def test_trailing_bytes_are_rejected() -> None:
    with pytest.raises(ProtocolError):
        decode_message(encode_message(Heartbeat(1)) + b"\x00")


def test_oversized_input_is_rejected_before_decoding() -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_message(b"\x00" * (MAX_MESSAGE_SIZE + 1))
    assert caught.value.code == ErrorCode.MESSAGE_TOO_LARGE


def test_huge_declared_lengths_are_refused_without_allocation() -> None:
    # bin32 / array32 headers claiming 4 GiB: msgpack's limits refuse them up front.
    for header in (b"\xc6\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff"):
        with pytest.raises(ProtocolError):
            decode_message(header)


def test_encoding_an_invalid_message_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        encode_message(Redirect(Peer(b"short", "x"), ()))
    with pytest.raises(LocalProtocolError):
        encode_message(Heartbeat(-1))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_message(data)


@settings(max_examples=500, deadline=None)
@given(any_message, st.data())
def test_mutated_messages_only_raise_protocol_error(msg: Any, data: st.DataObject) -> None:
    encoded = bytearray(encode_message(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        position = data.draw(st.integers(0, max(0, len(encoded) - 1)))
        if action == "flip" and encoded:
            encoded[position] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "cut":
            del encoded[position:]
        else:
            encoded[position:position] = data.draw(st.binary(min_size=1, max_size=8))
    try:
        decoded = decode_message(bytes(encoded))
    except ProtocolError:
        return
    assert type(decoded) in TYPES.values()
