"""The tracker's request handling: checks, tree decisions, answers, counters, log lines.

No I/O here: `Tracker.handle(request, now, wall_ms)` takes a decoded request and returns
the response to send, so the server (and a host embedding the tracker) only moves bytes.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from meshd.tracker.limits import NetworkCensus
from meshd.tracker.tree import (
    Assignment,
    PeerRef,
    StreamTree,
    TreeError,
    TreeErrorCode,
)
from protocol import (
    Ack,
    Assigned,
    ChildGone,
    ErrorCode,
    Goodbye,
    Join,
    Leave,
    Move,
    Moved,
    Peer,
    ProtocolError,
    Refresh,
    Register,
    Rejoin,
    RetryAfter,
    StatusReport,
    StatusRequest,
    TreeNode,
    TreeReport,
    TreeRequest,
    check_token,
    short_id,
    verify_message,
)
from protocol.identity import public_key_from_id
from protocol.limits import MAX_TREE_NODES
from protocol.messages import TrackerRequest, TrackerResponse

logger = logging.getLogger("meshd.tracker")

NO_SUCH_STREAM = "no such stream: its origin has not registered here (not started yet?)"
REGISTER_REFRESH_S = 2  # how often the origin re-registers (a restarted tracker learns fast)
REBUILD_AT_LEAST_S = 60  # how long at least a restarted tracker's view counts as rebuilt
NETWORK_FULL_RETRY_MS = 10_000
"""RETRY_AFTER for a new identity from a network at its limit: it waits for one to go."""
RATE_WINDOW = 10.0  # seconds over which joins/s and rejoins/s are measured
TREE_CODES = {
    TreeErrorCode.NO_CAPACITY: ErrorCode.NO_CAPACITY,
    TreeErrorCode.UNKNOWN_PEER: ErrorCode.UNKNOWN_PEER,
    TreeErrorCode.UNKNOWN_PARENT: ErrorCode.UNKNOWN_PEER,
    TreeErrorCode.INVALID_REQUEST: ErrorCode.UNEXPECTED_MESSAGE,
}


@dataclass(frozen=True)
class TrackerConfig:
    refresh_s: int = 180
    """How often nodes refresh their soft state (told to them in ASSIGNED/ACK)."""
    peer_ttl: float = 0.0
    """A node not heard from for this long is removed as failed. 0: 600 s, or three
    refresh periods if that is longer, so that a node that misses a REFRESH or two is
    not forgotten while it streams."""
    host_keys: Sequence[Ed25519PublicKey] = ()
    """Keys whose admission tokens are accepted; empty = open mode (no tokens needed)."""
    max_skew_ms: int = 300_000
    backups: int = 3
    max_pending: int = 256
    """Handshakes and requests in progress at once (per worker) before new connections are
    refused before the handshake (and requests that slip past answered RETRY_AFTER)."""
    retry_after_ms: int = 1_000
    joins_per_network_s: float = 20.0
    """JOINs per second from one source network (IPv4 /24, IPv6 /48), in all: the workers
    share it (0: no limit)..."""
    join_burst_per_network: int = 100
    """...after a burst of this many; beyond, RETRY_AFTER (meshd.networks)."""
    handshakes_per_network_s: float = 50.0
    """QUIC handshakes per second one source network may start, in all: the workers share
    it (0: no limit)..."""
    handshake_burst_per_network: int = 200
    """...after a burst of this many; beyond, its Initials are dropped before any crypto
    (REFRESH, STATUS and retries need connections too, hence more than the JOINs)."""
    max_capacity: int = 16
    """A node's declared capacity counts as at most this (the origin's: as declared)."""
    initial_capacity: int = 4
    """Children a new relay may hold; it earns more as its children vouch for it
    (docs/spec.md §7.3). 4, the default `meshd listen --max-children`: an honest relay has
    its slots at once, and only larger declarations are earned (a launch with 2 measured
    a tree 4 times as deep). 0: capacity is taken as declared, nothing is earned."""
    identities_per_network: int = 64
    """Live identities one source network may have in one stream (0: no limit)..."""
    capacity_per_network: int = 256
    """...and declared capacity (within `max_capacity`) it may hold there; a node over
    it counts as a leaf. Beyond the identities, RETRY_AFTER (meshd.tracker.limits)."""

    def __post_init__(self) -> None:
        if not self.peer_ttl:
            object.__setattr__(self, "peer_ttl", max(600.0, 3.0 * self.refresh_s))


class RateMeter:
    """Events per second over the last `RATE_WINDOW` seconds."""

    def __init__(self) -> None:
        self._times: deque[float] = deque()

    def tick(self, now: float) -> None:
        self._times.append(now)
        self._trim(now)

    def rate(self, now: float) -> float:
        self._trim(now)
        return len(self._times) / RATE_WINDOW

    def _trim(self, now: float) -> None:
        while self._times and self._times[0] < now - RATE_WINDOW:
            self._times.popleft()


@dataclass
class StreamState:
    tree: StreamTree
    registered_at: float
    """When the origin last sent REGISTER; a stream not re-registered for `peer_ttl` ends."""
    joins: RateMeter = field(default_factory=RateMeter)
    rejoins: RateMeter = field(default_factory=RateMeter)
    total_joins: int = 0
    total_rejoins: int = 0
    total_leaves: int = 0
    total_failures: int = 0
    since: dict[bytes, float] = field(default_factory=dict)
    """When the tracker first placed each node (its uptime in TREE_REPORT); nodes that
    left the tree are pruned by `Tracker.expire`."""
    census: NetworkCensus = field(default_factory=NetworkCensus)
    """The live identities of each source network, and their declared capacity."""
    live_granule: int | None = None
    """The origin's newest granule by its last REGISTER, passed on in every ASSIGNED."""

    def seen(self, node: bytes, now: float) -> None:
        if node in self.tree:
            self.since.setdefault(node, now)


class Tracker:
    """Every stream's tree, and the rules for changing them."""

    def __init__(self, config: TrackerConfig | None = None) -> None:
        self.config = config or TrackerConfig()
        self.streams: dict[bytes, StreamState] = {}
        self.ended: dict[bytes, float] = {}
        """Streams that ended (origin LEAVE or silence), and when: for `peer_ttl`, nodes
        asking about them hear STREAM_ENDED rather than UNKNOWN_STREAM."""
        self.total_shed = 0
        self._shed_since_log = 0
        self._last_shed_log = -math.inf

    def handle(
        self, request: TrackerRequest, now: float, wall_ms: int, network: str = ""
    ) -> TrackerResponse:
        """Answer one request; refusals are GOODBYE with the spec's error code."""
        return check_request(request, self.config, wall_ms) or self.decide(request, now, network)

    def decide(self, request: TrackerRequest, now: float, network: str = "") -> TrackerResponse:
        """Answer a request that passed `check_request` (here, or in a worker process).

        `network` is the sender's source network (`meshd.networks.network_of`);
        "" (not known: the tracker is embedded without one) is subject to no network limit.
        """
        try:
            if isinstance(request, StatusRequest):
                return self.status(request.stream, now)
            if isinstance(request, TreeRequest):
                return self.tree_report(request.stream, now, request.max_nodes)
            if isinstance(request, Register):
                return self._register(request, now)
            if isinstance(request, Leave):
                return self._leave(request, now)
            if isinstance(request, ChildGone):
                return self._child_gone(request, now)
            return self._place(request, now, network)
        except ProtocolError as exc:
            return Goodbye(exc.code, str(exc))
        except TreeError as exc:
            return Goodbye(TREE_CODES[exc.code], str(exc) or exc.code.value)

    def shed(self, now: float, count: int = 1) -> None:
        """Count requests the server shed (RETRY_AFTER, or refused before the handshake);
        logged once a second, so an overload does not also flood the log."""
        self.total_shed += count
        self._shed_since_log += count
        if now - self._last_shed_log >= 1.0:
            logger.warning(
                "shed: overloaded, refused or answered RETRY_AFTER %d times",
                self._shed_since_log,
            )
            self._shed_since_log = 0
            self._last_shed_log = now

    def expire(self, now: float) -> None:
        """Drop nodes whose soft state ran out (they died without anyone reporting it),
        and streams whose origin stopped re-registering (it died: listeners then get
        UNKNOWN_STREAM and give up instead of waiting forever)."""
        for stream_id, when in list(self.ended.items()):
            if now - when > self.config.peer_ttl:
                del self.ended[stream_id]
        for stream_id, state in list(self.streams.items()):
            if now - state.registered_at > self.config.peer_ttl:
                self._end(stream_id, now)
                logger.info("end stream=%s (the origin stopped registering)", short_id(stream_id))
                continue
            for peer in state.tree.expire(now):
                state.total_failures += 1
                logger.info(
                    "failure stream=%s node=%s (soft state expired)",
                    short_id(stream_id),
                    short_id(peer),
                )
            # Both keep nodes that left the tree until pruned. A prune walks the whole
            # audience, so it waits until an eighth of them are stale (amortised O(1)
            # per departure; expiry runs every second).
            stale_at = len(state.tree) + len(state.tree) // 8 + 64
            if len(state.since) > stale_at:
                state.since = {n: t for n, t in state.since.items() if n in state.tree}
            if len(state.census) > stale_at:
                state.census.prune(state.tree)

    def suspects(self, now: float) -> list[tuple[bytes, PeerRef]]:
        """(stream, peer) pairs reported dead but not confirmed: the server probes them."""
        return [
            (stream_id, state.tree.ref_of(peer))
            for stream_id, state in self.streams.items()
            for peer in state.tree.suspects(now)
        ]

    def probed(self, stream_id: bytes, peer: bytes, alive: bool, now: float) -> None:
        """Apply a probe's result; an unreachable suspect is removed as failed."""
        state = self.streams.get(stream_id)
        if state is None:
            return
        removed = state.tree.probe_result(peer, alive, now)
        if removed:
            state.total_failures += 1
            logger.info(
                "failure stream=%s node=%s (confirmed by probe; %d peers removed)",
                short_id(stream_id),
                short_id(peer),
                len(removed),
            )

    def status(self, stream_id: bytes, now: float) -> StatusReport | Goodbye:
        state = self.streams.get(stream_id)
        if state is None:
            return self._unknown(stream_id)
        snapshot = state.tree.snapshot()
        return StatusReport(
            stream_id,
            snapshot.audience,
            snapshot.origin_children,
            snapshot.origin_capacity,
            snapshot.depth_histogram[:256],
            state.joins.rate(now),
            state.rejoins.rate(now),
            state.total_joins,
            state.total_rejoins,
            state.total_leaves,
            state.total_failures,
            self.total_shed,
        )

    def tree_report(
        self, stream_id: bytes, now: float, max_nodes: int = MAX_TREE_NODES
    ) -> TreeReport | Goodbye:
        """The top of the stream's tree: at most `max_nodes` nodes, breadth first from
        the origin, so a big audience is cut at its deepest levels."""
        state = self.streams.get(stream_id)
        if state is None:
            return self._unknown(stream_id)
        limit = min(max_nodes, MAX_TREE_NODES)
        tree = state.tree
        nodes = []
        for node in _breadth_first(tree, stream_id, limit):
            nodes.append(
                TreeNode(
                    node,
                    tree.parent_of(node),
                    tree.ref_of(node).address,
                    tree.declared_of(node),
                    len(tree.children_of(node)),
                    tree.depth_of(node),
                    int(now - state.since.get(node, now)),
                )
            )
        return TreeReport(stream_id, len(tree) - 1, tuple(nodes))

    # -- requests ----------------------------------------------------------------------

    def _register(self, request: Register, now: float) -> Ack:
        state = self.streams.get(request.stream)
        if state is None:
            self.ended.pop(request.stream, None)  # the origin restarted the stream
            # A stream that ran before we knew it (we restarted): its nodes refresh
            # within a refresh period (ours, or the last tracker's), and sooner when the
            # origin's chunks ask them to; a slow request may take seconds more.
            running = request.live_granule is not None
            rebuild = max(2 * self.config.refresh_s, REBUILD_AT_LEAST_S)
            rebuilding_until = now + rebuild if running else 0.0
            tree = StreamTree(
                request.stream,
                request.address,
                request.capacity,
                backups=self.config.backups,
                peer_ttl=self.config.peer_ttl,
                max_capacity=self.config.max_capacity,
                initial_capacity=self.config.initial_capacity or None,
                rebuilding_until=rebuilding_until,
            )
            state = self.streams[request.stream] = StreamState(tree, now)
            state.seen(request.stream, now)
            logger.info(
                "register stream=%s origin=%s capacity=%d",
                short_id(request.stream),
                request.address,
                request.capacity,
            )
        else:
            state.registered_at = now
            state.tree.refresh(
                request.stream, now, capacity=request.capacity, address=request.address
            )
        # The latest, not the largest: an origin that starts its stream again counts from 0.
        state.live_granule = request.live_granule
        # The origin re-registers often: a restarted tracker knows the stream again, and
        # seats new listeners, within seconds (one small request per stream).
        return Ack(min(REGISTER_REFRESH_S, self.config.refresh_s))

    def _place(self, request: Join | Rejoin | Refresh, now: float, network: str) -> TrackerResponse:
        """JOIN, REJOIN, REFRESH: the requests that may bring a node into the tree."""
        state = self._stream(request.stream)
        if request.node not in state.tree:
            if isinstance(request, Refresh) and self.config.host_keys:
                # Someone we do not know comes in only as a JOIN does: with its admission
                # token (REFRESH carries none), else anyone could claim a place in the tree.
                raise ProtocolError("unknown node: JOIN with a token", ErrorCode.UNKNOWN_PEER)
            if not self._room_for(state, network):
                return RetryAfter(NETWORK_FULL_RETRY_MS, "too many identities from your network")
        capacity = self._granted(state, request.node, request.capacity, network)
        response: TrackerResponse
        if isinstance(request, Join):
            response = self._join(state, request, capacity, network, now)
        elif isinstance(request, Rejoin):
            response = self._rejoin(state, request, capacity, network, now)
        else:
            response = self._refresh(state, request, capacity, network, now)
        for node, node_network in state.tree.take_adopted():
            self._admitted(state, node, node_network, now)  # they waited for this one
        return response

    def _room_for(self, state: StreamState, network: str) -> bool:
        """Whether `network` may bring one more identity into the stream."""
        limit = self.config.identities_per_network
        if not network or limit <= 0:
            return True
        members = len(state.census.members(network, state.tree))
        return members + state.tree.waiting_from(network) < limit

    def _granted(self, state: StreamState, node: bytes, capacity: int, network: str) -> int:
        """The capacity the tree counts for `node`: within what its source network (the
        one it joined from) may still hold; over that, it is taken as a leaf."""
        limit = self.config.capacity_per_network
        if node in state.tree:
            network = state.census.network_of(node)
        if not network or limit <= 0:
            return capacity
        others = state.census.members(network, state.tree) - {node}
        held = sum(state.tree.declared_of(other) for other in others)
        return max(0, min(capacity, limit - held))

    def _admitted(self, state: StreamState, node: bytes, network: str, now: float) -> None:
        if node in state.tree:
            state.seen(node, now)
            state.census.add(node, network)

    def _join(
        self, state: StreamState, request: Join, capacity: int, network: str, now: float
    ) -> Assigned:
        known = request.node in state.tree
        assignment = state.tree.join(request.node, capacity, request.address, now, network)
        self._admitted(state, request.node, network, now)
        if known:  # a retried JOIN (its answer was lost): the same place, not a new join
            return self._assigned(state, assignment)
        state.total_joins += 1
        state.joins.tick(now)
        logger.info(
            "join stream=%s node=%s capacity=%d parent=%s depth=%d",
            short_id(request.stream),
            short_id(request.node),
            request.capacity,
            short_id(assignment.parent.peer_id),
            assignment.depth,
        )
        return self._assigned(state, assignment)

    def _rejoin(
        self, state: StreamState, request: Rejoin, capacity: int, network: str, now: float
    ) -> Assigned:
        before = len(state.tree)
        dead_was_known = request.dead in state.tree
        assignment = state.tree.report_failure(
            request.node,
            request.dead,
            now,
            attached_to=request.attached,
            capacity=capacity,
            address=request.address,
            network=network,
        )
        self._admitted(state, request.node, network, now)
        state.total_rejoins += 1
        state.rejoins.tick(now)
        if dead_was_known and request.dead not in state.tree:
            state.total_failures += 1
            logger.info(
                "failure stream=%s node=%s (confirmed by reports; %d peers removed)",
                short_id(request.stream),
                short_id(request.dead),
                max(before - len(state.tree), 1),
            )
        logger.info(
            "rejoin stream=%s node=%s dead=%s parent=%s depth=%d",
            short_id(request.stream),
            short_id(request.node),
            short_id(request.dead),
            short_id(assignment.parent.peer_id),
            assignment.depth,
        )
        return self._assigned(state, assignment)

    def _leave(self, request: Leave, now: float) -> Moved:
        if request.node == request.stream:
            if request.stream in self.streams:
                self._end(request.stream, now)
                logger.info("end stream=%s (the origin left)", short_id(request.stream))
            return Moved(())
        state = self._stream(request.stream)
        if request.node not in state.tree:
            return Moved(())
        placed = state.tree.leave(request.node, now)
        state.total_leaves += 1
        logger.info(
            "leave stream=%s node=%s children_moved=%d",
            short_id(request.stream),
            short_id(request.node),
            len(placed),
        )
        return Moved(
            tuple(
                Move(child, _peer(a.parent), tuple(_peer(b) for b in a.backups))
                for child, a in placed.items()
            )
        )

    def _refresh(
        self, state: StreamState, request: Refresh, capacity: int, network: str, now: float
    ) -> Ack | Assigned:
        """ACK; or ASSIGNED when our view places the node elsewhere than it says it is
        and cannot follow it (it then moves there)."""
        placement = state.tree.refresh(
            request.node,
            now,
            parent=request.parent,
            capacity=capacity,
            address=request.address,
            network=network,
        )
        self._admitted(state, request.node, network, now)
        if placement is not None:
            return self._assigned(state, placement)
        return Ack(self.config.refresh_s)

    def _child_gone(self, request: ChildGone, now: float) -> Ack:
        """ACK, whatever the tree made of it: the parent has nothing to do either way."""
        state = self._stream(request.stream)
        if state.tree.child_gone(request.node, request.child, now):
            state.total_failures += 1
            logger.info(
                "failure stream=%s node=%s (its parent %s let it go)",
                short_id(request.stream),
                short_id(request.child),
                short_id(request.node),
            )
        return Ack(self.config.refresh_s)

    # -- helpers ------------------------------------------------------------------------

    def _unknown(self, stream_id: bytes) -> Goodbye:
        if stream_id in self.ended:
            return Goodbye(ErrorCode.STREAM_ENDED, "the stream has ended")
        return Goodbye(ErrorCode.UNKNOWN_STREAM, NO_SUCH_STREAM)

    def _stream(self, stream_id: bytes) -> StreamState:
        state = self.streams.get(stream_id)
        if state is None:
            if stream_id in self.ended:
                raise ProtocolError("the stream has ended", ErrorCode.STREAM_ENDED)
            raise ProtocolError(NO_SUCH_STREAM, ErrorCode.UNKNOWN_STREAM)
        return state

    def _end(self, stream_id: bytes, now: float) -> None:
        del self.streams[stream_id]
        self.ended[stream_id] = now

    def _assigned(self, state: StreamState, assignment: Assignment) -> Assigned:
        return Assigned(
            _peer(assignment.parent),
            tuple(_peer(b) for b in assignment.backups),
            assignment.depth,
            self.config.refresh_s,
            state.live_granule,
        )


def check_request(request: TrackerRequest, config: TrackerConfig, wall_ms: int) -> Goodbye | None:
    """The checks that need no tree: clock skew, signature, token (in that order, so an
    unsigned request learns nothing). None if the request may go on to `Tracker.decide`.

    They are most of a request's CPU after the handshake and need only the config, so
    each worker process runs them and the one process that owns the trees does not.
    """
    if isinstance(request, StatusRequest | TreeRequest):
        return None
    skew = abs(request.time_ms - wall_ms)
    if skew > config.max_skew_ms:
        return Goodbye(
            ErrorCode.STALE_REQUEST, f"request time is {skew // 1000} s off the tracker's clock"
        )
    signer = request.stream if isinstance(request, Register) else request.node
    try:
        verify_message(request, public_key_from_id(signer))
        if isinstance(request, Join | Rejoin):
            check_token(
                request.token,
                config.host_keys,
                stream=request.stream,
                node=request.node,
                now_ms=wall_ms,
            )
    except ProtocolError as exc:
        return Goodbye(exc.code, str(exc))
    return None


def _peer(ref: PeerRef) -> Peer:
    return Peer(ref.peer_id, ref.address)


def _breadth_first(tree: StreamTree, root: bytes, limit: int) -> Iterator[bytes]:
    queue = deque([root])
    while queue and limit > 0:
        node = queue.popleft()
        yield node
        limit -= 1
        queue.extend(tree.children_of(node))
