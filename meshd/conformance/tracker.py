"""Cases for a tracker (`meshd conformance --tracker HOST:PORT`).

The suite plays origins and nodes. Every case that needs a stream registers a fresh
one (a new stream key), so cases share no state and run concurrently. Node addresses
handed to the tracker are loopback ports nobody listens on, except where a case about
the tracker's probes puts a stand-in there (meshd.conformance.peers).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.conformance.common import Target, add_common_cases
from meshd.conformance.peers import answering, silent
from meshd.conformance.report import Level, Outcome, Verdict
from meshd.conformance.suite import CaseList, Mismatch, Reply, Unmet, expect_message, read_reply
from meshd.conformance.wire import describe, framed, packb, signed
from meshd.tracker_client import now_ms
from protocol import (
    Ack,
    Assigned,
    ErrorCode,
    Moved,
    RetryAfter,
    StatusReport,
    TreeReport,
    issue_token,
    key_id,
)
from protocol.limits import MAX_TREE_NODES

SKEW_MS = 300_000
_ports = itertools.count(20_000)


def _address() -> str:
    return f"127.0.0.1:{next(_ports)}"


@dataclass
class Stream:
    key: Ed25519PrivateKey
    id: bytes
    address: str
    capacity: int


@dataclass
class Node:
    key: Ed25519PrivateKey
    id: bytes
    address: str
    capacity: int
    assigned: Assigned | None = field(default=None)


@dataclass
class TrackerTarget(Target):
    host_key: Ed25519PrivateKey | None = None
    """The host's key, to issue admission tokens (tokens are sent only with it)."""
    peer_ttl: float | None = None
    """The tracker's peer_ttl (§7.2), if the user gave it: the expiry cases need it."""
    join_burst: int = 100
    """The JOINs the tracker takes from one network at once (§7.3; the reference's 100)."""
    promote_after: float | None = None
    """How long a relay is in the tree before it may move up (§7.3), if given."""

    async def send_and_read(self, data: bytes, *, eof: bool = False) -> Reply:
        """Like `Target.send_and_read`, but a RETRY_AFTER is followed as a client does
        (§7.4: wait delay_ms x uniform(1, 1.5), then ask again), for up to 4 x `timeout`
        in all: a tracker that limits JOINs per network (§7.3) slows the suite down
        rather than failing its cases."""
        deadline = trio.current_time() + 4 * self.timeout
        while True:
            reply = await super().send_and_read(data, eof=eof)
            first = reply.first_message()
            if first is None or not isinstance(first.message, RetryAfter):
                return reply
            delay = first.message.delay_ms / 1000 * random.uniform(1, 1.5)
            if trio.current_time() + delay > deadline:
                return reply
            await trio.sleep(delay)

    async def ask(self, data: bytes) -> Reply:
        """One framed request on a new connection; the reply."""
        return await self.send_and_read(framed(data))

    async def ask_for(self, data: bytes, kind: type[Any], sent: str) -> Any:
        """Send a request that must be answered with `kind`; Mismatch otherwise."""
        reply = await self.ask(data)
        goodbye = reply.goodbye
        if goodbye is not None and goodbye.code == ErrorCode.TOKEN_REQUIRED:
            raise Unmet("the tracker requires admission tokens: give the suite --host-key")
        return expect_message(reply, sent, kind, _article(kind)).message

    def token(self, stream: bytes, node: bytes) -> bytes | None:
        if self.host_key is None:
            return None
        return issue_token(self.host_key, stream, node, now_ms() + 3_600_000)

    async def new_stream(self, capacity: int = 4) -> Stream:
        """Register a fresh stream (a precondition: a refusal skips the case)."""
        key = Ed25519PrivateKey.generate()
        stream = Stream(key, key_id(key), _address(), capacity)
        reply = await self.ask(register(stream, now_ms()))
        first = reply.first_message()
        if first is None or not isinstance(first.message, Ack):
            raise Unmet(f"REGISTER was not acknowledged: {reply.describe()}")
        return stream

    async def join(self, stream: Stream, capacity: int = 2) -> Node:
        key = Ed25519PrivateKey.generate()
        node = Node(key, key_id(key), _address() if capacity else "", capacity)
        node.assigned = await self.ask_for(
            join(stream.id, node, now_ms(), self.token(stream.id, node.id)),
            Assigned,
            f"JOIN(capacity={capacity})",
        )
        return node

    async def status(self, stream: Stream) -> StatusReport:
        report: StatusReport = await self.ask_for(packb([0x15, stream.id]), StatusReport, "STATUS")
        return report


def _article(kind: type[Any]) -> str:
    return {Ack: "ACK", Assigned: "ASSIGNED", Moved: "MOVED", StatusReport: "STATUS_REPORT"}.get(
        kind, kind.__name__
    )


# -- request encodings -------------------------------------------------------------------


def register(
    stream: Stream,
    time_ms: int,
    key: Ed25519PrivateKey | None = None,
    *,
    live_granule: int | None = None,
) -> bytes:
    items = [0x10, stream.id, stream.address, stream.capacity, time_ms, live_granule]
    return signed(items, key or stream.key)


def join(
    stream: bytes,
    node: Node,
    time_ms: int,
    token: bytes | None,
    *,
    key: Ed25519PrivateKey | None = None,
    context: bytes = b"",
) -> bytes:
    items = [0x11, stream, node.id, node.capacity, node.address, token, time_ms]
    return signed(items, key or node.key, context)


def rejoin(
    stream: bytes,
    node: Node,
    dead: bytes,
    attached: bytes | None,
    token: bytes | None,
    key: Ed25519PrivateKey | None = None,
) -> bytes:
    items = [0x12, stream, node.id, dead, attached, node.capacity, node.address, token, now_ms()]
    return signed(items, key or node.key)


def leave(stream: bytes, node: bytes, key: Ed25519PrivateKey) -> bytes:
    return signed([0x13, stream, node, now_ms()], key)


def refresh(
    stream: bytes, node: Node, parent: bytes | None, key: Ed25519PrivateKey | None = None
) -> bytes:
    items = [0x14, stream, node.id, parent, node.capacity, node.address, now_ms()]
    return signed(items, key or node.key)


def _new_node(capacity: int = 2) -> Node:
    key = Ed25519PrivateKey.generate()
    return Node(key, key_id(key), _address(), capacity)


CASES: CaseList[TrackerTarget] = CaseList()
add_common_cases(CASES, packb([0x15, bytes(32)]), "STATUS")
case = CASES.case


Build = Callable[[TrackerTarget, Stream], tuple[bytes, str]]
"""A request's encoding and its description, given the target and a registered stream."""


def _error(
    case_id: str,
    section: str,
    title: str,
    codes: set[ErrorCode],
    *,
    refusal: bool = False,
    level: Level = Level.MUST,
) -> Callable[[Build], Build]:
    """A case whose request (built by the decorated function) must be answered with
    GOODBYE(one of `codes`)."""

    def decorate(build: Build) -> Build:
        async def run(target: TrackerTarget) -> Outcome:
            stream = await target.new_stream()
            data, sent = build(target, stream)
            return await target.expect_error(framed(data), codes, sent, refusal=refusal)

        case(case_id, section, level, title)(run)
        return build

    return decorate


# -- strict decoding (§4.1, §8) -------------------------------------------------------------


@_error("4.1-arity-short", "4.1", "a message with too few fields is MALFORMED_MESSAGE",
        {ErrorCode.MALFORMED_MESSAGE})  # fmt: skip
def _arity_short(target: TrackerTarget, stream: Stream) -> tuple[bytes, str]:
    return packb([0x15]), "STATUS with no field (91 15)"


@_error("4.1-arity-long", "4.1", "a message with an extra field is MALFORMED_MESSAGE",
        {ErrorCode.MALFORMED_MESSAGE})  # fmt: skip
def _arity_long(target: TrackerTarget, stream: Stream) -> tuple[bytes, str]:
    return packb([0x15, stream.id, 0]), "STATUS(stream, 0): one field too many"


@_error("4.1-str-for-bin", "4.1", "a str where bin is required is MALFORMED_MESSAGE",
        {ErrorCode.MALFORMED_MESSAGE})  # fmt: skip
def _str_for_bin(target: TrackerTarget, stream: Stream) -> tuple[bytes, str]:
    return packb([0x15, "a" * 32]), "STATUS with the stream as a 32-character str"


@_error("4.1-key-length", "4.1", "a key that is not 32 bytes is MALFORMED_MESSAGE",
        {ErrorCode.MALFORMED_MESSAGE})  # fmt: skip
def _key_length(target: TrackerTarget, stream: Stream) -> tuple[bytes, str]:
    return packb([0x15, stream.id[:31]]), "STATUS with a 31-byte stream id"


@_error("4.1-bool-for-int", "4.1", "a boolean where an integer is required is MALFORMED_MESSAGE",
        {ErrorCode.MALFORMED_MESSAGE})  # fmt: skip
def _bool_for_int(target: TrackerTarget, stream: Stream) -> tuple[bytes, str]:
    items = [0x10, stream.id, stream.address, True, now_ms(), None]
    return signed(items, stream.key), "REGISTER with capacity = true (c3), signed"


@_error("4.1-float-for-int", "4.1", "a float where an integer is required is MALFORMED_MESSAGE",
        {ErrorCode.MALFORMED_MESSAGE})  # fmt: skip
def _float_for_int(target: TrackerTarget, stream: Stream) -> tuple[bytes, str]:
    node = _new_node()
    items = [0x11, stream.id, node.id, 2.0, node.address, None, now_ms()]
    return signed(items, node.key), "JOIN with capacity = 2.0 (float 64), signed"


@_error("4.1-negative-int", "4.1", "a negative integer is MALFORMED_MESSAGE",
        {ErrorCode.MALFORMED_MESSAGE})  # fmt: skip
def _negative_int(target: TrackerTarget, stream: Stream) -> tuple[bytes, str]:
    node = _new_node()
    items = [0x11, stream.id, node.id, 2, node.address, None, -1]
    return signed(items, node.key), "JOIN with time_ms = -1, signed"


@_error("4.1-nil-not-optional", "4.1", "nil in a field that is not optional is MALFORMED_MESSAGE",
        {ErrorCode.MALFORMED_MESSAGE})  # fmt: skip
def _nil_field(target: TrackerTarget, stream: Stream) -> tuple[bytes, str]:
    items = [0x10, stream.id, None, stream.capacity, now_ms(), None]
    return signed(items, stream.key), "REGISTER with address = nil, signed"


@_error("8-capacity-limit", "8", "a declared capacity above 1,024 is MALFORMED_MESSAGE",
        {ErrorCode.MALFORMED_MESSAGE})  # fmt: skip
def _capacity_limit(target: TrackerTarget, stream: Stream) -> tuple[bytes, str]:
    node = _new_node(1025)
    return join(stream.id, node, now_ms(), None), "JOIN with capacity = 1025, signed"


@_error("8-address-limit", "8", "an address over 128 bytes is MALFORMED_MESSAGE",
        {ErrorCode.MALFORMED_MESSAGE})  # fmt: skip
def _address_limit(target: TrackerTarget, stream: Stream) -> tuple[bytes, str]:
    node = _new_node()
    node.address = "a" * 124 + ":4433"
    return join(stream.id, node, now_ms(), None), "JOIN with a 129-byte address"


@_error("8-token-limit", "8", "a token over 512 bytes is MALFORMED_MESSAGE",
        {ErrorCode.MALFORMED_MESSAGE})  # fmt: skip
def _token_limit(target: TrackerTarget, stream: Stream) -> tuple[bytes, str]:
    node = _new_node()
    return join(stream.id, node, now_ms(), bytes(513)), "JOIN with a 513-byte token"


# -- signatures (§4.3) ------------------------------------------------------------------------

_BAD_SIG = {ErrorCode.BAD_SIGNATURE}


@_error("4.3-register-signature", "4.3", "REGISTER signed by another key is BAD_SIGNATURE",
        _BAD_SIG, refusal=True)  # fmt: skip
def _register_sig(target: TrackerTarget, stream: Stream) -> tuple[bytes, str]:
    other = Ed25519PrivateKey.generate()
    return register(stream, now_ms(), other), "REGISTER signed by a key other than the stream's"


@_error("4.3-register-context", "4.3", "REGISTER signs with an empty context",
        _BAD_SIG, refusal=True)  # fmt: skip
def _register_context(target: TrackerTarget, stream: Stream) -> tuple[bytes, str]:
    items = [0x10, stream.id, stream.address, stream.capacity, now_ms(), None]
    data = signed(items, stream.key, stream.id)
    return data, "REGISTER signed by the stream key with the stream id as context"


@_error("4.3-join-signature", "4.3", "JOIN signed by a key other than `node` is BAD_SIGNATURE",
        _BAD_SIG, refusal=True)  # fmt: skip
def _join_sig(target: TrackerTarget, stream: Stream) -> tuple[bytes, str]:
    node = _new_node()
    data = join(stream.id, node, now_ms(), target.token(stream.id, node.id), key=stream.key)
    return data, "JOIN signed by another key"


@_error("4.3-join-context", "4.3", "JOIN signs with an empty context",
        _BAD_SIG, refusal=True)  # fmt: skip
def _join_context(target: TrackerTarget, stream: Stream) -> tuple[bytes, str]:
    node = _new_node()
    token = target.token(stream.id, node.id)
    data = join(stream.id, node, now_ms(), token, context=stream.id)
    return data, "JOIN signed by its node with the stream id as context"


@_error("4.3-join-altered", "4.3", "a JOIN altered after signing is BAD_SIGNATURE",
        _BAD_SIG, refusal=True)  # fmt: skip
def _join_altered(target: TrackerTarget, stream: Stream) -> tuple[bytes, str]:
    node = _new_node()
    token = target.token(stream.id, node.id)
    return _altered_join(stream, node, token), "JOIN signed with capacity 2, sent with capacity 3"


def _altered_join(stream: Stream, node: Node, token: bytes | None) -> bytes:
    items: list[Any] = [0x11, stream.id, node.id, 2, node.address, token, now_ms()]
    signature = signed(items, node.key)[-64:]
    items[3] = 3
    return packb([*items, signature])


@_error("4.3-rejoin-signature", "4.3", "REJOIN signed by another key is BAD_SIGNATURE",
        _BAD_SIG, refusal=True)  # fmt: skip
def _rejoin_sig(target: TrackerTarget, stream: Stream) -> tuple[bytes, str]:
    node = _new_node()
    token = target.token(stream.id, node.id)
    data = rejoin(stream.id, node, stream.id, None, token, key=stream.key)
    return data, "REJOIN signed by another key"


@_error("4.3-leave-signature", "4.3", "LEAVE signed by another key is BAD_SIGNATURE",
        _BAD_SIG, refusal=True)  # fmt: skip
def _leave_sig(target: TrackerTarget, stream: Stream) -> tuple[bytes, str]:
    node = _new_node()
    return leave(stream.id, node.id, stream.key), "LEAVE for a node, signed by another key"


@_error("4.3-origin-leave-signature", "4.3", "the origin's LEAVE must be signed by the stream key",
        _BAD_SIG, refusal=True)  # fmt: skip
def _origin_leave_sig(target: TrackerTarget, stream: Stream) -> tuple[bytes, str]:
    other = Ed25519PrivateKey.generate()
    return leave(stream.id, stream.id, other), "LEAVE(node = stream) signed by another key"


@_error("4.3-refresh-signature", "4.3", "REFRESH signed by another key is BAD_SIGNATURE",
        _BAD_SIG, refusal=True)  # fmt: skip
def _refresh_sig(target: TrackerTarget, stream: Stream) -> tuple[bytes, str]:
    node = _new_node()
    return refresh(stream.id, node, stream.id, key=stream.key), "REFRESH signed by another key"


# -- the exchange (§5.2, §5.3, §7) ---------------------------------------------------------------


@_error("5.2-stale-past", "5.2", "a request more than 300 s old is STALE_REQUEST",
        {ErrorCode.STALE_REQUEST}, refusal=True)  # fmt: skip
def _stale_past(target: TrackerTarget, stream: Stream) -> tuple[bytes, str]:
    node = _new_node()
    data = join(stream.id, node, now_ms() - SKEW_MS - 30_000, target.token(stream.id, node.id))
    return data, "JOIN with time_ms 330 s in the past"


@_error("5.2-stale-future", "5.2", "a request more than 300 s ahead is STALE_REQUEST",
        {ErrorCode.STALE_REQUEST}, refusal=True)  # fmt: skip
def _stale_future(target: TrackerTarget, stream: Stream) -> tuple[bytes, str]:
    node = _new_node()
    data = join(stream.id, node, now_ms() + SKEW_MS + 30_000, target.token(stream.id, node.id))
    return data, "JOIN with time_ms 330 s in the future"


@_error("7.2-join-unknown-stream", "7.2", "JOIN for a stream never registered is UNKNOWN_STREAM",
        {ErrorCode.UNKNOWN_STREAM}, refusal=True)  # fmt: skip
def _join_unknown(target: TrackerTarget, stream: Stream) -> tuple[bytes, str]:
    node = _new_node()
    other = key_id(Ed25519PrivateKey.generate())
    return join(other, node, now_ms(), target.token(other, node.id)), "JOIN for an unknown stream"


@_error("7.2-status-unknown-stream", "7.2", "STATUS for a stream never registered is "
        "UNKNOWN_STREAM", {ErrorCode.UNKNOWN_STREAM}, refusal=True)  # fmt: skip
def _status_unknown(target: TrackerTarget, stream: Stream) -> tuple[bytes, str]:
    return packb([0x15, key_id(Ed25519PrivateKey.generate())]), "STATUS for an unknown stream"


@_error("7.2-refresh-unknown-parent", "7.2", "REFRESH from an unknown node under an unknown "
        "parent is UNKNOWN_PEER", {ErrorCode.UNKNOWN_PEER}, refusal=True)  # fmt: skip
def _refresh_unknown(target: TrackerTarget, stream: Stream) -> tuple[bytes, str]:
    node = _new_node()
    parent = key_id(Ed25519PrivateKey.generate())
    return refresh(stream.id, node, parent), "REFRESH from a node the tracker never saw"


@_error("7.1-response-to-tracker", "7.1", "a message that is not a request is "
        "UNEXPECTED_MESSAGE", {ErrorCode.UNEXPECTED_MESSAGE})  # fmt: skip
def _response_to_tracker(target: TrackerTarget, stream: Stream) -> tuple[bytes, str]:
    return packb([0x1A, 60]), "ACK(60) as a request"


@case("5.2-register-ack", "5.2", Level.MUST, "REGISTER is answered ACK with refresh_s > 0")
async def _register_ack(target: TrackerTarget) -> Outcome:
    key = Ed25519PrivateKey.generate()
    stream = Stream(key, key_id(key), _address(), 2)
    ack = await target.ask_for(register(stream, now_ms()), Ack, "REGISTER")
    verdict = Verdict.PASS if ack.refresh_s > 0 else Verdict.FAIL
    return Outcome(verdict, "REGISTER(capacity 2)", "ACK(refresh_s > 0)", describe(ack))


@case("5.2-within-skew", "5.2", Level.MUST, "a request 200 s old is within the allowed skew")
async def _within_skew(target: TrackerTarget) -> Outcome:
    key = Ed25519PrivateKey.generate()
    stream = Stream(key, key_id(key), _address(), 2)
    sent = "REGISTER with time_ms 200 s in the past"
    ack = await target.ask_for(register(stream, now_ms() - 200_000), Ack, sent)
    return Outcome(Verdict.PASS, sent, "ACK", describe(ack))


@case("5.2-status-report", "5.2", Level.MUST,
      "STATUS is answered STATUS_REPORT for the stream, the origin at depth 0")  # fmt: skip
async def _status_report(target: TrackerTarget) -> Outcome:
    stream = await target.new_stream(capacity=3)
    await target.join(stream)
    report = await target.status(stream)
    sent = "REGISTER(capacity 3), one JOIN, then STATUS"
    expected = "STATUS_REPORT(stream, audience 1, origin 1/3, depth_histogram [1, 1])"
    ok = (
        report.stream == stream.id
        and report.audience == 1
        and (report.origin_children, report.origin_capacity) == (1, 3)
        and report.depth_histogram[:2] == (1, 1)
    )
    return Outcome(Verdict.PASS if ok else Verdict.FAIL, sent, expected, describe(report))


@case("5.2-register-replaces", "5.2", Level.MUST,
      "a second REGISTER replaces the origin's address and capacity")  # fmt: skip
async def _register_replaces(target: TrackerTarget) -> Outcome:
    stream = await target.new_stream(capacity=1)
    stream.capacity = 5
    await target.ask_for(register(stream, now_ms()), Ack, "REGISTER(capacity 5)")
    report = await target.status(stream)
    ok = report.origin_capacity == 5
    return Outcome(
        Verdict.PASS if ok else Verdict.FAIL,
        "REGISTER(capacity 1), REGISTER(capacity 5), STATUS",
        "STATUS_REPORT with origin_capacity 5",
        describe(report),
    )


@case("5.2-join-assigned", "5.2", Level.MUST,
      "the first JOIN is ASSIGNED the origin (node = stream id) at depth 1")  # fmt: skip
async def _join_assigned(target: TrackerTarget) -> Outcome:
    stream = await target.new_stream()
    node = await target.join(stream)
    assigned = node.assigned
    assert assigned is not None
    ok = (
        assigned.parent.node == stream.id
        and assigned.parent.address == stream.address
        and assigned.depth == 1
        and assigned.refresh_s > 0
    )
    return Outcome(
        Verdict.PASS if ok else Verdict.FAIL,
        "REGISTER, then JOIN(capacity 2)",
        f"ASSIGNED(parent=(stream id, {stream.address!r}), depth 1, refresh_s > 0)",
        describe(assigned),
    )


@case("5.3-live-granule", "5.3", Level.MUST,
      "ASSIGNED carries the live_granule of the last REGISTER: the latest, nil too")  # fmt: skip
async def _live_granule(target: TrackerTarget) -> Outcome:
    stream = await target.new_stream()
    sent = "REGISTER(live_granule nil), JOIN, REGISTER(live_granule 480000), JOIN, "
    sent += "REGISTER(live_granule 9600), JOIN, REGISTER(live_granule nil), JOIN"
    sequence = [None, 480_000, 9_600, None]
    got = []
    for live in sequence:
        await target.ask_for(register(stream, now_ms(), live_granule=live), Ack, "REGISTER")
        node = await target.join(stream)
        assert node.assigned is not None
        got.append(node.assigned.live_granule)
    return Outcome(
        Verdict.PASS if got == sequence else Verdict.FAIL,
        sent,
        "ASSIGNED with live_granule nil, 480000, 9600, then nil",
        ", ".join("nil" if g is None else str(g) for g in got),
    )


@case("7.3-origin-capacity", "7.3", Level.MUST,
      "the origin never gets more children than its capacity, nor nodes")  # fmt: skip
async def _capacities(target: TrackerTarget) -> Outcome:
    stream = await target.new_stream(capacity=1)
    nodes = [await target.join(stream, capacity=1) for _ in range(3)]
    parents = [n.assigned.parent.node for n in nodes if n.assigned is not None]
    expected_parents = [stream.id, nodes[0].id, nodes[1].id]
    report = await target.status(stream)
    ok = parents == expected_parents and report.origin_children <= 1
    names = {stream.id: "origin", **{n.id: f"node{i}" for i, n in enumerate(nodes)}}
    return Outcome(
        Verdict.PASS if ok else Verdict.FAIL,
        "REGISTER(capacity 1), then three JOIN(capacity 1)",
        "a chain: parents origin, node0, node1",
        "parents " + ", ".join(names.get(p, p.hex()[:8]) for p in parents),
    )


@case("7.3-leaf-last-slot", "7.3", Level.MUST,
      "a leaf never takes the tree's last free slot: NO_CAPACITY")  # fmt: skip
async def _leaf_last_slot(target: TrackerTarget) -> Outcome:
    stream = await target.new_stream(capacity=1)
    node = _new_node(0)
    node.address = ""
    data = join(stream.id, node, now_ms(), target.token(stream.id, node.id))
    return await target.expect_error(
        framed(data),
        {ErrorCode.NO_CAPACITY},
        "REGISTER(capacity 1), then JOIN(capacity 0)",
        refusal=True,
    )


@case("7.3-backups", "7.3", Level.MUST,
      "ASSIGNED holds >= 2 backups when that many exist, never the node or its parent")  # fmt: skip
async def _backups(target: TrackerTarget) -> Outcome:
    stream = await target.new_stream(capacity=3)
    first = [await target.join(stream, capacity=2) for _ in range(2)]
    node = await target.join(stream, capacity=2)
    assigned = node.assigned
    assert assigned is not None
    backups = {b.node for b in assigned.backups}
    ok = len(backups) >= 2 and not backups & {node.id, assigned.parent.node}
    ok = ok and backups <= {n.id for n in first} | {stream.id}
    return Outcome(
        Verdict.PASS if ok else Verdict.FAIL,
        "REGISTER(capacity 3), two JOIN(capacity 2), a third JOIN(capacity 2)",
        "the third ASSIGNED names the two earlier nodes as backups",
        describe(assigned),
    )


@case("7.3-rejoin-dead-parent", "7.3", Level.MUST,
      "a REJOIN reporting its parent dead is ASSIGNED another parent")  # fmt: skip
async def _rejoin_dead_parent(target: TrackerTarget) -> Outcome:
    stream = await target.new_stream(capacity=1)
    relay = await target.join(stream, capacity=2)
    other = await target.join(stream, capacity=2)
    node = await target.join(stream, capacity=2)
    assert node.assigned is not None
    dead = node.assigned.parent.node
    token = target.token(stream.id, node.id)
    sent = "origin(1) ← relay(2) ← two nodes(2); a node's REJOIN(dead = its parent)"
    assigned = await target.ask_for(rejoin(stream.id, node, dead, None, token), Assigned, sent)
    ok = assigned.parent.node not in (dead, node.id)
    del relay, other
    return Outcome(
        Verdict.PASS if ok else Verdict.FAIL,
        sent,
        "ASSIGNED with a parent other than the dead one",
        describe(assigned),
    )


@case("7.3-rejoin-attached", "7.3", Level.MUST,
      "a REJOIN whose `attached` has room is confirmed there")  # fmt: skip
async def _rejoin_attached(target: TrackerTarget) -> Outcome:
    stream = await target.new_stream(capacity=2)
    first = await target.join(stream, capacity=2)
    second = await target.join(stream, capacity=2)
    node = await target.join(stream, capacity=2)
    assert node.assigned is not None
    dead = node.assigned.parent.node
    attached = second.id if dead == first.id else first.id
    token = target.token(stream.id, node.id)
    sent = "REJOIN(dead = its parent, attached = the origin's other child, which has room)"
    assigned = await target.ask_for(rejoin(stream.id, node, dead, attached, token), Assigned, sent)
    ok = assigned.parent.node == attached
    return Outcome(
        Verdict.PASS if ok else Verdict.FAIL,
        sent,
        "ASSIGNED with parent = attached",
        describe(assigned),
    )


@case("7.2-refresh-ack", "7.2", Level.MUST, "REFRESH naming the assigned parent is ACKed")
async def _refresh_ack(target: TrackerTarget) -> Outcome:
    stream = await target.new_stream()
    node = await target.join(stream)
    sent = "JOIN, then REFRESH(parent = the assigned one)"
    answer = await target.ask_for(refresh(stream.id, node, stream.id), Ack, sent)
    return Outcome(Verdict.PASS, sent, "ACK", describe(answer))


@case("7.2-refresh-reinserts", "7.2", Level.MUST,
      "open mode: REFRESH from an unknown node under a parent with room re-inserts it")  # fmt: skip
async def _refresh_reinserts(target: TrackerTarget) -> Outcome:
    if target.host_key is not None:
        raise Unmet("the tracker has host keys: 7.2-refresh-needs-join applies")
    stream = await target.new_stream()
    node = _new_node()
    sent = "REFRESH(parent = origin) from a node that never joined (a tracker restart)"
    answer = await target.ask_for(refresh(stream.id, node, stream.id), Ack, sent)
    report = await target.status(stream)
    ok = report.audience == 1
    return Outcome(
        Verdict.PASS if ok else Verdict.FAIL,
        sent + ", then STATUS",
        "ACK, then STATUS_REPORT with audience 1",
        f"{describe(answer)}, then audience {report.audience}",
    )


@case("7.2-refresh-needs-join", "7.2", Level.MUST,
      "with host keys: REFRESH from an unknown node is UNKNOWN_PEER, not re-inserted")  # fmt: skip
async def _refresh_needs_join(target: TrackerTarget) -> Outcome:
    if target.host_key is None:
        raise Unmet("needs the host's key (--host-key): in open mode REFRESH re-inserts")
    stream = await target.new_stream()
    node = _new_node()
    sent = "REFRESH(parent = origin) from a node that never joined, with no token"
    outcome = await target.expect_error(
        framed(refresh(stream.id, node, stream.id)), {ErrorCode.UNKNOWN_PEER}, sent, refusal=True
    )
    report = await target.status(stream)
    if report.audience != 0:
        why = f"the stranger is in the tree (audience {report.audience})"
        return Outcome(Verdict.FAIL, sent, outcome.expected, outcome.got, why)
    return outcome


@case("5.2-leave-leaf", "5.2", Level.MUST, "LEAVE from a node with no children: MOVED([])")
async def _leave_leaf(target: TrackerTarget) -> Outcome:
    stream = await target.new_stream()
    node = await target.join(stream)
    moved = await target.ask_for(leave(stream.id, node.id, node.key), Moved, "LEAVE")
    report = await target.status(stream)
    ok = moved.moves == () and report.audience == 0
    return Outcome(
        Verdict.PASS if ok else Verdict.FAIL,
        "JOIN, LEAVE, STATUS",
        "MOVED([]), then audience 0",
        f"{describe(moved)}, then audience {report.audience}",
    )


@case("7.3-leave-moves-children", "7.3", Level.MUST,
      "LEAVE: MOVED gives each child a new parent outside the leaver and its subtree")  # fmt: skip
async def _leave_moves(target: TrackerTarget) -> Outcome:
    stream = await target.new_stream(capacity=2)
    relays = [await target.join(stream, capacity=1) for _ in range(2)]
    child = await target.join(stream, capacity=1)
    assert child.assigned is not None
    leaver = next(r for r in relays if r.id == child.assigned.parent.node)
    moved = await target.ask_for(leave(stream.id, leaver.id, leaver.key), Moved, "LEAVE")
    moves = {m.child: m.parent.node for m in moved.moves}
    ok = set(moves) == {child.id} and moves[child.id] not in (leaver.id, child.id)
    return Outcome(
        Verdict.PASS if ok else Verdict.FAIL,
        "origin(2) ← two relays(1) ← a child; the child's parent sends LEAVE",
        "MOVED([child → a parent other than the leaver])",
        describe(moved),
    )


@case("7.2-origin-leave-ends", "7.2", Level.MUST,
      "the origin's LEAVE ends the stream: MOVED([]), then STREAM_ENDED")  # fmt: skip
async def _origin_leave(target: TrackerTarget) -> Outcome:
    stream = await target.new_stream()
    moved = await target.ask_for(leave(stream.id, stream.id, stream.key), Moved, "origin LEAVE")
    node = _new_node()
    reply = await target.ask(join(stream.id, node, now_ms(), target.token(stream.id, node.id)))
    goodbye = reply.goodbye
    ok = moved.moves == () and goodbye is not None and goodbye.code == ErrorCode.STREAM_ENDED
    return Outcome(
        Verdict.PASS if ok else Verdict.FAIL,
        "REGISTER, LEAVE(node = stream, signed by the stream key), JOIN",
        "MOVED([]), then GOODBYE(STREAM_ENDED)",
        f"{describe(moved)}, then {reply.describe()}",
    )


@case("7.1-several-requests", "7.1", Level.MUST,
      "further requests on the same stream are each answered")  # fmt: skip
async def _several_requests(target: TrackerTarget) -> Outcome:
    stream = await target.new_stream()
    sent = "STATUS, then (after its answer) STATUS again on the same stream"
    got: list[str] = []
    async with target.link() as link:
        for _ in range(2):
            await link.send(framed(packb([0x15, stream.id])))
            reply = await read_reply(link, target.timeout, 0)
            got.append(reply.describe())
            if not isinstance(getattr(reply.first_message(), "message", None), StatusReport):
                raise Mismatch(sent, "two STATUS_REPORTs", ", then ".join(got))
    return Outcome(Verdict.PASS, sent, "two STATUS_REPORTs", ", then ".join(got))


@case("10-request-as-datagram", "10", Level.MUST,
      "a datagram that is not a CHUNK is UNEXPECTED_MESSAGE")  # fmt: skip
async def _request_as_datagram(target: TrackerTarget) -> Outcome:
    stream = await target.new_stream()
    sent = "STATUS as a QUIC datagram, then STATUS on the stream"
    expected = "the connection closed with UNEXPECTED_MESSAGE"
    async with target.link() as link:
        link.send_datagram(packb([0x15, stream.id]))
        await link.send(framed(packb([0x15, stream.id])))
        reply = await read_reply(link, target.timeout, target.close_wait)
    closed = reply.closed
    ok = closed is not None and closed.code == ErrorCode.UNEXPECTED_MESSAGE
    return Outcome(Verdict.PASS if ok else Verdict.FAIL, sent, expected, reply.describe())


@case("5.2-leave-unknown-node", "5.2", Level.MUST,
      "LEAVE from a node the tracker does not know is answered MOVED([])")  # fmt: skip
async def _leave_unknown(target: TrackerTarget) -> Outcome:
    stream = await target.new_stream()
    node = _new_node()
    sent = "LEAVE from an unknown node"
    moved = await target.ask_for(leave(stream.id, node.id, node.key), Moved, sent)
    verdict = Verdict.PASS if not moved.moves else Verdict.FAIL
    return Outcome(verdict, sent, "MOVED([])", describe(moved))


@_error("7.1-goodbye-to-tracker", "7.1", "a GOODBYE sent as a request is UNEXPECTED_MESSAGE",
        {ErrorCode.UNEXPECTED_MESSAGE})  # fmt: skip
def _goodbye_to_tracker(target: TrackerTarget, stream: Stream) -> tuple[bytes, str]:
    return packb([0x08, 0, "bye"]), "GOODBYE(NO_ERROR, 'bye')"


@_error("5-address-not-host-port", "5", "a JOIN whose address is not HOST:PORT is "
        "MALFORMED_MESSAGE", {ErrorCode.MALFORMED_MESSAGE})  # fmt: skip
def _address_not_host_port(target: TrackerTarget, stream: Stream) -> tuple[bytes, str]:
    node = _new_node()
    node.address = "garbage"
    return join(stream.id, node, now_ms(), target.token(stream.id, node.id)), (
        "JOIN(capacity 2, address 'garbage')"
    )


@_error("5.2-address-empty-serving", "5.2", "a JOIN with capacity > 0 and an empty "
        "address is MALFORMED_MESSAGE", {ErrorCode.MALFORMED_MESSAGE})  # fmt: skip
def _address_empty(target: TrackerTarget, stream: Stream) -> tuple[bytes, str]:
    node = _new_node()
    node.address = ""
    return join(stream.id, node, now_ms(), target.token(stream.id, node.id)), (
        "JOIN(capacity 2, address '')"
    )


@_error("5.2-join-as-origin", "5.2", "a JOIN whose node is the stream id is "
        "UNEXPECTED_MESSAGE", {ErrorCode.UNEXPECTED_MESSAGE}, refusal=True)  # fmt: skip
def _join_as_origin(target: TrackerTarget, stream: Stream) -> tuple[bytes, str]:
    origin = Node(stream.key, stream.id, _address(), 2)
    return join(stream.id, origin, now_ms(), target.token(stream.id, stream.id)), (
        "JOIN signed by the stream key, node = the stream id"
    )


@case("2-refusal-keeps-connection", "2", Level.MUST,
      "after a refusal the next request on the stream is answered")  # fmt: skip
async def _refusal_keeps_connection(target: TrackerTarget) -> Outcome:
    stream = await target.new_stream()
    unknown = key_id(Ed25519PrivateKey.generate())
    sent = "STATUS for an unknown stream, then (after its answer) STATUS for a known one"
    expected = "GOODBYE(UNKNOWN_STREAM), then STATUS_REPORT"
    got: list[str] = []
    async with target.link() as link:
        for stream_id in (unknown, stream.id):
            await link.send(framed(packb([0x15, stream_id])))
            got.append((await read_reply(link, target.timeout, 0)).describe())
    ok = got[0].startswith("GOODBYE(UNKNOWN_STREAM") and got[1].startswith("STATUS_REPORT")
    return Outcome(Verdict.PASS if ok else Verdict.FAIL, sent, expected, ", then ".join(got))


# -- the order of the checks (§7.1): each case makes two checks fail ---------------------


@_error("7.1-order-stale-first", "7.1", "a stale request with a bad signature is STALE_REQUEST",
        {ErrorCode.STALE_REQUEST}, refusal=True)  # fmt: skip
def _stale_first(target: TrackerTarget, stream: Stream) -> tuple[bytes, str]:
    node = _new_node()
    data = join(stream.id, node, now_ms() - SKEW_MS - 30_000, target.token(stream.id, node.id),
                key=stream.key)  # fmt: skip
    return data, "JOIN 330 s old and signed by another key"


@_error("7.1-order-signature-before-stream", "7.1", "a badly signed JOIN for an unknown "
        "stream is BAD_SIGNATURE", _BAD_SIG, refusal=True)  # fmt: skip
def _signature_before_stream(target: TrackerTarget, stream: Stream) -> tuple[bytes, str]:
    node = _new_node()
    other = Ed25519PrivateKey.generate()
    data = join(key_id(other), node, now_ms(), target.token(key_id(other), node.id), key=other)
    return data, "JOIN for an unknown stream, signed by another key"


@case("7.1-order-token-before-stream", "7.1", Level.MUST,
      "a JOIN without a token for an unknown stream is TOKEN_REQUIRED")  # fmt: skip
async def _token_before_stream(target: TrackerTarget) -> Outcome:
    if target.host_key is None:
        raise Unmet("token cases need the host's key (--host-key)")
    node = _new_node()
    unknown = key_id(Ed25519PrivateKey.generate())
    data = join(unknown, node, now_ms(), None)
    sent = "JOIN for an unknown stream, token = nil"
    return await target.expect_error(framed(data), {ErrorCode.TOKEN_REQUIRED}, sent, refusal=True)


# -- admission tokens (§5.4) -------------------------------------------------------------------


def _token_case(case_id: str, title: str, code: ErrorCode, build: Any) -> None:
    async def run(target: TrackerTarget) -> Outcome:
        if target.host_key is None:
            raise Unmet("token cases need the host's key (--host-key)")
        stream = await target.new_stream()
        node = _new_node()
        token, sent = build(target.host_key, stream.id, node.id)
        data = join(stream.id, node, now_ms(), token)
        return await target.expect_error(framed(data), {code}, sent, refusal=True)

    case(case_id, "5.4", Level.MUST, title)(run)


def _later() -> int:
    return now_ms() + 3_600_000


_token_case(
    "5.4-token-required",
    "JOIN without a token is TOKEN_REQUIRED when the tracker has host keys",
    ErrorCode.TOKEN_REQUIRED,
    lambda host, stream, node: (None, "JOIN with token = nil"),
)
_token_case(
    "5.4-token-other-node",
    "a token for another node is TOKEN_INVALID",
    ErrorCode.TOKEN_INVALID,
    lambda host, stream, node: (
        issue_token(host, stream, bytes(32), _later()),
        "JOIN with a host-signed token for another node",
    ),
)
_token_case(
    "5.4-token-other-stream",
    "a token for another stream is TOKEN_INVALID",
    ErrorCode.TOKEN_INVALID,
    lambda host, stream, node: (
        issue_token(host, bytes(32), node, _later()),
        "JOIN with a host-signed token for another stream",
    ),
)
_token_case(
    "5.4-token-not-host-signed",
    "a token not signed by a host key is TOKEN_INVALID",
    ErrorCode.TOKEN_INVALID,
    lambda host, stream, node: (
        issue_token(Ed25519PrivateKey.generate(), stream, node, _later()),
        "JOIN with a token signed by an unknown key",
    ),
)
_token_case(
    "5.4-token-garbage",
    "a token that is not a TOKEN message is TOKEN_INVALID",
    ErrorCode.TOKEN_INVALID,
    lambda host, stream, node: (b"\x92\x15\xc0", "JOIN with token 9215c0"),
)
_token_case(
    "5.4-token-expired",
    "an expired token is TOKEN_EXPIRED",
    ErrorCode.TOKEN_EXPIRED,
    lambda host, stream, node: (
        issue_token(host, stream, node, now_ms() - 1000),
        "JOIN with a host-signed token that expired 1 s ago",
    ),
)


@case("5.4-token-accepted", "5.4", Level.MUST, "JOIN with a valid token is ASSIGNED")
async def _token_accepted(target: TrackerTarget) -> Outcome:
    if target.host_key is None:
        raise Unmet("token cases need the host's key (--host-key)")
    stream = await target.new_stream()
    node = await target.join(stream)
    assert node.assigned is not None
    return Outcome(Verdict.PASS, "JOIN with a valid token", "ASSIGNED", describe(node.assigned))


@case("5.4-open-mode", "5.4", Level.MUST, "a tracker without host keys ignores tokens")
async def _open_mode(target: TrackerTarget) -> Outcome:
    if target.host_key is not None:
        raise Unmet("the tracker has host keys (--host-key was given)")
    stream = await target.new_stream()
    node = _new_node()
    reply = await target.ask(join(stream.id, node, now_ms(), b"\x92\x15\xc0"))
    goodbye = reply.goodbye
    if goodbye is not None and goodbye.code == ErrorCode.TOKEN_REQUIRED:
        raise Unmet("the tracker requires tokens: give the suite --host-key")
    first = reply.first_message()
    ok = first is not None and isinstance(first.message, Assigned)
    return Outcome(
        Verdict.PASS if ok else Verdict.FAIL,
        "JOIN with token 9215c0 (not a TOKEN)",
        "ASSIGNED (open mode ignores tokens)",
        reply.describe(),
    )


# -- suspects and probes (§7.3) ------------------------------------------------------------
#
# S is a relay that its children report dead. At S's address the suite puts a stand-in
# (meshd.conformance.peers): a QUIC server with S's key (S is alive), one with another
# key (an impostor), or a port that answers nothing (S is gone).


def _probe_wait(target: TrackerTarget) -> float:
    """How long the suite gives a tracker to probe a suspect and act on the result (the
    spec states no deadline; the reference probes every second, for at most 2 s)."""
    return 4 * target.timeout


def _host(target: TrackerTarget) -> str:
    """Where the suite's stand-ins listen: the host its own endpoint is bound to."""
    return target.endpoint.address[0]


async def _join_as(target: TrackerTarget, stream: Stream, node: Node) -> None:
    node.assigned = await target.ask_for(
        join(stream.id, node, now_ms(), target.token(stream.id, node.id)),
        Assigned,
        f"JOIN(capacity={node.capacity})",
    )


def _parent(node: Node) -> bytes:
    assert node.assigned is not None
    return node.assigned.parent.node


async def _tree(target: TrackerTarget, stream: Stream) -> TreeReport:
    report: TreeReport = await target.ask_for(
        packb([0x16, stream.id, MAX_TREE_NODES]), TreeReport, "TREE"
    )
    return report


def _parents(report: TreeReport) -> dict[bytes, bytes | None]:
    """Each node TREE_REPORT lists, with its parent."""
    return {record.node: record.parent for record in report.nodes}


class _Names:
    """The suite's names for the nodes of a case, for its report."""

    def __init__(self, **nodes: bytes) -> None:
        self._names = {node: name for name, node in nodes.items()}

    def __call__(self, node: bytes | None) -> str:
        if node is None:
            return "nil"
        return self._names.get(node, node[:4].hex() + "…")

    def placed(self, nodes: list[Node]) -> str:
        return ", ".join(f"{self(n.id)} under {self(_parent(n))}" for n in nodes)

    def assigned(self, answer: Assigned) -> str:
        backups = ", ".join(self(b.node) for b in answer.backups)
        return f"ASSIGNED(parent {self(answer.parent.node)}, backups [{backups}])"


@dataclass
class _Suspected:
    stream: Stream
    suspect: Node
    children: list[Node]
    """C1, C2: S's children."""
    other: Node
    """T: the other relay under the origin."""

    def names(self) -> _Names:
        c1, c2 = (c.id for c in self.children)
        return _Names(origin=self.stream.id, S=self.suspect.id, T=self.other.id, C1=c1, C2=c2)


_SUSPECTED = "origin(1) ← S(2) ← C1, C2 (capacity 1 each); REGISTER(capacity 2); T(1)"


async def _suspected(target: TrackerTarget, key: Ed25519PrivateKey, address: str) -> _Suspected:
    """The tree `_SUSPECTED`: once C1 leaves S, S is the only free slot at depth 1, so a
    JOIN would go there if S were not a suspect."""
    stream = await target.new_stream(capacity=1)
    # S declares 2: a tracker whose newcomers earn their slots (§7.3) gives it 2 at once.
    suspect = Node(key, key_id(key), address, 2)
    await _join_as(target, stream, suspect)
    children = [await target.join(stream, capacity=1) for _ in range(2)]
    stream.capacity = 2
    await target.ask_for(register(stream, now_ms()), Ack, "REGISTER(capacity 2)")
    other = await target.join(stream, capacity=1)
    tree = _Suspected(stream, suspect, children, other)
    nodes = [suspect, *children, other]
    if [_parent(n) for n in nodes] != [stream.id, *[suspect.id] * 2, stream.id]:
        expected = "S and T under the origin, C1 and C2 under S (§7.3 placement)"
        raise Mismatch(_SUSPECTED, expected, tree.names().placed(nodes))
    return tree


async def _report_dead(target: TrackerTarget, tree: _Suspected, child: Node) -> Assigned:
    return await _rejoin(
        target, tree.stream, child, tree.suspect.id, "REJOIN(dead = S, attached = nil)"
    )


def _offers(answer: Assigned, node: bytes) -> bool:
    return answer.parent.node == node or any(b.node == node for b in answer.backups)


async def _until_unlisted(
    target: TrackerTarget, stream: Stream, node: bytes, within: float
) -> TreeReport:
    """TREE, again and again until it no longer lists `node` or `within` s have passed."""
    deadline = trio.current_time() + within
    while node in _parents(report := await _tree(target, stream)):
        if trio.current_time() >= deadline:
            break
        await trio.sleep(0.25)
    return report


def _rehomed(report: TreeReport, gone: bytes, children: list[Node]) -> bool:
    """Every child of the removed node is listed under a node that is listed itself."""
    parents = _parents(report)
    return all(
        c.id in parents and parents[c.id] != gone and parents[c.id] in parents for c in children
    )


@case("7.3-suspect-not-offered", "7.3", Level.MUST,
      "a relay one child reports dead is offered to nobody, and not removed")  # fmt: skip
async def _suspect_not_offered(target: TrackerTarget) -> Outcome:
    key = Ed25519PrivateKey.generate()
    async with answering(key, _host(target)) as alive:
        tree = await _suspected(target, key, alive.address)
        first = await _report_dead(target, tree, tree.children[0])
        newcomer = await target.join(tree.stream, capacity=1)
        report = await _tree(target, tree.stream)
    assert newcomer.assigned is not None
    names = tree.names()
    offered = _offers(first, tree.suspect.id) or _offers(newcomer.assigned, tree.suspect.id)
    listed = tree.suspect.id in _parents(report)
    return Outcome(
        Verdict.FAIL if offered or not listed else Verdict.PASS,
        f"{_SUSPECTED}; C1 REJOIN(dead = S); a new JOIN(capacity 1); TREE "
        "(S answers handshakes at its address)",
        "neither C1 nor the newcomer is placed under S or given S as a backup; TREE still lists S",
        f"C1 {names.assigned(first)}, newcomer {names.assigned(newcomer.assigned)}; "
        f"TREE {'lists' if listed else 'does not list'} S",
    )


@case("7.3-suspect-probed", "7.3", Level.MUST,
      "the tracker probes a suspect with a QUIC handshake to its address")  # fmt: skip
async def _suspect_probed(target: TrackerTarget) -> Outcome:
    key = Ed25519PrivateKey.generate()
    wait = _probe_wait(target)
    async with answering(key, _host(target)) as alive:
        tree = await _suspected(target, key, alive.address)
        before = alive.packets
        await _report_dead(target, tree, tree.children[0])
        probed = await alive.probe_over(before, wait)
    return Outcome(
        Verdict.PASS if probed else Verdict.FAIL,
        f"{_SUSPECTED}; C1 REJOIN(dead = S), while a QUIC server with S's key answers at "
        "S's address",
        f"a QUIC connection to S's address within {wait:g} s, then closed",
        f"{alive.packets - before} packets reached S's address"
        + ("" if probed else ("; still connected" if alive.connected else "")),
    )


@asynccontextmanager
async def _found_alive(target: TrackerTarget) -> AsyncIterator[_Suspected]:
    """The tree `_SUSPECTED`, C1's report against S, and the tracker's probe answered by
    S's stand-in (for as long as the block runs): S is unproven now."""
    key = Ed25519PrivateKey.generate()
    async with answering(key, _host(target)) as alive:
        tree = await _suspected(target, key, alive.address)
        before = alive.packets
        await _report_dead(target, tree, tree.children[0])
        wait = _probe_wait(target)
        if not await alive.probe_over(before, wait):
            raise Unmet(f"no probe reached S within {wait:g} s (see 7.3-suspect-probed)")
        yield tree


@case("7.3-unproven-not-offered", "7.3", Level.MUST,
      "a suspect that answers the probe is kept, but offered to nobody for 60 s")  # fmt: skip
async def _unproven_not_offered(target: TrackerTarget) -> Outcome:
    async with _found_alive(target) as tree:
        newcomer = await target.join(tree.stream, capacity=1)
        report = await _tree(target, tree.stream)
    assert newcomer.assigned is not None
    names = tree.names()
    offered = _offers(newcomer.assigned, tree.suspect.id)
    listed = tree.suspect.id in _parents(report)
    return Outcome(
        Verdict.FAIL if offered or not listed else Verdict.PASS,
        f"{_SUSPECTED}; C1 REJOIN(dead = S); S's stand-in answers the probe; then a new "
        "JOIN(capacity 1) and TREE",
        "the newcomer neither placed under S nor given S as a backup; TREE still lists S",
        f"newcomer {names.assigned(newcomer.assigned)}; "
        f"TREE {'lists' if listed else 'does not list'} S",
    )


@case("7.3-unproven-second-reporter-removes", "7.3", Level.MUST,
      "a suspect that answers the probe is removed within 20 s of a second report")  # fmt: skip
async def _unproven_second_reporter(target: TrackerTarget) -> Outcome:
    async with _found_alive(target) as tree:
        second = await _report_dead(target, tree, tree.children[1])
        report = await _until_unlisted(target, tree.stream, tree.suspect.id, 20.0)
    names = tree.names()
    listed = tree.suspect.id in _parents(report)
    rehomed = _rehomed(report, tree.suspect.id, tree.children)
    ok = not listed and rehomed and second.parent.node != tree.suspect.id
    return Outcome(
        Verdict.PASS if ok else Verdict.FAIL,
        f"{_SUSPECTED}; C1 REJOIN(dead = S); S's stand-in answers the probe; then C2 "
        "REJOIN(dead = S); TREE until it no longer lists S",
        "C2 placed elsewhere; within 20 s TREE no longer lists S (being reachable is no "
        "proof of delivering), and lists C1 and C2 under listed nodes",
        f"C2 {names.assigned(second)}; TREE {'lists' if listed else 'does not list'} S",
    )


_EXCUSED = (
    "origin(1) ← A(1) ← P(1) ← S(2) ← C1, C2 (capacity 1 each); REGISTER(capacity 3); "
    "C1 REJOIN(dead = S); S's stand-in answers the probe; P REJOIN(dead = A); C2 "
    "REJOIN(dead = S)"
)


@case("7.3-excused-below-a-failure", "7.3", Level.MUST,
      "reports against a relay starved by a failover further up do not remove it")  # fmt: skip
async def _excused_below_a_failure(target: TrackerTarget) -> Outcome:
    key = Ed25519PrivateKey.generate()
    watch = 8.0  # past the 5 s a conviction waits, and the reference's expiry pass
    async with answering(key, _host(target)) as alive:
        stream = await target.new_stream(capacity=1)
        above = await target.join(stream, capacity=1)
        parent = await target.join(stream, capacity=1)
        suspect = Node(key, key_id(key), alive.address, 2)
        await _join_as(target, stream, suspect)
        children = [await target.join(stream, capacity=1) for _ in range(2)]
        c1, c2 = (c.id for c in children)
        names = _Names(origin=stream.id, A=above.id, P=parent.id, S=suspect.id, C1=c1, C2=c2)
        nodes = [above, parent, suspect, *children]
        expected = [stream.id, above.id, parent.id, suspect.id, suspect.id]
        if [_parent(n) for n in nodes] != expected:
            placement = "a chain, as the only free slots allow (§7.3 placement)"
            raise Mismatch(_EXCUSED, placement, names.placed(nodes))
        stream.capacity = 3
        await target.ask_for(register(stream, now_ms()), Ack, "REGISTER(capacity 3)")
        before = alive.packets
        await _rejoin(target, stream, children[0], suspect.id, "REJOIN(dead = S)")
        wait = _probe_wait(target)
        if not await alive.probe_over(before, wait):
            raise Unmet(f"no probe reached S within {wait:g} s (see 7.3-suspect-probed)")
        await _rejoin(target, stream, parent, above.id, "REJOIN(dead = A)")
        await _rejoin(target, stream, children[1], suspect.id, "REJOIN(dead = S)")
        await trio.sleep(watch)
        report = await _tree(target, stream)
    listed = suspect.id in _parents(report)
    return Outcome(
        Verdict.PASS if listed else Verdict.FAIL,
        f"{_EXCUSED}; TREE {watch:g} s later",
        "TREE still lists S: S starved while P failed over, so C2 is no witness against it for 5 s",
        f"TREE {'lists' if listed else 'does not list'} S",
    )


async def _rejoin(
    target: TrackerTarget, stream: Stream, node: Node, dead: bytes, sent: str
) -> Assigned:
    token = target.token(stream.id, node.id)
    data = rejoin(stream.id, node, dead, None, token)
    answer: Assigned = await target.ask_for(data, Assigned, sent)
    return answer


@case("7.3-second-reporter-removes", "7.3", Level.MUST,
      "a second distinct reporter removes the suspect; its children are re-homed")  # fmt: skip
async def _second_reporter(target: TrackerTarget) -> Outcome:
    key = Ed25519PrivateKey.generate()
    async with silent(_host(target)) as gone:
        tree = await _suspected(target, key, gone.address)
        await _report_dead(target, tree, tree.children[0])
        second = await _report_dead(target, tree, tree.children[1])
        report = await _tree(target, tree.stream)
    names = tree.names()
    parents = _parents(report)
    listed = tree.suspect.id in parents
    rehomed = _rehomed(report, tree.suspect.id, tree.children)
    ok = not listed and rehomed and second.parent.node != tree.suspect.id
    placed = ", ".join(f"{names(c.id)} under {names(parents.get(c.id))}" for c in tree.children)
    return Outcome(
        Verdict.PASS if ok else Verdict.FAIL,
        f"{_SUSPECTED}; C1 REJOIN(dead = S), C2 REJOIN(dead = S); TREE (S's address answers "
        "nothing)",
        "C2 placed elsewhere; TREE no longer lists S, and lists C1 and C2 under listed nodes",
        f"C2 {names.assigned(second)}; TREE {'lists' if listed else 'does not list'} S; " + placed,
    )


_CLAIMED = (
    "origin(1) ← T(3) ← C1, C2 (capacity 0); REGISTER(capacity 2); S(2); C1 and C2 "
    "REFRESH(parent = S); C1 and C2 REJOIN(dead = S), while a QUIC server with S's key "
    "answers at S's address"
)


@case("7.3-claimed-child-no-witness", "7.3", Level.MUST,
      "children that put themselves under a relay by REFRESH cannot report it away")  # fmt: skip
async def _claimed_child_no_witness(target: TrackerTarget) -> Outcome:
    key = Ed25519PrivateKey.generate()
    watch = 8.0  # past a probe, the 5 s a conviction waits, and the reference's expiry pass
    async with answering(key, _host(target)) as alive:
        stream = await target.new_stream(capacity=1)
        other = await target.join(stream, capacity=3)
        claimers = [await target.join(stream, capacity=0) for _ in range(2)]
        stream.capacity = 2
        await target.ask_for(register(stream, now_ms()), Ack, "REGISTER(capacity 2)")
        suspect = Node(key, key_id(key), alive.address, 2)
        await _join_as(target, stream, suspect)
        c1, c2 = (c.id for c in claimers)
        names = _Names(origin=stream.id, T=other.id, S=suspect.id, C1=c1, C2=c2)
        nodes = [other, *claimers, suspect]
        if [_parent(n) for n in nodes] != [stream.id, other.id, other.id, stream.id]:
            expected = "T and S under the origin, C1 and C2 under T (§7.3 placement)"
            raise Mismatch(_CLAIMED, expected, names.placed(nodes))
        for claimer in claimers:
            sent = "REFRESH(parent = S), S having free slots"
            await target.ask_for(refresh(stream.id, claimer, suspect.id), Ack, sent)
        for claimer in claimers:
            await _rejoin(target, stream, claimer, suspect.id, "REJOIN(dead = S)")
        await trio.sleep(watch)
        report = await _tree(target, stream)
    listed = suspect.id in _parents(report)
    return Outcome(
        Verdict.PASS if listed else Verdict.FAIL,
        f"{_CLAIMED}; TREE {watch:g} s later",
        "TREE still lists S: C1 and C2 are under S by their own claim, not the tracker's "
        "placement, so they are no witnesses, and S answers the probe",
        f"TREE {'lists' if listed else 'does not list'} S",
    )


@case("7.3-unreachable-suspect-removed", "7.3", Level.MUST,
      "a suspect whose address answers nothing is removed once the probe fails")  # fmt: skip
async def _unreachable_removed(target: TrackerTarget) -> Outcome:
    key = Ed25519PrivateKey.generate()
    wait = _probe_wait(target)
    async with silent(_host(target)) as gone:
        tree = await _suspected(target, key, gone.address)
        await _report_dead(target, tree, tree.children[0])
        report = await _until_unlisted(target, tree.stream, tree.suspect.id, wait)
    listed = tree.suspect.id in _parents(report)
    rehomed = _rehomed(report, tree.suspect.id, tree.children)
    return Outcome(
        Verdict.PASS if not listed and rehomed else Verdict.FAIL,
        f"{_SUSPECTED}; C1 REJOIN(dead = S); TREE until S is gone (S's address answers nothing)",
        f"TREE without S within {wait:g} s, C1 and C2 under listed nodes",
        f"TREE {'still lists' if listed else 'no longer lists'} S, C1 and C2 "
        + ("re-homed" if rehomed else "not all re-homed"),
        f"{gone.packets} packets reached S's address",
    )


@case("7.3-probe-pinned", "7.3", Level.MUST,
      "the probe is pinned to the suspect's node id: another key there is no answer")  # fmt: skip
async def _probe_pinned(target: TrackerTarget) -> Outcome:
    wait = _probe_wait(target)
    async with answering(Ed25519PrivateKey.generate(), _host(target)) as impostor:
        tree = await _suspected(target, Ed25519PrivateKey.generate(), impostor.address)
        await _report_dead(target, tree, tree.children[0])
        report = await _until_unlisted(target, tree.stream, tree.suspect.id, wait)
    listed = tree.suspect.id in _parents(report)
    return Outcome(
        Verdict.FAIL if listed else Verdict.PASS,
        f"{_SUSPECTED}; C1 REJOIN(dead = S); TREE until S is gone (a QUIC server with "
        "another key answers at S's address)",
        f"the probe fails (wrong key): TREE without S within {wait:g} s",
        f"TREE {'still lists' if listed else 'no longer lists'} S",
        f"{impostor.packets} packets reached S's address",
    )


# -- soft state (§7.2) ---------------------------------------------------------------------


def _peer_ttl(target: TrackerTarget) -> float:
    if target.peer_ttl is None:
        raise Unmet("needs the tracker's peer_ttl (--peer-ttl S); the case waits that long")
    return target.peer_ttl


def _expiry_wait(target: TrackerTarget, ttl: float) -> float:
    """How long past peer_ttl the suite waits for an expiry (the spec states no deadline;
    the reference expires soft state every 5 s)."""
    return ttl + 3 * target.timeout


def _poll_interval(ttl: float) -> float:
    return min(ttl / 4, 0.5)


@case("7.2-peer-ttl-expiry", "7.2", Level.MUST,
      "a node not heard from for peer_ttl is removed; one that refreshes is kept")  # fmt: skip
async def _peer_ttl_expiry(target: TrackerTarget) -> Outcome:
    ttl = _peer_ttl(target)
    stream = await target.new_stream(capacity=2)
    quiet = await target.join(stream, capacity=1)
    kept = await target.join(stream, capacity=1)
    joined = trio.current_time()
    names = _Names(quiet=quiet.id, kept=kept.id)
    sent = "two JOINs; then REGISTER, REFRESH from one node and TREE, again and again"
    expected = f"the silent node listed at {ttl / 2:g} s and gone by " + (
        f"{_expiry_wait(target, ttl):g} s, the refreshing one still listed"
    )
    while True:
        elapsed = trio.current_time() - joined
        await target.ask_for(register(stream, now_ms()), Ack, "REGISTER")
        answer = await target.ask(refresh(stream.id, kept, _parent(kept)))
        first = answer.first_message()
        if first is not None and isinstance(first.message, Assigned):
            kept.assigned = first.message  # rebalanced: it is somewhere else now
        listed = set(_parents(await _tree(target, stream)))
        if quiet.id not in listed or elapsed > _expiry_wait(target, ttl):
            break
        await trio.sleep(_poll_interval(ttl))
    got = f"at {elapsed:.1f} s TREE lists " + (", ".join(names(n) for n in listed) or "nobody")
    early = quiet.id not in listed and elapsed < ttl / 2
    ok = quiet.id not in listed and kept.id in listed and not early
    return Outcome(Verdict.PASS if ok else Verdict.FAIL, sent, expected, got)


async def _status_until(
    target: TrackerTarget, stream: Stream, done: Callable[[Reply], bool], within: float
) -> tuple[Reply, float]:
    """STATUS again and again until `done(reply)` or `within` s; the last reply, and when
    it came (seconds from now)."""
    start = trio.current_time()
    while True:
        reply = await target.ask(packb([0x15, stream.id]))
        elapsed = trio.current_time() - start
        if done(reply) or elapsed > within:
            return reply, elapsed
        await trio.sleep(min(within / 20, 0.5))


def _is_goodbye(code: ErrorCode) -> Callable[[Reply], bool]:
    def check(reply: Reply) -> bool:
        goodbye = reply.goodbye
        return goodbye is not None and goodbye.code == code

    return check


def _is_refusal(reply: Reply) -> bool:
    return reply.goodbye is not None


@case("7.2-stream-expiry", "7.2", Level.MUST,
      "a stream whose origin sends no REGISTER for peer_ttl ends: STREAM_ENDED")  # fmt: skip
async def _stream_expiry(target: TrackerTarget) -> Outcome:
    ttl = _peer_ttl(target)
    stream = await target.new_stream()
    wait = _expiry_wait(target, ttl)
    reply, elapsed = await _status_until(target, stream, _is_refusal, wait)
    ok = _is_goodbye(ErrorCode.STREAM_ENDED)(reply) and elapsed >= ttl / 2
    return Outcome(
        Verdict.PASS if ok else Verdict.FAIL,
        "REGISTER once, then STATUS again and again",
        f"STATUS_REPORT at first, GOODBYE(STREAM_ENDED) once peer_ttl ({ttl:g} s) has "
        f"passed, by {wait:g} s",
        f"at {elapsed:.1f} s: {reply.describe()}",
    )


@case("7.2-ended-stream-forgotten", "7.2", Level.MUST,
      "STREAM_ENDED for peer_ttl after a stream ended, then UNKNOWN_STREAM")  # fmt: skip
async def _ended_stream_forgotten(target: TrackerTarget) -> Outcome:
    ttl = _peer_ttl(target)
    stream = await target.new_stream()
    await target.ask_for(leave(stream.id, stream.id, stream.key), Moved, "origin LEAVE")
    wait = _expiry_wait(target, ttl)
    ended, _ = await _status_until(target, stream, lambda reply: True, 0)
    reply, elapsed = await _status_until(
        target, stream, lambda r: not _is_goodbye(ErrorCode.STREAM_ENDED)(r), wait
    )
    ok = (
        _is_goodbye(ErrorCode.STREAM_ENDED)(ended)
        and _is_goodbye(ErrorCode.UNKNOWN_STREAM)(reply)
        and elapsed >= ttl / 2
    )
    return Outcome(
        Verdict.PASS if ok else Verdict.FAIL,
        "REGISTER, the origin's LEAVE, then STATUS again and again",
        f"GOODBYE(STREAM_ENDED), then GOODBYE(UNKNOWN_STREAM) once peer_ttl ({ttl:g} s) "
        f"has passed, by {wait:g} s",
        f"{ended.describe()}; at {elapsed:.1f} s: {reply.describe()}",
    )


@case("7.2-ended-stream-requests", "7.2", Level.MUST,
      "after the origin's LEAVE every request about the stream is STREAM_ENDED")  # fmt: skip
async def _ended_stream_requests(target: TrackerTarget) -> Outcome:
    stream = await target.new_stream()
    node = await target.join(stream)
    await target.ask_for(leave(stream.id, stream.id, stream.key), Moved, "origin LEAVE")
    stranger = _new_node()
    token = target.token(stream.id, node.id)
    requests = {
        "STATUS": packb([0x15, stream.id]),
        "TREE": packb([0x16, stream.id, MAX_TREE_NODES]),
        "JOIN": join(stream.id, stranger, now_ms(), target.token(stream.id, stranger.id)),
        "REJOIN": rejoin(stream.id, node, stream.id, None, token),
        "REFRESH": refresh(stream.id, node, stream.id),
        "LEAVE": leave(stream.id, node.id, node.key),
    }
    got = {name: await target.ask(data) for name, data in requests.items()}
    wrong = [
        f"{name}: {reply.describe()}"
        for name, reply in got.items()
        if not _is_goodbye(ErrorCode.STREAM_ENDED)(reply)
    ]
    return Outcome(
        Verdict.FAIL if wrong else Verdict.PASS,
        "REGISTER, JOIN, the origin's LEAVE; then " + ", ".join(requests),
        "GOODBYE(STREAM_ENDED) for each",
        "; ".join(wrong) or "GOODBYE(STREAM_ENDED) for each",
    )


# -- rebalancing (§7.3) --------------------------------------------------------------------


@case("7.3-rebalance-leaf", "7.3", Level.MUST,
      "REFRESH from a leaf 2+ levels above the deepest free slot: ASSIGNED there")  # fmt: skip
async def _rebalance_leaf(target: TrackerTarget) -> Outcome:
    stream = await target.new_stream(capacity=2)
    leaf = await target.join(stream, capacity=0)
    first = await target.join(stream, capacity=1)
    second = await target.join(stream, capacity=1)
    names = _Names(origin=stream.id, leaf=leaf.id, R1=first.id, R2=second.id)
    setup = "origin(2) ← leaf(0), R1(1) ← R2(1)"
    if [_parent(leaf), _parent(first), _parent(second)] != [stream.id, stream.id, first.id]:
        raise Mismatch(setup, "that tree (§7.3 placement)", names.placed([leaf, first, second]))
    sent = f"{setup}; the leaf's REFRESH(parent = origin)"
    reply = await target.ask(refresh(stream.id, leaf, stream.id))
    first_message = reply.first_message()
    answer = None if first_message is None else first_message.message
    ok = isinstance(answer, Assigned) and answer.parent.node == second.id and answer.depth == 3
    return Outcome(
        Verdict.PASS if ok else Verdict.FAIL,
        sent,
        "ASSIGNED(parent R2, depth 3): the deepest free slot, two levels below the leaf's",
        names.assigned(answer) + f" depth {answer.depth}"
        if isinstance(answer, Assigned)
        else reply.describe(),
    )


@case("7.3-rebalance-relay", "7.3", Level.MUST,
      "REFRESH from a stable relay that could move 2+ levels up: ASSIGNED there")  # fmt: skip
async def _rebalance_relay(target: TrackerTarget) -> Outcome:
    if target.promote_after is None:
        raise Unmet(
            "needs the tracker's promote_after (--promote-after S): the case waits that "
            "long (the reference's is 60 s and has no option)"
        )
    stream = await target.new_stream(capacity=1)
    chain = [await target.join(stream, capacity=1) for _ in range(3)]
    names = _Names(origin=stream.id, R1=chain[0].id, R2=chain[1].id, X=chain[2].id)
    setup = "origin(1) ← R1(1) ← R2(1) ← X(1); REGISTER(capacity 2)"
    if [_parent(n) for n in chain] != [stream.id, chain[0].id, chain[1].id]:
        raise Mismatch(setup, "that chain (§7.3 placement)", names.placed(chain))
    stream.capacity = 2
    await target.ask_for(register(stream, now_ms()), Ack, "REGISTER(capacity 2)")
    await trio.sleep(target.promote_after)
    relay = chain[2]
    sent = f"{setup}; {target.promote_after:g} s later X's REFRESH(parent = R2)"
    reply = await target.ask(refresh(stream.id, relay, chain[1].id))
    first = reply.first_message()
    answer = None if first is None else first.message
    ok = isinstance(answer, Assigned) and answer.parent.node == stream.id and answer.depth == 1
    return Outcome(
        Verdict.PASS if ok else Verdict.FAIL,
        sent,
        "ASSIGNED(parent origin, depth 1): the free slot two levels above X's",
        names.assigned(answer) + f" depth {answer.depth}"
        if isinstance(answer, Assigned)
        else reply.describe(),
    )


# -- overload (§7.3) -----------------------------------------------------------------------

_OVER_BURST = 50
"""JOINs the suite sends beyond the tracker's burst: the bucket refills meanwhile."""


@case("7.3-join-rate-limit", "7.3", Level.SHOULD,
      "JOINs from one network beyond its burst: RETRY_AFTER(delay_ms > 0), honest delay",
      alone=True)  # fmt: skip
async def _join_rate_limit(target: TrackerTarget) -> Outcome:
    stream = await target.new_stream(capacity=1024)
    limit = target.join_burst + _OVER_BURST
    sent = (
        f"up to {limit} JOINs (fresh node keys) from the suite's address, each followed by "
        "its LEAVE (so that the network's live identities stay few), 8 pairs a connection"
    )
    expected = "RETRY_AFTER(delay_ms > 0, reason); a JOIN ASSIGNED once delay_ms has passed"
    joins = 0
    retry: RetryAfter | None = None
    while retry is None and joins < limit:
        async with target.link() as link:
            for _ in range(min(8, limit - joins)):
                node = _new_node(1)
                token = target.token(stream.id, node.id)
                await link.send(framed(join(stream.id, node, now_ms(), token)))
                reply = await read_reply(link, target.timeout, 0)
                joins += 1
                first = reply.first_message()
                if first is not None and isinstance(first.message, RetryAfter):
                    retry = first.message
                    break
                if first is None or not isinstance(first.message, Assigned):
                    raise Mismatch(sent, expected, f"JOIN {joins}: {reply.describe()}")
                await link.send(framed(leave(stream.id, node.id, node.key)))
                await read_reply(link, target.timeout, 0)
    if retry is None:
        return Outcome(Verdict.FAIL, sent, expected, f"all {joins} JOINs ASSIGNED")
    got = f"JOIN {joins}: {describe(retry)}"
    if retry.delay_ms == 0:
        return Outcome(Verdict.FAIL, sent, expected, got)
    if retry.delay_ms / 1000 > _probe_wait(target):
        raise Unmet(f"{got}: the suite does not wait that long to try again")
    await trio.sleep(retry.delay_ms / 1000)
    node = _new_node(1)
    reply = await target.ask(join(stream.id, node, now_ms(), target.token(stream.id, node.id)))
    first = reply.first_message()
    ok = first is not None and isinstance(first.message, Assigned)
    return Outcome(
        Verdict.PASS if ok else Verdict.FAIL,
        sent + "; after delay_ms, one more",
        expected,
        f"{got}; after {retry.delay_ms} ms: {reply.describe()}",
    )


# -- a parent's word about its child (§5.2 CHILD_GONE, §7.3) --------------------------------


def child_gone(stream: bytes, node: bytes, child: bytes, key: Ed25519PrivateKey) -> bytes:
    return signed([0x17, stream, node, child, now_ms()], key)


async def _relay_with_leaf(target: TrackerTarget) -> tuple[Stream, Node, Node, _Names]:
    """origin(1) ← N(2) ← L(0), placed by JOIN (a precondition: another tree skips)."""
    stream = await target.new_stream(capacity=1)
    relay = await target.join(stream, capacity=2)
    leaf = await target.join(stream, capacity=0)
    names = _Names(origin=stream.id, N=relay.id, L=leaf.id)
    if [_parent(relay), _parent(leaf)] != [stream.id, relay.id]:
        raise Unmet(f"JOINs did not build origin(1) ← N(2) ← L(0): {names.placed([relay, leaf])}")
    return stream, relay, leaf, names


async def _child_gone_then_tree(
    target: TrackerTarget, stream: Stream, sender: Node | Stream, child: bytes, sent: str
) -> tuple[Ack, dict[bytes, bytes | None]]:
    """`sender`'s CHILD_GONE about `child`, then TREE: the answer and who is under whom."""
    request = child_gone(stream.id, sender.id, child, sender.key)
    answer = await target.ask_for(request, Ack, sent)
    return answer, _parents(await _tree(target, stream))


@case("7.3-child-gone-frees-slot", "7.3", Level.MUST,
      "CHILD_GONE from a leaf's parent: ACK, and TREE no longer lists the leaf")  # fmt: skip
async def _child_gone_frees_slot(target: TrackerTarget) -> Outcome:
    stream, relay, leaf, _ = await _relay_with_leaf(target)
    sent = "origin(1) ← N(2) ← L(0); N's CHILD_GONE(child = L); TREE"
    answer, listed = await _child_gone_then_tree(target, stream, relay, leaf.id, sent)
    ok = leaf.id not in listed and listed.get(relay.id) == stream.id
    return Outcome(
        Verdict.PASS if ok else Verdict.FAIL,
        sent,
        "ACK; TREE lists N but not L",
        f"{describe(answer)}; TREE {'lists' if leaf.id in listed else 'does not list'} L",
    )


@case("7.3-origin-child-gone-removes-relay", "7.3", Level.MUST,
      "the origin's CHILD_GONE about a relay: ACK, and TREE lists its child, not it")  # fmt: skip
async def _origin_child_gone_removes_relay(target: TrackerTarget) -> Outcome:
    stream, relay, leaf, names = await _relay_with_leaf(target)
    sent = "origin(1) ← N(2) ← L(0); the origin's CHILD_GONE(child = N); TREE"
    answer, listed = await _child_gone_then_tree(target, stream, stream, relay.id, sent)
    ok = relay.id not in listed and listed.get(leaf.id) == stream.id
    return Outcome(
        Verdict.PASS if ok else Verdict.FAIL,
        sent,
        "ACK; TREE lists L under the origin and no N (the origin is taken at its word)",
        f"{describe(answer)}; TREE {'lists' if relay.id in listed else 'does not list'} N, "
        + (f"L under {names(listed[leaf.id])}" if leaf.id in listed else "no L"),
    )


@case("7.3-child-gone-not-the-parent", "7.3", Level.MUST,
      "CHILD_GONE from a node not the child's parent: ACK, and the child stays")  # fmt: skip
async def _child_gone_not_the_parent(target: TrackerTarget) -> Outcome:
    stream, relay, leaf, names = await _relay_with_leaf(target)
    other = await target.join(stream, capacity=2)
    sent = "origin(1) ← N(2) ← L(0), M(2) joins; M's CHILD_GONE(child = L); TREE"
    answer, listed = await _child_gone_then_tree(target, stream, other, leaf.id, sent)
    ok = listed.get(leaf.id) == relay.id
    return Outcome(
        Verdict.PASS if ok else Verdict.FAIL,
        sent,
        "ACK; TREE still lists L under N",
        f"{describe(answer)}; TREE lists L under {names(listed[leaf.id])}"
        if leaf.id in listed
        else f"{describe(answer)}; TREE does not list L",
    )


@_error("4.3-child-gone-signature", "4.3", "CHILD_GONE signed by another key is BAD_SIGNATURE",
        _BAD_SIG, refusal=True)  # fmt: skip
def _child_gone_sig(target: TrackerTarget, stream: Stream) -> tuple[bytes, str]:
    node, child = _new_node(), _new_node(0)
    data = child_gone(stream.id, node.id, child.id, stream.key)
    return data, "CHILD_GONE for a node, signed by another key"
