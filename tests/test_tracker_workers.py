"""The tracker with worker processes: concurrent requests through two workers keep the
tree's invariants, the checks run in the workers, and replayable data is policed."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Generic, ParamSpec, TypeVar

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.quic import ConnectionLost, open_quic_endpoint
from meshd.tracker.server import serve_tracker
from meshd.tracker.service import Tracker, TrackerConfig
from meshd.tracker.tree import StreamTree
from meshd.tracker.workers import worker_share
from meshd.tracker_client import (
    ATTEMPT_TIMEOUT,
    TrackerConnections,
    TrackerRefused,
    ask_tracker,
)
from protocol import (
    Ack,
    Assigned,
    ErrorCode,
    Goodbye,
    Join,
    Leave,
    Message,
    MessageReader,
    Moved,
    Refresh,
    Register,
    Rejoin,
    RetryAfter,
    frame,
    key_id,
    sign_message,
)
from protocol.messages import TrackerResponse
from tests.attackers import ask, join_request
from tests.procs import cluster

STREAM_KEY = Ed25519PrivateKey.generate()
STREAM = key_id(STREAM_KEY)
CLIENTS = 8
STEPS = 12

P = ParamSpec("P")
R = TypeVar("R")


def now_ms() -> int:
    return int(time.time() * 1000)


class Counting(Generic[P, R]):
    """`call`, counting the calls."""

    def __init__(self, call: Callable[P, R]) -> None:
        self.call = call
        self.calls = 0

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        self.calls += 1
        return self.call(*args, **kwargs)


@asynccontextmanager
async def tracker_with_workers(
    workers: int, config: TrackerConfig | None = None
) -> AsyncIterator[tuple[Tracker, tuple[str, int]]]:
    tracker = Tracker(config or TrackerConfig(refresh_s=60))
    async with trio.open_nursery() as nursery:
        address = await nursery.start(
            serve_tracker, tracker, Ed25519PrivateKey.generate(), "127.0.0.1", 0, workers
        )
        yield tracker, address
        nursery.cancel_scope.cancel()


def check_tree(tree: StreamTree) -> None:
    """The tree's invariants, seen from the outside: every node reaches the origin without
    a cycle, at the depth the tree says, and nobody has more children than capacity."""
    origin = tree.origin.peer_id
    for peer in tree:
        seen, node, depth = {peer}, peer, 0
        while node != origin:
            parent = tree.parent_of(node)
            assert parent is not None and parent not in seen, "a cycle or a detached node"
            seen.add(parent)
            node, depth = parent, depth + 1
        assert tree.depth_of(peer) == depth
        children = tree.children_of(peer)
        assert len(children) <= tree.capacity_of(peer), "capacity exceeded"
        assert all(tree.parent_of(child) == peer for child in children)
    assert tree.snapshot().audience == len(tree) - 1


async def churn(address: tuple[str, int], seed: int, nodes: list[bytes]) -> int:
    """One client: JOIN, then random REFRESH / REJOIN / LEAVE / JOIN; returns answers."""
    rng = random.Random(seed)
    key = Ed25519PrivateKey.generate()
    node = key_id(key)
    answered = 0
    async with open_quic_endpoint(Ed25519PrivateKey.generate()) as endpoint:
        connections = TrackerConnections()

        async def ask(request: Join | Refresh | Rejoin | Leave) -> TrackerResponse:
            signed = sign_message(request, key)
            return await ask_tracker(
                endpoint, address, signed, rng=rng, give_up_after=30, connections=connections
            )

        joined = isinstance(
            await ask(Join(STREAM, node, 2, "127.0.0.1:10", None, now_ms())), Assigned
        )
        nodes.append(node)
        for _ in range(STEPS):
            action = rng.choice(["refresh", "rejoin", "leave"] if joined else ["join"])
            try:
                if action == "join":
                    answer = await ask(Join(STREAM, node, 2, "127.0.0.1:10", None, now_ms()))
                    joined = isinstance(answer, Assigned)
                elif action == "refresh":
                    answer = await ask(Refresh(STREAM, node, None, 2, "127.0.0.1:10", now_ms()))
                    assert isinstance(answer, Ack | Assigned)
                elif action == "rejoin":
                    dead = rng.choice([n for n in nodes if n != node] or [STREAM])
                    request = Rejoin(STREAM, node, dead, None, 2, "127.0.0.1:10", None, now_ms())
                    answer = await ask(request)
                    assert isinstance(answer, Assigned)
                else:
                    answer = await ask(Leave(STREAM, node, now_ms()))
                    assert isinstance(answer, Moved)
                    joined = False
            except TrackerRefused as refused:  # e.g. UNKNOWN_PEER after our parent left
                assert refused.code in (ErrorCode.UNKNOWN_PEER, ErrorCode.NO_CAPACITY)
                joined = False
            answered += 1
    return answered


async def test_concurrent_requests_through_two_workers_keep_the_tree_sound() -> None:
    with trio.fail_after(90):
        async with (
            tracker_with_workers(2) as (tracker, address),
            open_quic_endpoint(Ed25519PrivateKey.generate()) as endpoint,
        ):
            register = sign_message(Register(STREAM, "127.0.0.1:9", 3, now_ms()), STREAM_KEY)
            assert isinstance(await ask_tracker(endpoint, address, register), Ack)
            nodes: list[bytes] = []
            answered: list[int] = []

            async def client(seed: int) -> None:
                answered.append(await churn(address, seed, nodes))

            async with trio.open_nursery() as nursery:
                for seed in range(CLIENTS):
                    nursery.start_soon(client, seed)
            state = tracker.streams[STREAM]
            check_tree(state.tree)
            assert sum(answered) == CLIENTS * STEPS
            assert state.total_joins >= CLIENTS


async def test_workers_refuse_bad_signatures_and_a_join_in_0rtt() -> None:
    with trio.fail_after(60):
        async with (
            tracker_with_workers(1) as (tracker, address),
            open_quic_endpoint(Ed25519PrivateKey.generate()) as endpoint,
        ):
            register = sign_message(Register(STREAM, "127.0.0.1:9", 3, now_ms()), STREAM_KEY)
            assert isinstance(await ask_tracker(endpoint, address, register), Ack)
            key = Ed25519PrivateKey.generate()
            join = Join(STREAM, key_id(key), 2, "127.0.0.1:10", None, now_ms())
            forged = sign_message(join, Ed25519PrivateKey.generate())
            try:
                await ask_tracker(endpoint, address, forged)
            except TrackerRefused as refused:
                assert refused.code == ErrorCode.BAD_SIGNATURE
            else:
                raise AssertionError("a forged JOIN was answered")
            # The connection above left a session ticket: a JOIN in 0-RTT is refused.
            conn = await endpoint.connect(
                address, early_data=frame(sign_message(join, key)), replay_safe=True
            )
            assert conn.first_stream is not None
            reader = MessageReader()
            try:
                while (answer := reader.next_message()) is None:
                    reader.receive_data(await conn.first_stream.receive_some())
                code = answer.code if isinstance(answer, Goodbye) else None
            except ConnectionLost as lost:  # the close may overtake the GOODBYE before it
                code = lost.error_code
            await conn.aclose()
            assert code == ErrorCode.UNEXPECTED_MESSAGE
            assert conn.session_resumed
            assert key_id(key) not in tracker.streams[STREAM].tree


async def test_a_node_reuses_its_tracker_connection() -> None:
    with trio.fail_after(60):
        async with (
            tracker_with_workers(0) as (_, address),
            open_quic_endpoint(Ed25519PrivateKey.generate()) as endpoint,
        ):
            register = sign_message(Register(STREAM, "127.0.0.1:9", 3, now_ms()), STREAM_KEY)
            assert isinstance(await ask_tracker(endpoint, address, register), Ack)
            connect = Counting(endpoint.connect)
            endpoint.connect = connect  # type: ignore[method-assign]
            connections = TrackerConnections()
            key = Ed25519PrivateKey.generate()
            node = key_id(key)
            for request in (
                Join(STREAM, node, 2, "127.0.0.1:10", None, now_ms()),
                Refresh(STREAM, node, None, 2, "127.0.0.1:10", now_ms()),
                Leave(STREAM, node, now_ms()),
            ):
                signed = sign_message(request, key)
                await ask_tracker(endpoint, address, signed, connections=connections)
            assert connect.calls == 1


async def test_a_node_asks_a_restarted_tracker_on_a_new_connection_at_once(
    tmp_path: Path,
) -> None:
    """A tracker killed and started again on its address drops the packets of the
    connection a node kept for its next request: the node must ask again on a new
    connection soon, not wait out a whole attempt (it did, and every node's first
    request after a restart took 5 s)."""
    connections = TrackerConnections()
    with cluster(tmp_path) as room, trio.fail_after(60):
        _, listen = room.tracker()
        host, port = listen.rsplit(":", 1)
        address = (host, int(port))
        async with open_quic_endpoint(Ed25519PrivateKey.generate()) as endpoint:
            register = sign_message(Register(STREAM, "127.0.0.1:9", 3, now_ms()), STREAM_KEY)
            await ask_tracker(endpoint, address, register, connections=connections)
            room.kill_all()
            async with trio.open_nursery() as nursery:
                tracker, key = Tracker(TrackerConfig()), Ed25519PrivateKey.generate()
                await nursery.start(serve_tracker, tracker, key, host, int(port), 0)
                connect = Counting(endpoint.connect)
                endpoint.connect = connect  # type: ignore[method-assign]
                register = sign_message(Register(STREAM, "127.0.0.1:9", 3, now_ms()), STREAM_KEY)
                with trio.fail_after(ATTEMPT_TIMEOUT - 1):
                    answer = await ask_tracker(endpoint, address, register, connections=connections)
                assert isinstance(answer, Ack)
                assert connect.calls == 1
                nursery.cancel_scope.cancel()


def test_a_workers_share_keeps_no_limit_and_rounds_bursts_up() -> None:
    config = TrackerConfig(joins_per_network_s=0, join_burst_per_network=3)
    assert worker_share(config, 1) == config
    share = worker_share(config, 4)
    assert share.joins_per_network_s == 0, "0 is no limit, for every worker too"
    assert share.join_burst_per_network == 1
    assert share.handshakes_per_network_s == config.handshakes_per_network_s / 4


async def test_the_workers_share_one_networks_join_burst() -> None:
    """The kernel spreads a network's connections over the workers by source port: a
    JOIN flood from many ports gets the network's burst once in all, not once per
    worker (RETRY_AFTER for the rest)."""
    burst = 4
    config = TrackerConfig(refresh_s=60, join_burst_per_network=burst, joins_per_network_s=0.01)
    with trio.fail_after(60):
        async with tracker_with_workers(2, config) as (tracker, address):
            async with open_quic_endpoint(Ed25519PrivateKey.generate()) as endpoint:
                register = sign_message(Register(STREAM, "127.0.0.1:9", 64, now_ms()), STREAM_KEY)
                assert isinstance(await ask_tracker(endpoint, address, register), Ack)
            answers: list[Message | None] = []

            async def flood_from_a_port_of_its_own() -> None:
                async with open_quic_endpoint(Ed25519PrivateKey.generate()) as endpoint:
                    keys = [Ed25519PrivateKey.generate() for _ in range(2)]
                    joins: list[Message] = [join_request(k, STREAM, 0, "") for k in keys]
                    answers.extend(await ask(endpoint, address, joins, within=30))

            async with trio.open_nursery() as nursery:
                for _ in range(16):
                    nursery.start_soon(flood_from_a_port_of_its_own)
            accepted = sum(isinstance(answer, Assigned) for answer in answers)
            told_to_wait = sum(
                isinstance(answer, RetryAfter) and "too many JOINs" in answer.reason
                for answer in answers
            )
            # The busier worker gets 16 JOINs at least: its share of the burst runs out.
            assert burst // 2 <= accepted <= burst
            assert accepted + told_to_wait == len(answers) == 32
            assert tracker.streams[STREAM].tree.snapshot().audience == accepted
