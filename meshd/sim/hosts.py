"""Simulated machines that run the real cores: listeners, the origin and the tracker.

Each host is a driver like meshd/node/relay.py, but over `meshd.sim.network` on a
virtual clock: the decisions are made by the same `NodeCore`, `OriginCore`, `Children`
and `Tracker` objects that run in the real processes.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.node.children import Children
from meshd.node.config import NodeConfig
from meshd.node.core import (
    AskTracker,
    CloseLink,
    Connect,
    Finished,
    NodeCore,
    Play,
)
from meshd.node.source import OriginCore
from meshd.node.treewatch import LOOK_AGAIN_AFTER, Look, TreeWatch
from meshd.sim.clock import Scheduler
from meshd.sim.metrics import TrackerLoad
from meshd.sim.network import MAX_DATAGRAM, ConnEnd, Host, Network
from meshd.tracker.service import Tracker
from protocol import (
    Ack,
    ChildGone,
    Chunk,
    Register,
    StreamInfo,
    StreamVerifier,
    VerifiedChunk,
    key_id,
    sign_message,
)
from protocol.backoff import Backoff
from protocol.messages import TrackerRequest, TrackerResponse
from protocol.tracker import BACKOFF_CAP, backoff_base

TRACKER_GIVE_UP = 60.0  # as meshd.tracker_client: a request unanswered this long fails
ATTEMPT_TIMEOUT = 5.0
PROBE_INTERVAL = 1.0  # as meshd.tracker.server
PROBE_TIMEOUT = 2.0
EXPIRY_INTERVAL = 1.0  # as meshd.tracker.server
WALL_EPOCH_MS = 1_800_000_000_000  # the virtual clock's zero, as Unix time in ms


class SharedVerifier(StreamVerifier):
    """Checks each distinct chunk's signature once for all simulated nodes.

    Relays forward the exact bytes they received, so every node sees the same encoded
    chunk: verifying it once is the same as verifying it everywhere, at 1/N the cost."""

    def __init__(self, stream_id: bytes) -> None:
        super().__init__(stream_id)
        self._chunks: dict[bytes, VerifiedChunk] = {}
        self._infos: set[StreamInfo] = set()

    def verify_info(self, info: StreamInfo) -> None:
        if info not in self._infos:
            super().verify_info(info)
            self._infos.add(info)

    def verify_chunk(self, chunk: Chunk, raw: bytes) -> VerifiedChunk:
        item = self._chunks.get(raw)
        if item is None:
            item = self._chunks[raw] = super().verify_chunk(chunk, raw)
        return item


class ChildrenDriver:
    """Moves a `Children` core's bytes over simulated connections."""

    def __init__(self, host: Host, children: Children, scheduler: Scheduler) -> None:
        self.host = host
        self.children = children
        self.scheduler = scheduler
        self.ends: dict[int, ConnEnd] = {}
        self._next = 0
        self.on_closed: Callable[[int], None] = children.closed
        children.last_heard = self._last_heard

    def _last_heard(self, child: int) -> float | None:
        end = self.ends.get(child)
        return None if end is None else end.last_heard

    def accept(self, end: ConnEnd, after: Callable[[], None]) -> None:
        self._next += 1
        child = self._next
        self.ends[child] = end
        end.on_stream = lambda data: self._input(child, data, after)
        end.on_closed = lambda reason: self._gone(child, after)
        # Each simulated host is a source network of its own.
        client = None if end.peer is None else end.peer.host
        network = "" if client is None else client.address
        # The key the client's certificate would prove (a node host's id).
        key = client.node_id if isinstance(client, NodeHost) else None
        self.children.open(child, MAX_DATAGRAM, self.scheduler.now, network, key)

    def _input(self, child: int, data: bytes, after: Callable[[], None]) -> None:
        self.children.receive_data(child, data, self.scheduler.now)
        after()

    def _gone(self, child: int, after: Callable[[], None]) -> None:
        if self.ends.pop(child, None) is not None:
            self.on_closed(child)
            after()

    def flush(self) -> None:
        closes = self.children.take_closes()
        for child in self.children.take_dirty():
            end = self.ends.get(child)
            if end is None:
                continue
            data, datagrams = self.children.take_output(child)
            end.send_stream(data)
            for datagram in datagrams:
                end.send_datagram(datagram)
        for close in closes:
            end = self.ends.pop(close.child, None)
            if end is not None:
                end.close(f"code {close.code}")
                self.on_closed(close.child)


class Timer:
    """Keeps one pending wake-up per host at the core's next deadline."""

    def __init__(self, host: Host, scheduler: Scheduler, fire: Callable[[float], None]) -> None:
        self._host = host
        self._scheduler = scheduler
        self._fire = fire
        self._at: float | None = None

    def arm(self, deadline: float | None) -> None:
        if deadline is None or deadline == self._at:
            return
        if self._at is not None and self._at <= deadline:
            return  # the earlier wake-up re-arms when it fires
        self._at = deadline
        self._scheduler.at(deadline, lambda: self._host.run(lambda: self._wake(deadline)))

    def _wake(self, deadline: float) -> None:
        if self._at != deadline:
            return  # superseded
        self._at = None
        self._fire(self._scheduler.now)


class TrackerHost(Host):
    """The real `Tracker` service, reached in one round trip; it probes suspects."""

    def __init__(self, network: Network, tracker: Tracker, delay: float) -> None:
        super().__init__("tracker:1", delay)
        self.network = network
        self.tracker = tracker
        self.requests = 0
        self.load = TrackerLoad()
        self._up_at = 0.0
        scheduler = network.scheduler
        scheduler.after(PROBE_INTERVAL, self._probe_round)
        scheduler.after(EXPIRY_INTERVAL, self._expire)

    def ask(
        self,
        client: Host,
        request: TrackerRequest,
        answer: Callable[[TrackerResponse | None], None],
    ) -> None:
        """One request with retries, as meshd.tracker_client does it: a fresh connection
        per attempt (a handshake round trip, then the request), lost packets costing
        QUIC retransmissions, a cut path the attempt timeout."""
        network = self.network
        scheduler = network.scheduler
        give_up_at = scheduler.now + TRACKER_GIVE_UP
        backoff = Backoff(network.rng, base=backoff_base(request), cap=BACKOFF_CAP)

        def attempt() -> None:
            arrival = self._request_arrival(client)
            if arrival is None or arrival - scheduler.now > ATTEMPT_TIMEOUT or not self.alive:
                retry()
                return
            if arrival < self._up_at:  # restarting: the retransmitted Initial gets there
                arrival = self._up_at + network.rng.uniform(0.0, 1.0)
            scheduler.at(arrival, lambda: self.run(serve))

        def serve() -> None:
            self.requests += 1
            self.load.request(scheduler.now, type(request).__name__.lower())
            self.load.decision(scheduler.now)
            response = self.tracker.handle(request, scheduler.now, wall_ms(scheduler.now))
            back = network.stream_arrival(self, client)
            if back is None or back - scheduler.now > ATTEMPT_TIMEOUT:
                retry()
                return
            scheduler.at(back, lambda: client.run(lambda: answer(response)))

        def retry() -> None:
            at = scheduler.now + ATTEMPT_TIMEOUT + backoff.next_delay()
            if at > give_up_at:
                scheduler.at(give_up_at, lambda: client.run(lambda: answer(None)))
            else:
                scheduler.at(at, lambda: client.run(attempt))

        attempt()

    def restart(self, down: float) -> None:
        """The tracker process dies now and runs again, knowing nothing, `down` seconds
        later; a connection made meanwhile gets there once it is up."""
        self.tracker = Tracker(self.tracker.config)
        self._up_at = self.network.scheduler.now + down

    def _request_arrival(self, client: Host) -> float | None:
        """When a request sent now on a new connection reaches us (None: it does not)."""
        network = self.network
        hello = network.stream_arrival(client, self)
        if hello is None:
            return None
        # The handshake's answer goes back, then the request comes.
        return hello + 2 * network.one_way(self, client)

    def _probe_round(self) -> None:
        scheduler = self.network.scheduler
        scheduler.after(PROBE_INTERVAL, self._probe_round)
        if not self.alive:
            return
        for stream_id, ref in self.tracker.suspects(scheduler.now):
            self.load.request(scheduler.now, "probe")
            self._probe(stream_id, ref.peer_id, self.network.hosts.get(ref.address))

    def _probe(self, stream_id: bytes, peer: bytes, target: Host | None) -> None:
        """A handshake pinned to the suspect's key: it answers if it is up and serving."""
        scheduler = self.network.scheduler
        alive = (
            isinstance(target, NodeHost)
            and target.node_id == peer
            and target.alive
            and not target.stopped
            and target.core.capacity > 0
            and not self.network.dropped(self, target)
        )
        delay = 2 * self.network.one_way(self, target) if alive and target else PROBE_TIMEOUT
        scheduler.after(delay, lambda: self.tracker.probed(stream_id, peer, alive, scheduler.now))

    def _expire(self) -> None:
        scheduler = self.network.scheduler
        scheduler.after(EXPIRY_INTERVAL, self._expire)
        if self.alive:
            self.tracker.expire(scheduler.now)


def wall_ms(now: float) -> int:
    return WALL_EPOCH_MS + int(now * 1000)


class NodeHost(Host):
    """A listener/relay: the real `NodeCore`, over the simulated network."""

    def __init__(
        self,
        network: Network,
        tracker: TrackerHost,
        key: Ed25519PrivateKey,
        stream_id: bytes,
        *,
        address: str,
        delay: float,
        capacity: int,
        config: NodeConfig,
        verifier: StreamVerifier,
        rng: random.Random,
        join_timeout: float = 60.0,
        loss: float = 0.0,
    ) -> None:
        super().__init__(address, delay, loss)
        self.network = network
        self.scheduler = network.scheduler
        self.tracker = tracker
        self.key = key
        self.node_id = key_id(key)
        self.core = NodeCore(
            self.node_id,
            stream_id,
            capacity=capacity,
            config=config,
            rng=rng,
            join_timeout=join_timeout,
            address=address if capacity else "",
            verifier=verifier,
        )
        self.played: list[int] = []
        self.played_at: list[float] = []
        """When each chunk in `played` was played."""
        self.finished: Finished | None = None
        self._links: dict[int, ConnEnd] = {}
        self._held_datagrams: dict[int, list[bytes]] = {}
        self._children = ChildrenDriver(self, self.core.children, self.scheduler)
        self._children.on_closed = lambda child: self.core.child_closed(child, self.scheduler.now)
        self._timer = Timer(self, self.scheduler, self._on_timer)

    def start(self) -> None:
        self.run(lambda: self._input(self.core.start))

    def leave(self) -> None:
        """Ctrl-C: a graceful leave."""
        self.run(lambda: self._input(self.core.leave))

    def accept(self, end: ConnEnd) -> bool:
        if self.core.capacity == 0 or self.finished is not None:
            return False
        self._children.accept(end, self._pump)
        self._pump()
        return True

    def _input(self, feed: Callable[[float], Any]) -> None:
        feed(self.scheduler.now)
        self._pump()

    def _on_timer(self, now: float) -> None:
        self.core.handle_timer(now)
        self._pump()

    def _pump(self) -> None:
        core = self.core
        while (action := core.next_action()) is not None:
            if isinstance(action, Play):
                self.played.append(action.item.seq)
                self.played_at.append(self.scheduler.now)
            elif isinstance(action, Connect):
                self._connect(action)
            elif isinstance(action, CloseLink):
                end = self._links.pop(action.link, None)
                self._held_datagrams.pop(action.link, None)
                if end is not None:
                    end.send_stream(action.data)
                    end.close(f"code {action.code}")
            elif isinstance(action, AskTracker):
                self._ask(action)
            elif isinstance(action, Finished):
                self.finished = action
        for link in core.take_dirty_links():
            end = self._links.get(link)
            if end is not None:
                end.send_stream(core.take_link_output(link))
        self._children.flush()
        self._timer.arm(core.get_timer())

    def _connect(self, action: Connect) -> None:
        link = action.link
        end = self.network.connect(self, action.peer.address)
        self._links[link] = end

        def now() -> float:
            return self.scheduler.now

        def opened() -> None:
            self.core.link_opened(link, now())
            self._pump()

        def stream(data: bytes) -> None:
            self.core.link_data(link, data, now())
            self._pump()
            if self.core.is_attached(link):
                for datagram in self._held_datagrams.pop(link, []):
                    datagram_in(datagram)

        def datagram_in(data: bytes) -> None:
            if not self.core.is_attached(link):
                # As meshd/node/upstream.py: datagrams are read once the parent accepted.
                self._held_datagrams.setdefault(link, []).append(data)
                return
            self.core.link_datagram(link, data, now())
            self._pump()

        def closed(reason: str) -> None:
            if self._links.pop(link, None) is not None:
                self.core.link_failed(link, reason, now())
                self._pump()

        end.on_open, end.on_stream, end.on_closed = opened, stream, closed
        end.on_datagram = datagram_in

    def _ask(self, action: AskTracker) -> None:
        request = sign_message(
            dataclasses.replace(action.request, time_ms=wall_ms(self.scheduler.now)), self.key
        )

        def answered(response: TrackerResponse | None) -> None:
            self.core.tracker_answered(action.ticket, response, self.scheduler.now)
            self._pump()

        self.tracker.ask(self, request, answered)

    def kill(self) -> None:
        super().kill()
        for end in [*self._links.values(), *self._children.ends.values()]:
            end.closed = True  # a dead process sends nothing, not even a close


class OriginHost(Host):
    """The origin: the real `OriginCore`, fed a chunk of fake Opus packets every 200 ms."""

    CHUNK_SECONDS = 0.2
    PACKETS_PER_CHUNK = 10

    def __init__(
        self,
        network: Network,
        tracker: TrackerHost,
        key: Ed25519PrivateKey,
        *,
        capacity: int,
        config: NodeConfig,
        delay: float,
    ) -> None:
        super().__init__("origin:1", delay)
        self.network = network
        self.scheduler = network.scheduler
        self.tracker = tracker
        self.key = key
        self.core = OriginCore(key, capacity, config)
        self.stream_id = self.core.stream_id
        self._children = ChildrenDriver(self, self.core.children, self.scheduler)
        self._timer = Timer(self, self.scheduler, self._on_timer)
        self._granule = 0
        self.watch = TreeWatch(self.stream_id, capacity)
        self._register_retry = Backoff(network.rng, base=0.5, cap=30.0)
        self._look_at = 0.0
        self.core.children.on_full = self._full
        self.end_at: float | None = None
        self.sent_at: list[float] = []
        """When each chunk (by sequence number) left the origin."""
        self.core.set_head(b"OpusHead" + bytes(11), self.scheduler.now)

    def start(self, *, end_at: float | None = None) -> None:
        """Register, then send a chunk every 200 ms (and the END chunk at `end_at`)."""
        self.end_at = end_at
        self._register()
        self.scheduler.after(self.CHUNK_SECONDS, lambda: self.run(self._tick))

    def _register(self) -> None:
        """REGISTER, again every `refresh_s` of the ACK (2 s), then look at the tracker's
        view (`TreeWatch`), as meshd/node/origin.py does, until the stream ends."""
        if self.core.ended:
            return
        live = self._granule or None
        capacity = self.core.children.capacity
        request = Register(
            self.stream_id, self.address, capacity, wall_ms(self.scheduler.now), live
        )
        self.tracker.ask(self, sign_message(request, self.key), self._registered)

    def _registered(self, answer: TrackerResponse | None) -> None:
        if not isinstance(answer, Ack):
            self.scheduler.after(
                self._register_retry.next_delay(), lambda: self.run(self._register)
            )
            return
        self._register_retry.reset()
        delay = answer.refresh_s * self.network.rng.uniform(0.8, 1.0)
        self.scheduler.after(delay, lambda: self.run(self._register))
        now = self.scheduler.now
        self._look(self.watch.registered(now, self.core.children.streaming_nodes()))

    def _full(self) -> None:
        """We refused a SUBSCRIBE for lack of slots: look at the tracker's view."""
        now = self.scheduler.now
        if now >= self._look_at:
            self._look_at = now + LOOK_AGAIN_AFTER
            self._look(self.watch.refused(now, self.core.children.streaming_nodes()))

    def _look(self, look: Look | None) -> None:
        if look is not None:
            self.tracker.ask(self, look.request, lambda answer: self._looked(look, answer))

    def _looked(self, look: Look, answer: TrackerResponse | None) -> None:
        now = self.scheduler.now
        if self.watch.answered(look, answer, now):
            self.core.announce(now)

    def accept(self, end: ConnEnd) -> bool:
        self._children.accept(end, self._pump)
        self._pump()
        return True

    def _tick(self) -> None:
        now = self.scheduler.now
        end = self.end_at is not None and now >= self.end_at
        self._granule += 48_000 // 5
        packets = [bytes([self.core.signer.next_seq % 256, i]) * 10 for i in range(10)]
        self.core.push(packets, self._granule, now, end=end)
        self.sent_at.append(now)
        self._pump()
        if not end:
            self.scheduler.after(self.CHUNK_SECONDS, lambda: self.run(self._tick))

    def _on_timer(self, now: float) -> None:
        self.core.handle_timer(now)
        self._pump()

    def _pump(self) -> None:
        self._children.flush()
        self._timer.arm(self.core.get_timer())
        for child in self.core.take_gone():
            gone = ChildGone(self.stream_id, self.stream_id, child, wall_ms(self.scheduler.now))
            self.tracker.ask(self, sign_message(gone, self.key), lambda answer: None)
