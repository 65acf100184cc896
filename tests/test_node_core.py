"""The node core's decisions, run on the simulator: named cases that must hold exactly.

The hypothesis hunt (test_sim_faults.py) looks for schedules that break the tree; these
pin down the cases the field found, one by one, with fixed seeds.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.node.children import Children
from meshd.node.config import NodeConfig
from meshd.node.core import (
    ANNOUNCE_QUIET,
    ANNOUNCE_STEP,
    EXIT_MISSED_AUDIO,
    REJOIN_AGAIN_AFTER,
    UNKNOWN_RETRIES,
    AskTracker,
    CloseLink,
    Connect,
    NodeCore,
    Play,
)
from meshd.node.stats import NodeStats
from meshd.sim.hosts import NodeHost, wall_ms
from meshd.sim.world import RoomSpec, World
from protocol import (
    Ack,
    Assigned,
    ChildGone,
    ChunkRing,
    ChunkSigner,
    ErrorCode,
    Goodbye,
    Join,
    Leave,
    Peer,
    Refresh,
    Rejoin,
    VerifiedChunk,
    key_id,
    sign_message,
)
from protocol.media import OPUS_RATE
from protocol.messages import TrackerRequest, TrackerResponse

STALL_BUDGET = 1.1  # seconds: the p99 budget is 1 s, on real processes


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    logger = logging.getLogger("meshd")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def room(listeners: int, seed: int, **spec: object) -> World:
    world = World(RoomSpec(listeners, seed, **spec))  # type: ignore[arg-type]
    world.start()
    world.run(8)
    assert not world.problems(), world.problems()
    return world


@pytest.mark.parametrize("seed", range(6))
def test_killing_the_origins_children_costs_no_survivor_any_audio(seed: int) -> None:
    """The field's case: origin capacity 2, 14 listeners relaying to 2, both of the
    origin's children killed together. Their orphans used to form a cycle in each
    other's subtrees, kept alive by their own heartbeats. The stall each survivor hears
    stays about the issue's 1 s budget (virtual time: the silence timeout, 0.6 s, is
    most of it): the origin frees a silent child's slot for a newcomer after 0.5 s, the
    tracker is asked 0.25 s into a failover, and a move under way survives its parent's
    failure."""
    world = room(14, seed, relay_share=1.0, max_children=2)
    top = world.origin_children()
    assert len(top) == 2
    world.kill(top)
    world.run(15)
    assert not world.problems(), world.problems()
    assert sum(node.core.stats.failovers for node in world.live()) >= 2
    worst = max(node.core.playout.worst for node in world.live())
    assert worst < STALL_BUDGET, f"a survivor stalled {worst:.2f} s"


def relays_below_a_relay(world: World) -> tuple[NodeHost, list[NodeHost], list[NodeHost]]:
    """A relay that feeds relays that feed others: (it, its children, their children)."""
    for node in world.live():
        children = world.children_of(node.node_id)
        grandchildren = [g for c in children for g in world.children_of(c.node_id)]
        if node.core.stats.depth and grandchildren:
            return node, children, grandchildren
    raise AssertionError("no relay with grandchildren")


def wedge(node: NodeHost, forward: Callable[[VerifiedChunk, float], None] | None) -> None:
    """The node keeps its links and heartbeats but forwards what `forward` says (None:
    nothing), and answers every REPAIR with MISSING."""
    children = node.core.children

    def wedged(item: VerifiedChunk, now: float) -> None:
        if forward is not None:
            forward(item, now)

    def missing(child: int, seqs: tuple[int, ...]) -> None:
        children._links[child].answer_repair([], seqs)

    children.forward = wedged  # type: ignore[method-assign]
    children._repair = missing  # type: ignore[method-assign]


def replaying(node: NodeHost) -> Callable[[VerifiedChunk, float], None]:
    first: list[VerifiedChunk] = []
    forward = node.core.children.forward

    def replay(item: VerifiedChunk, now: float) -> None:
        first.append(item)
        forward(first[0], now)

    return replay


def every_other(node: NodeHost) -> Callable[[VerifiedChunk, float], None]:
    forward = node.core.children.forward

    def half(item: VerifiedChunk, now: float) -> None:
        if item.seq % 2 == 0:
            forward(item, now)

    return half


def another_stream(node: NodeHost) -> Callable[[VerifiedChunk, float], None]:
    forward = node.core.children.forward
    signer = ChunkSigner(Ed25519PrivateKey.generate())

    def foreign(item: VerifiedChunk, now: float) -> None:
        signer.next_seq = item.seq
        forward(signer.sign(item.chunk.packets, item.chunk.granule), now)

    return foreign


@pytest.mark.parametrize(
    "behaviour",
    [
        lambda node: None,  # heartbeats, and nothing else
        replaying,  # the same old chunk, again and again
        every_other,  # half the chunks, MISSING for the rest
        another_stream,  # validly signed chunks of another stream
    ],
    ids=["silent", "replaying", "every-other", "another-stream"],
)
def test_a_wedged_relay_is_left_by_its_children_and_only_by_them(
    behaviour: Callable[[NodeHost], Callable[[VerifiedChunk, float], None] | None],
) -> None:
    world = room(30, 3, relay_share=1.0, max_children=3)
    wedged, children, grandchildren = relays_below_a_relay(world)
    wedge(wedged, behaviour(wedged))
    world.run(10)
    for child in children:
        assert child.core.stats.failovers >= 1, "a child stayed with a wedged parent"
        assert world.parent_of(child) != wedged.node_id
    for grandchild in grandchildren:
        assert grandchild.core.stats.failovers == 0, "only the wedged relay's children act"
    problems = world.problems()
    problems.pop("tracker disagrees", None)  # the wedged relay still claims its children
    assert not {k: v for k, v in problems.items() if "wedged" not in str(v)}, problems
    for node in [*children, *grandchildren]:
        assert node.core.stats.lost == 0


def test_a_parent_that_does_not_claim_a_stall_is_left_at_the_stall_timeout() -> None:
    """Its heartbeats say `stalled_ms` 0: they must not buy it the stall grace too. The
    children feed nobody, so no timer of their own wakes them up early."""
    world = room(30, 3, relay_share=1.0, max_children=3)
    wedged, children = next(
        (node, children)
        for node in world.live()
        if (children := world.children_of(node.node_id))
        and not any(world.children_of(child.node_id) for child in children)
    )
    wedge(wedged, None)
    world.run(NodeConfig().stall_timeout + 0.3)  # virtual seconds: the grace is 4 s more
    for child in children:
        assert child.core.stats.failovers >= 1, "the child waited out the stall grace"


def test_lost_datagrams_cost_latency_never_audio() -> None:
    world = room(25, 5, relay_share=0.8, max_children=3)
    world.set_loss(0.1)
    world.run(30)
    assert not world.problems(), world.problems()
    assert sum(node.core.stats.repairs_requested for node in world.live()) > 50


def test_a_node_cut_off_for_the_join_timeout_gives_up_saying_it_missed_audio() -> None:
    world = World(RoomSpec(12, 7, relay_share=1.0, max_children=2))
    for node in world.nodes:
        node.core.join_timeout = 10.0
    world.start()
    world.run(8)
    loner = world.live()[-1]
    world.partition([loner], 30)
    world.run(12)
    assert loner.finished is not None
    assert loner.finished.status == EXIT_MISSED_AUDIO
    assert "cut off" in loner.finished.message
    assert loner.core.get_timer() is None  # a finished core has nothing left to wake for


def test_when_the_stream_ends_everyone_finishes_complete() -> None:
    world = World(RoomSpec(20, 11, relay_share=0.8, max_children=3))
    world.start(end_at=12.0)
    world.run(30)
    for node in world.nodes:
        assert node.finished is not None and node.finished.status == 0, node.finished
        assert node.core.stats.ended and node.core.stats.lost == 0
        assert node.played == list(range(node.played[0], world.origin.core.signer.next_seq))


def test_a_node_told_the_stream_ended_stops_at_once() -> None:
    world = room(10, 2, relay_share=1.0, max_children=2)
    loner = world.live()[-1]
    world.partition([loner], 60)
    world.run(1)
    world.origin.end_at = world.now  # the stream ends while the loner is cut off ...
    world.run(15)
    assert all(node.finished for node in world.nodes if node is not loner)
    tracker = world.tracker.tracker
    tracker.handle(
        sign_message(Leave(world.stream_id, world.stream_id, wall_ms(world.now)), world.origin.key),
        world.now,
        wall_ms(world.now),
    )  # ... and the origin tells the tracker so
    world.network.heal()
    world.run(10)
    assert loner.finished is not None
    assert loner.finished.status == EXIT_MISSED_AUDIO
    assert "ended" in loner.finished.message


def leaves_by_parent(world: World) -> dict[bytes, list[NodeHost]]:
    leaves: dict[bytes, list[NodeHost]] = {}
    for node in world.live():
        parent = world.parent_of(node)
        if node.core.capacity == 0 and parent is not None and parent != world.stream_id:
            leaves.setdefault(parent, []).append(node)
    return leaves


def test_a_parent_frees_a_dead_leafs_slot_at_the_tracker_within_seconds() -> None:
    """Nobody else could: a leaf has no child to report it (the melt scenario)."""
    world = room(20, 4, relay_share=0.5, max_children=3)
    tree = world.tracker.tracker.streams[world.stream_id].tree
    leaf = next(iter(leaves_by_parent(world).values()))[0]
    world.kill([leaf])
    world.run(3)
    assert leaf.node_id not in tree
    assert world.tracker.load.totals["childgone"] == 1
    assert not world.problems(), world.problems()


def test_a_parent_stops_telling_a_tracker_that_does_not_know_child_gone() -> None:
    world = room(20, 4, relay_share=0.5, max_children=3)
    tracker = world.tracker.tracker
    answer = tracker.handle

    def older(
        request: TrackerRequest, now: float, wall_ms: int, network: str = ""
    ) -> TrackerResponse:
        if isinstance(request, ChildGone):
            return Goodbye(ErrorCode.UNKNOWN_MESSAGE, "unknown message type 23")
        return answer(request, now, wall_ms, network)

    tracker.handle = older  # type: ignore[method-assign]
    leaves = next(group for group in leaves_by_parent(world).values() if len(group) >= 2)
    for leaf in leaves[:2]:
        world.kill([leaf])
        world.run(3)
    assert world.tracker.load.totals["childgone"] == 1
    assert all(leaf.node_id in tracker.streams[world.stream_id].tree for leaf in leaves[:2])


def test_a_failover_names_a_dead_tracker_choice_at_once_and_is_back_within_2_s() -> None:
    """The melt: the tracker's answer to a REJOIN may name a node that died in the same
    moment, unknown to it. Waiting out its connect timeout (2 s) and then naming the old
    parent again (the tracker then gave the same dead placement back) cost seconds; now
    the node names the tracker's choice in another REJOIN after 0.5 s."""
    world = room(20, 3, relay_share=1.0, max_children=3)
    by_id = {node.node_id: node for node in world.live()}
    child = next(
        node
        for node in world.live()
        if world.parent_of(node) in by_id and not world.children_of(node.node_id)
    )
    parent = by_id[world.parent_of(child) or b""]
    backups = [by_id[peer.node] for peer in child.core.backups if peer.node in by_id]
    gone = {child.node_id, parent.node_id, *(node.node_id for node in backups)}
    dead = next(node for node in world.live() if node.node_id not in gone)
    tracker = world.tracker.tracker
    answer = tracker.handle
    rejoins: list[tuple[float, bytes]] = []

    def stale(
        request: TrackerRequest, now: float, wall_ms: int, network: str = ""
    ) -> TrackerResponse:
        if isinstance(request, Rejoin) and request.node == child.node_id:
            rejoins.append((now, request.dead))
            if len(rejoins) == 1:  # the first answer names a node that just died
                return Assigned(Peer(dead.node_id, dead.address), (), 2, 180)
        return answer(request, now, wall_ms, network)

    tracker.handle = stale  # type: ignore[method-assign]
    world.kill([parent, dead, *backups])
    world.run(6)
    assert [who for _, who in rejoins[:2]] == [parent.node_id, dead.node_id]
    assert rejoins[1][0] - rejoins[0][0] < REJOIN_AGAIN_AFTER + 0.3
    assert world.parent_of(child) is not None
    assert child.core.playout.worst < 2.0, f"stalled {child.core.playout.worst:.2f} s"


def test_a_node_told_back_to_the_parent_it_reported_asks_again_only_after_a_backoff() -> None:
    """A REJOIN's answer may name the very parent the REJOIN named as dead: the tracker
    has no other place (its view of the node's subtree is stale, say). Asking again the
    moment that parent refused made a storm: 27 REJOINs in 0.2 s from one relay
    (bench_attacks.py --attack no-audio-relays-x5 --spread-networks --seed 2). Here the
    tracker answers every REJOIN with a node of the relay's own subtree, which refuses
    at once (a cycle), its backups dead."""
    world = room(20, 3, relay_share=1.0, max_children=3)
    by_id = {node.node_id: node for node in world.live()}
    relay = next(
        node
        for node in world.live()
        if world.parent_of(node) in by_id and world.children_of(node.node_id)
    )
    below = world.children_of(relay.node_id)[0]
    parent = by_id[world.parent_of(relay) or b""]
    tracker = world.tracker.tracker
    answer = tracker.handle
    rejoins: list[float] = []

    def nowhere_else(
        request: TrackerRequest, now: float, wall_ms: int, network: str = ""
    ) -> TrackerResponse:
        if isinstance(request, Rejoin) and request.node == relay.node_id and len(rejoins) < 50:
            rejoins.append(now)
            return Assigned(Peer(below.node_id, below.address), (), 2, 180)
        return answer(request, now, wall_ms, network)

    tracker.handle = nowhere_else  # type: ignore[method-assign]
    spared = {relay.node_id, below.node_id}
    backups = [by_id[p.node] for p in relay.core.backups if p.node in by_id.keys() - spared]
    world.kill([parent, *backups])
    world.run(3)
    # One naming the old parent, one naming the refusing choice, then backing off (the
    # old loop asked again each round trip: 9 in these 3 s, 0.27 s apart).
    assert 2 <= len(rejoins) <= 4, f"{len(rejoins)} REJOINs in 3 s: {rejoins}"


# -- one node and parents the test plays -------------------------------------------------


class FakeParent:
    """A parent as the test wants it: the real `Children`, fed only what the test says."""

    def __init__(self, signer: ChunkSigner, name: str) -> None:
        self.node = key_id(Ed25519PrivateKey.generate())
        self.peer = Peer(self.node, f"{name}:1")
        self.stats = NodeStats("relay", name, name)
        self.ring = ChunkRing(10 * OPUS_RATE)
        self.children = Children(signer.stream_id, self.ring, 4, NodeConfig(), self.stats)
        self.children.set_info(signer.stream_info(b"OpusHead" + bytes(11)), 0.0)
        self.children.set_path((signer.stream_id, self.node), 0.0)
        self.drop_datagrams = 0
        """How many of the next datagrams to the child are lost."""

    def has(self, item: VerifiedChunk, now: float) -> None:
        """The chunk arrived here: keep it and forward it live."""
        self.ring.add(item)
        self.children.forward(item, now)


class Solo:
    """One `NodeCore` (a listener) between a scripted tracker and `FakeParent`s, on a
    fake clock: the first answer assigns `parents[0]` with the others as backups, and
    says the origin's live granule is `live_granule`."""

    def __init__(
        self, signer: ChunkSigner, parents: list[FakeParent], live_granule: int | None = None
    ) -> None:
        self.signer = signer
        self.parents = {parent.peer.address: parent for parent in parents}
        for parent in parents:  # the child's transport acknowledges all the time
            parent.children.last_heard = lambda child: self.now
        self.node = key_id(Ed25519PrivateKey.generate())
        self.core = NodeCore(
            self.node, signer.stream_id, capacity=0,
            config=NodeConfig(), rng=random.Random(1), join_timeout=60.0,
        )  # fmt: skip
        backups = tuple(p.peer for p in parents[1:])
        self.assign = Assigned(parents[0].peer, backups, 2, 180, live_granule)
        self.now = 0.0
        self.links: dict[int, tuple[FakeParent, int]] = {}
        self.played: list[tuple[float, int]] = []
        self.closed: list[tuple[FakeParent, int]] = []
        self.core.start(self.now)
        self.pump()

    def answer(self, request: TrackerRequest) -> TrackerResponse | None:
        """JOIN: `assign`; REJOIN: the parent it is attached to, else the first other one."""
        if isinstance(request, Rejoin):
            others = [p for p in self.parents.values() if p.node not in (request.dead, b"")]
            chosen = next((p for p in others if p.node == request.attached), others[0])
            return Assigned(chosen.peer, (), 2, 180)
        return self.assign if isinstance(request, Join) else None

    def parent(self) -> FakeParent | None:
        current = self.core.current
        if current is None or current.attached_at is None:
            return None
        return self.parents[current.peer.address]

    def pump(self) -> None:
        core, now = self.core, self.now
        while True:
            busy = False
            while (action := core.next_action()) is not None:
                busy = True
                if isinstance(action, AskTracker):
                    core.tracker_answered(action.ticket, self.answer(action.request), now)
                elif isinstance(action, Connect):
                    parent = self.parents[action.peer.address]
                    self.links[action.link] = (parent, action.link)
                    parent.children.open(action.link, 1200, now, "192.0.2.0/24", self.node)
                    core.link_opened(action.link, now)
                elif isinstance(action, CloseLink):
                    parent, child = self.links.pop(action.link)
                    parent.children.receive_data(child, action.data, now)
                    parent.children.closed(child)
                    self.closed.append((parent, action.code))
                elif isinstance(action, Play):
                    self.played.append((now, action.item.seq))
            for link in core.take_dirty_links():
                data = core.take_link_output(link)
                if link in self.links and data:  # b"" would be the end of the stream
                    parent, child = self.links[link]
                    parent.children.receive_data(child, data, now)
            for parent in self.parents.values():
                for child in parent.children.take_dirty():
                    data, datagrams = parent.children.take_output(child)
                    if data and child in self.links:
                        busy = True
                        core.link_data(child, data, now)
                    for datagram in datagrams:
                        if parent.drop_datagrams:
                            parent.drop_datagrams -= 1
                        elif child in self.links:
                            busy = True
                            core.link_datagram(child, datagram, now)
                parent.children.take_closes()
            if not busy:
                return

    def run_until(self, until: float) -> None:
        while True:
            timers = [self.core.get_timer()]
            timers += [parent.children.get_timer() for parent in self.parents.values()]
            due = min((t for t in timers if t is not None), default=until)
            if due > until:
                self.now = until
                return
            self.now = max(self.now, due)
            for parent in self.parents.values():
                parent.children.handle_timer(self.now)
            self.core.handle_timer(self.now)
            self.pump()


def next_chunk(signer: ChunkSigner) -> VerifiedChunk:
    return signer.sign([b"\xfc" + bytes(40)], 960 * (signer.next_seq + 1))


def signer_with_chunks(count: int) -> tuple[ChunkSigner, list[VerifiedChunk]]:
    signer = ChunkSigner(Ed25519PrivateKey.generate())
    return signer, [next_chunk(signer) for _ in range(count)]


def stream_live(solo: Solo, parent: FakeParent, until: float) -> None:
    """The stream goes on: a new chunk reaches `parent` every 200 ms."""
    while solo.now + 0.2 <= until:
        solo.run_until(solo.now + 0.2)
        parent.has(next_chunk(solo.signer), solo.now)
        solo.pump()


class Refreshing(Solo):
    """A `Solo` whose tracker ACKs each REFRESH and notes when it came."""

    def __init__(self, signer: ChunkSigner, parents: list[FakeParent]) -> None:
        self.refreshes: list[float] = []
        super().__init__(signer, parents)

    def answer(self, request: TrackerRequest) -> TrackerResponse | None:
        if isinstance(request, Refresh):
            self.refreshes.append(self.now)
            return Ack(180)
        return super().answer(request)


def announcing(signer: ChunkSigner) -> VerifiedChunk:
    return signer.sign([b"\xfc" + bytes(40)], 960 * (signer.next_seq + 1), announce=True)


def test_a_chunk_that_announces_makes_the_node_refresh_after_its_parents() -> None:
    """After a tracker restart the origin's chunks carry ANNOUNCE: each node REFRESHes at
    once rather than at its next refresh period (minutes), one step per level down, so
    the tracker knows its parent by then. Only a chunk at the live edge counts (an old
    one replayed is no news), and one announcement is enough for a while."""
    signer, chunks = signer_with_chunks(5)
    parent = FakeParent(signer, "parent")
    for item in chunks:
        parent.has(item, 0.0)
    solo = Refreshing(signer, [parent])
    stream_live(solo, parent, 2.0)
    assert solo.core.stats.depth == 2 and solo.refreshes == []
    late = announcing(signer)  # overtaken by the next chunk: it comes in as a repair would
    parent.has(next_chunk(signer), solo.now)
    solo.pump()
    parent.has(late, solo.now)
    solo.pump()
    stream_live(solo, parent, 4.0)
    assert solo.refreshes == [], "an announcement behind the live edge counted"
    parent.has(announcing(signer), solo.now)
    announced = solo.now
    solo.pump()
    stream_live(solo, parent, announced + ANNOUNCE_QUIET - 1)
    assert len(solo.refreshes) == 1
    assert ANNOUNCE_STEP <= solo.refreshes[0] - announced < 2 * ANNOUNCE_STEP  # level 2
    parent.has(announcing(signer), solo.now)  # still quiet: the tracker has us
    solo.pump()
    stream_live(solo, parent, announced + ANNOUNCE_QUIET + 2)
    assert len(solo.refreshes) == 1
    parent.has(announcing(signer), solo.now)  # the quiet is over: a new announcement
    solo.pump()
    stream_live(solo, parent, solo.now + 2)
    assert len(solo.refreshes) == 2


class Forgotten(Solo):
    """A `Solo` whose tracker restarted: it answers REFRESH with UNKNOWN_PEER."""

    def __init__(self, signer: ChunkSigner, parents: list[FakeParent]) -> None:
        self.asked: list[str] = []
        super().__init__(signer, parents)

    def answer(self, request: TrackerRequest) -> TrackerResponse | None:
        self.asked.append(type(request).__name__)
        if isinstance(request, Refresh):
            return Goodbye(ErrorCode.UNKNOWN_PEER, "unknown peer")
        return super().answer(request)


@pytest.mark.parametrize("token", [None, b"a host-signed token"], ids=["open", "token"])
def test_a_node_the_tracker_forgot_joins_again_at_once_if_it_holds_a_token(
    token: bytes | None,
) -> None:
    """A tracker that takes tokens never re-inserts a node from its REFRESH (which
    carries none): retrying it only kept newcomers after a restart waiting 4 to 7 s
    more, seated under nodes the tracker did not know yet."""
    signer, chunks = signer_with_chunks(5)
    parent = FakeParent(signer, "parent")
    for item in chunks:
        parent.has(item, 0.0)
    solo = Forgotten(signer, [parent])
    solo.core.token = token  # as if it had joined with it
    stream_live(solo, parent, 1.0)
    solo.asked.clear()
    parent.has(announcing(signer), solo.now)
    solo.pump()
    stream_live(solo, parent, solo.now + 12)
    refreshes = 1 if token else 1 + UNKNOWN_RETRIES
    assert solo.asked == ["Refresh"] * refreshes + ["Join"]


def test_a_parent_that_accepts_and_sends_nothing_is_left_at_the_first_chunk_timeout() -> None:
    """The hostile relay: STREAM_INFO, PATH, HEARTBEATs announcing nothing new, no audio. A
    newcomer used to wait out the whole stall timeout under it before trying a backup."""
    signer, chunks = signer_with_chunks(10)
    silent, backup = FakeParent(signer, "silent"), FakeParent(signer, "backup")
    for item in chunks:
        backup.has(item, 0.0)
    solo = Solo(signer, [silent, backup])
    attached = solo.core.current.attached_at if solo.core.current else None
    assert solo.parent() is silent and attached is not None
    timeout = NodeConfig().first_chunk_timeout
    solo.run_until(attached + timeout - 0.05)
    assert solo.parent() is silent, "left before the first-chunk timeout"
    solo.run_until(attached + timeout + 0.05)
    assert solo.closed == [(silent, ErrorCode.PARENT_STALLED)]
    assert solo.parent() is backup  # tried at once, not after asking the tracker
    assert solo.played == [(solo.played[0][0], 9)]  # the backup's live edge


@pytest.mark.parametrize(
    "lag", [1.5, 3.0, 12.0], ids=["a-little", "beyond-the-start-lag", "beyond-the-ring"]
)
def test_a_newcomer_starts_no_further_behind_the_live_edge_than_the_start_lag(
    lag: float,
) -> None:
    """A relay that replays chunks it kept (validly signed) would start a newcomer in the
    past, then stop it there once the replay repeats; the ring buffers of the next parent
    no longer hold what follows. The tracker says where the origin was (ASSIGNED): a
    chunk further behind than the start lag is not played, and the relay is left at the
    first-chunk timeout. One a little behind (a parent catching up) is played."""
    signer, chunks = signer_with_chunks(int(14 / 0.02))  # 20 ms each: 14 s of audio
    behind = int(lag / 0.02)
    replaying, live = FakeParent(signer, "replaying"), FakeParent(signer, "live")
    for item in chunks[: len(chunks) - behind]:
        replaying.has(item, 0.0)
    for item in chunks[-500:]:  # the last 10 s: what a ring holds
        live.has(item, 0.0)
    solo = Solo(signer, [replaying, live], live_granule=chunks[-1].chunk.granule)
    solo.run_until(NodeConfig().first_chunk_timeout + 0.1)
    if lag < NodeConfig().start_lag:
        assert solo.parent() is replaying and not solo.closed
        assert solo.played[0][1] == chunks[-1 - behind].seq
        return
    assert solo.closed == [(replaying, ErrorCode.PARENT_STALLED)]
    assert solo.parent() is live
    assert solo.played[0][1] == chunks[-1].seq  # the live edge, not the past
    assert solo.core.stats.too_old == 1


class BeforeTheStart(Solo):
    """The tracker does not know the stream at the first JOIN (it has not started yet, or
    the tracker just restarted); it answers the next one."""

    def __init__(self, signer: ChunkSigner, parents: list[FakeParent], live_granule: int) -> None:
        self.told = False
        super().__init__(signer, parents, live_granule)

    def answer(self, request: TrackerRequest) -> TrackerResponse | None:
        if isinstance(request, Join) and not self.told:
            self.told = True
            return Goodbye(ErrorCode.UNKNOWN_STREAM, "not yet")
        return super().answer(request)


@pytest.mark.parametrize("started_s", [4.0, 30.0], ids=["just-started", "long-running"])
def test_a_node_that_waited_for_the_stream_plays_it_from_the_start_while_rings_hold_it(
    started_s: float,
) -> None:
    """Told the stream had not started, a node plays it from chunk 0 once it has, even
    beyond the start lag: it asked for the beginning, and it is not a replay. But when the
    tracker says the stream is older than a ring holds (the tracker restarted mid-stream),
    it starts at the live edge like any newcomer, not from the oldest chunk rings hold."""
    signer, chunks = signer_with_chunks(int(started_s / 0.02))
    parent, backup = FakeParent(signer, "parent"), FakeParent(signer, "backup")
    for item in chunks:
        parent.has(item, 0.0)
        backup.has(item, 0.0)
    solo = BeforeTheStart(signer, [parent, backup], live_granule=chunks[-1].chunk.granule)
    solo.run_until(2.0)
    assert not solo.closed and solo.parent() is parent
    first = solo.played[0][1]
    assert first == (0 if started_s < NodeConfig().buffer_seconds else chunks[-1].seq)


class BackupsOnly(Solo):
    """The tracker answers the JOIN, then nothing: the child has only its backups."""

    def answer(self, request: TrackerRequest) -> TrackerResponse | None:
        return self.assign if isinstance(request, Join) else None


def test_a_newcomer_under_silent_relays_tries_each_once_at_the_first_chunk_timeout() -> None:
    """Hostile relays accept at once and send nothing. A newcomer leaves each after the
    first-chunk timeout, not doubled by the failovers before (it has played nothing, so a
    failover costs no parent a backlog), and does not go back to one that stalled it
    while there is another backup: it used to bounce between the first two for ever."""
    signer, chunks = signer_with_chunks(10)
    silent = [FakeParent(signer, f"silent{i}") for i in range(3)]
    good = FakeParent(signer, "good")
    for item in chunks:
        good.has(item, 0.0)
    solo = BackupsOnly(signer, [*silent, good])
    timeout = NodeConfig().first_chunk_timeout
    solo.run_until(3 * timeout + 0.1)
    stalled = [parent for parent, code in solo.closed if code == ErrorCode.PARENT_STALLED]
    assert stalled == silent
    assert solo.parent() is good
    assert solo.played and solo.played[0][0] <= 3 * timeout + 0.1


def test_a_node_that_played_waits_longer_on_each_new_parent_after_failovers() -> None:
    """Once it plays, a failover lengthens the next first-chunk timeout (a starved machine
    makes parents look silent): the storm rule, kept for nodes with audio to protect."""
    signer, chunks = signer_with_chunks(5)
    first, silent, good = (FakeParent(signer, name) for name in ("first", "silent", "good"))
    for item in chunks:
        first.has(item, 0.0)
        good.has(item, 0.0)
    solo = BackupsOnly(signer, [first, silent])
    assert solo.parent() is first and solo.played
    solo.parents[good.peer.address] = good
    good.children.last_heard = lambda child: solo.now
    solo.core.backups = (silent.peer, good.peer)
    (link,) = solo.links
    solo.core.link_failed(link, "connection lost", solo.now)
    solo.pump()
    assert solo.parent() is silent
    attached = solo.now
    timeout = NodeConfig().first_chunk_timeout
    solo.run_until(attached + 2 * timeout - 0.05)
    assert solo.parent() is silent, "left at the unlengthened first-chunk timeout"
    solo.run_until(attached + 2 * timeout + 0.05)
    assert solo.parent() is good


def test_an_unproven_parent_that_says_it_is_stalled_is_kept_but_gets_no_grace() -> None:
    """A parent that never delivered but says its own playback is stalled (it joined, or
    failed over, just before us) is not left at the first-chunk timeout; a hostile one
    saying so for ever is left at the stall timeout, not after the stall grace too."""
    signer, _ = signer_with_chunks(0)
    stalled, backup = FakeParent(signer, "stalled"), FakeParent(signer, "backup")
    stalled.children.set_stalled_since(0.0)
    solo = Solo(signer, [stalled, backup])
    assert solo.core.current is not None and solo.core.current.attached_at is not None
    attached = solo.core.current.attached_at
    config = NodeConfig()
    solo.run_until(attached + config.stall_timeout - 0.05)
    assert solo.parent() is stalled and not solo.closed
    solo.run_until(attached + config.stall_timeout + 0.05)
    assert solo.closed == [(stalled, ErrorCode.PARENT_STALLED)]


def test_an_unproven_stalled_parent_that_recovers_is_not_left() -> None:
    signer, chunks = signer_with_chunks(3)
    stalled, backup = FakeParent(signer, "stalled"), FakeParent(signer, "backup")
    stalled.children.set_stalled_since(0.0)
    solo = Solo(signer, [stalled, backup])
    solo.run_until(1.5)
    stalled.children.set_stalled_since(None)
    for item in chunks:
        stalled.has(item, solo.now)
    solo.pump()
    stream_live(solo, stalled, 10.0)
    assert [seq for _, seq in solo.played] == list(range(signer.next_seq))
    assert solo.parent() is stalled and not solo.closed


@pytest.mark.parametrize("says_stalled", [True, False], ids=["says-stalled", "lags"])
def test_a_new_parent_catching_up_from_behind_is_not_left(says_stalled: bool) -> None:
    """The melt: after a failover the new parent is behind us, stalled longer than us or
    merely lagging. It plays (and forwards) what we had already, and stops saying it is
    stalled if it did: nothing new for us for a while, but it is no withholder."""
    signer, chunks = signer_with_chunks(20)
    first, behind = FakeParent(signer, "first"), FakeParent(signer, "behind")
    for item in chunks[:10]:
        first.has(item, 0.0)
    for item in chunks[:2]:
        behind.has(item, 0.0)
    if says_stalled:
        behind.children.set_stalled_since(0.0)
    solo = Solo(signer, [first, behind])
    (link,) = solo.links
    solo.core.link_failed(link, "connection lost", solo.now)
    solo.pump()
    assert solo.parent() is behind
    attached = solo.now
    solo.run_until(attached + 0.5)
    behind.children.set_stalled_since(None)
    for item in chunks[2:10]:  # it plays 2...9 again: old news to us
        solo.run_until(solo.now + 0.2)
        behind.has(item, solo.now)
        solo.pump()
    solo.run_until(attached + 2 * NodeConfig().first_chunk_timeout + 0.5)
    for item in chunks[10:]:
        behind.has(item, solo.now)
    solo.pump()
    stream_live(solo, behind, solo.now + 2.0)
    assert [seq for _, seq in solo.played] == list(range(9, signer.next_seq))
    assert solo.parent() is behind and solo.core.stats.failovers == 1


def test_a_new_parent_whose_first_datagram_is_lost_is_not_left() -> None:
    """After a failover the new parent may not hold our next chunk yet; when it comes, its
    datagram may be lost: the HEARTBEAT after it announces it and the REPAIR fetches it."""
    signer, chunks = signer_with_chunks(8)
    first, behind = FakeParent(signer, "first"), FakeParent(signer, "behind")
    for item in chunks[:5]:
        first.has(item, 0.0)
        behind.has(item, 0.0)
    solo = Solo(signer, [first, behind])
    solo.run_until(0.5)
    for item in chunks[5:]:  # the first parent plays 5...7 and then leaves: we have them
        first.has(item, solo.now)
    solo.pump()
    (link,) = solo.links  # the connection to the first parent breaks
    solo.core.link_failed(link, "connection lost", solo.now)
    solo.pump()
    assert solo.parent() is behind and solo.core.stats.failovers == 1
    solo.run_until(solo.now + 0.6)  # our next chunk, 8, reaches it late ...
    behind.drop_datagrams = 1  # ... and its datagram to us is lost
    behind.has(next_chunk(signer), solo.now)
    solo.pump()
    solo.run_until(solo.now + 0.8)  # no next chunk yet either: the HEARTBEAT says 8
    stream_live(solo, behind, solo.now + 3.0)
    assert [seq for _, seq in solo.played] == list(range(4, signer.next_seq))  # live edge on
    assert solo.parent() is behind and solo.core.stats.failovers == 1
    assert solo.core.stats.repairs_requested == 1
