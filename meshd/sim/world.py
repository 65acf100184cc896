"""A whole room on a virtual clock: the tracker, the origin and N listeners, and faults.

`World` builds the room from a seed, runs it, applies faults (kill, SIGSTOP/SIGCONT,
partitions, loss) and says what is wrong with it (`problems`): a node cut off from the
origin or in a cycle, a node whose path disagrees with the tracker, a node that skipped
or has not played audio it should have. Everything is deterministic for a given seed.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.node.config import NodeConfig
from meshd.sim.clock import Scheduler
from meshd.sim.hosts import NodeHost, OriginHost, SharedVerifier, TrackerHost
from meshd.sim.network import Host, Network
from meshd.tracker.service import Tracker, TrackerConfig
from protocol import short_id


def _key(rng: random.Random) -> Ed25519PrivateKey:
    """A key drawn from `rng`, so that a seed replays the same ids (and tree)."""
    return Ed25519PrivateKey.from_private_bytes(rng.randbytes(32))


@dataclass(frozen=True)
class RoomSpec:
    """The room to simulate; every random choice comes from `seed`."""

    listeners: int
    seed: int = 0
    origin_capacity: int = 2
    relay_share: float = 0.7
    """The fraction of listeners that relay (rounded up); the rest are leaves (capacity 0).
    A room whose slots cannot seat every listener is refused."""
    max_children: int = 2
    delay_ms: tuple[float, float] = (2.0, 25.0)
    """Each host's one-way delay to the network core, uniform in this range."""
    loss: float = 0.0
    join_spread: float = 3.0
    """Listeners start spread over this many seconds."""
    refresh_s: int = 60
    """How often nodes refresh their soft state at the tracker."""
    config: NodeConfig = field(default_factory=NodeConfig)


class World:
    def __init__(self, spec: RoomSpec) -> None:
        slots = (
            spec.origin_capacity + math.ceil(spec.listeners * spec.relay_share) * spec.max_children
        )
        if slots <= spec.listeners:
            raise ValueError(f"{slots} child slots cannot seat {spec.listeners} listeners")
        self.spec = spec
        self.rng = random.Random(spec.seed)
        self.scheduler = Scheduler()
        self.network = Network(self.scheduler, random.Random(self.rng.random()), loss=spec.loss)
        self.tracker = TrackerHost(
            self.network, Tracker(TrackerConfig(refresh_s=spec.refresh_s)), self._delay()
        )
        self.network.add(self.tracker)
        self.origin = OriginHost(
            self.network,
            self.tracker,
            _key(self.rng),
            capacity=spec.origin_capacity,
            config=spec.config,
            delay=self._delay(),
        )
        self.network.add(self.origin)
        self.stream_id = self.origin.stream_id
        self.verifier = SharedVerifier(self.stream_id)
        self.nodes: list[NodeHost] = []
        self.by_id: dict[bytes, NodeHost] = {}
        relays = math.ceil(spec.listeners * spec.relay_share)
        roles = [True] * relays + [False] * (spec.listeners - relays)
        self.rng.shuffle(roles)
        for relays in roles:
            self.add_listener(spec.max_children if relays else 0)

    def add_listener(
        self, capacity: int, delay: float | None = None, loss: float = 0.0
    ) -> NodeHost:
        """A listener (not started yet) with its own key, address and link; `delay`
        (one-way, seconds) is drawn from the spec's range unless given."""
        key = _key(self.rng)
        node = NodeHost(
            self.network,
            self.tracker,
            key,
            self.stream_id,
            address=f"node{len(self.nodes)}:1",
            delay=self._delay() if delay is None else delay,
            capacity=capacity,
            config=self.spec.config,
            verifier=self.verifier,
            rng=random.Random(self.rng.random()),
            loss=loss,
        )
        self.nodes.append(node)
        self.by_id[node.node_id] = node
        self.network.add(node)
        return node

    def _delay(self) -> float:
        low, high = self.spec.delay_ms
        return self.rng.uniform(low, high) / 1000

    @property
    def now(self) -> float:
        return self.scheduler.now

    def start(self, *, end_at: float | None = None) -> None:
        """The origin streams from now (until `end_at`); listeners join over the spread."""
        self.origin.start(end_at=end_at)
        for node in self.nodes:
            self.scheduler.after(self.rng.uniform(0.2, self.spec.join_spread), node.start)

    def run(self, seconds: float) -> None:
        self.scheduler.run_for(seconds)

    # -- faults --------------------------------------------------------------------------

    def kill(self, nodes: Iterable[NodeHost]) -> None:
        for node in nodes:
            node.kill()

    def stop(self, node: NodeHost) -> None:
        node.stop()

    def resume(self, node: NodeHost) -> None:
        node.resume()

    def partition(self, nodes: Iterable[Host], seconds: float) -> None:
        self.network.partition({node.address for node in nodes}, seconds)

    def set_loss(self, loss: float) -> None:
        self.network.loss = loss

    # -- views ---------------------------------------------------------------------------

    def live(self) -> list[NodeHost]:
        """Nodes still running (not killed, not finished)."""
        return [node for node in self.nodes if node.alive and node.finished is None]

    def parent_of(self, node: NodeHost) -> bytes | None:
        """The parent a node is actually streaming from (None while it has none)."""
        current = node.core.current
        return (
            current.peer.node if current is not None and current.attached_at is not None else None
        )

    def children_of(self, peer: bytes) -> list[NodeHost]:
        return [node for node in self.live() if self.parent_of(node) == peer]

    def origin_children(self) -> list[NodeHost]:
        return self.children_of(self.stream_id)

    def has_room(self, spare: float = 0.1) -> bool:
        """Whether the live relays (and the origin) have slots for every live listener
        and `spare` more. A tree with hardly a slot to spare may need a leaf to make way
        for a relay before everyone fits, which nothing does yet."""
        live = self.live()
        slots = self.spec.origin_capacity + sum(node.core.capacity for node in live)
        return slots >= (1 + spare) * len(live) + 1

    def chain(self, node: NodeHost) -> list[bytes]:
        """The node's actual path up to the origin, origin first; raises PathBroken."""
        path = [node.node_id]
        hop = node
        while True:
            parent = self.parent_of(hop)
            if parent is None:
                raise PathBroken(f"{short_id(hop.node_id)} has no parent")
            if parent in path:
                cycle = " -> ".join(short_id(p) for p in [*path, parent])
                raise PathBroken(f"cycle {cycle}", cycle=True)
            if parent == self.stream_id:
                if hop.node_id not in self.origin.core.children.streaming_nodes():
                    raise PathBroken(f"the origin does not stream to {short_id(hop.node_id)}")
                return [parent, *reversed(path)]
            upper = self.by_id.get(parent)
            if upper is None or not upper.alive:
                raise PathBroken(f"{short_id(hop.node_id)}'s parent {short_id(parent)} is dead")
            if hop.node_id not in upper.core.children.streaming_nodes():
                raise PathBroken(
                    f"{short_id(parent)} does not stream to its child {short_id(hop.node_id)}"
                )
            path.append(parent)
            hop = upper

    def tracker_chain(self, node: NodeHost) -> list[bytes] | None:
        """The node's path in the tracker's view, origin first (None: it does not know it)."""
        state = self.tracker.tracker.streams.get(self.stream_id)
        if state is None or node.node_id not in state.tree:
            return None
        path = [node.node_id]
        while (parent := state.tree.parent_of(path[-1])) is not None:
            path.append(parent)
        return path[::-1]

    # -- what is wrong ---------------------------------------------------------------------

    def problems(self, *, recent: float = 1.5) -> dict[str, list[str]]:
        """Everything that violates the tree's promises right now, by kind.

        Every live node streams from the origin along a loop-free path of live links
        ("cycle", "cut off"), knows that path ("path wrong"), the tracker sees that same
        path unless it told a node on it to move ("tracker disagrees"), and
        the node has played every chunk from its first one up to those the origin sent
        more than `recent` seconds ago, in order ("lost", "stuck").
        """
        found: dict[str, list[str]] = {}

        def report(kind: str, node: NodeHost, what: str) -> None:
            found.setdefault(kind, []).append(f"{short_id(node.node_id)}: {what}")

        due = self._last_seq_sent_before(self.now - recent)
        for node in self.live():
            try:
                path = self.chain(node)
            except PathBroken as exc:
                report("cycle" if exc.cycle else "cut off", node, str(exc))
            else:
                view = self.tracker_chain(node)
                if view != path and not self._moving(view):
                    report(
                        "tracker disagrees", node, "the tracker's path differs from the real one"
                    )
            played = node.played
            if node.core.stats.lost or any(b != a + 1 for a, b in itertools.pairwise(played)):
                report("lost", node, f"skipped {node.core.stats.lost} chunks")
            if due is not None and (not played or played[-1] < due):
                last = played[-1] if played else None
                report("stuck", node, f"stuck at seq {last}; the origin is past {due}")
        return found

    def _moving(self, view: list[bytes] | None) -> bool:
        """Whether the tracker told a node on this path to move and waits for it to say
        it did (make before break, docs/spec.md §6.3): the view is ahead of the links."""
        state = self.tracker.tracker.streams.get(self.stream_id)
        if state is None or view is None:
            return False
        return any(state.tree.is_orphaned(peer) for peer in view)

    def _last_seq_sent_before(self, when: float) -> int | None:
        count = bisect.bisect_right(self.origin.sent_at, when)
        return count - 1 if count else None


class PathBroken(Exception):
    """A node's chain of parents does not reach the origin."""

    def __init__(self, message: str, *, cycle: bool = False) -> None:
        super().__init__(message)
        self.cycle = cycle
