"""Feeding children, sans-I/O: admission, backlog, live forwarding, repairs, redirects.

Both the origin and relays serve children the same way. Each child is one connection
with a `protocol.ParentLink`, named by an integer the driver picks. The driver
(`meshd/node/fanout.py`, or the simulator) reports connections, stream bytes and the
time; it sends what `take_output` returns for every child in `take_dirty`, and closes the
connections that `take_closes` names. No I/O and no clock reads here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from meshd.node.config import NodeConfig
from meshd.node.stats import NodeStats
from protocol import (
    ChunkRing,
    ErrorCode,
    LinkState,
    ParentLink,
    Peer,
    ProtocolError,
    RemoteProtocolError,
    StreamInfo,
    VerifiedChunk,
    check_token,
    short_id,
)
from protocol.events import LinkClosed, RepairRequested, SubscribeRequested
from protocol.limits import MAX_PATH

logger = logging.getLogger(__name__)

INFO_WAIT = 1.0  # a relay that only just joined gets its first audio in milliseconds


@dataclass(frozen=True, slots=True)
class CloseChild:
    """Send what the child's link still has queued, then close its connection with `code`."""

    child: int
    code: int


class Children:
    """Every child connection of one node; at most `capacity` of them hold a slot."""

    def __init__(
        self,
        stream: bytes,
        ring: ChunkRing,
        capacity: int,
        config: NodeConfig,
        stats: NodeStats,
    ) -> None:
        self.stream = stream
        self.ring = ring
        self.capacity = capacity
        self.config = config
        self.stats = stats
        self.info: StreamInfo | None = None
        self.path: tuple[bytes, ...] | None = None
        """Ours: the node ids from the origin down to this node."""
        self.leaving = False
        self.last_heard: Callable[[int], float | None] = lambda child: None
        """The driver's answer to "when did any packet last come from this child?"."""
        self.wall_ms: Callable[[], int] | None = None
        """The driver's Unix time in ms, for admission tokens' expiry; needed only with
        host keys (`NodeConfig.host_keys`)."""
        self._host_keys = [Ed25519PublicKey.from_public_bytes(k) for k in config.host_keys]
        self.on_gone: Callable[[bytes], None] = lambda node: None
        """Called with the node id of each streaming child let go for silence
        (CHILD_TIMEOUT): the tracker counts its slot as taken until told otherwise."""
        self.on_full: Callable[[], None] = lambda: None
        """Called when a SUBSCRIBE is refused because every slot is taken: whoever sent
        the child here thought we had room (the tracker's view may be stale)."""
        self._links: dict[int, ParentLink] = {}
        self._networks: dict[int, str] = {}  # child -> the source network it connected from
        self._keys: dict[int, bytes | None] = {}  # child -> the key its certificate proved
        self._streaming: set[int] = set()
        self._stalled_since: float | None = None
        self._waiting: dict[int, tuple[SubscribeRequested, float]] = {}
        """SUBSCRIBEs held until the header and path are known, or a silent child's slot
        is freed: child -> (request, when to stop waiting)."""
        self._dirty: set[int] = set()
        self._closes: list[CloseChild] = []
        self._closing: set[int] = set()  # children whose close the driver was asked for

    # -- queries ------------------------------------------------------------------------

    @property
    def count(self) -> int:
        """Children holding a slot (accepted and streaming)."""
        return len(self._streaming)

    @property
    def connections(self) -> int:
        """Open child connections, subscribed or not."""
        return len(self._links)

    def streaming_nodes(self) -> set[bytes]:
        """The ids of the children we stream to (as they named themselves)."""
        return {node for child in self._streaming if (node := self._links[child].child)}

    def node_of(self, child: int) -> bytes | None:
        link = self._links.get(child)
        return None if link is None else link.child

    # -- inputs from the driver ------------------------------------------------------------

    def open(
        self, child: int, max_datagram: int, now: float, network: str, key: bytes | None
    ) -> None:
        """A child connected, from source `network`, with the node key its certificate
        proved (None: it presented none), and opened its control stream."""
        link = ParentLink(
            self.stream,
            now=now,
            max_datagram=max_datagram,
            heartbeat_interval=self.config.heartbeat_interval,
            child_timeout=self.config.child_timeout,
            subscribe_timeout=self.config.subscribe_timeout,
        )
        link.stalled_since = self._stalled_since
        unsubscribed = [
            other
            for other, other_link in self._links.items()
            if other_link.child is None and other_link.state is not LinkState.CLOSED
        ]
        same_network = sum(1 for other in unsubscribed if self._networks[other] == network)
        self._links[child] = link
        self._networks[child] = network
        self._keys[child] = key
        if (
            len(unsubscribed) >= self.config.max_unsubscribed
            or same_network >= self.config.max_unsubscribed_per_network
        ):
            # Connections that say nothing cost memory and slots: a bounded number wait,
            # and one source network may not take every place (slowloris that reopens).
            link.goodbye(ErrorCode.OVERLOADED, "too many connections not subscribed yet")
            self._after(child, link, now)

    def receive_data(self, child: int, data: bytes, now: float) -> None:
        """Stream bytes from a child (b"" when it ended its stream)."""
        link = self._links.get(child)
        if link is None:
            return
        try:
            link.receive_data(data, now)
        except ProtocolError as exc:
            logger.warning("child %s broke the protocol: %s", self._name(child), exc)
            self.stats.bad_peers += 1
            link.goodbye(exc.code, str(exc))
        else:
            while (event := link.next_event()) is not None:
                if isinstance(event, SubscribeRequested):
                    self._subscribed(child, link, event, now)
                elif isinstance(event, RepairRequested):
                    self._repair(child, event.seqs)
                elif isinstance(event, LinkClosed):
                    logger.info("child %s left: %s", self._name(child), event.reason or event.code)
            if link.buffered > self.config.max_child_backlog:
                logger.warning("child %s is not reading; dropping it", self._name(child))
                link.goodbye(ErrorCode.GOING_AWAY, "too slow")
        self._after(child, link, now)

    def closed(self, child: int) -> None:
        """The child's connection is gone (closed by either side)."""
        self._links.pop(child, None)
        self._networks.pop(child, None)
        self._keys.pop(child, None)
        self._streaming.discard(child)
        self._waiting.pop(child, None)
        self._dirty.discard(child)
        self._closing.discard(child)
        self.stats.children = len(self._streaming)

    def set_info(self, info: StreamInfo, now: float) -> None:
        """The stream's header: children that subscribed before it arrived are admitted."""
        if self.info is not None:
            return
        self.info = info
        self._admit_waiting(now)

    def set_path(self, path: tuple[bytes, ...], now: float) -> None:
        """Our path changed (or is first known): every child hears of it."""
        if path == self.path:
            return
        self.path = path
        for child in self._streaming:
            self._links[child].send_path(path)
            self._dirty.add(child)
        self._admit_waiting(now)

    def set_stalled_since(self, since: float | None) -> None:
        """Our own playback stalled at `since` (None: it plays): children are told."""
        self._stalled_since = since
        for link in self._links.values():
            link.stalled_since = since

    def forward(self, item: VerifiedChunk, now: float) -> None:
        """A new verified chunk: to every streaming child at once (a datagram if it fits)."""
        for child in self._streaming:
            link = self._links[child]
            link.send_chunk(item, now)
            self.stats.chunks_out += 1
            self.stats.bytes_out += len(item.raw)
            self._dirty.add(child)

    def redirect_all(self, moves: dict[bytes, tuple[Peer, tuple[Peer, ...]]]) -> None:
        """Graceful leave: tell every child where to go (children the tracker did not
        place are sent to `moves[b""]`, our own parent, if given)."""
        self.leaving = True
        fallback = moves.get(b"")
        for child in self._streaming:
            link = self._links[child]
            target = moves.get(link.child or b"", fallback)
            if target is not None:
                link.redirect(*target)
                self._dirty.add(child)

    def get_timer(self) -> float | None:
        deadlines = [deadline for _, deadline in self._waiting.values()]
        for link in self._links.values():
            timer = link.get_timer()
            if timer is not None:
                deadlines.append(timer)
        return min(deadlines, default=None)

    def handle_timer(self, now: float) -> None:
        for child, link in list(self._links.items()):
            timer = link.get_timer()
            if timer is not None and now >= timer:
                heard = self.last_heard(child)
                if heard is not None:
                    link.child_heard(heard)
                link.handle_timer(now)
                while (event := link.next_event()) is not None:
                    if isinstance(event, LinkClosed):
                        logger.info("child %s: %s", self._name(child), event.reason)
                self._after(child, link, now)
        for child, (request, deadline) in list(self._waiting.items()):
            if now >= deadline and child in self._waiting and not self._let_go_a_silent_child(now):
                del self._waiting[child]
                self._admit(child, request, now, last_try=True)

    # -- outputs for the driver ------------------------------------------------------------

    def take_dirty(self) -> set[int]:
        """Children with bytes or datagrams to send (see `take_output`)."""
        dirty, self._dirty = self._dirty, set()
        return dirty

    def take_output(self, child: int) -> tuple[bytes, list[bytes]]:
        """(stream bytes, datagrams) queued for the child."""
        link = self._links.get(child)
        if link is None:
            return b"", []
        return link.data_to_send(), link.datagrams_to_send()

    def take_closes(self) -> list[CloseChild]:
        closes, self._closes = self._closes, []
        return closes

    # -- decisions --------------------------------------------------------------------------

    def _subscribed(
        self, child: int, link: ParentLink, request: SubscribeRequested, now: float
    ) -> None:
        """Who is asking, and may they (docs/spec.md §3 child check, §6.1 admission)?"""
        if request.node != self._keys.get(child):
            # A SUBSCRIBE in another node's name could dodge the path check, or a ban.
            link.goodbye(ErrorCode.WRONG_PEER, "SUBSCRIBE names another node")
            return
        if self._host_keys:
            assert self.wall_ms is not None, "with host keys the driver sets wall_ms"
            try:
                check_token(
                    request.token,
                    self._host_keys,
                    stream=self.stream,
                    node=request.node,
                    now_ms=self.wall_ms(),
                )
            except RemoteProtocolError as exc:
                logger.info("child %s refused: %s", short_id(request.node), exc)
                link.goodbye(exc.code, str(exc))
                return
        self._admit(child, request, now)

    def _admit(
        self, child: int, request: SubscribeRequested, now: float, *, last_try: bool = False
    ) -> None:
        """Accept a SUBSCRIBE (header, path, backlog), refuse it with the reason, or hold
        it a moment: until we know the header and our path, or until a child we no longer
        hear from is let go (the tracker may already count that slot as free)."""
        link = self._links[child]
        if link.state is not LinkState.SUBSCRIBING:
            return  # the child already gave up (another parent answered it first)
        path = self.path
        full = len(self._streaming) >= self.capacity
        if not last_try and not self.leaving:
            if self.info is None or path is None:
                self._waiting[child] = (request, now + INFO_WAIT)
                return
            silent = self._silent_child_deadline(now) if full else None
            if silent is not None:
                self._waiting[child] = (request, silent)
                return
        if self.leaving:
            link.goodbye(ErrorCode.GOING_AWAY, "this node is leaving")
        elif self.info is None or path is None:
            link.goodbye(ErrorCode.NOT_AVAILABLE, "no audio yet; try again")
        elif request.node in path:
            link.goodbye(ErrorCode.BAD_PATH, "you are on this node's path: a cycle")
        elif len(path) >= MAX_PATH:
            link.goodbye(ErrorCode.NO_CAPACITY, "this node is too deep to feed children")
        elif full:
            link.goodbye(ErrorCode.NO_CAPACITY, f"all {self.capacity} child slots are taken")
            self.on_full()
        else:
            self._streaming.add(child)
            self.stats.children = len(self._streaming)
            backlog = list(self.ring.since(request.from_seq))
            link.accept(self.info, path, backlog, now)
            self.stats.chunks_out += len(backlog)
            self.stats.bytes_out += sum(len(item.raw) for item in backlog)
            start = "the live edge" if request.from_seq is None else f"chunk {request.from_seq}"
            logger.info(
                "child %s subscribed from %s (%s of backlog)",
                short_id(request.node),
                start,
                _chunks(len(backlog)),
            )
        self._after(child, link, now)

    def _admit_waiting(self, now: float) -> None:
        for child, (request, _) in list(self._waiting.items()):
            del self._waiting[child]
            self._admit(child, request, now)

    def _silent_child_deadline(self, now: float) -> float | None:
        """When the quietest child we have not heard from lately will be let go for a
        newcomer, if any: after half the child timeout, since the tracker sending someone
        here says it counts that child as gone already."""
        quiet = now - 2 * self.config.heartbeat_interval
        deadlines = []
        for child in self._streaming:
            link = self._links[child]
            heard = self.last_heard(child)
            if heard is not None:
                link.child_heard(heard)
            if link.child_heard_at < quiet:
                deadlines.append(link.child_heard_at + self.config.child_timeout / 2)
        return min(deadlines, default=None)

    def _let_go_a_silent_child(self, now: float) -> bool:
        """Free the slot of the quietest child silent for half the child timeout, so the
        newcomers held for it are admitted (True), if there is one."""
        for child in self._streaming:
            # What was heard when the newcomer was held is stale: ACKs come every few
            # hundred ms, and a child heard since then is not silent.
            heard = self.last_heard(child)
            if heard is not None:
                self._links[child].child_heard(heard)
        silent = [
            (link.child_heard_at, child)
            for child in self._streaming
            if (link := self._links[child]).child_heard_at + self.config.child_timeout / 2 <= now
        ]
        if not silent:
            return False
        _, child = min(silent)
        link = self._links[child]
        quiet = now - link.child_heard_at
        logger.info(
            "child %s: nothing heard for %.1f s; its slot is wanted", self._name(child), quiet
        )
        link.goodbye(ErrorCode.CHILD_TIMEOUT, f"nothing heard from the child for {quiet:.1f} s")
        self._after(child, link, now)
        return True

    def _repair(self, child: int, seqs: tuple[int, ...]) -> None:
        link = self._links[child]
        found = [item for seq in seqs if (item := self.ring.get(seq)) is not None]
        held = {item.seq for item in found}
        sent = link.answer_repair(found, [seq for seq in seqs if seq not in held])
        if len(sent) < len(found):
            self.stats.repairs_refused += len(found) - len(sent)
            logger.debug("child %s is over its repair budget", self._name(child))
        self.stats.chunks_out += len(sent)
        self.stats.bytes_out += sum(len(item.raw) for item in sent)

    def _after(self, child: int, link: ParentLink, now: float) -> None:
        """Mark the child for sending; once its link closed, ask the driver to close it."""
        self._dirty.add(child)
        if link.state is LinkState.CLOSED and child not in self._closing:
            self._closing.add(child)
            freed = child in self._streaming
            self._streaming.discard(child)
            self._waiting.pop(child, None)
            self.stats.children = len(self._streaming)
            self._closes.append(CloseChild(child, link.goodbye_code or ErrorCode.NO_ERROR))
            if freed and link.goodbye_code == ErrorCode.CHILD_TIMEOUT and link.child:
                # Only a child we fed: one whose SUBSCRIBE we held got nothing from us to
                # acknowledge, so its silence says nothing about it.
                self.on_gone(link.child)
            if freed:
                self._admit_waiting(now)

    def _name(self, child: int) -> str:
        node = self.node_of(child)
        return short_id(node) if node else f"#{child}"


def _chunks(count: int) -> str:
    return "1 chunk" if count == 1 else f"{count} chunks"
