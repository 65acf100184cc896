"""The tracker over real QUIC on loopback: joins, repairs, leaves, overload, tokens, garbage."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
from aioquic.quic.packet import QuicErrorCode
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.quic import HandshakeFailed, QuicEndpoint, open_quic_endpoint
from meshd.tracker.server import serve_tracker
from meshd.tracker.service import Tracker, TrackerConfig
from meshd.tracker_client import TrackerRefused, ask_tracker
from protocol import (
    Ack,
    Assigned,
    ChildGone,
    ErrorCode,
    Goodbye,
    Join,
    Leave,
    MessageReader,
    Moved,
    Refresh,
    Register,
    Rejoin,
    StatusReport,
    StatusRequest,
    TreeReport,
    TreeRequest,
    frame,
    issue_token,
    key_id,
    sign_message,
)

STREAM_KEY = Ed25519PrivateKey.generate()
STREAM = key_id(STREAM_KEY)


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Room:
    tracker: Tracker
    address: tuple[str, int]
    client: QuicEndpoint

    async def ask(self, request: object, give_up_after: float = 10.0) -> object:
        return await ask_tracker(self.client, self.address, request, give_up_after=give_up_after)  # type: ignore[arg-type]

    async def register(self, capacity: int = 2) -> None:
        request = Register(STREAM, "127.0.0.1:9", capacity, now_ms())
        assert isinstance(await self.ask(sign_message(request, STREAM_KEY)), Ack)

    async def join(
        self, key: Ed25519PrivateKey, capacity: int = 2, token: bytes | None = None
    ) -> Assigned:
        request = Join(STREAM, key_id(key), capacity, "127.0.0.1:10", token, now_ms())
        answer = await self.ask(sign_message(request, key))
        assert isinstance(answer, Assigned)
        return answer


@asynccontextmanager
async def room(config: TrackerConfig | None = None) -> AsyncIterator[Room]:
    tracker = Tracker(config or TrackerConfig(refresh_s=60))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(serve_tracker, tracker, Ed25519PrivateKey.generate())
            async with open_quic_endpoint(Ed25519PrivateKey.generate()) as client:
                yield Room(tracker, address, client)
            nursery.cancel_scope.cancel()


async def test_join_rejoin_leave_and_status() -> None:
    async with room() as r:
        await r.register(capacity=2)
        keys = [Ed25519PrivateKey.generate() for _ in range(5)]
        answers = [await r.join(key) for key in keys]
        assert [a.depth for a in answers] == [1, 1, 2, 2, 2]
        assert answers[0].parent.node == STREAM and answers[0].refresh_s == 60
        assert answers[4].backups and all(
            b.node != answers[4].parent.node for b in answers[4].backups
        )
        # keys[2] sits under some depth-1 node; that node "dies": keys[2] reports it.
        child, dead = keys[2], answers[2].parent.node
        rejoin = Rejoin(STREAM, key_id(child), dead, None, 2, "127.0.0.1:10", None, now_ms())
        moved = await r.ask(sign_message(rejoin, child))
        assert isinstance(moved, Assigned) and moved.parent.node != dead
        # A depth-1 node leaves gracefully: its children get new parents.
        leaver = keys[0]
        answer = await r.ask(sign_message(Leave(STREAM, key_id(leaver), now_ms()), leaver))
        assert isinstance(answer, Moved)
        assert all(move.parent.node != key_id(leaver) for move in answer.moves)
        status = await r.ask(StatusRequest(STREAM))
        assert isinstance(status, StatusReport)
        assert status.audience == 4 and status.total_joins == 5
        assert status.total_rejoins == 1 and status.total_leaves == 1
        assert status.origin_children <= 2


async def test_tree_report_lists_the_top_of_the_tree_breadth_first() -> None:
    async with room() as r:
        await r.register(capacity=2)
        keys = [Ed25519PrivateKey.generate() for _ in range(6)]
        for key in keys:
            await r.join(key)
        report = await r.ask(TreeRequest(STREAM, 4))
        assert isinstance(report, TreeReport) and report.audience == 6
        assert len(report.nodes) == 4  # cut at the limit, the deepest left out
        origin, *rest = report.nodes
        assert origin.node == STREAM and origin.parent is None and origin.children == 2
        assert [node.depth for node in rest] == [1, 1, 2]
        listed = {origin.node}
        for node in rest:
            assert node.parent in listed and node.address == "127.0.0.1:10"
            listed.add(node.node)
        everything = await r.ask(TreeRequest(STREAM, 256))
        assert isinstance(everything, TreeReport)
        assert {node.node for node in everything.nodes} == {STREAM} | {key_id(k) for k in keys}
        assert sum(node.children for node in everything.nodes) == 6


async def test_a_request_after_the_0rtt_one_on_a_reused_connection_is_answered() -> None:
    """Only the bytes that came in 0-RTT are replayable: a JOIN sent on the same stream
    after a REFRESH in 0-RTT (a node reusing its connection) is answered, not refused."""
    async with room() as r:
        await r.register()
        key = Ed25519PrivateKey.generate()
        await r.join(key)  # that connection left a session ticket: the next one resumes
        refresh = Refresh(STREAM, key_id(key), None, 2, "127.0.0.1:10", now_ms())
        conn = await r.client.connect(
            r.address, early_data=frame(sign_message(refresh, key)), replay_safe=True
        )
        stream = conn.first_stream
        assert stream is not None and conn.session_resumed
        reader = MessageReader()

        async def answer() -> object:
            while (message := reader.next_message()) is None:
                reader.receive_data(await stream.receive_some())
            return message

        assert isinstance(await answer(), Ack | Assigned)
        join = Join(STREAM, key_id(key), 2, "127.0.0.1:10", None, now_ms())
        await stream.send_all(frame(sign_message(join, key)))
        assert isinstance(await answer(), Assigned)
        await conn.aclose()


async def test_refresh_of_an_unknown_node_is_refused_with_unknown_peer() -> None:
    async with room() as r:
        await r.register()
        key = Ed25519PrivateKey.generate()
        refresh = Refresh(STREAM, key_id(key), STREAM, 0, "", now_ms())
        await r.ask(sign_message(refresh, key))  # re-inserted under the origin: that works
        stranger = Ed25519PrivateKey.generate()
        refresh = Refresh(STREAM, key_id(stranger), b"\x01" * 32, 0, "", now_ms())
        with pytest.raises(TrackerRefused) as caught:
            await r.ask(sign_message(refresh, stranger))
        assert caught.value.code == ErrorCode.UNKNOWN_PEER


async def test_with_tokens_a_refresh_never_brings_in_a_stranger() -> None:
    """The trial's admission bypass: a REFRESH from an unknown node naming the origin as
    its parent took origin slots without a token. It must JOIN, token and all."""
    host = Ed25519PrivateKey.generate()
    async with room(TrackerConfig(host_keys=(host.public_key(),))) as r:
        await r.register()
        stranger = Ed25519PrivateKey.generate()
        refresh = Refresh(STREAM, key_id(stranger), STREAM, 4, "127.0.0.1:11", now_ms())
        with pytest.raises(TrackerRefused) as caught:
            await r.ask(sign_message(refresh, stranger))
        assert caught.value.code == ErrorCode.UNKNOWN_PEER
        assert key_id(stranger) not in r.tracker.streams[STREAM].tree
        token = issue_token(host, STREAM, key_id(stranger), now_ms() + 60_000)
        await r.join(stranger, token=token)
        assert isinstance(await r.ask(sign_message(refresh, stranger)), Ack)


async def test_the_origin_re_registers_within_seconds() -> None:
    """A restarted tracker knows the stream again at the origin's next REGISTER."""
    async with room() as r:
        request = Register(STREAM, "127.0.0.1:9", 2, now_ms())
        answer = await r.ask(sign_message(request, STREAM_KEY))
        assert isinstance(answer, Ack) and answer.refresh_s <= 2


async def test_unknown_stream_bad_signature_and_stale_time_are_refused() -> None:
    async with room() as r:
        key = Ed25519PrivateKey.generate()
        with pytest.raises(TrackerRefused) as caught:
            await r.join(key)
        assert caught.value.code == ErrorCode.UNKNOWN_STREAM
        await r.register()
        forged = Join(STREAM, key_id(key), 2, "127.0.0.1:9", None, now_ms())
        forged = sign_message(forged, Ed25519PrivateKey.generate())
        with pytest.raises(TrackerRefused) as caught:
            await r.ask(forged)
        assert caught.value.code == ErrorCode.BAD_SIGNATURE
        stale = sign_message(
            Join(STREAM, key_id(key), 2, "127.0.0.1:9", None, now_ms() - 3_600_000), key
        )
        with pytest.raises(TrackerRefused) as caught:
            await r.ask(stale)
        assert caught.value.code == ErrorCode.STALE_REQUEST


async def test_tokens_bad_and_expired_are_refused_with_their_codes() -> None:
    host = Ed25519PrivateKey.generate()
    async with room(TrackerConfig(host_keys=(host.public_key(),))) as r:
        await r.register()
        key = Ed25519PrivateKey.generate()
        node = key_id(key)
        for token, code in [
            (None, ErrorCode.TOKEN_REQUIRED),
            (
                issue_token(Ed25519PrivateKey.generate(), STREAM, node, now_ms() + 60_000),
                ErrorCode.TOKEN_INVALID,
            ),
            (issue_token(host, STREAM, node, now_ms() - 1), ErrorCode.TOKEN_EXPIRED),
        ]:
            with pytest.raises(TrackerRefused) as caught:
                await r.join(key, token=token)
            assert caught.value.code == code
        good = issue_token(host, STREAM, node, now_ms() + 60_000)
        assert (await r.join(key, token=good)).depth == 1


async def test_overload_is_refused_before_the_handshake() -> None:
    async with room(TrackerConfig(max_pending=0)) as r:
        with pytest.raises(HandshakeFailed) as refused:
            await r.client.connect(r.address)
        assert refused.value.error_code == QuicErrorCode.CONNECTION_REFUSED
        # A client keeps backing off (with jitter), retrying, and gives up at its deadline.
        with pytest.raises(trio.TooSlowError):
            await r.ask(StatusRequest(STREAM), give_up_after=1.0)
        assert r.tracker.total_shed >= 3


async def test_garbage_closes_that_connection_and_the_server_keeps_serving() -> None:
    async with room() as r:
        await r.register()
        async with r.client.connect(r.address) as conn:
            stream = await conn.open_stream()
            await stream.send_all(b"\x00\x00\x00\x05garbage!")
            reader = MessageReader()
            data = b"?"
            while data and (answer := reader.next_message()) is None:
                data = await stream.receive_some()
                reader.receive_data(data)
            await conn.wait_closed()
        assert isinstance(answer, Goodbye) and answer.code == ErrorCode.MALFORMED_MESSAGE
        assert conn.close_code == ErrorCode.MALFORMED_MESSAGE
        assert (await r.join(Ed25519PrivateKey.generate())).depth == 1


@pytest.mark.parametrize("relay_is_alive", [True, False])
async def test_a_single_report_is_checked_by_a_probe(relay_is_alive: bool) -> None:
    """One child's word evicts nobody; the tracker's handshake to the suspect decides."""
    async with room() as r:
        await r.register(capacity=1)
        relay_key, child_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
        async with open_quic_endpoint(relay_key) as relay:
            address = f"127.0.0.1:{relay.address[1]}"
            join = Join(STREAM, key_id(relay_key), 1, address, None, now_ms())
            assert isinstance(await r.ask(sign_message(join, relay_key)), Assigned)
            assert (await r.join(child_key)).parent.node == key_id(relay_key)
            await r.register(capacity=2)
            await r.join(Ed25519PrivateKey.generate())  # a spare slot for the child to move to
            if not relay_is_alive:
                await relay.aclose()
            dead = key_id(relay_key)
            rejoin = Rejoin(STREAM, key_id(child_key), dead, None, 1, "127.0.0.1:9", None, now_ms())
            moved = await r.ask(sign_message(rejoin, child_key))
            assert isinstance(moved, Assigned) and moved.parent.node != dead
            tree = r.tracker.streams[STREAM].tree
            with trio.fail_after(10):
                while tree.suspects(trio.current_time()):  # noqa: ASYNC110 - no event to wait on
                    await trio.sleep(0.1)
            assert (dead in tree) is relay_is_alive


async def test_an_unusable_address_is_probed_as_dead_without_harm() -> None:
    """A peer may send any address; resolving it must never take the tracker down."""
    async with room() as r:
        await r.register(capacity=1)
        liar_key, child_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
        join = Join(STREAM, key_id(liar_key), 1, "no-such-host.invalid:4433", None, now_ms())
        assert isinstance(await r.ask(sign_message(join, liar_key)), Assigned)
        await r.join(child_key)
        await r.register(capacity=2)
        await r.join(Ed25519PrivateKey.generate())
        dead = key_id(liar_key)
        rejoin = Rejoin(STREAM, key_id(child_key), dead, None, 1, "127.0.0.1:9", None, now_ms())
        await r.ask(sign_message(rejoin, child_key))
        tree = r.tracker.streams[STREAM].tree
        with trio.fail_after(10):
            while dead in tree:  # noqa: ASYNC110 - no event to wait on
                await trio.sleep(0.1)
        assert (await r.join(Ed25519PrivateKey.generate())).depth >= 1  # still serving


async def test_a_parent_frees_the_slot_of_a_child_it_let_go() -> None:
    async with room(TrackerConfig(initial_capacity=0)) as r:  # all 3 slots from the start
        await r.register(capacity=1)
        relay = Ed25519PrivateKey.generate()
        leaves = [Ed25519PrivateKey.generate() for _ in range(2)]
        await r.join(relay, capacity=3)
        for leaf in leaves:
            assert (await r.join(leaf, capacity=0)).parent.node == key_id(relay)

        def gone(sender: Ed25519PrivateKey, child: bytes, signer: Ed25519PrivateKey) -> object:
            return sign_message(ChildGone(STREAM, key_id(sender), child, now_ms()), signer)

        async def listed() -> set[bytes]:
            report = await r.ask(TreeRequest(STREAM, 16))
            assert isinstance(report, TreeReport)
            return {node.node for node in report.nodes}

        first, second = (key_id(leaf) for leaf in leaves)
        # Not the parent (a leaf about its sibling): ACK, and nothing changes.
        assert isinstance(await r.ask(gone(leaves[1], first, leaves[1])), Ack)
        assert first in await listed()
        with pytest.raises(TrackerRefused) as caught:
            await r.ask(gone(relay, first, leaves[0]))
        assert caught.value.code == ErrorCode.BAD_SIGNATURE
        assert isinstance(await r.ask(gone(relay, first, relay)), Ack)
        assert first not in await listed() and second in await listed()
        status = await r.ask(StatusRequest(STREAM))
        assert isinstance(status, StatusReport) and status.total_failures == 1


def test_the_origin_may_say_a_child_is_gone_and_old_requests_are_refused() -> None:
    tracker = Tracker()
    register = sign_message(Register(STREAM, "127.0.0.1:9", 2, now_ms()), STREAM_KEY)
    tracker.handle(register, 0.0, now_ms())
    leaf = Ed25519PrivateKey.generate()
    join = sign_message(Join(STREAM, key_id(leaf), 0, "", None, now_ms()), leaf)
    assert isinstance(tracker.handle(join, 1.0, now_ms()), Assigned)
    stale = sign_message(ChildGone(STREAM, STREAM, key_id(leaf), now_ms() - 3_600_000), STREAM_KEY)
    refused = tracker.handle(stale, 2.0, now_ms())
    assert isinstance(refused, Goodbye) and refused.code == ErrorCode.STALE_REQUEST
    other = Ed25519PrivateKey.generate()
    elsewhere = sign_message(ChildGone(key_id(other), STREAM, key_id(leaf), now_ms()), STREAM_KEY)
    unknown = tracker.handle(elsewhere, 2.0, now_ms())
    assert isinstance(unknown, Goodbye) and unknown.code == ErrorCode.UNKNOWN_STREAM
    gone = sign_message(ChildGone(STREAM, STREAM, key_id(leaf), now_ms()), STREAM_KEY)
    assert isinstance(tracker.handle(gone, 3.0, now_ms()), Ack)
    assert key_id(leaf) not in tracker.streams[STREAM].tree


def test_a_stream_whose_origin_stops_registering_ends() -> None:
    tracker = Tracker(TrackerConfig(peer_ttl=60))
    register = sign_message(Register(STREAM, "127.0.0.1:9", 2, now_ms()), STREAM_KEY)
    assert isinstance(tracker.handle(register, 0.0, now_ms()), Ack)
    tracker.expire(59.0)
    assert isinstance(tracker.status(STREAM, 59.0), StatusReport)
    tracker.expire(61.0)
    gone = tracker.status(STREAM, 61.0)
    assert isinstance(gone, Goodbye) and gone.code == ErrorCode.STREAM_ENDED
    join = sign_message(Join(STREAM, key_id(STREAM_KEY), 1, "x:1", None, now_ms()), STREAM_KEY)
    refused = tracker.handle(join, 62.0, now_ms())
    assert isinstance(refused, Goodbye) and refused.code == ErrorCode.STREAM_ENDED
    tracker.expire(122.0)  # remembered for peer_ttl, then forgotten
    forgotten = tracker.status(STREAM, 122.0)
    assert isinstance(forgotten, Goodbye) and forgotten.code == ErrorCode.UNKNOWN_STREAM
    assert isinstance(tracker.handle(register, 123.0, now_ms()), Ack)  # it may start again


def test_assigned_tells_newcomers_where_the_origin_was_at_its_last_register() -> None:
    """The live granule of the origin's last REGISTER, passed on in every ASSIGNED (a
    newcomer starts no further behind it than the start lag); the latest, not the
    largest: an origin that starts its stream again starts from 0."""
    tracker = Tracker()

    def register(live_granule: int | None, now: float) -> None:
        request = Register(STREAM, "127.0.0.1:9", 8, now_ms(), live_granule)
        assert isinstance(tracker.handle(sign_message(request, STREAM_KEY), now, now_ms()), Ack)

    def join(now: float) -> int | None:
        key = Ed25519PrivateKey.generate()
        request = sign_message(Join(STREAM, key_id(key), 0, "", None, now_ms()), key)
        answer = tracker.handle(request, now, now_ms())
        assert isinstance(answer, Assigned)
        return answer.live_granule

    register(None, 0.0)
    assert join(1.0) is None  # before the first chunk: nothing to go by
    register(480_000, 5.0)
    assert join(6.0) == 480_000
    register(9_600, 10.0)
    assert join(11.0) == 9_600
    register(None, 15.0)  # it started again and has sent nothing yet
    assert join(16.0) is None
