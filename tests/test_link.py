"""The parent <-> child link state machines, driven in memory with a fake clock."""

from __future__ import annotations

import dataclasses

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import (
    Admit,
    ChildLink,
    ChunkRing,
    ChunkSigner,
    ErrorCode,
    Heartbeat,
    LinkState,
    ParentLink,
    PathUpdate,
    Peer,
    ProtocolError,
    ReorderBuffer,
    Repair,
    Subscribe,
    VerifiedChunk,
    encode_message,
    frame,
)
from protocol.events import (
    ChunkReceived,
    HeartbeatReceived,
    InfoReceived,
    LinkClosed,
    LinkEvent,
    ParentSilent,
    PathReceived,
    Redirected,
    RepairRequested,
    RepairUnavailable,
    SubscribeRequested,
)
from protocol.limits import MAX_PATH, REPAIR_BURST_BYTES
from protocol.messages import Message

PACKET = b"\xfc" + b"\x11" * 79
CHILD = b"\x02" * 32
PARENT = b"\x05" * 32
SPAN = 10 * 48_000


class Origin:
    def __init__(self) -> None:
        self.signer = ChunkSigner(Ed25519PrivateKey.generate())
        self.info = self.signer.stream_info(b"OpusHead-test")
        self.ring = ChunkRing(span_samples=SPAN)
        self.path = (self.signer.stream_id, PARENT)  # the parent under test is a relay

    def produce(self, count: int) -> list[VerifiedChunk]:
        made = []
        for _ in range(count):
            item = self.signer.sign([PACKET] * 10, 9600 * (self.signer.next_seq + 1))
            self.ring.add(item)
            made.append(item)
        return made


def state_of(link: ParentLink | ChildLink) -> LinkState:
    """`link.state` read afresh: mypy keeps an attribute narrowed by an earlier `assert`
    across the calls that change it."""
    return link.state


class Pair:
    """A parent link and a child link wired together in memory."""

    def __init__(
        self,
        origin: Origin,
        from_seq: int | None,
        now: float = 0.0,
        heartbeat_interval: float = 0.25,
    ) -> None:
        self.origin = origin
        self.parent = ParentLink(
            origin.signer.stream_id,
            now=now,
            max_datagram=1200,
            heartbeat_interval=heartbeat_interval,
            child_timeout=1.0,
        )
        self.child = ChildLink(origin.signer.stream_id, CHILD, from_seq, parent=PARENT, now=now)
        self.drop_datagrams = False

    def pump(self, now: float) -> tuple[list[LinkEvent], list[LinkEvent]]:
        """Move bytes both ways until quiet; return (parent events, child events)."""
        parent_events: list[LinkEvent] = []
        child_events: list[LinkEvent] = []
        while True:
            to_parent = self.child.data_to_send()
            to_child = self.parent.data_to_send()
            datagrams = self.parent.datagrams_to_send()
            if not (to_parent or to_child or datagrams):
                return parent_events, child_events
            if to_parent:
                self.parent.receive_data(to_parent, now)
            if to_child:
                self.child.receive_data(to_child, now)
                self.parent.child_heard(now)  # the child's transport acknowledges
            for datagram in datagrams:
                if not self.drop_datagrams:
                    self.child.receive_datagram(datagram, now)
                    self.parent.child_heard(now)
            parent_events += drain(self.parent)
            child_events += drain(self.child)

    def accept(self, now: float) -> list[LinkEvent]:
        parent_events, _ = self.pump(now)
        request = parent_events[0]
        assert isinstance(request, SubscribeRequested) and request.node == CHILD
        self.parent.accept(
            self.origin.info, self.origin.path, self.origin.ring.since(request.from_seq), now
        )
        return self.pump(now)[1]


def drain(link: ParentLink | ChildLink) -> list[LinkEvent]:
    events = []
    while (event := link.next_event()) is not None:
        events.append(event)
    return events


def chunk_seqs(events: list[LinkEvent]) -> list[int]:
    return [e.item.seq for e in events if isinstance(e, ChunkReceived)]


def test_subscribe_at_live_edge_then_stream_over_datagrams() -> None:
    origin = Origin()
    origin.produce(5)
    pair = Pair(origin, from_seq=None)
    events = pair.accept(now=0.0)
    assert isinstance(events[0], InfoReceived) and events[0].info.head == b"OpusHead-test"
    assert events[1] == PathReceived(origin.path)  # before any audio: a cycle sends none
    assert chunk_seqs(events) == [4]  # live edge: only the newest chunk
    for item in origin.produce(3):
        pair.parent.send_chunk(item, now=0.2)
    _, events = pair.pump(now=0.2)
    assert chunk_seqs(events) == [5, 6, 7]
    assert pair.child.state is LinkState.STREAMING


def test_resume_after_reconnect_loses_nothing() -> None:
    origin = Origin()
    first = Pair(origin, from_seq=None)
    origin.produce(1)
    buffer = ReorderBuffer(span_samples=SPAN)
    for event in first.accept(now=0.0):
        if isinstance(event, ChunkReceived):
            buffer.add(event.item, now=0.0)
    for item in origin.produce(4):
        first.parent.send_chunk(item, now=0.1)
    for event in first.pump(now=0.1)[1]:
        if isinstance(event, ChunkReceived):
            buffer.add(event.item, now=0.1)
    played = [item.seq for item in buffer.pop_ready()]
    assert played == [0, 1, 2, 3, 4]
    # The parent dies; the stream goes on without us; a new parent has it all in its ring.
    origin.produce(6)
    second = Pair(origin, from_seq=buffer.next_seq, now=2.0)
    for event in second.accept(now=2.0):
        if isinstance(event, ChunkReceived):
            buffer.add(event.item, now=2.0)
    played += [item.seq for item in buffer.pop_ready()]
    assert played == list(range(11))


def test_a_lost_datagram_is_repaired_over_the_stream() -> None:
    origin = Origin()
    origin.produce(1)
    pair = Pair(origin, from_seq=0)
    buffer = ReorderBuffer(span_samples=SPAN, repair_delay=0.05)
    for event in pair.accept(now=0.0):
        if isinstance(event, ChunkReceived):
            buffer.add(event.item, now=0.0)
    lost, after = origin.produce(2)
    pair.drop_datagrams = True
    pair.parent.send_chunk(lost, now=0.1)
    pair.pump(now=0.1)
    pair.drop_datagrams = False
    pair.parent.send_chunk(after, now=0.2)
    for event in pair.pump(now=0.2)[1]:
        if isinstance(event, ChunkReceived):
            buffer.add(event.item, now=0.2)
    assert [i.seq for i in buffer.pop_ready()] == [0]
    wanted = buffer.due_repairs(now=0.3)
    assert wanted == [1]
    pair.child.request_repair(wanted)
    parent_events, _ = pair.pump(now=0.3)
    assert parent_events == [RepairRequested((1,))]
    found = [item for seq in wanted if (item := origin.ring.get(seq)) is not None]
    pair.parent.answer_repair(found, missing=[99])
    _, child_events = pair.pump(now=0.3)
    for event in child_events:
        if isinstance(event, ChunkReceived):
            buffer.add(event.item, now=0.3)
    assert [i.seq for i in buffer.pop_ready()] == [1, 2]
    assert RepairUnavailable((99,)) in child_events


def test_a_child_asks_only_for_what_its_parent_announced() -> None:
    """After a move the new parent may lag behind the old one: asking it for chunks it
    never announced would be a protocol error, so those wait for its HEARTBEATs."""
    origin = Origin()
    origin.produce(3)
    pair = Pair(origin, from_seq=None)
    pair.accept(now=0.0)
    assert pair.child.announced == 2
    pair.child.request_repair([1, 5, 6])
    parent_events, _ = pair.pump(now=0.1)
    assert parent_events == [RepairRequested((1,))]


def test_a_repair_for_a_chunk_never_announced_is_a_protocol_error() -> None:
    origin = Origin()
    origin.produce(3)
    pair = Pair(origin, from_seq=None)
    pair.accept(now=0.0)
    with pytest.raises(ProtocolError) as refused:  # the driver says GOODBYE with its code
        pair.parent.receive_data(frame(Repair((2, 3))), 0.1)
    assert refused.value.code == ErrorCode.BAD_REPAIR


def test_a_leech_gets_no_more_repairs_than_live_bytes_plus_a_burst() -> None:
    origin = Origin()
    items = origin.produce(8)
    pair = Pair(origin, from_seq=0)
    pair.accept(now=0.0)  # 8 chunks of backlog: the live bytes so far
    live = sum(len(item.raw) for item in items)
    sent = 0
    for _ in range(1_000):  # the same chunks, over and over
        sent += sum(len(item.raw) for item in pair.parent.answer_repair(items, []))
    assert live + REPAIR_BURST_BYTES - len(items[0].raw) < sent <= live + REPAIR_BURST_BYTES
    assert pair.parent.answer_repair(items, []) == []  # the rest: MISSING
    _, child_events = pair.pump(now=0.1)
    assert RepairUnavailable(tuple(item.seq for item in items)) in child_events
    more = origin.produce(4)
    for item in more:  # the budget grows with the live stream
        pair.parent.send_chunk(item, now=0.2)
    assert pair.parent.answer_repair(more, []) == more


def test_redirect_then_goodbye_is_make_before_break() -> None:
    origin = Origin()
    origin.produce(1)
    pair = Pair(origin, from_seq=None)
    pair.accept(now=0.0)
    target = Peer(b"\x07" * 32, "127.0.0.1:5000")
    pair.parent.redirect(target, ())
    item = origin.produce(1)[0]
    pair.parent.send_chunk(item, now=0.1)  # the leaving parent keeps streaming meanwhile
    _, events = pair.pump(now=0.1)
    assert events[0] == Redirected(target, ())
    assert chunk_seqs(events) == [1]
    pair.child.goodbye(ErrorCode.NO_ERROR, "moved")
    parent_events, _ = pair.pump(now=0.2)
    assert parent_events == [LinkClosed(ErrorCode.NO_ERROR, "moved")]
    assert pair.parent.state is LinkState.CLOSED


def test_a_full_parent_refuses_with_a_code() -> None:
    pair = Pair(Origin(), from_seq=None)
    pair.pump(now=0.0)
    pair.parent.goodbye(ErrorCode.NO_CAPACITY, "full")
    _, events = pair.pump(now=0.0)
    assert events == [LinkClosed(ErrorCode.NO_CAPACITY, "full")]
    assert pair.child.state is LinkState.CLOSED


def test_heartbeats_keep_a_quiet_link_alive_and_silence_is_noticed() -> None:
    origin = Origin()
    origin.produce(1)
    pair = Pair(origin, from_seq=None)
    pair.accept(now=0.0)
    now = 0.0
    for _ in range(20):  # the origin is silent for 5 s; heartbeats every 0.25 s
        now += 0.25
        pair.parent.handle_timer(now)
        pair.child.handle_timer(now)
        _, events = pair.pump(now)
        assert HeartbeatReceived(0, 0) in events
        assert not any(isinstance(e, ParentSilent) for e in events)
    # The parent dies: nothing more arrives, and the child's timer fires once.
    deadline = pair.child.get_timer()
    assert deadline is not None and deadline == pytest.approx(now + 1.0)
    pair.child.handle_timer(deadline)
    assert drain(pair.child) == [ParentSilent()]
    assert pair.child.get_timer() is None


def test_unexpected_message_is_a_protocol_error() -> None:
    origin = Origin()
    child = ChildLink(origin.signer.stream_id, CHILD, None, parent=PARENT, now=0.0)
    with pytest.raises(ProtocolError) as caught:
        child.receive_data(frame(Heartbeat(1)), now=0.0)  # before STREAM_INFO
    assert caught.value.code == ErrorCode.UNEXPECTED_MESSAGE


def test_a_tampered_chunk_is_a_bad_signature() -> None:
    origin = Origin()
    origin.produce(1)
    pair = Pair(origin, from_seq=None)
    pair.accept(now=0.0)
    item = origin.produce(1)[0]
    tampered = dataclasses.replace(item.chunk, packets=(PACKET[:-1] + b"\x00",) * 10)
    with pytest.raises(ProtocolError) as caught:
        pair.child.receive_datagram(encode_message(tampered), now=0.1)
    assert caught.value.code == ErrorCode.BAD_SIGNATURE


def test_wrong_stream_is_refused() -> None:
    origin = Origin()
    parent = ParentLink(b"\x09" * 32, now=0.0)
    child = ChildLink(origin.signer.stream_id, CHILD, None, parent=PARENT, now=0.0)
    parent.receive_data(child.data_to_send(), now=0.0)
    assert drain(parent) == [LinkClosed(ErrorCode.UNKNOWN_STREAM, "wrong stream")]
    child.receive_data(parent.data_to_send(), now=0.0)
    closed = drain(child)[0]
    assert isinstance(closed, LinkClosed) and closed.code == ErrorCode.UNKNOWN_STREAM


def test_stream_ending_without_goodbye_closes_the_link() -> None:
    origin = Origin()
    child = ChildLink(origin.signer.stream_id, CHILD, None, parent=PARENT, now=0.0)
    child.receive_data(b"", now=0.0)
    event = drain(child)[0]
    assert isinstance(event, LinkClosed) and event.code == ErrorCode.GOING_AWAY


def test_a_chunk_before_the_path_is_unexpected() -> None:
    origin = Origin()
    item = origin.produce(1)[0]
    child = ChildLink(origin.signer.stream_id, CHILD, None, parent=PARENT, now=0.0)
    child.receive_data(frame(origin.info), now=0.0)
    assert child.state is LinkState.ACCEPTED
    with pytest.raises(ProtocolError) as caught:
        child.receive_data(frame(item.chunk), now=0.0)
    assert caught.value.code == ErrorCode.UNEXPECTED_MESSAGE


def test_a_path_through_the_child_is_a_cycle_and_closes_the_link() -> None:
    origin = Origin()
    origin.produce(1)
    pair = Pair(origin, from_seq=None)
    pair.accept(now=0.0)
    # Our parent moved under one of our own descendants: its new path contains us.
    pair.parent.send_path((origin.signer.stream_id, CHILD, b"\x03" * 32, PARENT))
    _, events = pair.pump(now=0.1)
    assert next(e for e in events if isinstance(e, LinkClosed)).code == ErrorCode.BAD_PATH
    assert pair.child.state is LinkState.CLOSED
    assert pair.parent.state is LinkState.CLOSED  # it heard GOODBYE(BAD_PATH)


def test_a_path_update_reaches_the_child() -> None:
    origin = Origin()
    origin.produce(1)
    pair = Pair(origin, from_seq=None)
    pair.accept(now=0.0)
    moved = (origin.signer.stream_id, b"\x03" * 32, PARENT)
    pair.parent.send_path(moved)
    pair.parent.send_path(moved)  # unchanged: not sent again
    _, events = pair.pump(now=0.1)
    assert events == [PathReceived(moved)]


@pytest.mark.parametrize(
    "path",
    [
        (b"\x03" * 32, PARENT),  # does not start at the origin
        (None, b"\x03" * 32),  # does not end with the parent (None: the stream id)
        (None, PARENT, PARENT),  # a node twice
    ],
)
def test_a_malformed_path_is_a_protocol_error(path: tuple[bytes | None, ...]) -> None:
    origin = Origin()
    nodes = tuple(origin.signer.stream_id if node is None else node for node in path)
    child = ChildLink(origin.signer.stream_id, CHILD, None, parent=PARENT, now=0.0)
    child.receive_data(frame(origin.info), now=0.0)
    with pytest.raises(ProtocolError) as caught:
        child.receive_data(frame(PathUpdate(nodes)), now=0.0)
    assert caught.value.code == ErrorCode.BAD_PATH


def test_a_parent_too_deep_to_feed_a_child_is_refused() -> None:
    origin = Origin()
    deep = (origin.signer.stream_id, *(bytes([i]) * 32 for i in range(10, 10 + MAX_PATH - 2)))
    child = ChildLink(origin.signer.stream_id, CHILD, None, parent=deep[-1], now=0.0)
    child.receive_data(frame(origin.info) + frame(PathUpdate(deep)), now=0.0)
    assert len(deep) == MAX_PATH - 1 and drain(child)[-1] == PathReceived(deep)
    deeper = (*deep, b"\x77" * 32)
    child = ChildLink(origin.signer.stream_id, CHILD, None, parent=deeper[-1], now=0.0)
    child.receive_data(frame(origin.info) + frame(PathUpdate(deeper)), now=0.0)
    event = drain(child)[-1]
    assert isinstance(event, LinkClosed) and event.code == ErrorCode.BAD_PATH


def test_a_stalled_parent_says_so_every_heartbeat_even_while_chunks_flow() -> None:
    origin = Origin()
    origin.produce(1)
    pair = Pair(origin, from_seq=None, heartbeat_interval=0.2)
    pair.accept(now=0.0)
    pair.parent.stalled_since = 0.0
    for step in range(1, 6):
        now = step * 0.2
        pair.parent.send_chunk(origin.produce(1)[0], now)  # later chunks still flow
        pair.parent.handle_timer(now)
        _, events = pair.pump(now)
        beats = [e for e in events if isinstance(e, HeartbeatReceived)]
        assert beats == [HeartbeatReceived(step, round(now * 1000))]
    pair.parent.stalled_since = None
    pair.parent.send_chunk(origin.produce(1)[0], 1.1)
    pair.parent.handle_timer(1.2)
    assert not any(isinstance(e, HeartbeatReceived) for e in pair.pump(1.2)[1])


def test_a_parent_lets_a_silent_child_go() -> None:
    origin = Origin()
    origin.produce(1)
    pair = Pair(origin, from_seq=None)
    pair.accept(now=0.0)
    assert pair.parent.get_timer() == pytest.approx(0.25)  # the heartbeat comes first
    # The child dies: nothing from it any more (no ACKs either), whatever we send.
    pair.parent.handle_timer(0.5)
    assert pair.parent.state is LinkState.STREAMING
    assert pair.parent.get_timer() == pytest.approx(0.75)
    pair.parent.child_heard(0.6)  # the transport saw a packet from it: still there
    pair.parent.handle_timer(1.0)
    assert pair.parent.state is LinkState.STREAMING
    pair.parent.handle_timer(1.6)
    assert drain(pair.parent) == [
        LinkClosed(ErrorCode.CHILD_TIMEOUT, "nothing heard from the child for 1 s")
    ]
    assert (
        state_of(pair.parent) is LinkState.CLOSED
        and pair.parent.goodbye_code == ErrorCode.CHILD_TIMEOUT
    )


def test_the_token_goes_in_admit_before_subscribe() -> None:
    origin = Origin()
    stream = origin.signer.stream_id
    parent = ParentLink(stream, now=0.0)
    child = ChildLink(stream, CHILD, None, parent=PARENT, now=0.0, token=b"token")
    parent.receive_data(child.data_to_send(), now=0.0)
    assert drain(parent) == [SubscribeRequested(None, CHILD, b"token")]


@pytest.mark.parametrize(
    "messages",
    [[Subscribe(b"S" * 32, None, CHILD), Admit(b"late")], [Admit(b"a"), Admit(b"b")]],
    ids=["after-subscribe", "twice"],
)
def test_admit_only_once_and_only_before_subscribe(messages: list[Message]) -> None:
    parent = ParentLink(b"S" * 32, now=0.0)
    with pytest.raises(ProtocolError) as caught:
        parent.receive_data(b"".join(frame(message) for message in messages), now=0.0)
    assert caught.value.code == ErrorCode.UNEXPECTED_MESSAGE
