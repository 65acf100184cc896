"""Sans-I/O relay tree of one stream: who feeds whom, decided by the tracker.

Pure data structure: no I/O, no clock reads (every operation takes `now`, in seconds).

Placement rule (docs/spec.md §7.3): a node with capacity > 0 goes under the *shallowest*
node with a free slot; a node with capacity 0 goes under the *deepest* one. Leaves thus
never take the shallow slots that keep the tree short, and relays end up above leaves.
A leaf never takes the tree's last free slot: it adds none, so the tree would be closed.
With a uniform capacity k and joins only, this fills the tree level by level, so the
depth is at most ceil(log_k N) + 1.

Repairs move only the nodes the protocol lets us tell (the reporter of a failure, the
children of a leaver); each moved node keeps its subtree and goes to the shallowest free
slot outside its own subtree (and outside the failed node's subtree). In a full tree that
slot is near the frontier, so churn makes the tree deeper than log_k N. REFRESH undoes
that (`_better_place`): stable relays move up into shallow free slots, leaves move down
out of them, each when it next refreshes (see bench/bench_tracker_core.py).

Failure reports are hearsay until confirmed: a node reported dead becomes a suspect
(nobody is sent to it) and is evicted only after `report_quorum` distinct witnesses among
its children reported it within `report_window`, when its soft state has expired, or
when the host's probe says it is unreachable. Only children the tracker put there are
witnesses: a node under a parent by its own claim of a slot it was never offered is none
(anyone can claim a free slot), and the reporters of one source network are one
(`_witness`). A suspect found alive (by the probe, or because it spoke for itself) after
a child reported it is *unproven*: alive, but maybe not delivering (a wedged relay
answers handshakes), so it gets no new children for `report_window`, or until a child
claims it as its actual parent. Its reports still count: a quorum reached
after it was found alive evicts it at once under the origin (which never fails), and
elsewhere *convicts* it: `expire` evicts it `_EXCUSED_FOR` later, unless it is *excused*
meanwhile: by its own REJOIN or its parent's eviction (its parent failed; not for a
child of the parent's own network, maybe its sybil), or by an ancestor's REJOIN (a
failover above it): its children starved because it did, and their reports only doubt
it for a while. A node is not sent back to a parent it left and reported, for
`_SHUN_FOR`, while another has room. An evicted node's remaining children keep their
subtrees; the tracker re-homes each one at once so that every peer always reaches the
origin in the tracker's view.

Capacity is earned, not declared (when `initial_capacity` is set): a declaration above
`max_capacity` counts as `max_capacity`, and a node may hold at most
max(`initial_capacity`, 2 * vouches) children, within what it declared. A *vouch* is a
child naming the node as its actual parent after `vouch_after` seconds under it, in a
confirmed placement, from another source network; each child vouches once per placement.
A relay thus doubles its slots as fast as children confirm it delivers, and a fresh
identity declaring 1,024 takes only a few slots. A first-hand failure report costs the
reported relay every vouch: it falls back to the initial slots (children beyond them are
re-homed as orphans), and the children it keeps vouch again only after `vouch_after`.
The origin is trusted: it holds what it declares.

Placements the tracker chose for a node that already streams from somewhere (an
evicted node's children, a leaver's children, a REJOIN answered with another parent
than the one the node is attached to) are *tentative* (`orphaned`) until the node
confirms them (a REJOIN or REFRESH naming that parent as its actual one). They are
guesses: the links enforce loop freedom and capacity on their own, so a node's claim of
its actual parent beats a guess. A tentative child that makes the claimed parent look
full, or a tentative link that makes the claim look like a cycle, is re-homed (still
tentative) to make room for the truth; only confirmed placements can refuse a claim.
While the view is rebuilt after a tracker restart, a REFRESH that re-inserts a node we
do not know also takes the slot of a child that is tentative or reported its parent and
stayed for want of another (`_not_there`): newcomers seated before the old nodes
refresh would lock them out. A REFRESH naming a parent we do not know yet then waits for
it (`_wait`, `_adopt`), and failure reports only get the parent probed: we seated
newcomers in slots held by children that had not refreshed yet.

Complexity: join is O(depth) (amortised O(1) bucket work); a move is O(depth + size of
the moved subtree), because the depths of the subtree are kept exact; expiry is
amortised O(1) per refresh.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar

__all__ = [
    "Assignment",
    "InvalidRequest",
    "NoCapacity",
    "PeerRef",
    "StreamTree",
    "TreeError",
    "TreeErrorCode",
    "TreeSnapshot",
    "UnknownParent",
    "UnknownPeer",
]

# Backups are searched shallow-first; after this many eligible candidates we stop looking
# for ones outside the parent's subtree and settle for what we have (keeps join O(1)).
_BACKUP_SCAN = 32
# Backups rotate through the `backups * _BACKUP_POOL` shallowest eligible candidates.
_BACKUP_POOL = 3
# In a suspect's reports, the mark of "someone could not get there" (ids are 32 bytes):
# it gets the suspect probed, but is no witness towards evicting it.
_UNSURE = b""
# A suspect's reports: reporter id -> (when, the witness it counts as: see `_witness`).
_Reports = dict[bytes, tuple[float, bytes]]
# A relay whose own parent failed (it said so by REJOIN, or we removed that parent)
# starves its children through no fault of its own while it fails over: for this long
# their reports only get it probed, as a refusal does. So does a relay below an ancestor
# that is failing over (its REJOIN), once found alive: one not found alive yet may be
# dead (a melt), and a quorum removes it sooner than a probe. Its REJOIN comes within
# about its stall timeout and a connect timeout (2 s each) of theirs, when the tracker
# keeps up; with 10 s, five silent identities first kept honest listeners 10-17 s (p99).
_EXCUSED_FOR = 5.0
_GUESS_FOR = 10.0
# A node is not sent back, as parent or backup, to a parent it left and named dead in a
# REJOIN within this long (as a node passes over a backup it left for a stall, spec
# §6.3), while any other node has a free slot: one answering probes may still feed
# nobody, and one report alone is no quorum. A placement it never confirmed is not
# shunned: a refusal may be for a moment (a dark parent after a mass failure is lit
# again within seconds). At most `_SHUN_MAX` such nodes are kept per node.
_SHUN_FOR = 30.0
_SHUN_MAX = 4
_NEVER = -math.inf  # one shared float for "not yet": each node would hold its own copy
# While the view is rebuilt, a REFRESH that names a parent we do not know yet waits for
# it (see `_reinsert`): at most this many at once (about 200 bytes each).
_WAITING_MAX = 500_000
_LEAF_SEARCH = 4096  # nodes visited at most for a leaf to trade slots with (`_remove`)


class TreeErrorCode(StrEnum):
    """Why the tree refused a request; the server maps these to wire error codes."""

    NO_CAPACITY = "no_capacity"  # no free slot anywhere suitable
    UNKNOWN_PEER = "unknown_peer"  # the peer is not in the tree: it must JOIN
    UNKNOWN_PARENT = "unknown_parent"  # refresh names a parent we do not know (yet)
    INVALID_REQUEST = "invalid_request"  # nonsensical arguments (negative capacity, ...)


class TreeError(Exception):
    """Base of every refusal by `StreamTree`.

    The peer's placement is unchanged when one is raised; what the request proved (the
    peer is alive, its capacity, a failure report) may still have been recorded.
    """

    code: ClassVar[TreeErrorCode]


class NoCapacity(TreeError):
    code = TreeErrorCode.NO_CAPACITY


class UnknownPeer(TreeError):
    code = TreeErrorCode.UNKNOWN_PEER


class UnknownParent(UnknownPeer):
    """A refresh from an unknown peer names an unknown parent.

    A subclass of `UnknownPeer` (the spec answers UNKNOWN_PEER); after a tracker restart
    the parent's own refresh is probably just late, so a server may prefer "retry later".
    """

    code = TreeErrorCode.UNKNOWN_PARENT


class InvalidRequest(TreeError):
    code = TreeErrorCode.INVALID_REQUEST


@dataclass(frozen=True, slots=True)
class PeerRef:
    """How to reach a peer: its key and its "host:port" ("" if it accepts no connections)."""

    peer_id: bytes
    address: str


@dataclass(frozen=True, slots=True)
class Assignment:
    """Where a node attaches: its parent, backups to fail over to, and its own depth."""

    parent: PeerRef
    backups: tuple[PeerRef, ...]
    depth: int  # the node's depth; the origin's children have depth 1


@dataclass(frozen=True, slots=True)
class TreeSnapshot:
    """Figures for STATUS and monitoring; `depth_histogram[d]` counts nodes at depth d."""

    audience: int  # peers, not counting the origin
    max_depth: int
    depth_histogram: tuple[int, ...]  # index 0 is the origin
    origin_children: int
    origin_capacity: int
    free_slots: int
    orphans: int
    suspects: int  # reported peers not cleared yet (pruned to the window by suspects())


class _Node:
    """Per-peer record; kept small (the budget is 1 KB per peer, including the id)."""

    __slots__ = (
        "capacity",
        "children",
        "claimed",
        "declared",
        "depth",
        "earned",
        "excused",
        "held",
        "joined",
        "last_seen",
        "leaving",
        "network",
        "offered",
        "orphaned",
        "parent",
        "placed",
        "pos",
        "ref",
        "rejoined",
        "shunned",
        "slot_depth",
        "vouched",
    )

    def __init__(
        self,
        ref: PeerRef,
        capacity: int,
        parent: _Node | None,
        depth: int,
        now: float,
        network: str = "",
    ) -> None:
        self.ref = ref
        self.capacity = capacity  # usable slots: what it declared, as far as earned
        self.declared = capacity  # what it declared, within the ceiling
        self.earned = 0  # vouches from children since its last failure report
        self.network = network  # its source network ("": not known)
        self.placed = now  # when its current placement was made or confirmed
        self.vouched = False  # it vouched for its current parent
        self.parent = parent
        self.children: list[_Node] = []
        self.depth = depth
        self.joined = now
        self.last_seen = now
        self.orphaned = False  # placed by the tracker; the node has not confirmed it yet
        # Make before break, in the view too: a confirmed child we moved streams from its
        # old parent until it has moved, so that parent's slot stays taken for placements
        # (`leaving`: that parent; `held`: such slots of ours) until the child confirms a
        # placement, or the parent lets it go. Else a newcomer sent there is refused.
        self.leaving: _Node | None = None
        self.held = 0
        # Under a parent by its own claim (REFRESH, REJOIN `attached`) of a slot the
        # tracker never offered it: anyone can claim a free slot, so its failure reports
        # prove nothing. `offered`: the parent and backups of its last assignment.
        self.claimed = False
        self.offered: tuple[_Node, ...] = ()
        self.excused = _NEVER  # when its own parent last failed (see _EXCUSED_FOR)
        # When it last sent a REJOIN: its subtree starves while it fails over. A node that
        # moves takes along the latest of its old ancestors' (`_detach`).
        self.rejoined = _NEVER
        # The parents it left and named dead in its REJOINs lately (`_SHUN_FOR`), as
        # (id, when), newest first.
        self.shunned: tuple[tuple[bytes, float], ...] = ()
        self.slot_depth = -1  # which free-slot bucket holds this node (-1: none)
        self.pos = 0  # index inside that bucket, for O(1) removal


def _kin(relay: _Node, child: _Node) -> bool:
    """Whether the child is from the relay's own known source network."""
    return relay.network != "" and child.network == relay.network


def _not_there(child: _Node) -> bool:
    """By our own view, `child` does not stream from its parent: placed tentatively, or
    it reported that parent (REJOIN) since it was placed under it, and stayed there for
    want of another slot. A JOIN's placement is not such a guess: a newcomer normally
    streams from there within milliseconds (moving those broke the 20,000-listener melt)."""
    return child.orphaned or child.rejoined > child.placed


def _within(node: _Node, ancestor: _Node) -> bool:
    """True if `node` is `ancestor` or below it.

    Walks parent pointers up to the ancestor's depth, so it costs the depth difference;
    depths are exact within every connected piece of the tree, attached or not.
    """
    for _ in range(node.depth - ancestor.depth):
        parent = node.parent
        if parent is None:
            return False
        node = parent
    return node is ancestor


class StreamTree:
    """The relay tree of one stream, rooted at its origin."""

    def __init__(
        self,
        origin_id: bytes,
        origin_address: str,
        origin_capacity: int,
        *,
        backups: int = 2,
        peer_ttl: float = 600.0,
        report_quorum: int = 2,
        report_window: float = 60.0,
        promote_after: float = 60.0,
        max_capacity: int | None = None,
        initial_capacity: int | None = None,
        vouch_after: float = 5.0,
        rebuilding_until: float = 0.0,
    ) -> None:
        if origin_capacity < 0 or backups < 0 or report_quorum < 1:
            raise InvalidRequest("capacity and backups must be >= 0, report_quorum >= 1")
        if peer_ttl <= 0 or report_window <= 0:
            raise InvalidRequest("peer_ttl and report_window must be > 0")
        if (max_capacity is not None and max_capacity < 0) or (
            initial_capacity is not None and initial_capacity < 1
        ):
            raise InvalidRequest("max_capacity must be >= 0, initial_capacity >= 1")
        self._ceiling = max_capacity
        self._initial = initial_capacity  # None: capacity is taken as declared
        self._vouch_after = vouch_after
        # Until then our view is being rebuilt: the stream ran before we knew it (we
        # restarted), and the nodes in it have not all refreshed yet (see `_reinsert`).
        self._rebuilding_until = rebuilding_until
        # Meanwhile, REFRESHes naming a parent we do not know yet: parent id -> waiting
        # node id -> (capacity, address, network); `_waits_on`: waiting node -> parent.
        self._waiting: dict[bytes, dict[bytes, tuple[int, str, str]]] = {}
        self._waits_on: dict[bytes, bytes] = {}
        self._waiting_networks: Counter[str] = Counter()
        self._arrived: list[_Node] = []  # nodes just inserted that others wait for
        self._adopted: list[tuple[bytes, str]] = []  # (node, network) placed by `_adopt`
        self._now = 0.0  # the time of the operation in progress
        self._backup_count = backups
        self._backup_turn = 0
        self._ttl = peer_ttl
        self._quorum = report_quorum
        self._window = report_window
        self._promote_after = promote_after
        origin = _Node(PeerRef(origin_id, origin_address), origin_capacity, None, 0, 0.0)
        self._origin = origin
        self._peers: dict[bytes, _Node] = {origin_id: origin}
        # Nodes with a free slot, bucketed by depth (a list per depth, swap-removal).
        # All buckets below `_shallowest` and above `_deepest` are empty (lazy hints).
        self._free: list[list[_Node]] = []
        self._shallowest = 0
        self._deepest = 0
        self._depth_count: list[int] = [1]
        self._free_slots = origin_capacity
        self._orphans = 0
        # (time, node) per join/refresh, in time order; an entry is stale if the node
        # refreshed since (its last_seen differs) or is gone. Popped lazily by expire().
        self._expiry: deque[tuple[float, _Node]] = deque()
        # Suspects: their reports (reporter id -> when, as which witness), per node.
        self._reports: dict[_Node, _Reports] = {}
        # Unproven: reported, yet alive by probe or by speaking for itself -> since when.
        self._unproven: dict[_Node, float] = {}
        # First-hand reports of a suspect found alive: being reachable proves no delivery
        # (a silent relay answers probes and refreshes), so they still count towards the
        # quorum until they leave the window.
        self._witnesses: dict[_Node, _Reports] = {}
        # Suspects found alive that a quorum still reported -> since when: evicted by
        # expire() unless excused (their own parent failed) within _EXCUSED_FOR.
        self._convicted: dict[_Node, float] = {}
        self._index(origin)

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        """Number of peers, the origin included."""
        return len(self._peers)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._peers

    def __iter__(self) -> Iterator[bytes]:
        """Every peer id, the origin included."""
        return iter(self._peers)

    @property
    def origin(self) -> PeerRef:
        return self._origin.ref

    def parent_of(self, peer_id: bytes) -> bytes | None:
        parent = self._get(peer_id).parent
        return None if parent is None else parent.ref.peer_id

    def children_of(self, peer_id: bytes) -> tuple[bytes, ...]:
        return tuple(child.ref.peer_id for child in self._get(peer_id).children)

    def depth_of(self, peer_id: bytes) -> int:
        return self._get(peer_id).depth

    def moving_from(self, peer_id: bytes) -> bytes | None:
        """The parent a peer we moved still streams from (its slot there is held)."""
        old = self._get(peer_id).leaving
        return None if old is None or not self._live(old) else old.ref.peer_id

    def capacity_of(self, peer_id: bytes) -> int:
        """The children the peer may hold now: its declaration, as far as earned."""
        return self._get(peer_id).capacity

    def declared_of(self, peer_id: bytes) -> int:
        """The capacity the peer declared, within the ceiling."""
        return self._get(peer_id).declared

    def ref_of(self, peer_id: bytes) -> PeerRef:
        """How to reach the peer (for the host's liveness probes)."""
        return self._get(peer_id).ref

    def is_orphaned(self, peer_id: bytes) -> bool:
        """True if the tracker placed this peer and the peer has not confirmed it yet."""
        return self._get(peer_id).orphaned

    def assignment_of(self, peer_id: bytes) -> Assignment:
        """The peer's current placement, with fresh backups."""
        node = self._get(peer_id)
        if node is self._origin:
            raise InvalidRequest("the origin has no parent")
        return self._assignment(node)

    def suspects(self, now: float) -> list[bytes]:
        """Peers reported dead but not (yet) confirmed: worth a probe by the host."""
        for node, reports in list(self._reports.items()):
            self._prune_reports(reports, now - self._window)
            if not reports:
                del self._reports[node]
        for node, since in list(self._unproven.items()):
            if since < now - self._window:
                del self._unproven[node]
        for node, reports in list(self._witnesses.items()):
            self._prune_reports(reports, now - self._window)
            if not reports:
                del self._witnesses[node]
        return [node.ref.peer_id for node in self._reports]

    def is_excused(self, peer_id: bytes, now: float) -> bool:
        """True if reports against the peer only doubt it now: its parent failed lately,
        or, found alive since it was reported, an ancestor is failing over."""
        return now - self._excused_since(self._get(peer_id)) < _EXCUSED_FOR

    def is_convicted(self, peer_id: bytes) -> bool:
        """True if a quorum reported the peer after it was found alive: `expire` removes
        it unless it is excused first."""
        return self._get(peer_id) in self._convicted

    def is_unproven(self, peer_id: bytes) -> bool:
        """True if a child reported this live peer and it gets no new children for now."""
        return self._get(peer_id) in self._unproven

    def waiting_from(self, network: str) -> int:
        """REFRESHes from `network` waiting for their parent to come in (`_reinsert`)."""
        return self._waiting_networks[network]

    def take_adopted(self) -> list[tuple[bytes, str]]:
        """(node, network) of each waiting node placed since the last call."""
        adopted, self._adopted = self._adopted, []
        return adopted

    def snapshot(self) -> TreeSnapshot:
        counts = self._depth_count
        max_depth = len(counts) - 1
        while counts[max_depth] == 0:
            max_depth -= 1
        return TreeSnapshot(
            audience=len(self._peers) - 1,
            max_depth=max_depth,
            depth_histogram=tuple(counts[: max_depth + 1]),
            origin_children=len(self._origin.children),
            origin_capacity=self._origin.capacity,
            free_slots=self._free_slots,
            orphans=self._orphans,
            suspects=len(self._reports),
        )

    # --------------------------------------------------------------- operations

    def join(
        self, peer_id: bytes, capacity: int, address: str, now: float, network: str = ""
    ) -> Assignment:
        """Place a new peer; a known peer gets its current placement back (idempotent).

        A peer whose parent failed must use `report_failure`, not join: join of a known
        peer only refreshes it (address, capacity, soft state) and clears suspicion.
        `network` is its source network (a child does not vouch for a parent in its own).
        """
        if capacity < 0:
            raise InvalidRequest("negative capacity")
        self._now = now
        node = self._peers.get(peer_id)
        if node is self._origin:
            raise InvalidRequest("the origin cannot join its own stream")
        if node is not None:
            self._update(node, now, capacity, address)
            self._set_orphaned(node, False)
            return self._assignment(node)
        if capacity == 0 and self._free_slots <= 1:
            # A leaf adds no slots: taking the last one would close the tree to everyone.
            raise NoCapacity("the last free slot is kept for a relay")
        parent = self._pick_parent(None, capacity)
        if parent is None:
            raise NoCapacity("no free slot in the tree")
        node = self._insert(peer_id, capacity, address, parent, now, network)
        self._adopt(now)
        return self._assignment(node)

    def report_failure(
        self,
        reporter: bytes,
        dead: bytes,
        now: float,
        *,
        attached_to: bytes | None = None,
        capacity: int | None = None,
        address: str | None = None,
        network: str = "",
    ) -> Assignment:
        """REJOIN: `reporter` lost its parent `dead`; move it (with its subtree).

        The report counts towards evicting `dead` only if `dead` is the reporter's parent
        in our view. `attached_to` (the parent the reporter actually streams from) is kept
        if it is a valid claim (see `_claim`) outside `dead`'s subtree; otherwise the
        reporter gets the shallowest suitable slot, tentatively, until it confirms. A
        reporter whose parent in our view is not `dead` (an orphan we re-homed, or a
        repeated report) keeps its placement unless `attached_to` is valid. An unknown
        reporter that gives its `capacity` is placed like a join (e.g. after a tracker
        restart; `network` is then its source network).
        """
        if reporter == dead:
            raise InvalidRequest("a peer cannot report itself")
        self._now = now
        node = self._peers.get(reporter)
        if node is None:
            if capacity is None:
                raise UnknownPeer("unknown reporter")
            placed = self._place_unknown(
                reporter, capacity, address or "", dead, attached_to, now, network
            )
            self._adopt(now)
            return placed
        if node is self._origin:
            raise InvalidRequest("the origin has no parent")
        self._update(node, now, capacity, address)
        node.rejoined = now
        self._excuse(node, now)
        suspect = self._peers.get(dead)
        banned = None if suspect is None or suspect is self._origin else suspect
        refused = node.parent is suspect and node.orphaned
        if banned is not None and node.parent is banned and not refused:
            self._shun(node, dead, now)  # it streamed from there, and left
        if banned is not None and refused:
            # We only told it to go there: it never streamed from that parent, which
            # refused it or never answered. That is no failure report: place the node
            # elsewhere, and let the probe tell whether that parent is there at all.
            self._doubt(banned, now)
            banned = None
        counted = banned is not None and node.parent is banned
        if banned is not None and counted and (node.claimed or self._rebuilding(now)):
            # It put itself there by a claim, as anyone can into a free slot; or we put it
            # there while our view is rebuilt, in a slot maybe held by a child that has
            # not refreshed yet, so a refusal is likely: its report only gets that parent
            # probed (and costs it no vouch).
            self._doubt(banned, now)
            counted = False
        if banned is not None and counted:
            self._record_report(banned, reporter, now)  # may evict it and re-home us
            if self._peers.get(reporter) is not node:
                raise NoCapacity("no free slot left for the reporter")
        claim = self._claim(node, attached_to, banned)
        self._proven_by_child(claim)
        if node.parent is suspect:
            target = claim or self._pick_parent(node, node.capacity, banned=banned, avoid=suspect)
            if target is None and banned is not None:
                # Only `dead`'s subtree has room: it may yet be alive (its probe tells).
                target = self._pick_parent(node, node.capacity, avoid=suspect)
            if target is None and self._under_a_guess(node) is not None:
                self._set_orphaned(node, True)
                return self._assignment(node)  # moved below its own guessed subtree
            if target is None:
                # Nowhere else: it may try there again. A refusal may have been for a
                # moment (a child of that parent was leaving, say), or the one slot we
                # counted as taken there was the reporter's own (a JOIN placement that
                # parent could not take yet): answered "no slot", it held that slot, dark,
                # and we seated newcomers below it (a 1,000-listener launch locked out).
                # A dead parent is removed once the report is confirmed.
                self._set_orphaned(node, attached_to != dead)  # a guess, unless it says so
                return self._assignment(node)
            if target is claim:
                self._move_by_claim(node, target)
            else:
                self._move(node, target)
        elif claim is not None and claim is not node.parent:
            self._move_by_claim(node, claim)
        # Where it streams from now is a fact; anywhere else we just told it to go.
        self._set_orphaned(node, node.parent is None or node.parent.ref.peer_id != attached_to)
        if claim is not None and claim is node.parent:
            self._vouch(node)
        if banned is not None and counted and self._live(banned):
            self._forfeit(banned)  # after the reporter left it: the slots it frees are not ours
        return self._assignment(node)

    def probe_result(self, peer_id: bytes, alive: bool, now: float) -> list[bytes]:
        """The host probed a suspect: clear the suspicion, or evict it.

        A failed probe of a peer that is no longer a suspect is stale (it spoke for itself
        meanwhile, e.g. back from a SIGSTOP) and changes nothing. Returns the peers
        removed (the suspect, plus any subtree with nowhere to go).
        """
        self._now = now
        node = self._peers.get(peer_id)
        if node is None:
            return []  # already gone: probes race with reports and expiry
        if node is self._origin:
            raise InvalidRequest("the origin is never evicted")
        if alive:
            self._clear_suspicion(node, now)
            self._touch(node, now)
            return []
        if node not in self._reports:
            return []
        return self._evict(node)

    def leave(self, peer_id: bytes, now: float) -> dict[bytes, Assignment]:
        """Graceful leave: re-home the leaver's children, then remove it.

        Returns child id -> new placement, for the leaver to REDIRECT each child. The
        children avoid the leaver's own parent if they can: it is still feeding the leaver
        during the make-before-break handover. A child with nowhere to go is dropped
        from the view (with its subtree) and absent from the result; it will rejoin.
        """
        self._now = now
        node = self._get(peer_id)
        if node is self._origin:
            raise InvalidRequest("the origin does not leave its stream")
        placed, _ = self._remove(node, avoid=node.parent)
        for child in placed:
            self._set_orphaned(child, True)  # until it moved there and says so
        return {child.ref.peer_id: self._assignment(child) for child in placed}

    def child_gone(self, parent_id: bytes, child_id: bytes, now: float) -> list[bytes]:
        """CHILD_GONE: `parent_id` let `child_id` go for silence; returns the peers removed.

        The parent's word counts only for its own slot, and only as far as what a lying
        parent could do anyway by dropping the child: a childless child is removed (if
        alive, it comes back by its next request); one with children is only doubted, so
        it is probed but the parent is no witness towards evicting it. A child that is not
        the parent's in our view (it moved already) is left alone.
        """
        parent = self._peers.get(parent_id)
        if parent is None:
            return []
        self._update(parent, now, None, None)  # a request of its own: it is alive
        child = self._peers.get(child_id)
        if child is not None and child.leaving is parent:
            self._release(child)  # we moved it away; it had not confirmed elsewhere yet
        if child is None or child.parent is not parent:
            return []
        if child.children and parent is not self._origin:
            self._doubt(child, now)
            return []
        return self._evict(child)  # the origin is trusted: its children are re-homed at once

    def refresh(
        self,
        peer_id: bytes,
        now: float,
        *,
        parent: bytes | None = None,
        capacity: int | None = None,
        address: str | None = None,
        network: str = "",
    ) -> Assignment | None:
        """Soft-state keep-alive; also updates capacity/address and follows the peer.

        `parent` is the peer's actual parent. If it differs from our view and is a valid
        claim (see `_claim`) the view follows the peer and None is returned; if it is not,
        our view stands and its placement is returned, for the peer to move there. An
        unknown peer is re-inserted under `parent` if that parent is known and has room
        (rebuilding the view after a tracker restart); else UnknownParent / UnknownPeer
        (it must JOIN; `network`: its source network). The origin refreshes like this too
        (REGISTER), with `parent` None. A REFRESH naming the parent it has had for
        `vouch_after` seconds vouches for that parent.
        """
        if capacity is not None and capacity < 0:
            raise InvalidRequest("negative capacity")
        self._now = now
        node = self._peers.get(peer_id)
        if node is None:
            self._reinsert(peer_id, now, parent, capacity, address, network)
            self._adopt(now)
            return None
        if node is self._origin and parent is not None:
            raise InvalidRequest("the origin has no parent")
        self._update(node, now, capacity, address)
        if parent is None or node.parent is None:
            return None
        claim = self._claim(node, parent, None)
        self._proven_by_child(claim)
        if claim is None:
            return self._assignment(node)
        if claim is not node.parent:
            self._move_by_claim(node, claim)
        self._set_orphaned(node, False)
        self._vouch(node)
        better = self._better_place(node, now)
        if better is None:
            return None
        self._move_tentatively(node, better)  # the node moves when told, then confirms
        return self._assignment(node)

    def expire(self, now: float) -> list[bytes]:
        """Remove peers not heard from for more than `peer_ttl`, and those a quorum
        reported that were not excused in time (see `_convicted`); returns the removed ids.

        Their children are re-homed as orphans (and dropped only if no slot is left).
        Amortised O(1) per refresh: stale queue entries are skipped as they come up.
        """
        self._now = now
        removed: list[bytes] = []
        for node, since in list(self._convicted.items()):
            if not self._live(node):
                continue  # removed with a subtree just now
            if self._excused_since(node) >= since:
                self._pardon(node, now)  # starved by a failure above it, which came to light
            elif now - since >= _EXCUSED_FOR:
                removed += self._evict(node)
        self._unguess_origin_slots(now)
        if self._waits_on and not self._rebuilding(now):
            self._waiting.clear()  # their parents never came: they REFRESH again in time
            self._waits_on.clear()
            self._waiting_networks.clear()
        horizon = now - self._ttl
        queue = self._expiry
        while queue and queue[0][0] < horizon:
            seen, node = queue.popleft()
            if node.last_seen == seen and self._peers.get(node.ref.peer_id) is node:
                removed += self._evict(node)
        return removed

    def _unguess_origin_slots(self, now: float) -> None:
        """A guess in one of the origin's few slots that its node has not confirmed
        within `_GUESS_FOR` moves to the best other slot: an orphan that lost the stream
        asks within seconds, so one that stays silent streams from elsewhere (it moved
        before its old parent was removed) and never comes, until its next REFRESH.
        A REJOIN answered with the origin again starts the wait anew: it is on its way."""
        for child in list(self._origin.children):
            if not child.orphaned or now - max(child.placed, child.rejoined) < _GUESS_FOR:
                continue
            if child in self._reports:
                continue  # probed: removed if dead, else it stays a guess a while longer
            target = self._pick_parent(child, child.capacity, avoid=self._origin)
            if target is not None:
                self._move(child, target)

    # ----------------------------------------------------------------- internals

    def _get(self, peer_id: bytes) -> _Node:
        node = self._peers.get(peer_id)
        if node is None:
            raise UnknownPeer("unknown peer")
        return node

    def _live(self, node: _Node) -> bool:
        return self._peers.get(node.ref.peer_id) is node

    def _assignment(self, node: _Node) -> Assignment:
        parent = node.parent
        assert parent is not None, "only attached non-origin nodes have assignments"
        backups = self._backups(node)
        # Where the tracker sends it now: a failover to one of these is no claim.
        node.offered = (parent, *backups)
        return Assignment(parent.ref, tuple(backup.ref for backup in backups), node.depth)

    def _touch(self, node: _Node, now: float) -> None:
        node.last_seen = now
        if node is not self._origin:  # the origin lives as long as the stream
            self._expiry.append((now, node))

    def _update(self, node: _Node, now: float, capacity: int | None, address: str | None) -> None:
        """Apply what a request from the peer itself tells us (it is alive, too)."""
        self._clear_suspicion(node, now)
        self._touch(node, now)
        if address is not None and address != node.ref.address:
            node.ref = PeerRef(node.ref.peer_id, address)
        if capacity is not None:
            node.declared = self._within_ceiling(node, capacity)
            self._set_capacity(node, self._usable(node))

    def _set_orphaned(self, node: _Node, orphaned: bool) -> None:
        if node.orphaned != orphaned:
            node.orphaned = orphaned
            self._orphans += 1 if orphaned else -1
            if not orphaned:  # its placement became a fact now
                node.placed = self._now
                node.vouched = False
                self._release(node)

    def _move_tentatively(self, node: _Node, parent: _Node) -> None:
        """Move the node (until it moved there and says so), its old slot held if it was
        confirmed there (see `_Node.leaving`)."""
        old = node.parent
        if not node.orphaned and node.leaving is None and old is not None and self._live(old):
            node.leaving = old
            old.held += 1
            self._free_slots -= 1
        self._move(node, parent)
        self._set_orphaned(node, True)

    def _release(self, node: _Node) -> None:
        """The node no longer streams from the parent it was moved away from."""
        old = node.leaving
        if old is not None:
            node.leaving = None
            old.held -= 1
            if self._live(old):
                self._free_slots += 1
                self._index(old)

    # --- earned capacity

    def _within_ceiling(self, node: _Node | None, capacity: int) -> int:
        """A declaration as counted: at most the ceiling (the origin is trusted)."""
        if node is self._origin or self._ceiling is None:
            return capacity
        return min(capacity, self._ceiling)

    def _usable(self, node: _Node) -> int:
        """Slots the node may fill: what it declared, as far as its children vouched."""
        if node is self._origin or self._initial is None:
            return node.declared
        return min(node.declared, max(self._initial, 2 * node.earned))

    def _vouch(self, child: _Node) -> None:
        """`child` named its parent as its actual one: a vouch if it has streamed from it
        (a confirmed placement) for `vouch_after`, once per placement, and from another
        source network (one machine cannot vouch for itself)."""
        parent = child.parent
        if (
            self._initial is None
            or parent is None
            or parent is self._origin
            or child.vouched
            or child.orphaned
            or self._now - child.placed < self._vouch_after
            or (child.network != "" and child.network == parent.network)
        ):
            return
        child.vouched = True
        parent.earned += 1
        self._set_capacity(parent, self._usable(parent))

    def _forfeit(self, node: _Node) -> None:
        """A child reported `node` as not delivering: it loses every vouch. The children
        it keeps vouch again once they have streamed from it for `vouch_after` more."""
        if self._initial is None or node is self._origin:
            return
        node.earned = 0
        self._set_capacity(node, self._usable(node))
        for child in node.children:
            child.vouched = False
            child.placed = self._now

    # --- free-slot buckets

    def _index(self, node: _Node) -> None:
        """Put the node in the bucket of its depth if it has a free slot, else in none."""
        want = node.depth if len(node.children) + node.held < node.capacity else -1
        if node.slot_depth == want:
            return
        if node.slot_depth >= 0:
            self._unindex(node)
        if want >= 0:
            free = self._free
            while len(free) <= want:
                free.append([])
            bucket = free[want]
            node.slot_depth = want
            node.pos = len(bucket)
            bucket.append(node)
            self._shallowest = min(self._shallowest, want)
            self._deepest = max(self._deepest, want)

    def _unindex(self, node: _Node) -> None:
        bucket = self._free[node.slot_depth]
        last = bucket.pop()
        if last is not node:  # swap-remove: the last entry fills the hole
            bucket[node.pos] = last
            last.pos = node.pos
        node.slot_depth = -1

    def _free_nodes(self, shallow_first: bool) -> Iterator[_Node]:
        """Nodes with a free slot, by depth; within a depth, the latest indexed first.

        Suspects (reported dead, not yet confirmed either way) and unproven nodes (alive
        but reported) are left out: nobody is sent to a node that may not deliver. Nodes
        below a tentative link come last: where they really are is a guess, and after a
        mass failure an unconfirmed orphan is often dead itself."""
        if not self._orphans:  # nothing is guessed
            yield from self._free_pass(shallow_first, None)
            return
        yield from self._free_pass(shallow_first, False)
        yield from self._free_pass(shallow_first, True)

    def _free_pass(
        self, shallow_first: bool, guessed: bool | None, *, doubtful: bool = False
    ) -> Iterator[_Node]:
        """`_free_nodes`, only those below a tentative link (`guessed`), or none of them
        (not `guessed`), or all (None); with suspects and unproven nodes if `doubtful`."""
        suspects = {} if doubtful else self._reports
        unproven = {} if doubtful else self._unproven
        free = self._free
        if shallow_first:
            depth = self._shallowest
            while depth < len(free) and not free[depth]:
                depth += 1
            self._shallowest = depth
            depths = range(depth, len(free))
        else:
            depth = min(self._deepest, len(free) - 1)
            while depth > 0 and not free[depth]:
                depth -= 1
            self._deepest = max(depth, 0)
            depths = range(depth, -1, -1)
        for d in depths:
            for node in reversed(free[d]):
                if node in suspects or node in unproven:
                    continue
                if guessed is None or guessed == (
                    self._tentative_link(node, self._origin) is not None
                ):
                    yield node

    def _pick_parent(
        self,
        mover: _Node | None,
        capacity: int,
        *,
        banned: _Node | None = None,
        avoid: _Node | None = None,
        doubtful: bool = False,
    ) -> _Node | None:
        """The placement rule: shallowest free slot for relays, deepest for leaves.

        Skips the mover's own subtree (a cycle), `banned`'s subtree (cut off from the
        stream) and the single node `avoid`; suspects and unproven nodes too, unless
        `doubtful`. A node the mover shuns comes only if nothing else does.
        """
        shallow_first = capacity > 0
        if doubtful:
            candidates = self._free_pass(shallow_first, None, doubtful=True)
        else:
            candidates = self._free_nodes(shallow_first)
        shunned = None
        for candidate in candidates:
            if candidate is avoid:
                continue
            if mover is not None and _within(candidate, mover):
                continue
            if banned is not None and _within(candidate, banned):
                continue
            if mover is not None and self._shuns(mover, candidate):
                shunned = shunned or candidate
                continue
            return candidate
        return shunned

    def _claim(self, node: _Node, parent_id: bytes | None, banned: _Node | None) -> _Node | None:
        """The peer named as `node`'s actual parent, if our view can take that as true.

        A claim is refused if the parent is unknown, in `banned`'s subtree, full of
        confirmed children, or below `node` through confirmed links only. A tentative
        placement in the way (ours, a guess) swaps into the slot `node` leaves: a
        tentative child of a full parent, or the tentative link that makes the claim
        look like a cycle (its piece then hangs, with `node`, where `node` was).
        """
        if parent_id is None:
            return None
        parent = self._peers.get(parent_id)
        if parent is None or parent is node:
            return None
        if banned is not None and _within(parent, banned):
            return None
        if parent is node.parent:
            return parent
        old = node.parent
        swappable = old is not None and old not in self._reports
        if swappable and old is not None and banned is not None and _within(old, banned):
            swappable = False
        full = len(parent.children) >= parent.capacity
        if _within(parent, node):
            guess = self._tentative_link(parent, node)
            if guess is None or full or not swappable or old is None:
                return None
            self._detach(guess)
            self._move_by_claim(node, parent)
            self._attach(guess, old)
            return parent
        if full:
            guesses = [c for c in parent.children if c.orphaned and not _within(node, c)]
            if not guesses or not swappable or old is None:
                return None
            guess = guesses[-1]
            self._detach(guess)
            self._move_by_claim(node, parent)
            self._attach(guess, old)
        return parent

    def _better_place(self, node: _Node, now: float) -> _Node | None:
        """Rebalancing, one refreshing peer at a time, so churn does not deepen the tree.

        A relay up for `promote_after` moves to a free slot at least two levels above
        its own (stable relays migrate toward the root, pulling their subtrees up); a
        leaf holding a slot two or more levels above the deepest free one moves down
        there (the shallow slot goes to a relay). Every move is make-before-break: the
        peer hears of it in the REFRESH answer, moves, and confirms.
        """
        parent = node.parent
        if parent is None:
            return None
        if node.capacity > 0:
            if now - node.joined < self._promote_after:
                return None
            target = self._pick_parent(node, node.capacity, avoid=parent)
            if target is not None and target.depth + 2 < node.depth:
                return target
            return None
        target = self._pick_parent(node, 0, avoid=parent)
        if target is not None and target.depth > node.depth:  # it lands 2+ levels deeper
            return target
        return None

    def _shun(self, node: _Node, dead: bytes, now: float) -> None:
        """`node` left its confirmed parent `dead` and named it in a REJOIN."""
        kept = tuple(
            (peer_id, when)
            for peer_id, when in node.shunned
            if peer_id != dead and now - when < _SHUN_FOR
        )
        node.shunned = ((dead, now), *kept)[:_SHUN_MAX]

    def _shuns(self, node: _Node, candidate: _Node) -> bool:
        """Whether `node` is not to be sent to `candidate` now (see `_SHUN_FOR`)."""
        if not node.shunned:
            return False
        peer_id = candidate.ref.peer_id
        return any(
            shunned == peer_id and self._now - when < _SHUN_FOR for shunned, when in node.shunned
        )

    def _under_a_guess(self, node: _Node) -> _Node | None:
        """When the only free slots lie in `node`'s own subtree: one below a tentative
        link there is below `node` only by our guess. Move `node` to that slot and the
        guessed piece into the slot `node` leaves (a guess for a guess, no cycle)."""
        old = node.parent
        if old is None or old in self._reports:
            return None
        for free in self._free_nodes(shallow_first=node.capacity > 0):
            if free is node or not _within(free, node):
                continue
            guess = self._tentative_link(free, node)
            if guess is not None:
                self._detach(guess)
                self._move(node, free)
                self._attach(guess, old)
                return free
        return None

    def _tentative_link(self, low: _Node, high: _Node) -> _Node | None:
        """The first tentatively placed node on the way up from `low` to `high`."""
        node: _Node | None = low
        while node is not None and node is not high:
            if node.orphaned:
                return node
            node = node.parent
        return None

    def _backups(self, node: _Node) -> tuple[_Node, ...]:
        """Up to `backups` nodes with a free slot, shallow first.

        Never the node, its parent or its subtree; nodes outside the parent's subtree
        come first, so one relay failure does not take out the parent and the backups.
        Successive assignments rotate through a pool of the shallowest candidates, so the
        children of one relay get different backups and do not all race for the same
        slots when it dies.
        """
        wanted = self._backup_count
        parent = node.parent
        shared = None if parent is self._origin else parent  # sharing the origin is moot
        pool_size = wanted * _BACKUP_POOL
        preferred: list[_Node] = []
        fallback: list[_Node] = []
        examined = 0
        for candidate in self._free_nodes(shallow_first=True):
            if len(preferred) == pool_size:
                break
            if candidate is parent or _within(candidate, node):
                continue
            if self._shuns(node, candidate):
                continue
            if shared is not None and _within(candidate, shared):
                if len(fallback) < wanted:
                    fallback.append(candidate)
            else:
                preferred.append(candidate)
            examined += 1
            if examined >= _BACKUP_SCAN and len(preferred) + len(fallback) >= wanted:
                break
        self._backup_turn += 1
        if len(preferred) > wanted:
            start = self._backup_turn % len(preferred)
            preferred = (preferred[start:] + preferred[:start])[:wanted]
        return tuple((preferred + fallback)[:wanted])

    # --- structure changes

    def _count_depth(self, depth: int, delta: int) -> None:
        counts = self._depth_count
        while len(counts) <= depth:
            counts.append(0)
        counts[depth] += delta

    def _insert(
        self,
        peer_id: bytes,
        capacity: int,
        address: str,
        parent: _Node,
        now: float,
        network: str = "",
    ) -> _Node:
        declared = self._within_ceiling(None, capacity)
        node = _Node(PeerRef(peer_id, address), declared, parent, parent.depth + 1, now, network)
        node.capacity = self._usable(node)
        self._peers[peer_id] = node
        parent.children.append(node)
        self._free_slots += node.capacity - 1
        self._index(parent)
        self._count_depth(node.depth, 1)
        self._index(node)
        self._expiry.append((now, node))
        if peer_id in self._waits_on:
            self._unwait(peer_id)  # it came in by itself
        if peer_id in self._waiting:
            self._arrived.append(node)
        return node

    def _detach(self, node: _Node) -> None:
        """Cut the node (and its subtree) from its parent; its depths stay as they were."""
        parent = node.parent
        assert parent is not None, "the origin is never detached"
        node.rejoined = self._rejoined_above(node)  # its subtree starved on the old path
        parent.children.remove(node)
        node.parent = None
        if self._live(parent):  # a removed parent no longer counts its slots
            self._free_slots += 1
            self._index(parent)

    def _move(self, node: _Node, parent: _Node) -> None:
        """Re-attach the node with its whole subtree under `parent` (a free slot)."""
        self._detach(node)
        self._attach(node, parent)

    def _move_by_claim(self, node: _Node, parent: _Node) -> None:
        """Follow the node to the parent it says it streams from (see `_Node.claimed`)."""
        self._move(node, parent)
        node.claimed = parent not in node.offered

    def _attach(self, node: _Node, parent: _Node) -> None:
        """Hang a detached node with its whole subtree under `parent` (a free slot)."""
        if node.leaving is parent:
            self._release(node)  # back where it streams from
        node.parent = parent
        parent.children.append(node)
        node.placed = self._now
        node.vouched = False
        node.claimed = False
        self._free_slots -= 1
        self._index(parent)
        self._set_depth(node, parent.depth + 1)

    def _set_depth(self, root: _Node, depth: int) -> None:
        """Shift the depths of a moved subtree, keeping counts and buckets exact.

        The hot loop of every repair (O(subtree)), hence inlined counting. A move does
        not change who has a free slot, so only nodes already in a bucket are re-filed.
        """
        shift = depth - root.depth
        if shift == 0:
            return
        counts = self._depth_count
        stack = [root]
        while stack:
            node = stack.pop()
            counts[node.depth] -= 1
            node.depth += shift
            if node.depth >= len(counts):
                counts.append(0)  # one level below its parent, which is counted already
            counts[node.depth] += 1
            if node.slot_depth >= 0:
                self._index(node)
            stack.extend(node.children)

    def _set_capacity(self, node: _Node, capacity: int) -> None:
        """Children beyond a reduced capacity are re-homed as orphans (newest first)."""
        if capacity == node.capacity:
            return
        for child in node.children[capacity:][::-1]:
            target = self._pick_parent(child, child.capacity, avoid=node)
            if target is None:
                self._drop_subtree(child)
            else:
                self._move_tentatively(child, target)
        self._free_slots += capacity - node.capacity
        node.capacity = capacity
        self._index(node)

    def _forget(self, node: _Node) -> None:
        """Drop the node's own bookkeeping (its links are handled by the caller)."""
        del self._peers[node.ref.peer_id]
        if node.slot_depth >= 0:
            self._unindex(node)
        self._count_depth(node.depth, -1)
        self._free_slots -= node.capacity - len(node.children) - node.held
        self._reports.pop(node, None)
        self._unproven.pop(node, None)
        self._witnesses.pop(node, None)
        self._convicted.pop(node, None)
        self._set_orphaned(node, False)

    def _drop_subtree(self, root: _Node) -> list[bytes]:
        """Forget a whole subtree that has nowhere to go; its peers will rejoin."""
        self._detach(root)
        dropped: list[bytes] = []
        stack = [root]
        while stack:
            node = stack.pop()
            self._forget(node)
            dropped.append(node.ref.peer_id)
            stack.extend(node.children)
        return dropped

    def _remove(self, gone: _Node, *, avoid: _Node | None) -> tuple[list[_Node], list[bytes]]:
        """Remove `gone`; each child keeps its subtree and gets a new parent.

        `gone` is cut off first, so its whole piece (itself, the children not yet
        re-homed and their subtrees) is excluded from placement by one ancestry check;
        its vacated slot is available. Returns (re-homed children, removed peer ids).
        """
        removed = [gone.ref.peer_id]
        self._detach(gone)
        self._forget(gone)
        placed: list[_Node] = []

        # Relays first, so they get the shallow slots; those of gone's own network last
        # (they may be its sybils: `_evict`).
        def order(child: _Node) -> tuple[bool, int]:
            return _kin(gone, child), -child.capacity

        for child in sorted(gone.children, key=order):
            target = self._pick_parent(child, child.capacity, banned=gone, avoid=avoid)
            if target is None and avoid is not None:
                target = self._pick_parent(child, child.capacity, banned=gone)
            if target is None:
                # Only doubtful nodes have room (as after a mass failure): a guess there
                # beats dropping the subtree, whose slots we could then offer nobody.
                target = self._pick_parent(child, child.capacity, banned=gone, doubtful=True)
            if target is not None:
                self._move(child, target)
                placed.append(child)
            elif self._trade_with_a_leaf(child):
                placed.append(child)
            else:
                removed += self._drop_subtree(child)
        return placed, removed

    def _trade_with_a_leaf(self, relay: _Node) -> bool:
        """No free slot outside `relay`'s subtree (a growing tree's frontier may all be
        in it): a leaf elsewhere gives `relay` its slot and takes a free one inside, both
        tentatively. Dropping the subtree instead lost its free slots with it: nobody
        could be placed any more, and a 1,000-listener room was locked out at launch."""
        if relay.capacity == 0:
            return False
        inside = next((n for n in self._free_nodes(False) if _within(n, relay)), None)
        leaf = None if inside is None else self._a_leaf()
        if inside is None or leaf is None:
            return False
        parent = leaf.parent
        assert parent is not None, "found below the origin"
        self._move_tentatively(leaf, inside)
        self._move(relay, parent)
        return True

    def _a_leaf(self) -> _Node | None:
        """A leaf reachable from the origin (so outside the piece `_remove` cut off):
        depth first (one is soon found, at the frontier), within `_LEAF_SEARCH` nodes."""
        stack = [self._origin]
        for _ in range(_LEAF_SEARCH):
            if not stack:
                break
            node = stack.pop()
            leaf = next((child for child in node.children if child.capacity == 0), None)
            if leaf is not None:
                return leaf
            stack.extend(node.children)
        return None

    def _evict(self, node: _Node) -> list[bytes]:
        """Remove a node confirmed dead; its children become orphans (they do not know)."""
        placed, removed = self._remove(node, avoid=None)
        for child in placed:
            self._set_orphaned(child, True)
            if not _kin(node, child):
                # Starved with its parent. One of the parent's own network may be its
                # sybil, silent too: only its own REJOIN excuses it.
                self._excuse(child, self._now)
            if child.last_seen < self._now:  # not the reporter that got its parent evicted
                # Its parent died: it may have died with it (a mass failure), and nobody
                # would report it then. A live one clears this by its REJOIN.
                self._doubt(child, self._now)
                if _kin(node, child):
                    # Silent, from the network of a relay that fed nobody: likely its
                    # sybil. Offered to nobody until a child of its own names it.
                    self._unproven[child] = self._now
        return removed

    # --- reports and re-insertion

    def _prune_reports(self, reports: _Reports, horizon: float) -> None:
        """Drop the reports made before `horizon`."""
        for reporter, (when, _) in list(reports.items()):
            if when < horizon:
                del reports[reporter]

    def _record_report(self, suspect: _Node, reporter: bytes, now: float) -> None:
        """Count a first-hand report; evict once confirmed (quorum or expired state)."""
        failed = self._excused_since(suspect)
        if now - failed < _EXCUSED_FOR:
            self._doubt(suspect, now)
            return
        reports = self._reports.setdefault(suspect, {})
        found_alive = suspect in self._witnesses or suspect in self._convicted
        reports.update(self._witnesses.pop(suspect, {}))
        node = self._peers.get(reporter)
        reports[reporter] = (now, self._witness(suspect, node, reporter))
        # Those made before that failure came from children it starved.
        self._prune_reports(reports, max(now - self._window, failed))
        reporters = {r: witness for r, (_, witness) in reports.items() if r != _UNSURE}
        witnesses = len(set(reporters.values()))
        quorum = self._quorum_against(suspect, node, reporters)
        # Found alive since the first report, it may be starved by a failure above it,
        # which its REJOIN would tell us soon; not under the origin, which never fails.
        at_once = not found_alive or suspect.parent is self._origin
        if now - suspect.last_seen > self._ttl or (witnesses >= quorum and at_once):
            self._evict(suspect)
        elif witnesses >= quorum:
            self._convicted.setdefault(suspect, now)

    def _witness(self, suspect: _Node, reporter: _Node | None, reporter_id: bytes) -> bytes:
        """Who a report counts as: its source network, which may hold any number of
        identities; the reporter itself if it is of the suspect's own network (its
        sybils could only evict it) or of none known."""
        if reporter is None or reporter.network == "" or _kin(suspect, reporter):
            return reporter_id
        return reporter.network.encode()

    def _quorum_against(
        self, suspect: _Node, reporter: _Node | None, reporters: dict[bytes, bytes]
    ) -> int:
        """Witnesses that confirm a failure: `report_quorum`, unless those who have been
        under the suspect lately (its children from other networks than its own, and
        its reporters within the window) are fewer witnesses than identities, or it has
        children of its own network: then as many as they are witnesses, if fewer (at
        least 1). Children of its network may be its sybils, whose silence proves
        nothing; and a room behind one NAT, its listeners one witness, could never
        report away a relay that feeds it nothing. One identity alone (a single child,
        none of its own network) is no quorum: it may lie."""
        if reporter is None or _kin(suspect, reporter):
            return self._quorum
        population = dict(reporters)
        sybils = False
        for child in suspect.children:
            if _kin(suspect, child):
                sybils = True
            else:
                population[child.ref.peer_id] = self._witness(suspect, child, child.ref.peer_id)
        witnesses = len(set(population.values()))
        if witnesses >= self._quorum or (witnesses == len(population) and not sybils):
            return self._quorum
        return max(1, witnesses)

    def _proven_by_child(self, parent: _Node | None) -> None:
        """A child says it streams from `parent`: it delivers after all."""
        if parent is not None:
            self._unproven.pop(parent, None)

    def _clear_suspicion(self, node: _Node, now: float) -> None:
        """The node is alive. If a child reported it, it stays unproven for a while, and
        that child's report still counts towards the quorum (see `_witnesses`)."""
        reports = self._reports.pop(node, None)
        if reports is not None:
            reports.pop(_UNSURE, None)
        if reports:
            self._unproven[node] = now
            self._witnesses[node] = reports

    def _rejoined_above(self, node: _Node) -> float:
        """When the node or one of its ancestors last sent a REJOIN."""
        last = node.rejoined
        ancestor = node.parent
        while ancestor is not None:
            last = max(last, ancestor.rejoined)
            ancestor = ancestor.parent
        return last

    def _excused_since(self, node: _Node) -> float:
        """Since when its children's reports prove nothing: its parent failed, or, if it
        was found alive since they reported it, a node at or above it is failing over."""
        if node in self._witnesses or node in self._convicted:
            return max(node.excused, self._rejoined_above(node))
        return node.excused

    def _excuse(self, node: _Node, now: float) -> None:
        """The node's parent failed: its children's reports so far, and for a while, do
        not count against it (it was starved too)."""
        node.excused = now
        self._pardon(node, now)

    def _pardon(self, node: _Node, now: float) -> None:
        """Its children's reports so far were made starving: only a probe is left."""
        self._witnesses.pop(node, None)
        self._convicted.pop(node, None)
        if self._reports.pop(node, None):
            self._doubt(node, now)  # still probed, but nobody's witness any more

    def _doubt(self, node: _Node, now: float) -> None:
        """A peer we sent someone to did not take them: probe it, without counting that
        as a failure report (it may just be full, or the view of it stale)."""
        if node is not self._origin:
            self._reports.setdefault(node, {})[_UNSURE] = (now, _UNSURE)

    def _place_unknown(
        self,
        peer_id: bytes,
        capacity: int,
        address: str,
        dead: bytes,
        attached_to: bytes | None,
        now: float,
        network: str,
    ) -> Assignment:
        """A REJOIN from a peer we do not know: keep its backup if valid, else join it."""
        if capacity < 0:
            raise InvalidRequest("negative capacity")
        banned = self._peers.get(dead)
        if banned is self._origin:
            banned = None
        parent = self._peers.get(attached_to) if attached_to is not None else None
        if (
            parent is None
            or len(parent.children) >= parent.capacity
            or (banned is not None and _within(parent, banned))
        ):
            parent = self._pick_parent(None, capacity, banned=banned)
        if parent is None and banned is not None:
            # `dead` may be alive (it only let the peer go): better under it than nowhere.
            parent = self._pick_parent(None, capacity, avoid=banned)
        if parent is None:
            raise NoCapacity("no free slot in the tree")
        node = self._insert(peer_id, capacity, address, parent, now, network)
        # Like any REJOIN's answer other than its `attached`: ours to guess until confirmed.
        self._set_orphaned(node, parent.ref.peer_id != attached_to)
        node.claimed = not node.orphaned
        return self._assignment(node)

    def _reinsert(
        self,
        peer_id: bytes,
        now: float,
        parent_id: bytes | None,
        capacity: int | None,
        address: str | None,
        network: str,
    ) -> None:
        """Rebuild the view from a refresh: the peer has no children in our view yet,
        so attaching it as a leaf under a known parent with room cannot form a cycle.

        While the view is rebuilt after a tracker restart, newcomers are seated before
        the old nodes refresh, in slots those hold: the parent refuses them, and they
        REJOIN. A child that is not streaming from the parent by our own view (tentative,
        or it reported that parent since it was placed under it) then moves elsewhere,
        tentatively, for the peer that says it streams from there. Only then: in a tree
        we built ourselves, such moves cost the 1,000-listener melt chunks."""
        if parent_id is None or capacity is None:
            raise UnknownPeer("unknown peer: join")
        parent = self._peers.get(parent_id)
        if parent is None:
            if self._rebuilding(now) and self._wait(peer_id, parent_id, capacity, address, network):
                return
            raise UnknownParent("unknown parent: retry later or join")
        guess = target = None
        if len(parent.children) >= parent.capacity:
            if self._rebuilding(now):
                guess = next((c for c in reversed(parent.children) if _not_there(c)), None)
            if guess is not None:
                target = self._pick_parent(guess, guess.capacity, avoid=parent)
                if target is None and self._within_ceiling(None, capacity) == 0:
                    guess = None  # nowhere for it: not even below a leaf
            if guess is None:
                raise UnknownPeer("the claimed parent is full in our view: join")
            self._detach(guess)
        node = self._insert(peer_id, capacity, address or "", parent, now, network)
        node.claimed = True
        if guess is not None:
            self._attach(guess, target or node)  # below the peer itself: a guess for a guess
            self._set_orphaned(guess, True)

    def _rebuilding(self, now: float) -> bool:
        """Whether our view is still being rebuilt after a restart (see `_reinsert`)."""
        return now < self._rebuilding_until

    def _wait(
        self, peer_id: bytes, parent_id: bytes, capacity: int, address: str | None, network: str
    ) -> bool:
        """Keep the REFRESH of `peer_id` until `parent_id` comes in (False: too many wait).

        The nodes REFRESH after a restart parents first, but a busy tracker answers them
        late and out of order: refused, a child would ask again and again (at 5,000
        listeners the rebuild cost three times the requests it needs)."""
        self._unwait(peer_id)
        if len(self._waits_on) >= _WAITING_MAX:
            return False
        self._waiting.setdefault(parent_id, {})[peer_id] = (capacity, address or "", network)
        self._waits_on[peer_id] = parent_id
        self._waiting_networks[network] += 1
        return True

    def _unwait(self, peer_id: bytes) -> None:
        parent_id = self._waits_on.pop(peer_id, None)
        if parent_id is None:
            return
        waiting = self._waiting[parent_id]
        _, _, network = waiting.pop(peer_id)
        if not waiting:
            del self._waiting[parent_id]
        self._waiting_networks[network] -= 1

    def _adopt(self, now: float) -> None:
        """Re-insert the nodes whose REFRESH waited for a parent that just came in, then
        those that waited for them, as if each REFRESH came now."""
        while self._arrived:
            parent = self._arrived.pop()
            waiting = self._waiting.get(parent.ref.peer_id, {})
            for peer_id, (capacity, address, network) in list(waiting.items()):
                self._unwait(peer_id)
                if not self._live(parent):
                    continue  # the parent went again
                try:
                    self._reinsert(peer_id, now, parent.ref.peer_id, capacity, address, network)
                except TreeError:
                    continue  # no room there: it is known again at its next REFRESH
                self._adopted.append((peer_id, network))
