"""A parent's child slots (meshd/node/children.py), driven in memory with a fake clock."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.node.children import Children, CloseChild
from meshd.node.config import NodeConfig
from meshd.node.source import ANNOUNCE_FOR, OriginCore
from meshd.node.stats import NodeStats
from protocol import (
    ChildLink,
    ChunkRing,
    ChunkSigner,
    ErrorCode,
    Goodbye,
    frame,
    issue_token,
    key_id,
)

PARENT = b"\x05" * 32


class Parent:
    """A relay with one child slot, its header and path known."""

    def __init__(self, config: NodeConfig | None = None) -> None:
        signer = ChunkSigner(Ed25519PrivateKey.generate())
        self.stream = signer.stream_id
        self.heard: dict[int, float] = {}
        self.children = Children(
            self.stream,
            ChunkRing(span_samples=480_000),
            1,
            config or NodeConfig(),
            NodeStats("relay", "", ""),
        )
        self.children.last_heard = self.heard.get
        self.gone: list[bytes] = []
        self.children.on_gone = self.gone.append
        self.children.set_info(signer.stream_info(b"OpusHead-test"), 0.0)
        self.children.set_path((self.stream, PARENT), 0.0)

    def subscribe(self, child: int, now: float, token: bytes | None = None) -> None:
        node = bytes([child]) * 32
        link = ChildLink(self.stream, node, None, parent=PARENT, now=now, token=token)
        self.children.open(child, 1200, now, f"192.0.2.{child}/32", bytes([child]) * 32)
        self.heard[child] = now
        self.children.receive_data(child, link.data_to_send(), now)


def test_a_newcomer_gets_the_slot_of_a_child_silent_for_half_the_child_timeout() -> None:
    parent = Parent()
    parent.subscribe(1, now=0.0)
    assert parent.children.streaming_nodes() == {b"\x01" * 32}
    parent.subscribe(2, now=0.45)  # child 1 silent for 0.45 s: held, not refused
    assert parent.children.take_closes() == []
    parent.children.handle_timer(0.49)
    assert parent.children.take_closes() == []
    parent.children.handle_timer(0.5)  # half the 1 s child timeout
    assert parent.children.take_closes() == [CloseChild(1, ErrorCode.CHILD_TIMEOUT)]
    assert parent.children.streaming_nodes() == {b"\x02" * 32}
    assert parent.gone == [b"\x01" * 32]  # for the tracker to hear of


def test_a_child_heard_from_keeps_its_slot_and_the_newcomer_is_refused() -> None:
    parent = Parent()
    parent.subscribe(1, now=0.0)
    parent.subscribe(2, now=0.45)
    parent.heard[1] = 0.48  # its ACKs came in after all
    parent.children.handle_timer(0.5)
    assert parent.children.take_closes() == [CloseChild(2, ErrorCode.NO_CAPACITY)]
    assert parent.children.streaming_nodes() == {b"\x01" * 32}


def test_a_connection_that_never_subscribes_is_closed_and_only_a_few_may_wait() -> None:
    """Slowloris: connections that send nothing (or a byte of a frame) hold no slot and
    little memory for long."""
    parent = Parent()
    limit = NodeConfig().max_unsubscribed
    for child in range(limit + 3):
        parent.children.open(child, 1200, 0.0, f"10.0.{child}.0/24", bytes([child]) * 32)
        parent.children.receive_data(child, b"\x05", now=0.0)  # a byte of a frame header
    refused = parent.children.take_closes()
    assert refused == [CloseChild(c, ErrorCode.OVERLOADED) for c in range(limit, limit + 3)]
    parent.children.handle_timer(1.9)
    assert parent.children.take_closes() == []
    parent.children.handle_timer(NodeConfig().subscribe_timeout)
    closed = parent.children.take_closes()
    assert closed == [CloseChild(c, ErrorCode.CHILD_TIMEOUT) for c in range(limit)]
    assert parent.gone == []  # nobody the tracker placed: they never said who they are
    parent.subscribe(99, now=2.5)  # an honest child still gets in
    assert parent.children.streaming_nodes() == {bytes([99]) * 32}


def test_one_network_holds_only_a_few_of_the_places_of_connections_not_subscribed() -> None:
    """Slowloris that reopens from one place: it keeps a few places, the rest stay open."""
    parent = Parent()
    share = NodeConfig().max_unsubscribed_per_network
    for child in range(share + 5):
        parent.children.open(child, 1200, 0.0, "203.0.113.0/24", bytes([child]) * 32)
    refused = parent.children.take_closes()
    assert refused == [CloseChild(c, ErrorCode.OVERLOADED) for c in range(share, share + 5)]
    for child in range(share + 5):
        if child >= share:
            parent.children.closed(child)
    parent.subscribe(99, now=0.1)  # another network's newcomer is not refused
    assert parent.children.streaming_nodes() == {bytes([99]) * 32}


def test_a_child_let_go_for_silence_is_reported_one_that_said_goodbye_is_not() -> None:
    parent = Parent()
    parent.subscribe(1, now=0.0)
    parent.children.handle_timer(1.0)  # the child timeout
    assert parent.children.take_closes() == [CloseChild(1, ErrorCode.CHILD_TIMEOUT)]
    assert parent.gone == [b"\x01" * 32]
    parent.children.closed(1)
    parent.subscribe(2, now=2.0)
    parent.children.receive_data(2, frame(Goodbye(ErrorCode.NO_ERROR, "moved")), 2.5)
    assert parent.children.take_closes() == [CloseChild(2, ErrorCode.NO_ERROR)]
    assert parent.gone == [b"\x01" * 32]


def test_a_held_subscribe_that_times_out_is_not_reported() -> None:
    """We sent it nothing to acknowledge while it waited: its silence says nothing."""
    parent = Parent()
    parent.children.path = None  # our own path is not known yet: SUBSCRIBEs are held
    parent.subscribe(1, now=0.0)
    parent.children.handle_timer(1.0)  # the child timeout, as the hold ends
    assert parent.children.take_closes() == [CloseChild(1, ErrorCode.CHILD_TIMEOUT)]
    assert parent.gone == []


@pytest.mark.parametrize("proved", [bytes([8]) * 32, None])
def test_a_subscribe_in_another_nodes_name_is_refused(proved: bytes | None) -> None:
    """Children are authenticated: the SUBSCRIBE must name the key the child's certificate
    proved (a child without one is refused too)."""
    parent = Parent()
    link = ChildLink(parent.stream, bytes([7]) * 32, None, parent=PARENT, now=0.0)
    parent.children.open(7, 1200, 0.0, "192.0.2.0/24", proved)
    parent.children.receive_data(7, link.data_to_send(), 0.0)
    assert parent.children.take_closes() == [CloseChild(7, ErrorCode.WRONG_PEER)]
    assert parent.children.count == 0


HOST = Ed25519PrivateKey.generate()
NOW_MS = 1_700_000_000_000


def admitting_parent() -> Parent:
    parent = Parent(NodeConfig(host_keys=(key_id(HOST),)))
    parent.children.wall_ms = lambda: NOW_MS
    return parent


@pytest.mark.parametrize(
    ("token", "code"),
    [
        (None, ErrorCode.TOKEN_REQUIRED),
        (
            lambda stream: issue_token(HOST, stream, bytes([9]) * 32, NOW_MS + 1),
            ErrorCode.TOKEN_INVALID,
        ),
        (
            lambda stream: issue_token(
                Ed25519PrivateKey.generate(), stream, bytes([7]) * 32, NOW_MS + 1
            ),
            ErrorCode.TOKEN_INVALID,
        ),
        (
            lambda stream: issue_token(HOST, stream, bytes([7]) * 32, NOW_MS),
            ErrorCode.TOKEN_EXPIRED,
        ),
        (lambda stream: b"not a token", ErrorCode.TOKEN_INVALID),
    ],
    ids=["none", "another-node", "another-host", "expired", "garbage"],
)
def test_a_parent_that_knows_the_host_feeds_only_admitted_children(
    token: Callable[[bytes], bytes] | None, code: ErrorCode
) -> None:
    parent = admitting_parent()
    parent.subscribe(7, now=0.0, token=None if token is None else token(parent.stream))
    assert parent.children.take_closes() == [CloseChild(7, code)]
    assert parent.children.count == 0


def test_an_admitted_child_is_fed() -> None:
    parent = admitting_parent()
    token = issue_token(HOST, parent.stream, bytes([7]) * 32, NOW_MS + 60_000)
    parent.subscribe(7, now=0.0, token=token)
    assert parent.children.take_closes() == []
    assert parent.children.streaming_nodes() == {bytes([7]) * 32}


def test_a_parent_that_knows_no_host_ignores_the_token() -> None:
    parent = Parent()
    parent.subscribe(7, now=0.0, token=b"anything")
    assert parent.children.streaming_nodes() == {bytes([7]) * 32}


def test_the_origin_hands_its_driver_each_child_it_let_go_for_silence_once() -> None:
    """The origin tells the tracker too (CHILD_GONE): a dead leaf under the origin has
    nobody else to report it, and would hold one of its few slots for the peer TTL."""
    origin = OriginCore(Ed25519PrivateKey.generate(), 2, NodeConfig())
    origin.set_head(b"OpusHead-test", 0.0)
    heard = {1: 0.0, 2: 0.0}
    origin.children.last_heard = heard.get
    for child in (1, 2):
        node = bytes([child]) * 32
        link = ChildLink(origin.stream_id, node, None, parent=origin.stream_id, now=0.0)
        origin.children.open(child, 1200, 0.0, f"192.0.2.{child}/32", node)
        origin.children.receive_data(child, link.data_to_send(), 0.0)
    assert origin.take_gone() == []
    heard[2] = 0.9  # child 2 is heard from; child 1 falls silent
    origin.handle_timer(1.0)
    assert origin.take_gone() == [b"\x01" * 32]
    assert origin.take_gone() == []
    origin.children.receive_data(2, frame(Goodbye(ErrorCode.NO_ERROR, "bye")), 1.1)
    origin.handle_timer(2.5)
    assert origin.take_gone() == []  # it said goodbye: the tracker hears of that from it


def test_the_origin_flags_its_chunks_announce_for_a_while_when_told_the_tracker_forgot() -> None:
    origin = OriginCore(Ed25519PrivateKey.generate(), 2, NodeConfig())
    origin.set_head(b"OpusHead-test", 0.0)
    assert not origin.push([b"a"], 960, 0.2).chunk.announces
    origin.announce(1.0)
    flagged = [origin.push([b"a"], 960 * (i + 2), 1.0 + 0.2 * i).chunk for i in range(12)]
    announcing = [chunk.announces for chunk in flagged]
    assert announcing == [0.2 * i < ANNOUNCE_FOR for i in range(12)]
    assert not any(chunk.is_end for chunk in flagged)
    origin.announce(9.0)
    end = origin.push([], 960 * 20, 9.1, end=True).chunk
    assert end.is_end and end.announces
