"""The msgpack codec: strict, bounded decoding of untrusted bytes into message dataclasses.

Every message is the msgpack array `[type, *fields]` in dataclass field order. Decoding
checks every type, range and size and raises ProtocolError for anything else; msgpack's
own length limits stop oversized containers before they are allocated.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import fields
from enum import IntEnum
from typing import Any

import msgpack

from protocol import limits
from protocol.errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from protocol.identity import KEY_SIZE, SIGNATURE_SIZE
from protocol.messages import (
    Ack,
    Admit,
    Assigned,
    ChildGone,
    Chunk,
    Goodbye,
    Heartbeat,
    Join,
    Leave,
    Message,
    Missing,
    Move,
    Moved,
    PathUpdate,
    Peer,
    Redirect,
    Refresh,
    Register,
    Rejoin,
    Repair,
    RetryAfter,
    StatusReport,
    StatusRequest,
    StreamInfo,
    Subscribe,
    Token,
    TreeNode,
    TreeReport,
    TreeRequest,
)

Check = Callable[[Any, str], Any]
"""Validates one decoded msgpack value and returns the dataclass-side value."""


def _fail(what: str, name: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"{name}: {what}", ErrorCode.MALFORMED_MESSAGE)


def uint(maximum: int = limits.MAX_UINT64) -> Check:
    def check(value: Any, name: str) -> int:
        if type(value) is not int or not 0 <= value <= maximum:
            raise _fail(f"expected an integer in 0..{maximum}", name)
        return value

    return check


def blob(*, exact: int | None = None, maximum: int = limits.MAX_MESSAGE_SIZE) -> Check:
    def check(value: Any, name: str) -> bytes:
        if type(value) is not bytes:
            raise _fail("expected bin", name)
        if exact is not None and len(value) != exact:
            raise _fail(f"expected exactly {exact} bytes", name)
        if len(value) > maximum:
            raise _fail(f"longer than {maximum} bytes", name)
        return value

    return check


def text(maximum: int = limits.MAX_STRING_BYTES) -> Check:
    def check(value: Any, name: str) -> str:
        if type(value) is not str:
            raise _fail("expected str", name)
        if len(value.encode("utf-8")) > maximum:
            raise _fail(f"longer than {maximum} bytes", name)
        return value

    return check


def ratio() -> Check:
    def check(value: Any, name: str) -> float:
        if type(value) is not float or not math.isfinite(value) or value < 0:
            raise _fail("expected a finite non-negative float", name)
        return value

    return check


def optional(inner: Check) -> Check:
    def check(value: Any, name: str) -> Any:
        return None if value is None else inner(value, name)

    return check


def array(inner: Check, maximum: int, minimum: int = 0) -> Check:
    def check(value: Any, name: str) -> tuple[Any, ...]:
        if type(value) is not list or not minimum <= len(value) <= maximum:
            raise _fail(f"expected an array of {minimum}..{maximum} items", name)
        return tuple(inner(item, f"{name}[{index}]") for index, item in enumerate(value))

    return check


KEY = blob(exact=KEY_SIZE)
SIG = blob(exact=SIGNATURE_SIZE)
SEQ = uint()
CAPACITY = uint(limits.MAX_CAPACITY)
_ADDRESS_TEXT = text(limits.MAX_ADDRESS_BYTES)
_HOST_PORT = re.compile(r"([0-9A-Za-z._-]+|\[[0-9A-Fa-f:.]+(?:%[0-9A-Za-z._-]+)?\]):([0-9]{1,5})")


def _address(value: Any, name: str) -> str:
    """`host:port` (an IPv6 host in brackets), or "" for "accepts no connections"."""
    address: str = _ADDRESS_TEXT(value, name)
    if address:
        match = _HOST_PORT.fullmatch(address)
        if match is None or not 1 <= int(match[2]) <= 65535:
            raise _fail("expected HOST:PORT (port 1..65535, an IPv6 host in brackets) or ''", name)
    return address


ADDRESS: Check = _address


def _peer(value: Any, name: str) -> Peer:
    if type(value) is not list or len(value) != 2:
        raise _fail("expected [node, address]", name)
    return Peer(KEY(value[0], f"{name}.node"), ADDRESS(value[1], f"{name}.address"))


PEERS = array(_peer, limits.MAX_BACKUPS)


def _move(value: Any, name: str) -> Move:
    if type(value) is not list or len(value) != 3:
        raise _fail("expected [child, parent, backups]", name)
    return Move(
        KEY(value[0], f"{name}.child"),
        _peer(value[1], f"{name}.parent"),
        PEERS(value[2], f"{name}.backups"),
    )


def _tree_node(value: Any, name: str) -> TreeNode:
    if type(value) is not list or len(value) != 7:
        raise _fail("expected [node, parent, address, capacity, children, depth, uptime_s]", name)
    return TreeNode(
        KEY(value[0], f"{name}.node"),
        optional(KEY)(value[1], f"{name}.parent"),
        ADDRESS(value[2], f"{name}.address"),
        CAPACITY(value[3], f"{name}.capacity"),
        CAPACITY(value[4], f"{name}.children"),
        uint(0xFFFF)(value[5], f"{name}.depth"),
        uint(0xFFFFFFFF)(value[6], f"{name}.uptime_s"),
    )


def _packets(value: Any, name: str) -> tuple[bytes, ...]:
    packets: tuple[bytes, ...] = array(
        blob(maximum=limits.MAX_PACKET_SIZE), limits.MAX_CHUNK_PACKETS
    )(value, name)
    if sum(map(len, packets)) > limits.MAX_CHUNK_PAYLOAD:
        raise _fail(f"more than {limits.MAX_CHUNK_PAYLOAD} bytes of packets", name)
    return packets


SCHEMA: dict[type[Any], tuple[Check, ...]] = {
    Subscribe: (KEY, optional(SEQ), KEY),
    Admit: (blob(maximum=limits.MAX_TOKEN_SIZE),),
    StreamInfo: (text(16), blob(maximum=limits.MAX_HEAD_SIZE), SIG),
    Chunk: (SEQ, uint(), uint(0xFF), _packets, SIG),
    Heartbeat: (optional(SEQ), uint(limits.MAX_STALLED_MS)),
    Repair: (array(SEQ, limits.MAX_SEQS_PER_MESSAGE, 1),),
    Missing: (array(SEQ, limits.MAX_SEQS_PER_MESSAGE, 1),),
    Redirect: (_peer, PEERS),
    PathUpdate: (array(KEY, limits.MAX_PATH, 1),),
    Goodbye: (uint(0xFFFF), text()),
    Register: (KEY, ADDRESS, CAPACITY, uint(), optional(uint()), SIG),
    Join: (KEY, KEY, CAPACITY, ADDRESS, optional(blob(maximum=limits.MAX_TOKEN_SIZE)), uint(), SIG),
    Rejoin: (
        KEY,
        KEY,
        KEY,
        optional(KEY),
        CAPACITY,
        ADDRESS,
        optional(blob(maximum=limits.MAX_TOKEN_SIZE)),
        uint(),
        SIG,
    ),
    Leave: (KEY, KEY, uint(), SIG),
    Refresh: (KEY, KEY, optional(KEY), CAPACITY, ADDRESS, uint(), SIG),
    StatusRequest: (KEY,),
    TreeRequest: (KEY, uint(limits.MAX_TREE_NODES)),
    ChildGone: (KEY, KEY, KEY, uint(), SIG),
    Assigned: (_peer, PEERS, uint(0xFFFF), uint(0xFFFFFFFF), optional(uint())),
    Moved: (array(_move, limits.MAX_MOVES),),
    Ack: (uint(0xFFFFFFFF),),
    RetryAfter: (uint(0xFFFFFFFF), text()),
    StatusReport: (
        KEY,
        uint(),
        CAPACITY,
        CAPACITY,
        array(uint(), limits.MAX_DEPTH_HISTOGRAM),
        ratio(),
        ratio(),
        uint(),
        uint(),
        uint(),
        uint(),
        uint(),
    ),
    TreeReport: (KEY, uint(), array(_tree_node, limits.MAX_TREE_NODES)),
    Token: (KEY, KEY, uint(), SIG),
}
TYPES: dict[int, type[Any]] = {cls.TYPE: cls for cls in SCHEMA}


def _dump(value: Any) -> Any:
    """Dataclass-side value -> msgpack-side value (nested records become arrays)."""
    if isinstance(value, Peer):
        return [value.node, value.address]
    if isinstance(value, Move):
        return [value.child, _dump(value.parent), [_dump(p) for p in value.backups]]
    if isinstance(value, TreeNode):
        return [_dump(getattr(value, f.name)) for f in fields(value)]
    if isinstance(value, tuple):
        return [_dump(item) for item in value]
    if isinstance(value, IntEnum):
        return int(value)
    return value


def message_items(msg: Message, *, include_sig: bool = True) -> list[Any]:
    """The msgpack array for `msg`; without the signature when computing what to sign."""
    items: list[Any] = [msg.TYPE]
    for field in fields(msg):
        if field.name == "sig" and not include_sig:
            continue
        items.append(_dump(getattr(msg, field.name)))
    return items


def _packb(items: Sequence[Any]) -> bytes:
    packed: bytes = msgpack.packb(items, use_bin_type=True)
    return packed


def encode_unsigned(msg: Message) -> bytes:
    """The canonical encoding of `msg` without its `sig` field: the bytes a signature covers."""
    return _packb(message_items(msg, include_sig=False))


def encode_message(msg: Message) -> bytes:
    """Encode one message; raises LocalProtocolError if it would not pass `decode_message`."""
    if type(msg) not in SCHEMA:
        raise LocalProtocolError(f"not a meshd message: {type(msg).__name__}")
    items = message_items(msg)
    try:
        _check_items(type(msg), items)
    except RemoteProtocolError as exc:
        raise LocalProtocolError(f"cannot encode {type(msg).__name__}: {exc}", exc.code) from None
    data = _packb(items)
    if len(data) > limits.MAX_MESSAGE_SIZE:
        raise LocalProtocolError(
            f"{type(msg).__name__} encodes to {len(data)} bytes, over {limits.MAX_MESSAGE_SIZE}",
            ErrorCode.MESSAGE_TOO_LARGE,
        )
    return data


def _check_items(cls: type[Any], items: list[Any]) -> list[Any]:
    checks = SCHEMA[cls]
    if len(items) != len(checks) + 1:
        raise RemoteProtocolError(
            f"{cls.__name__} has {len(checks)} fields, got {len(items) - 1}",
            ErrorCode.MALFORMED_MESSAGE,
        )
    names = [field.name for field in fields(cls)]
    values = [check(item, name) for check, item, name in zip(checks, items[1:], names, strict=True)]
    if cls in SERVING:
        _check_serving(dict(zip(names, values, strict=True)))
    return values


SERVING = (Register, Join, Rejoin, Refresh)
"""Messages that declare a capacity and the address where children reach the sender."""


def _check_serving(values: dict[str, Any]) -> None:
    if values["capacity"] > 0 and not values["address"]:
        raise _fail("a capacity above 0 needs an address children can reach", "address")


def decode_message(data: bytes) -> Message:
    """Decode exactly one message; raises ProtocolError (and nothing else) for anything else."""
    if len(data) > limits.MAX_MESSAGE_SIZE:
        raise RemoteProtocolError(
            f"message of {len(data)} bytes is over {limits.MAX_MESSAGE_SIZE}",
            ErrorCode.MESSAGE_TOO_LARGE,
        )
    try:
        items = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_bin_len=limits.MAX_MESSAGE_SIZE,
            max_str_len=limits.MAX_MESSAGE_SIZE,
            max_array_len=limits.MAX_MOVES + 2,
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many types for bad input; all mean "malformed"
        raise RemoteProtocolError(
            f"not msgpack: {type(exc).__name__} {exc}", ErrorCode.MALFORMED_MESSAGE
        ) from None
    if type(items) is not list or not items or type(items[0]) is not int:
        raise RemoteProtocolError("a message is an array [type, ...]", ErrorCode.MALFORMED_MESSAGE)
    cls = TYPES.get(items[0])
    if cls is None:
        raise RemoteProtocolError(f"unknown message type {items[0]}", ErrorCode.UNKNOWN_MESSAGE)
    try:
        message: Message = cls(*_check_items(cls, items))
    except ProtocolError:
        raise
    except Exception as exc:  # defensive: a checker bug must still surface as ProtocolError
        raise RemoteProtocolError(f"malformed {cls.__name__}: {exc}") from None
    return message
